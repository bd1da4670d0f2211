"""RMSNorm (LLaMA, GLM2)."""
from mindspore import nn, ops, Parameter
from mindspore.common.initializer import initializer

from mindformers.modules.layers import to_mstype, _dp_mp


class RMSNorm(nn.Cell):
    """x * rsqrt(mean(x^2, last axis) + eps) * weight, computed in `compute_type` and cast back to x's dtype
    before the weight multiplies (as HF's LlamaRMSNorm). `weight` [hidden_size] starts at one.
    x: [..., hidden_size] -> same shape and dtype."""

    def __init__(self, hidden_size, eps=1e-6, param_init_type='float32', compute_type='float32',
                 parallel_config=None):
        super().__init__()
        self.eps = float(eps)
        self.compute_type = to_mstype(compute_type, 'layernorm_compute_type')
        self.weight = Parameter(initializer('ones', [hidden_size], to_mstype(param_init_type, 'param_init_type')),
                                name='weight')
        dp, _ = _dp_mp(parallel_config)
        self.square = ops.Square().shard(((dp, 1, 1),))
        self.mean = ops.ReduceMean(keep_dims=True).shard(((dp, 1, 1),))
        self.rsqrt = ops.Rsqrt().shard(((dp, 1, 1),))
        self.mul = ops.Mul().shard(((dp, 1, 1), (dp, 1, 1)))
        self.mul_weight = ops.Mul().shard(((dp, 1, 1), (1,)))

    def construct(self, x):
        dtype = x.dtype
        y = x if dtype == self.compute_type else ops.cast(x, self.compute_type)
        y = self.mul(y, self.rsqrt(self.mean(self.square(y), -1) + self.eps))
        if y.dtype != dtype:
            y = ops.cast(y, dtype)
        weight = self.weight if self.weight.dtype == dtype else ops.cast(self.weight, dtype)
        return self.mul_weight(y, weight)
