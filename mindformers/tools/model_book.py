"""Registered model names: `<name>` resolves to `configs/<family>/run_<name>.yaml` (or `research/<family>/...`)."""
import glob
import os

from mindformers.tools.utils import PACKAGE_DIR, REPO_DIR


def _config_roots():
    roots = []
    for base in (REPO_DIR, PACKAGE_DIR):
        for sub in ('configs', 'research'):
            path = os.path.join(base, sub)
            if os.path.isdir(path) and path not in roots:
                roots.append(path)
    return roots


def list_models():
    """{name: yaml path} for every `run_<name>.yaml` shipped with the package."""
    found = {}
    for root in _config_roots():
        for path in sorted(glob.glob(os.path.join(root, '*', 'run_*.yaml'))):
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
