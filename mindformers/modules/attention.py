"""Attention: the shared scaled-dot-product core, GPT-2's fused-qkv attention, and grouped-query attention with RoPE."""
import math

import numpy as np
import mindspore as ms
from mindspore import nn, ops, Tensor

from mindformers.kernels import (FusedBiasSplitHeads, FusedCausalAttention, FusedCausalSoftmax,
                                             FusedMergeHeads, FusedSplitHeads, FusedToHeads, use_fused)
from mindformers.modules.layers import Linear, Dropout, add_residual, to_mstype, _dp_mp, _check_divisible


NEG_INF = -1e9


def fused_causal_attention(softmax_compute_type, parallel_config=None):
    """Whether attention with these settings runs its causal softmax in the fused CPU kernel (then callers pass
    `mask=None` for the plain causal mask)."""
    dp, mp = _dp_mp(parallel_config)
    return dp == mp == 1 and use_fused(to_mstype(softmax_compute_type))


class CausalMask(nn.Cell):
    """The additive causal mask, 0 on and below the diagonal and -1e9 above it, as a full [B, heads, S, S] tensor.

    Build it once per step and pass it to every attention layer: on CPU an Add with a same-shaped operand is several
    times faster than one that broadcasts."""

    def __init__(self, max_seq_length, dtype='float32', parallel_config=None):
        super().__init__()
        self.max_seq_length = max_seq_length
        upper = np.triu(np.ones((max_seq_length, max_seq_length), dtype=bool), k=1)
        dtype = to_mstype(dtype)
        self.mask = Tensor(np.where(upper, np.float32(NEG_INF if dtype != ms.float16 else -6e4), np.float32(0)), dtype)

    def construct(self, batch, heads, seq):
        if seq > self.max_seq_length:
            raise ValueError(f"sequence length {seq} exceeds max_seq_length {self.max_seq_length}")
        mask = self.mask if seq == self.max_seq_length else self.mask[:seq, :seq]
        return ops.broadcast_to(mask, (batch, heads, seq, seq))

    def with_padding(self, attention_mask, heads):
        """For a padded batch (`attention_mask` [B, S], 1 = token, 0 = padding, e.g. left padding): (the causal
        mask that also hides padded keys, [B, heads, S, S]; positions [B, S] int32 counting from each row's first
        real token). Built in float32; in float16 clamped to -6e4 (-1e9 would be -inf there, and 0 * -inf NaN)."""
        batch, seq = attention_mask.shape
        valid = ops.cast(attention_mask, ms.int32)
        positions = ops.maximum(ops.cumsum(valid, 1) - 1, 0)
        mask = self.construct(batch, heads, seq)
        padding = ops.cast(1 - valid, ms.float32).reshape(batch, 1, 1, seq) * NEG_INF
        if mask.dtype == ms.float32:
            return mask + padding, positions
        return ops.cast(ops.maximum(ops.cast(mask, ms.float32) + padding, -6e4), mask.dtype), positions


class DotProductAttention(nn.Cell):
    """softmax(q k^T + mask) v per head, the core every attention layer shares.

    `construct(query, key, value, mask)`: query [B, H, S, D] already scaled; key, value [B, Hkv, S, D] with H a
    multiple of Hkv (query head h reads key/value head h // (H / Hkv), as HF's `repeat_kv`); mask additive
    [B, H, S, S] in `softmax_compute_type`, or None for the plain causal mask (applied inside a fused CPU kernel where
    one runs, else built here) -> context [B, H, S, D] in `compute_dtype`. `dropout`
    acts on the probabilities. `score_scale` (a number, default none) multiplies the scores after their cast to the
    softmax dtype, before the mask: ChatGLM-6B divides its queries by an extra per-layer factor in half precision and
    multiplies the float32 scores back by it.

    Prefix keys and values (Prefix-Tuning, P-Tuning v2): `prefix` is None, or a provider cell with `length` P,
    `visible` (bool) and `construct(batch)` -> (keys, values), each [B, P, Hkv, D], that `construct` puts in front
    of the keys and values (`add_prefix`): the mask gains P leading columns, 0 for every query (a large negative
    while `visible` is False), so padding still hides only real keys; the tokens keep their own positions and the
    prefix carries none. A decoding session stores the prefix in its cache at prefill (see
    `generation.session`)."""

    def __init__(self, dropout=0.0, compute_dtype='float32', softmax_compute_type='float32', parallel_config=None,
                 score_scale=None):
        super().__init__()
        self.prefix = None
        self.compute_dtype = to_mstype(compute_dtype, 'compute_dtype')
        self.softmax_dtype = to_mstype(softmax_compute_type, 'softmax_compute_type')
        self.score_scale = None if score_scale is None else Tensor(score_scale, self.softmax_dtype)
        self.masked_score = Tensor(-6e4 if self.softmax_dtype == ms.float16 else NEG_INF, self.softmax_dtype)
        # mask=None (the plain causal mask) runs in fused kernels: all of attention, one kernel each way, when no
        # dropout (in training) or score_scale applies in between; otherwise the softmax
        fused = fused_causal_attention(softmax_compute_type, parallel_config)
        whole = fused and use_fused(self.compute_dtype) and score_scale is None
        self.causal_attention = FusedCausalAttention() if whole else None
        self.causal_softmax = FusedCausalSoftmax() if fused and (dropout > 0 or not whole) else None
        self.dropout = Dropout(dropout)
        dp, mp = _dp_mp(parallel_config)
        self.scores_matmul = ops.BatchMatMul(transpose_b=True).shard(((dp, mp, 1, 1), (dp, mp, 1, 1)))
        self.add_mask = ops.Add().shard(((dp, mp, 1, 1), (dp, mp, 1, 1)))
        self.softmax = ops.Softmax(axis=-1).shard(((dp, mp, 1, 1),))
        self.context_matmul = ops.BatchMatMul().shard(((dp, mp, 1, 1), (dp, mp, 1, 1)))
        self.mul_scale = ops.Mul().shard(((dp, mp, 1, 1), ()))
        self.dropout.shard(((dp, mp, 1, 1),))
        self.prefix_heads = ops.Transpose().shard(((dp, 1, mp, 1),))
        self.concat_prefix = ops.Concat(axis=2).shard(((dp, mp, 1, 1), (dp, mp, 1, 1)))

    @staticmethod
    def repeat_kv(x, heads):
        """[B, Hkv, S, D] -> [B, heads, S, D], each key/value head repeated for its group of query heads."""
        batch, kv_heads, seq, dim = x.shape
        if kv_heads == heads:
            return x
        group = heads // kv_heads
        x = ops.broadcast_to(x.reshape(batch, kv_heads, 1, seq, dim), (batch, kv_heads, group, seq, dim))
        return x.reshape(batch, heads, seq, dim)

    def causal_mask(self, shape, dtype):
        """The additive causal mask of `shape` [B, H, S, S]: 0 on and below the diagonal, a large negative above."""
        seq = shape[-1]
        above = ops.arange(seq).reshape(1, seq) > ops.arange(seq).reshape(seq, 1)
        return ops.broadcast_to(ops.cast(above, dtype) * self.masked_score, shape)

    def add_prefix(self, query, key, value, mask):
        """(keys, values [B, Hkv, P + S, D] with the prefix in front, mask [B, H or 1, S, P + S]) for query
        [B, H, S, D], key/value [B, Hkv, S, D] and mask as `construct` takes it."""
        batch, heads, seq = query.shape[0], query.shape[1], query.shape[2]
        prefix_key, prefix_value = self.prefix(batch)
        prefix_key = ops.cast(self.prefix_heads(prefix_key, (0, 2, 1, 3)), key.dtype)
        prefix_value = ops.cast(self.prefix_heads(prefix_value, (0, 2, 1, 3)), value.dtype)
        if mask is None:
            mask = self.causal_mask((batch, heads, seq, seq), self.softmax_dtype)
        columns = ops.zeros((mask.shape[0], mask.shape[1], seq, self.prefix.length), mask.dtype)
        if not self.prefix.visible:
            columns = columns + ops.cast(self.masked_score, mask.dtype)
        return (self.concat_prefix((prefix_key, key)), self.concat_prefix((prefix_value, value)),
                ops.concat((columns, mask), -1))

    def construct(self, query, key, value, mask):
        if self.prefix is not None:
            key, value, mask = self.add_prefix(query, key, value, mask)
        return self.attend(query, key, value, mask)

    def attend(self, query, key, value, mask):
        """`construct` without the prefix (keys, values and mask as given)."""
        if mask is None and self.causal_attention is not None and not self.dropout.active:
            return self.causal_attention(query, key, value)
        heads = query.shape[1]
        scores = self.scores_matmul(query, self.repeat_kv(key, heads))  # [B, H, S, S]
        if scores.dtype != self.softmax_dtype:
            scores = ops.cast(scores, self.softmax_dtype)
        if self.score_scale is not None:
            scores = self.mul_scale(scores, self.score_scale)
        if mask is None and self.causal_softmax is not None:  # the plain causal mask, inside the fused kernel
            probs = self.causal_softmax(scores)
        else:
            if mask is None:
                mask = self.causal_mask(scores.shape, scores.dtype)
            probs = self.softmax(self.add_mask(scores, mask))
        if probs.dtype != self.compute_dtype:
            probs = ops.cast(probs, self.compute_dtype)
        return self.context_matmul(self.dropout(probs), self.repeat_kv(value, heads))


def prefix_length(model):
    """P, the number of prefix keys/values in front of every attention layer of `model` (0 without a prefix); a
    decoding session reserves them in its cache. ValueError when the layers disagree."""
    lengths = {0 if cell.prefix is None else int(cell.prefix.length)
               for _, cell in model.cells_and_names() if isinstance(cell, DotProductAttention)}
    if len(lengths) > 1:
        raise ValueError(f"the attention layers of {type(model).__name__} hold prefixes of different lengths "
                         f"{sorted(lengths)}; a decoding session needs one length for every layer")
    return lengths.pop() if lengths else 0


class CausalSelfAttention(nn.Cell):
    """Multi-head causal self-attention with a fused q|k|v projection (GPT-2).

    `construct(x, mask, cache=None, write=None, residual=None)`: x [B, S, hidden_size]; mask additive,
    [B, num_heads, S, S] in `softmax_compute_type` (see `CausalMask`), or None for the plain causal mask ->
    [B, S, hidden_size] in `compute_dtype`, plus `residual` [B, S, hidden_size] when given. With `cache` (one
    layer's view of a decoding session's cache, `generation.session.LayerCache`) and `write`, keys and values are
    stored there and attention reads the cache (mask and write as the session builds them).
    `qkv_proj.weight` is [3 * num_heads * head_dim, hidden_size], rows ordered q | k | v with the heads contiguous
    inside each; `o_proj.weight` is [hidden_size, num_heads * head_dim]. Scores and softmax run in
    `softmax_compute_type`. `attention_dropout` acts on the probabilities, `out_dropout` on the projected output.
    Under model parallel the heads are split mp ways (qkv column-split, o_proj row-split)."""

    def __init__(self, hidden_size, num_heads, head_dim=None, qkv_bias=True, out_bias=True, attention_dropout=0.0,
                 out_dropout=0.0, init_std=0.02, out_init_std=None, param_init_type='float32',
                 compute_dtype='float32', softmax_compute_type='float32', parallel_config=None):
        super().__init__()
        head_dim = head_dim or hidden_size // num_heads
        self.num_heads, self.head_dim = num_heads, head_dim
        self.compute_dtype = to_mstype(compute_dtype, 'compute_dtype')
        dp, mp = _dp_mp(parallel_config)
        _check_divisible(num_heads, mp, 'num_heads')
        self.inner_size = inner = num_heads * head_dim
        common = dict(param_init_type=param_init_type, compute_dtype=compute_dtype, parallel_config=parallel_config)
        self.qkv_proj = Linear(hidden_size, 3 * inner, has_bias=qkv_bias, init_std=init_std, split='column', **common)
        self.o_proj = Linear(inner, hidden_size, has_bias=out_bias, init_std=out_init_std or init_std, split='row',
                             **common)
        self.scale = Tensor(1.0 / math.sqrt(head_dim), self.compute_dtype)
        self.core = DotProductAttention(attention_dropout, compute_dtype, softmax_compute_type, parallel_config)
        self.out_dropout = Dropout(out_dropout)

        # MindSpore cannot split a Split along its own axis: the q|k|v columns are gathered before the split
        self.split_qkv = ops.Split(axis=-1, output_num=3).shard(((dp, 1),))
        self.to_heads = ops.Transpose().shard(((dp, 1, mp, 1),))
        self.from_heads = ops.Transpose().shard(((dp, mp, 1, 1),))
        self.mul_scale = ops.Mul().shard(((dp, mp, 1, 1), ()))
        self.out_dropout.shard(((dp, 1, 1),))
        # on CPU (fp32, unsharded) the split into heads (with qkv_proj's bias, when it lets a caller add it) and the
        # merge back are one kernel pass each; a decode step reads q, k, v straight from the packed projection
        self.fused_heads = self.fused_split = dp == mp == 1 and use_fused(self.compute_dtype)
        if self.fused_heads:
            scales = (1.0 / math.sqrt(head_dim), 1.0, 1.0)
            self.split_heads = FusedSplitHeads(3, num_heads, scales)
            self.split_heads_bias = FusedBiasSplitHeads(3, num_heads, scales)
            self.merge_heads = FusedMergeHeads(num_heads)
            self.decode_scale = Tensor([1.0 / math.sqrt(head_dim)], ms.float32)

    def _recompute(self, *args, **kwargs):
        # MindSpore 2.10 builds a cyclic graph for the split kernel (a custom op with three outputs and a bprop)
        # inside a recomputed cell, so a recomputed layer splits with Split and Transpose
        self.fused_split = False
        super()._recompute(*args, **kwargs)

    def _heads(self, x, batch, seq):
        """[B * S, heads * head_dim] -> [B, heads, S, head_dim]."""
        return self.to_heads(x.reshape(batch, seq, self.num_heads, self.head_dim), (0, 2, 1, 3))

    def _context(self, x, mask, cache, write):
        """The heads' outputs merged, [B * S, num_heads * head_dim], before o_proj; x [B, S, hidden]."""
        batch, seq, hidden = x.shape
        flat = x.reshape(batch * seq, hidden)
        if cache is not None and cache.packed and self.fused_heads:  # a decode step in one kernel
            return cache.attend_packed(self.qkv_proj(flat), mask, write, self.decode_scale)
        if self.fused_split and getattr(self.qkv_proj, 'bias_fusable', False):
            qkv = self.qkv_proj(flat, False).reshape(batch, seq, 3 * self.inner_size)
            query, key, value = self.split_heads_bias(qkv, self.qkv_proj.bias)
        elif self.fused_split:
            query, key, value = self.split_heads(self.qkv_proj(flat).reshape(batch, seq, 3 * self.inner_size))
        else:
            # split along the features of the 2-D projection: far cheaper on CPU than indexing a stacked q/k/v tensor
            query, key, value = self.split_qkv(self.qkv_proj(flat))
            query = self.mul_scale(self._heads(query, batch, seq), self.scale)
            key, value = self._heads(key, batch, seq), self._heads(value, batch, seq)
        if cache is None:
            context = self.core(query, key, value, mask)
        else:
            context = cache.attend(query, key, value, mask, write, self.core)
        if self.fused_heads:
            context = self.merge_heads(context)
        else:
            context = self.from_heads(context, (0, 2, 1, 3))
        return context.reshape(batch * seq, self.inner_size)

    def construct(self, x, mask, cache=None, write=None, residual=None):
        context = self._context(x, mask, cache, write)
        if self.out_dropout.active:
            return add_residual(residual, self.o_proj(context).reshape(x.shape), self.out_dropout)
        return self.o_proj(context, residual=residual).reshape(x.shape)


class GroupedQueryAttention(nn.Cell):
    """Causal self-attention with separate q/k/v projections, `num_kv_heads` key/value heads (grouped-query
    attention when fewer than `num_heads`; one is multi-query) and rotary positions (LLaMA, GLM2).

    `construct(x, mask, cos, sin, cache=None, write=None, residual=None)`: x [B, S, hidden_size]; mask as for
    `DotProductAttention` ([B, num_heads, S, S] additive or None); cos, sin [B or 1, S, 1, head_dim] from
    `RotaryEmbedding` -> [B, S, hidden_size], plus `residual` when given; `cache`/`write` as for
    `CausalSelfAttention` (keys are cached after the rotary embedding).
    `q_proj.weight` [num_heads * head_dim, hidden_size], `k_proj`/`v_proj` [num_kv_heads * head_dim, hidden_size]
    (biases when `qkv_bias`), `o_proj.weight` [hidden_size, num_heads * head_dim] (bias when `out_bias`)."""

    def __init__(self, hidden_size, num_heads, num_kv_heads=None, head_dim=None, qkv_bias=False, out_bias=False,
                 rotary=None, attention_dropout=0.0, init_std=0.02, param_init_type='float32',
                 compute_dtype='float32', softmax_compute_type='float32', parallel_config=None):
        super().__init__()
        self.num_heads, self.num_kv_heads = num_heads, num_kv_heads or num_heads
        self.head_dim = head_dim or hidden_size // num_heads
        if num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})")
        dp, mp = _dp_mp(parallel_config)
        _check_divisible(num_heads, mp, 'num_heads')
        _check_divisible(self.num_kv_heads, mp, 'num_kv_heads')
        common = dict(param_init_type=param_init_type, compute_dtype=compute_dtype, parallel_config=parallel_config,
                      init_std=init_std)
        inner, kv_inner = num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.q_proj = Linear(hidden_size, inner, has_bias=qkv_bias, split='column', **common)
        self.k_proj = Linear(hidden_size, kv_inner, has_bias=qkv_bias, split='column', **common)
        self.v_proj = Linear(hidden_size, kv_inner, has_bias=qkv_bias, split='column', **common)
        self.o_proj = Linear(inner, hidden_size, has_bias=out_bias, split='row', **common)
        self.rotary = rotary
        self.scale = Tensor(1.0 / math.sqrt(self.head_dim), to_mstype(compute_dtype, 'compute_dtype'))
        self.core = DotProductAttention(attention_dropout, compute_dtype, softmax_compute_type, parallel_config)
        self.mul_scale = ops.Mul().shard(((dp, mp, 1, 1), ()))
        self.to_heads = ops.Transpose().shard(((dp, 1, mp, 1),))
        self.from_heads = ops.Transpose().shard(((dp, mp, 1, 1),))
        # on CPU (fp32, unsharded) each of q, k, v goes into the heads layout in one kernel pass (with the rotary
        # embedding and the query scale), and the heads' outputs come back in one
        self.fused_heads = (dp == mp == 1 and use_fused(to_mstype(compute_dtype, 'compute_dtype'))
                            and (rotary is None or rotary.fused is not None))
        if self.fused_heads:
            scale = 1.0 / math.sqrt(self.head_dim)
            self.query_heads, self.kv_heads = FusedToHeads(num_heads, scale), FusedToHeads(self.num_kv_heads)
            if rotary is not None:
                self.query_rotary, self.key_rotary = rotary.heads_kernel(scale), rotary.heads_kernel(1.0)
            self.merge_heads = FusedMergeHeads(num_heads)

    def heads(self, x, projection):
        """x [B, S, hidden] through `projection` -> [B, S, heads, head_dim] (heads from the projection's width)."""
        batch, seq, hidden = x.shape
        y = projection(x.reshape(batch * seq, hidden))
        return y.reshape(batch, seq, -1, self.head_dim)

    def _split(self, query, key, value, cos, sin):
        """query, key, value [B, S, heads, head_dim] (query unscaled; the rotary embedding applied when cos and sin
        are given) -> [B, heads, S, head_dim], query scaled."""
        batch, seq = query.shape[0], query.shape[1]
        if self.fused_heads:
            if cos is None:
                query = self.query_heads(query.reshape(batch, seq, -1))
                key = self.kv_heads(key.reshape(batch, seq, -1))
            else:
                query, key = self.query_rotary(query, cos, sin), self.key_rotary(key, cos, sin)
            return query, key, self.kv_heads(value.reshape(batch, seq, -1))
        if cos is not None:
            query, key = self.rotary.apply(query, cos, sin), self.rotary.apply(key, cos, sin)
        query = self.mul_scale(self.to_heads(query, (0, 2, 1, 3)), self.scale)
        return query, self.to_heads(key, (0, 2, 1, 3)), self.to_heads(value, (0, 2, 1, 3))

    def attend(self, query, key, value, mask, cache, write, residual, cos=None, sin=None):
        """query [B, S, heads, head_dim] (unscaled), key/value [B, S, kv_heads, head_dim] -> o_proj's output
        [B, S, hidden] (+ residual); with cos and sin, query and key get the rotary embedding first."""
        batch, seq = query.shape[0], query.shape[1]
        query, key, value = self._split(query, key, value, cos, sin)
        if cache is None:
            context = self.core(query, key, value, mask)
        else:
            context = cache.attend(query, key, value, mask, write, self.core)
        if self.fused_heads:
            context = self.merge_heads(context)
        else:
            context = self.from_heads(context, (0, 2, 1, 3))
        context = context.reshape(batch * seq, self.num_heads * self.head_dim)
        return self.o_proj(context, residual=residual).reshape(batch, seq, -1)

    def construct(self, x, mask, cos, sin, cache=None, write=None, residual=None):
        return self.attend(self.heads(x, self.q_proj), self.heads(x, self.k_proj), self.heads(x, self.v_proj), mask,
                           cache, write, residual, cos, sin)
