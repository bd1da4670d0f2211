"""Applying a PET algorithm to a model, and what follows from it: which parameters train, the delta's names,
merging back into a plain model.

An algorithm registers `register_pet_method(config_class, apply, freeze_mode)`: `apply(model, config)` changes the
model in place and returns the names of the parameters it added; `freeze_mode` names the delta for `freeze_delta`
(None: nothing is frozen, e.g. R-Drop, which changes the loss only)."""
import mindspore as ms

from mindformers.pet.config import LoraConfig, PetConfig, pet_config_class, pet_config_from_dict
from mindformers.pet.freeze import freeze_delta
from mindformers.pet.lora import LoRALinear, apply_lora
from mindformers.pet.targets import select_linears
from mindformers.tools.logger import logger

_METHODS = {}


def register_pet_method(config_class, apply, freeze_mode=''):
    """Make `config_class.pet_type` applicable by `apply_pet`. `freeze_mode` defaults to the pet_type."""
    _METHODS[config_class.pet_type] = (apply, config_class.pet_type if freeze_mode == '' else freeze_mode)


def default_targets(model, pet_type):
    """The Linears a family targets by default for `pet_type` (the model class's `pet_default_targets`)."""
    targets = getattr(type(model), 'pet_default_targets', {}).get(pet_type)
    if not targets:
        raise ValueError(f"pet_config.target_modules is not set and {type(model).__name__} declares no default "
                         f"{pet_type} targets; set target_modules")
    return targets


def _lora(model, config):
    targets = config.target_modules
    if targets is None:
        targets = default_targets(model, 'lora')
        logger.info("LoRA: target_modules not set; using %s's default %s", type(model).__name__, list(targets))
    chosen = select_linears(model, targets, config.exclude_layers)
    return apply_lora(model, config, chosen)


register_pet_method(LoraConfig, _lora)


def forget_compiled(model):
    """Drop every graph compiled for `model`'s cells, its decoding sessions and its evaluation cells: after its
    structure changed, the next call compiles the new one."""
    for _, cell in model.cells_and_names():
        cell.compile_cache.clear()
    for kept in ('_generate_sessions', '_eval_cells'):
        if hasattr(model, kept):
            setattr(model, kept, {})


def apply_pet(model, pet_config):
    """Apply `pet_config` (a PetConfig or its mapping, with pet_type) to `model` in place: add the delta, freeze the
    rest (`freeze_delta` with the config's freeze_include / freeze_exclude). Returns the model. The model records
    the config as `model.pet_config` (and `model.config.pet_config`, so it is saved with the config)."""
    config = pet_config_from_dict(pet_config)
    if not isinstance(config, PetConfig):
        raise TypeError(f"apply_pet needs a pet config, got {type(pet_config).__name__}")
    if any(p.dtype == ms.int8 for p in model.get_parameters()):
        raise ValueError(f"{type(model).__name__} is weight-only int8: PET needs its float weights. Apply "
                         f"{config.pet_type} to the float model (and merge a LoRA: merge_pet) before quantizing")
    if getattr(model, 'pet_config', None) is not None:
        raise ValueError(f"{type(model).__name__} already has PET ({model.pet_config.pet_type}); build a fresh model "
                         f"to apply another")
    if config.pet_type not in _METHODS:
        pet_config_class(config.pet_type)
        raise ValueError(f"pet_type {config.pet_type!r} has a config but no registered method")
    apply, mode = _METHODS[config.pet_type]
    added = apply(model, config)
    if mode is not None:
        freeze_delta(model, mode, config.freeze_include, config.freeze_exclude)
    model.pet_config = config
    if getattr(model, 'config', None) is not None:
        model.config.pet_config = config
    model.pet_parameter_names = tuple(added)
    forget_compiled(model)
    total = sum(p.size for p in model.get_parameters())
    trainable = sum(p.size for p in model.trainable_params())
    logger.info("%s: %d parameter tensors added; %.4fM of %.2fM parameters train (%.3f%%)", config.pet_type,
                len(added), trainable / 1e6, total / 1e6, 100.0 * trainable / max(total, 1))
    return model


def merge_pet(model):
    """Fold a LoRA delta into the base weights (W + (alpha / r) B A in fp32, cast back): the model becomes the
    plain model, every parameter trainable again, `pet_config` cleared. Other algorithms add computation that
    cannot be folded into weights: ValueError."""
    config = getattr(model, 'pet_config', None)
    if config is None:
        raise ValueError(f"{type(model).__name__} has no PET delta to merge")
    if config.pet_type != 'lora':
        raise ValueError(f"merging is defined for LoRA only; {config.pet_type} adds layers that stay in the model")
    for _, cell in list(model.cells_and_names()):
        if isinstance(cell, LoRALinear):
            cell.merge()
    for param in model.get_parameters():
        param.requires_grad = True
    model.pet_config = None
    model.pet_parameter_names = ()
    if getattr(model, 'config', None) is not None:
        model.config.pet_config = None
    forget_compiled(model)
    return model
