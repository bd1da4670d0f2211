"""PerplexityMetric (exact values, both update forms) and CrossEntropyLoss against torch."""
import math

import numpy as np
import pytest
import torch
import mindspore as ms
from mindspore import nn, Tensor

from mindformers.core.loss import CrossEntropyLoss
from mindformers.core.metric import PerplexityMetric
from mindformers.tools.register import MindFormerRegister


def torch_masked_ce(logits, labels, mask):
    per_token = torch.nn.functional.cross_entropy(torch.tensor(logits, dtype=torch.float64),
                                                  torch.tensor(np.maximum(labels, 0), dtype=torch.long),
                                                  reduction='none')
    mask = torch.tensor(mask, dtype=torch.float64)
    return float((per_token * mask).sum()), float(mask.sum())


def random_batch(seed=0, rows=12, vocab=9, scale=4.):
    rng = np.random.default_rng(seed)
    logits = (rng.standard_normal((rows, vocab)) * scale).astype(np.float32)
    labels = rng.integers(0, vocab, rows).astype(np.int32)
    labels[[2, 7]] = -100
    return logits, labels, (labels >= 0).astype(np.float32)


def test_perplexity_exact_values_from_sums():
    metric = PerplexityMetric()
    metric.update(2.0, 4)
    metric.update(Tensor(6.0, ms.float32), np.array(4.))
    result = metric.eval()
    assert result == {'loss': 1.0, 'PPL': math.e}
    assert metric.total_tokens == 8
    metric.clear()
    metric.update(np.float32(0.), 3)
    assert metric.eval() == {'loss': 0.0, 'PPL': 1.0}
    metric.clear()
    with pytest.raises(RuntimeError, match='no tokens were counted'):
        metric.eval()
    with pytest.raises(ValueError, match='takes \\(loss_sum, num_tokens\\) or'):
        metric.update(1.0)
    with pytest.raises(ValueError, match='num_tokens must be'):
        metric.update(1.0, -2)


def test_perplexity_from_logits_matches_torch_and_the_sum_path():
    batches = [random_batch(seed) for seed in range(3)]
    metric, summed = PerplexityMetric(), PerplexityMetric()
    loss_fn = CrossEntropyLoss()
    total_loss = total_tokens = 0.
    for logits, labels, mask in batches:
        metric.update(Tensor(logits.reshape(3, 4, -1)), Tensor(labels.reshape(3, 4)), Tensor(mask.reshape(3, 4)))
        mean = float(loss_fn(Tensor(logits), Tensor(labels), Tensor(mask)))
        summed.update(mean * mask.sum(), mask.sum())  # what a compiled eval step returns
        loss, count = torch_masked_ce(logits, labels, mask)
        total_loss, total_tokens = total_loss + loss, total_tokens + count
    expected = total_loss / total_tokens
    assert metric.eval()['loss'] == pytest.approx(expected, rel=1e-12)
    assert metric.eval()['PPL'] == pytest.approx(math.exp(expected), rel=1e-12)
    assert summed.eval()['loss'] == pytest.approx(expected, rel=1e-6)
    default_mask = PerplexityMetric()
    logits, labels, _ = batches[0]
    default_mask.update(logits, labels)  # negative labels are left out without a mask
    assert default_mask.total_tokens == 10
    with pytest.raises(ValueError, match=r'labels must be in \[0, 9\)'):
        PerplexityMetric().update(logits, np.full(12, 9, np.int32))
    with pytest.raises(ValueError, match='logits have 12 positions but labels have 5'):
        PerplexityMetric().update(logits, labels[:5])


def test_perplexity_registered():
    assert MindFormerRegister.get_cls('metric', 'PerplexityMetric') is PerplexityMetric


@pytest.mark.parametrize('vocab', [11, 5000])
def test_cross_entropy_matches_torch_value_and_gradient(kernel_mode, vocab):
    logits, labels, mask = random_batch(rows=16, vocab=vocab)
    logits[3] *= 30.  # a row far from uniform
    mask[5] = 0.  # a valid label that is masked out
    loss_fn = CrossEntropyLoss()
    assert (loss_fn.token_log_probs is not None) == (kernel_mode == 'kernels')
    grad_fn = ms.value_and_grad(loss_fn, 0)
    loss, grad = grad_fn(Tensor(logits), Tensor(labels), Tensor(mask))
    tlogits = torch.tensor(logits, requires_grad=True)
    per_token = torch.nn.functional.cross_entropy(tlogits, torch.tensor(np.maximum(labels, 0), dtype=torch.long),
                                                  reduction='none')
    tmask = torch.tensor(mask)
    tloss = (per_token * tmask).sum() / tmask.sum()
    tloss.backward()
    assert loss.shape == () and loss.dtype == ms.float32
    assert float(loss) == pytest.approx(tloss.item(), rel=1e-6)
    np.testing.assert_allclose(grad.asnumpy(), tlogits.grad.numpy(), rtol=1e-5, atol=1e-7)


def test_cross_entropy_shapes_dtypes_and_edge_cases(kernel_mode):
    loss_fn = CrossEntropyLoss()
    logits, labels, mask = random_batch(rows=12, vocab=9)
    reference = float(loss_fn(Tensor(logits), Tensor(labels), Tensor(mask)))
    # [B, S, V] logits, the default mask (labels >= 0) and fp16 logits give the same loss
    assert float(loss_fn(Tensor(logits.reshape(3, 4, 9)), Tensor(labels.reshape(3, 4)))) == \
        pytest.approx(reference, rel=1e-6)
    assert float(loss_fn(Tensor(logits, ms.float16), Tensor(labels), Tensor(mask))) == \
        pytest.approx(reference, rel=2e-3)
    # nothing counted: 0, not NaN
    assert float(loss_fn(Tensor(logits), Tensor(labels), Tensor(np.zeros(12, np.float32)))) == 0.
    # huge logits stay finite and exact (log-softmax, not log(softmax))
    big = np.array([[1e4, 0., -1e4], [0., 3e4, 1.]], np.float32)
    loss = float(loss_fn(Tensor(big), Tensor(np.array([1, 1], np.int32)), Tensor(np.ones(2, np.float32))))
    expected = torch.nn.functional.cross_entropy(torch.tensor(big, dtype=torch.float64),
                                                 torch.tensor([1, 1])).item()
    assert loss == pytest.approx(expected, rel=1e-6)


def test_cross_entropy_registered_over_mindspore_name():
    # mindspore.nn has a CrossEntropyLoss too: ours wins in the registry
    assert MindFormerRegister.get_cls('loss', 'CrossEntropyLoss') is CrossEntropyLoss
    assert CrossEntropyLoss is not nn.CrossEntropyLoss
