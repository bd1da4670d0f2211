"""GPT-2 weights: HuggingFace `GPT2LMHeadModel` <-> mindformers `GPT2LMHeadModel`.

HF stores its projections as `Conv1D` weights [in, out] (y = x W + b); ours are `Linear` weights [out, in], so every
projection is transposed. The fused `c_attn` (q | k | v) maps onto our fused `qkv_proj` unchanged apart from that.
HF's `lm_head.weight` is tied to `wte` and dropped; the causal-mask buffers `attn.bias` / `attn.masked_bias` of older
files are skipped. HF names are accepted with or without the `transformer.` prefix and written with it.

    python convert_weight.py --model gpt2 --input_path <HF dir or file> --output_path gpt2.ckpt
"""
import copy
import json
import os
import re

import numpy as np

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


class ConversionError(ValueError):
    """Weights that do not fit the target model; the message names every offending tensor."""


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

    def input_name(ours):
        return sources.get(ours) or HF_PREFIX + _rename(ours, _MS_TO_HF)[0]

    missing, unexpected, mismatched = _check(converted, config, input_name, lambda n: _rename(n, _MS_TO_HF)[1])
    _raise_if(config, missing, unexpected + unknown, mismatched)
    return converted


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
# files


def _read_safetensors(path):
    from safetensors import safe_open
    out = {}
    with safe_open(path, framework='np') as f:
        for name in f.keys():
            try:
                out[name] = f.get_tensor(name)
            except (TypeError, ValueError):  # bfloat16 has no NumPy dtype: read through torch, widen to float32
                out[name] = _read_safetensors_torch(path, name)
    return out


def _read_safetensors_torch(path, name):
    import torch
    from safetensors import safe_open
    with safe_open(path, framework='pt') as f:
        return f.get_tensor(name).to(torch.float32).numpy()


def _read_torch(path):
    import torch  # only needed for .bin files
    state = torch.load(path, map_location='cpu', weights_only=True)
    if not isinstance(state, dict):
        raise ConversionError(f"{path} does not hold a state dict (got {type(state).__name__})")
    out = {}
    for name, value in state.items():
        if isinstance(value, torch.Tensor):
            value = value.detach()
            out[name] = (value.to(torch.float32) if value.dtype == torch.bfloat16 else value).numpy()
    return out


def _read_index(path):
    """A sharded checkpoint: `*.index.json` maps each tensor to its shard file in the same directory."""
    with open(path, encoding='utf-8') as f:
        weight_map = json.load(f).get('weight_map')
    if not isinstance(weight_map, dict) or not weight_map:
        raise ConversionError(f"{path} has no 'weight_map'")
    out = {}
    for shard in sorted(set(weight_map.values())):
        out.update(load_hf_weights(os.path.join(os.path.dirname(path), shard)))
    return out


_HF_FILES = ('model.safetensors', 'model.safetensors.index.json', 'pytorch_model.bin', 'pytorch_model.bin.index.json')


def load_hf_weights(path):
    """Tensors (name -> np.ndarray) of a HF checkpoint: a directory holding one of `model.safetensors`,
    `model.safetensors.index.json` (sharded), `pytorch_model.bin` or `pytorch_model.bin.index.json`, or such a
    file itself. `.bin` files are read with `torch.load(weights_only=True)`; bfloat16 is widened to float32."""
    if os.path.isdir(path):
        found = [name for name in _HF_FILES if os.path.isfile(os.path.join(path, name))]
        if not found:
            raise ConversionError(f"no HF weights in directory {path} (looked for {', '.join(_HF_FILES)})")
        path = os.path.join(path, found[0])
    if not os.path.isfile(path):
        raise ConversionError(f"input not found: {path}")
    if path.endswith('.index.json'):
        return _read_index(path)
    if path.endswith('.safetensors'):
        return _read_safetensors(path)
    if path.endswith(('.bin', '.pt', '.pth')):
        return _read_torch(path)
    raise ConversionError(f"unsupported HF weight file {path} (expected .safetensors, .bin, .pt, .pth or "
                          f"*.index.json)")


def load_ms_weights(path):
    """Tensors (name -> np.ndarray, bfloat16 widened to float32) of a MindSpore `.ckpt` or `.safetensors` file."""
    import mindspore as ms
    from mindformers.tools.checkpoint import load_checkpoint_file
    out = {}
    for name, param in load_checkpoint_file(path).items():
        out[name] = (param.astype(ms.float32) if param.dtype == ms.bfloat16 else param).asnumpy()
    return out


_DTYPES = {'fp32': 'float32', 'fp16': 'float16', 'bf16': 'bfloat16'}


def save_ms_weights(weights, path, dtype=None):
    """Write name -> array as a MindSpore checkpoint (`.safetensors` by extension, else `.ckpt`), atomically.
    `dtype` ('fp32' | 'fp16' | 'bf16') casts floating-point tensors."""
    import mindspore as ms
    from mindformers.tools.checkpoint import save_checkpoint_atomic
    target = getattr(ms, _DTYPES[dtype]) if dtype else None
    tensors = {}
    for name, value in weights.items():
        tensor = ms.Tensor(value)
        if target is not None and np.issubdtype(value.dtype, np.floating):
            tensor = tensor.astype(target)
        tensors[name] = tensor
    return save_checkpoint_atomic(tensors, path)


def save_hf_weights(weights, path, dtype=None):
    """Write name -> array as a HF `.safetensors` file, atomically (temporary file, then rename)."""
    from safetensors.numpy import save_file
    if not path.endswith('.safetensors'):
        raise ConversionError(f"HF output must be a .safetensors file, got {path}")
    if dtype == 'bf16':
        raise ConversionError("--dtype bf16 is not available for HF output (NumPy has no bfloat16); use fp32 or fp16")
    if dtype:
        weights = {name: value.astype(_DTYPES[dtype]) if np.issubdtype(value.dtype, np.floating) else value
                   for name, value in weights.items()}
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp = os.path.join(directory, f".{os.path.basename(path)}.partial.{os.getpid()}")
    try:
        save_file(weights, tmp, metadata={'format': 'pt'})
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


# ---------------------------------------------------------------------------------------------------------------
# configs and entry points


_HF_ACTIVATIONS = {'gelu_new': 'gelu', 'gelu_pytorch_tanh': 'gelu', 'gelu_fast': 'gelu', 'quick_gelu': 'quick_gelu',
                   'relu': 'relu'}


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
    return GPT2Config(vocab_size=hf_config.get('vocab_size', 50257), hidden_size=hidden,
                      num_layers=hf_config.get('n_layer', 12), num_heads=hf_config.get('n_head', 12),
                      seq_length=hf_config.get('n_positions', 1024),
                      expand_ratio=(hf_config.get('n_inner') or 4 * hidden) // hidden,
                      layernorm_epsilon=hf_config.get('layer_norm_epsilon', 1e-5), hidden_act=_HF_ACTIVATIONS[act],
                      bos_token_id=hf_config.get('bos_token_id', 50256),
                      eos_token_id=hf_config.get('eos_token_id', 50256))


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


def _hf_config_file(input_path):
    directory = input_path if os.path.isdir(input_path) else os.path.dirname(input_path)
    path = os.path.join(directory, 'config.json')
    if not os.path.isfile(path):
        return None
    with open(path, encoding='utf-8') as f:
        data = json.load(f)
    if data.get('model_type', 'gpt2') != 'gpt2':
        raise ConversionError(f"{path} describes a {data.get('model_type')!r} model, not GPT-2")
    return data


def convert_pt_to_ms(input_path, output_path, dtype=None, config=None):
    """Convert a HF GPT-2 checkpoint (directory or file) into a MindSpore checkpoint at `output_path`.

    The architecture comes from `config` (a GPT2Config), else the HF `config.json` beside the weights, else the
    tensor shapes. Returns the output path."""
    weights = load_hf_weights(input_path)
    if config is None:
        hf_config = _hf_config_file(input_path)
        config = config_from_hf(hf_config) if hf_config else infer_config(weights)
    return save_ms_weights(convert_hf_to_ms(weights, config), output_path, dtype)


def convert_ms_to_pt(input_path, output_path, dtype=None, config=None):
    """Convert a mindformers GPT-2 checkpoint (`.ckpt`/`.safetensors`) into a HF `.safetensors` file."""
    weights = load_ms_weights(input_path)
    config = config or infer_config(weights, ms_names=True)
    return save_hf_weights(convert_ms_to_hf(weights, config), output_path, dtype)
