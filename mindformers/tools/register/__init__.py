"""Registry and config."""
from .register import MindFormerRegister, MindFormerModuleType
from .config import MindFormerConfig, ConfigError, parse_value, deep_merge

__all__ = ['MindFormerRegister', 'MindFormerModuleType', 'MindFormerConfig', 'ConfigError', 'parse_value',
           'deep_merge']
