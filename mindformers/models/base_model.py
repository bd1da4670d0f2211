"""BaseModel: the parent of every model (holds the config, loads weights, generates text)."""
import copy
import os

import numpy as np
import mindspore as ms
from mindspore import nn, ops

from mindformers.tools.checkpoint import CheckpointError, fit_problems, listing, resolve_checkpoint
from mindformers.tools.weights import INDEX_SUFFIX, load_weights, open_weights, source_items
from mindformers.models import peft_adapter
from mindformers.models.convert_utils import hf_directory_converter, load_hf_weights
from mindformers.pet import apply_pet, merge_pet
from mindformers.quantization import quantization_of, quantize_model, quantized_weights, quantizing_transform
from mindformers.quantization.config import config_settings
from mindformers.tools.logger import logger
from mindformers.tools.utils import resolve_path


def parameter_array(param):
    """A Parameter's data as NumPy (bfloat16 widened to float32: exact)."""
    return (param.astype(ms.float32) if param.dtype == ms.bfloat16 else param).asnumpy()


def float_config(config):
    """A copy of the model config `config` without weight quantization (what a float checkpoint's layout fits)."""
    config = copy.copy(config)
    if getattr(config, 'quantization', None) is not None:
        config.quantization = config.quantization_config = None
    return config


class BaseModel(nn.Cell):
    """A model cell built from a config (`self.config`).

    Subclasses build their layers, then call `self.load_checkpoint(config)` at the end of `__init__` so that
    `config.pet_config` is applied (`mindformers.pet.apply_pet`) and `config.checkpoint_name_or_path` (a
    `.ckpt`/`.safetensors` file, a checkpoint directory, a HuggingFace model directory, or a model name with
    published weights, downloaded once into the cache) is loaded. With `config.quantization: int8` the model
    becomes weight-only int8 (`mindformers.quantization.quantize_model`) before the weights load, and float weights
    are quantized as they do.

    `pet_default_targets` ({pet_type: Linear names}) are the layers a PET algorithm targets when the config names
    none (PEFT's defaults for the family)."""

    pet_default_targets = {}
    pet_config = None
    pet_parameter_names = ()

    def __init__(self, config, **kwargs):
        super().__init__(**kwargs)
        self.config = config

    def load_checkpoint(self, config=None, transform=None):
        """Load `config.checkpoint_name_or_path` (default: `self.config`'s) if set; returns the file loaded or None.

        The checkpoint (a `.safetensors` file, a sharded set's `*.index.json`, a `.ckpt`, a directory holding one
        of them, or a HuggingFace model directory, converted per tensor by its family) is read one tensor at a time
        (see `mindformers.tools.weights`); `transform(name, array)` -> iterable of (name, array) runs on each tensor
        first (e.g. quantizing it). Strict: every model parameter must be
        present with the model's shape, and no parameter-like entry under the model's own top-level names may be
        left over (optimizer states such as `adam_m.*` are ignored). All problems are reported in one
        CheckpointError, found from the shapes before any tensor is read (with a `transform`: after loading)."""
        config = config or self.config
        if getattr(config, 'pet_config', None) is not None and self.pet_config is None:
            apply_pet(self, config.pet_config)
        given = getattr(config, 'checkpoint_name_or_path', '') or ''
        quantization = config_settings(config)
        # a LoRA is merged into float weights first (quantize_model does it), so its delta loads as float
        after_loading = quantization is not None and given and self.pet_config is not None
        if quantization is not None and not after_loading:  # without weights to load: the initial ones, quantized
            quantize_model(self, weights=not given, **quantization)
        if not given:
            return None
        path = resolve_path(os.fspath(given))
        if not os.path.exists(path):
            from mindformers.models.model_book import checkpoint_for
            path = checkpoint_for(os.fspath(given))
            if path is None:
                raise CheckpointError(f"checkpoint_name_or_path {given!r} is neither an existing file or directory "
                                      f"nor a model name with published weights; convert weights with "
                                      f"convert_weight.py and give the path")
        if not path.endswith(INDEX_SUFFIX) and not os.path.isdir(path):
            path = resolve_checkpoint(path)  # verifies the checksum meta.json records
        converter = hf_directory_converter(path)
        source = open_weights(path) if converter is None else load_hf_weights(path)
        if transform is None and quantization_of(self) is not None:  # float checkpoint entries -> int8 as they load
            transform = quantizing_transform(self, None if converter else set(source.names()))
        own = {p.name for p in self.get_parameters()}
        if converter is not None:  # converted per tensor; the converter checks the names and shapes first
            items = converter.iter_hf_to_ms(source, float_config(config))
        elif transform is None:
            self.check_checkpoint(source.shapes(), source.path)  # before any tensor is read
            items = source_items(source, [name for name in source.names() if name in own])  # not optimizer state
        else:
            roots = {name.split('.', 1)[0] for name in own}
            items = source_items(source, [name for name in source.names() if name.split('.', 1)[0] in roots])
        missing = load_weights(self, items, path if converter else source.path, transform=transform,
                               strict=transform is not None or converter is not None,
                               optional=self.pet_parameter_names)
        if missing:
            logger.info("loaded the base weights of %s from %s; its %d PET parameters keep their initial values",
                        type(self).__name__, source.path, len(missing))
        if after_loading:
            quantize_model(self, **quantization)
        return source.path

    def fit_weights(self, params):
        """A checkpoint's `params` (name -> Parameter/Tensor/array) as this model holds its weights: for an int8 model
        (`mindformers.quantization`) the float weights of its int8 layers quantized; otherwise `params` itself."""
        return params if quantization_of(self) is None else quantized_weights(self, params)

    def check_checkpoint(self, param_dict, path='<checkpoint>'):
        """Raise CheckpointError naming every missing, unexpected or mis-shaped parameter of `param_dict` (name ->
        tensor, or name -> shape tuple)."""
        own = {p.name: p for p in self.get_parameters()}
        delta = set(self.pet_parameter_names)
        if delta and not delta & set(param_dict):  # base weights: the PET delta keeps its initial values
            own = {name: p for name, p in own.items() if name not in delta}
        roots = {name.split('.', 1)[0] for name in own}
        missing = sorted(set(own) - set(param_dict))
        unexpected = sorted(n for n in param_dict if n not in own and n.split('.', 1)[0] in roots)
        problems = fit_problems(param_dict, own, missing, unexpected)
        if not problems:
            return
        held = set(param_dict) & set(own)
        if held and held <= delta:
            problems.append("it holds only a PET delta: checkpoint_name_or_path takes the base weights, and the "
                            "delta loads over them as load_checkpoint (--load_checkpoint)")
        elif len(missing) == len(own):
            problems.append(f"the checkpoint holds {listing(sorted(param_dict), 5)} — convert foreign weights "
                            f"with convert_weight.py first")
        raise CheckpointError(f"checkpoint {path} does not fit {type(self).__name__}: {'; '.join(problems)}")

    def save_pretrained(self, save_directory, checkpoint_format='safetensors', max_shard_size=None):
        """Write `config.json` and the weights to `save_directory`; `AutoModel.from_pretrained(save_directory)`
        loads them back. Weights: `model.ckpt`, or `model.safetensors`; with `max_shard_size` (bytes, or a string
        such as '2GB') a set larger than that is written as `model-00001-of-0000N.safetensors` shards plus
        `model.safetensors.index.json` (HuggingFace's layout), one tensor in memory at a time. Each file is
        written atomically; a directory holding other weights is refused."""
        from mindformers.tools.checkpoint import save_checkpoint_atomic
        from mindformers.tools.weights import parameter_specs, plan_shards, parse_size, save_sharded
        if checkpoint_format not in ('safetensors', 'ckpt'):
            raise ValueError(f"checkpoint_format must be 'safetensors' or 'ckpt', got {checkpoint_format!r}")
        if max_shard_size is not None and checkpoint_format != 'safetensors':
            raise ValueError("max_shard_size needs checkpoint_format='safetensors' (a .ckpt is one file)")
        params = list(self.get_parameters())
        specs = parameter_specs(params)
        count = len(plan_shards(specs, parse_size(max_shard_size))) if max_shard_size is not None else 1
        planned = {f'model.{checkpoint_format}'} if count == 1 else \
            {f'model-{i:05d}-of-{count:05d}.safetensors' for i in range(1, count + 1)} | {'model.safetensors' +
                                                                                         INDEX_SUFFIX}
        os.makedirs(save_directory, exist_ok=True)
        stale = [f for f in os.listdir(save_directory) if f.endswith(('.ckpt', '.safetensors', INDEX_SUFFIX))
                 and f not in planned]
        if stale:
            raise ValueError(f"{save_directory} already holds other weights ({', '.join(sorted(stale))}); save into "
                             f"an empty directory")
        if checkpoint_format == 'ckpt':
            save_checkpoint_atomic(self, os.path.join(save_directory, 'model.ckpt'))
        else:
            by_name = {p.name: p for p in params}
            save_sharded(save_directory, specs, lambda name: parameter_array(by_name[name]), max_shard_size)
        source = self.config.checkpoint_name_or_path
        self.config.checkpoint_name_or_path = ''  # the saved config must not point at the old weights
        try:
            self.config.save_pretrained(save_directory)
        finally:
            self.config.checkpoint_name_or_path = source
        return save_directory

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_dir, **kwargs):
        """This class built with weights from what `AutoModel.from_pretrained` accepts (a registered name, a run
        YAML, a save_pretrained or HuggingFace directory); `kwargs` override config fields. On BaseModel itself
        the class comes from the source, as with AutoModel."""
        from mindformers.models.auto.auto_class import load_model
        return load_model(pretrained_model_name_or_dir, None if cls in (BaseModel, CausalLMModel) else cls,
                          **kwargs)

    def generate(self, input_ids, generation_config=None, streamer=None, seed=None, **kwargs):
        """Continue each prompt of `input_ids`: see `mindformers.generation.generate` (greedy, sampling, beam
        search; the KV cache with `use_past=True`)."""
        from mindformers.generation.text_generator import generate  # generation/ builds on models/
        return generate(self, input_ids, generation_config, streamer, seed, **kwargs)

    def merge_pet(self):
        """Fold a LoRA delta into the weights (fp32, cast back) and become the plain model; see
        `mindformers.pet.merge_pet`."""
        return merge_pet(self)

    def save_peft_adapter(self, save_directory, base_model_name_or_path=None):
        """Write the LoRA as a HuggingFace PEFT adapter directory; see `mindformers.models.peft_adapter`."""
        return peft_adapter.save_peft_adapter(self, save_directory, base_model_name_or_path)

    def load_peft_adapter(self, adapter_directory):
        """Load a HuggingFace PEFT LoRA adapter (adding LoRA if the model has no PET); see
        `mindformers.models.peft_adapter`."""
        return peft_adapter.load_peft_adapter(self, adapter_directory)

    def num_parameters(self, trainable_only=False):
        """Number of scalar parameters (each shared parameter counted once)."""
        params = self.trainable_params() if trainable_only else self.get_parameters()
        return int(sum(np.prod(p.shape) for p in params))


class CausalLMModel(BaseModel):
    """A decoder-only LM head model. A family implements ONE forward, `logits(input_ids, attention_mask=None,
    cache=None, step=None)`, that serves training, evaluation, prefill and decode:
    - without `cache`: input_ids [B, S] (and optionally a padding mask [B, S]) -> fp32 logits [B * S, vocab];
    - with `cache` (a decoding session's `CacheView`, see `mindformers.generation.session`) and `step` =
      (positions [B, T] int32, additive mask, write): the tokens continue the session's sequences and the result
      is fp32 logits [B, vocab] of each row's last position.
    `kv_cache_layout()` says what a session must allocate for it.

    Training (`set_train(True)`): `construct(input_ids [B, S+1], attention_mask=None, labels=None)` returns the
    mean next-token cross-entropy (fp32 scalar) of tokens = input_ids[:, :-1] against targets = input_ids[:, 1:].
    `labels` and `attention_mask` may have S+1 columns (shifted like the targets) or S (already aligned). Targets
    equal to `config.ignore_token_id`, with attention_mask 0, or equal to `config.pad_token_id` (only when it differs
    from `eos_token_id`: GPT-style models pad with EOS) are left out.
    Inference (`set_train(False)`): `construct(input_ids [B, S], attention_mask=None)` returns logits
    [B, S, vocab_size] fp32; there `attention_mask` marks padding (0) to hide as keys and to skip when counting
    positions (left-padded generation batches), as in HuggingFace.

    `pet_loss` (None, or a PET training loss set by `apply_pet`: R-Drop) replaces the cross-entropy in training:
    `loss_batch` gives it every row twice and `token_loss` computes it (evaluation keeps the cross-entropy).
    `pet_default_targets['adapter']`: the attention and MLP output projections the adapters follow."""

    pet_default_targets = {'lora': ('q_proj', 'v_proj'), 'adapter': ('o_proj', 'down_proj')}

    def __init__(self, config, **kwargs):
        super().__init__(config, **kwargs)
        from mindformers.core.loss import CrossEntropyLoss
        self.vocab_size = int(config.vocab_size)
        self.ignore_token_id = int(getattr(config, 'ignore_token_id', -100))
        pad, eos = getattr(config, 'pad_token_id', None), getattr(config, 'eos_token_id', None)
        self.pad_token_id = None if pad is None or pad == eos else int(pad)
        self.loss = CrossEntropyLoss(getattr(config, 'parallel_config', None))
        self.pet_loss = None

    def logits(self, input_ids, attention_mask=None, cache=None, step=None):
        raise NotImplementedError(f"{type(self).__name__} must implement logits(input_ids, attention_mask=None, "
                                  f"cache=None, step=None)")

    def kv_cache_layout(self):
        """What a decoding session allocates for this model: {'num_layers', 'kv_heads', 'head_dim'} of the cached
        attention layers and, optionally, 'state': names of per-slot int32 values the forward keeps between steps.
        The default reads the config's num_layers, num_heads and hidden_size."""
        config = self.config
        return {'num_layers': int(config.num_layers), 'kv_heads': int(config.num_heads),
                'head_dim': int(config.hidden_size) // int(config.num_heads)}

    @staticmethod
    def logit_rows(hidden, cache):
        """The final hidden states [B, S, H] the logits are for: every position ([B * S, H]), or each row's last
        ([B, H]) when decoding with a cache."""
        if cache is not None and hidden.shape[1] > 1:
            return hidden[:, -1, :]
        return hidden.reshape(-1, hidden.shape[-1])  # a decode step's [B, 1, H] too: a view, where a slice copies

    def loss_targets(self, input_ids, attention_mask=None, labels=None):
        """(targets [B * S], weights [B * S] fp32: 1 where the target counts, else 0) for `input_ids [B, S+1]`."""
        targets = input_ids[:, 1:] if labels is None else self._align(labels, input_ids, 'labels')
        targets = targets.reshape(-1)
        mask = ops.cast(targets != self.ignore_token_id, ms.float32)
        if self.pad_token_id is not None:
            mask = ops.mul(mask, ops.cast(targets != self.pad_token_id, ms.float32))
        if attention_mask is not None:
            aligned = self._align(attention_mask, input_ids, 'attention_mask')
            mask = ops.mul(mask, ops.cast(aligned, ms.float32).reshape(-1))
        return targets, mask

    def next_token_loss(self, input_ids, attention_mask=None, labels=None):
        """(mean loss fp32 scalar, number of target tokens that count fp32 scalar) for `input_ids [B, S+1]`."""
        input_ids, attention_mask, labels = self.loss_batch(input_ids, attention_mask, labels)
        targets, mask = self.loss_targets(input_ids, attention_mask, labels)
        return self.token_loss(self.logits(input_ids[:, :-1]), targets, mask, input_ids.shape[0])

    def loss_batch(self, *columns):
        """The batch's columns (each [B, ...], or None) as the training loss reads them: with a `pet_loss` in
        training (R-Drop) every row twice, rows 2i and 2i+1 the same; otherwise as given."""
        if self.pet_loss is None or not self.training:
            return columns
        return self.pet_loss.repeat(*columns)

    def token_loss(self, logits, targets, mask, rows):
        """(mean loss fp32 scalar, number of target tokens that count fp32 scalar) of logits [rows * S, V] against
        `targets` / `mask` [rows * S] (`loss_targets`): the masked cross-entropy, or in training the `pet_loss` over
        the twin rows of `loss_batch` (each pair of twins' tokens counted once)."""
        if self.pet_loss is None or not self.training:
            return self.loss(logits, targets, mask), mask.sum()
        return self.pet_loss(logits.reshape(rows, -1, logits.shape[-1]), targets, mask), mask.sum() / 2

    def construct(self, input_ids, attention_mask=None, labels=None):
        if not self.training:
            batch, seq = input_ids.shape
            return self.logits(input_ids, attention_mask).reshape(batch, seq, self.vocab_size)
        loss, _ = self.next_token_loss(input_ids, attention_mask, labels)
        return loss

    @staticmethod
    def _align(column, input_ids, name):
        """A per-token column of S+1 entries (like input_ids) is shifted to the targets; S entries are used as is."""
        if column.shape[1] == input_ids.shape[1]:
            return column[:, 1:]
        if column.shape[1] != input_ids.shape[1] - 1:
            raise ValueError(f"{name} must have {input_ids.shape[1]} or {input_ids.shape[1] - 1} columns like "
                             f"input_ids, got {column.shape[1]}")
        return column
