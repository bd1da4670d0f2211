"""AdamW (Adam with decoupled weight decay and bias correction), numerically the update of `torch.optim.AdamW`."""
import math
import numbers

import numpy as np
import mindspore as ms
from mindspore import nn, ops, Parameter, ParameterTuple, Tensor
from mindspore.common.initializer import initializer

from mindformers.kernels import FusedAdamW, use_fused
from mindformers.tools.register import MindFormerRegister, MindFormerModuleType

__all__ = ['AdamWeightDecay', 'param_groups']

_adamw_update = ops.MultitypeFuncGraph('adamw_update')


@_adamw_update.register('Function', 'Tensor', 'Tensor', 'Tensor', 'Tensor', 'Tensor', 'Tensor', 'Tensor', 'Tensor',
                        'Number', 'Bool', 'Tensor', 'Tensor', 'Tensor', 'Tensor')
def _update(adam, lr, step_size, eps, beta1, beta2, one_minus_beta1, one_minus_beta2, zero,
            weight_decay, fused, param, m, v, grad):
    """One AdamW update of `param` in place. `step_size` ~ lr * sqrt(1 - beta2^t) / (1 - beta1^t) and `eps` ~
    eps * sqrt(1 - beta2^t) fold the bias corrections into Adam's plain form param -= step_size * m / (sqrt(v) + eps).
    `fused` (fp32 parameters) uses MindSpore's fused Adam kernel, given zero beta powers so it applies no bias
    correction of its own."""
    if fused:
        grad = ops.cast(grad, ms.float32)
        if weight_decay > 0:
            grad = ops.depend(grad, ops.assign(param, param * (1. - lr * weight_decay)))
        return ops.depend(True, adam(param, m, v, zero, zero, step_size, beta1, beta2, eps, grad))
    grad = ops.cast(grad, ms.float32)
    value = ops.cast(param, ms.float32)
    m_new = beta1 * m + one_minus_beta1 * grad
    v_new = beta2 * v + one_minus_beta2 * ops.square(grad)
    if weight_decay > 0:
        value = value * (1. - lr * weight_decay)
    value = value - step_size * m_new / (ops.sqrt(v_new) + eps)
    success = ops.depend(True, ops.assign(m, m_new))
    success = ops.depend(success, ops.assign(v, v_new))
    return ops.depend(success, ops.assign(param, ops.cast(value, param.dtype)))


def param_groups(params, weight_decay):
    """Split `params` into [(param, weight_decay), ...]: parameters with 2 or more dimensions (matmul and embedding
    weights) decay, 1-D ones (biases, LayerNorm/RMSNorm gains and shifts) do not.

    `params` may also be MindSpore-style groups `[{'params': [...], 'weight_decay': x}, ...]`; a group without
    `weight_decay` follows the rule above."""
    params = list(params)
    if not params:
        raise ValueError("AdamWeightDecay: params is empty")
    pairs = []
    if all(isinstance(p, dict) for p in params):
        for index, group in enumerate(params):
            unknown = set(group) - {'params', 'weight_decay'}
            if unknown or 'params' not in group:
                raise ValueError(f"AdamWeightDecay: params[{index}] must be a group with 'params' and optionally "
                                 f"'weight_decay', got keys {sorted(group)}")
            group_decay = group.get('weight_decay')
            for param, decay in param_groups(group['params'], weight_decay):
                pairs.append((param, decay if group_decay is None else _non_negative('weight_decay', group_decay)))
    else:
        for index, param in enumerate(params):
            if not isinstance(param, Parameter):
                raise TypeError(f"AdamWeightDecay: params[{index}] must be a Parameter (or all entries groups), "
                                f"got {type(param).__name__}")
            pairs.append((param, weight_decay if len(param.shape) >= 2 else 0.))
    seen = set()
    for param, _ in pairs:
        if param.name in seen:
            raise ValueError(f"AdamWeightDecay: parameter {param.name!r} is given more than once")
        seen.add(param.name)
    return pairs


def _non_negative(name, value):
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or value < 0:
        raise ValueError(f"AdamWeightDecay: {name} must be a number >= 0, got {value!r}")
    return float(value)


def _fp32_state(params, prefix):
    """Zero moments named `<prefix>.<param name>`, fp32 whatever the parameter's dtype."""
    states = []
    for param in params:
        if param.dtype == ms.float32:
            state = param.clone(init='zeros')  # a clone keeps the parameter's parallel layout
            state.name = f'{prefix}.{param.name}'
        else:
            state = Parameter(initializer('zeros', param.shape, ms.float32), name=f'{prefix}.{param.name}')
        states.append(state)
    return ParameterTuple(states)


@MindFormerRegister.register(MindFormerModuleType.OPTIMIZER)
@MindFormerRegister.register(MindFormerModuleType.OPTIMIZER, alias='adamw')
@MindFormerRegister.register(MindFormerModuleType.OPTIMIZER, alias='FusedAdamWeightDecay')
@MindFormerRegister.register(MindFormerModuleType.OPTIMIZER, alias='FP32StateAdamWeightDecay')
class AdamWeightDecay(nn.Optimizer):
    """AdamW: for each update t = 1, 2, ... with learning rate lr_t,
    p <- p * (1 - lr_t * wd);  m <- b1 m + (1 - b1) g;  v <- b2 v + (1 - b2) g^2;
    p <- p - lr_t / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)   (torch.optim.AdamW).

    Args:
        params: Parameters, or groups `[{'params': [...], 'weight_decay': x}]`. Parameters with fewer than 2
            dimensions (biases, norm weights) get no weight decay unless their group says otherwise.
        learning_rate: float, a per-step list/Tensor, or a `LearningRateSchedule` called with the update count.
        beta1, beta2: moment decay rates in [0, 1).
        eps: added to the bias-corrected sqrt(v). Defaults to 1e-8 like torch.optim.AdamW and HuggingFace's
            TrainingArguments (MindSpore's nn.AdamWeightDecay uses 1e-6), so a run ported from PyTorch matches.
        weight_decay: decoupled decay coefficient (multiplied by the learning rate, as in torch).

    `construct(gradients)` takes a tuple matching `self.parameters`. State, in fp32 whatever the parameter dtype:
    `adam_m.<name>`, `adam_v.<name>` (torch's exp_avg and exp_avg_sq up to the fp32 rounding of 1 - beta, at most
    1.3e-5 relative for beta2=0.999; the update compensates it), and the update count `global_step` (int32 [1]);
    with a float learning rate also `learning_rate`.

    When every parameter is fp32, on CPU (see `kernels.use_fused`) and without optimizer sharding, one fused
    kernel updates them all in a single pass, in place and unseen by MindSpore's side-effect tracking: a graph that
    reads the parameters after the update must order the read with `ops.depend` on the returned value (see
    docs/feature_cards/cpu_kernels.md). Otherwise fp32 parameters are updated by MindSpore's fused Adam kernel
    plus one multiply for the decay, other dtypes by plain ops in fp32 (about 6x slower)."""

    def __init__(self, params, learning_rate=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0):
        weight_decay = _non_negative('weight_decay', weight_decay)
        pairs = param_groups(params, weight_decay)
        super().__init__(learning_rate, [param for param, _ in pairs], 0.0)
        for name, value in (('beta1', beta1), ('beta2', beta2)):
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 <= value < 1:
                raise ValueError(f"AdamWeightDecay: {name} must be in [0, 1), got {value!r}")
        if isinstance(eps, bool) or not isinstance(eps, numbers.Real) or eps <= 0:
            raise ValueError(f"AdamWeightDecay: eps must be a number > 0, got {eps!r}")
        self.weight_decays = tuple(decay for _, decay in pairs)
        self.decay_flags = tuple(decay > 0 for decay in self.weight_decays)
        self.fused_flags = tuple(param.dtype == ms.float32 for param in self._parameters)
        self.moments1 = _fp32_state(self._parameters, 'adam_m')
        self.moments2 = _fp32_state(self._parameters, 'adam_v')
        # MindSpore's Adam kernel weights the new gradient by 1 - fp32(beta), torch by fp32(1 - beta): for
        # beta2 = 0.999 they differ by 1.3e-5 relative. Both paths use the kernel's weights; as m and v are linear in
        # them, scaling the step size and eps by these exact ratios gives torch's update.
        kernel_weight1 = float(np.float32(1.) - np.float32(beta1))
        kernel_weight2 = float(np.float32(1.) - np.float32(beta2))
        m_ratio = kernel_weight1 / float(np.float32(1. - beta1))
        v_ratio_sqrt = math.sqrt(kernel_weight2 / float(np.float32(1. - beta2)))
        # bias corrections are computed in fp64 (scalars only), then rounded once to fp32
        self.beta1_f64 = Tensor(float(beta1), ms.float64)
        self.beta2_f64 = Tensor(float(beta2), ms.float64)
        self.step_size_scale = Tensor(v_ratio_sqrt / m_ratio, ms.float64)
        self.eps_f64 = Tensor(float(eps) * v_ratio_sqrt, ms.float64)
        self.beta1 = Tensor(float(beta1), ms.float32)
        self.beta2 = Tensor(float(beta2), ms.float32)
        self.one_minus_beta1 = Tensor(kernel_weight1, ms.float32)
        self.one_minus_beta2 = Tensor(kernel_weight2, ms.float32)
        self.zero = Tensor(0., ms.float32)
        self.adam = ops.Adam()
        self.fused_update = None
        if all(self.fused_flags) and not self.use_parallel and use_fused(ms.float32):
            self.fused_update = FusedAdamW()
            self.weight_decay_tensor = Tensor(np.array(self.weight_decays, np.float32))

    def construct(self, gradients):
        lr = self.get_lr()  # the schedule at the number of updates done so far
        step = self.global_step + 1
        ops.assign(self.global_step, step)
        t = ops.cast(step, ms.float64).reshape(())
        bias_correction1 = 1. - ops.pow(self.beta1_f64, t)
        bias_correction2_sqrt = ops.sqrt(1. - ops.pow(self.beta2_f64, t))
        step_size = ops.cast(ops.cast(lr, ms.float64) * bias_correction2_sqrt / bias_correction1 *
                             self.step_size_scale, ms.float32)
        eps = ops.cast(self.eps_f64 * bias_correction2_sqrt, ms.float32)
        lr = ops.cast(lr, ms.float32)
        if self.fused_update is not None:
            hyper = ops.stack((lr.reshape(()), step_size.reshape(()), eps.reshape(()), self.beta1, self.beta2,
                               self.one_minus_beta1, self.one_minus_beta2))
            return self.fused_update(hyper, self.weight_decay_tensor, self._parameters, self.moments1, self.moments2,
                                     gradients)
        result = self.hyper_map(
            ops.partial(_adamw_update, self.adam, lr, step_size, eps, self.beta1, self.beta2, self.one_minus_beta1,
                        self.one_minus_beta2, self.zero),
            self.weight_decays, self.fused_flags, self._parameters, self.moments1, self.moments2, gradients)
        if self.use_parallel:
            result = self.broadcast_params(result)
        return result
