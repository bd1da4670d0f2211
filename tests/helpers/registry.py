"""Snapshot and restore MindFormerRegister's tables, so a test that registers a class (a callback, a metric, a
pipeline, a PET type) leaves nothing behind for the tests after it. Fixture: `clean_registry` in conftest.py."""
import contextlib
import importlib

from mindformers.tools.register import MindFormerRegister

# tables filled lazily on first use, filled before a snapshot so that restoring never drops them:
# (module, function that fills them); and tables kept outside MindFormerRegister: (module, attribute)
_FILLERS = (('mindformers.tools.register.register', '_ensure_builtins_registered'),
            ('mindformers.tools.register.family', 'families'))
_OTHER_TABLES = (('mindformers.tools.register.family', '_FAMILIES'), ('mindformers.pet.config', '_TYPES'),
                 ('mindformers.pet.model', '_METHODS'))


def _module_attribute(module_name, attribute):
    try:
        return getattr(importlib.import_module(module_name), attribute, None)
    except ImportError:
        return None


def _tables():
    """MindFormerRegister's class-level dicts (`registry`: module type -> name -> class) and the other tables."""
    tables = {name: value for name, value in vars(MindFormerRegister).items() if isinstance(value, dict)}
    for module_name, attribute in _OTHER_TABLES:
        table = _module_attribute(module_name, attribute)
        if isinstance(table, dict):
            tables[f'{module_name}.{attribute}'] = table
    return tables


def snapshot():
    """The tables as they are now, two levels deep, after the lazily filled ones (MindSpore's own classes, the
    library's families) are filled."""
    for module_name, function in _FILLERS:
        fill = _module_attribute(module_name, function)
        if fill is not None:
            fill()
    return {name: (table, {key: (inner, dict(inner) if isinstance(inner, dict) else None)
                           for key, inner in table.items()})
            for name, table in _tables().items()}


def restore(saved):
    """Put the tables back as `snapshot` saw them, in place (code holding a table keeps the same object)."""
    for table, entries in saved.values():
        table.clear()
        for key, (inner, contents) in entries.items():
            if contents is not None:
                inner.clear()
                inner.update(contents)
            table[key] = inner


@contextlib.contextmanager
def registry_restored():
    """Inside the block, register freely; on leaving it every table is as it was."""
    saved = snapshot()
    try:
        yield MindFormerRegister
    finally:
        restore(saved)


def register_bias_only_pet():
    """Register (inside `clean_registry`) a pet_type for tests, 'bias_only_test': it adds no parameter and trains
    the biases only (MindPet's 'bitfit' freezing); returns its name."""
    import dataclasses
    from typing import ClassVar
    from mindformers.pet import PetConfig, register_pet_config, register_pet_method

    @dataclasses.dataclass
    class BiasOnlyConfig(PetConfig):
        pet_type: ClassVar[str] = 'bias_only_test'

    register_pet_config(BiasOnlyConfig)
    register_pet_method(BiasOnlyConfig, lambda model, config: [], freeze_mode='bitfit')
    return BiasOnlyConfig.pet_type
