"""Model families: one `register_family(FamilySpec(...))` call (in the family's `__init__.py`) declares everything the
library finds a family by. AutoConfig / AutoModel / AutoTokenizer, pipeline(), convert_weight.py and the registered
model names (`run_<name>.yaml`) all read this table; a user's family registered the same way works in each of them."""
import dataclasses
import importlib
import os
from typing import Any, Callable, Optional, Tuple, Union

from .register import MindFormerModuleType, MindFormerRegister

ClassOrName = Union[type, str]


@dataclasses.dataclass(frozen=True)
class FamilySpec:
    """One model family.

    name: its name (`convert_weight.py --model <name>`).
    config, model: the config class and the model class AutoModel.from_config builds from it (classes, or names
        registered in the MindFormerRegister).
    tokenizer, processor: its tokenizer and processor classes (or registered names); None: none.
    converter: its weight conversion: a module path (imported when first used) or an object, providing
        convert_pt_to_ms / convert_ms_to_pt (convert_weight.py) and, for `hf_model_types`, config_from_hf /
        convert_hf_to_ms (AutoConfig / AutoModel on a HuggingFace directory); None: none.
    hf_model_types: the HuggingFace config.json `model_type`s read through `converter`, with `tokenizer` for
        AutoTokenizer.
    hf_match: when several families read one model type, a test on the config.json mapping that claims it for this
        family; a family without a test takes the type when no test passes.
    yaml_dirs: the folders of its `run_<name>.yaml` files (registered model names): absolute, or relative to the
        repository (an installed package has them at the same place inside it), e.g. 'configs/llama'.
    Classes given as classes are registered in the MindFormerRegister under their names."""

    name: str
    config: ClassOrName
    model: ClassOrName
    tokenizer: Optional[ClassOrName] = None
    processor: Optional[ClassOrName] = None
    converter: Any = None
    hf_model_types: Tuple[str, ...] = ()
    hf_match: Optional[Callable[[dict], bool]] = None
    yaml_dirs: Tuple[str, ...] = ()

    def class_name(self, role):
        """The registered name of `role` ('config' | 'model' | 'tokenizer' | 'processor'), or None."""
        value = getattr(self, role)
        return value.__name__ if isinstance(value, type) else value

    def get_class(self, role):
        """The class of `role` (looked up in the registry when given by name)."""
        value = getattr(self, role)
        if value is None or isinstance(value, type):
            return value
        return MindFormerRegister.get_cls(_ROLES[role], value, where=f"family {self.name!r}: {role}")

    def load_converter(self):
        """The converter object (its module, when given as a module path)."""
        if self.converter is None:
            raise ValueError(f"family {self.name!r} has no weight converter")
        return importlib.import_module(self.converter) if isinstance(self.converter, str) else self.converter

    def _identity(self):
        """What makes two registrations the same family (names, not objects: a re-imported module is the same)."""
        def key(value):
            return f"{value.__module__}.{value.__qualname__}" if hasattr(value, '__qualname__') else value
        return tuple(key(getattr(self, field.name)) for field in dataclasses.fields(self))


_ROLES = {'config': MindFormerModuleType.CONFIG, 'model': MindFormerModuleType.MODELS,
          'tokenizer': MindFormerModuleType.TOKENIZER, 'processor': MindFormerModuleType.PROCESSOR}
_FAMILIES = {}
_LOADED = False


def register_family(spec):
    """Register a FamilySpec (its classes into the MindFormerRegister too) and return it. Registering the same
    family again changes nothing; another family under a taken name, or claiming a config class another family
    builds a different model from, is refused (ValueError; `unregister_family` first)."""
    if not isinstance(spec, FamilySpec):
        raise TypeError(f"register_family takes a FamilySpec, got {type(spec).__name__}")
    if not isinstance(spec.name, str) or not spec.name:
        raise ValueError(f"FamilySpec.name must be a non-empty string, got {spec.name!r}")
    for role in ('config', 'model'):
        if not spec.class_name(role):
            raise ValueError(f"family {spec.name!r}: FamilySpec.{role} is required")
    for field in ('hf_model_types', 'yaml_dirs'):
        value = getattr(spec, field)
        if not isinstance(value, tuple) or not all(isinstance(item, str) for item in value):
            raise TypeError(f"family {spec.name!r}: FamilySpec.{field} must be a tuple of strings, got {value!r}")
    if spec.hf_model_types and spec.converter is None:
        raise ValueError(f"family {spec.name!r}: hf_model_types {spec.hf_model_types} need a converter")
    known = _FAMILIES.get(spec.name)
    if known is not None and known._identity() != spec._identity():
        raise ValueError(f"a family named {spec.name!r} is already registered (config {known.class_name('config')}); "
                         f"unregister_family({spec.name!r}) first")
    for other in _FAMILIES.values():
        if other.name != spec.name and other.class_name('config') == spec.class_name('config') and \
                other.class_name('model') != spec.class_name('model'):
            raise ValueError(f"family {spec.name!r}: {spec.class_name('config')} already builds "
                             f"{other.class_name('model')} (family {other.name!r})")
    for role, module_type in _ROLES.items():
        value = getattr(spec, role)
        if isinstance(value, type):
            MindFormerRegister.register_cls(value, module_type)
    _FAMILIES[spec.name] = spec
    return spec


def unregister_family(name):
    """Forget the family `name` (its classes stay registered); returns its FamilySpec."""
    if name not in _FAMILIES:
        raise ValueError(f"no family named {name!r} is registered")
    return _FAMILIES.pop(name)


def families():
    """{name: FamilySpec} of every registered family, in registration order (the library's own first)."""
    global _LOADED
    if not _LOADED:  # the library's families register when their packages are imported
        _LOADED = True
        from .register import import_research
        importlib.import_module('mindformers.models')
        import_research()
    return dict(_FAMILIES)


def get_family(name):
    """The FamilySpec registered as `name`; ValueError listing the known names otherwise."""
    found = families()
    if name not in found:
        raise ValueError(f"unknown model family {name!r} (registered: {', '.join(sorted(found))})")
    return found[name]


def family_of_config(config_class):
    """The FamilySpec whose config is `config_class` or its nearest base class that a family declares, else None."""
    found = families()
    for klass in config_class.__mro__:
        for spec in found.values():
            if spec.class_name('config') == klass.__name__ and spec.config in (klass, klass.__name__):
                return spec
    return None


def hf_model_types():
    """Every HuggingFace model type some family reads, in registration order."""
    return list(dict.fromkeys(t for spec in families().values() for t in spec.hf_model_types))


def shared_hf_model_types():
    """The HuggingFace model types several families read (told apart by their `hf_match`)."""
    counts = {}
    for spec in families().values():
        for model_type in spec.hf_model_types:
            counts[model_type] = counts.get(model_type, 0) + 1
    return {model_type for model_type, count in counts.items() if count > 1}


def family_of_hf_config(data):
    """The FamilySpec that reads a HuggingFace config.json mapping (by `model_type`, then `hf_match`), or None."""
    candidates = [spec for spec in families().values() if data.get('model_type') in spec.hf_model_types]
    matched = [spec for spec in candidates if spec.hf_match is not None and spec.hf_match(data)]
    return (matched or [spec for spec in candidates if spec.hf_match is None] or [None])[0]


def yaml_dirs():
    """The existing folders of the registered families' `run_<name>.yaml` files, absolute."""
    from mindformers.tools.utils import PACKAGE_DIR, REPO_DIR
    found = []
    for spec in families().values():
        for folder in spec.yaml_dirs:
            for path in ([folder] if os.path.isabs(folder) else
                         [os.path.join(REPO_DIR, folder), os.path.join(PACKAGE_DIR, folder)]):
                if os.path.isdir(path) and path not in found:
                    found.append(path)
    return found
