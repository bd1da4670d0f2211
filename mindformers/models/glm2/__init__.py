"""ChatGLM2: config, model, tokenizer (weight conversion: `mindformers.models.glm2.convert_glm2`)."""
from mindformers.tools.register import FamilySpec, register_family

from .glm2_config import ChatGLM2Config
from .modeling_glm2 import ChatGLM2ForConditionalGeneration
from .glm2_tokenizer import ChatGLM2Tokenizer, ChatGLM2Processor

register_family(FamilySpec(
    name='glm2', config=ChatGLM2Config, model=ChatGLM2ForConditionalGeneration, tokenizer=ChatGLM2Tokenizer,
    processor=ChatGLM2Processor, converter='mindformers.models.glm2.convert_glm2',
    hf_model_types=('glm', 'chatglm'), yaml_dirs=('configs/glm2',)))  # chatglm: when GLM v1's test fails

__all__ = ['ChatGLM2Config', 'ChatGLM2ForConditionalGeneration', 'ChatGLM2Tokenizer', 'ChatGLM2Processor']
