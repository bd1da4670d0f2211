"""Where every parameter lives under a parallel configuration, derived without compiling, as one layout type.

- `TensorLayout`: how one tensor is split over the devices of its pipeline stage(s). The same type is derived here
  from the layers' shard declarations, written to strategy files and read back from them
  (`mindformers.parallel.strategy`).
- `parameter_layouts(model_or_config, parallel_config=None, optimizer_states=('adam_m', 'adam_v'),
  opt_shard_threshold_kb=64, model_class=None) -> {name: TensorLayout}`: every parameter of the model, plus the
  optimizer state the Trainer saves with it (`adam_m.<name>`, `adam_v.<name>` for each trainable parameter, as
  `AdamWeightDecay` names them). Scalars saved beside them (`global_step`, `learning_rate`, `scale_sense`, ...) have
  no layout: MindSpore's `transform_checkpoints` copies them as they are.
- `run_layouts(config, model_config, model_class, parallel)`: the layouts of a run's strategy files.

How a layout is found: the model is built under `no_init_parameters` (no weight is allocated: a 70B model takes
under a second), then each parameter is followed to the primitive input its cell names in `parameter_inputs` (see
`mindformers/modules/layers.py`), and the shard strategy declared on that primitive gives its split. So the layouts
follow the layers' own declarations; a parameter no cell declares is an error, as are two uses that disagree.

Conventions (MindSpore's, for one pipeline stage of dp x mp devices, rank = stage * dp * mp + d * mp + m):
`dev_matrix` = [dp, mp]; `tensor_map` gives per axis the device-matrix axis counted from the right (0 = the
model-parallel axis) or -1 (not split). With the parallel optimizer (`parallel_config.optimizer_shard`, MindSpore's
`enable_parallel_optimizer`) a trainable parameter whose slice has at least `opt_shard_threshold_kb` KB and a first
axis divisible by the number of devices holding copies of it is split once more along that axis, across those
devices: `opt_shard_size` of them, `opt_shard_step` ranks apart."""
import copy
import math
from dataclasses import dataclass

import numpy as np
from mindspore import nn, ops

from mindformers.parallel.config import ParallelConfig, build_parallel_config

__all__ = ['TensorLayout', 'parameter_layouts', 'run_layouts', 'strategy_only_trainable']

_MP_AXIS = 0  # tensor_map value of the model-parallel axis of dev_matrix [dp, mp]


@dataclass(frozen=True)
class TensorLayout:
    """How one tensor (a parameter or an optimizer state) is split over the devices of its pipeline stage(s).

    `dev_matrix`: the device matrix of one stage ([dp, mp] for the layouts derived here). `tensor_map[i]`: the
    device-matrix axis, counted from the right, that splits tensor axis i (-1: not split; a tuple of axes: split by
    several, as MindSpore's own files may record). `shape`: the full shape (None when a strategy file does not record
    it). `opt_shard_size`: further pieces of axis 0 from the parallel optimizer (0: none; -1, in MindSpore's files:
    across every remaining device), `opt_shard_step` ranks apart. `stages`: the pipeline stages holding the tensor (a
    tied embedding is on the first and the last). `name`, `dtype`: the checkpoint entry. `state_of`: for an
    optimizer state, the parameter it belongs to ('' otherwise). `consumers`: (primitive path, input index, the
    primitive's strategy, its stage) of each declared use (derived layouts only). `uneven`: MindSpore's
    `param_split_shape` (slices of unequal sizes) is set."""
    dev_matrix: tuple
    tensor_map: tuple
    shape: tuple = None
    opt_shard_size: int = 0
    opt_shard_step: int = 0
    stages: tuple = (0,)
    name: str = ''
    dtype: str = ''
    state_of: str = ''
    consumers: tuple = ()
    uneven: bool = False

    @property
    def stage(self):
        """The first pipeline stage holding the tensor."""
        return self.stages[0]

    @property
    def split(self):
        """Pieces per axis from the device matrix (before the optimizer split)."""
        rank = len(self.dev_matrix)
        return tuple(math.prod(self.dev_matrix[rank - 1 - a] for a in (entry if isinstance(entry, tuple) else (entry,))
                               if a != -1) for entry in self.tensor_map)

    @property
    def pieces(self):
        """Pieces per axis of what one rank stores: `split` with the optimizer split folded into axis 0."""
        split = list(self.split)
        opt = self.opt_shard_size
        if opt == -1:
            opt = math.prod(self.dev_matrix) // math.prod(split)
        if opt > 0 and split:
            split[0] *= opt
        return tuple(split)

    def slice_shape(self, optimizer_shard=True):
        """The shape one rank stores (`optimizer_shard=False`: before the optimizer split)."""
        parts = self.pieces if optimizer_shard else self.split
        return tuple(size // k for size, k in zip(self.shape, parts))

    def full_shape(self, slice_shape):
        """The full shape of which `slice_shape` is one rank's piece."""
        return tuple(size * k for size, k in zip(slice_shape, self.pieces))

    def indivisible_axes(self, full_shape):
        """(axis, size, pieces) for every axis of `full_shape` that does not split evenly."""
        return [(d, n, k) for d, (n, k) in enumerate(zip(full_shape, self.pieces)) if n % k]

    def slice_of(self, array, rank):
        """The piece of the full `array` (shape `shape`) that `rank` stores (any rank of a stage holding it), for a
        [dp, mp] device matrix."""
        array = np.asarray(array)
        if tuple(array.shape) != tuple(self.shape):
            raise ValueError(f"{self.name}: expected an array of shape {self.shape}, got {array.shape}")
        dp, mp = self.dev_matrix
        local = rank % (dp * mp)
        coordinate = {1: local // mp, _MP_AXIS: local % mp}  # device-matrix axis (from the right) -> index
        index = []
        for size, axis, parts in zip(self.shape, self.tensor_map, self.split):
            piece = size // parts
            start = coordinate[axis] * piece if axis >= 0 else 0
            index.append(slice(start, start + piece))
        if self.opt_shard_size > 1:
            # the devices holding the same piece, in rank order, each take one more cut of the first axis
            group_index = local // mp if self.opt_shard_step == mp else local
            piece = (index[0].stop - index[0].start) // self.opt_shard_size
            start = index[0].start + (group_index % self.opt_shard_size) * piece
            index[0] = slice(start, start + piece)
        return array[tuple(index)]


def _model_class(config):
    # a config alone names its model through the families' registration (models/ is above this layer)
    from mindformers.models.auto.auto_class import _model_class as registered_class
    try:
        return registered_class(config)
    except ValueError as err:
        raise ValueError(f"parameter_layouts: {err}; or pass model_class=") from None


def _build_model(config, parallel_config, model_class=None):
    """The model of `config` laid out for `parallel_config`, its parameters left unallocated."""
    from mindspore.nn.utils import no_init_parameters
    config = copy.copy(config)
    config.parallel_config = parallel_config
    config.checkpoint_name_or_path = ''
    model_class = model_class or _model_class(config)
    with no_init_parameters():
        return model_class(config)


def _resolve(owner, path, where):
    """The attribute at dotted `path` under `owner`; None when the last attribute exists and is None."""
    target = owner
    for part in path.split('.'):
        if not hasattr(target, part):
            raise ValueError(f"{where}: {type(owner).__name__} has no attribute path {path!r}")
        target = getattr(target, part)
        if target is None:
            return None
    return target


def _explicit_stage(cell):
    return getattr(cell, '_pipeline_stage', None)


def _stage_of(cells, path):
    """The pipeline stage of the primitive at dotted `path`: that of its innermost enclosing cell given one
    (`Cell.pipeline_stage`), 0 when none is."""
    stage, prefix = _explicit_stage(cells['']), []
    for part in path.split('.')[:-1]:
        prefix.append(part)
        cell = cells.get('.'.join(prefix))
        if cell is not None and _explicit_stage(cell) is not None:
            stage = _explicit_stage(cell)
    return stage or 0


def _join(*parts):
    return '.'.join(p for p in parts if p)


def _consumers(model, single_device):
    """{parameter path: [(primitive path, input index, strategy or None, stage)]} from every cell's
    `parameter_inputs`. With `single_device` (dp = mp = 1) a use may also be a fused kernel without strategies."""
    cells = dict(model.cells_and_names())
    uses = {}
    for cell_path, cell in cells.items():
        for param_rel, (prim_rel, index) in (getattr(cell, 'parameter_inputs', None) or {}).items():
            where = f"{type(cell).__name__}.parameter_inputs[{param_rel!r}]"
            if _resolve(cell, param_rel, where) is None:
                continue  # an optional parameter this instance has not (e.g. a bias)
            primitive = _resolve(cell, prim_rel, where)
            if isinstance(primitive, ops.Primitive):
                strategy = primitive.attrs.get('in_strategy')
            elif single_device:
                strategy = None
            else:
                raise ValueError(f"{where}: {prim_rel!r} is a {type(primitive).__name__}, not a primitive")
            prim_path = _join(cell_path, prim_rel)
            uses.setdefault(_join(cell_path, param_rel), []).append(
                (prim_path, index, None if strategy is None else tuple(tuple(s) for s in strategy),
                 _stage_of(cells, prim_path)))
    return uses


def _split_of(name, shape, uses):
    """The per-axis split all declared uses of a parameter agree on."""
    splits = {}
    for prim_path, index, strategy, _ in uses:
        split = (1,) * len(shape) if strategy is None else strategy[index]
        if len(split) != len(shape):
            raise ValueError(f"parameter {name} {shape}: the strategy of {prim_path} input {index} is {split}, "
                             f"which has {len(split)} axes")
        splits[split] = f"{prim_path} input {index}"
    if len(splits) > 1:
        found = '; '.join(sorted(f"{where} splits it {split}" for split, where in splits.items()))
        raise ValueError(f"parameter {name}: its uses disagree on its layout ({found})")
    return next(iter(splits))


def _opt_shard(parallel, slice_shape, itemsize, tensor_map, threshold_kb):
    """(opt_shard_size, opt_shard_step) of a trainable parameter with this model-parallel slice."""
    dp, mp = parallel.data_parallel, parallel.model_parallel
    mp_split = _MP_AXIS in tensor_map and mp > 1
    copies = dp if mp_split else dp * mp
    nbytes = math.prod(slice_shape) * itemsize
    if (not parallel.optimizer_shard or copies < 2 or not slice_shape or slice_shape[0] % copies
            or nbytes < threshold_kb * 1024):
        return 0, 0
    return copies, (mp if mp_split else 1)


def _parallel_config(parallel_config):
    if parallel_config is None or isinstance(parallel_config, ParallelConfig):
        return parallel_config
    return build_parallel_config(parallel_config)


def parameter_layouts(model_or_config, parallel_config=None, optimizer_states=('adam_m', 'adam_v'),
                      opt_shard_threshold_kb=64, model_class=None, only_trainable_params=False):
    """{checkpoint name: TensorLayout} for every parameter of the model and, for each trainable one, its optimizer
    state `<prefix>.<name>` per prefix of `optimizer_states` (fp32, laid out like the parameter).
    `only_trainable_params` (MindSpore's `strategy_ckpt_config` option of that name) leaves out the frozen
    parameters: the layouts of a delta checkpoint, e.g. LoRA's, which holds the trainable ones and their state.

    `model_or_config`: a model config (its model class from the registry, or `model_class`), built here for
    `parallel_config` without allocating weights; or a built model (then `parallel_config` may be None: its
    config's; given, it must have the same degrees the model was built with). `parallel_config`: a ParallelConfig
    or its mapping. Raises ValueError for a parameter no cell declares, or whose uses disagree."""
    parallel = _parallel_config(parallel_config)
    if isinstance(model_or_config, nn.Cell):
        model = model_or_config
        built = model.config.parallel_config
        if parallel is None:
            parallel = built
        elif (parallel.data_parallel, parallel.model_parallel, parallel.pipeline_stage, parallel.vocab_emb_dp) != \
                (built.data_parallel, built.model_parallel, built.pipeline_stage, built.vocab_emb_dp):
            raise ValueError("parameter_layouts: the model was built for another parallel_config; pass its config "
                             "instead of the model, or parallel_config=None")
    else:
        if parallel is None:
            raise ValueError("parameter_layouts: a model config needs a parallel_config")
        model = _build_model(model_or_config, parallel, model_class)
    dp, mp = parallel.data_parallel, parallel.model_parallel
    uses = _consumers(model, dp * mp == 1)
    layouts = {}
    for path, param in model.parameters_and_names():
        if only_trainable_params and not param.requires_grad:
            continue
        if path not in uses:
            owner = type(_resolve(model, path.rsplit('.', 1)[0], path)).__name__ if '.' in path else \
                type(model).__name__
            raise ValueError(f"no layer declares how parameter {path} is used: add it to `parameter_inputs` of "
                             f"{owner} (see mindformers/modules/layers.py)")
        shape = tuple(int(d) for d in param.shape)
        split = _split_of(path, shape, uses[path])
        tensor_map = []
        for size, parts in zip(shape, split):
            if parts != 1 and parts != mp:
                raise ValueError(f"parameter {path} {shape}: split {split}; a parameter may be split by "
                                 f"model_parallel ({mp}) only")
            if size % parts:
                raise ValueError(f"parameter {path} {shape}: axis of size {size} cannot be split {parts} ways")
            tensor_map.append(_MP_AXIS if parts > 1 else -1)
        slice_shape = tuple(size // parts for size, parts in zip(shape, split))
        opt_size, opt_step = (_opt_shard(parallel, slice_shape, param.itemsize, tensor_map, opt_shard_threshold_kb)
                              if param.requires_grad else (0, 0))
        stages = tuple(sorted({stage for *_, stage in uses[path]}))
        layout = TensorLayout((dp, mp), tuple(tensor_map), shape, opt_size, opt_step, stages, param.name,
                              str(param.dtype).lower(), consumers=tuple(uses[path]))
        layouts[param.name] = layout
        if param.requires_grad:
            for prefix in optimizer_states:
                state = f'{prefix}.{param.name}'
                layouts[state] = TensorLayout((dp, mp), tuple(tensor_map), shape, opt_size, opt_step, stages, state,
                                              'float32', state_of=param.name)
    return layouts


def run_layouts(config, model_config, model_class, parallel):
    """The layouts of a run's strategy files: `parameter_layouts` of its model under `parallel`, with the optimizer
    shard threshold of the run config's `parallel.parallel_optimizer_config.parallel_optimizer_threshold` (KB,
    default 64) and `parallel.strategy_ckpt_config.only_trainable_params` (default False: every parameter). The one
    derivation behind `only_save_strategy` on CPU and the `export_strategy` CLI."""
    threshold = ((config.get('parallel') or {}).get('parallel_optimizer_config') or {}).get(
        'parallel_optimizer_threshold', 64)
    return parameter_layouts(model_config, parallel, model_class=model_class, opt_shard_threshold_kb=threshold,
                             only_trainable_params=strategy_only_trainable(config))


def strategy_only_trainable(config):
    """The run config's `parallel.strategy_ckpt_config.only_trainable_params` (default False)."""
    return bool(((config.get('parallel') or {}).get('strategy_ckpt_config') or {}).get('only_trainable_params'))
