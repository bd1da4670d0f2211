"""GPT-2: learned positions, pre-LayerNorm blocks of fused-qkv causal attention and a GELU MLP, tied LM head."""
import math

import mindspore as ms
from mindspore import nn, ops

from mindformers.models.base_model import CausalLMModel
from mindformers.models.gpt2.gpt2_config import GPT2Config
from mindformers.modules import CausalMask, CausalSelfAttention, Dropout, Embedding, LayerNorm, MLP
from mindformers.modules.attention import fused_causal_attention
from mindformers.kernels import FusedDecodeAttentionPacked, use_fused
from mindformers.modules.kv_cache import IncrementalCore
from mindformers.modules.layers import TiedLMHead, _dp_mp, place_last, place_layers, to_mstype
from mindformers.tools.register import MindFormerRegister, MindFormerModuleType


class GPT2Block(nn.Cell):
    """x + attention(LN(x), mask), then + mlp(LN(.)): x [B, S, H], additive mask [B, heads, S, S] -> [B, S, H]."""

    def __init__(self, config):
        super().__init__()
        hidden, parallel = config.hidden_size, config.parallel_config
        out_init_std = config.initializer_range / math.sqrt(2 * config.num_layers)  # GPT-2's scaled residual init
        norm_args = dict(eps=config.layernorm_epsilon, param_init_type=config.param_init_type,
                         compute_type=config.layernorm_compute_type, parallel_config=parallel)
        common = dict(init_std=config.initializer_range, out_init_std=out_init_std,
                      param_init_type=config.param_init_type, compute_dtype=config.compute_dtype,
                      parallel_config=parallel)
        self.input_layernorm = LayerNorm(hidden, **norm_args)
        self.attention = CausalSelfAttention(hidden, config.num_heads, attention_dropout=config.attention_dropout_rate,
                                             out_dropout=config.hidden_dropout_rate,
                                             softmax_compute_type=config.softmax_compute_type, **common)
        self.post_attention_layernorm = LayerNorm(hidden, **norm_args)
        self.mlp = MLP(hidden, config.expand_ratio * hidden, hidden_act=config.hidden_act,
                       dropout=config.hidden_dropout_rate, **common)
        dp, _ = _dp_mp(parallel)
        self.add = ops.Add().shard(((dp, 1, 1), (dp, 1, 1)))

    def construct(self, x, mask):
        if self.attention.o_proj.fused:  # CPU, unsharded: each output projection adds its bias and the residual
            x = self.attention.add_to(x, self.input_layernorm(x), mask)
            return self.mlp.add_to(x, self.post_attention_layernorm(x))
        x = self.add(x, self.attention(self.input_layernorm(x), mask))
        return self.add(x, self.mlp(self.post_attention_layernorm(x)))


@MindFormerRegister.register(MindFormerModuleType.MODELS)
class GPT2Model(nn.Cell):
    """The GPT-2 backbone: input_ids [B, S] int32 (S <= seq_length) -> final hidden states [B, S, H].
    `attention_mask` [B, S] (1 = token, 0 = padding, e.g. left padding for generation) is optional."""

    # without padding the position table is added whole (a replicated table, like its own lookup's)
    parameter_inputs = {'embed_positions.weight': ('add_positions', 1)}

    def __init__(self, config):
        super().__init__()
        config.validate()
        parallel = config.parallel_config
        self.seq_length = config.seq_length
        self.compute_dtype = to_mstype(config.compute_dtype)
        self.embed_tokens = Embedding(config.vocab_size, config.hidden_size, config.initializer_range,
                                      config.param_init_type, parallel)
        self.embed_positions = Embedding(config.seq_length, config.hidden_size, config.initializer_range,
                                         config.param_init_type, parallel, replicated=True)
        self.embed_dropout = Dropout(config.embedding_dropout_prob)
        self.causal_mask = CausalMask(config.seq_length, config.softmax_compute_type)
        self.fused_causal = fused_causal_attention(config.softmax_compute_type, parallel)
        self.num_heads = config.num_heads
        self.layers = nn.CellList([GPT2Block(config) for _ in range(config.num_layers)])
        self.final_layernorm = LayerNorm(config.hidden_size, config.layernorm_epsilon, config.param_init_type,
                                         config.layernorm_compute_type, parallel)
        place_layers(self.layers, parallel, config.offset)
        place_last(parallel, self.final_layernorm)
        dp, _ = _dp_mp(parallel)
        self.add_positions = ops.Add().shard(((dp, 1, 1), (1, 1)))
        self.embed_dropout.shard(((dp, 1, 1),))

    def construct(self, input_ids, attention_mask=None):
        batch, seq = input_ids.shape
        if seq > self.seq_length:
            raise ValueError(f"input_ids has {seq} tokens per row, more than seq_length {self.seq_length}")
        if attention_mask is None:
            # None = the plain causal mask, applied inside the fused CPU attention kernel
            mask = None if self.fused_causal else self.causal_mask(batch, self.num_heads, seq)
            positions = self.embed_positions.weight
            if seq != self.seq_length:
                positions = positions[:seq]
            hidden = self.add_positions(self.embed_tokens(input_ids), positions)
        else:  # padded rows: positions count from each row's first real token, padding is hidden as a key
            mask, positions = self.causal_mask.with_padding(attention_mask, self.num_heads)
            hidden = self.embed_tokens(input_ids) + self.embed_positions(positions)
        if hidden.dtype != self.compute_dtype:
            hidden = ops.cast(hidden, self.compute_dtype)
        hidden = self.embed_dropout(hidden)
        for layer in self.layers:
            hidden = layer(hidden, mask)
        return self.final_layernorm(hidden)


@MindFormerRegister.register(MindFormerModuleType.MODELS)
class GPT2LMHeadModel(CausalLMModel):
    """GPT-2 with its output head tied to the token embedding. Training and inference contracts: `CausalLMModel`."""

    parameter_inputs = {'backbone.embed_tokens.weight': ('lm_head.matmul', 1)}

    def __init__(self, config: GPT2Config):
        super().__init__(config)
        self.backbone = GPT2Model(config)
        self.lm_head = TiedLMHead(config.parallel_config)
        place_last(config.parallel_config, self.lm_head, self.loss)
        self.load_checkpoint(config)

    def logits(self, input_ids, attention_mask=None):
        """[B, S] (and optionally a padding mask [B, S]) -> fp32 logits [B * S, vocab_size]."""
        hidden = self.backbone(input_ids, attention_mask)
        return self.lm_head(hidden.reshape(-1, hidden.shape[-1]), self.backbone.embed_tokens.weight)

    def incremental_core(self, batch_size):
        return GPT2IncrementalCore(self, batch_size)


class GPT2IncrementalCore(IncrementalCore):
    """GPT2LMHeadModel's weights plus a KV cache: the prefill / decode forward of `modules.kv_cache`.

    `forward(input_ids [B, T], positions [B, T], mask, indices, prefill)`: T is the bucketed prompt length (prefill,
    mask [B, 1, T, T]) or 1 (decode, mask [B, 1, 1, max_length], indices from `CacheState.step`). Returns fp32
    logits [B, vocab] of the last position."""

    def __init__(self, model, batch):
        config = model.config
        head_dim = config.hidden_size // config.num_heads
        super().__init__(model, batch, config.num_heads, head_dim)
        self.num_heads, self.head_dim = config.num_heads, head_dim
        self.scale = ms.Tensor(1.0 / math.sqrt(self.head_dim), ms.float32)
        # decode steps take q, k, v straight from the packed projection into one fused CPU kernel (fp32)
        self.fused_decode = (use_fused(to_mstype(config.compute_dtype))
                             and _dp_mp(config.parallel_config) == (1, 1))
        if self.fused_decode:
            self.attend = FusedDecodeAttentionPacked()
            self.scale_vector = ms.Tensor([1.0 / math.sqrt(self.head_dim)], ms.float32)

    def _heads(self, x, batch, length):
        return ops.transpose(x.reshape(batch, length, self.num_heads, self.head_dim), (0, 2, 1, 3))

    def forward(self, input_ids, positions, mask, indices, prefill):
        if self.fused_decode and not prefill:
            return self._fused_decode_step(input_ids, positions, mask, indices)
        backbone = self.model.backbone
        batch, length = input_ids.shape
        table = backbone.embed_tokens.weight.reshape(self.model.vocab_size, self.hidden_size)
        hidden = ops.gather(table, input_ids, 0) + ops.gather(backbone.embed_positions.weight, positions, 0)
        if hidden.dtype != backbone.compute_dtype:
            hidden = ops.cast(hidden, backbone.compute_dtype)
        for index, layer in enumerate(backbone.layers):
            attention = layer.attention
            qkv = attention.qkv_proj(layer.input_layernorm(hidden))
            query, key, value = ops.split(qkv, self.hidden_size, axis=-1)
            query = self._heads(query, batch, length) * self.scale
            key, value = self._heads(key, batch, length), self._heads(value, batch, length)
            context = self.cache.attend(index, query, key, value, mask, indices, prefill, attention.core)
            hidden = hidden + attention.o_proj(context)
            hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
        last = backbone.final_layernorm(hidden[:, -1:, :]).reshape(batch, self.hidden_size)
        return self.model.lm_head(last, table)

    def _fused_decode_step(self, input_ids, positions, mask, indices):
        """The decode step (same contract as `forward`) with the fused packed-attention kernel; rows are
        [B, hidden]."""
        backbone = self.model.backbone
        batch = input_ids.shape[0]
        table = backbone.embed_tokens.weight.reshape(self.model.vocab_size, self.hidden_size)
        hidden = ops.gather(table, input_ids, 0) + ops.gather(backbone.embed_positions.weight, positions, 0)
        hidden = hidden.reshape(batch, self.hidden_size)
        for index, layer in enumerate(backbone.layers):
            attention = layer.attention
            qkv = attention.qkv_proj(layer.input_layernorm(hidden))
            context = self.attend(qkv, self.cache.keys[index].data, self.cache.values[index].data, mask, indices,
                                  self.scale_vector)
            hidden = attention.o_proj.add_to(hidden, context)
            hidden = layer.mlp.add_to(hidden, layer.post_attention_layernorm(hidden))
        return self.model.lm_head(backbone.final_layernorm(hidden), table)
