"""Int8 weight formats (llama.cpp Q8_0 `block32`, per-row `channel`): bit for bit equal to a plain per-block
reference written from the definition. The int8 linear kernel (`Int8Linear` in mindformers/kernels/int8.cc, native
and portable builds): equal to float64 NumPy `x @ dequantize(q, s).T` within 2e-6 of sum_k |x_k w_k| per output
(fp32 accumulation), on few rows (decode) and many (prefill), through ctypes and through `FusedInt8Linear`."""
import ctypes
import math
import platform

import numpy as np
import pytest
import mindspore as ms
from mindspore import Tensor

from mindformers import kernels
from mindformers.quantization import SCHEMES, dequantize, quantize

pytestmark = pytest.mark.usefixtures('cpu_kernels_on')


def _reference_quantize(weight, scheme):
    """One block at a time with Python scalars: d = fp32(amax) / 127 in fp32, id = 1 / d in fp32, q = C roundf of the
    fp32 product (exact in float64: floor(|v| + 0.5) with the sign put back)."""
    weight = np.asarray(weight, np.float32)
    rows, cols = weight.shape
    size = 32 if scheme == 'block32' else cols
    q = np.zeros((rows, cols), np.int8)
    scales = np.zeros((rows, cols // size), np.float32)
    for r in range(rows):
        for b in range(cols // size):
            block = weight[r, b * size:(b + 1) * size]
            d = np.float32(max(abs(float(v)) for v in block)) / np.float32(127)
            inverse = np.float32(1) / d if d != 0 else np.float32(0)
            for j, v in enumerate(block):
                product = float(np.float32(v) * inverse)
                q[r, b * size + j] = int(math.copysign(math.floor(abs(product) + 0.5), product))
            scales[r, b] = d
    return q, (scales.astype(np.float16) if scheme == 'block32' else scales[:, 0])


def _weights(rows, cols, seed):
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((rows, cols)).astype(np.float32) * rng.uniform(0.01, 3, (rows, 1)).astype(np.float32)
    w[0, :32] = 0  # an all-zero block: d = 0, q = 0
    w[-1, 5] = 40  # an outlier sets its block's scale
    return w


@pytest.mark.parametrize('scheme', SCHEMES)
@pytest.mark.parametrize('rows, cols', [(1, 32), (7, 96), (33, 256), (3, 4096)])
def test_quantize_equals_the_reference_bit_for_bit(scheme, rows, cols):
    weight = _weights(rows, cols, rows * cols)
    q, scale = quantize(weight, scheme)
    ref_q, ref_scale = _reference_quantize(weight, scheme)
    assert q.dtype == np.int8 and q.shape == (rows, cols)
    assert scale.dtype == (np.float16 if scheme == 'block32' else np.float32)
    assert scale.shape == ((rows, cols // 32) if scheme == 'block32' else (rows,))
    np.testing.assert_array_equal(q, ref_q)
    np.testing.assert_array_equal(scale.view(np.uint16 if scheme == 'block32' else np.uint32),
                                  ref_scale.view(np.uint16 if scheme == 'block32' else np.uint32))
    expected = ref_q.astype(np.float32).reshape(rows, -1, 32 if scheme == 'block32' else cols)
    expected = (expected * ref_scale.astype(np.float32).reshape(rows, -1, 1)).reshape(rows, cols)
    np.testing.assert_array_equal(dequantize(q, scale, scheme), expected)


def test_rounding_is_roundf_half_away_from_zero():
    # amax 127 -> d = 1, 1 / d = 1: the products are the values themselves
    block = np.array([127, 2.5, -2.5, 0.5, -0.5, 1.5, 0.49999997, -0.49999997, 126.5, -3.5] + [0] * 22, np.float32)
    q, scale = quantize(block[None], 'block32')
    assert scale[0, 0] == 1
    assert q[0, :10].tolist() == [127, 3, -3, 1, -1, 2, 0, 0, 127, -4]


def test_inputs_of_other_float_types_and_error_bound():
    weight = _weights(4, 64, 1)
    q16, s16 = quantize(weight.astype(np.float16), 'block32')
    np.testing.assert_array_equal(q16, quantize(weight.astype(np.float16).astype(np.float32), 'block32')[0])
    for scheme in SCHEMES:
        q, scale = quantize(weight, scheme)
        error = np.abs(dequantize(q, scale, scheme) - weight)
        step = np.abs(weight).reshape(4, -1, 32 if scheme == 'block32' else 64).max(-1) / 127
        # half a step, plus the fp16 rounding of the scale (relative 2^-11) times |q| <= 127
        bound = step * (0.5 + 127 * 2.0 ** -11) * 1.0001 + 127 * 2.0 ** -25  # + fp16 subnormal steps
        assert (error.reshape(4, -1, 32 if scheme == 'block32' else 64) <= bound[..., None]).all(), scheme


def test_bad_input_is_named():
    with pytest.raises(ValueError, match='K = 48'):
        quantize(np.zeros((2, 48), np.float32), 'block32')
    assert quantize(np.zeros((2, 48), np.float32), 'channel')[1].tolist() == [0, 0]
    with pytest.raises(ValueError, match='scheme'):
        quantize(np.zeros((2, 32), np.float32), 'q4')
    with pytest.raises(ValueError, match='NaN'):
        quantize(np.full((2, 32), np.nan, np.float32))
    with pytest.raises(ValueError, match='float weight'):
        quantize(np.zeros((2, 32), np.int8))
    with pytest.raises(ValueError, match='block32 scale'):
        dequantize(np.zeros((2, 64), np.int8), np.zeros((2, 3), np.float16), 'block32')


# ---- the kernel ----
RTOL = 2e-6


def _run(library, x, q, scale):
    """Int8Linear called as MindSpore calls an AOT kernel: (return code, y)."""
    y = np.full((x.shape[0], q.shape[0]), np.nan, np.float32)
    arrays = [np.ascontiguousarray(a) for a in (x, q, scale)] + [y]
    params = (ctypes.c_void_p * 4)(*[a.ctypes.data for a in arrays])
    ndims = (ctypes.c_int * 4)(*[a.ndim for a in arrays])
    dims = [(ctypes.c_int64 * a.ndim)(*a.shape) for a in arrays]
    shapes = (ctypes.POINTER(ctypes.c_int64) * 4)(*[ctypes.cast(d, ctypes.POINTER(ctypes.c_int64)) for d in dims])
    code = ctypes.CDLL(library).Int8Linear(4, params, ndims, shapes, None, None, None)
    return code, y


def _case(m_rows, k_dim, n_dim, scheme, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((m_rows, k_dim)).astype(np.float32)
    # rows of very different sizes: the smallest give subnormal fp16 block scales
    sizes = np.geomspace(1e-4, 1, n_dim, dtype=np.float32)[rng.permutation(n_dim), None]
    q, scale = quantize(rng.standard_normal((n_dim, k_dim)).astype(np.float32) * sizes, scheme)
    return x, q, scale


def _check(library, m_rows, k_dim, n_dim, scheme):
    x, q, scale = _case(m_rows, k_dim, n_dim, scheme, seed=m_rows * k_dim + n_dim)
    code, y = _run(library, x, q, scale)
    assert code == 0
    w = dequantize(q, scale, scheme).astype(np.float64)
    expected = x.astype(np.float64) @ w.T
    bound = RTOL * (np.abs(x).astype(np.float64) @ np.abs(w).T) + 1e-30
    assert np.all(np.abs(y - expected) <= bound), (np.abs(y - expected) / bound).max()


@pytest.fixture(scope='module')
def native():
    return kernels.build_library()


@pytest.fixture(scope='module')
def portable():
    """int8.cc alone, built without AVX-512 (AVX2), without AVX2 (AVX: bytes widened in plain C++) and without AVX
    (SSE4.1): the 8- and 4-lane code paths of x86-64."""
    if platform.machine() not in ('x86_64', 'AMD64'):
        pytest.fail('the portable builds are defined for x86-64; add flags for this machine')
    return [kernels.build_library(kernels.SOURCES[1:], flags) for flags in (['-mno-avx512f'], ['-mno-avx2'], ['-mno-avx'])]


def _lanes(library):
    return ctypes.CDLL(library).Int8Lanes()


def _cpu_flags():
    with open('/proc/cpuinfo', encoding='utf-8') as f:
        return next(line for line in f if line.startswith('flags')).split()


def test_native_build_uses_the_widest_vectors(native):
    flags = _cpu_flags()
    assert _lanes(native) == (16 if 'avx512f' in flags else 8 if 'avx' in flags else 4)


@pytest.mark.parametrize('scheme', SCHEMES)
@pytest.mark.parametrize('m_rows', [1, 3, 8, 16, 17, 128])
@pytest.mark.parametrize('k_dim, n_dim', [(32, 1), (96, 67), (4096, 129)])
def test_int8_linear_matches_numpy(native, m_rows, k_dim, n_dim, scheme):
    _check(native, m_rows, k_dim, n_dim, scheme)


@pytest.fixture(scope='module')
def without_amx():
    """The native build with AMX compiled out: 16 rows and more take the fp32 register kernels."""
    return kernels.build_library(kernels.SOURCES[1:], ['-mno-amx-tile'])


def test_amx_is_used_where_the_cpu_has_it(native, without_amx):
    flags = _cpu_flags()
    assert ctypes.CDLL(native).Int8UsesAmx() == int('amx_bf16' in flags and 'amx_tile' in flags)
    assert ctypes.CDLL(without_amx).Int8UsesAmx() == 0


@pytest.mark.parametrize('scheme', SCHEMES)
@pytest.mark.parametrize('m_rows, k_dim, n_dim', [(16, 32, 1), (17, 96, 49), (40, 1120, 50), (33, 4096, 97)])
def test_many_rows_match_numpy_with_and_without_amx(native, without_amx, m_rows, k_dim, n_dim, scheme):
    # 1120 inputs = two 512-input chunks and a 96-input rest when the packed rows outgrow L2 (AMX path);
    # 49, 50 and 97 weight rows: partial 48-row spans and 16-row tiles
    for library in (native, without_amx):
        _check(library, m_rows, k_dim, n_dim, scheme)


@pytest.mark.parametrize('m_rows, k_dim, n_dim', [(2, 50, 9), (40, 200, 101), (5, 7, 3)])
def test_channel_takes_any_input_width(native, m_rows, k_dim, n_dim):
    _check(native, m_rows, k_dim, n_dim, 'channel')


@pytest.mark.parametrize('scheme', SCHEMES)
def test_portable_builds_match_numpy(portable, scheme):
    assert [_lanes(library) for library in portable] == [8, 8, 4]
    for library in portable:
        for m_rows, k_dim, n_dim in ((1, 96, 67), (3, 4096, 5), (17, 256, 49), (128, 96, 131)):
            _check(library, m_rows, k_dim, n_dim, scheme)


def test_read_reference_sums_the_bytes(native):
    # benchmarks/int8.py's `read`: the bytes summed over the pool's threads (sums of at most 2^24 stay exact in fp32)
    data = np.random.default_rng(3).integers(-128, 128, 3 * 65536 + 77, dtype=np.int8)
    read = ctypes.CDLL(native).Int8ReadBytes
    read.argtypes, read.restype = [ctypes.c_void_p, ctypes.c_int64], ctypes.c_int64
    assert read(data.ctypes.data, data.nbytes) == int(data.astype(np.int64).sum())


def test_mismatched_shapes_are_refused(native):
    x, q, scale = _case(2, 64, 5, 'block32')
    assert _run(native, x[:, :32], q, scale)[0] == 1
    assert _run(native, x, q, scale[:, :1])[0] == 1
    assert _run(native, x, q, scale[:4])[0] == 1


@pytest.mark.parametrize('mode', [ms.PYNATIVE_MODE, ms.GRAPH_MODE])
def test_fused_int8_linear_cell_matches_numpy(mode):
    assert kernels.use_fused(ms.float32)
    ms.set_context(mode=mode)
    try:
        for scheme in SCHEMES:
            for m_rows in (3, 33):
                x, q, scale = _case(m_rows, 96, 77, scheme)
                y = kernels.FusedInt8Linear(scheme)(Tensor(x), Tensor(q), Tensor(scale)).asnumpy()
                expected = x.astype(np.float64) @ dequantize(q, scale, scheme).astype(np.float64).T
                np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)
            batched = kernels.FusedInt8Linear(scheme)(Tensor(x.reshape(3, 11, 96)), Tensor(q), Tensor(scale))
            assert batched.shape == (3, 11, 77)  # leading axes are rows
            np.testing.assert_allclose(batched.asnumpy().reshape(33, 77), expected, rtol=1e-5, atol=1e-5)
    finally:
        ms.set_context(mode=ms.GRAPH_MODE)
    with pytest.raises(ValueError, match='q4'):
        kernels.FusedInt8Linear('q4')
