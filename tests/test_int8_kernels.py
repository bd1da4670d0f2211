"""Int8 weight formats (llama.cpp Q8_0 `block32`, per-row `channel`): bit for bit equal to a plain per-block
reference written from the definition."""
import math

import numpy as np
import pytest

from mindformers.quantization import SCHEMES, dequantize, quantize


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
