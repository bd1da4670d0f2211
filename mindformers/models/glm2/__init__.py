"""ChatGLM2: config, model, tokenizer (weight conversion: `mindformers.models.glm2.convert_glm2`)."""
from .glm2_config import ChatGLM2Config
from .modeling_glm2 import ChatGLM2ForConditionalGeneration
from .glm2_tokenizer import ChatGLM2Tokenizer, ChatGLM2Processor

__all__ = ['ChatGLM2Config', 'ChatGLM2ForConditionalGeneration', 'ChatGLM2Tokenizer', 'ChatGLM2Processor']
