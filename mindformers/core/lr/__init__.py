"""Learning-rate schedules and `build_lr`."""
from mindspore.nn.learning_rate_schedule import LearningRateSchedule

from mindformers.tools.register import MindFormerRegister, MindFormerModuleType, MindFormerConfig
from .lr_schedule import (ConstantWarmUpLR, LinearWithWarmUpLR, CosineWithWarmUpLR, CosineWithRestartsAndWarmUpLR,
                          PolynomialWithWarmUpLR)

__all__ = ['build_lr', 'ConstantWarmUpLR', 'LinearWithWarmUpLR', 'CosineWithWarmUpLR',
           'CosineWithRestartsAndWarmUpLR', 'PolynomialWithWarmUpLR']


def _unset(key, value):
    return value is None or (key == 'total_steps' and value == -1)


def build_lr(config=None, default_args=None, class_name=None, where='lr_schedule', **kwargs):
    """Build a learning-rate schedule from `config` (a mapping with `type`, a registered name such as 'cosine' or
    'CosineWithWarmUpLR', plus its keyword arguments).

    `default_args` and keyword arguments fill keys that `config` lacks or leaves unset (None, or -1 for
    total_steps): the Trainer calls `build_lr(cfg, total_steps=epochs * steps_per_epoch)`. Without `config`,
    `class_name` names the schedule and keyword arguments are its arguments. Returns None when both are missing;
    a schedule instance passes through. `where` names the YAML section in errors."""
    if isinstance(config, LearningRateSchedule):
        return config
    defaults = dict(default_args or {}, **kwargs)
    if config is None:
        if class_name is None:
            return None
        config = {'type': class_name}
    cfg = config.to_dict() if isinstance(config, MindFormerConfig) else dict(config)
    for key, value in defaults.items():
        if _unset(key, cfg.get(key)):
            cfg[key] = value
    return MindFormerRegister.get_instance_from_cfg(cfg, MindFormerModuleType.LR, where=where)
