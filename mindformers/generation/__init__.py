"""Text generation."""
from .text_generator import GeneratorMixin

__all__ = ['GeneratorMixin']
