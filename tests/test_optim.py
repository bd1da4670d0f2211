"""AdamWeightDecay against torch.optim.AdamW, build_optim, the registry, and ClipGradNorm against torch."""
import numpy as np
import pytest
import torch
import transformers
import mindspore as ms
from mindspore import nn, ops, Parameter, Tensor

from mindformers.core.clip_grad import ClipGradNorm
from mindformers.core.lr.lr_schedule import LinearWithWarmUpLR
from mindformers.core.optim import build_optim
from mindformers.core.optim.adamw import AdamWeightDecay
from mindformers.tools.register import MindFormerRegister

SHAPES = [(6, 5), (5,), (3, 4, 2), (7,)]


def make_params(seed=0, dtype=ms.float32):
    rng = np.random.default_rng(seed)
    values = [rng.standard_normal(s).astype(np.float32) for s in SHAPES]
    ours = [Parameter(Tensor(v, dtype), name=f'layers.{i}.w') for i, v in enumerate(values)]
    theirs = [torch.nn.Parameter(torch.tensor(v)) for v in values]
    return ours, theirs


def torch_adamw(params, weight_decay, **kwargs):
    """torch AdamW with our default rule: 2-D and larger parameters decay, 1-D ones do not."""
    groups = [{'params': [p for p in params if p.ndim >= 2], 'weight_decay': weight_decay},
              {'params': [p for p in params if p.ndim < 2], 'weight_decay': 0.0}]
    return torch.optim.AdamW(groups, **kwargs)


def run_both(opt, topt, ours, theirs, steps, sched=None, seed=1):
    rng = np.random.default_rng(seed)
    for _ in range(steps):
        grads = [rng.standard_normal(s).astype(np.float32) for s in SHAPES]
        opt(ms.mutable(tuple(Tensor(g) for g in grads)))
        for p, g in zip(theirs, grads):
            p.grad = torch.tensor(g)
        topt.step()
        if sched is not None:
            sched.step()
    return max(float(np.abs(p.asnumpy() - t.detach().numpy()).max()) for p, t in zip(ours, theirs))


def test_matches_torch_adamw_with_schedule_and_decay(kernel_mode):
    ours, theirs = make_params()
    opt = AdamWeightDecay(ours, learning_rate=LinearWithWarmUpLR(1e-2, warmup_steps=2, total_steps=10),
                          beta1=0.8, beta2=0.95, eps=1e-6, weight_decay=0.1)
    topt = torch_adamw(theirs, 0.1, lr=1e-2, betas=(0.8, 0.95), eps=1e-6)
    sched = transformers.get_linear_schedule_with_warmup(topt, 2, 10)
    assert (opt.fused_update is not None) == (kernel_mode == 'kernels')
    assert run_both(opt, topt, ours, theirs, steps=6, sched=sched) < 1e-6
    assert int(opt.global_step.asnumpy()[0]) == 6
    for param, m, v, tparam in zip(ours, opt.moments1, opt.moments2, theirs):
        state = topt.state[tparam]
        # the moments carry the kernel's fp32 rounding of 1 - beta (< 1e-6 relative for beta2=0.95)
        np.testing.assert_allclose(m.asnumpy(), state['exp_avg'].numpy(), rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(v.asnumpy(), state['exp_avg_sq'].numpy(), rtol=1e-6, atol=1e-7)


def test_matches_torch_adamw_defaults_large_lr(kernel_mode):
    # a large fixed lr makes the bias corrections dominate the first updates
    ours, theirs = make_params(seed=3)
    opt = AdamWeightDecay(ours, learning_rate=0.1, weight_decay=0.05)
    topt = torch_adamw(theirs, 0.05, lr=0.1)
    assert run_both(opt, topt, ours, theirs, steps=20, seed=4) < 1e-6
    assert opt.weight_decays == (0.05, 0., 0.05, 0.)


class _Regression(nn.Cell):
    def __init__(self):
        super().__init__()
        self.dense = nn.Dense(4, 3)
        self.norm = nn.LayerNorm((3,))

    def construct(self, x, y):
        return ((self.norm(self.dense(x)) - y) ** 2).mean()


def test_inside_compiled_train_step_matches_torch(kernel_mode):
    """Gradients computed in the same graph as the update, like MFTrainOneStepCell."""
    net = _Regression()
    tnet = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3, eps=1e-7))
    tnet[0].weight.data = torch.tensor(net.dense.weight.asnumpy())
    tnet[0].bias.data = torch.tensor(net.dense.bias.asnumpy())
    net.norm.gamma.set_data(Tensor(np.array([1.5, 0.5, 1.], np.float32)))
    tnet[1].weight.data = torch.tensor(net.norm.gamma.asnumpy())
    opt = build_optim({'type': 'adamw', 'weight_decay': 0.1, 'beta2': 0.98}, params=net.trainable_params(),
                      learning_rate=0.05)
    step = nn.TrainOneStepCell(net, opt)
    topt = torch_adamw(list(tnet.parameters()), 0.1, lr=0.05, betas=(0.9, 0.98))
    rng = np.random.default_rng(0)
    for _ in range(3):
        x, y = rng.standard_normal((8, 4)).astype(np.float32), rng.standard_normal((8, 3)).astype(np.float32)
        loss = step(Tensor(x), Tensor(y))
        topt.zero_grad()
        tloss = ((tnet(torch.tensor(x)) - torch.tensor(y)) ** 2).mean()
        tloss.backward()
        topt.step()
        assert float(loss) == pytest.approx(tloss.item(), abs=1e-5)
    np.testing.assert_allclose(net.dense.weight.asnumpy(), tnet[0].weight.detach().numpy(), atol=1e-5)
    np.testing.assert_allclose(net.norm.beta.asnumpy(), tnet[1].bias.detach().numpy(), atol=1e-5)


def test_state_names_and_fp32_moments_for_fp16_params():
    ours, _ = make_params(dtype=ms.float16)
    ref, _ = make_params()
    opt, ref_opt = AdamWeightDecay(ours, 1e-2, weight_decay=0.1), AdamWeightDecay(ref, 1e-2, weight_decay=0.1)
    names = {p.name for p in opt.get_parameters()}
    for p in ours:
        assert {f'adam_m.{p.name}', f'adam_v.{p.name}'} <= names
    assert {'global_step', 'learning_rate'} <= names
    assert all(m.dtype == ms.float32 for m in opt.moments1 + opt.moments2)
    rng = np.random.default_rng(0)
    for _ in range(2):
        grads = [rng.standard_normal(s).astype(np.float32) for s in SHAPES]
        opt(ms.mutable(tuple(Tensor(g, ms.float16) for g in grads)))
        ref_opt(ms.mutable(tuple(Tensor(g) for g in grads)))
    for p, r in zip(ours, ref):
        assert p.dtype == ms.float16
        np.testing.assert_allclose(p.asnumpy().astype(np.float32), r.asnumpy(), atol=5e-3)
    np.testing.assert_allclose(opt.moments1[0].asnumpy(), ref_opt.moments1[0].asnumpy(), atol=1e-3)


def test_param_groups_and_bad_params():
    ours, _ = make_params()
    opt = AdamWeightDecay([{'params': ours[:2], 'weight_decay': 0.3}, {'params': ours[2:]}], weight_decay=0.1)
    assert opt.weight_decays == (0.3, 0.3, 0.1, 0.)
    with pytest.raises(ValueError, match="'layers.0.w' is given more than once"):
        AdamWeightDecay([ours[0], ours[0]])
    with pytest.raises(ValueError, match=r"params\[0\] must be a group .*got keys \['lr', 'params'\]"):
        AdamWeightDecay([{'params': ours, 'lr': 0.1}])
    with pytest.raises(TypeError, match=r"params\[1\] must be a Parameter"):
        AdamWeightDecay([ours[0], Tensor(np.ones(2, np.float32))])
    with pytest.raises(ValueError, match='beta2 must be in'):
        AdamWeightDecay(ours, beta2=1.0)
    with pytest.raises(ValueError, match='eps must be'):
        AdamWeightDecay(ours, eps=0.)
    with pytest.raises(ValueError, match='weight_decay must be'):
        AdamWeightDecay(ours, weight_decay=-0.1)


def test_build_optim_nested_schedule_and_aliases():
    ours, _ = make_params()
    cfg = {'type': 'FusedAdamWeightDecay', 'eps': 1e-8, 'weight_decay': 0.1,
           'learning_rate': {'type': 'cosine', 'learning_rate': 1e-3, 'warmup_steps': 2, 'total_steps': -1}}
    opt = build_optim(cfg, params=ours, lr_default_args={'total_steps': 20})
    assert isinstance(opt, AdamWeightDecay)
    assert opt.learning_rate.total_steps == 20
    opt = build_optim({'type': 'FP32StateAdamWeightDecay', 'learning_rate': 1e-3},
                      default_args={'params': ours, 'learning_rate': 5e-4})
    assert float(opt.learning_rate.asnumpy()) == pytest.approx(5e-4)
    with pytest.raises(ValueError, match='no parameters to optimize'):
        build_optim({'type': 'adamw'})
    with pytest.raises(TypeError, match='AdamWeightDecay.*betas'):
        build_optim({'type': 'adamw', 'betas': [0.9, 0.95]}, params=ours)


def test_registry_ours_win_and_mindspore_builtins_remain():
    for name in ('AdamWeightDecay', 'adamw', 'FusedAdamWeightDecay', 'FP32StateAdamWeightDecay'):
        assert MindFormerRegister.get_cls('optimizer', name) is AdamWeightDecay
    assert MindFormerRegister.get_cls('optimizer', 'Momentum') is nn.Momentum
    ours, _ = make_params()
    opt = build_optim({'type': 'Momentum', 'momentum': 0.9}, params=ours, learning_rate=0.1)
    assert isinstance(opt, nn.Momentum)


def test_clip_grad_norm_matches_torch(kernel_mode):
    rng = np.random.default_rng(0)
    grads = [rng.standard_normal(s).astype(np.float32) * 3 for s in SHAPES]
    clip = ClipGradNorm(max_norm=2.0)
    assert (clip.sum_of_squares is not None) == (kernel_mode == 'kernels')
    for scale in (1.0, 1e-2):  # clipped, then below the threshold (unchanged)
        scaled = [g * scale for g in grads]
        clipped, norm = clip(ms.mutable(tuple(Tensor(g) for g in scaled)))
        params = [torch.nn.Parameter(torch.zeros(g.shape)) for g in scaled]
        for p, g in zip(params, scaled):
            p.grad = torch.tensor(g)
        tnorm = torch.nn.utils.clip_grad_norm_(params, 2.0)
        assert norm.shape == () and float(norm) == pytest.approx(float(tnorm), rel=1e-6)
        for ours, p in zip(clipped, params):
            np.testing.assert_allclose(ours.asnumpy(), p.grad.numpy(), rtol=1e-6, atol=1e-7)
    half, _ = clip(ms.mutable((Tensor(grads[0], ms.float16),)))
    assert half[0].dtype == ms.float16
    with pytest.raises(ValueError, match='max_norm must be a number > 0'):
        ClipGradNorm(0)


def test_clip_grad_norm_in_graph_with_optimizer():
    net = _Regression()
    opt = AdamWeightDecay(net.trainable_params(), 1e-2)
    clip = ClipGradNorm(1e-3)
    grad_fn = ms.value_and_grad(net, None, opt.parameters)

    class Step(nn.Cell):
        def __init__(self):
            super().__init__()
            self.opt, self.clip = opt, clip

        def construct(self, x, y):
            loss, grads = grad_fn(x, y)
            grads, norm = self.clip(grads)
            return ops.depend(loss, self.opt(grads)), norm

    loss, norm = Step()(Tensor(np.ones((2, 4), np.float32)), Tensor(np.zeros((2, 3), np.float32)))
    assert np.isfinite(float(loss)) and float(norm) > 0
    assert int(opt.global_step.asnumpy()[0]) == 1
