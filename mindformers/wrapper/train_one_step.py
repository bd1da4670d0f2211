"""Compiled training steps: forward + backward + (all-reduce) + clipping + optimizer, with gradient accumulation and
loss scaling."""
import mindspore as ms
from mindspore import nn, ops, Parameter, Tensor
from mindspore.context import ParallelMode
from mindspore.parallel._utils import _get_parallel_mode, _get_gradients_mean, _get_device_num

from mindformers.core.clip_grad import ClipGradNorm
from mindformers.tools.register import MindFormerRegister, MindFormerModuleType

_ZEROS_LIKE = ops.MultitypeFuncGraph('zeros_like_assign')


@_ZEROS_LIKE.register('Tensor')
def _zero(buffer):
    return ops.assign(buffer, ops.zeros_like(buffer))


_ACCUMULATE = ops.MultitypeFuncGraph('accumulate')


@_ACCUMULATE.register('Tensor', 'Tensor')
def _accumulate(buffer, grad):
    return ops.assign_add(buffer, ops.cast(grad, buffer.dtype))


_UNSCALE = ops.MultitypeFuncGraph('unscale')


@_UNSCALE.register('Tensor', 'Tensor')
def _unscale(reciprocal_scale, grad):
    return grad * ops.cast(reciprocal_scale, grad.dtype)


_AVERAGE = ops.MultitypeFuncGraph('average_with')


@_AVERAGE.register('Tensor', 'Tensor', 'Tensor')
def _average(scale, buffer, grad):
    return (buffer + ops.cast(grad, buffer.dtype)) * scale


class _ScaledLoss(nn.Cell):
    """network(*inputs) * scale: differentiating it gives gradients multiplied by the loss scale."""

    def __init__(self, network, scale):
        super().__init__(auto_prefix=False)
        self.network = network
        self.scale = scale

    def construct(self, *inputs):
        return self.network(*inputs) * ops.cast(self.scale, ms.float32)


@MindFormerRegister.register(MindFormerModuleType.WRAPPER)
class MFTrainOneStepCell(nn.Cell):
    """One optimizer update per call: `(loss, grad_norm) = cell(*batch)`.

    With `gradient_accumulation_steps = k > 1`, call `accumulate(*micro_batch)` for the first k-1 micro batches and
    this cell for the k-th: the update uses the mean of the k micro-batch gradients (the same update as one batch k
    times larger when the loss is a per-token mean over equally-sized micro batches). Under data parallel the
    gradients are averaged across ranks before clipping and the returned loss is the mean of the ranks' losses.
    `grad_norm` is the global norm before clipping.

    `scale_sense` (for fp16): None (no scaling), a number (a fixed loss scale), or a loss-scale manager cell such as
    MindSpore's `DynamicLossScaleUpdateCell(loss_scale_value, scale_factor, scale_window)`. The loss is multiplied by
    the scale before differentiation and the gradients divided by it; when any gradient is not finite (on any rank)
    the update is skipped and a dynamic manager lowers the scale, which grows again after `scale_window` clean
    steps. The current scale is the parameter `scale_sense` (saved with checkpoints); `overflow` tells whether the
    last call skipped its update."""

    def __init__(self, network, optimizer, use_clip_grad=True, max_grad_norm=1.0, gradient_accumulation_steps=1,
                 scale_sense=None):
        super().__init__(auto_prefix=False)
        if int(gradient_accumulation_steps) < 1:
            raise ValueError(f"gradient_accumulation_steps must be >= 1, got {gradient_accumulation_steps}")
        self.network = network
        self.network.set_grad()
        self.optimizer = optimizer
        self.weights = optimizer.parameters
        self.loss_scaling_manager = None
        self.use_loss_scale = scale_sense is not None
        if isinstance(scale_sense, nn.Cell):
            self.loss_scaling_manager = scale_sense
            scale_sense = scale_sense.get_loss_scale()
        if self.use_loss_scale:
            if isinstance(scale_sense, bool) or not isinstance(scale_sense, (int, float)) or scale_sense <= 0:
                raise ValueError(f"scale_sense must be a positive number or a loss-scale manager cell, got "
                                 f"{scale_sense!r}")
            self.scale_sense = Parameter(Tensor(float(scale_sense), ms.float32), name='scale_sense',
                                         requires_grad=False)
            self.grad_fn = ms.value_and_grad(_ScaledLoss(self.network, self.scale_sense), None, self.weights)
        else:
            self.grad_fn = ms.value_and_grad(self.network, None, self.weights)
        self.overflow = Parameter(Tensor(False, ms.bool_), name='overflow', requires_grad=False)
        self.use_clip_grad = bool(use_clip_grad)
        self.clip = ClipGradNorm(max_norm=float(max_grad_norm))
        self.accumulation_steps = int(gradient_accumulation_steps)
        self.hyper_map = ops.HyperMap()
        if self.accumulation_steps > 1:
            self.accu_grads = self.weights.clone(prefix='accu_grads', init='zeros')
            self.accu_scale = Tensor(1.0 / self.accumulation_steps, ms.float32)
        self.grad_reducer = ops.identity
        self.all_reduce = None
        self.device_num = 1
        parallel_mode = _get_parallel_mode()
        if parallel_mode in (ParallelMode.DATA_PARALLEL, ParallelMode.HYBRID_PARALLEL):
            self.device_num = _get_device_num()
            self.grad_reducer = nn.DistributedGradReducer(self.weights, _get_gradients_mean(), self.device_num)
            self.all_reduce = ops.AllReduce()

    def construct(self, *inputs):
        loss, grads = self.grad_fn(*inputs)
        if self.accumulation_steps > 1:
            grads = self.hyper_map(ops.partial(_AVERAGE, self.accu_scale), self.accu_grads, grads)
            self.hyper_map(_ZEROS_LIKE, self.accu_grads)
        grads = self.grad_reducer(grads)
        if self.use_loss_scale:
            scale = self.scale_sense
            loss = loss / scale
            grads = self.hyper_map(ops.partial(_UNSCALE, ops.reciprocal(scale)), grads)
        if self.all_reduce is not None:
            loss = self.all_reduce(loss) / self.device_num  # the mean over ranks, not this rank's own loss
        clipped, grad_norm = self.clip(grads)
        if self.use_clip_grad:
            grads = clipped
        if not self.use_loss_scale:
            return ops.depend(loss, self.optimizer(grads)), grad_norm
        # the global norm is finite exactly when every gradient is
        overflow = ops.logical_not(ops.isfinite(grad_norm))
        if self.all_reduce is not None:
            overflow = self.all_reduce(ops.cast(overflow, ms.float32)) > 0
        if self.loss_scaling_manager is not None:
            overflow = self.loss_scaling_manager(self.scale_sense, overflow)
        ops.assign(self.overflow, overflow)
        if not overflow:
            loss = ops.depend(loss, self.optimizer(grads))
        return loss, grad_norm

    def accumulate(self, *inputs):
        """Forward + backward on one micro batch, adding its gradients to the accumulation buffers."""
        return self._accumulate_cell(*inputs)

    @property
    def _accumulate_cell(self):
        if not hasattr(self, '_accumulator'):
            object.__setattr__(self, '_accumulator', _AccumulateStep(self))
        return self._accumulator


class _AccumulateStep(nn.Cell):
    """Compiled forward + backward that adds gradients into the owner's `accu_grads` and returns the loss (under
    data parallel, its mean over the ranks)."""

    def __init__(self, owner):
        super().__init__(auto_prefix=False)
        self.grad_fn = owner.grad_fn
        self.accu_grads = owner.accu_grads
        self.use_loss_scale = owner.use_loss_scale
        self.scale_sense = owner.scale_sense if owner.use_loss_scale else None
        self.all_reduce, self.device_num = owner.all_reduce, owner.device_num
        self.hyper_map = ops.HyperMap()

    def construct(self, *inputs):
        loss, grads = self.grad_fn(*inputs)  # scaled by the loss scale, if any, until the update unscales them
        loss = ops.depend(loss, self.hyper_map(_ACCUMULATE, self.accu_grads, grads))
        if self.use_loss_scale:
            loss = loss / self.scale_sense
        if self.all_reduce is not None:
            loss = self.all_reduce(loss) / self.device_num
        return loss
