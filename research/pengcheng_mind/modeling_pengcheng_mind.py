"""PengCheng.Mind 7B: the LLaMA decoder (`mindformers/models/llama/modeling_llama.py`) with LayerNorm (γ, β),
q/k/v and output biases, SwiGLU with biases and the output head tied to the word embedding (all read from
`PengChengMindConfig`). Nothing else is its own: RoPE is rotate-half over the whole head, as in our LLaMA.

Parameter names are those of our LLaMA (HF `LlamaForCausalLM` style, plus `.bias` on the norms and projections, no
`lm_head`); `convert_pengcheng_mind.py` maps PengCheng's MindSpore release names onto them."""
from mindformers.models.llama.modeling_llama import LlamaForCausalLM
from mindformers.tools.register import MindFormerRegister, MindFormerModuleType

from .pengcheng_mind_config import PengChengMindConfig


@MindFormerRegister.register(MindFormerModuleType.MODELS)
class PengChengMindForCausalLM(LlamaForCausalLM):
    """PengCheng.Mind causal LM (contracts of `CausalLMModel`; `generate(..., use_past=True)` decodes with the
    KV cache). Logits are the final LayerNorm output times the word-embedding table."""

    def __init__(self, config: PengChengMindConfig):
        super().__init__(config)
