"""Learning-rate schedules: a linear warm-up followed by a constant, linear, cosine, cosine-with-restarts or
polynomial decay, with the semantics of HuggingFace's `get_*_schedule_with_warmup`.

Every schedule is a `LearningRateSchedule` cell: `construct(global_step)` takes the number of optimizer updates
already done (int32 Tensor, any shape; the optimizer passes its `global_step` counter, 0 at the first update) and
returns the learning rate for the next update as fp32 of the same shape. It compiles in GRAPH_MODE and is
elementwise, so a vector of steps gives the whole curve in one call.

Warm-up: for step < warmup_steps, lr = warmup_lr_init + (learning_rate - warmup_lr_init) * step / warmup_steps.
warmup_steps = int(warmup_ratio * total_steps) when warmup_ratio is given and warmup_steps is None or 0 (a positive
warmup_steps overrides warmup_ratio, as in HuggingFace's TrainingArguments). Every schedule except the constant
one needs `total_steps`; in YAML leave `total_steps: -1` (or unset) and the Trainer fills in epochs * steps_per_epoch
(`build_lr(cfg, total_steps=...)`). After total_steps the decays stay at their final value.
"""
import math
import numbers

import mindspore as ms
from mindspore import ops
from mindspore.nn.learning_rate_schedule import LearningRateSchedule

from mindformers.tools.logger import logger
from mindformers.tools.register import MindFormerRegister, MindFormerModuleType

__all__ = ['ConstantWarmUpLR', 'LinearWithWarmUpLR', 'CosineWithWarmUpLR', 'CosineWithRestartsAndWarmUpLR',
           'PolynomialWithWarmUpLR']


def _number(cls_name, name, value, minimum=None, maximum=None, strict_min=False):
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{cls_name}: {name} must be a number, got {value!r}")
    value = float(value)
    if minimum is not None and (value < minimum or (strict_min and value == minimum)):
        raise ValueError(f"{cls_name}: {name} must be {'>' if strict_min else '>='} {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{cls_name}: {name} must be <= {maximum}, got {value}")
    return value


def _int_or_none(cls_name, name, value):
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{cls_name}: {name} must be an integer, got {value!r}")
    return int(value)


def _register(alias):
    """Register a schedule under its class name and its HuggingFace-style alias."""
    def wrap(cls):
        MindFormerRegister.register_cls(cls, MindFormerModuleType.LR)
        MindFormerRegister.register_cls(cls, MindFormerModuleType.LR, alias=alias)
        return cls
    return wrap


class _WarmUpLR(LearningRateSchedule):
    """Linear warm-up, then `_decay(step)` (implemented by subclasses) from step warmup_steps on."""
    needs_total_steps = True

    def __init__(self, learning_rate, warmup_steps=None, warmup_lr_init=0., warmup_ratio=None, total_steps=None):
        super().__init__()
        name = type(self).__name__
        self.learning_rate = _number(name, 'learning_rate', learning_rate, minimum=0.)
        self.warmup_lr_init = _number(name, 'warmup_lr_init', warmup_lr_init, minimum=0.)
        total_steps = _int_or_none(name, 'total_steps', total_steps)
        if total_steps is not None and total_steps < 0:
            total_steps = None  # -1: "to be filled by the Trainer"
        if total_steps == 0:
            raise ValueError(f"{name}: total_steps must be positive (or -1 to let the Trainer set it), got 0")
        warmup_steps = _int_or_none(name, 'warmup_steps', warmup_steps)
        if warmup_ratio is not None and not warmup_steps:
            warmup_ratio = _number(name, 'warmup_ratio', warmup_ratio, minimum=0., maximum=1.)
            if total_steps is None:
                raise ValueError(f"{name}: warmup_ratio={warmup_ratio} needs total_steps, got None/-1; the Trainer "
                                 f"passes total_steps=epochs*steps_per_epoch, pass it yourself otherwise")
            warmup_steps = int(warmup_ratio * total_steps)
        warmup_steps = warmup_steps or 0
        if warmup_steps < 0:
            raise ValueError(f"{name}: warmup_steps must be >= 0, got {warmup_steps}")
        if self.needs_total_steps and total_steps is None:
            raise ValueError(f"{name}: total_steps is required (got None/-1); the Trainer passes "
                             f"total_steps=epochs*steps_per_epoch, pass it yourself when building the schedule "
                             f"directly")
        if total_steps is not None and warmup_steps > total_steps:
            logger.warning("%s: warmup_steps (%d) exceeds total_steps (%d); the decay never starts",
                           name, warmup_steps, total_steps)
        self.warmup_steps = warmup_steps
        self.total_steps = total_steps
        self.decay_steps = max(1, total_steps - warmup_steps) if total_steps is not None else 1

    def _progress(self, step):
        """Fraction of the decay done, clipped to [0, 1]."""
        return ops.clamp((step - self.warmup_steps) / self.decay_steps, 0., 1.)

    def _decay(self, step):
        raise NotImplementedError

    def construct(self, global_step):
        step = ops.cast(global_step, ms.float32)
        warm = self.warmup_lr_init + (self.learning_rate - self.warmup_lr_init) * step / max(1, self.warmup_steps)
        return ops.where(step < self.warmup_steps, warm, self._decay(step))


@_register('constant_with_warmup')
class ConstantWarmUpLR(_WarmUpLR):
    """Warm-up, then constant `learning_rate`. total_steps is only needed with warmup_ratio."""
    needs_total_steps = False

    def _decay(self, step):
        return ops.ones_like(step) * self.learning_rate


@_register('linear')
class LinearWithWarmUpLR(_WarmUpLR):
    """Warm-up, then linear decay from `learning_rate` to 0 at total_steps."""

    def _decay(self, step):
        return self.learning_rate * (1. - self._progress(step))


class _FloorLR(_WarmUpLR):
    """A warm-up schedule whose decay ends at `lr_end` (0 gives HuggingFace's curve)."""

    def __init__(self, learning_rate, warmup_steps=None, warmup_lr_init=0., warmup_ratio=None, total_steps=None,
                 lr_end=0.):
        super().__init__(learning_rate, warmup_steps, warmup_lr_init, warmup_ratio, total_steps)
        name = type(self).__name__
        self.lr_end = _number(name, 'lr_end', lr_end, minimum=0.)
        if self.lr_end > self.learning_rate:
            raise ValueError(f"{name}: lr_end ({self.lr_end}) must not exceed learning_rate ({self.learning_rate})")

    def _between(self, fraction):
        """lr_end + (learning_rate - lr_end) * fraction."""
        return self.lr_end + (self.learning_rate - self.lr_end) * fraction


@_register('cosine')
class CosineWithWarmUpLR(_FloorLR):
    """Warm-up, then lr_end + (learning_rate - lr_end) * max(0, (1 + cos(2 pi num_cycles p)) / 2), p the decay
    progress in [0, 1]; num_cycles=0.5 is one half-cosine down to lr_end."""

    def __init__(self, learning_rate, warmup_steps=None, warmup_lr_init=0., warmup_ratio=None, total_steps=None,
                 num_cycles=0.5, lr_end=0.):
        super().__init__(learning_rate, warmup_steps, warmup_lr_init, warmup_ratio, total_steps, lr_end)
        self.num_cycles = _number(type(self).__name__, 'num_cycles', num_cycles, minimum=0., strict_min=True)

    def _decay(self, step):
        wave = 0.5 * (1. + ops.cos(2. * math.pi * self.num_cycles * self._progress(step)))
        return self._between(ops.clamp(wave, 0., None))


@_register('cosine_with_restarts')
class CosineWithRestartsAndWarmUpLR(_FloorLR):
    """Warm-up, then `num_cycles` half-cosines from learning_rate to lr_end (hard restarts); lr_end from
    total_steps on."""

    def __init__(self, learning_rate, warmup_steps=None, warmup_lr_init=0., warmup_ratio=None, total_steps=None,
                 num_cycles=1., lr_end=0.):
        super().__init__(learning_rate, warmup_steps, warmup_lr_init, warmup_ratio, total_steps, lr_end)
        self.num_cycles = _number(type(self).__name__, 'num_cycles', num_cycles, minimum=0., strict_min=True)

    def _decay(self, step):
        progress = self._progress(step)
        cycle = self.num_cycles * progress
        wave = 0.5 * (1. + ops.cos(math.pi * (cycle - ops.floor(cycle))))
        return self._between(ops.where(progress < 1., wave, ops.zeros_like(wave)))


@_register('polynomial')
class PolynomialWithWarmUpLR(_FloorLR):
    """Warm-up, then lr_end + (learning_rate - lr_end) * (1 - p) ** power, p the decay progress in [0, 1].
    lr_end defaults to 1e-7 (HuggingFace's default) and must be below learning_rate."""

    def __init__(self, learning_rate, warmup_steps=None, warmup_lr_init=0., warmup_ratio=None, total_steps=None,
                 lr_end=1e-7, power=1.0):
        super().__init__(learning_rate, warmup_steps, warmup_lr_init, warmup_ratio, total_steps, lr_end)
        name = type(self).__name__
        if not self.lr_end < self.learning_rate:
            raise ValueError(f"{name}: lr_end ({self.lr_end}) must be smaller than learning_rate "
                             f"({self.learning_rate})")
        self.power = _number(name, 'power', power, minimum=0., strict_min=True)

    def _decay(self, step):
        return self._between(ops.pow(1. - self._progress(step), self.power))
