"""The fused causal attention kernel: values and gradients against float64 NumPy, deterministic, and the attention
layers give the same results with it as with plain ops."""

import numpy as np
import pytest
import mindspore as ms
from mindspore import nn, Tensor

import mindformers.kernels as cpu_kernels
from mindformers.kernels import FusedCausalAttention
from helpers.kernel_checks import ProbeAll


# the kernels run here even when the suite runs with MINDFORMERS_CPU_KERNELS=0
pytestmark = pytest.mark.usefixtures('cpu_kernels_on')


def reference(query, key, value, dcontext):
    """float64 causal attention and its input gradients for the output gradient `dcontext`."""
    query, key, value, dcontext = (a.astype(np.float64) for a in (query, key, value, dcontext))
    batch, heads, seq, dim = query.shape
    group = heads // key.shape[1]
    keys, values = np.repeat(key, group, 1), np.repeat(value, group, 1)
    scores = np.where(np.tril(np.ones((seq, seq), bool)), query @ keys.swapaxes(-1, -2), -np.inf)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    context = probs @ values
    dscores = probs * (dcontext @ values.swapaxes(-1, -2) - (dcontext * context).sum(-1, keepdims=True))
    per_kv_head = lambda g: g.reshape(batch, -1, group, seq, dim).sum(2)
    return context, dscores @ keys, per_kv_head(dscores.swapaxes(-1, -2) @ query), \
        per_kv_head(probs.swapaxes(-1, -2) @ dcontext)


def assert_close(ours, expected, name=''):
    """Equal up to fp32 rounding: relative to each array's largest entry (terms that cancel keep rounding errors of
    the terms' size; with one key dquery is 0)."""
    scale = max(1.0, np.abs(expected).max())
    np.testing.assert_allclose(ours, expected, rtol=1e-5, atol=2e-5 * scale, err_msg=name)


def run_kernel(query, key, value, probe):
    """(context, dquery, dkey, dvalue) from the fused kernel."""
    tensors = [Tensor(a) for a in (query, key, value)]
    context = FusedCausalAttention()(*tensors).asnumpy()
    grads = ms.grad(ProbeAll(FusedCausalAttention(), probe), (0, 1, 2))(*tensors)
    return [context] + [g.asnumpy() for g in grads]


def random_inputs(batch, heads, kv_heads, seq, dim, seed=0):
    rng = np.random.default_rng(seed)
    query = (rng.standard_normal((batch, heads, seq, dim)) * 2 / np.sqrt(dim)).astype(np.float32)
    key, value = (rng.standard_normal((batch, kv_heads, seq, dim)).astype(np.float32) for _ in range(2))
    probe = rng.standard_normal((batch, heads, seq, dim)).astype(np.float32)
    return query, key, value, probe


@pytest.mark.parametrize('batch, heads, kv_heads, seq, dim', [
    (2, 8, 8, 256, 64),  # the GPT-2 benchmark's head shape
    (3, 2, 2, 37, 64),  # a length that is no multiple of the kernel's blocks
    (1, 2, 2, 1, 64),
    (1, 2, 2, 130, 80),  # a head dim that is no multiple of the vector width
    (2, 3, 3, 20, 3),
    (2, 4, 2, 37, 16),  # grouped-query attention
    (1, 4, 1, 70, 8),  # multi-query attention
])
def test_matches_float64_reference(batch, heads, kv_heads, seq, dim):
    query, key, value, probe = random_inputs(batch, heads, kv_heads, seq, dim)
    got = run_kernel(query, key, value, probe)
    for ours, exact, name in zip(got, reference(query, key, value, probe), ('context', 'dquery', 'dkey', 'dvalue')):
        assert ours.shape == exact.shape, name
        assert_close(ours, exact, name)


def test_bit_reproducible():
    inputs = random_inputs(8, 4, 2, 96, 32, seed=1)  # enough (batch, head) tasks to split over every core
    first, second = run_kernel(*inputs), run_kernel(*inputs)
    for a, b in zip(first, second):
        assert np.array_equal(a, b)


def _attention_results(layer, inputs, probe, mask):
    """(output, gradients with respect to every input and parameter) of `layer(*inputs, mask)`."""

    class Loss(nn.Cell):
        def __init__(self):
            super().__init__()
            self.layer, self.probe = layer, Tensor(probe)

        def construct(self, *args):
            return (self.layer(*args, mask) * self.probe).sum()

    params = layer.trainable_params()
    positions = tuple(range(len(inputs)))
    grads = ms.grad(Loss(), positions, params if params else None)(*map(Tensor, inputs))
    inputs_grads, params_grads = grads if params else (grads, ())
    return [layer(*map(Tensor, inputs), mask).asnumpy()] + [g.asnumpy() for g in (*inputs_grads, *params_grads)]


def test_dot_product_attention_fused_equals_masked_plain_path():
    from mindformers.modules.attention import CausalMask, DotProductAttention
    fused = DotProductAttention()
    assert isinstance(fused.causal_attention, FusedCausalAttention) and fused.causal_softmax is None
    assert DotProductAttention(score_scale=2.0).causal_attention is None
    query, key, value, probe = random_inputs(2, 4, 2, 37, 16, seed=2)
    mask = CausalMask(37)(2, 4, 37)
    ours = _attention_results(fused, (query, key, value), probe, None)
    plain = _attention_results(DotProductAttention(), (query, key, value), probe, mask)
    for a, b in zip(ours, plain):
        assert_close(a, b)
    # with dropout: the attention kernel outside training, the softmax kernel (dropout between softmax and context)
    # in training
    inputs = tuple(map(Tensor, (query, key, value)))
    expected = fused(*inputs, None).asnumpy()
    dropped, dropped_in_training = DotProductAttention(dropout=0.5), DotProductAttention(dropout=0.5)
    assert dropped.causal_attention is not None and dropped.causal_softmax is not None
    np.testing.assert_array_equal(dropped(*inputs, None).asnumpy(), expected)
    dropped_in_training.set_train(True)
    assert not np.allclose(dropped_in_training(*inputs, None).asnumpy(), expected, atol=1e-3)


def test_causal_self_attention_with_and_without_the_attention_kernel():
    from mindformers.modules.attention import CausalMask, CausalSelfAttention
    rng = np.random.default_rng(3)
    fused, recomputed, plain = CausalSelfAttention(64, 4), CausalSelfAttention(64, 4), CausalSelfAttention(64, 4)
    recomputed.recompute()
    plain.core.causal_attention = None  # mask=None then takes the fused softmax between BatchMatMuls
    plain.core.causal_softmax = cpu_kernels.FusedCausalSoftmax()
    for ours, again, theirs in zip(fused.get_parameters(), recomputed.get_parameters(), plain.get_parameters()):
        theirs.set_data(Tensor(rng.standard_normal(ours.shape).astype(np.float32) * 0.3))
        ours.set_data(theirs.data)
        again.set_data(theirs.data)
    x = rng.standard_normal((2, 40, 64)).astype(np.float32)
    probe = rng.standard_normal((2, 40, 64)).astype(np.float32)
    ours = _attention_results(fused, (x,), probe, None)
    for reference_results in (_attention_results(recomputed, (x,), probe, None),
                              _attention_results(plain, (x,), probe, None),
                              _attention_results(plain, (x,), probe, CausalMask(40)(2, 4, 40))):
        for a, b in zip(ours, reference_results):
            assert_close(a, b)
