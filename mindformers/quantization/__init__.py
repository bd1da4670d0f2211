"""Weight-only int8 inference: int8 formats (`formats`: block32 = llama.cpp's Q8_0, channel), the int8 layers
(`linear`) and quantizing a model in place or as its weights load (`model`). Activations stay float."""
from mindformers.quantization.formats import SCHEMES, dequantize, quantize
from mindformers.quantization.config import quantization_settings
from mindformers.quantization.linear import Int8Embedding, Int8Linear, Int8TiedLMHead
from mindformers.quantization.model import (quantization_of, quantize_model, quantized_state, quantized_weights,
                                            quantizing_transform)

__all__ = ['SCHEMES', 'dequantize', 'quantize', 'quantization_settings', 'Int8Embedding', 'Int8Linear',
           'Int8TiedLMHead', 'quantization_of', 'quantize_model', 'quantized_state', 'quantized_weights',
           'quantizing_transform']
