"""Learning-rate schedules against HuggingFace's get_*_schedule_with_warmup, registry names and build_lr."""
import numpy as np
import pytest
import torch
import transformers
import mindspore as ms
from mindspore import Tensor

from mindformers.core.lr import build_lr
from mindformers.core.lr.lr_schedule import (ConstantWarmUpLR, LinearWithWarmUpLR, CosineWithWarmUpLR,
                                             CosineWithRestartsAndWarmUpLR, PolynomialWithWarmUpLR)
from mindformers.tools.register import MindFormerRegister

TOTAL = 50


def hf_curve(name, warmup, total=TOTAL, lr=1.0, **kwargs):
    """The learning rate HuggingFace's scheduler gives at optimizer steps 0..total."""
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    if name == 'constant_with_warmup':
        sched = transformers.get_constant_schedule_with_warmup(opt, warmup)
    else:
        make = {'linear': transformers.get_linear_schedule_with_warmup,
                'cosine': transformers.get_cosine_schedule_with_warmup,
                'cosine_with_restarts': transformers.get_cosine_with_hard_restarts_schedule_with_warmup,
                'polynomial': transformers.get_polynomial_decay_schedule_with_warmup}[name]
        sched = make(opt, warmup, total, **kwargs)
    curve = []
    for _ in range(total + 1):
        curve.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    return np.array(curve)


def ms_curve(schedule, steps):
    return schedule(Tensor(np.asarray(steps, np.int32))).asnumpy()


CASES = [
    ('linear', 7, {}),
    ('cosine', 7, {}),
    ('cosine', 0, {'num_cycles': 1.5}),
    ('cosine_with_restarts', 5, {'num_cycles': 3}),
    ('polynomial', 7, {'power': 2.0, 'lr_end': 0.01}),
    ('polynomial', 3, {}),
    ('constant_with_warmup', 9, {}),
]


@pytest.mark.parametrize('name,warmup,kwargs', CASES)
def test_matches_huggingface(name, warmup, kwargs):
    # learning_rate 1.0 makes the tolerance relative: fp32 against HF's float64
    schedule = build_lr({'type': name, 'learning_rate': 1.0, 'warmup_steps': warmup, **kwargs}, total_steps=TOTAL)
    np.testing.assert_allclose(ms_curve(schedule, range(TOTAL + 1)), hf_curve(name, warmup, **kwargs), rtol=0,
                               atol=1e-6)


def test_warmup_ratio_and_realistic_scale():
    schedule = build_lr({'type': 'cosine', 'learning_rate': 3e-4, 'warmup_ratio': 0.1, 'total_steps': -1},
                        total_steps=TOTAL)
    assert schedule.warmup_steps == 5
    # a positive warmup_steps overrides warmup_ratio (HuggingFace's rule); 0 or None leaves it to the ratio
    assert build_lr({'type': 'linear', 'learning_rate': 1.0, 'warmup_steps': 3, 'warmup_ratio': 0.5},
                    total_steps=TOTAL).warmup_steps == 3
    assert build_lr({'type': 'linear', 'learning_rate': 1.0, 'warmup_steps': 0, 'warmup_ratio': 0.5},
                    total_steps=TOTAL).warmup_steps == 25
    np.testing.assert_allclose(ms_curve(schedule, range(TOTAL + 1)), hf_curve('cosine', 5, lr=3e-4), rtol=0,
                               atol=3e-4 * 1e-6)


def test_scalar_step_and_optimizer_counter_shape():
    schedule = LinearWithWarmUpLR(learning_rate=0.5, warmup_steps=4, total_steps=20)
    lr = schedule(Tensor(2, ms.int32))
    assert lr.shape == () and lr.dtype == ms.float32
    assert float(lr) == pytest.approx(0.25)
    lr = schedule(Tensor([12], ms.int32))  # the optimizer's global_step is int32 [1]
    assert lr.shape == (1,)
    assert float(lr[0]) == pytest.approx(0.5 * 8 / 16)


def test_warmup_lr_init_and_end_of_schedule():
    schedule = CosineWithWarmUpLR(learning_rate=1e-3, warmup_steps=10, warmup_lr_init=1e-4, total_steps=30,
                                  lr_end=1e-5)
    curve = ms_curve(schedule, [0, 5, 10, 30, 31, 100])
    np.testing.assert_allclose(curve, [1e-4, 5.5e-4, 1e-3, 1e-5, 1e-5, 1e-5], rtol=1e-6)
    # after total_steps every decay stays at its final value (HF's cosine would rise again)
    for cls, kwargs in ((LinearWithWarmUpLR, {}), (PolynomialWithWarmUpLR, {'lr_end': 1e-4}),
                        (CosineWithRestartsAndWarmUpLR, {'num_cycles': 2.})):
        late = ms_curve(cls(learning_rate=1e-3, warmup_steps=2, total_steps=10, **kwargs), [10, 11, 1000])
        np.testing.assert_allclose(late, [late[0]] * 3, rtol=0, atol=1e-12)
    assert ConstantWarmUpLR(learning_rate=2e-3, warmup_steps=3)(Tensor(10 ** 6, ms.int32)).asnumpy() == \
        pytest.approx(2e-3)


def test_registered_names():
    for alias, cls in (('constant_with_warmup', ConstantWarmUpLR), ('linear', LinearWithWarmUpLR),
                       ('cosine', CosineWithWarmUpLR), ('cosine_with_restarts', CosineWithRestartsAndWarmUpLR),
                       ('polynomial', PolynomialWithWarmUpLR)):
        assert MindFormerRegister.get_cls('lr', alias) is cls
        assert MindFormerRegister.get_cls('lr', cls.__name__) is cls
    # MindSpore's own schedules stay available next to ours
    assert MindFormerRegister.get_cls('lr', 'CosineDecayLR') is ms.nn.CosineDecayLR


def test_build_lr_fills_only_unset_keys():
    cfg = {'type': 'linear', 'learning_rate': 1e-3, 'warmup_steps': 2, 'total_steps': 100}
    assert build_lr(cfg, total_steps=10).total_steps == 100  # an explicit total wins over the Trainer's
    assert build_lr(dict(cfg, total_steps=-1), total_steps=10).total_steps == 10
    assert build_lr(dict(cfg, total_steps=None), default_args={'total_steps': 12}).total_steps == 12
    assert build_lr(class_name='constant_with_warmup', learning_rate=1e-3).learning_rate == 1e-3
    assert build_lr(None) is None
    schedule = ConstantWarmUpLR(learning_rate=1e-3)
    assert build_lr(schedule) is schedule


def test_missing_total_steps_is_a_clear_error():
    with pytest.raises(ValueError, match=r"LinearWithWarmUpLR: total_steps is required .*Trainer"):
        build_lr({'type': 'linear', 'learning_rate': 1e-3, 'total_steps': -1})
    with pytest.raises(ValueError, match=r"warmup_ratio=0.1 needs total_steps"):
        ConstantWarmUpLR(learning_rate=1e-3, warmup_ratio=0.1)
    ConstantWarmUpLR(learning_rate=1e-3, warmup_steps=5)  # the constant schedule needs no total


@pytest.mark.parametrize('cfg,error,pattern', [
    ({'type': 'polynomial', 'learning_rate': 1e-3, 'total_steps': 10, 'lr_end': 1e-3}, ValueError,
     'lr_end .* smaller'),
    ({'type': 'cosine', 'learning_rate': -1., 'total_steps': 10}, ValueError, 'learning_rate must be >= 0'),
    ({'type': 'cosine', 'learning_rate': 1e-3, 'total_steps': 10, 'warmup_steps': 1.5}, TypeError,
     'warmup_steps must be an integer'),
    ({'type': 'cosine', 'learning_rate': 1e-3, 'total_steps': 10, 'warmup_ratio': 2.}, ValueError,
     'warmup_ratio must be <= 1'),
    ({'type': 'cosine', 'learning_rate': 1e-3, 'total_steps': 10, 'decay_rate': 0.5}, TypeError, 'decay_rate'),
    ({'type': 'cosine_restarts', 'learning_rate': 1e-3}, ValueError, "cosine_with_restarts"),
])
def test_bad_arguments(cfg, error, pattern):
    with pytest.raises(error, match=pattern):
        build_lr(cfg)
