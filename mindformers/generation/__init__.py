"""Text generation: GenerationConfig, generate(), decoding sessions (KV cache with slots) and streamers."""
from .generation_config import GenerationConfig
from .session import DecodingSession, prefill_bucket
from .streamers import BaseStreamer, TextIteratorStreamer, TextStreamer
from .text_generator import GeneratorMixin, generate

__all__ = ['GenerationConfig', 'GeneratorMixin', 'generate', 'DecodingSession', 'prefill_bucket', 'BaseStreamer',
           'TextStreamer', 'TextIteratorStreamer']
