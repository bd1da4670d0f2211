"""Registry and config."""
from .register import MindFormerRegister, MindFormerModuleType
from .config import MindFormerConfig, ConfigError, parse_value, deep_merge
from .check import validate_run_config
from .family import FamilySpec, register_family, unregister_family

__all__ = ['MindFormerRegister', 'MindFormerModuleType', 'MindFormerConfig', 'ConfigError', 'parse_value',
           'deep_merge', 'validate_run_config', 'FamilySpec', 'register_family', 'unregister_family']
