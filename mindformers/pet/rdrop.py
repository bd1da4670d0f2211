"""R-Drop: a training loss over two dropout passes of each sequence (MindPet's RDropLoss / rdrop_repeat).

The batch is repeated as `repeat(2, axis=0)` does, so rows 2i and 2i+1 are the same sequence, each seeing its own
dropout. With p1, p2 the twins' next-token distributions at a position whose target counts:

    loss = CE + alpha / 4 * sum_pairs sum_v [p1 log(p1 / p2) + p2 log(p2 / p1)] / max(n_pairs, 1)

CE is the masked mean cross-entropy over all 2B rows (the base loss of the repeated batch), the KL terms
(KL(p1||p2) + KL(p2||p1), summed over the vocabulary) are taken at the n_pairs positions whose target counts
(ignored and padding targets are left out, as in the base loss). MindPet divides the summed KL by 4 and by nothing
else (its `.mean()` acts on a scalar), so its KL weight grows with the number of rows; here it is averaged over the
counted pairs too, so `alpha` means the same at any batch size and sequence length (for one pair of rows the two
agree). Nothing is frozen: the whole model trains unless freeze_include / freeze_exclude say otherwise."""
import dataclasses
from typing import ClassVar

import mindspore as ms
from mindspore import nn, ops

from mindformers.core.loss import CrossEntropyLoss
from mindformers.modules.layers import Dropout
from mindformers.pet.config import PetConfig, register_pet_config
from mindformers.pet.freeze import freeze_modules
from mindformers.pet.model import register_pet_method
from mindformers.tools.logger import logger


@dataclasses.dataclass
class RDropConfig(PetConfig):
    """R-Drop with KL weight `alpha` (MindPet's default 4)."""

    pet_type: ClassVar[str] = 'rdrop'
    alpha: float = 4.0

    def validate(self):
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or self.alpha <= 0:
            raise ValueError(f"pet_config.alpha must be a positive number, got {self.alpha!r}")


class RDropLoss(nn.Cell):
    """`construct(logits [2B, S, V], targets [2B * S] int, mask [2B * S] float: 1 where the target counts)` -> fp32
    scalar CE + alpha / 4 * (sum over counted twin positions of sum_v (p1 - p2)(log p1 - log p2)) / max(n_pairs, 1),
    with CE the masked mean cross-entropy over all rows; rows 2i and 2i+1 are twins (`repeat`), a pair counted
    where the first twin's mask is 1 (see the module docstring)."""

    def __init__(self, alpha=4.0, parallel_config=None):
        super().__init__()
        self.alpha = float(alpha)
        self.cross_entropy = CrossEntropyLoss(parallel_config)
        self.log_softmax = ops.LogSoftmax(axis=-1)

    @staticmethod
    def repeat(*columns):
        """Each [B, ...] column -> [2B, ...] with rows 2i and 2i+1 equal to row i (None stays None)."""
        out = ()
        for column in columns:
            out += (None if column is None else ops.repeat_elements(column, 2, 0),)
        return out

    def construct(self, logits, targets, mask):
        rows, seq, vocab = logits.shape
        logits = ops.cast(logits, ms.float32)
        ce = self.cross_entropy(logits.reshape(-1, vocab), targets, mask)
        log_probs = self.log_softmax(logits).reshape(rows // 2, 2, seq, vocab)
        first, second = log_probs[:, 0], log_probs[:, 1]
        # KL(p1||p2) + KL(p2||p1) = sum_v (p1 - p2)(log p1 - log p2)
        symmetric = ((ops.exp(first) - ops.exp(second)) * (first - second)).sum(-1)
        pairs = ops.cast(mask, ms.float32).reshape(rows // 2, 2, seq)[:, 0]
        kl = (symmetric * pairs).sum() / ops.maximum(pairs.sum(), 1.)
        return ce + self.alpha / 4 * kl


def apply_rdrop(model, config):
    """Give `model` (a causal LM, with dropout) the R-Drop training loss; adds no parameters."""
    if not hasattr(model, 'pet_loss'):
        raise ValueError(f"pet_type rdrop replaces a causal LM's training loss; {type(model).__name__} has none")
    if not any(isinstance(cell, Dropout) and cell.p > 0 for _, cell in model.cells_and_names()):
        settings = sorted(key for key in getattr(model.config, 'to_dict', dict)() if 'dropout' in key)
        hint = f"set one of {', '.join(settings)} above 0" if settings else "its config has no dropout setting"
        raise ValueError(f"pet_type rdrop compares two dropout passes, but {type(model).__name__} has no dropout "
                         f"(every rate is 0; it would train as without R-Drop, at twice the cost): {hint}")
    model.pet_loss = RDropLoss(config.alpha, getattr(model.config, 'parallel_config', None))
    freeze_modules(model, config.freeze_include, config.freeze_exclude)
    logger.info("rdrop: every training batch runs twice (rows 2i, 2i+1), alpha %s", config.alpha)
    return []


register_pet_config(RDropConfig)
register_pet_method(RDropConfig, apply_rdrop, freeze_mode=None)
