"""PanguAlphaConfig: the hyper-parameters of a PanGu-alpha model (MindFormers r1.0 field names)."""
from typing import ClassVar, Optional

from mindformers.models.base_config import BaseConfig
from mindformers.modules.layers import get_activation
from mindformers.tools.register import MindFormerRegister, MindFormerModuleType


@MindFormerRegister.register(MindFormerModuleType.CONFIG)
class PanguAlphaConfig(BaseConfig):
    """PanGu-alpha configuration.

    Architecture:
        vocab_size (40000): rows of the word embedding (and of the tied output head).
        hidden_size (2560), num_heads (32): width and attention heads; hidden_size must be divisible by num_heads.
        num_layers (32): transformer layers INCLUDING the final query layer, so num_layers - 1 ordinary pre-LN blocks
            are built, then the final LayerNorm, then the query layer (at least 2).
        ffn_hidden_size (None): feed-forward width; None means expand_ratio * hidden_size.
        expand_ratio (4): used when ffn_hidden_size is None.
        seq_length (1024): the longest input the model accepts, and the rows of the learned position and top-query
            embeddings. Training batches carry seq_length + 1 tokens (inputs and shifted targets).
        hidden_act ('fast_gelu'): feed-forward activation; 'fast_gelu' is x * sigmoid(1.702 x) (= HF 'quick_gelu').
        layernorm_epsilon (1e-5), initializer_range (0.02): LayerNorm epsilon and init std.
        embedding_dropout_prob, hidden_dropout_rate, attention_dropout_rate (0.1 each): dropout after the
            embeddings, on each residual branch, and on the attention probabilities.
        post_layernorm_residual (False), offset (0), use_moe (False), eod_reset (False): MindFormers fields; only
            the pre-LN dense model without EOD-reset masks is built.
    Precision: all 'float32' (MindFormers uses float16 on Ascend, softmax included).
    Tokens: eos_token_id (9, `<eot>`: where generation stops), pad_token_id (6, `<eod>`), eod_token_id (6),
        bos_token_id (9): targets equal to ignore_token_id, and to pad_token_id (it differs from eos_token_id), are
        left out of the loss.
    Generation defaults: max_decode_length (1024).
    Shared with every config (BaseConfig): run (parallel_config, checkpoint_name_or_path, offset), precision,
        initializer_range, ignore_token_id, generation defaults; use_flash_attention must stay False (no CPU kernel).
    Unknown keywords are refused (TypeError naming the closest fields)."""

    model_type: ClassVar[str] = 'pangualpha'

    seq_length: int = 1024
    vocab_size: int = 40000
    hidden_size: int = 2560
    num_layers: int = 32
    num_heads: int = 32
    ffn_hidden_size: Optional[int] = None
    expand_ratio: int = 4
    embedding_dropout_prob: float = 0.1
    hidden_dropout_rate: float = 0.1
    attention_dropout_rate: float = 0.1
    hidden_act: str = 'fast_gelu'
    layernorm_epsilon: float = 1e-05
    eos_token_id: int = 9
    pad_token_id: int = 6
    eod_token_id: int = 6
    bos_token_id: int = 9
    post_layernorm_residual: bool = False
    use_moe: bool = False
    eod_reset: bool = False
    max_decode_length: int = 1024

    @property
    def ffn_size(self):
        """The feed-forward width: ffn_hidden_size, or expand_ratio * hidden_size."""
        return self.ffn_hidden_size or self.expand_ratio * self.hidden_size

    def validate(self):
        """Raise ValueError naming the first inconsistent field."""
        self.check_positive_ints('seq_length', 'vocab_size', 'hidden_size', 'num_layers', 'num_heads', 'expand_ratio')
        self.check_positive_ints('ffn_hidden_size', optional=True)
        if self.num_layers < 2:
            raise ValueError(f"PanguAlphaConfig.num_layers ({self.num_layers}) must be at least 2: it counts the "
                             f"blocks and the final query layer")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"PanguAlphaConfig.hidden_size ({self.hidden_size}) must be divisible by num_heads "
                             f"({self.num_heads})")
        self.check_probabilities('embedding_dropout_prob', 'hidden_dropout_rate', 'attention_dropout_rate')
        self.check_dtypes('compute_dtype', 'layernorm_compute_type', 'softmax_compute_type', 'param_init_type')
        try:
            get_activation(self.hidden_act)
        except ValueError as err:
            raise ValueError(f"PanguAlphaConfig.hidden_act: {err}") from None
        self.check_fixed({'post_layernorm_residual': (False, 'PanGu-alpha is pre-LayerNorm'),
                          'use_moe': (False, 'only the dense model is built'),
                          'eod_reset': (False, 'EOD-reset attention masks are not built'),
                          'use_flash_attention': (False, 'no flash-attention kernel on this backend')})
        self.check_model_parallel([('num_heads', self.num_heads), ('hidden_size', self.hidden_size)])
