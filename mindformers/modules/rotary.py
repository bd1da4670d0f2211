"""Rotary position embedding (RoPE): full or partial, rotate-half (HF LLaMA) or interleaved pairs (Meta, GLM2),
and GLM's 2-D RoPE (two position rows, one per half of each head)."""
import numpy as np
import mindspore as ms
from mindspore import nn, ops, Tensor

from mindformers.kernels import FusedRotary, FusedRotaryHeads, use_fused
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


def rotation_matrix(head_dim, rotary_dim, interleaved):
    """R [head_dim, head_dim] with x @ R = rotate(x): for each lane pair (a, b) of the first rotary_dim lanes
    (a, b) = (i, i + rotary_dim / 2) (rotate-half) or (2i, 2i + 1) (interleaved), out[a] = -x[b] and out[b] = x[a];
    other lanes give 0."""
    swap = np.zeros((head_dim, head_dim), np.float32)
    half = rotary_dim // 2
    for i in range(half):
        a, b = (2 * i, 2 * i + 1) if interleaved else (i, i + half)
        swap[b, a], swap[a, b] = -1.0, 1.0
    return swap


class RotaryEmbedding(nn.Cell):
    """RoPE over the first `rotary_dim` lanes of each `head_dim`-wide head; the remaining lanes pass through.

    Lane pairs: (i, i + rotary_dim / 2) with `interleaved=False` (HF's rotate-half), (2i, 2i + 1) with True.
    `tables(positions)`: positions int32 [B, S] -> (cos, sin) [B, S, 1, head_dim] (ones/zeros on the pass-through
    lanes); `static_tables(S)` -> the same for positions 0..S-1 as [1, S, 1, head_dim] (training, no padding).
    `apply(x, cos, sin)`: x [B, S, heads, head_dim] -> x * cos + rotate(x) * sin, where rotate(x) is x times a fixed
    signed permutation matrix (exact in any float dtype: every output lane is one input lane, maybe negated).
    `float16_frequencies`: round the inverse frequencies to float16, and with dtype float16 the angles too, as
    ChatGLM-6B computes them."""

    def __init__(self, head_dim, max_positions, rotary_dim=None, theta=10000.0, interleaved=False,
                 extend_method='None', scaling_factor=1.0, dtype='float32', float16_frequencies=False):
        super().__init__()
        rotary_dim = rotary_dim or head_dim
        self.head_dim, self.dtype = head_dim, to_mstype(dtype, 'rotary_dtype')
        inv_freq = rope_frequencies(rotary_dim, theta, extend_method, scaling_factor)
        positions = np.arange(max_positions, dtype=np.float32)
        if float16_frequencies:  # ChatGLM-6B keeps inv_freq in float16 (in a float16 model, the angles too)
            inv_freq = inv_freq.astype(np.float16).astype(np.float32)
        angles = positions[:, None] * inv_freq[None, :]  # [P, r/2], fp32
        if float16_frequencies and self.dtype == ms.float16:
            angles = angles.astype(np.float16).astype(np.float32)
        lanes = np.repeat(angles, 2, axis=1) if interleaved else np.concatenate([angles, angles], axis=1)
        cos = np.ones((max_positions, head_dim), np.float32)
        sin = np.zeros((max_positions, head_dim), np.float32)
        cos[:, :rotary_dim], sin[:, :rotary_dim] = np.cos(lanes), np.sin(lanes)
        self.cos_table, self.sin_table = Tensor(cos, self.dtype), Tensor(sin, self.dtype)
        self.matmul = ops.MatMul()
        self._rotate_with(rotation_matrix(head_dim, rotary_dim, interleaved))

    def _rotate_with(self, swap):
        """Use `swap` (NumPy [head_dim, head_dim]) as the rotation: x @ swap = rotate(x); in fp32 on CPU through one
        kernel pass each way (see `kernels.FusedRotary`)."""
        self.swap = Tensor(swap, self.dtype)
        self.fused = FusedRotary(swap) if use_fused(self.dtype) else None
        self.swap_lanes = swap

    def heads_kernel(self, scale):
        """A `FusedRotaryHeads` with this rotation: x [B, S, heads, head_dim] -> `apply`'s result times `scale` as
        [B, heads, S, head_dim], one kernel pass each way; only where `fused` runs."""
        return FusedRotaryHeads(self.swap_lanes, scale)

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
        if self.fused is not None:
            y = self.fused(x, cos, sin)
            return y if dtype == self.dtype else ops.cast(y, dtype)
        rotated = self.matmul(x.reshape(-1, self.head_dim), self.swap).reshape(x.shape)
        y = x * cos + rotated * sin
        return y if dtype == self.dtype else ops.cast(y, dtype)


class Rotary2DEmbedding(RotaryEmbedding):
    """GLM's 2-D RoPE (ChatGLM-6B): each `head_dim`-wide head is split into two halves; the first half is rotated
    by the first position row, the second half by the second (GLM's block positions), each rotate-half style over
    its own head_dim / 2 lanes with frequencies 1 / theta^(2i / (head_dim / 2)) rounded to float16 (see
    `RotaryEmbedding.float16_frequencies`).

    `tables(positions)`: int32 [B, 2, S] -> (cos, sin) [B, S, 1, head_dim]; `apply(x, cos, sin)` as in
    `RotaryEmbedding`, x [B, S, heads, head_dim]."""

    def __init__(self, head_dim, max_positions, theta=10000.0, dtype='float32'):
        if head_dim % 4:
            raise ValueError(f"2-D RoPE needs a head size divisible by 4 (two halves of lane pairs), got {head_dim}")
        super().__init__(head_dim // 2, max_positions, theta=theta, dtype=dtype, float16_frequencies=True)
        self.head_dim = head_dim  # the tables cover one half; apply() rotates both halves of the whole head
        half = rotation_matrix(head_dim // 2, head_dim // 2, interleaved=False)
        self._rotate_with(np.kron(np.eye(2, dtype=np.float32), half))

    def static_tables(self, seq):
        raise TypeError("Rotary2DEmbedding takes two position rows: use tables(positions [B, 2, S])")

    def tables(self, positions):
        batch, _, seq = positions.shape

        def both_halves(table):  # [B, 2, S, head_dim / 2] -> [B, S, 1, head_dim]: row 0's lanes, then row 1's
            return ops.transpose(ops.gather(table, positions, 0), (0, 2, 1, 3)).reshape(batch, seq, 1, self.head_dim)

        return both_halves(self.cos_table), both_halves(self.sin_table)
