"""LlamaConfig: the hyper-parameters of a LLaMA / LLaMA-2 model (MindFormers r1.0 field names)."""
from typing import ClassVar, Optional

from mindformers.models.decoder_spec import DecoderConfig, DecoderSpec
from mindformers.tools.register import MindFormerRegister, MindFormerModuleType

# the decoder switches with LLaMA's values, for `modeling_llama.decoder_option` (configs now carry all of them)
DECODER_DEFAULTS = {name: getattr(DecoderSpec, name) for name in ('norm_type', 'out_bias', 'mlp_bias', 'tied_head')}


def llama_ffn_size(hidden_size, multiple_of=256, ffn_dim_multiplier=None):
    """Meta's SwiGLU width: int(2 * 4h / 3), times `ffn_dim_multiplier` if given, rounded up to `multiple_of`
    (7B: 11008, 13B: 13824, 70B with 1.3 and 4096: 28672)."""
    size = int(2 * 4 * hidden_size / 3)
    if ffn_dim_multiplier is not None:
        size = int(ffn_dim_multiplier * size)
    return multiple_of * ((size + multiple_of - 1) // multiple_of)


@MindFormerRegister.register(MindFormerModuleType.CONFIG)
class LlamaConfig(DecoderConfig):
    """LLaMA / LLaMA-2 configuration.

    Architecture:
        vocab_size (32000), hidden_size (4096), num_layers (32), num_heads (32).
        n_kv_heads (None = num_heads): key/value heads; fewer gives grouped-query attention (LLaMA-2 70B: 8).
            num_heads must be a multiple of it.
        intermediate_size (None): SwiGLU width; None derives it from hidden_size, `multiple_of` (256) and
            `ffn_dim_multiplier` (None) as Meta does (see `llama_ffn_size`).
        rms_norm_eps (1e-5; LLaMA-1 used 1e-6), initializer_range (0.02).
        seq_length (2048): the longest input; training batches carry seq_length + 1 tokens.
        theta (10000.0): RoPE base. max_position_embedding (None = seq_length): positions RoPE is defined for.
        extend_method ('None' | 'PI' | 'NTK') with scaling_factor (1.0): position interpolation divides positions by
            scaling_factor; NTK raises the base to theta * scaling_factor ** (d / (d - 2)).
        qkv_has_bias (False), head_dim (None = hidden_size / num_heads), rotary_dim (None = head_dim: RoPE on the
            first rotary_dim lanes of each head), rotary_interleaved (False: HF's rotate-half pairs (i, i + d/2);
            True: Meta/GLM pairs (2i, 2i + 1)): settings other families built on this decoder use.
    The decoder's view: `decoder_spec()` (a DecoderSpec; its fields also read as properties: kv_heads, head_size,
        rotary_size, ffn_size, norm_eps, rope_theta, attention_bias) with LLaMA's fixed switches norm_type
        'rmsnorm', out_bias, mlp_bias and tied_head False (`tie_word_embeddings` from a HF config does not tie the
        head: our LLaMA then copies the embedding into its own lm_head).
    tie_word_embeddings (False): set from a HF config whose checkpoint stores no lm_head.weight (the head is the
        token embedding); loading such a checkpoint copies the embedding into lm_head.
    Precision: rotary_dtype ('float32') besides BaseConfig's, all 'float32' (MindFormers ships float16 for Ascend).
    Tokens: bos_token_id (1), eos_token_id (2), pad_token_id (0).
    Shared with every config (BaseConfig): run (parallel_config, checkpoint_name_or_path, offset), precision,
        initializer_range, ignore_token_id, generation defaults; use_flash_attention must stay False (no CPU kernel).
    Unknown keywords are refused (TypeError naming the closest fields)."""

    model_type: ClassVar[str] = 'llama'
    decoder_names: ClassVar[dict] = {'kv_heads': 'n_kv_heads', 'head_size': 'head_dim', 'rotary_size': 'rotary_dim',
                                     'ffn_size': 'intermediate_size', 'rope_theta': 'theta',
                                     'norm_eps': 'rms_norm_eps', 'attention_bias': 'qkv_has_bias'}

    seq_length: int = 2048
    hidden_size: int = 4096
    num_layers: int = 32
    num_heads: int = 32
    n_kv_heads: Optional[int] = None
    vocab_size: int = 32000
    multiple_of: int = 256
    ffn_dim_multiplier: Optional[float] = None
    intermediate_size: Optional[int] = None
    rms_norm_eps: float = 1e-5
    bos_token_id: int = 1
    eos_token_id: int = 2
    pad_token_id: int = 0
    theta: float = 10000.0
    max_position_embedding: Optional[int] = None
    extend_method: str = 'None'
    scaling_factor: float = 1.0
    qkv_has_bias: bool = False
    head_dim: Optional[int] = None
    rotary_dim: Optional[int] = None
    rotary_interleaved: bool = False
    rotary_dtype: str = 'float32'
    tie_word_embeddings: bool = False

    def decoder_spec(self):
        head_size = self.head_dim or self.hidden_size // self.num_heads
        return self.make_decoder_spec(
            vocab_size=self.vocab_size, hidden_size=self.hidden_size, num_layers=self.num_layers,
            num_heads=self.num_heads, kv_heads=self.n_kv_heads or self.num_heads, head_size=head_size,
            ffn_size=self.intermediate_size or llama_ffn_size(self.hidden_size, self.multiple_of,
                                                              self.ffn_dim_multiplier),
            rotary_size=self.rotary_dim or head_size, rotary_interleaved=self.rotary_interleaved,
            rope_theta=self.theta, extend_method=str(self.extend_method), scaling_factor=self.scaling_factor,
            norm_type='rmsnorm', norm_eps=self.rms_norm_eps, attention_bias=self.qkv_has_bias)

    def validate(self):
        """Raise ValueError naming the first inconsistent field."""
        self.check_positive_ints('seq_length', 'vocab_size', 'hidden_size', 'num_layers', 'num_heads', 'multiple_of')
        self.check_positive_ints('n_kv_heads', 'intermediate_size', 'head_dim', 'rotary_dim', 'max_position_embedding',
                                 optional=True)
        if self.head_dim is None and self.hidden_size % self.num_heads:
            raise ValueError(f"{type(self).__name__}.hidden_size ({self.hidden_size}) must be divisible by num_heads "
                             f"({self.num_heads})")
        spec = self.decoder_spec()
        self.check_dtypes('compute_dtype', 'layernorm_compute_type', 'softmax_compute_type', 'rotary_dtype',
                          'param_init_type')
        self.check_fixed({'use_flash_attention': (False, 'no flash-attention kernel on this backend')})
        self.check_model_parallel([('num_heads', spec.num_heads), ('n_kv_heads', spec.kv_heads),
                                   ('intermediate_size', spec.ffn_size)])
