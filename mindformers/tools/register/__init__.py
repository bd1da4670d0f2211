"""Registry and config."""
from .register import MindFormerRegister, MindFormerModuleType
from .config import MindFormerConfig, ConfigError, parse_value, deep_merge
from .check import validate_run_config

__all__ = ['MindFormerRegister', 'MindFormerModuleType', 'MindFormerConfig', 'ConfigError', 'parse_value',
           'deep_merge', 'validate_run_config']
