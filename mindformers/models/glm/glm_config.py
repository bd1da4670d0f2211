"""GLMConfig: the hyper-parameters of a GLM v1 model (ChatGLM-6B; MindFormers r1.0 field names)."""
import math
from typing import ClassVar, Optional

from mindformers.models.base_config import BaseConfig
from mindformers.modules.layers import get_activation
from mindformers.tools.register import MindFormerRegister, MindFormerModuleType


def is_chatglm_6b_hf_config(hf_config):
    """Whether a HuggingFace config.json mapping is ChatGLM-6B's (2-D positions, `inner_hidden_size`), not
    ChatGLM2/3's (`padded_vocab_size`, `multi_query_attention`); both say model_type 'chatglm'."""
    return 'position_encoding_2d' in hf_config or 'inner_hidden_size' in hf_config


@MindFormerRegister.register(MindFormerModuleType.CONFIG)
class GLMConfig(BaseConfig):
    """GLM v1 (ChatGLM-6B) configuration.

    Architecture:
        vocab_size (130528), hidden_size (4096), num_layers (28), num_heads (32), inner_hidden_size (16384: MLP
            width), hidden_size_per_attention_head (None = hidden_size / num_heads; must be divisible by 4 for the
            2-D RoPE), seq_length (512, as MindFormers; the published model takes 2048).
        alpha (None): the residual scale: each block computes alpha * LN(x) + attention(LN(x)) and the same around
            the MLP. None means sqrt(2 * num_layers). The published code fixes it at sqrt(2 * 28) = sqrt(56) whatever
            the depth (its GLMBlock default is never overridden), so a shallower model that must match the
            published code sets alpha: 7.483314773547883 (= sqrt(56)); the glm_6b configs set it explicitly.
        layernorm_epsilon (1e-5), activation_func ('GELU': the tanh approximation; any name of
            `modules.layers.get_activation`, case-insensitive), initializer_range (0.02).
        embedding_dropout_prob, hidden_dropout_rate, attention_dropout_rate (0.0 each).
        Fixed by the published model and refused otherwise: position_encoding_2d True, layernorm_order 'post'
            (MindFormers' name for this block, which is really LN at the block input with the LN output as the
            residual), use_final_layernorm True.
    Precision: rotary_dtype ('float32') besides BaseConfig's, all 'float32' (the checkpoint is float16).
    Tokens: bos_token_id (130004, `<sop>`: the generated block starts there), eos_token_id (130005, `<eop>`),
        mask_token_id (130000, `[MASK]`), gmask_token_id (130001, `[gMASK]`), pad_token_id (3). bos/mask/gmask
        must be ids of the vocabulary: the model finds them in its input.
    Generation defaults: max_decode_length (2048), top_k (1). is_sample_acceleration (False) is accepted for
        MindFormers configs and has no effect (sampling always runs in `generate()`).
    Pipeline stages: the final LayerNorm and the head sit on the last one (offset shifts the layers' stages).
    Shared with every config (BaseConfig): run (parallel_config, checkpoint_name_or_path, offset), precision,
        initializer_range, ignore_token_id, generation defaults; use_flash_attention must stay False (no CPU kernel).
    Unknown keywords are refused (TypeError naming the closest fields)."""

    model_type: ClassVar[str] = 'glm'

    vocab_size: int = 130528
    hidden_size: int = 4096
    num_layers: int = 28
    num_heads: int = 32
    inner_hidden_size: int = 16384
    seq_length: int = 512
    hidden_size_per_attention_head: Optional[int] = None
    alpha: Optional[float] = None
    layernorm_order: str = 'post'
    layernorm_epsilon: float = 1e-05
    use_final_layernorm: bool = True
    activation_func: str = 'GELU'
    position_encoding_2d: bool = True
    embedding_dropout_prob: float = 0.0
    hidden_dropout_rate: float = 0.0
    attention_dropout_rate: float = 0.0
    rotary_dtype: str = 'float32'
    bos_token_id: int = 130004
    eos_token_id: int = 130005
    mask_token_id: int = 130000
    gmask_token_id: int = 130001
    pad_token_id: int = 3
    is_sample_acceleration: bool = False
    max_decode_length: int = 2048
    top_k: int = 1

    @property
    def head_size(self):
        return self.hidden_size_per_attention_head or self.hidden_size // self.num_heads

    @property
    def residual_alpha(self):
        """The residual scale the blocks use: `alpha`, or sqrt(2 * num_layers) when it is None."""
        return float(self.alpha) if self.alpha is not None else math.sqrt(2.0 * self.num_layers)

    @property
    def activation_name(self):
        """`activation_func` as `get_activation` names it."""
        return str(self.activation_func).lower()

    def validate(self):
        """Raise ValueError naming the first inconsistent or unsupported field."""
        owner = type(self).__name__
        self.check_positive_ints('vocab_size', 'hidden_size', 'num_layers', 'num_heads', 'inner_hidden_size',
                                 'seq_length')
        self.check_positive_ints('hidden_size_per_attention_head', optional=True)
        if self.hidden_size_per_attention_head is None and self.hidden_size % self.num_heads:
            raise ValueError(f"{owner}.hidden_size ({self.hidden_size}) must be divisible by num_heads "
                             f"({self.num_heads}) unless hidden_size_per_attention_head is given")
        if self.head_size % 4:
            raise ValueError(f"{owner}: the head size ({self.head_size}) must be divisible by 4 (the 2-D RoPE "
                             f"rotates pairs of lanes in each half of a head)")
        if self.alpha is not None and (isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float))
                                       or not self.alpha > 0):
            raise ValueError(f"{owner}.alpha must be a positive number or None (= sqrt(2 * num_layers)), got "
                             f"{self.alpha!r}")
        if self.layernorm_order != 'post':
            raise ValueError(f"{owner}.layernorm_order={self.layernorm_order!r} is not supported (ChatGLM-6B's "
                             f"block, which MindFormers calls 'post'); set layernorm_order: post")
        self.check_fixed({'position_encoding_2d': (True, 'ChatGLM-6B uses 2-D positions'),
                          'use_final_layernorm': (True, 'ChatGLM-6B ends with a LayerNorm'),
                          'use_flash_attention': (False, 'no flash-attention kernel on this backend')})
        self.check_probabilities('embedding_dropout_prob', 'hidden_dropout_rate', 'attention_dropout_rate')
        self.check_dtypes('param_init_type', 'compute_dtype', 'layernorm_compute_type', 'softmax_compute_type',
                          'rotary_dtype')
        try:
            get_activation(self.activation_name)
        except ValueError as err:
            raise ValueError(f"{owner}.activation_func: {err}") from None
        for name in ('bos_token_id', 'mask_token_id', 'gmask_token_id'):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < self.vocab_size:
                raise ValueError(f"{owner}.{name} must be a token id in [0, vocab_size={self.vocab_size}), got "
                                 f"{value!r}")
        self.check_model_parallel([('num_heads', self.num_heads), ('inner_hidden_size', self.inner_hidden_size)])
