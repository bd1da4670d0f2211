"""Which Linears a PET algorithm targets.

Matching (documented in docs/feature_cards/pet.md): each Linear has a dotted path in the model, e.g.
`model.layers.0.self_attn.q_proj`. A `target_modules` **string** is a Python regex that must match the whole path
(`re.fullmatch`, as PEFT does with a string), so `.*q_proj|.*v_proj` targets every layer's q and v projections. A
**list** entry matches a path equal to it, ending in `.<entry>`, or fully matched by it as a regex (so `['q_proj',
'v_proj']` and `['.*layers\\.0\\..*']` both work). `exclude_layers` follows the same rules and wins over the
targets. A pattern (a string, or any list entry) that matches no Linear is an error naming the Linear names there
are."""
import re

from mindformers.modules.layers import Linear


def _entry_matches(entry, path):
    return path == entry or path.endswith('.' + entry) or re.fullmatch(entry, path) is not None


def _compile(pattern, where):
    patterns = (pattern,) if isinstance(pattern, str) else tuple(pattern)
    for entry in patterns:
        try:
            re.compile(entry)
        except re.error as error:
            raise ValueError(f"{where}: {entry!r} is not a valid regex ({error})") from None
    return patterns


def matches(pattern, path):
    """Whether `pattern` (a regex string, full-matched, or a list of names / regexes) selects `path`."""
    if isinstance(pattern, str):
        return re.fullmatch(pattern, path) is not None
    return any(_entry_matches(entry, path) for entry in pattern)


def linear_paths(model, kinds=(Linear,)):
    """{dotted path: cell} of every cell of `kinds` in `model` (the Linears by default), in model order."""
    return {path: cell for path, cell in model.cells_and_names() if path and isinstance(cell, kinds)}


# MindFormers r1.0 names of LLaMA-shaped layers; ours follow HuggingFace
_R1_NAMES = {'wq': 'q_proj', 'wk': 'k_proj', 'wv': 'v_proj', 'wo': 'o_proj', 'w1': 'gate_proj', 'w2': 'down_proj',
             'w3': 'up_proj'}


def _hint(entry):
    found = [f"{old} -> {new}" for old, new in _R1_NAMES.items() if re.search(rf'(^|[^a-z]){old}($|[^a-z0-9])', entry)]
    return f" (MindFormers r1.0 names: use {', '.join(found)})" if found else ''


def _leaf_names(paths):
    return sorted({path.rsplit('.', 1)[-1] for path in paths})


def select_linears(model, target_modules, exclude_layers=None, where='pet_config'):
    """[(path, Linear)] that `target_modules` selects and `exclude_layers` leaves; ValueError when a pattern matches
    nothing or nothing is left."""
    candidates = linear_paths(model)
    if not candidates:
        raise ValueError(f"{type(model).__name__} has no Linear layers to target")
    available = ', '.join(_leaf_names(candidates))
    targets = _compile(target_modules, f"{where}.target_modules")
    for entry in (targets if not isinstance(target_modules, str) else (target_modules,)):
        if not any(matches(entry if isinstance(target_modules, str) else (entry,), p) for p in candidates):
            raise ValueError(f"{where}.target_modules: {entry!r} matches no Linear of {type(model).__name__} "
                             f"(a string must match the whole dotted path, e.g. 'model.layers.0.self_attn.q_proj'; "
                             f"list entries may be local names); its Linears are named: {available}{_hint(entry)}")
    chosen = [(p, cell) for p, cell in candidates.items() if matches(target_modules, p)]
    if exclude_layers:
        excluded = _compile(exclude_layers, f"{where}.exclude_layers")
        for entry in (excluded if not isinstance(exclude_layers, str) else (exclude_layers,)):
            if not any(matches(entry if isinstance(exclude_layers, str) else (entry,), p) for p, _ in chosen):
                raise ValueError(f"{where}.exclude_layers: {entry!r} matches none of the targeted Linears "
                                 f"({', '.join(p for p, _ in chosen[:6])}{' ...' if len(chosen) > 6 else ''})")
        chosen = [(p, cell) for p, cell in chosen if not matches(exclude_layers, p)]
        if not chosen:
            raise ValueError(f"{where}.exclude_layers leaves none of the targeted Linears")
    return chosen
