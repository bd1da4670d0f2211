"""Blocks own their kernels: a cell that wraps every Linear of a model (as LoRA and int8 layers will) works in
training, evaluation, prefill and decode without knowing which kernels the blocks use, with the fused CPU kernels
on and off. The wrapper adds x @ delta^T to its Linear's output, so the wrapped model must equal a plain model whose
weights are W + delta."""
import numpy as np
import pytest
import mindspore as ms
from mindspore import nn, ops, Parameter, Tensor

from mindformers import (GLMConfig, GLMForPreTraining, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM,
                         PanguAlphaConfig, PanguAlphaHeadModel)
from mindformers.generation.session import session_for
from mindformers.modules.layers import Linear

VOCAB = 64


class DeltaLinear(nn.Cell):
    """Test-only: `base(x) + x @ delta^T`, keeping Linear's call contract (add_bias, residual) by passing it on."""

    def __init__(self, base, delta):
        super().__init__()
        self.base = base
        self.delta = Parameter(Tensor(delta), name='delta')
        self.matmul = ops.MatMul(transpose_b=True)

    def construct(self, x, add_bias=True, residual=None):
        shape = x.shape
        extra = self.matmul(x.reshape(-1, shape[-1]), self.delta).reshape(shape[:-1] + (self.delta.shape[0],))
        return self.base(x, add_bias, residual) + extra


def _build(family):
    tiny = dict(vocab_size=VOCAB, hidden_size=32, num_layers=2, num_heads=4, seq_length=64, initializer_range=0.2)
    no_dropout = dict(embedding_dropout_prob=0.0, hidden_dropout_rate=0.0, attention_dropout_rate=0.0)
    if family == 'gpt2':
        return GPT2LMHeadModel(GPT2Config(bos_token_id=1, eos_token_id=2, pad_token_id=0, **no_dropout, **tiny))
    if family == 'pangualpha':
        return PanguAlphaHeadModel(PanguAlphaConfig(eos_token_id=2, pad_token_id=0, **no_dropout, **tiny))
    if family == 'glm':  # ids 3-6 are its special tokens; the test's tokens are plain text ids above them
        return GLMForPreTraining(GLMConfig(bos_token_id=3, eos_token_id=2, pad_token_id=0, gmask_token_id=4,
                                           mask_token_id=5, inner_hidden_size=64, **tiny))
    return LlamaForCausalLM(LlamaConfig(n_kv_heads=2, intermediate_size=48, bos_token_id=1, eos_token_id=2,
                                        pad_token_id=0, **tiny))


def _linears(model):
    """(parent cell, attribute name, Linear) of every Linear inside the transformer layers."""
    found = []
    for _, cell in model.cells_and_names():
        for name, child in cell.name_cells().items():
            if isinstance(child, Linear) and name != 'lm_head':
                found.append((cell, name, child))
    return found


def _pair(family, seed=0):
    """(wrapped model, plain model with W + delta, the deltas' Parameters)."""
    wrapped, merged = _build(family), _build(family)
    ms.load_param_into_net(merged, {p.name: Parameter(p.data.copy(), p.name) for p in wrapped.get_parameters()})
    rng = np.random.default_rng(seed)
    deltas = []
    for (parent, name, linear), (_, _, twin) in zip(_linears(wrapped), _linears(merged)):
        delta = (0.05 * rng.standard_normal(linear.weight.shape)).astype(np.float32)
        twin.weight.set_data(Tensor(twin.weight.asnumpy() + delta))
        setattr(parent, name, DeltaLinear(linear, delta))
        deltas.append(getattr(parent, name).delta)
    return wrapped, merged, deltas


@pytest.mark.slow
@pytest.mark.parametrize('family', ['llama', 'glm', 'pangualpha'])
def test_a_wrapped_linear_composes_with_every_path(family, cpu_kernels_on):
    _check_wrapped(family)


@pytest.mark.slow
def test_a_wrapped_linear_composes_with_and_without_the_cpu_kernels(kernel_mode):
    """GPT-2 takes the most fused paths (bias in the split and GELU kernels, residual in the projections, the packed
    decode kernel); the same wrapper works with them (`kernels`) and with plain MindSpore ops (`plain`)."""
    _check_wrapped('gpt2')


def _check_wrapped(family):
    wrapped, merged, deltas = _pair(family)
    assert len(deltas) == {'gpt2': 8, 'llama': 14, 'glm': 8, 'pangualpha': 12}[family]
    rng = np.random.default_rng(1)
    batch = Tensor(rng.integers(7, VOCAB, (2, 33)).astype(np.int32))

    # training: the same loss, and the wrapper's own parameters get gradients
    for model in (wrapped, merged):
        model.set_train(True)
    loss = wrapped(batch)
    np.testing.assert_allclose(loss.asnumpy(), merged(batch).asnumpy(), rtol=1e-5)
    grads = ms.grad(wrapped, None, deltas)(batch)
    assert all(np.abs(g.asnumpy()).sum() > 0 for g in grads)

    # evaluation: the same logits on a left-padded batch
    for model in (wrapped, merged):
        model.set_train(False)
    ids = batch.asnumpy()[:, :20].copy()
    mask = np.ones_like(ids)
    mask[0, :7], ids[0, :7] = 0, 0
    np.testing.assert_allclose(wrapped(Tensor(ids), Tensor(mask)).asnumpy(),
                               merged(Tensor(ids), Tensor(mask)).asnumpy(), rtol=1e-4, atol=1e-4)

    # prefill and decode through a session, and greedy generation with the KV cache (generate() reuses the session,
    # and so its compiled graphs: the prompts pad to the same bucket)
    sessions = [session_for(model, 2) for model in (wrapped, merged)]
    steps = [[s.prefill([0, 1], ids, mask) for s in sessions]]
    for token in (5, 9, 17):
        steps.append([s.decode([token, token]) for s in sessions])
    for got, want in steps:
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    prompts = [ids[0, 7:].tolist(), ids[1].tolist()]
    assert wrapped.generate(prompts, max_new_tokens=12, use_past=True, eos_token_id=[]) == \
        merged.generate(prompts, max_new_tokens=12, use_past=True, eos_token_id=[])
