"""`Trainer(pet_method=...)` and `run_mindformer.py --pet_method`: which parameter-efficient tuning algorithm a run
applies, picked as MindFormers' Trainer picks it.

- a model name: `<name>_<pet_method>` when that name is registered (`gpt2` + 'lora' -> `gpt2_lora`), else the name's
  own config with `pet_config: {pet_type: <pet_method>}` (the algorithm's defaults; LoRA targets the family's
  default layers, `pet_default_targets`), logged;
- a run config: its `model.model_config.pet_config` must be of that type; without one it gets the defaults, logged;
- a model instance: its PET must be of that type; without one the defaults are applied to it in place, logged.
A pet_method that is not a registered pet_type, or that disagrees with the config's or model's, is a ValueError."""
from mindformers.models.model_book import list_models
from mindformers.pet import apply_pet, pet_config_from_dict
from mindformers.pet.config import pet_config_class
from mindformers.tools.logger import logger
from mindformers.tools.register import MindFormerRegister, MindFormerModuleType
from mindformers.trainer.build import model_section

__all__ = ['check_pet_method', 'pet_model_name', 'apply_to_config', 'apply_to_model']


def check_pet_method(pet_method, where='pet_method'):
    """The pet_type `pet_method` names ('' for None or ''); ValueError naming `where` for an unknown one."""
    if pet_method in (None, ''):
        return ''
    if not isinstance(pet_method, str):
        raise TypeError(f"{where} must be a pet_type name such as 'lora', got {pet_method!r}")
    pet_config_class(pet_method, where)
    return pet_method


def pet_model_name(name, pet_method):
    """The registered model name that `name` and `pet_method` pick: `<name>_<pet_method>` when registered."""
    if pet_method and not name.endswith(f'_{pet_method}') and f'{name}_{pet_method}' in list_models():
        return f'{name}_{pet_method}'
    return name


def _pet_type(pet_config):
    return pet_config.get('pet_type') if hasattr(pet_config, 'get') else getattr(pet_config, 'pet_type', None)


def _disagree(pet_method, pet_type, where):
    return ValueError(f"pet_method {pet_method!r} disagrees with {where} (pet_type {pet_type!r}); drop pet_method, "
                      f"or use a config or model without PET or with pet_type {pet_method!r}")


def _defaults(pet_method, model_class):
    """The default config of `pet_method` and, for logging, the targets `model_class` gives it."""
    config = pet_config_from_dict({'pet_type': pet_method}, 'pet_method')
    targets = getattr(model_class, 'pet_default_targets', {}).get(pet_method)
    where = f"; targets: {model_class.__name__}'s defaults {list(targets)}" if targets else ''
    return config, f"{type(config).__name__} defaults {config.to_dict()}{where}"


def apply_to_config(config, pet_method, where='the run config'):
    """Make the run `config` (a MindFormerConfig with a model section) tune with `pet_method` (a checked pet_type)."""
    section = model_section(config)
    model_config = section['model_config']
    current = model_config.get('pet_config')
    if current:
        if _pet_type(current) != pet_method:
            raise _disagree(pet_method, _pet_type(current), f"model.model_config.pet_config of {where}")
        return config
    arch = (section.get('arch') or {}).get('type')
    model_class = MindFormerRegister.get_cls(MindFormerModuleType.MODELS, arch, where='model.arch.type') \
        if isinstance(arch, str) else arch
    _, described = _defaults(pet_method, model_class)
    model_config['pet_config'] = {'pet_type': pet_method}
    logger.info("pet_method=%r: %s has no model.model_config.pet_config; using pet_config {pet_type: %s} (%s)",
                pet_method, where, pet_method, described)
    return config


def apply_to_model(model, pet_method):
    """Make the model instance tune with `pet_method` (a checked pet_type), applying its defaults in place."""
    current = getattr(model, 'pet_config', None)
    if current is not None:
        if current.pet_type != pet_method:
            raise _disagree(pet_method, current.pet_type, f"the given {type(model).__name__}'s PET")
        return model
    pet_config, described = _defaults(pet_method, type(model))
    apply_pet(model, pet_config)
    logger.info("pet_method=%r: the given %s had no PET; applied %s", pet_method, type(model).__name__, described)
    return model
