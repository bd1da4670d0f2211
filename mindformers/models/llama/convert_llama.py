"""LLaMA / LLaMA-2 weights: HuggingFace `LlamaForCausalLM` or Meta `consolidated.NN.pth` <-> our `LlamaForCausalLM`.

HF names are ours (no transposes, no permutation: our RoPE uses HF's rotate-half layout). Meta checkpoints (a
directory holding `params.json` and one or several model-parallel shards `consolidated.NN.pth`) are merged
(dim 0 for wq/wk/wv/w1/w3/output, dim 1 for wo/w2/tok_embeddings, norms taken from shard 0, `rope.freqs` skipped),
renamed, and the rows of wq / wk permuted within each head from Meta's interleaved RoPE pairs to rotate-half
(wk with the key/value head count, so grouped-query checkpoints convert too). `--reversed` writes a HF directory.
The machinery is `convert_utils.FamilyConverter`.

    python convert_weight.py --model llama --input_path <HF dir | Meta dir> --output_path llama.ckpt
    python convert_weight.py --model llama --reversed --input_path llama.ckpt --output_path <HF dir> --config <cfg>
"""
import os
import re

import numpy as np

from mindformers.models.convert_utils import (ConversionError, FamilyConverter, NameTable, Rule, TensorView,
                                              WeightSource, hf_rope_parameters, load_hf_weights, read_json)
from mindformers.models.llama.llama_config import LlamaConfig

__all__ = ['ConversionError', 'config_from_hf', 'config_from_meta', 'config_to_hf', 'convert_hf_to_ms',
           'convert_ms_to_hf', 'convert_ms_to_pt', 'convert_pt_to_ms', 'load_config', 'read_meta']

LAYER = 'model.layers.{i}.'
TOP_NAMES = ['model.embed_tokens.weight', 'model.norm.weight', 'lm_head.weight']
LAYER_NAMES = [LAYER + name for name in (
    'input_layernorm.weight', 'self_attn.q_proj.weight', 'self_attn.k_proj.weight', 'self_attn.v_proj.weight',
    'self_attn.o_proj.weight', 'post_attention_layernorm.weight', 'mlp.gate_proj.weight', 'mlp.up_proj.weight',
    'mlp.down_proj.weight')]
HF_SKIP = r'\.rotary_emb\.inv_freq$'  # a buffer older HF files carry
HF_TABLE = NameTable([(name, name) for name in TOP_NAMES + LAYER_NAMES], skip=HF_SKIP)


def _interleaved_to_half(value, heads, config):
    """Rows of a Meta q/k projection, per head (2i, 2i + 1) RoPE pairs -> HF's rotate-half order (i, i + d/2);
    unchanged when our model itself rotates interleaved pairs."""
    if config.decoder_spec().rotary_interleaved:
        return value
    rows, cols = value.shape
    return value.reshape(heads, rows // heads // 2, 2, cols).transpose(0, 2, 1, 3).reshape(rows, cols)


META_TABLE = NameTable([
    ('tok_embeddings.weight', 'model.embed_tokens.weight'),
    ('norm.weight', 'model.norm.weight'),
    ('output.weight', 'lm_head.weight'),
    ('layers.{i}.attention_norm.weight', LAYER + 'input_layernorm.weight'),
    Rule('layers.{i}.attention.wq.weight', LAYER + 'self_attn.q_proj.weight',
         to_ours=lambda value, config: _interleaved_to_half(value, config.decoder_spec().num_heads, config)),
    Rule('layers.{i}.attention.wk.weight', LAYER + 'self_attn.k_proj.weight',
         to_ours=lambda value, config: _interleaved_to_half(value, config.decoder_spec().kv_heads, config)),
    ('layers.{i}.attention.wv.weight', LAYER + 'self_attn.v_proj.weight'),
    ('layers.{i}.attention.wo.weight', LAYER + 'self_attn.o_proj.weight'),
    ('layers.{i}.ffn_norm.weight', LAYER + 'post_attention_layernorm.weight'),
    ('layers.{i}.feed_forward.w1.weight', LAYER + 'mlp.gate_proj.weight'),
    ('layers.{i}.feed_forward.w3.weight', LAYER + 'mlp.up_proj.weight'),
    ('layers.{i}.feed_forward.w2.weight', LAYER + 'mlp.down_proj.weight'),
], skip=r'^rope\.freqs$')

# ---------------------------------------------------------------------------------------------------------------
# Meta checkpoints

_SHARD = re.compile(r'^consolidated\.(\d+)\.pth$')
_ALONG_DIM_1 = re.compile(r'^(tok_embeddings|layers\.\d+\.(attention\.wo|feed_forward\.w2))\.weight$')


def meta_shards(path):
    """The model-parallel shard files of a Meta checkpoint, in order, or None: `path` is a directory holding
    `params.json` and `consolidated.NN.pth`, or one of those shard files (then all shards beside it are read)."""
    if not os.path.isdir(path) and not _SHARD.match(os.path.basename(path)):
        return None
    directory = path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
    if not os.path.isfile(os.path.join(directory, 'params.json')):
        return None
    shards = sorted((f for f in os.listdir(directory) if _SHARD.match(f)), key=lambda f: int(_SHARD.match(f)[1]))
    return [os.path.join(directory, f) for f in shards] or None


class MetaShards(WeightSource):
    """The tensors of Meta model-parallel shards as one state dict (Meta names), each merged when read: dim 1 for
    tok_embeddings / wo / w2, dim 0 for the other matrices, norms (replicated) from the first shard."""

    def __init__(self, shard_files):
        self.files, self.path = shard_files, os.path.dirname(os.path.abspath(shard_files[0]))
        self.shards = [load_hf_weights(path) for path in shard_files]
        self.order = list(dict.fromkeys(n for shard in self.shards for n in shard))
        for name in self.order:
            absent = [os.path.basename(path) for path, shard in zip(shard_files, self.shards) if name not in shard]
            if absent:
                raise ConversionError(f"Meta tensor {name} is missing from shard {', '.join(absent)} (other shards "
                                      f"hold it)")

    def _axis(self, name):
        """The axis the shards split `name` along, or None when it is replicated."""
        if len(self.shards) == 1 or len(self.shards[0].shape(name)) < 2:
            return None
        return 1 if _ALONG_DIM_1.match(name) else 0

    def names(self):
        return list(self.order)

    def shape(self, name):
        axis, shape = self._axis(name), list(self.shards[0].shape(name))
        if axis is not None:
            shape[axis] = sum(shard.shape(name)[axis] for shard in self.shards)
        return tuple(shape)

    def dtype(self, name):
        return self.shards[0].dtype(name)

    def read(self, name):
        axis = self._axis(name)
        if axis is None:
            return self.shards[0][name]
        return np.concatenate([shard[name] for shard in self.shards], axis=axis)


def read_meta(shard_files):
    """The tensors of Meta model-parallel shards merged into one state dict (Meta names), read per tensor."""
    return MetaShards(shard_files)


def config_from_meta(params, weights):
    """A LlamaConfig from Meta's `params.json` mapping; vocab_size -1 and the SwiGLU width come from `weights`."""
    missing = [key for key in ('dim', 'n_layers', 'n_heads') if key not in params]
    if missing:
        raise ConversionError(f"params.json lacks {', '.join(missing)}")
    if params.get('use_scaled_rope'):
        raise ConversionError("params.json sets use_scaled_rope (Llama 3.1 RoPE scaling), which cannot be "
                              "reproduced here")
    vocab = params.get('vocab_size', -1)
    if not vocab or vocab < 0:
        if 'tok_embeddings.weight' not in weights:
            raise ConversionError("params.json has vocab_size -1 and there is no tok_embeddings.weight to size it")
        vocab = weights['tok_embeddings.weight'].shape[0]
    w1 = weights.get('layers.0.feed_forward.w1.weight')
    heads = params['n_heads']
    kv_heads = params.get('n_kv_heads') or heads
    return LlamaConfig(hidden_size=params['dim'], num_layers=params['n_layers'], num_heads=heads,
                       n_kv_heads=None if kv_heads == heads else kv_heads, vocab_size=vocab,
                       multiple_of=params.get('multiple_of', 256),
                       ffn_dim_multiplier=params.get('ffn_dim_multiplier'),
                       intermediate_size=None if w1 is None else int(w1.shape[0]),
                       rms_norm_eps=params.get('norm_eps', 1e-5), theta=float(params.get('rope_theta', 10000.0)),
                       seq_length=params.get('max_seq_len', 2048))


# ---------------------------------------------------------------------------------------------------------------
# configs shared with the families built on our LLaMA decoder (ChatGLM2)


def decoder_sizes_from_hf(hf_config, defaults, allow_tied=False):
    """The decoder sizes of a HF config.json mapping (LLaMA-style field names), HF's class defaults filling the
    absent ones: vocab, hidden, ffn, layers, heads, kv_heads, head_dim, seq_length, eps, tied, tokens (bos/eos/pad
    ids given), rope (see `hf_rope_parameters`). Refuses activations other than SiLU and, unless `allow_tied`,
    tied embeddings."""
    get = lambda key: hf_config.get(key, defaults.get(key))
    if get('hidden_act') not in (None, 'silu'):
        raise ConversionError(f"HF hidden_act {get('hidden_act')!r} is not supported (the SwiGLU here uses silu)")
    tied = bool(get('tie_word_embeddings'))
    if tied and not allow_tied:
        raise ConversionError("HF config ties the output head to the token embedding (tie_word_embeddings), which "
                              "this model does not do")
    hidden, heads = get('hidden_size'), get('num_attention_heads')
    return {'vocab': get('vocab_size'), 'hidden': hidden, 'ffn': get('intermediate_size'),
            'layers': get('num_hidden_layers'), 'heads': heads, 'kv_heads': get('num_key_value_heads') or heads,
            'head_dim': get('head_dim') or hidden // heads, 'seq_length': get('max_position_embeddings'),
            'eps': get('rms_norm_eps'), 'tied': tied, 'rope': hf_rope_parameters(hf_config),
            'tokens': {key: hf_config[key] for key in ('bos_token_id', 'eos_token_id', 'pad_token_id')
                       if hf_config.get(key) is not None}}


def decoder_config_to_hf(config, dtype):
    """The HF config.json fields every LLaMA-style decoder shares, from our config's DecoderSpec."""
    spec = config.decoder_spec()
    return {'vocab_size': spec.vocab_size, 'hidden_size': spec.hidden_size,
            'intermediate_size': spec.ffn_size, 'num_hidden_layers': spec.num_layers,
            'num_attention_heads': spec.num_heads, 'num_key_value_heads': spec.kv_heads,
            'head_dim': spec.head_size, 'hidden_act': 'silu', 'max_position_embeddings': config.seq_length,
            'rms_norm_eps': spec.norm_eps, 'initializer_range': config.initializer_range,
            'tie_word_embeddings': False, 'bos_token_id': config.bos_token_id, 'eos_token_id': config.eos_token_id,
            'pad_token_id': config.pad_token_id, 'use_cache': True, 'dtype': dtype}


# transformers' LlamaConfig defaults, for fields a config.json leaves out
_HF_DEFAULTS = {'vocab_size': 32000, 'hidden_size': 4096, 'intermediate_size': 11008, 'num_hidden_layers': 32,
                'num_attention_heads': 32, 'max_position_embeddings': 2048, 'rms_norm_eps': 1e-6}
_ROPE_TYPES = {'default': 'None', 'linear': 'PI'}


class LlamaConverter(FamilyConverter):
    """HF `LlamaForCausalLM` (or Meta consolidated shards) <-> our `LlamaForCausalLM`."""

    family = 'LLaMA'
    config_class = LlamaConfig
    model_class = 'mindformers.models.llama.modeling_llama:LlamaForCausalLM'
    hf_model_types = ('llama',)
    input_tables = (HF_TABLE, META_TABLE)
    output_table = HF_TABLE
    peft_tables = (HF_TABLE,)

    def read_input(self, input_path):
        shards = meta_shards(input_path)
        return read_meta(shards) if shards else load_hf_weights(input_path)

    def config_beside(self, input_path, weights=None):
        shards = meta_shards(input_path)
        if not shards:
            return super().config_beside(input_path, weights)
        params = os.path.join(os.path.dirname(shards[0]), 'params.json')
        try:
            return config_from_meta(read_json(params), weights or {})
        except (TypeError, ValueError) as err:
            if isinstance(err, ConversionError):
                raise
            raise ConversionError(f"{params}: {err}") from None

    def prepare_hf(self, state_dict, config):
        """A HF config with tied embeddings (kept on our config as `tie_word_embeddings`) stores no lm_head."""
        if (getattr(config, 'tie_word_embeddings', False) and 'lm_head.weight' not in state_dict
                and 'model.embed_tokens.weight' in state_dict):
            state_dict = TensorView(state_dict, {**{name: name for name in state_dict},
                                                 'lm_head.weight': 'model.embed_tokens.weight'})
        return state_dict

    def config_from_hf(self, hf_config):
        """A LlamaConfig from a HF `LlamaForCausalLM` config.json mapping."""
        for key in ('attention_bias', 'mlp_bias'):
            if hf_config.get(key):
                raise ConversionError(f"HF config sets {key}=True; LLaMA here has no attention output or MLP biases")
        sizes = decoder_sizes_from_hf(hf_config, _HF_DEFAULTS, allow_tied=True)
        rope = sizes['rope']
        if rope['rope_type'] not in _ROPE_TYPES:
            raise ConversionError(f"HF rope_type {rope['rope_type']!r} cannot be reproduced here (supported: "
                                  f"{', '.join(_ROPE_TYPES)})")
        if rope.get('partial_rotary_factor', 1.0) != 1.0:
            raise ConversionError(f"HF partial_rotary_factor {rope['partial_rotary_factor']} is not supported for "
                                  f"LLaMA (RoPE covers the whole head)")
        hidden, heads, kv_heads, head_dim = sizes['hidden'], sizes['heads'], sizes['kv_heads'], sizes['head_dim']
        extra = {'tie_word_embeddings': True} if sizes['tied'] else {}
        return LlamaConfig(vocab_size=sizes['vocab'], hidden_size=hidden, intermediate_size=sizes['ffn'],
                           num_layers=sizes['layers'], num_heads=heads,
                           n_kv_heads=None if kv_heads == heads else kv_heads,
                           head_dim=None if head_dim * heads == hidden else head_dim,
                           seq_length=sizes['seq_length'], rms_norm_eps=sizes['eps'],
                           theta=float(rope['rope_theta']), extend_method=_ROPE_TYPES[rope['rope_type']],
                           scaling_factor=float(rope.get('factor', 1.0)) if rope['rope_type'] == 'linear' else 1.0,
                           **sizes['tokens'], **extra)

    def config_to_hf(self, config, dtype='float32'):
        """The HF `config.json` mapping (`LlamaForCausalLM`) of our LlamaConfig. Static NTK scaling becomes the
        raised RoPE base it amounts to; position interpolation becomes HF's 'linear' RoPE scaling."""
        spec = config.decoder_spec()
        if spec.attention_bias:
            raise ConversionError("qkv_has_bias=True has no HF LlamaForCausalLM equivalent (attention_bias also "
                                  "adds an output bias)")
        if spec.rotary_size != spec.head_size or spec.rotary_interleaved:
            raise ConversionError("HF LlamaForCausalLM rotates whole heads in rotate-half pairs; rotary_dim and "
                                  "rotary_interleaved must keep their defaults")
        rope = {'rope_type': 'default', 'rope_theta': float(spec.rope_theta)}
        if spec.extend_method == 'PI':
            rope.update(rope_type='linear', factor=float(spec.scaling_factor))
        elif spec.extend_method == 'NTK':
            dim = spec.rotary_size
            rope['rope_theta'] = float(spec.rope_theta * spec.scaling_factor ** (dim / (dim - 2)))
        return {'architectures': ['LlamaForCausalLM'], 'model_type': 'llama', **decoder_config_to_hf(config, dtype),
                'rope_parameters': rope, 'attention_bias': False, 'mlp_bias': False}


CONVERTER = LlamaConverter()
(convert_hf_to_ms, convert_ms_to_hf, convert_pt_to_ms, convert_ms_to_pt, load_config, config_from_hf,
 config_to_hf) = CONVERTER.entry_points()
