"""Weight-file helpers shared by the per-family converters (`models/<family>/convert_<family>.py`).

Reading: HuggingFace checkpoints (safetensors, sharded `*.index.json`, `.bin` through `torch.load(weights_only=True)`;
bfloat16 widened to float32) and mindformers checkpoints. Writing: mindformers `.ckpt`/`.safetensors` and
HuggingFace safetensors files or directories, always atomically (temporary name, then rename)."""
import json
import os
import shutil
import tempfile

import numpy as np


class ConversionError(ValueError):
    """Weights that do not fit the target model; the message names every offending tensor."""


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


# HuggingFace `model_type` -> (conversion module, our tokenizer class). A conversion module provides
# `config_from_hf(config_json_mapping)` and `convert_hf_to_ms(state_dict, config)`; a family joins with one line.
HF_FAMILIES = {
    'gpt2': ('mindformers.models.gpt2.convert_gpt2', 'GPT2Tokenizer'),
}

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
    """Tensors (name -> np.ndarray, bfloat16 widened to float32) of a MindSpore `.ckpt` or `.safetensors` file, or
    of the newest checkpoint in a directory (see `tools.checkpoint.resolve_checkpoint`)."""
    import mindspore as ms
    from mindformers.tools.checkpoint import load_checkpoint_file, resolve_checkpoint
    out = {}
    for name, param in load_checkpoint_file(resolve_checkpoint(path)).items():
        out[name] = (param.astype(ms.float32) if param.dtype == ms.bfloat16 else param).asnumpy()
    return out


DTYPES = {'fp32': 'float32', 'fp16': 'float16', 'bf16': 'bfloat16'}


def check_dtype(dtype):
    if dtype is not None and dtype not in DTYPES:
        raise ConversionError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")


def save_ms_weights(weights, path, dtype=None):
    """Write name -> array as a MindSpore checkpoint (`.safetensors` by extension, else `.ckpt`), atomically.
    `dtype` ('fp32' | 'fp16' | 'bf16') casts floating-point tensors."""
    import mindspore as ms
    from mindformers.tools.checkpoint import save_checkpoint_atomic
    check_dtype(dtype)
    target = getattr(ms, DTYPES[dtype]) if dtype else None
    tensors = {}
    for name, value in weights.items():
        tensor = ms.Tensor(value)
        if target is not None and np.issubdtype(value.dtype, np.floating):
            tensor = tensor.astype(target)
        tensors[name] = tensor
    return save_checkpoint_atomic(tensors, path)


def _write_safetensors(weights, path, dtype=None):
    """Write name -> array to `path` in HF's safetensors layout; bfloat16 goes through torch (NumPy has none)."""
    floating = lambda value: np.issubdtype(value.dtype, np.floating)
    if dtype == 'bf16':
        import torch
        from safetensors.torch import save_file
        tensors = {name: torch.from_numpy(np.ascontiguousarray(value)) for name, value in weights.items()}
        tensors = {name: t.to(torch.bfloat16) if t.is_floating_point() else t for name, t in tensors.items()}
    else:
        from safetensors.numpy import save_file
        tensors = {name: np.ascontiguousarray(value.astype(DTYPES[dtype]) if dtype and floating(value) else value)
                   for name, value in weights.items()}
    save_file(tensors, path, metadata={'format': 'pt'})


def save_hf_weights(weights, path, dtype=None):
    """Write name -> array as a HF `.safetensors` file, atomically (temporary file, then rename).
    `dtype` ('fp32' | 'fp16' | 'bf16') casts floating-point tensors."""
    if not path.endswith('.safetensors'):
        raise ConversionError(f"HF output must be a .safetensors file, got {path}")
    check_dtype(dtype)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp = os.path.join(directory, f".{os.path.basename(path)}.partial.{os.getpid()}")
    try:
        _write_safetensors(weights, tmp, dtype)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def refuse_non_empty(directory):
    if os.path.isdir(directory) and os.listdir(directory):
        raise ConversionError(f"output directory {directory} exists and is not empty; remove it or give another "
                              f"output path")
    if os.path.exists(directory) and not os.path.isdir(directory):
        raise ConversionError(f"output path {directory} exists and is not a directory (a HF model directory is "
                              f"written unless the path ends in .safetensors)")


def save_hf_directory(weights, hf_config, directory, dtype=None):
    """Write a HF model directory (`config.json` from the mapping `hf_config`, and `model.safetensors`), all or
    nothing: both files go into a hidden temporary directory beside `directory`, which is then renamed to it.
    An existing non-empty `directory` is refused."""
    check_dtype(dtype)
    directory = os.path.abspath(directory)
    refuse_non_empty(directory)
    parent = os.path.dirname(directory)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(directory)}.partial.", dir=parent)
    try:
        _write_safetensors(weights, os.path.join(tmp, 'model.safetensors'), dtype)
        with open(os.path.join(tmp, 'config.json'), 'w', encoding='utf-8') as f:
            json.dump(hf_config, f, indent=2)
        os.chmod(tmp, 0o755)  # mkdtemp creates it private
        os.replace(tmp, directory)  # replaces an empty directory; fails on one filled meanwhile
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
    return directory
