"""PengChengMindConfig: the hyper-parameters of PengCheng.Mind 7B / mPengC.mind (PanGu-α / MindFormers field names)."""
from typing import ClassVar, Optional

from mindformers.models.decoder_spec import DecoderConfig
from mindformers.tools.register import MindFormerRegister, MindFormerModuleType


def pengcheng_ffn_size(hidden_size):
    """PengCheng.Mind's SwiGLU width: int(2 * 4h / 3 / 64) * 64 (10880 for hidden 4096)."""
    return int(2 * hidden_size * 4 / 3 / 64) * 64


@MindFormerRegister.register(MindFormerModuleType.CONFIG)
class PengChengMindConfig(DecoderConfig):
    """PengCheng.Mind configuration. The model is PanGu-α's code base turned LLaMA-like: pre-LayerNorm blocks (γ, β),
    multi-head attention with q/k/v and output biases, RoPE over the whole head (rotate-half), SwiGLU with biases,
    final LayerNorm, output head tied to the word embedding; no learned positions, no query layer.

    Architecture:
        vocab_size (125952: the embedding rows, the tokenizer's 125696 pieces padded by 256), hidden_size (4096),
        num_layers (32), num_heads (32), ffn_hidden_size (None: int(2 * 4h / 3 / 64) * 64 = 10880).
        layernorm_epsilon (1e-5), rope_theta (10000.0), seq_length (4096), initializer_range (0.02).
        use_rope (True): fixed (the released model has no learned positions); False is refused.
    The decoder's view: `decoder_spec()` (a DecoderSpec; its fields also read as properties): kv_heads = num_heads,
        head_size = rotary_size = hidden_size / num_heads, ffn_size, norm_eps = layernorm_epsilon, norm_type
        'layernorm', attention_bias, out_bias, mlp_bias and tied_head True.
    Precision: rotary_dtype ('float32') besides BaseConfig's, all 'float32' (the release is float16 with an fp16
        softmax).
    Tokens: bos_token_id (1), eos_token_id (2, PengCheng's eod), pad_token_id (0, `<unk>`).
    Generation defaults: top_k (1).
    Shared with every config (BaseConfig): run (parallel_config, checkpoint_name_or_path, offset), precision,
        initializer_range, ignore_token_id, generation defaults; use_flash_attention must stay False (no CPU kernel).
    Unknown keywords are refused (TypeError naming the closest fields)."""

    model_type: ClassVar[str] = 'pengcheng_mind'
    decoder_names: ClassVar[dict] = {'ffn_size': 'ffn_hidden_size', 'norm_eps': 'layernorm_epsilon'}

    seq_length: int = 4096
    vocab_size: int = 125952
    hidden_size: int = 4096
    ffn_hidden_size: Optional[int] = None
    num_layers: int = 32
    num_heads: int = 32
    layernorm_epsilon: float = 1e-5
    rope_theta: float = 10000.0
    use_rope: bool = True
    rotary_dtype: str = 'float32'
    bos_token_id: int = 1
    eos_token_id: int = 2
    pad_token_id: int = 0
    top_k: int = 1

    def decoder_spec(self):
        head_size = self.hidden_size // self.num_heads
        return self.make_decoder_spec(
            vocab_size=self.vocab_size, hidden_size=self.hidden_size, num_layers=self.num_layers,
            num_heads=self.num_heads, kv_heads=self.num_heads, head_size=head_size,
            ffn_size=self.ffn_hidden_size or pengcheng_ffn_size(self.hidden_size), rotary_size=head_size,
            rope_theta=self.rope_theta, norm_type='layernorm', norm_eps=self.layernorm_epsilon, attention_bias=True,
            out_bias=True, mlp_bias=True, tied_head=True)

    def validate(self):
        """Raise ValueError naming the first inconsistent or unsupported field."""
        owner = type(self).__name__
        self.check_positive_ints('seq_length', 'vocab_size', 'hidden_size', 'num_layers', 'num_heads')
        self.check_positive_ints('ffn_hidden_size', optional=True)
        if self.hidden_size % self.num_heads or (self.hidden_size // self.num_heads) % 2:
            raise ValueError(f"{owner}.hidden_size ({self.hidden_size}) must be num_heads ({self.num_heads}) times "
                             f"an even head size (RoPE rotates pairs)")
        self.check_fixed({'use_rope': (True, 'PengCheng.Mind uses True'),
                          'use_flash_attention': (False, 'PengCheng.Mind uses False')})
        spec = self.decoder_spec()
        self.check_dtypes('compute_dtype', 'layernorm_compute_type', 'softmax_compute_type', 'rotary_dtype',
                          'param_init_type')
        self.check_model_parallel([('num_heads', spec.num_heads), ('ffn_hidden_size', spec.ffn_size)])
