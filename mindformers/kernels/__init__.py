"""Fused fp32 CPU kernels (tanh-GELU, LayerNorm, RMSNorm, SwiGLU, rotary embedding, causal softmax, causal
attention, decode attention, linear layers on few rows) and the int8-weight linear layer as MindSpore AOT custom ops,
compiled from `fused.cc` and `int8.cc` (sharing `common.h`'s thread pool) into one library on first use.

MindSpore runs every small op as its own pass over memory; on CPU the train step's elementwise work (LayerNorm's
backward above all) costs as much as its matrix products. These kernels do each of those in one pass. Decode steps
multiply one row (or a few) by every weight matrix, where MindSpore's MatMul reads the weights at half the speed the
cores allow; the few-rows linear kernel reads each weight row once for all rows, on every core.

They are used only when the device is CPU, the data is fp32, `MINDFORMERS_CPU_KERNELS` is not `0`, and `g++` builds
the library (once per machine and source version, cached under `$MINDFORMERS_CACHE/kernels`; extra compiler flags,
e.g. `-mno-avx512f` for the portable code paths, from `MINDFORMERS_CPU_KERNELS_FLAGS`). Otherwise the callers fall
back to plain MindSpore ops, after one warning saying why."""
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile

import numpy as np
import mindspore as ms
from mindspore import nn, ops, Tensor

from mindformers.tools.logger import logger
from mindformers.tools.utils import cache_dir

HERE = os.path.dirname(os.path.abspath(__file__))
SOURCES = [os.path.join(HERE, name) for name in ('fused.cc', 'int8.cc')]
HEADERS = [os.path.join(HERE, 'common.h')]
FLAGS = ['-O3', '-march=native', '-ffast-math', '-fopenmp-simd', '-pthread', '-shared', '-fPIC', '-std=c++17']
if platform.machine() in ('x86_64', 'AMD64'):
    FLAGS.append('-mprefer-vector-width=512')  # GCC's loops stay 256 bits wide on AVX-512 machines otherwise
_STATE = {}


def _cpu_signature():
    try:
        with open('/proc/cpuinfo', encoding='utf-8') as f:
            lines = [line for line in f if line.startswith(('model name', 'flags'))][:2]
    except OSError:
        lines = []
    return platform.machine() + ''.join(lines)


def build_library(sources=None, extra_flags=()):
    """Path of the library compiled from `sources` (default: all kernel sources) with FLAGS plus `extra_flags` (e.g.
    `-mno-avx512f` for the portable code paths), building it if needed; None (with a warning) when it cannot be
    built. Cached under `$MINDFORMERS_CACHE/kernels`, keyed by the sources, headers, flags and CPU."""
    compiler = shutil.which(os.environ.get('CXX', 'g++'))
    if compiler is None:
        logger.warning("fused CPU kernels disabled: no C++ compiler (g++) found; using plain MindSpore ops")
        return None
    sources = list(sources or SOURCES)
    flags = FLAGS + list(extra_flags)
    digest = hashlib.sha256()
    for path in sources + HEADERS:
        with open(path, 'rb') as f:
            digest.update(f.read())
    digest.update((' '.join(flags) + _cpu_signature()).encode())
    target = os.path.join(cache_dir('kernels'), f'fused_{digest.hexdigest()[:16]}.so')
    if os.path.isfile(target):
        return target
    handle, tmp = tempfile.mkstemp(suffix='.so', dir=os.path.dirname(target))
    os.close(handle)
    try:
        subprocess.run([compiler, *flags, *sources, '-o', tmp], check=True, capture_output=True, text=True,
                       timeout=600)
        os.replace(tmp, target)  # atomic: concurrent builders each rename a complete file
    except (OSError, subprocess.SubprocessError) as err:
        detail = getattr(err, 'stderr', '') or str(err)
        logger.warning("fused CPU kernels disabled: building %s failed (%s); using plain MindSpore ops",
                       ', '.join(sources), detail.strip().splitlines()[-1] if detail.strip() else type(err).__name__)
        return None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return target


def _build():
    if os.environ.get('MINDFORMERS_CPU_KERNELS', '1') == '0':
        return None
    return build_library(extra_flags=os.environ.get('MINDFORMERS_CPU_KERNELS_FLAGS', '').split())


def kernel_library():
    """The compiled kernel library path for this process, or None when the fused kernels are not to be used."""
    if 'library' not in _STATE:
        _STATE['library'] = _build() if ms.get_context('device_target') == 'CPU' else None
    return _STATE['library']


def use_fused(dtype):
    """Whether layers computing in `dtype` should use the fused kernels."""
    return dtype == ms.float32 and kernel_library() is not None


def _custom(name, out_shape, out_dtype, bprop=None):
    return ops.Custom(f"{kernel_library()}:{name}", out_shape=out_shape, out_dtype=out_dtype, func_type='aot',
                      bprop=bprop)


def _rows(shape):
    return [int(np.prod(shape[:-1]))]


class FusedGELU(nn.Cell):
    """tanh-GELU (= HF `gelu_new`), one pass forward and one backward; fp32, CPU (see `use_fused`)."""

    def __init__(self):
        super().__init__()
        self.forward = _custom('GeluForward', lambda x: x, lambda x: x)
        self.backward = _custom('GeluBackward', lambda x, dy: x, lambda x, dy: x)

    def construct(self, x):
        return self.forward(x)

    def bprop(self, x, out, dout):
        return (self.backward(x, dout),)


class _TwoInputs(nn.Cell):
    """A kernel of two inputs, `construct(a, b) -> [a's shape]`, whose backward kernel takes (a, b, dout) and gives
    the gradients of a and b."""

    def __init__(self, forward, backward):
        super().__init__()
        self.forward = _custom(forward, lambda a, b: a, lambda a, b: a)
        self.backward = _custom(backward, lambda a, b, d: (a, b), lambda a, b, d: (a, b))

    def construct(self, a, b):
        return self.forward(a, b)

    def bprop(self, a, b, out, dout):
        return self.backward(a, b, dout)


class FusedBiasGELU(_TwoInputs):
    """`construct(x [..., C], bias [C]) -> gelu(x + bias)` (the tanh-GELU of `FusedGELU`), one pass each way; the
    backward gives the bias gradient too (with `bias_grad=False`, for a frozen bias, zeros instead). fp32, CPU (see
    `use_fused`)."""

    def __init__(self, bias_grad=True):
        super().__init__('BiasGeluForward', 'BiasGeluBackward')
        self.bias_grad = bias_grad
        if not bias_grad:
            self.backward = _custom('BiasGeluInputBackward', lambda a, b, d: a, lambda a, b, d: a)

    def bprop(self, a, b, out, dout):
        if self.bias_grad:
            return self.backward(a, b, dout)
        return self.backward(a, b, dout), ops.zeros_like(b)


class FusedLayerNorm(nn.Cell):
    """`construct(x [..., h], weight [h], bias [h]) -> (y, mean [rows], rstd [rows])` over the last axis, one pass
    each way; fp32, CPU (see `use_fused`). With `param_grads=False` (a frozen weight and bias) the backward computes
    only the input gradient and gives zeros for weight and bias."""

    def __init__(self, eps, param_grads=True):
        super().__init__()
        self.eps = Tensor(np.array([eps], np.float32))
        self.param_grads = param_grads
        self.forward = _custom('LayerNormForward', lambda x, w, b, e: (x, _rows(x), _rows(x)),
                               lambda x, w, b, e: (x, x, x))
        if param_grads:
            self.backward = _custom('LayerNormBackward', lambda x, dy, w, m, r: (x, w, w),
                                    lambda x, dy, w, m, r: (x, x, x))
        else:
            self.backward = _custom('LayerNormInputBackward', lambda x, dy, w, m, r: x, lambda x, dy, w, m, r: x)

    def construct(self, x, weight, bias):
        return self.forward(x, weight, bias, self.eps)

    def bprop(self, x, weight, bias, out, dout):
        _, mean, rstd = out
        if self.param_grads:
            return self.backward(x, dout[0], weight, mean, rstd)
        return self.backward(x, dout[0], weight, mean, rstd), ops.zeros_like(weight), ops.zeros_like(bias)


class FusedRMSNorm(nn.Cell):
    """`construct(x [..., h], weight [h]) -> (y, rstd [rows])`, y = x * rsqrt(mean(x^2) + eps) * weight over the last
    axis, one pass each way (the backward gives the weight gradient too; with `weight_grad=False`, for a frozen
    weight, only the input gradient and zeros for the weight); fp32, CPU (see `use_fused`)."""

    def __init__(self, eps, weight_grad=True):
        super().__init__()
        self.eps = Tensor(np.array([eps], np.float32))
        self.weight_grad = weight_grad
        self.forward = _custom('RmsNormForward', lambda x, w, e: (x, _rows(x)), lambda x, w, e: (x, x))
        if weight_grad:
            self.backward = _custom('RmsNormBackward', lambda x, dy, w, r: (x, w), lambda x, dy, w, r: (x, x))
        else:
            self.backward = _custom('RmsNormInputBackward', lambda x, dy, w, r: x, lambda x, dy, w, r: x)

    def construct(self, x, weight):
        return self.forward(x, weight, self.eps)

    def bprop(self, x, weight, out, dout):
        if self.weight_grad:
            return self.backward(x, dout[0], weight, out[1])
        return self.backward(x, dout[0], weight, out[1]), ops.zeros_like(weight)


class FusedSwiGLU(_TwoInputs):
    """`construct(gate, up) -> silu(gate) * up`, elementwise (same shapes), one pass each way; fp32, CPU (see
    `use_fused`). Keeps only gate and up for the backward."""

    def __init__(self):
        super().__init__('SwiGluForward', 'SwiGluBackward')


class FusedRotary(nn.Cell):
    """`construct(x [B, S, heads, D], cos [1 or B, S, 1, D], sin) -> x * cos + (x @ swap) * sin` for a signed
    permutation `swap` [D, D] (NumPy) whose permutation is its own inverse (lane pairs swap, as every RoPE
    variant's rotation matrix does; all-zero columns are pass-through lanes). One pass each way; cos and sin get
    no gradient. fp32, CPU (see `use_fused`)."""

    def __init__(self, swap):
        super().__init__()
        swap = np.asarray(swap, np.float32)
        partner = np.where(swap.any(axis=0), np.abs(swap).argmax(axis=0), np.arange(len(swap)))
        if (partner[partner] != np.arange(len(swap))).any():
            raise ValueError("FusedRotary needs a rotation whose lane permutation is its own inverse")
        self.partner = Tensor(partner.astype(np.int32))
        self.sign = Tensor(swap[partner, np.arange(len(swap))])
        self.forward = _custom('RotaryForward', lambda x, *rest: x, lambda x, *rest: x)
        self.backward = _custom('RotaryBackward', lambda x, *rest: x, lambda x, *rest: x)

    def construct(self, x, cos, sin):
        return self.forward(x, cos, sin, self.partner, self.sign)

    def bprop(self, x, cos, sin, out, dout):
        return self.backward(dout, cos, sin, self.partner, self.sign), ops.zeros_like(cos), ops.zeros_like(sin)


def _heads_of_rows(x, *rest):
    return [x[0], x[2], x[1], x[3]]


class FusedRotaryHeads(FusedRotary):
    """`FusedRotary` straight into the per-head layout attention reads, times `scale`: `construct(x [B, S, heads,
    D], cos, sin) -> [B, heads, S, D]` in one pass each way (a Transpose and a Mul less each way)."""

    def __init__(self, swap, scale):
        super().__init__(swap)
        self.scale = Tensor(np.array([scale], np.float32))
        self.forward = _custom('RotaryHeadsForward', _heads_of_rows, lambda x, *rest: x)
        self.backward = _custom('RotaryHeadsBackward', _heads_of_rows, lambda x, *rest: x)

    def construct(self, x, cos, sin):
        return self.forward(x, cos, sin, self.partner, self.sign, self.scale)

    def bprop(self, x, cos, sin, out, dout):
        return (self.backward(dout, cos, sin, self.partner, self.sign, self.scale), ops.zeros_like(cos),
                ops.zeros_like(sin))


class FusedCausalSoftmax(nn.Cell):
    """softmax over the last axis of scores `[..., S, S]` with the causal mask applied inside (row q sees columns
    0..q; the others get probability 0), one pass each way; fp32, CPU (see `use_fused`). Only for the pure causal
    mask: padding or prefix masks need the general path."""

    def __init__(self):
        super().__init__()
        self.forward = _custom('CausalSoftmaxForward', lambda x: x, lambda x: x)
        self.backward = _custom('CausalSoftmaxBackward', lambda p, dp: p, lambda p, dp: p)

    def construct(self, scores):
        return self.forward(scores)

    def bprop(self, scores, out, dout):
        return (self.backward(out, dout),)


CACHE_KERNEL_SUFFIX = {ms.float32: '', ms.float16: 'F16'}


def _cache_kernel(name, cache_dtype):
    if cache_dtype not in CACHE_KERNEL_SUFFIX:
        raise ValueError(f"{name}: no kernel for a {cache_dtype} cache (accepted: float32, float16)")
    return name + CACHE_KERNEL_SUFFIX[cache_dtype]


class FusedDecodeAttention(nn.Cell):
    """One decode step of attention over an in-place KV cache; fp32 computation, the cache fp32 or fp16
    (`cache_dtype`: converted in registers as it is read and written, rounding to nearest even); CPU (see
    `use_fused`).

    `construct(query [B, Hq, 1, D] scaled, key [B, Hkv, 1, D], value [B, Hkv, 1, D], key_cache [B, Hkv, L, D],
    value_cache [S, Hkv, L, D], mask [B, 1, 1, L] additive, indices [B, Hkv, 1, 3] int32) -> context [B, Hq, 1, D]`.
    Writes each row's key/value into the cache Parameters at cache row `indices[b, 0, 0, 0]`, position
    `indices[b, 0, 0, 2]` (rows may differ), then attends over that cache row's positions up to it only. Rows may
    share a cache row (consecutive tokens of one sequence): each sees what the rows before it wrote. Inference only
    (no backward)."""

    def __init__(self, cache_dtype=ms.float32):
        super().__init__()
        self.attend = _custom(_cache_kernel('DecodeAttention', cache_dtype), lambda q, k, v, kc, vc, m, i: q,
                              lambda q, k, v, kc, vc, m, i: q)

    def construct(self, query, key, value, key_cache, value_cache, mask, indices):
        return self.attend(query, key, value, key_cache, value_cache, mask, indices)


class FusedColumnSum(nn.Cell):
    """`construct(x [..., C]) -> [C]`, the sum over all leading axes (a bias gradient); fp32, CPU (see `use_fused`).
    Deterministic: every column adds its rows in order."""

    def __init__(self):
        super().__init__()
        self.sum = _custom('ColumnSum', lambda x: x[-1:], lambda x: x)

    def construct(self, x):
        return self.sum(x)


class FusedTokenLogProbs(nn.Cell):
    """`construct(logits [N, V], index [N] int32 in [0, V)) -> (log_softmax(logits)[r, index[r]] [N], logsumexp
    [N])`: a token cross-entropy's core without materialising the [N, V] log-probabilities; one pass over the
    logits each way. fp32, CPU (see `use_fused`)."""

    def __init__(self):
        super().__init__()
        self.forward = _custom('TokenLogProbsForward', lambda x, i: (i, i), lambda x, i: (x, x))
        self.backward = _custom('TokenLogProbsBackward', lambda x, i, s, d: x, lambda x, i, s, d: x)

    def construct(self, logits, index):
        return self.forward(logits, index)

    def bprop(self, logits, index, out, dout):
        return self.backward(logits, index, out[1], dout[0]), ops.zeros_like(index)


class FusedLoRA(nn.Cell):
    """LoRA's update added to a Linear's output: `construct(x [M, K], y [M, N], a [r, K], b [N, r]) -> (y + h b^T
    [M, N], h [M, r])` with h = scale * x a^T, one pass over the rows; only the first output's gradient is used. The
    backward's input side (x's gradient and g = scale * dout b) is one pass too; the gradients of a and b are two
    MatMuls. fp32, CPU (see `use_fused`)."""

    def __init__(self, scale):
        super().__init__()
        self.scale = Tensor(np.array([scale], np.float32))
        self.forward = _custom('LoraForward', lambda x, y, a, b, s: (y, [y[0], a[0]]),
                               lambda x, y, a, b, s: (x, x))
        self.input_backward = _custom('LoraInputBackward', lambda d, a, b, s: ([d[0], a[1]], [d[0], a[0]]),
                                      lambda d, a, b, s: (d, d))
        self.factor_grad = ops.MatMul(transpose_a=True)

    def construct(self, x, y, a, b):
        return self.forward(x, y, a, b, self.scale)

    def bprop(self, x, y, a, b, out, dout):
        dx, g = self.input_backward(dout[0], a, b, self.scale)
        return dx, dout[0], self.factor_grad(g, x), self.factor_grad(dout[0], out[1])


class FusedSumOfSquares(nn.Cell):
    """`construct(tensors) -> [N]`: the sum of squares of each of N fp32 tensors, in one call (a global gradient
    norm). Accumulated in float64 in a fixed order, so the result does not depend on threading; CPU (see
    `use_fused`)."""

    def __init__(self):
        super().__init__()
        self.sums = _custom('SumOfSquares', lambda *shapes: [len(shapes)], lambda *dtypes: dtypes[0])

    def construct(self, tensors):
        return self.sums(*tensors)


class FusedAdamW(nn.Cell):
    """AdamW on N fp32 parameters in place, one pass over each element and one call for all of them:
    m = b1 m + w1 g; v = b2 v + w2 g^2; p = p (1 - lr wd) - step_size m / (sqrt(v) + eps).

    `construct(hyper [7] = (lr, step_size, eps, b1, b2, w1, w2), weight_decay [N], params, moments1, moments2,
    grads) -> done [1]`, all fp32; params and moments are Parameters, updated in place. Depend on `done` to order the
    update. One call consumes every gradient, so it runs after the whole backward pass has read the parameters.
    CPU (see `use_fused`)."""

    def __init__(self):
        super().__init__()
        self.update = _custom('AdamWUpdate', lambda *shapes: [1], lambda *dtypes: dtypes[0])

    def construct(self, hyper, weight_decay, params, moments1, moments2, grads):
        return self.update(hyper, weight_decay, *params, *moments1, *moments2, *grads)


class FusedBiasResidualAdd(nn.Cell):
    """`construct(x [M, C], bias [C], residual [M, C]) -> x + bias + residual`, one pass; the backward passes the
    gradient to x and residual and column-sums it for the bias. fp32, CPU (see `use_fused`)."""

    def __init__(self):
        super().__init__()
        self.add = _custom('BiasResidualAdd', lambda x, b, r: x, lambda x, b, r: x)
        self.column_sum = FusedColumnSum()

    def construct(self, x, bias, residual):
        return self.add(x, bias, residual)

    def bprop(self, x, bias, residual, out, dout):
        return dout, self.column_sum(dout), dout


class FusedDecodeAttentionPacked(nn.Cell):
    """`FusedDecodeAttention` on a packed projection: `construct(qkv [B, (Hq + 2 Hkv) D] (q | k | v, heads
    contiguous, unscaled), key_cache, value_cache, mask, indices, scale [1]) -> context [B, Hq D]`."""

    def __init__(self, cache_dtype=ms.float32):
        super().__init__()
        self.attend = _custom(_cache_kernel('DecodeAttentionPacked', cache_dtype),
                              lambda qkv, kc, vc, m, i, s: [qkv[0], qkv[1] - 2 * kc[1] * kc[3]],
                              lambda qkv, kc, vc, m, i, s: qkv)

    def construct(self, qkv, key_cache, value_cache, mask, indices, scale):
        return self.attend(qkv, key_cache, value_cache, mask, indices, scale)


FEW_ROWS = 64  # beyond it MatMul, which at 17-64 rows measured 2-3x slower than the few-rows kernel


class _FewRows(nn.Cell):
    """A linear layer on few rows (decode steps, short prompts; at most `FEW_ROWS`): each weight row is read once
    for all rows and the output features are split over the cores, which reads the weight about twice as fast as
    MatMul does on one row. Each row's result is the same bits whatever rows are beside it. x [M, K], weight [N, K]
    -> [M, N]; fp32, CPU (see `use_fused`). The backward is plain MatMuls."""

    def __init__(self, entry):
        super().__init__()
        self.op = _custom(entry, lambda x, w, *rest: [x[0], w[0]], lambda x, *rest: x)
        self.input_grad = ops.MatMul()
        self.weight_grad = ops.MatMul(transpose_a=True)

    def _grads(self, x, weight, dout):
        return self.input_grad(dout, weight), self.weight_grad(dout, x)


class FusedLinearFewRows(_FewRows):
    """`construct(x [M, K], weight [N, K]) -> x weight^T` [M, N] (see `_FewRows`)."""

    def __init__(self):
        super().__init__('LinearFewRows')

    def construct(self, x, weight):
        return self.op(x, weight)

    def bprop(self, x, weight, out, dout):
        return self._grads(x, weight, dout)


class FusedBiasLinearFewRows(_FewRows):
    """`construct(x [M, K], weight [N, K], bias [N]) -> x weight^T + bias` [M, N] (see `_FewRows`)."""

    def __init__(self):
        super().__init__('LinearFewRows')

    def construct(self, x, weight, bias):
        return self.op(x, weight, bias)

    def bprop(self, x, weight, bias, out, dout):
        return self._grads(x, weight, dout) + (dout.sum(0),)


class FusedResidualLinearFewRows(_FewRows):
    """`construct(x [M, K], weight [N, K], bias [N], residual [M, N]) -> residual + x weight^T + bias` [M, N]
    (see `_FewRows`)."""

    def __init__(self):
        super().__init__('LinearFewRowsResidual')

    def construct(self, x, weight, bias, residual):
        return self.op(x, weight, bias, residual)

    def bprop(self, x, weight, bias, residual, out, dout):
        return self._grads(x, weight, dout) + (dout.sum(0), dout)


def _heads_shape(rows_shape, groups, heads):
    batch, seq, width = rows_shape
    return [batch, heads, seq, width // (groups * heads)]


class FusedSplitHeads(nn.Cell):
    """`construct(x [B, S, groups * heads * D]) -> a tuple of groups (>= 2) tensors [B, heads, S, D]`, group g
    multiplied by `scales[g]` (default 1): a packed projection split into per-head layouts in one pass (MindSpore's
    Split plus a Transpose per group cost about four passes on CPU). fp32, CPU (see `use_fused`); the backward is
    the inverse kernel."""

    def __init__(self, groups, heads, scales=None):
        super().__init__()
        if groups < 2:
            raise ValueError(f"FusedSplitHeads needs at least 2 groups, got {groups}")
        self.scales = Tensor(np.ones(groups, np.float32) if scales is None else np.asarray(scales, np.float32))
        self.split = _custom('RowsToHeads', lambda x, *rest: tuple(_heads_shape(x, groups, heads)
                                                                     for _ in range(groups)),
                             lambda x, *rest: tuple(x for _ in range(groups)))
        self.merge = _custom('HeadsToRows', lambda *a: [a[0][0], a[0][2], groups * heads * a[0][3]],
                             lambda *a: a[0])

    def construct(self, x):
        return self.split(x, self.scales)

    def bprop(self, x, out, dout):
        return (self.merge(*dout, self.scales),)


class FusedBiasSplitHeads(FusedSplitHeads):
    """`FusedSplitHeads` with the projection's bias added in the same pass: `construct(x [B, S, groups * heads *
    D], bias [groups * heads * D])`."""

    def __init__(self, groups, heads, scales=None):
        super().__init__(groups, heads, scales)
        self.column_sum = FusedColumnSum()

    def construct(self, x, bias):
        return self.split(x, self.scales, bias)

    def bprop(self, x, bias, out, dout):
        dx = self.merge(*dout, self.scales)
        return dx, self.column_sum(dx)


class FusedMergeHeads(nn.Cell):
    """`construct(x [B, heads, S, D]) -> [B, S, heads * D]`, the heads' outputs back in rows, one pass each way;
    fp32, CPU (see `use_fused`)."""

    def __init__(self, heads):
        super().__init__()
        self.one = Tensor(np.ones(1, np.float32))
        self.merge = _custom('HeadsToRows', lambda x, s: [x[0], x[2], x[1] * x[3]], lambda x, s: x)
        self.split = _custom('RowsToHeads', lambda x, s: _heads_shape(x, 1, heads), lambda x, s: x)

    def construct(self, x):
        return self.merge(x, self.one)

    def bprop(self, x, out, dout):
        return (self.split(dout, self.one),)


class FusedToHeads(FusedMergeHeads):
    """The inverse of `FusedMergeHeads`: `construct(x [B, S, heads * D]) -> [B, heads, S, D]` times `scale`, one
    pass each way; fp32, CPU (see `use_fused`)."""

    def __init__(self, heads, scale=1.0):
        super().__init__(heads)
        self.one = Tensor(np.array([scale], np.float32))
        self.merge, self.split = self.split, self.merge  # construct splits rows into heads, bprop merges them


class FusedCausalAttention(nn.Cell):
    """`construct(query [B, H, S, D] already scaled, key [B, Hkv, S, D], value [B, Hkv, S, D]) -> context
    [B, H, S, D]`: softmax(q k^T) v per head with the causal mask (query row i sees keys 0..i), H a multiple of Hkv
    (query head h reads key/value head h // (H / Hkv)). fp32, CPU (see `use_fused`); no dropout.

    One kernel each way, skipping the masked half and never storing the [S, S] probabilities: the forward keeps each
    query row's logsumexp [B, H, S] and the backward recomputes the probabilities from it. dkey and dvalue are summed
    over each key/value head's query heads; results do not depend on threading."""

    def __init__(self):
        super().__init__()
        backward = _custom('CausalAttentionBackward', lambda q, k, v, lse, do: (q, k, v),
                           lambda q, k, v, lse, do: (q, k, v))

        def bprop(query, key, value, out, dout):  # out = (context, lse); lse is not differentiated
            return backward(query, key, value, out[1], dout[0])

        self.attend = _custom('CausalAttentionForward', lambda q, k, v: (q, q[:-1]), lambda q, k, v: (q, q), bprop)

    def construct(self, query, key, value):
        return self.attend(query, key, value)[0]


INT8_SCHEMES = ('block32', 'channel')


class FusedInt8Linear(nn.Cell):
    """`construct(x [M, K] fp32, weight int8 [N, K], scale) -> x dequantize(weight, scale)^T` [M, N] fp32, scale
    fp16 [N, K / 32] for `block32` (K a multiple of 32) or fp32 [N] for `channel` (the formats of
    `mindformers.quantization`). The weights are widened inside the kernel; activations stay fp32 and every product
    is exact. Few rows (decode) read each weight row once for all rows on every core; from 16 rows on, CPUs with AMX
    multiply bf16 tiles (the activations split into three bf16 terms), others cache-resident fp32 panels of the
    weight. CPU (see `use_fused`); inference only (no backward)."""

    def __init__(self, scheme='block32'):
        super().__init__()
        if scheme not in INT8_SCHEMES:
            raise ValueError(f"unknown int8 scheme {scheme!r}; expected one of {INT8_SCHEMES}")
        self.scheme = scheme
        self.op = _custom('Int8Linear', lambda x, w, s: list(x[:-1]) + [w[0]], lambda x, w, s: x)

    def construct(self, x, weight, scale):
        return self.op(x, weight, scale)
