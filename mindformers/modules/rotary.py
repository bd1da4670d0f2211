"""Rotary position embedding (RoPE): full or partial, rotate-half (HF LLaMA) or interleaved pairs (Meta, GLM2)."""
import numpy as np
from mindspore import nn, ops, Tensor

from mindformers.modules.layers import to_mstype


def rope_frequencies(rotary_dim, theta=10000.0, extend_method='None', scaling_factor=1.0):
    """The rotary_dim / 2 inverse frequencies, fp32 as HF computes them; 'NTK' raises the base to
    theta * scaling_factor ** (d / (d - 2)), 'PI' (position interpolation) divides them by scaling_factor."""
    if extend_method == 'NTK':
        theta = theta * scaling_factor ** (rotary_dim / (rotary_dim - 2))
    inv_freq = (1.0 / (np.float32(theta) ** (np.arange(0, rotary_dim, 2).astype(np.float32) / rotary_dim)))
    inv_freq = inv_freq.astype(np.float32)
    if extend_method == 'PI':
        inv_freq = (inv_freq / np.float32(scaling_factor)).astype(np.float32)
    return inv_freq


class RotaryEmbedding(nn.Cell):
    """RoPE over the first `rotary_dim` lanes of each `head_dim`-wide head; the remaining lanes pass through.

    Lane pairs: (i, i + rotary_dim / 2) with `interleaved=False` (HF's rotate-half), (2i, 2i + 1) with True.
    `tables(positions)`: positions int32 [B, S] -> (cos, sin) [B, S, 1, head_dim] (ones/zeros on the pass-through
    lanes); `static_tables(S)` -> the same for positions 0..S-1 as [1, S, 1, head_dim] (training, no padding).
    `apply(x, cos, sin)`: x [B, S, heads, head_dim] -> x * cos + rotate(x) * sin, where rotate(x) is x times a fixed
    signed permutation matrix (exact in any float dtype: every output lane is one input lane, maybe negated)."""

    def __init__(self, head_dim, max_positions, rotary_dim=None, theta=10000.0, interleaved=False,
                 extend_method='None', scaling_factor=1.0, dtype='float32'):
        super().__init__()
        rotary_dim = rotary_dim or head_dim
        self.head_dim, self.dtype = head_dim, to_mstype(dtype, 'rotary_dtype')
        inv_freq = rope_frequencies(rotary_dim, theta, extend_method, scaling_factor)
        angles = np.arange(max_positions, dtype=np.float32)[:, None] * inv_freq[None, :]  # [P, r/2], fp32
        lanes = np.repeat(angles, 2, axis=1) if interleaved else np.concatenate([angles, angles], axis=1)
        cos = np.ones((max_positions, head_dim), np.float32)
        sin = np.zeros((max_positions, head_dim), np.float32)
        cos[:, :rotary_dim], sin[:, :rotary_dim] = np.cos(lanes), np.sin(lanes)
        self.cos_table, self.sin_table = Tensor(cos, self.dtype), Tensor(sin, self.dtype)
        swap = np.zeros((head_dim, head_dim), np.float32)  # rotate(x) = x @ swap
        half = rotary_dim // 2
        for i in range(half):
            a, b = (2 * i, 2 * i + 1) if interleaved else (i, i + half)
            swap[b, a], swap[a, b] = -1.0, 1.0  # out[a] = -x[b], out[b] = x[a]
        self.swap = Tensor(swap, self.dtype)
        self.matmul = ops.MatMul()

    def static_tables(self, seq):
        cos, sin = self.cos_table[:seq], self.sin_table[:seq]
        return cos.reshape(1, seq, 1, self.head_dim), sin.reshape(1, seq, 1, self.head_dim)

    def tables(self, positions):
        batch, seq = positions.shape
        cos, sin = ops.gather(self.cos_table, positions, 0), ops.gather(self.sin_table, positions, 0)
        return cos.reshape(batch, seq, 1, self.head_dim), sin.reshape(batch, seq, 1, self.head_dim)

    def apply(self, x, cos, sin):
        dtype = x.dtype
        if dtype != self.dtype:
            x = ops.cast(x, self.dtype)
        rotated = self.matmul(x.reshape(-1, self.head_dim), self.swap).reshape(x.shape)
        y = x * cos + rotated * sin
        return y if dtype == self.dtype else ops.cast(y, dtype)
