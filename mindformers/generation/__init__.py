"""Text generation: GenerationConfig, generate() (GeneratorMixin) and streamers."""
from .generation_config import GenerationConfig
from .streamers import BaseStreamer, TextIteratorStreamer, TextStreamer
from .text_generator import GeneratorMixin

__all__ = ['GenerationConfig', 'GeneratorMixin', 'BaseStreamer', 'TextStreamer', 'TextIteratorStreamer']
