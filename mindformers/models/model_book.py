"""Registered model names: `<name>` resolves to `run_<name>.yaml` in a folder a registered family declares
(`FamilySpec.yaml_dirs`, e.g. `configs/llama`, `research/pengcheng_mind`).

A name may also have published weights: `CHECKPOINTS[name] = (url, sha256)` (add a line below, or call
`register_checkpoint` from your own code). `checkpoint_for(name)` downloads such a checkpoint once into the cache
(see `tools.download`) and returns its path; `AutoModel.from_pretrained(name)` and `checkpoint_name_or_path: <name>`
use it. None of the bundled names has published weights yet: convert HuggingFace weights with convert_weight.py."""
import glob
import os

from mindformers.tools.register.family import yaml_dirs


def list_models():
    """{name: yaml path} for every `run_<name>.yaml` of a registered family (the first folder holding a name wins)."""
    found = {}
    for folder in yaml_dirs():
        for path in sorted(glob.glob(os.path.join(folder, 'run_*.yaml'))):
            name = os.path.basename(path)[len('run_'):-len('.yaml')]
            found.setdefault(name, path)
    return found


def find_config(name):
    """The YAML path of a registered model name; unknown names raise ValueError listing the known ones."""
    models = list_models()
    if name in models:
        return models[name]
    import difflib
    close = difflib.get_close_matches(name, list(models), n=3)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    raise ValueError(f"unknown model name {name!r}{hint} (known: {', '.join(sorted(models))})")


CHECKPOINTS = {}


def register_checkpoint(name, url, sha256):
    """Publish weights for a registered model name: a URL of a `.ckpt` / `.safetensors` file and its sha256."""
    find_config(name)
    if not (isinstance(sha256, str) and len(sha256) == 64):
        raise ValueError(f"register_checkpoint({name!r}): sha256 must be a 64-character hex digest, got {sha256!r}")
    CHECKPOINTS[name] = (url, sha256.lower())


def checkpoint_for(name, offline=None):
    """Path of the downloaded, verified checkpoint published for `name`, or None when there is none."""
    if name not in CHECKPOINTS:
        return None
    from mindformers.tools.download import download_file
    url, sha256 = CHECKPOINTS[name]
    suffix = os.path.splitext(os.path.basename(url))[1] or '.ckpt'
    return download_file(url, sha256=sha256, filename=f'{name}{suffix}', cache_subdir='checkpoints',
                         offline=offline)
