"""Optimizers and `build_optim`."""
from mindformers.core.lr import build_lr
from mindformers.tools.register import MindFormerRegister, MindFormerModuleType, MindFormerConfig
from .adamw import AdamWeightDecay, param_groups

__all__ = ['build_optim', 'AdamWeightDecay', 'param_groups']


def build_optim(config=None, params=None, learning_rate=None, default_args=None, class_name=None,
                lr_default_args=None, where='optimizer', **kwargs):
    """Build an optimizer from `config` (a mapping with `type` plus keyword arguments; `type` is a registered
    name: ours such as 'AdamWeightDecay'/'adamw', or any MindSpore `nn.optim` class such as 'Momentum').

    `params` and `learning_rate` (a number or a `LearningRateSchedule`), when given, replace the config's;
    `default_args` (MindFormers style, e.g. `{'params': ..., 'learning_rate': ...}`) override config keys too.
    A config `learning_rate` that is itself a mapping (`learning_rate: {type: cosine, ...}`) is built with
    `build_lr(..., **lr_default_args)`. Without `config`, `class_name` and keyword arguments are used. Returns
    None when both are missing."""
    if config is None and class_name is None:
        return None
    cfg = {'type': class_name, **kwargs} if config is None else \
        (config.to_dict() if isinstance(config, MindFormerConfig) else dict(config))
    cfg.update(default_args or {})
    if params is not None:
        cfg['params'] = params
    if learning_rate is not None:
        cfg['learning_rate'] = learning_rate
    if 'params' not in cfg:
        raise ValueError(f"{where}: no parameters to optimize; pass params=network.trainable_params()")
    if isinstance(cfg.get('learning_rate'), dict):
        cfg['learning_rate'] = build_lr(cfg['learning_rate'], lr_default_args, where=f'{where}.learning_rate')
    return MindFormerRegister.get_instance_from_cfg(cfg, MindFormerModuleType.OPTIMIZER, where=where)
