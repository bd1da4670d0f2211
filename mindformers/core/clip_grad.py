"""Global-norm gradient clipping (the rule of `torch.nn.utils.clip_grad_norm_`)."""
import numbers

import mindspore as ms
from mindspore import nn, ops, Tensor

from mindformers.kernels import FusedSumOfSquares, use_fused

__all__ = ['ClipGradNorm']

_square_sum = ops.MultitypeFuncGraph('square_sum')


@_square_sum.register('Tensor')
def _sum_of_squares(grad):
    grad = ops.cast(grad, ms.float32)
    squares = grad * grad
    if squares.ndim >= 2:
        # a row-wise reduction first runs on all cores; a single all-axes ReduceSum runs on one (5x slower on CPU)
        squares = ops.reduce_sum(squares.reshape(squares.shape[0], -1), 1)
    return ops.reduce_sum(squares)


_fp32 = ops.MultitypeFuncGraph('fp32')


@_fp32.register('Tensor')
def _to_fp32(grad):
    return ops.cast(grad, ms.float32)


_scale = ops.MultitypeFuncGraph('scale_grad')


@_scale.register('Tensor', 'Tensor')
def _scale_grad(coef, grad):
    return grad * ops.cast(coef, grad.dtype)


class ClipGradNorm(nn.Cell):
    """`construct(grads)` -> `(clipped_grads, global_norm)`.

    `grads` is a tuple of Tensors; `global_norm` (fp32 scalar) is the L2 norm of all of them together, before
    clipping; every gradient is multiplied by min(1, max_norm / (global_norm + 1e-6)), so the clipped global norm is
    at most `max_norm`. Gradients keep their dtypes; the norm is accumulated in fp32."""

    def __init__(self, max_norm=1.0):
        super().__init__()
        if isinstance(max_norm, bool) or not isinstance(max_norm, numbers.Real) or max_norm <= 0:
            raise ValueError(f"ClipGradNorm: max_norm must be a number > 0, got {max_norm!r}")
        self.max_norm = Tensor(float(max_norm), ms.float32)
        self.hyper_map = ops.HyperMap()
        self.sum_of_squares = FusedSumOfSquares() if use_fused(ms.float32) else None  # one pass over all gradients

    def construct(self, grads):
        if self.sum_of_squares is not None:
            global_norm = ops.sqrt(self.sum_of_squares(self.hyper_map(_fp32, grads)).sum())
        else:
            global_norm = ops.sqrt(ops.addn(self.hyper_map(_square_sum, grads)))
        coef = ops.minimum(self.max_norm / (global_norm + 1e-6), 1.)
        return self.hyper_map(ops.partial(_scale, coef), grads), global_norm
