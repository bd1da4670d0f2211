"""Basic layers: Linear, LayerNorm, Embedding, Dropout and activations.

Every layer takes a `parallel_config` (`ParallelConfig`; dp = data_parallel, mp = model_parallel) and declares the
shard strategies of its primitives in `__init__`. Strategies only matter under semi-auto-parallel (Ascend/GPU); on
one device MindSpore ignores them. Inputs are laid out as [..., features] with the leading axes batch-like (split dp
ways).

A cell owning (or using) parameters says which primitive input consumes each in `parameter_inputs`:
{parameter path relative to the cell: (primitive path relative to the cell, input index)}. The layout of every
parameter (`mindformers.core.parallel_layout`) is read from the strategy of that input, so it follows the strategies
declared here."""
import math

import mindspore as ms
from mindspore import nn, ops, Parameter
from mindspore.common.initializer import initializer, Normal

from mindformers.core.parallel_config import default_parallel_config, layer_stages
from mindformers.kernels import (FEW_ROWS, FusedBiasGELU, FusedBiasLinearFewRows, FusedBiasResidualAdd,
                                             FusedColumnSum, FusedGELU, FusedLayerNorm, FusedLinearFewRows,
                                             FusedResidualLinearFewRows, kernel_library, use_fused)

_DTYPES = {'float32': ms.float32, 'float16': ms.float16, 'bfloat16': ms.bfloat16}


def to_mstype(dtype, where='dtype'):
    """'float32' | 'float16' | 'bfloat16' (or a MindSpore dtype) -> the MindSpore dtype."""
    if isinstance(dtype, str) and dtype in _DTYPES:
        return _DTYPES[dtype]
    if dtype in _DTYPES.values():
        return dtype
    raise ValueError(f"{where}: unsupported dtype {dtype!r} (accepted: {', '.join(_DTYPES)})")


def _dp_mp(parallel_config):
    config = parallel_config or default_parallel_config
    return config.data_parallel, config.model_parallel


def place_layers(layers, parallel_config, offset=0):
    """Assign the transformer `layers` (cells, in order) to pipeline stages (`layer_stages`: an even split shifted
    by `offset`, MindFormers' model_config.offset) and mark them for recomputation as `parallel_config.recompute`
    asks: a bool for every layer, or per pipeline stage the number of layers (counted from the stage's first) to
    recompute."""
    recompute, stages = parallel_config.recompute.recompute, parallel_config.pipeline_stage
    if not isinstance(recompute, (bool, list, tuple)):
        raise ValueError(f"recompute must be a bool or a list of per-stage layer counts, got {recompute!r}")
    assigned = layer_stages(len(layers), stages, offset)
    for index, (layer, stage) in enumerate(zip(layers, assigned)):
        in_stage = index - assigned.index(stage)
        if recompute is True or (not isinstance(recompute, bool) and stage < len(recompute)
                                 and in_stage < int(recompute[stage])):
            layer.recompute()
        if stages > 1:
            layer.pipeline_stage = stage


def place_last(parallel_config, *cells):
    """Put `cells` (the final norm, the output head, the loss) on the last pipeline stage."""
    if parallel_config.pipeline_stage > 1:
        for cell in cells:
            cell.pipeline_stage = parallel_config.pipeline_stage - 1


def _check_divisible(size, parts, what):
    if size % parts:
        raise ValueError(f"{what} ({size}) must be divisible by model_parallel ({parts})")


class _BiasAdd(nn.Cell):
    """x [N, C] + bias [C] with the BiasAdd kernel forward and a column sum backward (on CPU both are several times
    faster than a broadcasting Add or BiasAdd's own gradient kernel); the column sum is the fused CPU kernel when
    `fused`, unless `shard` is given a real split (sharded layouts are for Ascend/GPU)."""

    def __init__(self, fused=False):
        super().__init__()
        self.bias_add = ops.BiasAdd()
        self.column_sum = FusedColumnSum() if fused else ops.ReduceSum()

    def shard(self, strategy):
        if any(cuts != 1 for layout in strategy for cuts in layout):
            self.column_sum = ops.ReduceSum()
        self.bias_add.shard(strategy)
        if not isinstance(self.column_sum, FusedColumnSum):
            self.column_sum.shard((strategy[0],))
        return self

    def construct(self, x, bias):
        return self.bias_add(x, bias)

    def bprop(self, x, bias, out, dout):
        if isinstance(self.column_sum, FusedColumnSum):
            return dout, self.column_sum(dout)
        return dout, self.column_sum(dout, 0)


class Linear(nn.Cell):
    """y = x @ weight.T + bias (+ residual), with `weight` [out_features, in_features] and `bias` [out_features].

    `construct(x [..., in_features], add_bias=True, residual=None)` -> [..., out_features] in `compute_dtype`
    (parameters are cast to it when they differ). `residual` (the shape of the output) is added to the result;
    `add_bias=False` leaves the bias out for a caller that adds it inside a fused kernel of its own (only when
    `bias_fusable`). The layer picks its kernels itself: on CPU in fp32 without sharding, at most `FEW_ROWS` rows
    (decode steps) go through the few-rows kernel (`kernels._FewRows`, which reads the weight about twice as fast
    as MatMul does on one row), and the bias and residual are added in the same kernel as the product (few rows)
    or in one pass after it. A cell that wraps or replaces a Linear (LoRA, int8) keeps this `construct` contract;
    callers never look inside it except through `bias_fusable`.
    `split` picks the model-parallel layout: 'column' splits the output features (weight rows) mp ways, 'row'
    splits the input features (weight columns) and is meant to follow a column-split layer; None replicates.
    `init_std`: standard deviation of the normal weight init (bias starts at zero)."""

    parameter_inputs = {'weight': ('matmul', 1), 'bias': ('bias_add.bias_add', 1)}

    def __init__(self, in_features, out_features, has_bias=True, init_std=0.02, param_init_type='float32',
                 compute_dtype='float32', parallel_config=None, split=None):
        super().__init__()
        self.in_features, self.out_features, self.has_bias = in_features, out_features, has_bias
        param_dtype = to_mstype(param_init_type, 'param_init_type')
        self.compute_dtype = to_mstype(compute_dtype, 'compute_dtype')
        self.weight = Parameter(initializer(Normal(init_std), [out_features, in_features], param_dtype),
                                name='weight')
        self.bias = Parameter(initializer('zeros', [out_features], param_dtype), name='bias') if has_bias else None
        self.matmul = ops.MatMul(transpose_b=True)
        self.residual_add = ops.Add()
        dp, mp = _dp_mp(parallel_config)
        fused = dp == mp == 1 and use_fused(self.compute_dtype)
        # a caller may add this layer's bias in a fused CPU kernel of its own (fp32 bias, unsharded)
        self.bias_fusable = fused and has_bias and param_dtype == ms.float32
        self.bias_add = _BiasAdd(fused=fused)
        self.few_rows = (FusedBiasLinearFewRows() if has_bias else FusedLinearFewRows()) if fused else None
        self.few_rows_residual = FusedResidualLinearFewRows() if self.bias_fusable else None
        self.bias_residual = FusedBiasResidualAdd() if self.bias_fusable else None
        if split == 'column':
            _check_divisible(out_features, mp, 'Linear out_features for a column split')
            self.shard(((dp, 1), (mp, 1)), ((dp, mp), (mp,)))
        elif split == 'row':
            _check_divisible(in_features, mp, 'Linear in_features for a row split')
            self.shard(((dp, mp), (1, mp)), ((dp, 1), (1,)))
        elif split is None:
            self.shard(((dp, 1), (1, 1)), ((dp, 1), (1,)))
        else:
            raise ValueError(f"Linear split must be 'column', 'row' or None, got {split!r}")

    def shard(self, strategy_matmul, strategy_bias=None):
        """Set the strategies of the 2-D matmul ((x), (weight)) and of the bias add ((y), (bias)); the residual add
        follows the output's layout."""
        self.matmul.shard(strategy_matmul)
        if self.has_bias and strategy_bias is not None:
            self.bias_add.shard(strategy_bias)
        output = (strategy_matmul[0][0], strategy_matmul[1][0])
        self.residual_add.shard((output, output))
        return self

    def construct(self, x, add_bias=True, residual=None):
        shape = x.shape
        if len(shape) != 2:
            x = x.reshape(-1, shape[-1])
        if residual is not None:
            residual = residual.reshape(-1, self.out_features)
        if x.dtype != self.compute_dtype:
            x = ops.cast(x, self.compute_dtype)
        weight = self.weight
        if weight.dtype != self.compute_dtype:
            weight = ops.cast(weight, self.compute_dtype)
        bias = self.bias
        if self.has_bias and bias.dtype != self.compute_dtype:
            bias = ops.cast(bias, self.compute_dtype)
        rows = x.shape[0]
        if residual is not None and add_bias and self.bias_residual is not None and residual.dtype == x.dtype:
            if rows <= FEW_ROWS:
                y = self.few_rows_residual(x, weight, bias, residual)
            else:
                y = self.bias_residual(self.matmul(x, weight), bias, residual)
        else:
            if self.few_rows is not None and rows <= FEW_ROWS and add_bias:
                y = self.few_rows(x, weight, bias) if self.has_bias else self.few_rows(x, weight)
            else:
                y = self.matmul(x, weight)
                if self.has_bias and add_bias:
                    y = self.bias_add(y, bias)
            if residual is not None:
                y = self.residual_add(residual, y)
        if len(shape) != 2:
            y = y.reshape(shape[:-1] + (self.out_features,))
        return y


def add_residual(residual, x, dropout):
    """`residual + dropout(x)`, or `x` when `residual` is None: the residual of a branch whose output dropout
    keeps its output projection from adding the residual itself."""
    x = dropout(x)
    return x if residual is None else residual + x


class LayerNorm(nn.Cell):
    """LayerNorm over the last axis with `weight` (gamma) and `bias` (beta), computed in `compute_type`.

    x: [B, S, hidden] -> same shape and dtype as x."""

    parameter_inputs = {'weight': ('norm', 1), 'bias': ('norm', 2)}

    def __init__(self, hidden_size, eps=1e-5, param_init_type='float32', compute_type='float32',
                 parallel_config=None):
        super().__init__()
        param_dtype = to_mstype(param_init_type, 'param_init_type')
        self.compute_type = to_mstype(compute_type, 'layernorm_compute_type')
        self.weight = Parameter(initializer('ones', [hidden_size], param_dtype), name='weight')
        self.bias = Parameter(initializer('zeros', [hidden_size], param_dtype), name='bias')
        dp, mp = _dp_mp(parallel_config)
        if dp == mp == 1 and use_fused(self.compute_type):  # a sharded layout means Ascend/GPU: keep strategies
            self.norm = FusedLayerNorm(eps)
            self.norm_frozen = FusedLayerNorm(eps, param_grads=False)
        else:
            self.norm_frozen = None
            self.norm = ops.LayerNorm(begin_norm_axis=-1, begin_params_axis=-1, epsilon=eps)
            self.shard(((dp, 1, 1), (1,), (1,)))

    def shard(self, strategy):
        """Strategy for ((x), (weight), (bias)) (the fused CPU kernel has none: it never runs sharded)."""
        if isinstance(self.norm, ops.Primitive):
            self.norm.shard(strategy)
        return self

    @property
    def frozen(self):
        """Whether weight and bias are both frozen (read when a graph is compiled: their gradients are not computed)."""
        return not (self.weight.requires_grad or self.bias.requires_grad)

    def construct(self, x):
        dtype = x.dtype
        weight, bias = self.weight, self.bias
        if dtype != self.compute_type:
            x = ops.cast(x, self.compute_type)
        if weight.dtype != self.compute_type:
            weight, bias = ops.cast(weight, self.compute_type), ops.cast(bias, self.compute_type)
        if self.norm_frozen is not None and self.frozen:
            y, _, _ = self.norm_frozen(x, weight, bias)
        else:
            y, _, _ = self.norm(x, weight, bias)
        if dtype != self.compute_type:
            y = ops.cast(y, dtype)
        return y


class Embedding(nn.Cell):
    """Lookup table `weight` [vocab_size, hidden_size]: ids [...] int32 -> [..., hidden_size].

    With `parallel_config.vocab_emb_dp` (or `replicated`, for position tables) the table is replicated and the ids
    are split dp ways; otherwise the table rows (the vocabulary) are split mp ways and the ids are not split, as in
    MindFormers' VocabEmbedding."""

    parameter_inputs = {'weight': ('gather', 0)}

    def __init__(self, vocab_size, hidden_size, init_std=0.02, param_init_type='float32', parallel_config=None,
                 replicated=False):
        super().__init__()
        self.vocab_size, self.hidden_size = vocab_size, hidden_size
        param_dtype = to_mstype(param_init_type, 'param_init_type')
        self.weight = Parameter(initializer(Normal(init_std), [vocab_size, hidden_size], param_dtype),
                                name='weight')
        self.gather = ops.Gather()
        # MindSpore's CPU Gather has no bfloat16 kernel: such a table is widened to fp32 for the lookup
        self.widen = param_dtype == ms.bfloat16 and ms.get_context('device_target') == 'CPU'
        dp, mp = _dp_mp(parallel_config)
        if replicated or (parallel_config or default_parallel_config).vocab_emb_dp:
            self.gather.shard(((1, 1), (dp, 1)))
        else:
            _check_divisible(vocab_size, mp, 'vocab_size of a vocabulary-parallel embedding')
            self.gather.shard(((mp, 1), (1, 1)))

    def table(self):
        """The lookup table as the lookup reads it (a bfloat16 table widened to fp32 on CPU)."""
        return ops.cast(self.weight, ms.float32) if self.widen else self.weight

    def construct(self, input_ids):
        return self.gather(self.table(), input_ids, 0)


class TiedLMHead(nn.Cell):
    """The output head of a model whose logits are taken against its token embedding table (it owns no weight):
    `construct(hidden [N, H], table [vocab, H])` -> fp32 logits [N, vocab]. The vocabulary is split mp ways unless
    `parallel_config.vocab_emb_dp`, as the `Embedding` that owns the table. The model that ties the two says so in
    its `parameter_inputs` (the table feeds `matmul` input 1)."""

    def __init__(self, parallel_config=None):
        super().__init__()
        dp, mp = _dp_mp(parallel_config)
        vocab_split = 1 if (parallel_config or default_parallel_config).vocab_emb_dp else mp
        self.matmul = ops.MatMul(transpose_b=True).shard(((dp, 1), (vocab_split, 1)))
        self.few_rows = FusedLinearFewRows() if dp == vocab_split == 1 and kernel_library() is not None else None

    def construct(self, hidden, table):
        if table.dtype != hidden.dtype:
            table = ops.cast(table, hidden.dtype)
        if self.few_rows is not None and hidden.dtype == ms.float32 and hidden.shape[0] <= FEW_ROWS:
            logits = self.few_rows(hidden, table)
        else:
            logits = self.matmul(hidden, table)
        return logits if logits.dtype == ms.float32 else ops.cast(logits, ms.float32)


def output_head(config, parallel_config=None):
    """An untied output head: Linear hidden_size -> vocab_size without bias, from a model config's
    `initializer_range`, `param_init_type` and `compute_dtype`; its vocabulary split mp ways unless
    `parallel_config.vocab_emb_dp`."""
    parallel = parallel_config or default_parallel_config
    return Linear(config.hidden_size, config.vocab_size, has_bias=False, init_std=config.initializer_range,
                  param_init_type=config.param_init_type, compute_dtype=config.compute_dtype,
                  parallel_config=parallel, split=None if parallel.vocab_emb_dp else 'column')


class Dropout(nn.Cell):
    """Inverted dropout with drop probability `p`; the identity when `p == 0` or outside training."""

    def __init__(self, p=0.0):
        super().__init__()
        if not 0 <= p < 1:
            raise ValueError(f"dropout probability must be in [0, 1), got {p}")
        self.p = float(p)
        self.dropout = ops.Dropout(keep_prob=1.0 - self.p)

    def shard(self, strategy):
        self.dropout.shard(strategy)
        return self

    @property
    def active(self):
        """Whether `construct` drops anything (training with p > 0)."""
        return self.training and self.p > 0

    def construct(self, x):
        if not self.active:
            return x
        y, _ = self.dropout(x)
        return y


class TanhGELU(nn.Cell):
    """GELU, tanh approximation (= HF 'gelu_new' = MindSpore's GeLU primitive), computed as
    x * sigmoid(x * (a + b x^2)) with a = 2 sqrt(2/pi), b = 0.044715 a: the same function, and on CPU about 3x
    faster forward plus backward than the GeLU primitive."""

    def __init__(self):
        super().__init__()
        self.fused = FusedGELU() if use_fused(ms.float32) else None
        self.fused_bias = FusedBiasGELU() if use_fused(ms.float32) else None  # gelu(x + bias) in one kernel
        self.fused_frozen_bias = FusedBiasGELU(bias_grad=False) if use_fused(ms.float32) else None
        self.a, self.b = 2 * math.sqrt(2 / math.pi), 2 * math.sqrt(2 / math.pi) * 0.044715
        self.square, self.mul_inner, self.mul_outer = ops.Mul(), ops.Mul(), ops.Mul()
        self.scale, self.shift = ops.Mul(), ops.Add()
        self.sigmoid = ops.Sigmoid()

    def shard(self, strategy):
        """`strategy` is that of the input, e.g. ((dp, mp),)."""
        (layout,) = strategy
        for prim in (self.square, self.mul_inner, self.mul_outer):
            prim.shard((layout, layout))
        for prim in (self.scale, self.shift):
            prim.shard((layout, ()))
        self.sigmoid.shard((layout,))
        return self

    def construct(self, x):
        if self.fused is not None and x.dtype == ms.float32:
            return self.fused(x)
        slope = self.shift(self.scale(self.square(x, x), self.b), self.a)
        return self.mul_outer(x, self.sigmoid(self.mul_inner(x, slope)))


_ACTIVATIONS = {
    'gelu': TanhGELU,  # MindFormers' 'gelu' is the tanh approximation (= HF 'gelu_new')
    'gelu_new': TanhGELU,
    'fast_gelu': ops.FastGeLU,  # x * sigmoid(1.702 x) (= HF 'quick_gelu')
    'quick_gelu': ops.FastGeLU,
    'relu': ops.ReLU,
}


def get_activation(name):
    """A fresh activation (primitive or cell) for `name`; `.shard(((dp, mp),))` sets its strategy."""
    if name not in _ACTIVATIONS:
        raise ValueError(f"unsupported activation {name!r} (accepted: {', '.join(_ACTIVATIONS)})")
    return _ACTIVATIONS[name]()
