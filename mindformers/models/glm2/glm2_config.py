"""ChatGLM2Config: the hyper-parameters of ChatGLM2-6B (MindFormers r1.0 / THUDM field names)."""
from typing import ClassVar

from mindformers.models.decoder_spec import DecoderConfig
from mindformers.tools.register import MindFormerRegister, MindFormerModuleType


@MindFormerRegister.register(MindFormerModuleType.CONFIG)
class ChatGLM2Config(DecoderConfig):
    """ChatGLM2 configuration. The model is a pre-RMSNorm decoder: grouped-query attention with q/k/v biases and no
    output bias, RoPE on the first half of each head in interleaved pairs, SwiGLU without biases, untied head.

    Architecture:
        padded_vocab_size (65024), hidden_size (4096), num_layers (28), num_attention_heads (32),
        kv_channels (128): head size; multi_query_attention (True) with multi_query_group_num (2) key/value heads
            (False: as many as query heads); ffn_hidden_size (13696): SwiGLU width.
        layernorm_epsilon (1e-5), rope_ratio (1.0: RoPE base 10000 * rope_ratio), seq_length (2048),
        initializer_range (0.02).
        add_qkv_bias (True). Fixed by the published model and refused otherwise: rmsnorm True, add_bias_linear
            False, apply_residual_connection_post_layernorm False, post_layer_norm True.
    The decoder's view: `decoder_spec()` (a DecoderSpec; its fields also read as properties): vocab_size =
        padded_vocab_size, num_heads = num_attention_heads, kv_heads, head_size = kv_channels, rotary_size =
        kv_channels / 2, rotary_interleaved True, ffn_size = ffn_hidden_size, norm_eps = layernorm_epsilon,
        rope_theta = 10000 * rope_ratio, attention_bias = add_qkv_bias.
    Precision: rotary_dtype ('float32') besides BaseConfig's, all 'float32' (the checkpoint is float16).
    Tokens: bos_token_id (1), eos_token_id (2), pad_token_id (0).
    Generation defaults: max_decode_length (256), top_k (1).
    Shared with every config (BaseConfig): run (parallel_config, checkpoint_name_or_path, offset), precision,
        initializer_range, ignore_token_id, generation defaults; use_flash_attention must stay False (no CPU kernel).
    Unknown keywords are refused (TypeError naming the closest fields)."""

    model_type: ClassVar[str] = 'chatglm2'
    decoder_names: ClassVar[dict] = {'vocab_size': 'padded_vocab_size', 'num_heads': 'num_attention_heads',
                                     'kv_heads': 'multi_query_group_num', 'head_size': 'kv_channels',
                                     'ffn_size': 'ffn_hidden_size', 'norm_eps': 'layernorm_epsilon',
                                     'rope_theta': '10000 * rope_ratio', 'attention_bias': 'add_qkv_bias'}

    num_layers: int = 28
    padded_vocab_size: int = 65024
    hidden_size: int = 4096
    ffn_hidden_size: int = 13696
    kv_channels: int = 128
    num_attention_heads: int = 32
    seq_length: int = 2048
    layernorm_epsilon: float = 1e-5
    rope_ratio: float = 1.0
    rmsnorm: bool = True
    apply_residual_connection_post_layernorm: bool = False
    post_layer_norm: bool = True
    add_bias_linear: bool = False
    add_qkv_bias: bool = True
    multi_query_attention: bool = True
    multi_query_group_num: int = 2
    rotary_dtype: str = 'float32'
    bos_token_id: int = 1
    eos_token_id: int = 2
    pad_token_id: int = 0
    max_decode_length: int = 256
    top_k: int = 1

    def decoder_spec(self):
        heads = self.num_attention_heads
        return self.make_decoder_spec(
            vocab_size=self.padded_vocab_size, hidden_size=self.hidden_size, num_layers=self.num_layers,
            num_heads=heads, kv_heads=self.multi_query_group_num if self.multi_query_attention else heads,
            head_size=self.kv_channels, ffn_size=self.ffn_hidden_size, rotary_size=self.kv_channels // 2,
            rotary_interleaved=True, rope_theta=10000.0 * self.rope_ratio,
            norm_type='rmsnorm' if self.rmsnorm else 'layernorm', norm_eps=self.layernorm_epsilon,
            attention_bias=self.add_qkv_bias, out_bias=self.add_bias_linear, mlp_bias=self.add_bias_linear)

    def validate(self):
        """Raise ValueError naming the first inconsistent or unsupported field."""
        self.check_positive_ints('seq_length', 'padded_vocab_size', 'hidden_size', 'num_layers', 'num_attention_heads',
                                 'kv_channels', 'ffn_hidden_size', 'multi_query_group_num')
        if self.kv_channels % 4:
            raise ValueError(f"{type(self).__name__}.kv_channels ({self.kv_channels}) must be a multiple of 4 (RoPE "
                             f"covers half of it in pairs)")
        fixed = {'rmsnorm': True, 'add_bias_linear': False, 'apply_residual_connection_post_layernorm': False,
                 'post_layer_norm': True, 'use_flash_attention': False}
        self.check_fixed({name: (value, f'ChatGLM2 uses {value}') for name, value in fixed.items()})
        spec = self.decoder_spec()
        self.check_dtypes('compute_dtype', 'layernorm_compute_type', 'softmax_compute_type', 'rotary_dtype',
                          'param_init_type')
        self.check_model_parallel([('num_attention_heads', spec.num_heads), ('multi_query_group_num', spec.kv_heads),
                                   ('ffn_hidden_size', spec.ffn_size)])
