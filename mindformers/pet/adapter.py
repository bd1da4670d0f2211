"""Adapters: a small bottleneck network on the output h of each attention and MLP output projection,
out = h + up(act(down(h))), before the residual add (MindPet's AdapterDense and LowRankAdapterDense).

- Adapter (pet_type 'adapter'): down(h) = h W_down^T + b_down with W_down [k, d], up(z) = z W_up^T + b_up with
  W_up [d, k], k = `bottleneck_size` (d: the projection's output width).
- LowRankAdapter (pet_type 'low_rank_adapter', Compacter-style): k = d // `reduction_factor`, and each weight is a
  product of two rank-`low_rank_size` factors: down(h) = h L_down R_down + b_down (L_down [d, r], R_down [r, k]),
  up(z) = z L_up R_up + b_up (L_up [k, r], R_up [r, d]).

The targeted `Linear` becomes an adapted one in place (as `LoRALinear.adopt`: same object, parameter names, kernels
and strategies) with parameters `<path>.mindpet_delta_adapter_*` / `<path>.mindpet_delta_low_rank_adapter_*`.
Which Linears: the family's `pet_default_targets['adapter']` (o_proj / dense and fc_out / down_proj /
dense_4h_to_h of every layer).

Init makes the model equal the base at step 0: the up weight (Adapter) or its output-side factor R_up
(LowRankAdapter) and both biases are zero, so up(.) = 0; the down weight is random (Kaiming-uniform, bound
1/sqrt(d), as LoRA's A; LowRankAdapter: `low_rank_w_init`, Xavier-uniform by default, for L_down, R_down, L_up) so
the zero weight gets a gradient at once (with both zero, gelu(0) = 0 would leave every gradient zero)."""
import dataclasses
import math
from typing import ClassVar

from mindspore import ops
from mindspore.common.initializer import HeUniform, initializer

from mindformers.modules.layers import _ACTIVATIONS, Linear, get_activation
from mindformers.pet.config import PetConfig, register_pet_config
from mindformers.pet.freeze import DELTA_PREFIX
from mindformers.pet.lora import adopt_linear
from mindformers.pet.model import default_targets, register_pet_method
from mindformers.pet.targets import select_linears
from mindformers.tools.logger import logger

ADAPTER, LOW_RANK = DELTA_PREFIX + 'adapter_', DELTA_PREFIX + 'low_rank_adapter_'


def _check_activation(config):
    if not isinstance(config.non_linearity, str) or config.non_linearity not in _ACTIVATIONS:
        raise ValueError(f"pet_config.non_linearity: unsupported activation {config.non_linearity!r} (accepted: "
                         f"{', '.join(_ACTIVATIONS)})")


@dataclasses.dataclass
class AdapterConfig(PetConfig):
    """Adapter: out = h + W_up act(W_down h + b_down) + b_up after each attention and MLP output projection;
    `bottleneck_size` k (W_down [k, d]), `non_linearity` the activation (see `modules.layers.get_activation`)."""

    pet_type: ClassVar[str] = 'adapter'
    bottleneck_size: int = 64
    non_linearity: str = 'gelu'

    def validate(self):
        self._positive_int('bottleneck_size')
        _check_activation(self)


@dataclasses.dataclass
class LowRankAdapterConfig(PetConfig):
    """LowRankAdapter: an Adapter with bottleneck k = d // `reduction_factor` whose W_down and W_up are each a
    product of two rank-`low_rank_size` factors, initialised with `low_rank_w_init` (a MindSpore initializer name;
    the up projection's output-side factor starts at zero)."""

    pet_type: ClassVar[str] = 'low_rank_adapter'
    reduction_factor: int = 1
    low_rank_size: int = 1
    low_rank_w_init: str = 'xavier_uniform'
    non_linearity: str = 'gelu'

    def validate(self):
        self._positive_int('reduction_factor', 'low_rank_size')
        _check_activation(self)
        name = self.low_rank_w_init
        try:
            initializer(name, [2, 2])
        except (TypeError, ValueError, KeyError):
            name = None
        if not isinstance(self.low_rank_w_init, str) or name is None or name == 'zeros':
            raise ValueError(f"pet_config.low_rank_w_init must name a MindSpore initializer other than 'zeros' "
                             f"(e.g. 'xavier_uniform', 'normal', 'he_uniform'), got {self.low_rank_w_init!r}")


class AdapterLinear(Linear):
    """A Linear followed by an Adapter. Made from a Linear by `AdapterLinear.adopt(linear, config)`;
    `construct(x [..., in], add_bias=True, residual=None)` keeps Linear's contract. The adapter reads the complete
    output (bias included), so `bias_fusable` is False and `add_bias=False` is refused; a `residual` is added
    after the adapter."""

    prefix = ADAPTER
    parameter_inputs = dict(Linear.parameter_inputs, **{
        ADAPTER + 'down_weight': ('adapter_down', 1), ADAPTER + 'down_bias': ('adapter_down_bias', 1),
        ADAPTER + 'up_weight': ('adapter_up', 1), ADAPTER + 'up_bias': ('adapter_up_bias', 1)})

    @staticmethod
    def delta_shapes(width, config):
        """{parameter suffix: (shape, initializer)} for an output width `width`."""
        k = config.bottleneck_size
        return {'down_weight': ([k, width], HeUniform(negative_slope=math.sqrt(5))), 'down_bias': ([k], 'zeros'),
                'up_weight': ([width, k], 'zeros'), 'up_bias': ([width], 'zeros')}

    def _delta_matmuls(self, dp, split):
        """The adapter's matmuls, sharded for an output split `split` ways (the output's layout is (dp, split))."""
        self.adapter_down = ops.MatMul(transpose_b=True).shard(((dp, split), (1, split)))
        self.adapter_up = ops.MatMul(transpose_b=True).shard(((dp, 1), (split, 1)))

    @classmethod
    def adopt(cls, linear, config, path='Linear'):
        """Turn `linear` (a plain Linear at `path`) into this class in place; returns its new parameters' names."""
        shapes = {cls.prefix + suffix: spec for suffix, spec in cls.delta_shapes(linear.out_features, config).items()}
        names = adopt_linear(linear, cls, shapes, config.pet_type, path)
        linear.bias_fusable = False  # a caller must not add the bias after the adapter has read the output
        (dp, _), (split, _) = linear.matmul.in_strategy
        linear._delta_matmuls(dp, split)
        linear.adapter_down_bias = ops.Add().shard(((dp, 1), (1,)))
        linear.adapter_act = get_activation(config.non_linearity).shard(((dp, 1),))
        linear.adapter_up_bias = ops.Add().shard(((dp, split), (split,)))
        linear.adapter_add = ops.Add().shard(((dp, split), (dp, split)))
        return names

    def _delta(self, suffix):
        param = getattr(self, self.prefix + suffix)
        return param if param.dtype == self.compute_dtype else ops.cast(param, self.compute_dtype)

    def down(self, h):
        """[N, d] -> [N, k] before the bias."""
        return self.adapter_down(h, self._delta('down_weight'))

    def up(self, z):
        """[N, k] -> [N, d] before the bias."""
        return self.adapter_up(z, self._delta('up_weight'))

    def construct(self, x, add_bias=True, residual=None):
        if not add_bias:
            raise ValueError("an adapted Linear adds its own bias (its bias_fusable is False)")
        y = Linear.construct(self, x)
        h = y.reshape(-1, self.out_features)
        z = self.adapter_act(self.adapter_down_bias(self.down(h), self._delta('down_bias')))
        out = self.adapter_add(h, self.adapter_up_bias(self.up(z), self._delta('up_bias')))
        if residual is not None:
            out = self.residual_add(residual.reshape(out.shape), out)
        return out.reshape(y.shape)


class LowRankAdapterLinear(AdapterLinear):
    """A Linear followed by a LowRankAdapter (`AdapterLinear` with factored weights)."""

    prefix = LOW_RANK
    parameter_inputs = dict(Linear.parameter_inputs, **{
        LOW_RANK + 'down_left': ('adapter_down_left', 1), LOW_RANK + 'down_right': ('adapter_down_right', 1),
        LOW_RANK + 'down_bias': ('adapter_down_bias', 1), LOW_RANK + 'up_left': ('adapter_up_left', 1),
        LOW_RANK + 'up_right': ('adapter_up_right', 1), LOW_RANK + 'up_bias': ('adapter_up_bias', 1)})

    @staticmethod
    def delta_shapes(width, config):
        k, rank, init = width // config.reduction_factor, config.low_rank_size, config.low_rank_w_init
        return {'down_left': ([width, rank], init), 'down_right': ([rank, k], init), 'down_bias': ([k], 'zeros'),
                'up_left': ([k, rank], init), 'up_right': ([rank, width], 'zeros'), 'up_bias': ([width], 'zeros')}

    def _delta_matmuls(self, dp, split):
        self.adapter_down_left = ops.MatMul().shard(((dp, split), (split, 1)))
        self.adapter_down_right = ops.MatMul().shard(((dp, 1), (1, 1)))
        self.adapter_up_left = ops.MatMul().shard(((dp, 1), (1, 1)))
        self.adapter_up_right = ops.MatMul().shard(((dp, 1), (1, split)))

    def down(self, h):
        return self.adapter_down_right(self.adapter_down_left(h, self._delta('down_left')), self._delta('down_right'))

    def up(self, z):
        return self.adapter_up_right(self.adapter_up_left(z, self._delta('up_left')), self._delta('up_right'))


def _adapt(linear_class):
    def apply(model, config):
        chosen = select_linears(model, default_targets(model, 'adapter'))
        if config.pet_type == 'low_rank_adapter':
            for path, linear in chosen:
                if linear.out_features < config.reduction_factor:
                    raise ValueError(f"pet_config.reduction_factor ({config.reduction_factor}) exceeds the output "
                                     f"width of {path} ({linear.out_features}): the bottleneck would be empty")
        names = []
        for path, linear in chosen:
            names += linear_class.adopt(linear, config, path)
        logger.info("%s after %d Linears: %s", config.pet_type, len(chosen),
                    ', '.join(sorted({path.rsplit('.', 1)[-1] for path, _ in chosen})))
        return names
    return apply


register_pet_config(AdapterConfig)
register_pet_config(LowRankAdapterConfig)
register_pet_method(AdapterConfig, _adapt(AdapterLinear))
register_pet_method(LowRankAdapterConfig, _adapt(LowRankAdapterLinear))
