"""Compiled training steps: forward + backward + (all-reduce) + clipping + optimizer, with gradient accumulation."""
import mindspore as ms
from mindspore import nn, ops, Tensor
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


_AVERAGE = ops.MultitypeFuncGraph('average_with')


@_AVERAGE.register('Tensor', 'Tensor', 'Tensor')
def _average(scale, buffer, grad):
    return (buffer + ops.cast(grad, buffer.dtype)) * scale


@MindFormerRegister.register(MindFormerModuleType.WRAPPER)
class MFTrainOneStepCell(nn.Cell):
    """One optimizer update per call: `(loss, grad_norm) = cell(*batch)`.

    With `gradient_accumulation_steps = k > 1`, call `accumulate(*micro_batch)` for the first k-1 micro batches and
    this cell for the k-th: the update uses the mean of the k micro-batch gradients (the same update as one batch k
    times larger when the loss is a per-token mean over equally-sized micro batches). Under data parallel the
    gradients are averaged across ranks before clipping. `grad_norm` is the global norm before clipping."""

    def __init__(self, network, optimizer, use_clip_grad=True, max_grad_norm=1.0, gradient_accumulation_steps=1,
                 **kwargs):
        super().__init__(auto_prefix=False)
        if kwargs:
            raise TypeError(f"MFTrainOneStepCell got unknown argument(s): {', '.join(kwargs)}")
        if int(gradient_accumulation_steps) < 1:
            raise ValueError(f"gradient_accumulation_steps must be >= 1, got {gradient_accumulation_steps}")
        self.network = network
        self.network.set_grad()
        self.optimizer = optimizer
        self.weights = optimizer.parameters
        self.grad_fn = ms.value_and_grad(self.network, None, self.weights)
        self.use_clip_grad = bool(use_clip_grad)
        self.clip = ClipGradNorm(max_norm=float(max_grad_norm))
        self.accumulation_steps = int(gradient_accumulation_steps)
        self.hyper_map = ops.HyperMap()
        if self.accumulation_steps > 1:
            self.accu_grads = self.weights.clone(prefix='accu_grads', init='zeros')
            self.accu_scale = Tensor(1.0 / self.accumulation_steps, ms.float32)
        self.grad_reducer = ops.identity
        parallel_mode = _get_parallel_mode()
        if parallel_mode in (ParallelMode.DATA_PARALLEL, ParallelMode.HYBRID_PARALLEL):
            self.grad_reducer = nn.DistributedGradReducer(self.weights, _get_gradients_mean(), _get_device_num())

    def construct(self, *inputs):
        loss, grads = self.grad_fn(*inputs)
        if self.accumulation_steps > 1:
            grads = self.hyper_map(ops.partial(_AVERAGE, self.accu_scale), self.accu_grads, grads)
            self.hyper_map(_ZEROS_LIKE, self.accu_grads)
        grads = self.grad_reducer(grads)
        clipped, grad_norm = self.clip(grads)
        if self.use_clip_grad:
            grads = clipped
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
    """Compiled forward + backward that adds gradients into the owner's `accu_grads` and returns the loss."""

    def __init__(self, owner):
        super().__init__(auto_prefix=False)
        self.grad_fn = owner.grad_fn
        self.accu_grads = owner.accu_grads
        self.hyper_map = ops.HyperMap()

    def construct(self, *inputs):
        loss, grads = self.grad_fn(*inputs)
        loss = ops.depend(loss, self.hyper_map(_ACCUMULATE, self.accu_grads, grads))
        return loss
