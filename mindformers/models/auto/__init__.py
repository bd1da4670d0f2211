"""Auto classes."""
from .auto_class import AutoConfig, AutoModel, AutoTokenizer, register_auto

__all__ = ['AutoConfig', 'AutoModel', 'AutoTokenizer', 'register_auto']
