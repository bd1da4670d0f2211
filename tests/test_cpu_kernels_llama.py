"""The LLaMA-family CPU kernels (RMSNorm, SwiGLU, rotary embedding): the same values and gradients as the plain-op
layers they replace, and chosen only where they may run."""
import numpy as np
import pytest
import mindspore as ms
from mindspore import Tensor

import mindformers.kernels as cpu_kernels
from mindformers.kernels import FusedRMSNorm, FusedRotary, FusedSwiGLU
from mindformers.modules.attention import GroupedQueryAttention
from mindformers.modules.mlp import MLP, GatedMLP
from mindformers.modules.norm import RMSNorm, build_norm
from mindformers.modules.rotary import Rotary2DEmbedding, RotaryEmbedding
from helpers.kernel_checks import ProbeAll, cpu_kernels_set


def _as_list(grads):
    return list(grads) if isinstance(grads, (tuple, list)) else [grads]


def _both_ways(build, inputs, weights=()):
    """(value, [grads of inputs..., grads of weights...]) of sum(cell(*inputs) * probe), for the cell `build()` makes
    with the fused kernels and with plain ops."""
    results = []
    for fused in (True, False):
        with cpu_kernels_set(fused):
            cell = build()
            out = cell(*inputs)
            probe = np.random.default_rng(5).standard_normal(out.shape).astype(np.float32)
            params = [p for p in cell.trainable_params() if p.name.endswith(weights)] if weights else None
            value, grads = ms.value_and_grad(ProbeAll(cell, probe), tuple(range(len(inputs))), params)(*inputs)
            flat = _as_list(grads[0]) + _as_list(grads[1]) if params else _as_list(grads)
            results.append((value.asnumpy(), [g.asnumpy() for g in flat]))
    return results


def _close(ours, reference, rtol=1e-5):
    np.testing.assert_allclose(ours[0], reference[0], rtol=rtol, atol=1e-4)
    assert len(ours[1]) == len(reference[1])
    for a, b in zip(ours[1], reference[1]):
        assert np.abs(a - b).max() <= rtol * np.abs(b).max() + 1e-6


@pytest.mark.parametrize('shape', [(2, 37, 96), (1, 1, 8), (3, 300, 64)])
def test_rms_norm_matches_plain_ops(shape):
    rng = np.random.default_rng(1)
    x = Tensor((rng.standard_normal(shape) * 2 + 0.5).astype(np.float32))
    weight = (rng.standard_normal(shape[-1]) + 1).astype(np.float32)

    def build():
        norm = RMSNorm(shape[-1], eps=1e-5)
        norm.weight.set_data(Tensor(weight))
        return norm

    fused, plain = _both_ways(build, [x], ('weight',))
    _close(fused, plain)


@pytest.mark.parametrize('rows', [3, 130])
def test_swiglu_mlp_matches_plain_ops(rows):
    x = Tensor(np.random.default_rng(2).standard_normal((2, rows, 48)).astype(np.float32))

    def build():
        ms.set_seed(3)
        return GatedMLP(48, 72, init_std=0.3)

    fused, plain = _both_ways(build, [x], ('weight',))
    assert len(fused[1]) == 4  # dx and the three projections' weights
    _close(fused, plain)


class _Apply(ms.nn.Cell):
    """rotary.apply(x, cos, sin) with fixed tables."""

    def __init__(self, rotary, cos, sin):
        super().__init__()
        self.rotary, self.cos, self.sin = rotary, cos, sin

    def construct(self, x):
        return self.rotary.apply(x, self.cos, self.sin)


@pytest.mark.parametrize('rotary_dim, interleaved, per_row_tables', [(None, False, False), (16, True, True),
                                                                      (24, False, True)])
def test_rotary_matches_plain_ops(rotary_dim, interleaved, per_row_tables):
    batch, seq, heads, dim = 2, 9, 3, 32
    x = Tensor(np.random.default_rng(4).standard_normal((batch, seq, heads, dim)).astype(np.float32))
    positions = Tensor(np.array([[3 * i + j for j in range(seq)] for i in range(batch)], np.int32))

    def build():
        rotary = RotaryEmbedding(dim, 64, rotary_dim, interleaved=interleaved)
        cos, sin = rotary.tables(positions) if per_row_tables else rotary.static_tables(seq)
        return _Apply(rotary, cos, sin)

    fused, plain = _both_ways(build, [x])
    _close(fused, plain)


def test_glm_2d_rotary_matches_plain_ops():
    batch, seq, heads, dim = 2, 5, 2, 16
    x = Tensor(np.random.default_rng(6).standard_normal((batch, seq, heads, dim)).astype(np.float32))
    positions = Tensor(np.random.default_rng(7).integers(0, 20, (batch, 2, seq)).astype(np.int32))

    def build():
        rotary = Rotary2DEmbedding(dim, 32)
        return _Apply(rotary, *rotary.tables(positions))

    fused, plain = _both_ways(build, [x])
    _close(fused, plain)


def test_layers_pick_the_kernels_only_when_allowed():
    from mindformers.core.parallel_config import ParallelConfig
    with cpu_kernels_set(True):
        assert isinstance(RMSNorm(8).fused, FusedRMSNorm)
        assert RMSNorm(8, parallel_config=ParallelConfig(data_parallel=2)).fused is None
        assert RMSNorm(8, compute_type='float16').fused is None
        assert isinstance(GatedMLP(8, 16).swiglu, FusedSwiGLU)
        assert GatedMLP(8, 16, compute_dtype='float16').swiglu is None
        assert isinstance(RotaryEmbedding(8, 4).fused, FusedRotary)
        assert RotaryEmbedding(8, 4, dtype='float16').fused is None
    with cpu_kernels_set(False):
        assert RMSNorm(8).fused is None and GatedMLP(8, 16).swiglu is None and RotaryEmbedding(8, 4).fused is None
    with pytest.raises(ValueError, match='own inverse'):
        FusedRotary(np.roll(np.eye(4, dtype=np.float32), 1, axis=1))  # a 4-cycle, not pairs


class _Attention(ms.nn.Cell):
    """A GroupedQueryAttention layer on x [B, S, hidden] with the plain causal mask, with rotary tables or (as
    PanGu's query layer calls it) without a rotary embedding."""

    def __init__(self, rotary, seq):
        super().__init__()
        self.layer = GroupedQueryAttention(48, 4, 2, rotary=rotary, init_std=0.3)
        self.tables = rotary.static_tables(seq) if rotary is not None else None

    def construct(self, x):
        layer = self.layer
        if self.tables is None:
            return layer.attend(layer.heads(x, layer.q_proj), layer.heads(x, layer.k_proj),
                                layer.heads(x, layer.v_proj), None, None, None, None)
        return layer(x, None, self.tables[0], self.tables[1])


@pytest.mark.parametrize('with_rotary', [True, False])
def test_attention_heads_kernels_match_plain_ops(with_rotary):
    """q, k, v go into heads (with the rotary embedding and the query scale) and back in one kernel pass each."""
    x = Tensor(np.random.default_rng(8).standard_normal((2, 7, 48)).astype(np.float32))

    def build():
        ms.set_seed(9)
        cell = _Attention(RotaryEmbedding(12, 16) if with_rotary else None, 7)
        assert cell.layer.fused_heads == (cpu_kernels.kernel_library() is not None)
        return cell

    fused, plain = _both_ways(build, [x], ('weight',))
    assert len(fused[1]) == 5  # dx and the four projections' weights
    _close(fused, plain)


def test_rotary_heads_kernel_is_the_rotary_kernel_transposed_and_scaled():
    batch, seq, heads, dim = 2, 5, 3, 16
    rng = np.random.default_rng(10)
    x, dy = (Tensor(rng.standard_normal(shape).astype(np.float32))
             for shape in ((batch, seq, heads, dim), (batch, heads, seq, dim)))
    with cpu_kernels_set(True):
        rotary = RotaryEmbedding(dim, 16, 12, interleaved=True)
        cos, sin = rotary.tables(Tensor(rng.integers(0, 16, (batch, seq)).astype(np.int32)))
        heads_kernel = rotary.heads_kernel(0.25)
        y = heads_kernel(x, cos, sin).asnumpy()
        dx = heads_kernel.bprop(x, cos, sin, None, dy)[0].asnumpy()
        reference = rotary.fused(x, cos, sin).asnumpy()
        dx_reference = rotary.fused.bprop(x, cos, sin, None, Tensor(dy.asnumpy().transpose(0, 2, 1, 3)))[0].asnumpy()
    np.testing.assert_allclose(y, reference.transpose(0, 2, 1, 3) * 0.25, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(dx, dx_reference * 0.25, rtol=1e-6, atol=1e-6)


def _frozen_variant(kind, frozen):
    """A cell with a frozen-parameter path (a norm; an MLP whose fc_in bias goes into the GELU kernel), its
    parameters set alike; frozen: the weight and bias of the norm, fc_in's bias of the MLP."""
    if kind == 'mlp':
        layer = MLP(40, 64, hidden_act='gelu')
        rng = np.random.default_rng(10)
        for param in layer.get_parameters():
            param.set_data(Tensor((0.1 * rng.standard_normal(param.shape)).astype(np.float32)))
        layer.fc_in.bias.requires_grad = not frozen
        assert layer.frozen_bias == frozen
        return layer, layer.act_frozen_bias
    layer = build_norm(kind, 40, 1e-5)
    for param in layer.get_parameters():
        param.set_data(Tensor(np.linspace(0.5, 1.5, 40).astype(np.float32)))
        param.requires_grad = not frozen
    assert layer.frozen == frozen
    return layer, layer.fused_frozen if kind == 'rmsnorm' else layer.norm_frozen


@pytest.mark.parametrize('kind', ['rmsnorm', 'layernorm', 'mlp'])
def test_a_frozen_cell_computes_the_same_output_and_input_gradient_and_nothing_else(kind):
    """A cell whose parameters are frozen runs a backward kernel without their gradient sums: its output and input
    gradient are bit-identical to the trainable cell's, and the frozen kernel's input gradient is the trainable
    kernel's code (one row function, so the trainable kernel keeps the rounding it had before the frozen one)."""
    x = Tensor(np.random.default_rng(11).standard_normal((3, 70, 40)).astype(np.float32))
    probe = np.random.default_rng(12).standard_normal(x.shape).astype(np.float32)
    outputs, grads = [], []
    with cpu_kernels_set(True):
        for frozen in (False, True):
            layer, kernel = _frozen_variant(kind, frozen)
            outputs.append(layer(x).asnumpy())
            grads.append(ms.grad(ProbeAll(layer, probe), 0)(x).asnumpy())
        assert kernel.backward.func.endswith('InputBackward')
    assert np.array_equal(outputs[0], outputs[1])
    assert np.array_equal(grads[0], grads[1])
