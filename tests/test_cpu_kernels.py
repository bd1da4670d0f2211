"""Fused CPU kernels: same values and gradients as the plain-op layers, deterministic, and a clean fallback."""

import platform

import numpy as np
import pytest
import mindspore as ms
from mindspore import nn, ops, Parameter, ParameterTuple, Tensor

import mindformers.kernels as cpu_kernels
from mindformers.kernels import FusedCausalSoftmax, FusedGELU, FusedLayerNorm, kernel_library
from mindformers.modules.layers import LayerNorm, TanhGELU
from helpers.kernel_checks import ProbeAll, call_kernel


# the kernels run here even when the suite runs with MINDFORMERS_CPU_KERNELS=0
pytestmark = pytest.mark.usefixtures('cpu_kernels_on')


class _Probe(nn.Cell):
    """sum(f(x) * weights): a loss whose gradient reaches every element with a different weight."""

    def __init__(self, fn, shape, weight=None, bias=None):
        super().__init__()
        self.fn = fn
        self.probe = Tensor(np.random.default_rng(7).standard_normal(shape).astype(np.float32))
        self.weight = Parameter(Tensor(weight), name='weight') if weight is not None else None
        self.bias = Parameter(Tensor(bias), name='bias') if bias is not None else None

    def construct(self, x):
        y = self.fn(x) if self.weight is None else self.fn(x, self.weight, self.bias)[0]
        return (y * self.probe).sum()


def value_and_grads(cell, x):
    params = cell.trainable_params()
    value, grads = ms.value_and_grad(cell, 0, params if params else None)(x)
    if params:
        return value.asnumpy(), [grads[0].asnumpy()] + [g.asnumpy() for g in grads[1]]
    return value.asnumpy(), [grads.asnumpy()]


def test_library_builds_here():
    assert kernel_library() is not None and kernel_library().endswith('.so')


@pytest.mark.parametrize('shape', [(2, 37, 129), (5, 2048), (1, 1, 3), (4, 40000)])
def test_gelu_matches_plain_ops(shape):
    x = Tensor(np.random.default_rng(0).standard_normal(shape).astype(np.float32) * 3)
    fused = value_and_grads(_Probe(FusedGELU(), shape), x)
    plain_gelu = TanhGELU()
    plain_gelu.fused = None
    plain = value_and_grads(_Probe(plain_gelu, shape), x)
    np.testing.assert_allclose(fused[0], plain[0], rtol=1e-5)
    np.testing.assert_allclose(fused[1][0], plain[1][0], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize('shape', [(3, 37, 129), (130, 64), (1, 7), (1000, 128)])
def test_layer_norm_matches_plain_ops(shape):
    rng = np.random.default_rng(1)
    x = Tensor((rng.standard_normal(shape) * 2 + 0.5).astype(np.float32))
    weight = rng.standard_normal(shape[-1]).astype(np.float32)
    bias = rng.standard_normal(shape[-1]).astype(np.float32)
    plain_norm = ops.LayerNorm(begin_norm_axis=-1, begin_params_axis=-1, epsilon=1e-5)
    fused = value_and_grads(_Probe(FusedLayerNorm(1e-5), shape, weight, bias), x)
    plain = value_and_grads(_Probe(plain_norm, shape, weight, bias), x)
    np.testing.assert_allclose(fused[0], plain[0], rtol=1e-5, atol=1e-4)
    for ours, reference, name in zip(fused[1], plain[1], ('dx', 'dweight', 'dbias')):
        scale = np.abs(reference).max()
        assert np.abs(ours - reference).max() <= 1e-5 * scale + 1e-6, name


class _MaskedSoftmax(nn.Cell):
    def __init__(self, mask):
        super().__init__()
        self.mask = mask

    def construct(self, scores):
        return ops.softmax(scores + self.mask, axis=-1)


@pytest.mark.parametrize('shape', [(2, 3, 17, 17), (2, 4, 128, 128), (1, 2, 1, 1)])
def test_causal_softmax_matches_masked_softmax(shape):
    scores = Tensor((np.random.default_rng(3).standard_normal(shape) * 4).astype(np.float32))
    seq = shape[-1]
    mask = Tensor(np.triu(np.full((seq, seq), -1e9, np.float32), 1))
    fused = value_and_grads(_Probe(FusedCausalSoftmax(), shape), scores)
    plain = value_and_grads(_Probe(_MaskedSoftmax(mask), shape), scores)
    np.testing.assert_allclose(fused[0], plain[0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(fused[1][0], plain[1][0], rtol=1e-4, atol=1e-6)
    probs = FusedCausalSoftmax()(scores).asnumpy()
    assert np.all(probs[..., np.triu_indices(seq, 1)[0], np.triu_indices(seq, 1)[1]] == 0)


def test_fused_backward_is_bit_reproducible():
    shape = (3000, 96)  # large enough to run on several threads
    x = Tensor(np.random.default_rng(2).standard_normal(shape).astype(np.float32))
    ones, zeros = np.ones(96, np.float32), np.zeros(96, np.float32)
    runs = [value_and_grads(_Probe(FusedLayerNorm(1e-5), shape, ones, zeros), x) for _ in range(3)]
    for run in runs[1:]:
        for a, b in zip(run[1], runs[0][1]):
            assert np.array_equal(a, b)


def test_layers_pick_the_fused_path_only_when_allowed():
    assert isinstance(LayerNorm(64).norm, FusedLayerNorm)
    from mindformers.core.parallel_config import ParallelConfig
    sharded = LayerNorm(64, parallel_config=ParallelConfig(data_parallel=2))
    assert isinstance(sharded.norm, ops.Primitive)  # strategies are kept for Ascend/GPU layouts
    assert isinstance(LayerNorm(64, compute_type='float16').norm, ops.Primitive)


def test_build_failure_and_opt_out_fall_back(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv('MINDFORMERS_CACHE', str(tmp_path))
    monkeypatch.setenv('CXX', 'no-such-compiler-here')
    assert cpu_kernels._build() is None
    assert 'no C++ compiler' in capsys.readouterr().err
    monkeypatch.setenv('CXX', 'false')  # a "compiler" that fails
    assert cpu_kernels._build() is None
    assert 'building' in capsys.readouterr().err and not list(tmp_path.rglob('*.so'))
    monkeypatch.delenv('CXX')
    monkeypatch.setenv('MINDFORMERS_CPU_KERNELS', '0')
    assert cpu_kernels._build() is None


@pytest.mark.parametrize('cache_dtype', [np.float32, np.float16])
@pytest.mark.parametrize('batch, heads, kv_heads', [(3, 4, 4), (2, 4, 2), (1, 64, 64)])
def test_decode_attention_writes_the_cache_and_matches_plain_ops(batch, heads, kv_heads, cache_dtype):
    """A decode step's attention over a session's cache, each row at its own position (slots of different
    lengths): the fused kernel and plain MindSpore ops store the same keys/values and match NumPy; fp32 computation
    over an fp32 or fp16 cache (the plain ops cast it, the kernel converts in registers)."""
    from mindformers.generation.session import KVCache
    from mindformers.modules.attention import DotProductAttention
    length, dim = 24, 16
    positions = np.array([9, 4, 15])[:batch]
    rng = np.random.default_rng(4)
    query = rng.standard_normal((batch, heads, 1, dim)).astype(np.float32)
    key, value = (rng.standard_normal((batch, kv_heads, 1, dim)).astype(np.float32) for _ in range(2))
    history = rng.standard_normal((2, batch, kv_heads, length, dim)).astype(cache_dtype)
    valid = np.zeros((batch, length), bool)
    for row, position in enumerate(positions):
        history[:, row, :, position:] = 0  # nothing written at or after the row's position yet
        valid[row, :position + 1] = True
    valid[0, :3] = False  # left padding in row 0
    mask = np.where(valid, 0.0, -1e9).astype(np.float32)[:, None, None, :]
    indices = np.zeros((batch, kv_heads, 1, 3), np.int32)
    indices[..., 0] = np.arange(batch)[:, None, None]
    indices[..., 1] = np.arange(kv_heads)[None, :, None]
    indices[..., 2] = positions[:, None, None]
    results = []
    for fused in (True, False):
        cache = KVCache(1, batch, kv_heads, length, dim, ms.float16 if cache_dtype == np.float16 else ms.float32,
                        compute_dtype=ms.float32)
        layer = cache.decode.layers[0]
        assert layer.fused_attention is not None
        if not fused:
            layer.fused_attention = None
        cache.keys[0].data.set_data(Tensor(history[0]))
        cache.values[0].data.set_data(Tensor(history[1]))
        out = layer.attend(*map(Tensor, (query, key, value, mask, indices)), DotProductAttention()).asnumpy()
        results.append((out, cache.keys[0].data.asnumpy(), cache.values[0].data.asnumpy()))
    (out, keys, values), (plain_out, plain_keys, plain_values) = results
    np.testing.assert_allclose(out, plain_out, rtol=1e-5, atol=1e-5)
    assert out.dtype == np.float32 and keys.dtype == cache_dtype
    assert np.array_equal(keys, plain_keys) and np.array_equal(values, plain_values)
    group = heads // kv_heads
    for row, position in enumerate(positions):
        np.testing.assert_array_equal(keys[row, :, position], key[row, :, 0].astype(cache_dtype))
        np.testing.assert_array_equal(values[row, :, position], value[row, :, 0].astype(cache_dtype))
        keys_q = np.repeat(keys[row], group, axis=0)[:, :position + 1].astype(np.float64)
        values_q = np.repeat(values[row], group, axis=0)[:, :position + 1].astype(np.float64)
        scores = query[row] @ keys_q.transpose(0, 2, 1) + mask[row, :, :, :position + 1]
        probs = np.exp(scores - scores.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        np.testing.assert_allclose(out[row], probs @ values_q, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('cache_dtype', [np.float32, np.float16])
def test_decode_attention_rows_name_their_cache_rows(cache_dtype):
    """Rows of a step that name their cache row (`indices[b, :, 0, 0]`), several tokens of one sequence among them
    (a prompt read in chunks while others decode): every key/value is written before any row attends, each row sees
    its cache row up to its own position; the packed kernel agrees with the plain one. Against NumPy."""
    from mindformers.kernels import FusedDecodeAttention, FusedDecodeAttentionPacked
    heads, kv_heads, length, dim = 4, 2, 16, 8
    slots, positions = np.array([2, 0, 0, 0, 2, 1]), np.array([5, 3, 4, 5, 6, 0])
    batch, rng = len(slots), np.random.default_rng(21)
    qkv = rng.standard_normal((batch, (heads + 2 * kv_heads) * dim)).astype(np.float32)
    history = rng.standard_normal((2, 3, kv_heads, length, dim)).astype(cache_dtype)
    mask = np.zeros((batch, 1, 1, length), np.float32)
    mask[0, ..., 1] = -1e9  # a hidden (padding) position of slot 2
    indices = np.stack([np.broadcast_to(slots[:, None], (batch, kv_heads)),
                        np.broadcast_to(np.arange(kv_heads), (batch, kv_heads)),
                        np.broadcast_to(positions[:, None], (batch, kv_heads))], -1)[:, :, None].astype(np.int32)
    scale = 0.25
    query = qkv[:, :heads * dim].reshape(batch, heads, 1, dim) * scale
    key = qkv[:, heads * dim:(heads + kv_heads) * dim].reshape(batch, kv_heads, 1, dim)
    value = qkv[:, (heads + kv_heads) * dim:].reshape(batch, kv_heads, 1, dim)
    caches = [[ms.Parameter(Tensor(h.copy()), name=f'rows{i}{j}') for j, h in enumerate(history)] for i in range(2)]
    dtype = ms.float16 if cache_dtype == np.float16 else ms.float32
    attend = FusedDecodeAttention(dtype)
    plain = attend(*map(Tensor, (query, key, value)), *caches[0], Tensor(mask), Tensor(indices)).asnumpy()
    packed = FusedDecodeAttentionPacked(dtype)(
        Tensor(qkv), *caches[1], Tensor(mask), Tensor(indices), Tensor(np.array([scale], np.float32))).asnumpy()
    np.testing.assert_allclose(packed, plain.reshape(batch, heads * dim), rtol=1e-5, atol=1e-6)
    expected = history.copy()
    for row, (slot, position) in enumerate(zip(slots, positions)):
        expected[0, slot, :, position], expected[1, slot, :, position] = key[row, :, 0], value[row, :, 0]
    for cache in caches:
        np.testing.assert_array_equal(cache[0].asnumpy(), expected[0])
        np.testing.assert_array_equal(cache[1].asnumpy(), expected[1])
    group = heads // kv_heads
    for row, (slot, position) in enumerate(zip(slots, positions)):
        keys_q = np.repeat(expected[0, slot], group, axis=0)[:, :position + 1].astype(np.float64)
        values_q = np.repeat(expected[1, slot], group, axis=0)[:, :position + 1].astype(np.float64)
        scores = query[row] @ keys_q.transpose(0, 2, 1) + mask[row, :, :, :position + 1]
        probs = np.exp(scores - scores.max(-1, keepdims=True))
        np.testing.assert_allclose(plain[row], probs / probs.sum(-1, keepdims=True) @ values_q, rtol=1e-5,
                                   atol=1e-5)
    indices[3, :, 0, 0] = 3  # a cache row that does not exist: the kernel refuses
    with pytest.raises(RuntimeError):
        attend(*map(Tensor, (query, key, value)), *caches[0], Tensor(mask), Tensor(indices)).asnumpy()


@pytest.mark.parametrize('shape', [(7, 5), (2048, 1536), (3, 4, 300)])
def test_column_sum_matches_numpy_and_bias_gradient(shape):
    from mindformers.kernels import FusedColumnSum
    from mindformers.modules.layers import Linear
    dy = np.random.default_rng(5).standard_normal(shape).astype(np.float32)
    total = FusedColumnSum()(Tensor(dy)).asnumpy()
    np.testing.assert_allclose(total, dy.reshape(-1, shape[-1]).sum(0, dtype=np.float64), rtol=1e-4, atol=1e-4)
    linear = Linear(shape[-1], 3)
    assert isinstance(linear.bias_add.column_sum, FusedColumnSum)
    plain = Linear(shape[-1], 3)
    plain.bias_add.column_sum = ops.ReduceSum()
    x = Tensor(dy)
    grads = [ms.grad(layer, None, layer.bias)(x).asnumpy() for layer in (linear, plain)]
    np.testing.assert_allclose(grads[0], grads[1], rtol=1e-5, atol=1e-4)


def test_sharded_linear_keeps_the_plain_column_sum():
    from mindformers.core.parallel_config import ParallelConfig
    from mindformers.kernels import FusedColumnSum
    from mindformers.modules.layers import Linear
    assert isinstance(Linear(8, 8, split='column').bias_add.column_sum, FusedColumnSum)
    sharded = Linear(8, 8, split='column', parallel_config=ParallelConfig(model_parallel=2))
    assert not isinstance(sharded.bias_add.column_sum, FusedColumnSum)


def test_packed_decode_attention_equals_the_unpacked_kernel():
    from mindformers.kernels import FusedDecodeAttention, FusedDecodeAttentionPacked
    batch, heads, kv_heads, length, dim, position = 3, 4, 2, 20, 8, 6
    rng = np.random.default_rng(8)
    qkv = rng.standard_normal((batch, (heads + 2 * kv_heads) * dim)).astype(np.float32)
    history = rng.standard_normal((2, batch, kv_heads, length, dim)).astype(np.float32)
    mask = np.zeros((batch, 1, 1, length), np.float32)
    mask[1, ..., :2] = -1e9
    indices = np.zeros((batch, kv_heads, 1, 3), np.int32)
    indices[..., 0] = np.arange(batch)[:, None, None]
    indices[..., 2] = position
    scale = 0.125
    query = qkv[:, :heads * dim].reshape(batch, heads, 1, dim) * scale
    key = qkv[:, heads * dim:(heads + kv_heads) * dim].reshape(batch, kv_heads, 1, dim)
    value = qkv[:, (heads + kv_heads) * dim:].reshape(batch, kv_heads, 1, dim)
    caches = [[ms.Parameter(Tensor(h.copy()), name=f'c{i}{j}') for j, h in enumerate(history)] for i in range(2)]
    packed = FusedDecodeAttentionPacked()(Tensor(qkv), *caches[0], Tensor(mask), Tensor(indices),
                                          Tensor(np.array([scale], np.float32))).asnumpy()
    plain = FusedDecodeAttention()(*map(Tensor, (query, key, value)), *caches[1], Tensor(mask),
                                   Tensor(indices)).asnumpy()
    np.testing.assert_allclose(packed, plain.reshape(batch, heads * dim), rtol=1e-5, atol=1e-6)
    for ours, theirs in zip(caches[0], caches[1]):
        np.testing.assert_array_equal(ours.asnumpy(), theirs.asnumpy())
    np.testing.assert_array_equal(caches[0][0].asnumpy()[:, :, position], key[:, :, 0])


def test_linear_few_rows_gives_a_row_the_same_bits_whatever_rows_beside_it():
    """A decode row's logits must not depend on which other requests share its step (continuous batching)."""
    from mindformers.kernels import FusedBiasLinearFewRows
    rng = np.random.default_rng(3)
    x = rng.standard_normal((64, 200)).astype(np.float32)
    weight, bias = rng.standard_normal((70, 200)).astype(np.float32), rng.standard_normal(70).astype(np.float32)
    kernel = FusedBiasLinearFewRows()
    together = kernel(Tensor(x), Tensor(weight), Tensor(bias)).asnumpy()
    for rows in (slice(0, 1), slice(5, 8), slice(3, 16), slice(8, 16), slice(13, 50), slice(60, 64)):
        alone = kernel(Tensor(x[rows]), Tensor(weight), Tensor(bias)).asnumpy()
        np.testing.assert_array_equal(alone, together[rows])


@pytest.mark.parametrize('rows, in_features, out_features', [(1, 512, 1536), (3, 37, 130), (16, 40, 259), (1, 1, 1),
                                                            (5, 96, 7), (8, 33, 66)])
def test_linear_few_rows_matches_numpy_both_ways(rows, in_features, out_features):
    from mindformers.kernels import (FusedBiasLinearFewRows, FusedLinearFewRows,
                                                 FusedResidualLinearFewRows)
    rng = np.random.default_rng(9)
    shapes = ((rows, in_features), (out_features, in_features), (out_features,), (rows, out_features))
    x, weight, bias, residual = (rng.standard_normal(s).astype(np.float32) for s in shapes)
    probe = rng.standard_normal((rows, out_features))
    exact = x.astype(np.float64) @ weight.T.astype(np.float64)
    grads = [probe @ weight, probe.T @ x, probe.sum(0), probe]  # of sum(output * probe) w.r.t. each input
    tol = dict(rtol=1e-5, atol=1e-5 * np.sqrt(max(in_features, rows)))
    for kernel, inputs, expected in ((FusedLinearFewRows(), (x, weight), exact),
                                     (FusedBiasLinearFewRows(), (x, weight, bias), exact + bias),
                                     (FusedResidualLinearFewRows(), (x, weight, bias, residual),
                                      exact + bias + residual)):
        tensors = [Tensor(a) for a in inputs]
        np.testing.assert_allclose(kernel(*tensors).asnumpy(), expected, **tol)
        got = ms.grad(ProbeAll(kernel, probe.astype(np.float32)), tuple(range(len(inputs))))(*tensors)
        for g, want in zip(got, grads):
            np.testing.assert_allclose(g.asnumpy(), want, **tol)


@pytest.fixture(scope='module')
def few_rows_builds():
    """fused.cc built for this CPU and without AVX-512 (the portable tile), as {name: library}."""
    builds = {'native': cpu_kernels.build_library(cpu_kernels.SOURCES[:1])}
    if platform.machine() in ('x86_64', 'AMD64'):
        builds['portable'] = cpu_kernels.build_library(cpu_kernels.SOURCES[:1], ['-mno-avx512f'])
    assert all(builds.values())
    return builds


def _at_line_offset(a, offset):
    """A copy of `a` starting `offset` bytes past a 64-byte line (MindSpore's tensors start 16 bytes past one)."""
    buffer = np.empty(a.nbytes + 64 + offset, np.uint8)
    start = (-buffer.ctypes.data) % 64 + offset
    copy = buffer[start:start + a.nbytes].view(a.dtype).reshape(a.shape)
    copy[...] = a
    return copy


@pytest.mark.parametrize('rows', [1, 3, 8, 12, 16, 37, 64])
def test_linear_few_rows_builds_match_numpy(few_rows_builds, rows):
    """Both builds' tiles (4 rows x 4 features, 8 rows x 4 features on AVX-512 up to 512 input features, the weight
    rows tiles ahead prefetched) on widths and feature counts that are not multiples of the tile or the vector, with
    and without bias and residual, and x on a 64-byte line or 16 bytes past one (the same bits either way)."""
    rng = np.random.default_rng(rows)
    for k_dim, n_dim in ((100, 203), (530, 131), (7, 70), (16, 9), (512, 38)):
        x, residual = rng.standard_normal((rows, k_dim)), rng.standard_normal((rows, n_dim))
        weight, bias = rng.standard_normal((n_dim, k_dim)), rng.standard_normal(n_dim)
        x, residual, weight, bias = (a.astype(np.float32) for a in (x, residual, weight, bias))
        exact = x.astype(np.float64) @ weight.T.astype(np.float64)
        bound = 2e-6 * (np.abs(x).astype(np.float64) @ np.abs(weight).T) + 1e-6
        for name, library in few_rows_builds.items():
            for entry, inputs, expected in (('LinearFewRows', (x, weight), exact),
                                            ('LinearFewRows', (x, weight, bias), exact + bias),
                                            ('LinearFewRowsResidual', (x, weight, bias, residual),
                                             exact + bias + residual)):
                outputs = []
                for offset in (0, 16):
                    code, y = call_kernel(library, entry, (_at_line_offset(inputs[0], offset),) + inputs[1:],
                                          (rows, n_dim))
                    assert code == 0
                    error = np.abs(y - expected) / bound
                    assert error.max() <= 1, (name, entry, k_dim, n_dim, offset, error.max())
                    outputs.append(y)
                np.testing.assert_array_equal(outputs[0], outputs[1])


@pytest.mark.parametrize('rows', [2, 17, 65])
def test_linear_and_mlp_take_the_few_rows_kernel_with_the_same_values(rows):
    """Up to FEW_ROWS rows go through the few-rows kernel, more through MatMul; both give the plain NumPy values,
    a `residual` argument adds it, and gradients flow either way."""
    from mindformers.modules.layers import Linear
    from mindformers.modules.mlp import MLP
    rng = np.random.default_rng(10)
    x, residual = (rng.standard_normal((rows, 24)).astype(np.float32) for _ in range(2))
    linear, mlp = Linear(24, 24), MLP(24, 48)
    assert linear.few_rows is not None and linear.few_rows_residual is not None
    for layer in (linear, mlp.fc_in, mlp.fc_out):
        layer.bias.set_data(Tensor(rng.standard_normal(layer.out_features).astype(np.float32)))
    weight, bias = linear.weight.asnumpy(), linear.bias.asnumpy()
    expected = x @ weight.T + bias
    np.testing.assert_allclose(linear(Tensor(x)).asnumpy(), expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(linear(Tensor(x), residual=Tensor(residual)).asnumpy(), expected + residual,
                               rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(mlp(Tensor(x), residual=Tensor(residual)).asnumpy(),
                               mlp(Tensor(x)).asnumpy() + residual, rtol=1e-5, atol=1e-5)
    ones = np.ones((rows, 24), np.float32)
    weight_grad = ms.grad(ProbeAll(linear, ones), None, linear.weight)(Tensor(x)).asnumpy()
    np.testing.assert_allclose(weight_grad, np.tile(x.sum(0), (24, 1)), rtol=1e-5, atol=1e-5)


def test_split_and_merge_heads_match_numpy_both_ways():
    from mindformers.kernels import FusedMergeHeads, FusedSplitHeads
    batch, seq, heads, dim = 2, 5, 3, 4
    rng = np.random.default_rng(11)
    x = rng.standard_normal((batch, seq, 3 * heads * dim)).astype(np.float32)
    scales = np.array([0.5, 1.0, 2.0], np.float32)
    per_head = x.reshape(batch, seq, 3, heads, dim).transpose(2, 0, 3, 1, 4)  # [3, B, H, S, D]
    outputs = FusedSplitHeads(3, heads, scales)(Tensor(x))
    for got, part, scale in zip(outputs, per_head, scales):
        np.testing.assert_allclose(got.asnumpy(), part * scale, rtol=1e-6)
    probes = rng.standard_normal((3, batch, heads, seq, dim)).astype(np.float32)

    class SplitLoss(nn.Cell):
        def __init__(self):
            super().__init__()
            self.split, self.probes = FusedSplitHeads(3, heads, scales), Tensor(probes)

        def construct(self, rows):
            q, k, v = self.split(rows)
            return (q * self.probes[0]).sum() + (k * self.probes[1]).sum() + (v * self.probes[2]).sum()

    expected = (probes * scales[:, None, None, None, None]).transpose(1, 3, 0, 2, 4).reshape(x.shape)
    np.testing.assert_allclose(ms.grad(SplitLoss())(Tensor(x)).asnumpy(), expected, rtol=1e-6)
    context = probes[0]
    merged = FusedMergeHeads(heads)(Tensor(context)).asnumpy()
    np.testing.assert_array_equal(merged, context.transpose(0, 2, 1, 3).reshape(batch, seq, heads * dim))
    probe = rng.standard_normal(merged.shape).astype(np.float32)
    grad = ms.grad(ProbeAll(FusedMergeHeads(heads), probe))(Tensor(context)).asnumpy()
    np.testing.assert_array_equal(grad, probe.reshape(batch, seq, heads, dim).transpose(0, 2, 1, 3))


def test_split_heads_with_bias_matches_numpy_both_ways():
    from mindformers.kernels import FusedBiasSplitHeads
    batch, seq, heads, dim = 2, 5, 3, 4
    rng = np.random.default_rng(13)
    x = rng.standard_normal((batch, seq, 3 * heads * dim)).astype(np.float32)
    bias = rng.standard_normal(3 * heads * dim).astype(np.float32)
    scales = np.array([0.5, 1.0, 2.0], np.float32)
    probes = rng.standard_normal((3, batch, heads, seq, dim)).astype(np.float32)
    per_head = (x + bias).reshape(batch, seq, 3, heads, dim).transpose(2, 0, 3, 1, 4)
    for got, part, scale in zip(FusedBiasSplitHeads(3, heads, scales)(Tensor(x), Tensor(bias)), per_head, scales):
        np.testing.assert_allclose(got.asnumpy(), part * scale, rtol=1e-6)

    class SplitLoss(nn.Cell):
        def __init__(self):
            super().__init__()
            self.split, self.probes = FusedBiasSplitHeads(3, heads, scales), Tensor(probes)

        def construct(self, rows, bias):
            q, k, v = self.split(rows, bias)
            return (q * self.probes[0]).sum() + (k * self.probes[1]).sum() + (v * self.probes[2]).sum()

    dx, dbias = ms.grad(SplitLoss(), (0, 1))(Tensor(x), Tensor(bias))
    expected = (probes * scales[:, None, None, None, None]).transpose(1, 3, 0, 2, 4).reshape(x.shape)
    np.testing.assert_allclose(dx.asnumpy(), expected, rtol=1e-6)
    np.testing.assert_allclose(dbias.asnumpy(), expected.sum((0, 1)), rtol=1e-5, atol=1e-6)


def _gelu64(v):
    """tanh-GELU and its derivative in float64."""
    c = np.sqrt(2 / np.pi)
    t = np.tanh(c * (v + 0.044715 * v ** 3))
    return 0.5 * v * (1 + t), 0.5 * (1 + t) + 0.5 * v * (1 - t * t) * c * (1 + 3 * 0.044715 * v * v)


@pytest.mark.parametrize('shape', [(3, 7, 40), (200, 2048), (1, 1)])
def test_bias_gelu_matches_numpy_both_ways(shape):
    from mindformers.kernels import FusedBiasGELU
    rng = np.random.default_rng(14)
    x = (rng.standard_normal(shape) * 3).astype(np.float32)
    bias = rng.standard_normal(shape[-1]).astype(np.float32)
    probe = rng.standard_normal(shape)
    value, slope = _gelu64(x.astype(np.float64) + bias)
    np.testing.assert_allclose(FusedBiasGELU()(Tensor(x), Tensor(bias)).asnumpy(), value, rtol=1e-5, atol=1e-6)
    dx, dbias = ms.grad(ProbeAll(FusedBiasGELU(), probe.astype(np.float32)), (0, 1))(Tensor(x), Tensor(bias))
    rows = int(np.prod(shape[:-1]))
    # the fp32 slope loses about 1e-4 absolute to cancellation where x + bias is large
    np.testing.assert_allclose(dx.asnumpy(), probe * slope, rtol=1e-4, atol=2e-4)
    np.testing.assert_allclose(dbias.asnumpy(), (probe * slope).reshape(rows, -1).sum(0), rtol=1e-4,
                               atol=2e-4 * np.sqrt(rows))


@pytest.mark.parametrize('rows', [2, 65])
def test_mlp_matches_numpy_with_the_bias_inside_the_gelu_kernel(rows):
    """More than FEW_ROWS rows add fc_in's bias inside the GELU kernel, fewer use the few-rows kernel's bias."""
    from mindformers.modules.mlp import MLP
    rng = np.random.default_rng(15)
    mlp = MLP(24, 48)
    assert mlp.act_bias is not None and mlp.fc_in.bias_fusable
    for param in mlp.trainable_params():
        param.set_data(Tensor(rng.standard_normal(param.shape).astype(np.float32) * 0.5))
    w_in, b_in, w_out, b_out = (p.asnumpy().astype(np.float64) for p in
                                (mlp.fc_in.weight, mlp.fc_in.bias, mlp.fc_out.weight, mlp.fc_out.bias))
    x = rng.standard_normal((1, rows, 24)).astype(np.float32)
    probe = rng.standard_normal((1, rows, 24))
    hidden, slope = _gelu64(x[0].astype(np.float64) @ w_in.T + b_in)
    np.testing.assert_allclose(mlp(Tensor(x)).asnumpy()[0], hidden @ w_out.T + b_out, rtol=1e-5, atol=1e-5)
    dx, (dw_in, db_in, _, _) = ms.grad(ProbeAll(mlp, probe.astype(np.float32)), 0, mlp.trainable_params())(
        Tensor(x))
    d_pre = (probe[0] @ w_out) * slope  # the gradient at fc_in's output
    np.testing.assert_allclose(dx.asnumpy()[0], d_pre @ w_in, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(dw_in.asnumpy(), d_pre.T @ x[0], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(db_in.asnumpy(), d_pre.sum(0), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize('rows, vocab', [(37, 1000), (4, 8192), (1, 1)])
def test_token_log_probs_match_numpy_both_ways(rows, vocab):
    from mindformers.kernels import FusedTokenLogProbs
    rng = np.random.default_rng(16)
    logits = (rng.standard_normal((rows, vocab)) * 5).astype(np.float32)
    logits[0] *= 1e3  # far from uniform: the max must be taken out before the exponentials
    index = rng.integers(0, vocab, rows).astype(np.int32)
    probe = rng.standard_normal(rows)
    exact = logits.astype(np.float64)
    lse = exact.max(1) + np.log(np.exp(exact - exact.max(1, keepdims=True)).sum(1))
    picked, got_lse = FusedTokenLogProbs()(Tensor(logits), Tensor(index))
    np.testing.assert_allclose(picked.asnumpy(), exact[np.arange(rows), index] - lse, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(got_lse.asnumpy(), lse, rtol=1e-6)

    class Loss(nn.Cell):
        def __init__(self):
            super().__init__()
            self.fn, self.probe = FusedTokenLogProbs(), Tensor(probe.astype(np.float32))

        def construct(self, x, i):
            return (self.fn(x, i)[0] * self.probe).sum()

    expected = -np.exp(exact - lse[:, None]) * probe[:, None]
    expected[np.arange(rows), index] += probe
    grad = ms.grad(Loss(), 0)(Tensor(logits), Tensor(index)).asnumpy()
    np.testing.assert_allclose(grad, expected, rtol=1e-5, atol=1e-6)


def test_adamw_and_sum_of_squares_kernels_match_numpy():
    """Tensors of several chunks (the kernels split work by 32768 elements) and of one, three updates."""
    from mindformers.kernels import FusedAdamW, FusedSumOfSquares
    rng = np.random.default_rng(17)
    shapes = [(300, 500), (7,), (70001,)]
    decay = np.array([0.1, 0.0, 0.3], np.float32)
    lr, step_size, eps, b1, b2 = 1e-2, 2e-2, 1e-7, 0.9, 0.95
    hyper = Tensor(np.array([lr, step_size, eps, b1, b2, 1 - b1, 1 - b2], np.float32))
    values = [rng.standard_normal(s).astype(np.float32) for s in shapes]

    class Update(nn.Cell):
        def __init__(self):
            super().__init__()
            state = lambda prefix, arrays: ParameterTuple(Parameter(Tensor(a), name=f'{prefix}{i}')
                                                          for i, a in enumerate(arrays))
            self.params = state('p', values)
            self.moments1 = state('m', [np.zeros(s, np.float32) for s in shapes])
            self.moments2 = state('v', [np.zeros(s, np.float32) for s in shapes])
            self.update = FusedAdamW()

        def construct(self, grads):
            return self.update(hyper, Tensor(decay), self.params, self.moments1, self.moments2, grads)

    p64 = [v.astype(np.float64) for v in values]
    m64, v64 = [np.zeros(s) for s in shapes], [np.zeros(s) for s in shapes]
    update, sums = Update(), FusedSumOfSquares()
    for _ in range(3):
        grads = [rng.standard_normal(s).astype(np.float32) for s in shapes]
        np.testing.assert_allclose(sums(ms.mutable(tuple(Tensor(g) for g in grads))).asnumpy(),
                                   [np.sum(g.astype(np.float64) ** 2) for g in grads], rtol=1e-6)
        assert update(ms.mutable(tuple(Tensor(g) for g in grads))).asnumpy().tolist() == [1.0]
        for i, g in enumerate(grads):
            m64[i] = b1 * m64[i] + (1 - b1) * g
            v64[i] = b2 * v64[i] + (1 - b2) * g.astype(np.float64) ** 2
            p64[i] = p64[i] * (1 - lr * decay[i]) - step_size * m64[i] / (np.sqrt(v64[i]) + eps)
    for param, m, v, want_p, want_m, want_v in zip(update.params, update.moments1, update.moments2, p64, m64, v64):
        np.testing.assert_allclose(m.asnumpy(), want_m, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(v.asnumpy(), want_v, rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(param.asnumpy(), want_p, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('rows', [3, 40])
def test_residual_matches_numpy_both_ways(rows):
    """Linear with a residual: few rows in the few-rows kernel, more after MatMul in the bias-and-residual kernel; both give
    residual + x weight^T + bias and the same gradients."""
    from mindformers.modules.layers import Linear
    rng = np.random.default_rng(18)
    linear = Linear(24, 20)
    linear.bias.set_data(Tensor(rng.standard_normal(20).astype(np.float32)))
    weight, bias = linear.weight.asnumpy().astype(np.float64), linear.bias.asnumpy()
    x, residual = rng.standard_normal((rows, 24)).astype(np.float32), rng.standard_normal((rows, 20)).astype(np.float32)
    probe = rng.standard_normal((rows, 20))
    np.testing.assert_allclose(linear(Tensor(x), residual=Tensor(residual)).asnumpy(), residual + x @ weight.T + bias,
                               rtol=1e-5, atol=1e-5)

    class Loss(nn.Cell):
        def __init__(self):
            super().__init__()
            self.linear, self.probe = linear, Tensor(probe.astype(np.float32))

        def construct(self, residual, x):
            return (self.linear(x, residual=residual) * self.probe).sum()

    (d_residual, dx), (dweight, dbias) = ms.grad(Loss(), (0, 1), linear.trainable_params())(Tensor(residual),
                                                                                            Tensor(x))
    for got, want in ((d_residual, probe), (dx, probe @ weight), (dweight, probe.T @ x), (dbias, probe.sum(0))):
        np.testing.assert_allclose(got.asnumpy(), want, rtol=1e-5, atol=1e-5)


def test_mlp_residual_keeps_dropout_in_training():
    from mindformers.modules.mlp import MLP
    rng = np.random.default_rng(19)
    x, residual = (rng.standard_normal((2, 30, 16)).astype(np.float32) for _ in range(2))
    plain, dropped = MLP(16, 32), MLP(16, 32, dropout=0.5)
    for layer in (plain, dropped):
        layer.set_train(True)
    dropped_out = dropped(Tensor(x), residual=Tensor(residual)).asnumpy()
    assert 0.3 < np.mean(dropped_out == residual) < 0.7  # half the layer's outputs dropped, the residual kept
    np.testing.assert_allclose(plain(Tensor(x), residual=Tensor(residual)).asnumpy(),
                               residual + plain(Tensor(x)).asnumpy(), rtol=1e-5, atol=1e-6)


def test_causal_self_attention_with_and_without_the_heads_kernels():
    from mindformers.modules.attention import CausalSelfAttention
    rng = np.random.default_rng(12)
    fused, plain = CausalSelfAttention(32, 4), CausalSelfAttention(32, 4)
    assert fused.fused_heads and fused.fused_split
    recomputed = CausalSelfAttention(32, 4)
    recomputed.recompute()  # keeps the merge kernel, splits with plain ops (see CausalSelfAttention._recompute)
    assert recomputed.fused_heads and not recomputed.fused_split
    assert fused.qkv_proj.bias_fusable  # the qkv bias is added by the split kernel
    plain.fused_heads = plain.fused_split = False
    for ours, theirs in zip(fused.get_parameters(), plain.get_parameters()):
        theirs.set_data(Tensor(rng.standard_normal(ours.shape).astype(np.float32) * 0.3))
        ours.set_data(theirs.data)
    x = Tensor(rng.standard_normal((2, 6, 32)).astype(np.float32))
    probe = rng.standard_normal((2, 6, 32)).astype(np.float32)
    results = []
    for layer in (fused, plain):
        out = layer(x, None).asnumpy()
        grads = ms.grad(_AttentionProbe(layer, probe), 0, layer.trainable_params())(x)
        results.append([out, grads[0].asnumpy()] + [g.asnumpy() for g in grads[1]])
    for a, b in zip(*results):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


class _AttentionProbe(nn.Cell):
    def __init__(self, attention, probe):
        super().__init__()
        self.attention, self.probe = attention, Tensor(probe)

    def construct(self, x):
        return (self.attention(x, None) * self.probe).sum()
