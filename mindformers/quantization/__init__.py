"""Weight-only int8 quantization: formats (`quantize`, `dequantize`, `SCHEMES`)."""
from .formats import SCHEMES, dequantize, quantize

__all__ = ['SCHEMES', 'dequantize', 'quantize']
