"""MindSpore strategy files, written from and read into `TensorLayout`s.

- `write_strategy_files(layouts, output_dir, per_stage=True) -> [paths]`: MindSpore's JSON strategy format, one
  `ckpt_strategy_rank_{r}.json` per pipeline stage (r = the stage's first rank, the name MindSpore's own files take
  from `strategy_ckpt_save_file`), which `mindspore.merge_pipeline_strategys(dir, file)` merges and
  `mindspore.transform_checkpoints` reads; `per_stage=False` writes that merge, `merged_ckpt_strategy.json`.
- `load_strategy(value, work_dir, flag) -> Strategy`: a strategy file (JSON or protobuf, ours or a compiled
  semi-auto-parallel run's) or a directory of per-stage files (merged into `work_dir` first), checked to cover every
  stage; None or '' means a complete, unsliced checkpoint."""
import dataclasses
import glob
import json
import math
import os
import re
import tempfile

import mindspore as ms

from mindformers.parallel.layout import TensorLayout
from mindformers.tools.checkpoint import CheckpointError, first_line, write_json_atomic
from mindformers.tools.utils import UsageError

__all__ = ['StrategyError', 'StrategyUsageError', 'Strategy', 'write_strategy_files', 'load_strategy',
           'read_strategy_file', 'strategy_file_name', 'is_complete', 'MERGED_STRATEGY_FILE']

MERGED_STRATEGY_FILE = 'merged_ckpt_strategy.json'
_MERGED_NAME = re.compile(r'(\d+)-(.+)')


class StrategyError(CheckpointError):
    """A strategy (or checkpoints with their strategies) that cannot be used as asked; the message says what is
    wrong and what to do."""


class StrategyUsageError(StrategyError, UsageError):
    """A flag names a path that does not exist or cannot be used (a CLI exits 2)."""


def strategy_file_name(rank):
    """The strategy file of the pipeline stage whose first rank is `rank`."""
    return f'ckpt_strategy_rank_{rank}.json'


def is_complete(value):
    """True when a strategy argument (None, '' or 'None') means a complete, unsliced checkpoint."""
    return value is None or str(value).strip().lower() in ('', 'none')


# ----------------------------------------------------------------------------------------------- writing
def layout_item(layout):
    """`layout` as an entry of `parallel_layout_item` in MindSpore's JSON strategy file (`tensor_shape` is ours:
    MindSpore ignores it, `load_strategy` checks checkpoints against it)."""
    return {'dev_matrix': list(layout.dev_matrix), 'tensor_map': list(layout.tensor_map),
            'tensor_shape': list(layout.shape), 'field': 0, 'opt_weight_shard_step': layout.opt_shard_step,
            'opt_weight_shard_size': layout.opt_shard_size}


def _stage_content(layouts, stage):
    """(parallel_strategy_item, parallel_layout_item) of one pipeline stage."""
    strategies, items = {}, {}
    for name, layout in layouts.items():
        if stage not in layout.stages:
            continue
        items[name] = layout_item(layout)
        for prim_path, _, strategy, used_on in layout.consumers:
            if strategy is not None and used_on == stage:
                strategies[prim_path] = {'stage': stage, 'parallel_strategy': [list(s) for s in strategy]}
    if not strategies:  # MindSpore reads a file's stage from its first strategy item
        first = next(iter(items))
        strategies[first] = {'stage': stage, 'parallel_strategy': [[1] * len(items[first]['tensor_shape'])]}
    return strategies, items


def write_strategy_files(layouts, output_dir, per_stage=True):
    """Write `layouts` (from `parameter_layouts`) as MindSpore JSON strategy files under `output_dir`; returns
    their paths. `per_stage`: one `ckpt_strategy_rank_{r}.json` per pipeline stage (r = its first rank);
    otherwise the single file `mindspore.merge_pipeline_strategys` makes of them, `merged_ckpt_strategy.json`."""
    if not layouts:
        raise ValueError("write_strategy_files: no layouts given")
    os.makedirs(output_dir, exist_ok=True)
    stage_devices = math.prod(next(iter(layouts.values())).dev_matrix)
    stages = sorted({stage for layout in layouts.values() for stage in layout.stages})
    if not per_stage:
        with tempfile.TemporaryDirectory(dir=output_dir, prefix='.stages-') as scratch:
            write_strategy_files(layouts, scratch, per_stage=True)
            merged = os.path.join(output_dir, MERGED_STRATEGY_FILE)
            ms.merge_pipeline_strategys(scratch, merged)
        return [merged]
    paths = []
    for stage in stages:
        strategies, items = _stage_content(layouts, stage)
        path = os.path.join(output_dir, strategy_file_name(stage * stage_devices))
        write_json_atomic(path, {'current_stage': stage, 'parallel_strategy_item': strategies,
                                 'parallel_layout_item': items})
        paths.append(path)
    return paths


# ----------------------------------------------------------------------------------------------- reading
@dataclasses.dataclass
class Strategy:
    """A parsed strategy: `file` is what MindSpore reads (the merged file when a directory was given), `given` what
    the user named; `layouts` name -> TensorLayout."""
    given: str
    file: str
    layouts: dict
    stage_num: int
    stage_devices: int

    @property
    def rank_num(self):
        return self.stage_num * self.stage_devices

    def stage_of(self, rank):
        return rank // self.stage_devices

    def names_on_stage(self, stage):
        return {name for name, layout in self.layouts.items() if stage in layout.stages}


def _layout_of(name, proto, stage, shape=None):
    dev_matrix = tuple(int(d) for d in proto.dev_matrix[0].dim) if proto.dev_matrix else ()
    if len(proto.tensor_map) > 1:  # a layout with several device axes per tensor dim
        tensor_map = tuple(tuple(int(a) for a in tm.dim) for tm in proto.tensor_map if list(tm.dim))
    else:
        tensor_map = tuple(int(a) for a in proto.tensor_map[0].dim) if proto.tensor_map else ()
    uneven = bool(proto.param_split_shape) and bool(list(proto.param_split_shape[0].dim))
    return TensorLayout(dev_matrix, tensor_map, tuple(int(d) for d in shape) if shape is not None else None,
                        int(proto.opt_weight_shard_size), int(proto.opt_weight_shard_step), (stage,), name,
                        uneven=uneven)


def _recorded_shapes(path):
    """key -> `tensor_shape` of a JSON strategy file's layout items that record one."""
    if not path.endswith('.json'):
        return {}
    with open(path, encoding='utf-8') as f:
        items = (json.load(f) or {}).get('parallel_layout_item') or {}
    return {key: item['tensor_shape'] for key, item in items.items()
            if isinstance(item, dict) and isinstance(item.get('tensor_shape'), list)}


def _file_stage(path):
    """The pipeline stage a single (unmerged) strategy file describes, from its strategy items; 0 if none."""
    if path.endswith('.json'):
        with open(path, encoding='utf-8') as f:
            items = (json.load(f) or {}).get('parallel_strategy_item') or {}
        first = next(iter(items.values()), None)
        return int(first.get('stage', 0)) if isinstance(first, dict) else 0
    parsed = ms.train.node_strategy_pb2.ParallelStrategyMap()
    with open(path, 'rb') as f:
        parsed.ParseFromString(f.read())
    items = parsed.parallel_strategy_item
    return int(items[0].parallel_strategys.stage) if items else 0


def _content(path):
    with open(path, 'rb') as f:
        return f.read()


def read_strategy_file(path, flag='--strategy'):
    """name -> TensorLayout of one strategy file, whole (merged) or of stage 0 (the stage-prefixed `<stage>-<name>`
    entries of a merged file are folded into one layout per name, with every stage holding it)."""
    try:
        raw = ms.parallel.build_searched_strategy(path)
        stage = _file_stage(path)
        shapes = _recorded_shapes(path)
    except Exception as err:  # MindSpore raises TypeError/ValueError/DecodeError for foreign files
        hint = ''
        if not path.endswith('.json') and _content(path)[:1] == b'{':
            hint = ' (MindSpore reads a strategy as JSON only when its name ends in .json)'
        raise StrategyError(f"{flag} {path} is not a MindSpore strategy file (JSON or protobuf){hint}: "
                            f"{first_line(err)}") from None
    if not raw:
        raise StrategyError(f"{flag} {path} has no parameter layouts; pass the strategy file the checkpoint "
                            f"was (or will be) saved with")
    layouts = {}
    merged = all(_MERGED_NAME.fullmatch(name) for name in raw)
    for key, proto in raw.items():
        name, own_stage = key, stage
        if merged:
            own_stage, name = _MERGED_NAME.fullmatch(key).groups()
            own_stage = int(own_stage)
        layout = _layout_of(name, proto, own_stage, shapes.get(key))
        if name in layouts:
            layout = dataclasses.replace(layout, stages=tuple(sorted(set(layouts[name].stages + layout.stages))))
        layouts[name] = layout
    if not merged and stage:
        raise StrategyError(f"{flag} {path} is the strategy of pipeline stage {stage} alone; pass the directory "
                            f"holding the strategy files of every stage")
    return layouts


def load_strategy(value, work_dir, flag='--src_ckpt_strategy'):
    """Parse a strategy file or per-stage directory (merged into `work_dir`); None for a complete checkpoint
    (`is_complete(value)`). Raises StrategyUsageError for a path that does not exist, StrategyError for content
    that cannot be used (each naming `flag`)."""
    if is_complete(value):
        return None
    path = os.path.abspath(os.fspath(value))
    if os.path.isdir(path):
        file = _merge_stage_files(path, work_dir, flag)
    elif os.path.isfile(path):
        file = path
    else:
        raise StrategyUsageError(f"{flag} {value}: no such file or directory (give a strategy file, a directory of "
                                 f"per-stage strategy files, or None for a complete checkpoint)")
    layouts = read_strategy_file(file, flag)
    stages = sorted({s for layout in layouts.values() for s in layout.stages})
    if stages != list(range(len(stages))):
        missing = sorted(set(range(max(stages) + 1)) - set(stages))
        raise StrategyError(f"{flag} {value} covers pipeline stages {stages} but not {missing}; add the strategy "
                            f"files of the missing stages")
    devices = {math.prod(layout.dev_matrix) for layout in layouts.values()}
    if len(devices) != 1:
        raise StrategyError(f"{flag} {value} mixes device matrices of {sorted(devices)} devices per stage; every "
                            f"parameter of one layout must span the same devices")
    return Strategy(os.fspath(value), file, layouts, len(stages), devices.pop())


def _merge_stage_files(directory, work_dir, flag):
    files = sorted(glob.glob(os.path.join(directory, '*.json')) + glob.glob(os.path.join(directory, '*.ckpt')))
    if not files:
        raise StrategyError(f"{flag} {directory} holds no strategy file (*.json or *.ckpt)")
    if len({os.path.splitext(f)[1] for f in files}) > 1:
        raise StrategyError(f"{flag} {directory} mixes .json and .ckpt strategy files; keep one format")
    seen = {}
    for file in files:
        try:
            stage = _file_stage(file)
        except Exception as err:  # a foreign or corrupt file
            raise StrategyError(f"{flag} {file} is not a MindSpore strategy file: {first_line(err)}") from None
        if stage in seen and _content(seen[stage]) != _content(file):
            raise StrategyError(f"{flag} {directory} has two different strategies for pipeline stage {stage} "
                                f"({os.path.basename(seen[stage])}, {os.path.basename(file)}); keep one per stage")
        seen.setdefault(stage, file)
    merged = os.path.join(work_dir, f"merged_{flag.strip('-')}{os.path.splitext(files[0])[1]}")
    try:
        ms.merge_pipeline_strategys(directory, merged)
    except Exception as err:  # MindSpore's ValueError for empty files, DecodeError for foreign ones
        raise StrategyError(f"{flag} {directory}: merging the per-stage strategy files failed: "
                            f"{first_line(err)}") from None
    return merged
