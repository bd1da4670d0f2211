"""RMSNorm (LLaMA, GLM2), and `build_norm` choosing it or LayerNorm by name (decoders whose norm is configurable)."""
import mindspore as ms
from mindspore import nn, ops, Parameter
from mindspore.common.initializer import initializer

from mindformers.kernels import FusedRMSNorm, use_fused
from mindformers.modules.layers import LayerNorm, to_mstype, _dp_mp

NORM_TYPES = ('rmsnorm', 'layernorm')


class RMSNorm(nn.Cell):
    """x * rsqrt(mean(x^2, last axis) + eps) * weight, computed in `compute_type` and cast back to x's dtype
    before the weight multiplies (as HF's LlamaRMSNorm). `weight` [hidden_size] starts at one.
    x: [..., hidden_size] -> same shape and dtype."""

    parameter_inputs = {'weight': ('mul_weight', 1)}

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
        self.add_eps = ops.Add().shard(((dp, 1, 1), ()))
        self.rsqrt = ops.Rsqrt().shard(((dp, 1, 1),))
        self.mul = ops.Mul().shard(((dp, 1, 1), (dp, 1, 1)))
        self.mul_weight = ops.Mul().shard(((dp, 1, 1), (1,)))
        # fp32 throughout, unsharded, on CPU: one kernel pass each way
        fused = dp == 1 and self.weight.dtype == ms.float32 and use_fused(self.compute_type)
        self.fused = FusedRMSNorm(self.eps) if fused else None
        self.fused_frozen = FusedRMSNorm(self.eps, weight_grad=False) if fused else None

    @property
    def frozen(self):
        """Whether the weight is frozen (read when a graph is compiled: a frozen weight's gradient is not computed)."""
        return not self.weight.requires_grad

    def construct(self, x):
        dtype = x.dtype
        if self.fused is not None and dtype == ms.float32:
            if self.frozen:
                return self.fused_frozen(x, self.weight)[0]
            return self.fused(x, self.weight)[0]
        y = x if dtype == self.compute_type else ops.cast(x, self.compute_type)
        y = self.mul(y, self.rsqrt(self.add_eps(self.mean(self.square(y), -1), self.eps)))
        if y.dtype != dtype:
            y = ops.cast(y, dtype)
        weight = self.weight if self.weight.dtype == dtype else ops.cast(self.weight, dtype)
        return self.mul_weight(y, weight)


def build_norm(norm_type, hidden_size, eps, param_init_type='float32', compute_type='float32', parallel_config=None):
    """`RMSNorm` (parameter `weight`) for norm_type 'rmsnorm', `LayerNorm` (`weight` = gamma, `bias` = beta) for
    'layernorm'; other values raise ValueError."""
    norms = {'rmsnorm': RMSNorm, 'layernorm': LayerNorm}
    if norm_type not in norms:
        raise ValueError(f"norm_type must be one of {', '.join(NORM_TYPES)}, got {norm_type!r}")
    return norms[norm_type](hidden_size, eps=eps, param_init_type=param_init_type, compute_type=compute_type,
                            parallel_config=parallel_config)
