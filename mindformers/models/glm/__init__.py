"""GLM v1 (ChatGLM-6B): config, model, chat model, tokenizer (weights: `mindformers.models.glm.convert_glm`)."""
from .glm_config import GLMConfig
from .modeling_glm import GLMModel, GLMForPreTraining, GLMChatModel
from .chatglm_6b_tokenizer import ChatGLMTokenizer, GLMProcessor

__all__ = ['GLMConfig', 'GLMModel', 'GLMForPreTraining', 'GLMChatModel', 'ChatGLMTokenizer', 'GLMProcessor']
