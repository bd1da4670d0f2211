"""Blocks own their kernels: a cell that wraps every Linear of a model (as LoRA and int8 layers will) works in
training, evaluation, prefill and decode without knowing which kernels the blocks use, with the fused CPU kernels
on and off. The wrapper adds x @ delta^T to its Linear's output, so the wrapped model must equal a plain model whose
weights are W + delta."""
import numpy as np
import pytest
import mindspore as ms
from mindspore import nn, ops, Parameter, Tensor

from mindformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM
from mindformers.generation.session import DecodingSession
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
    if family == 'gpt2':
        config = GPT2Config(vocab_size=VOCAB, hidden_size=32, num_layers=2, num_heads=4, seq_length=64,
                            initializer_range=0.2, bos_token_id=1, eos_token_id=2, pad_token_id=0,
                            embedding_dropout_prob=0.0, hidden_dropout_rate=0.0, attention_dropout_rate=0.0)
        return GPT2LMHeadModel(config)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, num_layers=2, num_heads=4, n_kv_heads=2,
                         intermediate_size=48, seq_length=64, initializer_range=0.2, bos_token_id=1,
                         eos_token_id=2, pad_token_id=0)
    return LlamaForCausalLM(config)


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
@pytest.mark.parametrize('family', ['gpt2', 'llama'])
def test_a_wrapped_linear_composes_with_every_path(family, kernel_mode):
    wrapped, merged, deltas = _pair(family)
    assert len(deltas) == 8 if family == 'gpt2' else 14
    rng = np.random.default_rng(1)
    batch = Tensor(rng.integers(3, VOCAB, (2, 33)).astype(np.int32))

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

    # prefill and decode through a session, and greedy generation with the KV cache
    sessions = [DecodingSession(model, 2) for model in (wrapped, merged)]
    steps = [[s.prefill([0, 1], ids, mask) for s in sessions]]
    for token in (5, 9, 17):
        steps.append([s.decode([token, token]) for s in sessions])
    for got, want in steps:
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    prompts = [ids[0, 7:].tolist(), ids[1].tolist()]
    assert wrapped.generate(prompts, max_new_tokens=12, use_past=True, eos_token_id=[]) == \
        merged.generate(prompts, max_new_tokens=12, use_past=True, eos_token_id=[])
