"""Multi-head causal self-attention with a fused q|k|v projection."""
import math

import numpy as np
from mindspore import nn, ops, Tensor

from mindformers.modules.cpu_kernels import FusedCausalSoftmax, use_fused
from mindformers.modules.layers import Linear, Dropout, to_mstype, _dp_mp, _check_divisible


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
        self.mask = Tensor(np.where(upper, np.float32(-1e9), np.float32(0)), to_mstype(dtype))

    def construct(self, batch, heads, seq):
        if seq > self.max_seq_length:
            raise ValueError(f"sequence length {seq} exceeds max_seq_length {self.max_seq_length}")
        mask = self.mask if seq == self.max_seq_length else self.mask[:seq, :seq]
        return ops.broadcast_to(mask, (batch, heads, seq, seq))


class CausalSelfAttention(nn.Cell):
    """softmax(q k^T / sqrt(head_dim) + mask) v over `num_heads` heads, then an output projection.

    `construct(x, mask)`: x [B, S, hidden_size]; mask additive, [B, num_heads, S, S] in `softmax_compute_type`
    (see `CausalMask`) -> [B, S, hidden_size] in `compute_dtype`. `mask=None` means the plain causal mask applied
    by the fused CPU kernel; allowed only when `fused_causal_attention(...)` is true for this layer's settings.
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
        self.softmax_dtype = to_mstype(softmax_compute_type, 'softmax_compute_type')
        dp, mp = _dp_mp(parallel_config)
        _check_divisible(num_heads, mp, 'num_heads')
        self.inner_size = inner = num_heads * head_dim
        common = dict(param_init_type=param_init_type, compute_dtype=compute_dtype, parallel_config=parallel_config)
        self.qkv_proj = Linear(hidden_size, 3 * inner, has_bias=qkv_bias, init_std=init_std, split='column', **common)
        self.o_proj = Linear(inner, hidden_size, has_bias=out_bias, init_std=out_init_std or init_std, split='row',
                             **common)
        self.scale = Tensor(1.0 / math.sqrt(head_dim), self.compute_dtype)
        self.attention_dropout = Dropout(attention_dropout)
        self.out_dropout = Dropout(out_dropout)
        self.causal_softmax = FusedCausalSoftmax() if fused_causal_attention(softmax_compute_type,
                                                                             parallel_config) else None

        self.split_qkv = ops.Split(axis=-1, output_num=3).shard(((dp, mp),))
        self.to_heads = ops.Transpose().shard(((dp, 1, mp, 1),))
        self.from_heads = ops.Transpose().shard(((dp, mp, 1, 1),))
        self.mul_scale = ops.Mul().shard(((dp, mp, 1, 1), ()))
        self.scores_matmul = ops.BatchMatMul(transpose_b=True).shard(((dp, mp, 1, 1), (dp, mp, 1, 1)))
        self.add_mask = ops.Add().shard(((dp, mp, 1, 1), (dp, mp, 1, 1)))
        self.softmax = ops.Softmax(axis=-1).shard(((dp, mp, 1, 1),))
        self.context_matmul = ops.BatchMatMul().shard(((dp, mp, 1, 1), (dp, mp, 1, 1)))
        self.attention_dropout.shard(((dp, mp, 1, 1),))
        self.out_dropout.shard(((dp, 1, 1),))

    def _heads(self, x, batch, seq):
        """[B * S, heads * head_dim] -> [B, heads, S, head_dim]."""
        return self.to_heads(x.reshape(batch, seq, self.num_heads, self.head_dim), (0, 2, 1, 3))

    def construct(self, x, mask):
        batch, seq, hidden = x.shape
        # split along the features of the 2-D projection: far cheaper on CPU than indexing a stacked q/k/v tensor
        query, key, value = self.split_qkv(self.qkv_proj(x.reshape(batch * seq, hidden)))
        query = self.mul_scale(self._heads(query, batch, seq), self.scale)
        scores = self.scores_matmul(query, self._heads(key, batch, seq))  # [B, heads, S, S]
        if scores.dtype != self.softmax_dtype:
            scores = ops.cast(scores, self.softmax_dtype)
        if mask is None:  # the pure causal mask, applied inside the fused kernel
            probs = self.causal_softmax(scores)
        else:
            probs = self.softmax(self.add_mask(scores, mask))
        if probs.dtype != self.compute_dtype:
            probs = ops.cast(probs, self.compute_dtype)
        context = self.context_matmul(self.attention_dropout(probs), self._heads(value, batch, seq))
        context = self.from_heads(context, (0, 2, 1, 3)).reshape(batch * seq, self.inner_size)
        return self.out_dropout(self.o_proj(context).reshape(batch, seq, -1))
