"""PengChengMindConfig: the hyper-parameters of PengCheng.Mind 7B / mPengC.mind (PanGu-α / MindFormers field names)."""
from mindformers.models.base_config import BaseConfig
from mindformers.tools.register import MindFormerRegister, MindFormerModuleType


def pengcheng_ffn_size(hidden_size):
    """PengCheng.Mind's SwiGLU width: int(2 * 4h / 3 / 64) * 64 (10880 for hidden 4096)."""
    return int(2 * hidden_size * 4 / 3 / 64) * 64


@MindFormerRegister.register(MindFormerModuleType.CONFIG)
class PengChengMindConfig(BaseConfig):
    """PengCheng.Mind configuration. The model is PanGu-α's code base turned LLaMA-like: pre-LayerNorm blocks (γ, β),
    multi-head attention with q/k/v and output biases, RoPE over the whole head (rotate-half), SwiGLU with biases,
    final LayerNorm, output head tied to the word embedding; no learned positions, no query layer.

    Architecture:
        vocab_size (125952: the embedding rows, the tokenizer's 125696 pieces padded by 256), hidden_size (4096),
        num_layers (32), num_heads (32), ffn_hidden_size (None: int(2 * 4h / 3 / 64) * 64 = 10880).
        layernorm_epsilon (1e-5), rope_theta (10000.0), seq_length (4096).
        use_rope (True): fixed (the released model has no learned positions); False is refused.
    Precision: param_init_type, compute_dtype, layernorm_compute_type, softmax_compute_type, rotary_dtype
        ('float32' default here; the release is float16 with an fp16 softmax).
    Tokens: bos_token_id (1), eos_token_id (2, PengCheng's eod), pad_token_id (0, `<unk>`), ignore_token_id (-100).
    Generation defaults: batch_size (1), max_decode_length (512), top_k (1), top_p (1.0), do_sample (False),
        repetition_penalty (1.0), use_past (False).
    Run: parallel_config, checkpoint_name_or_path.
    Unknown keywords are refused (TypeError naming the closest fields)."""

    model_type = 'pengcheng_mind'

    def __init__(self, batch_size=1, seq_length=4096, vocab_size=125952, hidden_size=4096, ffn_hidden_size=None,
                 num_layers=32, num_heads=32, layernorm_epsilon=1e-5, rope_theta=10000.0, use_rope=True,
                 initializer_range=0.02, param_init_type='float32', compute_dtype='float32',
                 layernorm_compute_type='float32', softmax_compute_type='float32', rotary_dtype='float32',
                 bos_token_id=1, eos_token_id=2, pad_token_id=0, ignore_token_id=-100, use_past=False,
                 use_flash_attention=False, max_decode_length=512, top_k=1, top_p=1.0, do_sample=False,
                 repetition_penalty=1.0, parallel_config=None, checkpoint_name_or_path='', **kwargs):
        super().__init__(parallel_config=parallel_config, checkpoint_name_or_path=checkpoint_name_or_path, **kwargs)
        self.batch_size = batch_size
        self.seq_length = seq_length
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.ffn_hidden_size = ffn_hidden_size
        self.num_layers = num_layers
        self.num_heads = num_heads
        self.layernorm_epsilon = layernorm_epsilon
        self.rope_theta = rope_theta
        self.use_rope = use_rope
        self.initializer_range = initializer_range
        self.param_init_type = param_init_type
        self.compute_dtype = compute_dtype
        self.layernorm_compute_type = layernorm_compute_type
        self.softmax_compute_type = softmax_compute_type
        self.rotary_dtype = rotary_dtype
        self.bos_token_id = bos_token_id
        self.eos_token_id = eos_token_id
        self.pad_token_id = pad_token_id
        self.ignore_token_id = ignore_token_id
        self.use_past = use_past
        self.use_flash_attention = use_flash_attention
        self.max_decode_length = max_decode_length
        self.top_k = top_k
        self.top_p = top_p
        self.do_sample = do_sample
        self.repetition_penalty = repetition_penalty
        self.validate()

    # the decoder's view (see LlamaConfig); rope_theta is a field of the same name
    kv_heads = property(lambda self: self.num_heads)
    head_size = property(lambda self: self.hidden_size // self.num_heads)
    rotary_size = property(lambda self: self.hidden_size // self.num_heads)
    ffn_size = property(lambda self: self.ffn_hidden_size or pengcheng_ffn_size(self.hidden_size))
    norm_eps = property(lambda self: self.layernorm_epsilon)
    rotary_interleaved, extend_method, scaling_factor = False, 'None', 1.0
    attention_bias, out_bias, mlp_bias = True, True, True
    norm_type, tied_head = 'layernorm', True

    def validate(self):
        """Raise ValueError naming the first inconsistent or unsupported field."""
        owner = type(self).__name__
        self.check_positive_ints('seq_length', 'vocab_size', 'hidden_size', 'num_layers', 'num_heads')
        self.check_positive_ints('ffn_hidden_size', optional=True)
        if self.hidden_size % self.num_heads or (self.hidden_size // self.num_heads) % 2:
            raise ValueError(f"{owner}.hidden_size ({self.hidden_size}) must be num_heads ({self.num_heads}) times "
                             f"an even head size (RoPE rotates pairs)")
        if not isinstance(self.rope_theta, (int, float)) or isinstance(self.rope_theta, bool) or self.rope_theta <= 0:
            raise ValueError(f"{owner}.rope_theta must be a positive number, got {self.rope_theta!r}")
        self.check_fixed({'use_rope': (True, 'PengCheng.Mind uses True'),
                          'use_flash_attention': (False, 'PengCheng.Mind uses False')})
        self.check_dtypes('compute_dtype', 'layernorm_compute_type', 'softmax_compute_type', 'rotary_dtype',
                          'param_init_type')
        self.check_model_parallel([('num_heads', self.num_heads), ('ffn_hidden_size', self.ffn_size)])
