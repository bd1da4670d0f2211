"""MindFormerConfig: YAML (safe loader only) as a dict with attribute access, inheritance and dotted overrides."""
import copy
import difflib
import os
import re

import yaml


class ConfigError(ValueError):
    """A config problem, with the file, line or dotted key in the message."""


def unknown_key_message(dotted, known, what='key'):
    """The message for an unknown `dotted` key: the closest names of `known` (difflib), and all of them when they
    are few."""
    known = sorted({str(k) for k in known})
    leaf = str(dotted).rsplit('.', 1)[-1]
    close = difflib.get_close_matches(leaf, known, n=3, cutoff=0.6)
    message = f"unknown {what} '{dotted}'"
    if close:
        message += f" (did you mean {', '.join(close)}?)"
    if len(known) <= 40:
        message += f"; valid: {', '.join(known) or 'none'}"
    return message


def _to_config(value, path):
    if isinstance(value, MindFormerConfig):
        return value
    if isinstance(value, dict):
        return MindFormerConfig(value, _path=path)
    if isinstance(value, list):
        return [_to_config(v, f"{path}[{i}]") for i, v in enumerate(value)]
    return value


def deep_merge(base, override):
    """Return `base` updated by `override`: nested mappings merge, everything else is replaced. A mapping whose
    `type` differs from the base mapping's names another class, so it replaces the base one instead of merging
    (a MindDataset data_loader over a TextCorpusDataset one keeps none of its keys)."""
    merged = dict(base)
    for key, value in override.items():
        previous = merged.get(key)
        retyped = isinstance(value, dict) and isinstance(previous, dict) and 'type' in value and \
            value['type'] != previous.get('type', value['type'])
        if isinstance(value, dict) and isinstance(previous, dict) and not retyped:
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def load_yaml(path):
    """Load one YAML file with a safe loader; syntax errors name the file and line."""
    if not os.path.isfile(path):
        raise ConfigError(f"config file not found: {path}")
    with open(path, encoding='utf-8') as f:
        try:
            data = _yaml_load(f)
        except yaml.MarkedYAMLError as err:
            mark = err.problem_mark or err.context_mark
            line = f":{mark.line + 1}:{mark.column + 1}" if mark else ""
            raise ConfigError(f"{path}{line}: YAML syntax error: {err.problem or err.context}") from None
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: YAML error: {err}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(data).__name__}")
    return data


def load_yaml_with_bases(path, _seen=()):
    """Load `path`, resolving `base_config` (a path or list of paths relative to the file) recursively."""
    path = os.path.abspath(path)
    if path in _seen:
        raise ConfigError(f"{path}: base_config cycle: {' -> '.join(_seen + (path,))}")
    data = load_yaml(path)
    bases = data.pop('base_config', None)
    if not bases:
        return data
    if isinstance(bases, str):
        bases = [bases]
    merged = {}
    for base in bases:
        base_path = base if os.path.isabs(base) else os.path.join(os.path.dirname(path), base)
        if not os.path.isfile(base_path):
            raise ConfigError(f"{path}: base_config {base!r} not found (looked for {base_path})")
        merged = deep_merge(merged, load_yaml_with_bases(base_path, _seen + (path,)))
    return deep_merge(merged, data)


class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads `1e-4` and `3E5` as floats (YAML 1.1 wants a dot: `1.0e-4`) and Python's
    `None`/`none` as null."""


_Loader.add_implicit_resolver(
    'tag:yaml.org,2002:float',
    re.compile(r"""^(?:[-+]?[0-9][0-9_]*\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                    |[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+
                    |[-+]?\.[0-9_]+(?:[eE][-+]?[0-9]+)?
                    |[-+]?\.(?:inf|Inf|INF)
                    |\.(?:nan|NaN|NAN))$""", re.X),
    list('-+0123456789.'))


_Loader.add_implicit_resolver('tag:yaml.org,2002:null', re.compile(r'^(?:None|none)$'), list('Nn'))


def _yaml_load(stream):
    return yaml.load(stream, Loader=_Loader)  # a SafeLoader subclass: builds plain data only, never objects


def parse_value(text):
    """Parse a command-line value: YAML scalars and flow lists/maps (`1`, `1e-4`, `True`, `[1,2]`, `none`)."""
    if not isinstance(text, str):
        return text
    try:
        return _yaml_load(text)
    except yaml.YAMLError:
        return text


class MindFormerConfig(dict):
    """A dict with attribute access. Nested mappings become MindFormerConfig.

    `MindFormerConfig('a.yaml', key=value)` loads the YAML (with `base_config` inheritance) and merges
    the keyword arguments over it. A missing attribute raises AttributeError naming the dotted path and
    the closest keys; use `.get()` for optional keys."""

    def __init__(self, *args, _path='', **kwargs):
        super().__init__()
        object.__setattr__(self, '_path', _path)
        object.__setattr__(self, '_source', None)  # the YAML file loaded, named in error messages
        data = {}
        for arg in args:
            if isinstance(arg, (str, os.PathLike)):
                data = deep_merge(data, load_yaml_with_bases(os.fspath(arg)))
                object.__setattr__(self, '_source', os.fspath(arg))
            elif isinstance(arg, dict):
                data = deep_merge(data, arg)
            elif arg is not None:
                raise TypeError(f"MindFormerConfig takes YAML paths or mappings, got {type(arg).__name__}")
        data = deep_merge(data, kwargs)
        for key, value in data.items():
            self[key] = value

    def _child(self, key):
        return f"{self._path}.{key}" if self._path else str(key)

    def __setitem__(self, key, value):
        super().__setitem__(key, _to_config(value, self._child(key)))

    def __getattr__(self, key):
        if key.startswith('__'):
            raise AttributeError(key)
        try:
            return self[key]
        except KeyError:
            close = difflib.get_close_matches(str(key), [str(k) for k in self], n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise AttributeError(f"config has no key '{self._child(key)}'{hint}") from None

    def __setattr__(self, key, value):
        self[key] = value

    def __delattr__(self, key):
        del self[key]

    def __deepcopy__(self, memo):
        clone = MindFormerConfig(copy.deepcopy(self.to_dict(), memo), _path=self._path)
        object.__setattr__(clone, '_source', self._source)
        return clone

    def __reduce__(self):
        return (MindFormerConfig, (self.to_dict(),), None)

    def to_dict(self):
        """A plain nested dict/list copy."""
        def plain(v):
            if isinstance(v, dict):
                return {k: plain(x) for k, x in v.items()}
            if isinstance(v, list):
                return [plain(x) for x in v]
            return v
        return plain(self)

    def merge_from_dict(self, options, strict=False, sections=()):
        """Merge `{'a.b.c': value}` (dotted keys; an integer part indexes a list, e.g. `callbacks.0.prefix`) or
        nested mappings into this config, deeply. Missing parents are created, unless `strict`: then every parent
        must exist, except top-level ones named in `sections`, and a KeyError names the first missing one. Leaf
        keys are not checked here (see `validate_run_config`)."""
        for dotted, value in options.items():
            node = self
            keys = str(dotted).split('.')
            for depth, key in enumerate(keys):
                where = '.'.join(keys[:depth + 1])
                if isinstance(node, list):
                    if not key.isdigit() or int(key) >= len(node):
                        raise KeyError(f"{dotted}: '{where}' is not an index of a list of {len(node)}")
                    key = int(key)
                elif not isinstance(node, dict):
                    raise KeyError(f"{dotted}: '{'.'.join(keys[:depth])}' is a value, not a section")
                if depth == len(keys) - 1:
                    break
                child = node[key] if isinstance(node, list) or key in node else None
                if not isinstance(child, (dict, list)):
                    if strict and not (depth == 0 and key in sections and child is None):
                        close = difflib.get_close_matches(key, [str(k) for k in node], n=3) \
                            if isinstance(node, dict) else []
                        hint = f" (did you mean {', '.join(repr(c) for c in close)}?)" if close else ''
                        raise KeyError(f"{dotted}: the config has no section '{where}'{hint}")
                    child = node[key] = MindFormerConfig(_path=where)
                node = child
            current = node[key] if isinstance(node, list) or key in node else None
            if isinstance(value, dict) and isinstance(current, dict):
                node[key] = _to_config(deep_merge(current, value), '.'.join(keys))
            else:
                node[key] = _to_config(value, '.'.join(keys))
        return self

    def save(self, path):
        """Write as YAML (atomically)."""
        tmp = f"{path}.tmp"
        with open(tmp, 'w', encoding='utf-8') as f:
            yaml.safe_dump(self.to_dict(), f, sort_keys=False, allow_unicode=True)
        os.replace(tmp, path)
