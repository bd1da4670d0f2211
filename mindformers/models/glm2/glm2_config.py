"""ChatGLM2Config: the hyper-parameters of ChatGLM2-6B (MindFormers r1.0 / THUDM field names)."""
from mindformers.models.base_config import BaseConfig
from mindformers.tools.register import MindFormerRegister, MindFormerModuleType


@MindFormerRegister.register(MindFormerModuleType.CONFIG)
class ChatGLM2Config(BaseConfig):
    """ChatGLM2 configuration. The model is a pre-RMSNorm decoder: grouped-query attention with q/k/v biases and no
    output bias, RoPE on the first half of each head in interleaved pairs, SwiGLU without biases, untied head.

    Architecture:
        padded_vocab_size (65024), hidden_size (4096), num_layers (28), num_attention_heads (32),
        kv_channels (128): head size; multi_query_attention (True) with multi_query_group_num (2) key/value heads
            (False: as many as query heads); ffn_hidden_size (13696): SwiGLU width.
        layernorm_epsilon (1e-5), rope_ratio (1.0: RoPE base 10000 * rope_ratio), seq_length (2048).
        add_qkv_bias (True). Fixed by the published model and refused otherwise: rmsnorm True, add_bias_linear
            False, apply_residual_connection_post_layernorm False, post_layer_norm True.
    Precision: param_init_type, compute_dtype, layernorm_compute_type, softmax_compute_type, rotary_dtype
        ('float32' default here; the checkpoint is float16).
    Tokens: bos_token_id (1), eos_token_id (2), pad_token_id (0), ignore_token_id (-100).
    Generation defaults: batch_size (1), max_decode_length (256), top_k (1), top_p (1.0), do_sample (False),
        repetition_penalty (1.0), use_past (False).
    Run: parallel_config, checkpoint_name_or_path.
    Unknown keywords are refused (TypeError naming the closest fields)."""

    model_type = 'chatglm2'

    def __init__(self, batch_size=1, num_layers=28, padded_vocab_size=65024, hidden_size=4096, ffn_hidden_size=13696,
                 kv_channels=128, num_attention_heads=32, seq_length=2048, layernorm_epsilon=1e-5, rope_ratio=1.0,
                 rmsnorm=True, apply_residual_connection_post_layernorm=False, post_layer_norm=True,
                 add_bias_linear=False, add_qkv_bias=True, multi_query_attention=True, multi_query_group_num=2,
                 initializer_range=0.02, param_init_type='float32', compute_dtype='float32',
                 layernorm_compute_type='float32', softmax_compute_type='float32', rotary_dtype='float32',
                 bos_token_id=1, eos_token_id=2, pad_token_id=0, ignore_token_id=-100, use_past=False,
                 use_flash_attention=False, max_decode_length=256, top_k=1, top_p=1.0, do_sample=False,
                 repetition_penalty=1.0, parallel_config=None, checkpoint_name_or_path='', **kwargs):
        super().__init__(parallel_config=parallel_config, checkpoint_name_or_path=checkpoint_name_or_path, **kwargs)
        self.batch_size = batch_size
        self.num_layers = num_layers
        self.padded_vocab_size = padded_vocab_size
        self.hidden_size = hidden_size
        self.ffn_hidden_size = ffn_hidden_size
        self.kv_channels = kv_channels
        self.num_attention_heads = num_attention_heads
        self.seq_length = seq_length
        self.layernorm_epsilon = layernorm_epsilon
        self.rope_ratio = rope_ratio
        self.rmsnorm = rmsnorm
        self.apply_residual_connection_post_layernorm = apply_residual_connection_post_layernorm
        self.post_layer_norm = post_layer_norm
        self.add_bias_linear = add_bias_linear
        self.add_qkv_bias = add_qkv_bias
        self.multi_query_attention = multi_query_attention
        self.multi_query_group_num = multi_query_group_num
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

    # the decoder's view (see LlamaConfig)
    vocab_size = property(lambda self: self.padded_vocab_size)
    num_heads = property(lambda self: self.num_attention_heads)
    kv_heads = property(lambda self: self.multi_query_group_num if self.multi_query_attention
                        else self.num_attention_heads)
    head_size = property(lambda self: self.kv_channels)
    rotary_size = property(lambda self: self.kv_channels // 2)
    rotary_interleaved = True
    ffn_size = property(lambda self: self.ffn_hidden_size)
    norm_eps = property(lambda self: self.layernorm_epsilon)
    rope_theta = property(lambda self: 10000.0 * self.rope_ratio)
    attention_bias = property(lambda self: self.add_qkv_bias)
    extend_method, scaling_factor = 'None', 1.0

    def validate(self):
        """Raise ValueError naming the first inconsistent or unsupported field."""
        owner = type(self).__name__
        self.check_positive_ints('seq_length', 'padded_vocab_size', 'hidden_size', 'num_layers', 'num_attention_heads',
                                 'kv_channels', 'ffn_hidden_size', 'multi_query_group_num')
        if self.num_heads % self.kv_heads:
            raise ValueError(f"{owner}: num_attention_heads ({self.num_heads}) must be a multiple of "
                             f"multi_query_group_num ({self.kv_heads})")
        if self.kv_channels % 4:
            raise ValueError(f"{owner}.kv_channels ({self.kv_channels}) must be a multiple of 4 (RoPE covers half "
                             f"of it in pairs)")
        fixed = {'rmsnorm': True, 'add_bias_linear': False, 'apply_residual_connection_post_layernorm': False,
                 'post_layer_norm': True, 'use_flash_attention': False}
        self.check_fixed({name: (value, f'ChatGLM2 uses {value}') for name, value in fixed.items()})
        self.check_dtypes('compute_dtype', 'layernorm_compute_type', 'softmax_compute_type', 'rotary_dtype',
                          'param_init_type')
        self.check_model_parallel([('num_attention_heads', self.num_heads), ('multi_query_group_num', self.kv_heads),
                                   ('ffn_hidden_size', self.ffn_hidden_size)])
