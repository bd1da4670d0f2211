"""LLaMA / LLaMA-2: pre-RMSNorm blocks of rotary grouped-query attention and a SwiGLU MLP, untied LM head.

The decoder reads its sizes through the properties `LlamaConfig` defines (kv_heads, head_size, rotary_size,
rotary_interleaved, ffn_size, norm_eps, rope_theta, attention_bias; and, with LLaMA's values as defaults, norm_type
'rmsnorm' | 'layernorm', out_bias on o_proj, mlp_bias on the SwiGLU projections, tied_head: logits from the token
embedding table, no `lm_head.weight`), so other families with this topology and their own config names (ChatGLM2,
PengCheng.Mind) build on it. Parameter names match HF `LlamaForCausalLM`."""
import mindspore as ms
from mindspore import nn, ops

from mindformers.models.base_model import CausalLMModel
from mindformers.models.llama.llama_config import DECODER_DEFAULTS, LlamaConfig
from mindformers.modules import CausalMask, Embedding, GatedMLP, GroupedQueryAttention
from mindformers.modules.attention import fused_causal_attention
from mindformers.modules.kv_cache import IncrementalCore
from mindformers.modules.layers import TiedLMHead, _dp_mp, output_head, place_last, place_layers, to_mstype
from mindformers.modules.norm import build_norm
from mindformers.modules.rotary import RotaryEmbedding
from mindformers.tools.register import MindFormerRegister, MindFormerModuleType


def decoder_option(config, name):
    """A decoder switch of `config` (norm_type, out_bias, mlp_bias, tied_head), LLaMA's value when it has none."""
    return getattr(config, name, DECODER_DEFAULTS[name])


class LlamaDecoderLayer(nn.Cell):
    """x + self_attn(norm(x)), then + mlp(norm(.)) (norm: RMSNorm, or LayerNorm by `config.norm_type`): x [B, S, H],
    mask and rotary tables as for `GroupedQueryAttention` -> [B, S, H]."""

    def __init__(self, config, rotary):
        super().__init__()
        hidden, parallel = config.hidden_size, config.parallel_config
        norm_args = dict(eps=config.norm_eps, param_init_type=config.param_init_type,
                         compute_type=config.layernorm_compute_type, parallel_config=parallel)
        norm_type = decoder_option(config, 'norm_type')
        common = dict(init_std=config.initializer_range, param_init_type=config.param_init_type,
                      compute_dtype=config.compute_dtype, parallel_config=parallel)
        self.input_layernorm = build_norm(norm_type, hidden, **norm_args)
        self.self_attn = GroupedQueryAttention(hidden, config.num_heads, config.kv_heads, config.head_size,
                                               qkv_bias=config.attention_bias,
                                               out_bias=bool(decoder_option(config, 'out_bias')),
                                               rotary=rotary, softmax_compute_type=config.softmax_compute_type,
                                               **common)
        self.post_attention_layernorm = build_norm(norm_type, hidden, **norm_args)
        self.mlp = GatedMLP(hidden, config.ffn_size, has_bias=bool(decoder_option(config, 'mlp_bias')), **common)
        dp, _ = _dp_mp(parallel)
        self.add = ops.Add().shard(((dp, 1, 1), (dp, 1, 1)))

    def construct(self, x, mask, cos, sin):
        x = self.add(x, self.self_attn(self.input_layernorm(x), mask, cos, sin))
        return self.add(x, self.mlp(self.post_attention_layernorm(x)))


@MindFormerRegister.register(MindFormerModuleType.MODELS)
class LlamaModel(nn.Cell):
    """The decoder: input_ids [B, S] int32 (S <= seq_length) -> final hidden states [B, S, H] after the last norm.
    `attention_mask` [B, S] (1 = token, 0 = padding) is optional: padded keys are hidden and positions count from
    each row's first real token (left-padded generation batches)."""

    def __init__(self, config):
        super().__init__()
        parallel = config.parallel_config
        self.seq_length, self.num_heads = config.seq_length, config.num_heads
        self.compute_dtype = to_mstype(config.compute_dtype)
        self.embed_tokens = Embedding(config.vocab_size, config.hidden_size, config.initializer_range,
                                      config.param_init_type, parallel)
        self.rotary = RotaryEmbedding(config.head_size, config.seq_length, config.rotary_size, config.rope_theta,
                                      config.rotary_interleaved, str(config.extend_method), config.scaling_factor,
                                      config.rotary_dtype)
        self.causal_mask = CausalMask(config.seq_length, config.softmax_compute_type)
        self.fused_causal = fused_causal_attention(config.softmax_compute_type, parallel)
        self.layers = nn.CellList([LlamaDecoderLayer(config, self.rotary) for _ in range(config.num_layers)])
        self.norm = build_norm(decoder_option(config, 'norm_type'), config.hidden_size, config.norm_eps,
                               config.param_init_type, config.layernorm_compute_type, parallel)
        place_layers(self.layers, parallel, getattr(config, 'offset', 0))
        place_last(parallel, self.norm)

    def construct(self, input_ids, attention_mask=None):
        batch, seq = input_ids.shape
        if seq > self.seq_length:
            raise ValueError(f"input_ids has {seq} tokens per row, more than seq_length {self.seq_length}")
        hidden = self.embed_tokens(input_ids)
        if hidden.dtype != self.compute_dtype:
            hidden = ops.cast(hidden, self.compute_dtype)
        if attention_mask is None:
            mask = None if self.fused_causal else self.causal_mask(batch, self.num_heads, seq)
            cos, sin = self.rotary.static_tables(seq)
        else:
            mask, positions = self.causal_mask.with_padding(attention_mask, self.num_heads)
            cos, sin = self.rotary.tables(positions)
        for layer in self.layers:
            hidden = layer(hidden, mask, cos, sin)
        return self.norm(hidden)


@MindFormerRegister.register(MindFormerModuleType.MODELS)
class LlamaForCausalLM(CausalLMModel):
    """LLaMA with its own output head `lm_head` [vocab, hidden] (with `config.tied_head` a `TiedLMHead` without a
    weight: the logits are then taken against `model.embed_tokens.weight`). Training and inference contracts:
    `CausalLMModel`; `generate(..., use_past=True)` decodes with a KV cache (`LlamaIncrementalCore`)."""

    def __init__(self, config: LlamaConfig):
        super().__init__(config)
        config.validate()
        self.model = LlamaModel(config)
        parallel = config.parallel_config
        self.tied_head = bool(decoder_option(config, 'tied_head'))
        if self.tied_head:
            self.lm_head = TiedLMHead(parallel)
            self.parameter_inputs = {'model.embed_tokens.weight': ('lm_head.matmul', 1)}
        else:
            self.lm_head = output_head(config, parallel)
        place_last(parallel, self.lm_head, self.loss)
        self.load_checkpoint(config)

    def head(self, hidden):
        """Final hidden states [N, hidden] -> fp32 logits [N, vocab_size]."""
        if self.tied_head:
            return self.lm_head(hidden, self.model.embed_tokens.weight)
        logits = self.lm_head(hidden)
        return logits if logits.dtype == ms.float32 else ops.cast(logits, ms.float32)

    def logits(self, input_ids, attention_mask=None):
        """[B, S] (and optionally a padding mask [B, S]) -> fp32 logits [B * S, vocab_size]."""
        hidden = self.model(input_ids, attention_mask)
        return self.head(hidden.reshape(-1, hidden.shape[-1]))

    def incremental_core(self, batch_size):
        return LlamaIncrementalCore(self, batch_size)


class LlamaIncrementalCore(IncrementalCore):
    """LlamaForCausalLM's weights plus a KV cache of seq_length positions (keys stored after RoPE): the prefill /
    decode forward of `modules.kv_cache`. `forward(input_ids [B, T], positions [B, T], mask, indices, prefill)`
    -> fp32 logits [B, vocab] of the last position (T is the prompt bucket in prefill, 1 in decode)."""

    def __init__(self, model, batch):
        super().__init__(model, batch, model.config.kv_heads, model.config.head_size)

    def forward(self, input_ids, positions, mask, indices, prefill):
        decoder = self.model.model
        batch = input_ids.shape[0]
        hidden = decoder.embed_tokens(input_ids)
        if hidden.dtype != decoder.compute_dtype:
            hidden = ops.cast(hidden, decoder.compute_dtype)
        cos, sin = decoder.rotary.tables(positions)
        for index, layer in enumerate(decoder.layers):
            attention = layer.self_attn
            query, key, value = attention.project(layer.input_layernorm(hidden))
            query = ops.transpose(decoder.rotary.apply(query, cos, sin), (0, 2, 1, 3))
            key = ops.transpose(decoder.rotary.apply(key, cos, sin), (0, 2, 1, 3))
            value = ops.transpose(value, (0, 2, 1, 3))
            context = self.cache.attend(index, query, key, value, mask, indices, prefill, attention.core)
            hidden = hidden + attention.o_proj(context)
            hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
        last = decoder.norm(hidden[:, -1:, :]).reshape(batch, self.hidden_size)
        return self.model.head(last)
