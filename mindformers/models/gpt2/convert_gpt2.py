"""GPT-2 weights: HuggingFace `GPT2LMHeadModel` <-> mindformers `GPT2LMHeadModel`.

HF stores its projections as `Conv1D` weights [in, out] (y = x W + b); ours are `Linear` weights [out, in], so every
projection is transposed. The fused `c_attn` (q | k | v) maps onto our fused `qkv_proj` unchanged apart from that.
HF's `lm_head.weight` is tied to `wte` and dropped (an untied one is refused); the causal-mask buffers
`attn.bias` / `attn.masked_bias` of older files are skipped. HF names are accepted with or without the
`transformer.` prefix and written with it.

    python convert_weight.py --model gpt2 --input_path <HF dir or file> --output_path gpt2.ckpt
    python convert_weight.py --model gpt2 --reversed --input_path gpt2.ckpt --output_path <HF dir | file.safetensors>
"""
import copy
import json
import os
import re

import numpy as np

from mindformers.models.convert_utils import (ConversionError, DTYPES, check_dtype, refuse_non_empty, load_hf_weights,
                                              load_ms_weights, save_hf_directory, save_hf_weights, save_ms_weights)
from mindformers.models.gpt2.gpt2_config import GPT2Config

HF_PREFIX = 'transformer.'
# (HF name, our name, transposed); '{i}' is the layer index
_TOP = [('wte.weight', 'backbone.embed_tokens.weight', False),
        ('wpe.weight', 'backbone.embed_positions.weight', False),
        ('ln_f.weight', 'backbone.final_layernorm.weight', False),
        ('ln_f.bias', 'backbone.final_layernorm.bias', False)]
_LAYER = [('ln_1.weight', 'input_layernorm.weight', False),
          ('ln_1.bias', 'input_layernorm.bias', False),
          ('attn.c_attn.weight', 'attention.qkv_proj.weight', True),
          ('attn.c_attn.bias', 'attention.qkv_proj.bias', False),
          ('attn.c_proj.weight', 'attention.o_proj.weight', True),
          ('attn.c_proj.bias', 'attention.o_proj.bias', False),
          ('ln_2.weight', 'post_attention_layernorm.weight', False),
          ('ln_2.bias', 'post_attention_layernorm.bias', False),
          ('mlp.c_fc.weight', 'mlp.fc_in.weight', True),
          ('mlp.c_fc.bias', 'mlp.fc_in.bias', False),
          ('mlp.c_proj.weight', 'mlp.fc_out.weight', True),
          ('mlp.c_proj.bias', 'mlp.fc_out.bias', False)]
_HF_TO_MS = {hf: (ms, t) for hf, ms, t in _TOP}
_HF_TO_MS.update({f'h.{{i}}.{hf}': (f'backbone.layers.{{i}}.{ms}', t) for hf, ms, t in _LAYER})
_MS_TO_HF = {ms: (hf, t) for hf, (ms, t) in _HF_TO_MS.items()}
_LAYER_INDEX = re.compile(r'\.(\d+)\.')
_SKIPPED = re.compile(r'^(lm_head\.weight|h\.\d+\.attn\.(bias|masked_bias))$')


def _rename(name, table):
    """Map `name` through `table` (keys with '{i}' match any layer index); returns (new name, transposed) or None."""
    match = _LAYER_INDEX.search(name)
    key = name if match is None else name[:match.start()] + '.{i}.' + name[match.end():]
    if key not in table:
        return None
    target, transposed = table[key]
    return (target if match is None else target.format(i=match.group(1))), transposed


def _model_shapes(config):
    """Our parameter names and shapes for `config`, read off a model built without initialising its weights."""
    from mindspore.nn.utils import no_init_parameters
    from mindformers.models.gpt2.modeling_gpt2 import GPT2LMHeadModel
    config = copy.copy(config)
    config.checkpoint_name_or_path = ''
    with no_init_parameters():
        model = GPT2LMHeadModel(config)
    return {p.name: tuple(p.shape) for p in model.get_parameters()}


def _check(converted, config, input_name, transposed):
    """Compare `converted` (our names -> arrays) with the model of `config`; one ConversionError names every
    missing, unexpected and mis-shaped tensor as the input calls it (`input_name(our_name)`), with shapes in the
    input's layout (`transposed(our_name)` says whether it differs from ours by a transpose)."""
    expected = _model_shapes(config)
    layout = lambda name, shape: tuple(shape[::-1]) if transposed(name) else tuple(shape)
    missing = [input_name(n) for n in expected if n not in converted]
    unexpected = [input_name(n) for n in converted if n not in expected]
    mismatched = [f"{input_name(n)} {layout(n, v.shape)} (expected {layout(n, expected[n])})"
                  for n, v in converted.items() if n in expected and tuple(v.shape) != expected[n]]
    return missing, unexpected, mismatched


def _raise_if(config, missing, unexpected, mismatched):
    problems = [f"{label} {', '.join(items[:12])}{' ...' if len(items) > 12 else ''}"
                for label, items in (('missing', sorted(missing)), ('unexpected', sorted(unexpected)),
                                     ('wrong shape', mismatched)) if items]
    if problems:
        raise ConversionError(f"GPT-2 weights do not fit the model (vocab_size {config.vocab_size}, hidden_size "
                              f"{config.hidden_size}, num_layers {config.num_layers}, seq_length "
                              f"{config.seq_length}): {'; '.join(problems)}")


def _transpose(value):
    return np.ascontiguousarray(np.asarray(value).T)


def convert_hf_to_ms(state_dict, config):
    """HF GPT-2 tensors (name -> array, `transformer.` prefix optional) -> our parameters (name -> array)."""
    converted, sources, unknown = {}, {}, []
    for name, value in state_dict.items():
        key = name[len(HF_PREFIX):] if name.startswith(HF_PREFIX) else name
        if _SKIPPED.match(key):
            continue
        renamed = _rename(key, _HF_TO_MS)
        if renamed is None:
            unknown.append(name)
            continue
        ours, transposed = renamed
        converted[ours] = _transpose(value) if transposed else np.asarray(value)
        sources[ours] = name
    _check_tied_head(state_dict)

    def input_name(ours):
        return sources.get(ours) or HF_PREFIX + _rename(ours, _MS_TO_HF)[0]

    missing, unexpected, mismatched = _check(converted, config, input_name, lambda n: _rename(n, _MS_TO_HF)[1])
    _raise_if(config, missing, unexpected + unknown, mismatched)
    return converted


def _check_tied_head(state_dict):
    """GPT-2's output head is the token embedding; a checkpoint whose `lm_head.weight` differs cannot be mapped."""
    head = state_dict.get('lm_head.weight')
    embedding = next((state_dict[n] for n in ('wte.weight', HF_PREFIX + 'wte.weight') if n in state_dict), None)
    if head is None or embedding is None:
        return
    head, embedding = np.asarray(head), np.asarray(embedding)
    if head.shape != embedding.shape or not np.array_equal(head, embedding):
        raise ConversionError("lm_head.weight differs from transformer.wte.weight: GPT-2 here ties its output head "
                              "to the token embedding, an untied head cannot be converted")


def convert_ms_to_hf(state_dict, config):
    """Our GPT-2 parameters (name -> array) -> HF `GPT2LMHeadModel` tensors (with the `transformer.` prefix;
    `lm_head.weight` is left out because HF ties it to `wte`). Non-parameter entries such as optimizer states
    (`adam_m.*`, `global_step`) are ignored."""
    ours = {name: np.asarray(value) for name, value in state_dict.items() if _rename(name, _MS_TO_HF)}
    unknown = [name for name in state_dict if name not in ours and name.startswith('backbone.')]
    missing, unexpected, mismatched = _check(ours, config, lambda n: n, lambda n: False)
    _raise_if(config, missing, unexpected + unknown, mismatched)
    out = {}
    for name, value in ours.items():
        hf_name, transposed = _rename(name, _MS_TO_HF)
        out[HF_PREFIX + hf_name] = _transpose(value) if transposed else value
    return out


# ---------------------------------------------------------------------------------------------------------------
# configs and entry points


_HF_ACTIVATIONS = {'gelu_new': 'gelu', 'gelu_pytorch_tanh': 'gelu', 'gelu_fast': 'gelu', 'quick_gelu': 'quick_gelu',
                   'relu': 'relu'}
_TO_HF_ACTIVATIONS = {'gelu': 'gelu_new', 'gelu_new': 'gelu_new', 'fast_gelu': 'quick_gelu',
                      'quick_gelu': 'quick_gelu', 'relu': 'relu'}


def config_from_hf(hf_config):
    """A GPT2Config from a HF GPT-2 `config.json` mapping."""
    act = hf_config.get('activation_function', 'gelu_new')
    if act not in _HF_ACTIVATIONS:
        raise ConversionError(f"HF activation_function {act!r} has no equivalent here "
                              f"(supported: {', '.join(_HF_ACTIVATIONS)})")
    if hf_config.get('scale_attn_by_inverse_layer_idx') or not hf_config.get('scale_attn_weights', True):
        raise ConversionError("HF config with scale_attn_by_inverse_layer_idx=True or scale_attn_weights=False "
                              "is not supported")
    hidden = hf_config.get('n_embd', 768)
    inner = hf_config.get('n_inner') or 4 * hidden
    if inner % hidden:
        raise ConversionError(f"HF n_inner ({inner}) is not a multiple of n_embd ({hidden}); GPT2Config only has "
                              f"an integer expand_ratio")
    eos = hf_config.get('eos_token_id', 50256)
    pad = hf_config.get('pad_token_id')
    return GPT2Config(vocab_size=hf_config.get('vocab_size', 50257), hidden_size=hidden,
                      num_layers=hf_config.get('n_layer', 12), num_heads=hf_config.get('n_head', 12),
                      seq_length=hf_config.get('n_positions', 1024),
                      expand_ratio=inner // hidden,
                      layernorm_epsilon=hf_config.get('layer_norm_epsilon', 1e-5), hidden_act=_HF_ACTIVATIONS[act],
                      embedding_dropout_prob=hf_config.get('embd_pdrop', 0.1),
                      hidden_dropout_rate=hf_config.get('resid_pdrop', 0.1),
                      attention_dropout_rate=hf_config.get('attn_pdrop', 0.1),
                      initializer_range=hf_config.get('initializer_range', 0.02),
                      bos_token_id=hf_config.get('bos_token_id', 50256), eos_token_id=eos,
                      pad_token_id=eos if pad is None else pad)  # GPT-2 pads with EOS


def config_to_hf(config, dtype='float32'):
    """The HF `config.json` mapping (`GPT2LMHeadModel`) of our GPT2Config; `dtype` names the stored tensors."""
    if config.hidden_act not in _TO_HF_ACTIVATIONS:
        raise ConversionError(f"hidden_act {config.hidden_act!r} has no HF GPT-2 equivalent")
    return {'architectures': ['GPT2LMHeadModel'], 'model_type': 'gpt2', 'vocab_size': config.vocab_size,
            'n_positions': config.seq_length, 'n_embd': config.hidden_size, 'n_layer': config.num_layers,
            'n_head': config.num_heads, 'n_inner': config.expand_ratio * config.hidden_size,
            'activation_function': _TO_HF_ACTIVATIONS[config.hidden_act],
            'resid_pdrop': config.hidden_dropout_rate, 'embd_pdrop': config.embedding_dropout_prob,
            'attn_pdrop': config.attention_dropout_rate, 'layer_norm_epsilon': config.layernorm_epsilon,
            'initializer_range': config.initializer_range, 'bos_token_id': config.bos_token_id,
            'eos_token_id': config.eos_token_id, 'pad_token_id': config.pad_token_id, 'tie_word_embeddings': True,
            'torch_dtype': dtype}


def infer_config(weights, ms_names=False):
    """A GPT2Config sized from the tensors themselves (HF names, or ours with `ms_names`); heads do not change
    any weight shape, so num_heads is taken as hidden_size / 64 where that divides."""
    def find(hf_name):
        name = _rename(hf_name, _HF_TO_MS)[0] if ms_names else hf_name
        for candidate in (name, HF_PREFIX + name):
            if candidate in weights:
                return np.asarray(weights[candidate]).shape
        raise ConversionError(f"cannot size the model: no tensor {name!r} in the input")
    vocab, hidden = find('wte.weight')
    positions = find('wpe.weight')[0]
    pattern = re.compile(r'(?:^|\.)(?:h|layers)\.(\d+)\.')
    indices = [int(m.group(1)) for m in map(pattern.search, weights) if m]
    num_layers = max(indices) + 1 if indices else 0
    if not num_layers:
        raise ConversionError("cannot size the model: the input holds no transformer layers")
    try:
        fc_in = find('h.0.mlp.c_fc.weight')
        expand_ratio = max((fc_in[0] if ms_names else fc_in[-1]) // hidden, 1)
    except ConversionError:
        expand_ratio = 4  # the missing tensor is reported by the conversion itself
    return GPT2Config(vocab_size=vocab, hidden_size=hidden, num_layers=num_layers,
                      num_heads=hidden // 64 if hidden % 64 == 0 else 1, seq_length=positions,
                      expand_ratio=expand_ratio)


def _config_from_json(path):
    """A GPT2Config from a HF GPT-2 `config.json` or from ours (`GPT2Config.save_pretrained`)."""
    with open(path, encoding='utf-8') as f:
        try:
            data = json.load(f)
        except json.JSONDecodeError as err:
            raise ConversionError(f"{path} is not valid JSON ({err})") from None
    if not isinstance(data, dict):
        raise ConversionError(f"{path} does not hold a JSON object")
    if 'num_layers' in data or data.get('type') == 'GPT2Config':
        return GPT2Config.from_dict({k: v for k, v in data.items() if k != 'checkpoint_name_or_path'})
    if data.get('model_type', 'gpt2') != 'gpt2':
        raise ConversionError(f"{path} describes a {data.get('model_type')!r} model, not GPT-2")
    return config_from_hf(data)


def _config_from_yaml(path):
    """The GPT2Config of a run YAML's `model.model_config` section."""
    from mindformers.tools.register.config import load_yaml_with_bases
    section = (load_yaml_with_bases(path).get('model') or {}).get('model_config')
    if not isinstance(section, dict):
        raise ConversionError(f"{path} has no model.model_config section")
    if section.get('type', 'GPT2Config') != 'GPT2Config':
        raise ConversionError(f"{path}: model.model_config.type is {section['type']!r}, not GPT2Config")
    return GPT2Config(**{k: v for k, v in section.items() if k not in ('type', 'checkpoint_name_or_path')})


def load_config(config):
    """`config` as a GPT2Config: one already, or the path of a `.yaml` run config or a `.json` model config."""
    if isinstance(config, GPT2Config):
        return config
    path = os.fspath(config)
    if not os.path.isfile(path):
        raise ConversionError(f"config file not found: {path}")
    try:
        return _config_from_yaml(path) if path.endswith(('.yaml', '.yml')) else _config_from_json(path)
    except (TypeError, ValueError) as err:
        if isinstance(err, ConversionError):
            raise
        raise ConversionError(f"config {path}: {err}") from None


def _config_beside(input_path):
    """The GPT2Config of the `config.json` in (or beside) `input_path`, or None when there is none."""
    directory = input_path if os.path.isdir(input_path) else os.path.dirname(os.path.abspath(input_path))
    path = os.path.join(directory, 'config.json')
    return load_config(path) if os.path.isfile(path) else None


def convert_pt_to_ms(input_path, output_path, dtype=None, config=None):
    """Convert a HF GPT-2 checkpoint (directory or file) into a MindSpore checkpoint file at `output_path`.

    The architecture comes from `config` (a GPT2Config or a config file), else the `config.json` beside the
    weights, else the tensor shapes. Returns {our tensor name: shape} of what was written."""
    check_dtype(dtype)
    if os.path.isdir(output_path):
        raise ConversionError(f"output path {output_path} is a directory; give a checkpoint file "
                              f"(.ckpt or .safetensors)")
    weights = load_hf_weights(input_path)
    config = load_config(config) if config is not None else _config_beside(input_path) or infer_config(weights)
    converted = convert_hf_to_ms(weights, config)
    save_ms_weights(converted, output_path, dtype)
    return {name: tuple(value.shape) for name, value in converted.items()}


def convert_ms_to_pt(input_path, output_path, dtype=None, config=None):
    """Convert a mindformers GPT-2 checkpoint (`.ckpt`/`.safetensors`, or a checkpoint directory) to HF format.

    `output_path` ending in `.safetensors` gets that file; any other path becomes a HF model directory
    (`config.json` + `model.safetensors`) that `transformers.GPT2LMHeadModel.from_pretrained` loads. The
    architecture comes from `config` (a GPT2Config or a config file), else a `config.json` beside the checkpoint,
    else the tensor shapes (num_heads is then guessed, with a warning). Returns {HF tensor name: shape}."""
    check_dtype(dtype)
    to_file = output_path.endswith('.safetensors')
    if not to_file:
        refuse_non_empty(os.path.abspath(output_path))
    weights = load_ms_weights(input_path)
    config = load_config(config) if config is not None else _config_beside(input_path)
    if config is None:
        config = infer_config(weights, ms_names=True)
        if not to_file:
            from mindformers.tools.logger import logger
            logger.warning("num_heads is not stored in the weights: config.json gets n_head=%d (head size %d); "
                           "pass the model's config (convert_weight.py --config) to set it", config.num_heads,
                           config.hidden_size // config.num_heads)
    converted = convert_ms_to_hf(weights, config)
    if to_file:
        save_hf_weights(converted, output_path, dtype)
    else:
        stored = DTYPES[dtype] if dtype else str(converted[HF_PREFIX + 'wte.weight'].dtype)
        save_hf_directory(converted, config_to_hf(config, stored), output_path, dtype)
    return {name: tuple(value.shape) for name, value in converted.items()}
