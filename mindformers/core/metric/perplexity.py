"""Perplexity over an evaluation set, accumulated batch by batch."""
import math

import numpy as np
from mindspore import Tensor
from mindspore.train import Metric

from mindformers.tools.register import MindFormerRegister, MindFormerModuleType

__all__ = ['PerplexityMetric']


@MindFormerRegister.register(MindFormerModuleType.METRIC)
class PerplexityMetric(Metric):
    """Token-level perplexity: exp(total cross-entropy / total tokens) over every batch since `clear()`.

    `update` takes either
      - `(loss_sum, num_tokens)`: the summed token cross-entropy (nats) of a batch and its token count, scalars
        (float, NumPy or Tensor). This is the cheap path: a compiled eval step reduces on device and returns two
        numbers (e.g. `CrossEntropyLoss` mean * mask sum);
      - `(logits, labels[, mask])`: logits [..., V] aligned with labels [...] (the caller shifts for next-token
        prediction) and a mask [...] that is 1 for counted tokens (default: labels >= 0). The loss is computed
        here in float64 NumPy, which is slow for large batches.
    `eval()` returns `{'loss': mean token loss, 'PPL': exp(loss)}`. Evaluation feeds it loss sums
    (`core.metric.contract`); its sums are added over data-parallel ranks."""
    consumes = 'loss'
    rank_sums = ('total_loss', 'total_tokens')

    def __init__(self):
        super().__init__()
        self.clear()

    def clear(self):
        self.total_loss = 0.
        self.total_tokens = 0.

    def update(self, *inputs):
        if len(inputs) not in (2, 3):
            raise ValueError(f"PerplexityMetric.update takes (loss_sum, num_tokens) or (logits, labels[, mask]), "
                             f"got {len(inputs)} inputs")
        inputs = [x.asnumpy() if isinstance(x, Tensor) else np.asarray(x) for x in inputs]
        if len(inputs) == 2 and inputs[0].size == 1:
            if inputs[1].size != 1:
                raise ValueError(f"PerplexityMetric.update: num_tokens must be a scalar like loss_sum, got shape "
                                 f"{inputs[1].shape}")
            loss_sum, count = float(inputs[0].reshape(())), float(inputs[1].reshape(()))
            if count < 0 or not math.isfinite(count):
                raise ValueError(f"PerplexityMetric.update: num_tokens must be a finite count >= 0, got {count}")
        else:
            loss_sum, count = self._cross_entropy(*inputs)
        self.total_loss += loss_sum
        self.total_tokens += count

    @staticmethod
    def _cross_entropy(logits, labels, mask=None):
        """(summed loss, token count) of `logits [..., V]` against `labels [...]` under `mask`."""
        logits = np.asarray(logits, np.float64)
        vocab = logits.shape[-1]
        logits = logits.reshape(-1, vocab)
        labels = np.asarray(labels).reshape(-1).astype(np.int64)
        if labels.shape[0] != logits.shape[0]:
            raise ValueError(f"PerplexityMetric.update: logits have {logits.shape[0]} positions but labels have "
                             f"{labels.shape[0]}")
        mask = (labels >= 0) if mask is None else np.asarray(mask).reshape(-1)
        if mask.shape[0] != labels.shape[0]:
            raise ValueError(f"PerplexityMetric.update: mask has {mask.shape[0]} positions, labels have "
                             f"{labels.shape[0]}")
        keep = mask.astype(np.float64)
        counted = labels[keep > 0]
        if counted.size and (counted.min() < 0 or counted.max() >= vocab):
            raise ValueError(f"PerplexityMetric.update: labels must be in [0, {vocab}) where the mask is set, got "
                             f"{counted.min()}..{counted.max()}")
        top = logits.max(axis=-1, keepdims=True)
        log_norm = np.log(np.exp(logits - top).sum(axis=-1)) + top[:, 0]
        picked = logits[np.arange(labels.shape[0]), np.clip(labels, 0, vocab - 1)]
        return float(((log_norm - picked) * keep).sum()), float(keep.sum())

    def eval(self):
        if self.total_tokens <= 0:
            raise RuntimeError("PerplexityMetric.eval: no tokens were counted; call update() first")
        loss = self.total_loss / self.total_tokens
        return {'loss': loss, 'PPL': math.exp(loss) if loss < 709. else math.inf}
