"""Weight-only int8 formats: quantize a float weight [N, K] (N output features, K inputs) to int8 plus scales, and
back.

- `block32`: llama.cpp's Q8_0. Each run of 32 consecutive weights of a row gets d = max|x| / 127 (fp32) and
  q = roundf(x * (1 / d)) (ties away from zero; d == 0 gives q = 0); the scale kept is fp16(d), shape [N, K // 32]
  (8.5 bits per weight). As in llama.cpp, q is computed with the fp32 d and only the stored scale is rounded to fp16.
- `channel`: one fp32 d = max|x| / 127 per output row, same rounding; scale [N] fp32.

All arithmetic is fp32, so the result is the same on every machine. Rows are quantized a chunk at a time: a 7B
model's largest matrix needs only a few tens of MB beyond its input and output."""
import numpy as np

SCHEMES = ('block32', 'channel')
BLOCK = 32
_CHUNK_ELEMENTS = 1 << 22  # rows per pass: about 4M weights (16 MB of fp32 temporaries each)


def _check_scheme(scheme):
    if scheme not in SCHEMES:
        raise ValueError(f"unknown int8 scheme {scheme!r}; expected one of {SCHEMES}")


def _round_half_away(v):
    """C's roundf of fp32 values, exactly: the integer part plus one where the fraction is at least one half (the
    fraction of an fp32 value is exact in fp32)."""
    whole = np.trunc(v)
    return whole + np.sign(v) * (np.abs(v - whole) >= 0.5)


def _quantize_rows(rows, groups):
    """rows [n, groups * g] fp32 -> (q [n, groups * g] int8, d [n, groups] fp32), one d per run of g weights."""
    blocks = rows.reshape(rows.shape[0], groups, -1)
    d = np.abs(blocks).max(axis=-1) / np.float32(127)
    with np.errstate(divide='ignore'):
        inverse = np.where(d > 0, np.float32(1) / d, np.float32(0)).astype(np.float32)
    q = _round_half_away(blocks * inverse[..., None])
    return q.astype(np.int8).reshape(rows.shape), d


def quantize(weight, scheme='block32'):
    """weight [N, K] float (any float dtype; computed in fp32) -> (q int8 [N, K], scale): fp16 [N, K // 32] for
    `block32` (K must be a multiple of 32), fp32 [N] for `channel`. Non-finite weights raise ValueError."""
    _check_scheme(scheme)
    weight = np.asarray(weight)
    if weight.ndim != 2 or not np.issubdtype(weight.dtype, np.floating):
        raise ValueError(f"quantize needs a float weight [N, K], got {weight.dtype} {list(weight.shape)}")
    rows, cols = weight.shape
    if scheme == 'block32' and cols % BLOCK:
        raise ValueError(f"block32 needs K (the weight's last dimension) to be a multiple of {BLOCK}, got K = {cols}")
    groups = cols // BLOCK if scheme == 'block32' else 1
    q = np.empty((rows, cols), np.int8)
    d = np.empty((rows, groups), np.float32)
    step = max(1, _CHUNK_ELEMENTS // max(cols, 1))
    for first in range(0, rows, step):
        chunk = weight[first:first + step].astype(np.float32)
        if not np.isfinite(chunk).all():
            raise ValueError(f"cannot quantize a weight with inf or NaN (in rows {first}..{first + len(chunk) - 1})")
        q[first:first + step], d[first:first + step] = _quantize_rows(chunk, groups)
    if scheme == 'block32':
        return q, d.astype(np.float16)
    return q, d[:, 0]


def dequantize(q, scale, scheme='block32'):
    """(q int8 [N, K], scale as `quantize` gives it) -> fp32 [N, K] = q * scale (block32: the fp16 scale widened to
    fp32, one per 32 weights of a row)."""
    _check_scheme(scheme)
    q = np.asarray(q)
    scale = np.asarray(scale).astype(np.float32)
    rows, cols = q.shape
    if scheme == 'channel':
        if scale.shape != (rows,):
            raise ValueError(f"channel scale must be [{rows}] for q {list(q.shape)}, got {list(scale.shape)}")
        return q.astype(np.float32) * scale[:, None]
    if cols % BLOCK or scale.shape != (rows, cols // BLOCK):
        raise ValueError(f"block32 scale must be [{rows}, {cols // BLOCK}] for q {list(q.shape)} "
                         f"(K a multiple of {BLOCK}), got {list(scale.shape)}")
    blocks = q.reshape(rows, cols // BLOCK, BLOCK).astype(np.float32) * scale[..., None]
    return blocks.reshape(rows, cols)
