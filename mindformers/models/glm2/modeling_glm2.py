"""ChatGLM2-6B: the LLaMA decoder (`models/llama/modeling_llama.py`) with q/k/v biases, 2 key/value groups and
RoPE on the first half of each head in interleaved pairs (all read from `ChatGLM2Config`), plus chat.

Parameter names are those of our LLaMA (HF `LlamaForCausalLM` style); `convert_glm2.py` maps the original
ChatGLM2 names and HF `GlmForCausalLM` names onto them."""
from mindformers.models.chat import ChatMixin
from mindformers.models.glm2.glm2_config import ChatGLM2Config
from mindformers.models.llama.modeling_llama import LlamaForCausalLM
from mindformers.tools.register import MindFormerRegister, MindFormerModuleType


@MindFormerRegister.register(MindFormerModuleType.MODELS)
class ChatGLM2ForConditionalGeneration(ChatMixin, LlamaForCausalLM):
    """ChatGLM2 causal LM (contracts of `CausalLMModel`); `chat` / `stream_chat` (`ChatMixin`) answer with the
    `[Round N]` prompt of `ChatGLM2Tokenizer.build_prompt`."""

    def __init__(self, config: ChatGLM2Config):
        super().__init__(config)
