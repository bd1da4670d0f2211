"""GPT2Config: the hyper-parameters of a GPT-2 model (MindFormers r1.0 field names)."""
from typing import ClassVar

from mindformers.models.base_config import BaseConfig
from mindformers.modules.layers import get_activation
from mindformers.tools.register import MindFormerRegister, MindFormerModuleType


@MindFormerRegister.register(MindFormerModuleType.CONFIG)
class GPT2Config(BaseConfig):
    """GPT-2 configuration.

    Architecture:
        vocab_size (50257): rows of the token embedding (and of the tied output head).
        hidden_size (768), num_layers (12), num_heads (12): width, depth and attention heads;
            hidden_size must be divisible by num_heads.
        expand_ratio (4): feed-forward width = expand_ratio * hidden_size.
        seq_length (1024): the longest input the model accepts, and the number of learned positions.
            Training batches carry seq_length + 1 tokens (inputs and shifted targets).
        hidden_act ('gelu'): feed-forward activation; 'gelu' is the tanh approximation (= HF 'gelu_new').
        layernorm_epsilon (1e-5), initializer_range (0.02): LayerNorm epsilon and init std.
        embedding_dropout_prob, hidden_dropout_rate, attention_dropout_rate (0.1 each): dropout after the
            embeddings, on each residual branch, and on the attention probabilities.
        post_layernorm_residual (False), offset (0), num_labels (2): MindFormers fields; only pre-LN is built.
    Precision: all 'float32' (MindFormers defaults compute_dtype to float16 for Ascend).
    Tokens: eos_token_id, pad_token_id, bos_token_id, unk_token_id (50256 each): targets equal to ignore_token_id,
        and to pad_token_id when it differs from eos_token_id, are left out of the loss.
    Generation defaults: max_decode_length (1024).
    Shared with every config (BaseConfig): run (parallel_config, checkpoint_name_or_path, offset), precision,
        initializer_range, ignore_token_id, generation defaults; use_flash_attention must stay False (no CPU kernel).
    Unknown keywords are refused (TypeError naming the closest fields)."""

    model_type: ClassVar[str] = 'gpt2'

    seq_length: int = 1024
    vocab_size: int = 50257
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    expand_ratio: int = 4
    embedding_dropout_prob: float = 0.1
    hidden_dropout_rate: float = 0.1
    attention_dropout_rate: float = 0.1
    hidden_act: str = 'gelu'
    layernorm_epsilon: float = 1e-05
    eos_token_id: int = 50256
    pad_token_id: int = 50256
    bos_token_id: int = 50256
    unk_token_id: int = 50256
    post_layernorm_residual: bool = False
    num_labels: int = 2
    max_decode_length: int = 1024

    def validate(self):
        """Raise ValueError naming the first inconsistent field."""
        self.check_positive_ints('seq_length', 'vocab_size', 'hidden_size', 'num_layers', 'num_heads', 'expand_ratio')
        if self.hidden_size % self.num_heads:
            raise ValueError(f"GPT2Config.hidden_size ({self.hidden_size}) must be divisible by num_heads "
                             f"({self.num_heads})")
        self.check_probabilities('embedding_dropout_prob', 'hidden_dropout_rate', 'attention_dropout_rate')
        self.check_dtypes('compute_dtype', 'layernorm_compute_type', 'softmax_compute_type', 'param_init_type')
        try:
            get_activation(self.hidden_act)
        except ValueError as err:
            raise ValueError(f"GPT2Config.hidden_act: {err}") from None
        self.check_fixed({'post_layernorm_residual': (False, 'GPT-2 is pre-LayerNorm'),
                          'use_flash_attention': (False, 'no flash-attention kernel on this backend')})
        self.check_model_parallel([('num_heads', self.num_heads), ('hidden_size', self.hidden_size)])
