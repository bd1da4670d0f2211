"""Which parameters train: MindPet's `freeze_modules` / `freeze_delta` semantics on parameter names (glob `*`)."""
import fnmatch

DELTA_PREFIX = 'mindpet_delta_'


def _glob(name, patterns):
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns or ())


def freeze_modules(model, include=None, exclude=None):
    """Freeze parameters whose names match a glob of `include`, unfreeze those matching `exclude`; a name matching
    both is left as it is. Call before the optimizer is built (it only sees `requires_grad` parameters)."""
    for param in model.get_parameters():
        frozen, trained = _glob(param.name, include), _glob(param.name, exclude)
        if frozen and not trained:
            param.requires_grad = False
        elif trained and not frozen:
            param.requires_grad = True


def freeze_delta(model, mode, include=None, exclude=None):
    """Train only the delta of PET algorithm `mode` (parameters named `*mindpet_delta_<mode>*`; for 'bitfit' the
    biases, `*bias`), then apply `include` / `exclude` as `freeze_modules` does. Returns the trainable names."""
    keep = ('*bias',) if mode == 'bitfit' else (f"*{DELTA_PREFIX}{mode}*",)
    for param in model.get_parameters():
        param.requires_grad = _glob(param.name, keep)
    freeze_modules(model, include, exclude)
    return [p.name for p in model.get_parameters() if p.requires_grad]
