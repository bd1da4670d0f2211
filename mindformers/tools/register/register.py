"""The registry: every class a YAML file can name is registered here under a module type."""
import difflib
import inspect


class MindFormerModuleType:
    """Names of the registry sections (the `module_type` of every registered class)."""
    TRAINER = 'trainer'
    PIPELINE = 'pipeline'
    PROCESSOR = 'processor'
    TOKENIZER = 'tokenizer'
    DATASET = 'dataset'
    DATASET_LOADER = 'dataset_loader'
    MODELS = 'models'
    CONFIG = 'config'
    MODULES = 'modules'
    LOSS = 'loss'
    LR = 'lr'
    OPTIMIZER = 'optimizer'
    CALLBACK = 'callback'
    WRAPPER = 'wrapper'
    METRIC = 'metric'
    TOOLS = 'tools'


class MindFormerRegister:
    """Class-level registry `registry[module_type][name] -> class`."""
    registry = {}

    @classmethod
    def register(cls, module_type=MindFormerModuleType.TOOLS, alias=None):
        """Decorator registering a class under `alias` or its own `__name__`."""
        def wrapper(register_class):
            cls.register_cls(register_class, module_type, alias)
            return register_class
        return wrapper

    @classmethod
    def register_cls(cls, register_class, module_type=MindFormerModuleType.TOOLS, alias=None):
        """Register `register_class`; a later registration under the same name replaces the earlier one."""
        name = alias if alias is not None else register_class.__name__
        cls.registry.setdefault(module_type, {})[name] = register_class
        return register_class

    @classmethod
    def is_exist(cls, module_type, class_name=None):
        _ensure_builtins_registered()
        if class_name is None:
            return module_type in cls.registry
        return class_name in cls.registry.get(module_type, {})

    @classmethod
    def names(cls, module_type):
        """Sorted names registered under `module_type`."""
        _ensure_builtins_registered()
        return sorted(cls.registry.get(module_type, {}))

    @classmethod
    def get_cls(cls, module_type, class_name=None, where=None):
        """Look up a class; an unknown name raises ValueError listing the closest registered names.

        `where` (e.g. the dotted YAML path `model.arch.type`) is named in the message."""
        _ensure_builtins_registered()
        section = cls.registry.get(module_type, {})
        if class_name in section:
            return section[class_name]
        close = difflib.get_close_matches(str(class_name), list(section), n=5, cutoff=0.5)
        at = f" at '{where}'" if where else ""
        hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        known = ', '.join(sorted(section)[:40])
        raise ValueError(f"unknown {module_type} type {class_name!r}{at}{hint} "
                         f"(registered {module_type} types: {known or 'none'})")

    @classmethod
    def get_instance(cls, module_type=MindFormerModuleType.TOOLS, class_name=None, **kwargs):
        if class_name is None:
            raise ValueError("get_instance needs a class_name")
        return cls.get_cls(module_type, class_name)(**kwargs)

    @classmethod
    def get_instance_from_cfg(cls, cfg, module_type=MindFormerModuleType.TOOLS, default_args=None, where=None):
        """Build an object from a config dict holding `type` plus constructor keywords.

        `default_args` override keys of `cfg`. `type` may be a registered name or a class."""
        if not isinstance(cfg, dict):
            raise TypeError(f"config{' at ' + repr(where) if where else ''} must be a mapping with a 'type' key, "
                            f"got {type(cfg).__name__}")
        if 'type' not in cfg:
            raise KeyError(f"config{' at ' + repr(where) if where else ''} has no 'type' key "
                           f"(keys: {', '.join(map(str, cfg)) or 'none'})")
        args = dict(cfg)
        obj_type = args.pop('type')
        if default_args:
            args.update(default_args)
        if isinstance(obj_type, str):
            obj_cls = cls.get_cls(module_type, obj_type, where=f"{where}.type" if where else None)
        elif inspect.isclass(obj_type):
            obj_cls = obj_type
        else:
            raise TypeError(f"'type' must be a registered name or a class, got {obj_type!r}")
        try:
            return obj_cls(**args)
        except TypeError as err:
            raise TypeError(f"{obj_cls.__name__}{' at ' + repr(where) if where else ''}: {err}") from err


_BUILTINS_DONE = False


# the packages whose classes register themselves when imported (`import mindformers` is lazy and imports none)
LIBRARY_PACKAGES = ('mindformers.core', 'mindformers.dataset', 'mindformers.models', 'mindformers.generation',
                    'mindformers.pipeline', 'mindformers.wrapper', 'mindformers.trainer')


def _ensure_builtins_registered():
    """On the first lookup (once): import the library's own packages (`LIBRARY_PACKAGES`) and the research
    families, and register MindSpore's optimizers, schedules, datasets, losses and callbacks. A class registered
    before that (a user's, under one of our names) keeps its place, as if registered after `import mindformers`."""
    global _BUILTINS_DONE
    if _BUILTINS_DONE:
        return
    _BUILTINS_DONE = True
    import importlib
    earlier = {module_type: dict(section) for module_type, section in MindFormerRegister.registry.items()}
    for package in LIBRARY_PACKAGES:
        importlib.import_module(package)
    for module_type, section in earlier.items():
        MindFormerRegister.registry[module_type].update(section)
    from mindspore import nn, dataset as ds, train
    sections = [
        (MindFormerModuleType.OPTIMIZER, nn.optim, nn.Optimizer),
        (MindFormerModuleType.LR, nn.learning_rate_schedule, nn.learning_rate_schedule.LearningRateSchedule),
        (MindFormerModuleType.DATASET_LOADER, ds, None),
        (MindFormerModuleType.LOSS, nn.loss, nn.Cell),
        (MindFormerModuleType.CALLBACK, train.callback, train.callback.Callback),
        (MindFormerModuleType.WRAPPER, nn.wrap, nn.Cell),
        (MindFormerModuleType.METRIC, train.metrics, None),
    ]
    for module_type, module, base in sections:
        for name in dir(module):
            obj = getattr(module, name)
            if not inspect.isclass(obj) or name.startswith('_'):
                continue
            if base is not None and not issubclass(obj, base):
                continue
            if module_type == MindFormerModuleType.DATASET_LOADER and not name.endswith('Dataset'):
                continue
            # our own registrations take precedence over MindSpore's names
            MindFormerRegister.registry.setdefault(module_type, {}).setdefault(name, obj)
    import_research()


def import_research():
    """Import the model families kept under `research/` beside the package (PengCheng.Mind), as
    `research.<family>`, so their classes register themselves. Runs with the first registry lookup; a family whose
    import fails raises (a broken research package is a bug, not an unknown name)."""
    import importlib
    import importlib.machinery
    import importlib.util
    import os
    import sys
    from mindformers.tools.utils import PACKAGE_DIR, REPO_DIR
    root = os.path.join(REPO_DIR, 'research')  # a checkout; an installed wheel has it as mindformers/research
    if not os.path.isdir(root):
        root = os.path.join(PACKAGE_DIR, 'research')
    families = sorted(name for name in (os.listdir(root) if os.path.isdir(root) else ())
                      if os.path.isfile(os.path.join(root, name, '__init__.py')))
    if not families:
        return
    if 'research' not in sys.modules:
        spec = importlib.util.find_spec('research')
        if spec is None or root not in list(spec.submodule_search_locations or ()):
            # not importable from here (the repository root is not on sys.path): a package of that one folder
            spec = importlib.machinery.ModuleSpec('research', None, is_package=True)
            spec.submodule_search_locations = [root]
            sys.modules['research'] = importlib.util.module_from_spec(spec)
    for name in families:
        importlib.import_module(f'research.{name}')
