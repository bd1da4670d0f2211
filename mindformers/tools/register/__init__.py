"""Registry and config."""
from .register import MindFormerRegister, MindFormerModuleType
from .config import MindFormerConfig, ConfigError, parse_value, deep_merge
from .family import FamilySpec, register_family, unregister_family

__all__ = ['MindFormerRegister', 'MindFormerModuleType', 'MindFormerConfig', 'ConfigError', 'parse_value',
           'deep_merge', 'validate_run_config', 'FamilySpec', 'register_family', 'unregister_family']


def __getattr__(name):
    if name == 'validate_run_config':  # its old home; the run-config check knows every layer, so it lives in trainer/
        from mindformers.trainer.run_config import validate_run_config
        return validate_run_config
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
