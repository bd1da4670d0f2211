"""Masked token cross-entropy, the loss shared by the language models."""
import mindspore as ms
from mindspore import nn, ops

from mindformers.kernels import FusedTokenLogProbs, use_fused
from mindformers.tools.register import MindFormerRegister, MindFormerModuleType

__all__ = ['CrossEntropyLoss']


@MindFormerRegister.register(MindFormerModuleType.LOSS)
class CrossEntropyLoss(nn.Cell):
    """`construct(logits, labels, input_mask=None)` -> fp32 scalar
    sum(mask * -log_softmax(logits)[label]) / max(sum(mask), 1).

    logits: [N, V] (or [..., V], flattened) of any float dtype, computed in fp32; labels: [N] int32 class ids;
    input_mask: [N] float, 1 for tokens that count. Without a mask, negative labels (e.g. -100) are left out; with
    one, labels at masked-out positions may be anything (they are clamped into range before the lookup).
    `parallel_config` (optional): rows are split `data_parallel` ways; the vocabulary is not split. Unsplit on CPU,
    one fused kernel computes the chosen log-probabilities (see `kernels.use_fused`)."""

    def __init__(self, parallel_config=None):
        super().__init__()
        dp = int(getattr(parallel_config, 'data_parallel', 1) or 1)
        self.log_softmax = ops.LogSoftmax(axis=-1).shard(((dp, 1),))
        self.gather = ops.GatherD().shard(((dp, 1), (dp, 1)))
        self.token_log_probs = FusedTokenLogProbs() if dp == 1 and use_fused(ms.float32) else None

    def construct(self, logits, labels, input_mask=None):
        vocab = logits.shape[-1]
        logits = ops.cast(logits.reshape(-1, vocab), ms.float32)
        labels = labels.reshape(-1)
        if input_mask is None:
            mask = ops.cast(labels >= 0, ms.float32)
        else:
            mask = ops.cast(input_mask.reshape(-1), ms.float32)
        index = ops.clamp(labels, 0, vocab - 1)
        if self.token_log_probs is not None:
            log_probs = self.token_log_probs(logits, ops.cast(index, ms.int32))[0]
        else:
            log_probs = self.gather(self.log_softmax(logits), 1, index.reshape(-1, 1)).reshape(-1)
        return -(log_probs * mask).sum() / ops.maximum(mask.sum(), 1.)
