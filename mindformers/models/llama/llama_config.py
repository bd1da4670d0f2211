"""LlamaConfig: the hyper-parameters of a LLaMA / LLaMA-2 model (MindFormers r1.0 field names)."""
from mindformers.models.base_config import BaseConfig
from mindformers.tools.register import MindFormerRegister, MindFormerModuleType

EXTEND_METHODS = ('None', 'PI', 'NTK')
# decoder switches with LLaMA's values; a config without one of these attributes (ChatGLM2Config) gets these
DECODER_DEFAULTS = {'norm_type': 'rmsnorm', 'out_bias': False, 'mlp_bias': False, 'tied_head': False}


def llama_ffn_size(hidden_size, multiple_of=256, ffn_dim_multiplier=None):
    """Meta's SwiGLU width: int(2 * 4h / 3), times `ffn_dim_multiplier` if given, rounded up to `multiple_of`
    (7B: 11008, 13B: 13824, 70B with 1.3 and 4096: 28672)."""
    size = int(2 * 4 * hidden_size / 3)
    if ffn_dim_multiplier is not None:
        size = int(ffn_dim_multiplier * size)
    return multiple_of * ((size + multiple_of - 1) // multiple_of)



@MindFormerRegister.register(MindFormerModuleType.CONFIG)
class LlamaConfig(BaseConfig):
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
    Decoder switches LLaMA keeps fixed (class attributes other families' configs override): norm_type 'rmsnorm'
        ('layernorm': LayerNorm with bias), out_bias False (o_proj bias), mlp_bias False (SwiGLU biases), tied_head
        False (True: logits against the token embedding, no lm_head; `tie_word_embeddings` from a HF config does
        not set it: our LLaMA then copies the embedding into its own lm_head).
    tie_word_embeddings (False): set from a HF config whose checkpoint stores no lm_head.weight (the head is the
        token embedding); loading such a checkpoint copies the embedding into lm_head.
    Precision ('float32' | 'float16' | 'bfloat16'): param_init_type, compute_dtype, layernorm_compute_type,
        softmax_compute_type, rotary_dtype (all 'float32' by default; MindFormers ships float16 for Ascend).
    Tokens: bos_token_id (1), eos_token_id (2), pad_token_id (0), ignore_token_id (-100).
    Generation defaults: batch_size (1), max_decode_length (512), top_k (5), top_p (1.0), do_sample (False),
        repetition_penalty (1.0), use_past (False).
    Run: parallel_config, checkpoint_name_or_path. use_flash_attention must stay False (no CPU kernel).
    Unknown keywords are refused (TypeError naming the closest fields)."""

    model_type = 'llama'

    def __init__(self, batch_size=1, seq_length=2048, hidden_size=4096, num_layers=32, num_heads=32, n_kv_heads=None,
                 vocab_size=32000, multiple_of=256, ffn_dim_multiplier=None, intermediate_size=None,
                 rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, pad_token_id=0, ignore_token_id=-100,
                 theta=10000.0, max_position_embedding=None, extend_method='None', scaling_factor=1.0,
                 qkv_has_bias=False, head_dim=None, rotary_dim=None, rotary_interleaved=False,
                 initializer_range=0.02, compute_dtype='float32', layernorm_compute_type='float32',
                 softmax_compute_type='float32', rotary_dtype='float32', param_init_type='float32',
                 use_past=False, use_flash_attention=False, offset=0, max_decode_length=512, top_k=5, top_p=1.0,
                 do_sample=False, repetition_penalty=1.0, tie_word_embeddings=False, parallel_config=None,
                 checkpoint_name_or_path='', **kwargs):
        super().__init__(parallel_config=parallel_config, checkpoint_name_or_path=checkpoint_name_or_path, **kwargs)
        self.batch_size = batch_size
        self.seq_length = seq_length
        self.hidden_size = hidden_size
        self.num_layers = num_layers
        self.num_heads = num_heads
        self.n_kv_heads = n_kv_heads
        self.vocab_size = vocab_size
        self.multiple_of = multiple_of
        self.ffn_dim_multiplier = ffn_dim_multiplier
        self.intermediate_size = intermediate_size
        self.rms_norm_eps = rms_norm_eps
        self.bos_token_id = bos_token_id
        self.eos_token_id = eos_token_id
        self.pad_token_id = pad_token_id
        self.ignore_token_id = ignore_token_id
        self.theta = theta
        self.max_position_embedding = max_position_embedding
        self.extend_method = extend_method
        self.scaling_factor = scaling_factor
        self.qkv_has_bias = qkv_has_bias
        self.head_dim = head_dim
        self.rotary_dim = rotary_dim
        self.rotary_interleaved = rotary_interleaved
        self.initializer_range = initializer_range
        self.compute_dtype = compute_dtype
        self.layernorm_compute_type = layernorm_compute_type
        self.softmax_compute_type = softmax_compute_type
        self.rotary_dtype = rotary_dtype
        self.param_init_type = param_init_type
        self.use_past = use_past
        self.use_flash_attention = use_flash_attention
        self.offset = offset
        self.max_decode_length = max_decode_length
        self.top_k = top_k
        self.top_p = top_p
        self.do_sample = do_sample
        self.repetition_penalty = repetition_penalty
        self.tie_word_embeddings = tie_word_embeddings
        self.validate()

    # derived sizes the decoder reads (families with other field names provide the same properties)
    @property
    def kv_heads(self):
        return self.n_kv_heads or self.num_heads

    @property
    def head_size(self):
        return self.head_dim or self.hidden_size // self.num_heads

    @property
    def rotary_size(self):
        return self.rotary_dim or self.head_size

    @property
    def ffn_size(self):
        return self.intermediate_size or llama_ffn_size(self.hidden_size, self.multiple_of, self.ffn_dim_multiplier)

    @property
    def norm_eps(self):
        return self.rms_norm_eps

    @property
    def rope_theta(self):
        return self.theta

    @property
    def attention_bias(self):
        return self.qkv_has_bias

    norm_type, out_bias, mlp_bias, tied_head = (DECODER_DEFAULTS[key] for key in
                                                ('norm_type', 'out_bias', 'mlp_bias', 'tied_head'))

    def validate(self):
        """Raise ValueError naming the first inconsistent field."""
        owner = type(self).__name__
        self.check_positive_ints('seq_length', 'vocab_size', 'hidden_size', 'num_layers', 'num_heads', 'multiple_of')
        self.check_positive_ints('n_kv_heads', 'intermediate_size', 'head_dim', 'rotary_dim', 'max_position_embedding',
                                 optional=True)
        if self.head_dim is None and self.hidden_size % self.num_heads:
            raise ValueError(f"{owner}.hidden_size ({self.hidden_size}) must be divisible by num_heads "
                             f"({self.num_heads})")
        if self.num_heads % self.kv_heads:
            raise ValueError(f"{owner}: num_heads ({self.num_heads}) must be a multiple of n_kv_heads "
                             f"({self.kv_heads})")
        if self.rotary_size > self.head_size or self.rotary_size % 2:
            raise ValueError(f"{owner}.rotary_dim ({self.rotary_size}) must be even and at most the head size "
                             f"({self.head_size})")
        if str(self.extend_method) not in EXTEND_METHODS:
            raise ValueError(f"{owner}.extend_method must be one of {', '.join(EXTEND_METHODS)}, got "
                             f"{self.extend_method!r}")
        if not isinstance(self.scaling_factor, (int, float)) or self.scaling_factor <= 0:
            raise ValueError(f"{owner}.scaling_factor must be a positive number, got {self.scaling_factor!r}")
        self.check_dtypes('compute_dtype', 'layernorm_compute_type', 'softmax_compute_type', 'rotary_dtype',
                          'param_init_type')
        self.check_fixed({'use_flash_attention': (False, 'no flash-attention kernel on this backend')})
        self.check_model_parallel([('num_heads', self.num_heads), ('n_kv_heads', self.kv_heads),
                                   ('intermediate_size', self.ffn_size)])
