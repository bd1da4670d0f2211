"""Auto classes."""
from .auto_class import AutoConfig, AutoModel, AutoProcessor, AutoTokenizer, register_auto

__all__ = ['AutoConfig', 'AutoModel', 'AutoProcessor', 'AutoTokenizer', 'register_auto']
