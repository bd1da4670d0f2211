"""GLM v1 (ChatGLM-6B): config, model, chat model, tokenizer (weights: `mindformers.models.glm.convert_glm`)."""
from mindformers.tools.register import FamilySpec, register_family

from .glm_config import GLMConfig, is_chatglm_6b_hf_config
from .modeling_glm import GLMModel, GLMForPreTraining, GLMChatModel
from .chatglm_6b_tokenizer import ChatGLMTokenizer, GLMProcessor

register_family(FamilySpec(
    name='glm', config=GLMConfig, model=GLMForPreTraining, tokenizer=ChatGLMTokenizer, processor=GLMProcessor,
    converter='mindformers.models.glm.convert_glm', hf_model_types=('chatglm',),
    hf_match=is_chatglm_6b_hf_config, yaml_dirs=('configs/glm',)))

__all__ = ['GLMConfig', 'GLMModel', 'GLMForPreTraining', 'GLMChatModel', 'ChatGLMTokenizer', 'GLMProcessor']
