#!/usr/bin/env python
"""Reshard checkpoints between parallel layouts with strategy files, on MindSpore's `transform_checkpoints`.

    python mindformers/tools/transform_ckpt.py --src_ckpt_strategy <file|dir|None> --dst_ckpt_strategy <file|dir|None>
        --src_ckpt_dir <dir with rank_N/ | checkpoint file> --dst_ckpt_dir <new or empty dir> [--prefix checkpoint_]

A strategy is a MindSpore strategy file (JSON or protobuf `.ckpt`, as `export_strategy` or a compiled
semi-auto-parallel run writes them) or a directory with one such file per pipeline stage (merged first with
`merge_pipeline_strategys`); None or an empty value means a complete, unsliced checkpoint.

The source is checked before anything is written: every rank the source strategy describes has exactly one
checkpoint (the newest step listed in every rank's `meta.json` when several are kept), parameter names agree with
both strategies, and shapes split as the strategies say. The destination appears complete or not at all:
`<dst>/rank_<k>/<prefix><k>.ckpt` (or `.safetensors`, the source's format), CRC-checked, with a `meta.json` when the
source was a training checkpoint (so a run can resume from it in the new layout).
An existing non-empty destination is replaced only with --overwrite (whole, once the new one is complete).
Exit codes (one line on stderr for errors): 0 done; 2 the command line is wrong (a bad flag, a path that does not
exist or cannot be used, a non-empty destination without --overwrite); 1 the content of a checkpoint or strategy
file is wrong (corrupt, or not resharded as asked) or the run failed."""
import argparse
import dataclasses
import glob
import hashlib
import json
import math
import os
import re
import shutil
import sys
import tempfile
import time

if __name__ == '__main__':
    os.environ.setdefault('GLOG_v', '3')  # before MindSpore loads (when run by path): keep its warnings quiet
    if os.path.dirname(os.path.abspath(__file__)) == os.path.abspath(sys.path[0]):
        # run by path: import the package, not the sibling modules of this directory as top-level ones
        sys.path[0] = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import mindspore as ms  # noqa: E402

from mindformers.tools.checkpoint import (CheckpointError, META_FILE, load_checkpoint_file, meta_entries,  # noqa: E402
                                          record_checkpoint, resolve_checkpoint, save_checkpoint_atomic,
                                          verify_checkpoint, write_json_atomic)
from mindformers.tools.logger import logger  # noqa: E402
from mindformers.tools.utils import OneLineArgumentParser, UsageError, replace_output  # noqa: E402

CHECKPOINT_SUFFIXES = ('.ckpt', '.safetensors')
_PROCESS_START = time.time()
_RANK_DIR = re.compile(r'rank_(\d+)')
_MERGED_NAME = re.compile(r'(\d+)-(.+)')


class TransformError(CheckpointError):
    """Input that cannot be resharded as asked; the message says what is wrong and what to do."""


class TransformUsageError(TransformError, UsageError):
    """A flag names a path that does not exist or cannot be used (the CLI exits 2)."""


def _is_none(value):
    return value is None or str(value).strip().lower() in ('', 'none')


def _listing(names, limit=8):
    names = list(names)
    more = f" (and {len(names) - limit} more)" if len(names) > limit else ''
    return ', '.join(str(n) for n in names[:limit]) + more


def _ranks_text(ranks):
    return _listing([f'rank_{r}' for r in sorted(ranks)]) or 'none'


# ----------------------------------------------------------------------------------------------- strategies
@dataclasses.dataclass(frozen=True)
class Layout:
    """How one parameter is split: MindSpore's device matrix and tensor map (entry i of the map names the device
    axis `len(dev_matrix) - 1 - i` that splits tensor dim i; -1 = not split; a tuple = several axes), the extra
    optimizer-shard split of dim 0 (0 = none), and the pipeline stages that hold the parameter. `declared_shape`:
    the full shape, when the file records it (`tensor_shape` of mindformers' JSON files; MindSpore ignores it)."""
    dev_matrix: tuple
    tensor_map: tuple
    opt_shard_size: int
    stages: tuple
    uneven: bool = False
    declared_shape: tuple = None

    def splits(self):
        """Number of slices along each tensor dim (the optimizer shard included in dim 0)."""
        result = []
        for entry in self.tensor_map:
            axes = entry if isinstance(entry, tuple) else (entry,)
            result.append(math.prod(self.dev_matrix[len(self.dev_matrix) - 1 - a] for a in axes if a != -1))
        opt = self.opt_shard_size
        if opt == -1:
            opt = math.prod(self.dev_matrix) // math.prod(result)
        if opt > 0 and result:
            result[0] *= opt
        return tuple(result)

    def full_shape(self, slice_shape):
        return tuple(s * k for s, k in zip(slice_shape, self.splits()))

    def indivisible_dims(self, full_shape):
        """(dim, size, slices) for every dim of `full_shape` that does not split evenly."""
        return [(d, n, k) for d, (n, k) in enumerate(zip(full_shape, self.splits())) if n % k]


@dataclasses.dataclass
class Strategy:
    """A parsed strategy: `file` is what MindSpore reads (the merged file when a directory was given)."""
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


def _layout_of(proto, stage, declared_shape=None):
    dev_matrix = tuple(int(d) for d in proto.dev_matrix[0].dim) if proto.dev_matrix else ()
    if len(proto.tensor_map) > 1:  # a layout with several device axes per tensor dim
        tensor_map = tuple(tuple(int(a) for a in tm.dim) for tm in proto.tensor_map if list(tm.dim))
    else:
        tensor_map = tuple(int(a) for a in proto.tensor_map[0].dim) if proto.tensor_map else ()
    uneven = bool(proto.param_split_shape) and bool(list(proto.param_split_shape[0].dim))
    declared = tuple(int(d) for d in declared_shape) if declared_shape is not None else None
    return Layout(dev_matrix, tensor_map, int(proto.opt_weight_shard_size), (stage,), uneven, declared)


def _declared_shapes(path):
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


def _read_strategy_file(path, flag):
    """name -> Layout of one strategy file (stage-prefixed `<stage>-<name>` entries of a merged file are folded)."""
    try:
        raw = ms.parallel.build_searched_strategy(path)
        stage = _file_stage(path)
        declared = _declared_shapes(path)
    except Exception as err:  # MindSpore raises TypeError/ValueError/DecodeError for foreign files
        hint = ''
        if not path.endswith('.json') and _content(path)[:1] == b'{':
            hint = ' (MindSpore reads a strategy as JSON only when its name ends in .json)'
        raise TransformError(f"{flag} {path} is not a MindSpore strategy file (JSON or protobuf){hint}: "
                             f"{_first_line(err)}") from None
    if not raw:
        raise TransformError(f"{flag} {path} has no parameter layouts; pass the strategy file the checkpoint "
                             f"was (or will be) saved with")
    layouts = {}
    merged = all(_MERGED_NAME.fullmatch(name) for name in raw)
    for key, proto in raw.items():
        name, own_stage = key, stage
        if merged:
            own_stage, name = _MERGED_NAME.fullmatch(key).groups()
            own_stage = int(own_stage)
        layout = _layout_of(proto, own_stage, declared.get(key))
        if name in layouts:
            layout = dataclasses.replace(layout, stages=tuple(sorted(set(layouts[name].stages + layout.stages))))
        layouts[name] = layout
    if not merged and stage:
        raise TransformError(f"{flag} {path} is the strategy of pipeline stage {stage} alone; pass the directory "
                             f"holding the strategy files of every stage")
    return layouts


def load_strategy(value, work_dir, flag='--src_ckpt_strategy'):
    """Parse a strategy file or per-stage directory (merged into `work_dir`); None for a complete checkpoint."""
    if _is_none(value):
        return None
    path = os.path.abspath(os.fspath(value))
    if os.path.isdir(path):
        file = _merge_stage_files(path, work_dir, flag)
    elif os.path.isfile(path):
        file = path
    else:
        raise TransformUsageError(f"{flag} {value}: no such file or directory (give a strategy file, a directory of "
                                  f"per-stage strategy files, or None for a complete checkpoint)")
    layouts = _read_strategy_file(file, flag)
    stages = sorted({s for layout in layouts.values() for s in layout.stages})
    if stages != list(range(len(stages))):
        missing = sorted(set(range(max(stages) + 1)) - set(stages))
        raise TransformError(f"{flag} {value} covers pipeline stages {stages} but not {missing}; add the strategy "
                             f"files of the missing stages")
    devices = {math.prod(layout.dev_matrix) for layout in layouts.values()}
    if len(devices) != 1:
        raise TransformError(f"{flag} {value} mixes device matrices of {sorted(devices)} devices per stage; every "
                             f"parameter of one layout must span the same devices")
    return Strategy(os.fspath(value), file, layouts, len(stages), devices.pop())


def _merge_stage_files(directory, work_dir, flag):
    files = sorted(glob.glob(os.path.join(directory, '*.json')) + glob.glob(os.path.join(directory, '*.ckpt')))
    if not files:
        raise TransformError(f"{flag} {directory} holds no strategy file (*.json or *.ckpt)")
    if len({os.path.splitext(f)[1] for f in files}) > 1:
        raise TransformError(f"{flag} {directory} mixes .json and .ckpt strategy files; keep one format")
    seen = {}
    for file in files:
        try:
            stage = _file_stage(file)
        except Exception as err:  # a foreign or corrupt file
            raise TransformError(f"{flag} {file} is not a MindSpore strategy file: {_first_line(err)}") from None
        if stage in seen and _content(seen[stage]) != _content(file):
            raise TransformError(f"{flag} {directory} has two different strategies for pipeline stage {stage} "
                                 f"({os.path.basename(seen[stage])}, {os.path.basename(file)}); keep one per stage")
        seen.setdefault(stage, file)
    merged = os.path.join(work_dir, f"merged_{flag.strip('-')}{os.path.splitext(files[0])[1]}")
    try:
        ms.merge_pipeline_strategys(directory, merged)
    except Exception as err:  # MindSpore's ValueError for empty files, DecodeError for foreign ones
        raise TransformError(f"{flag} {directory}: merging the per-stage strategy files failed: "
                             f"{_first_line(err)}") from None
    return merged


def _content(path):
    with open(path, 'rb') as f:
        return f.read()


def _first_line(err):
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


# ----------------------------------------------------------------------------------------------- source files
def _checkpoint_files(directory):
    return sorted(f for f in os.listdir(directory) if f.endswith(CHECKPOINT_SUFFIXES) and not f.startswith('.')
                  and os.path.isfile(os.path.join(directory, f)))


def rank_directories(src):
    """rank -> directory of the `rank_<N>/` directories under `src`."""
    if not os.path.isdir(src):
        return {}
    found = {}
    for entry in os.listdir(src):
        match = _RANK_DIR.fullmatch(entry)
        if match and os.path.isdir(os.path.join(src, entry)):
            found[int(match.group(1))] = os.path.join(src, entry)
    return found


def select_source_checkpoints(src):
    """rank -> checkpoint file of a source: a checkpoint file (rank 0), a directory of `rank_<N>/` directories, or
    a directory holding one checkpoint (rank 0). Several checkpoints per rank are told apart by `meta.json`: the
    newest global step every rank lists is taken. Checksums recorded in `meta.json` are verified."""
    src = os.path.abspath(os.fspath(src))
    if os.path.isfile(src):
        if not src.endswith(CHECKPOINT_SUFFIXES):
            raise TransformUsageError(f"--src_ckpt_dir {src} is a file but not a checkpoint (*.ckpt, *.safetensors)")
        return {0: resolve_checkpoint(src)}
    if not os.path.isdir(src):
        raise TransformUsageError(f"--src_ckpt_dir {src}: no such file or directory")
    dirs = rank_directories(src)
    if not dirs:
        if not _checkpoint_files(src):
            raise TransformUsageError(f"--src_ckpt_dir {src} has neither rank_<N>/ directories nor a checkpoint file")
        dirs = {0: src}
    common = _common_meta_step(dirs)
    chosen = {}
    for rank, directory in sorted(dirs.items()):
        if common is not None:
            entry = next(e for e in meta_entries(directory) if e['global_step'] == common)
            path = os.path.join(directory, entry['file'])
            chosen[rank] = verify_checkpoint(path, entry.get('sha256'))
            continue
        files = _checkpoint_files(directory)
        if len(files) != 1:
            what = 'no checkpoint' if not files else f"{len(files)} checkpoints ({_listing(files, 4)})"
            raise TransformError(f"{directory} holds {what} and no {META_FILE} that names a step common to every "
                                 f"rank; leave exactly one checkpoint (*.ckpt or *.safetensors) per rank directory")
        chosen[rank] = os.path.join(directory, files[0])
    formats = {os.path.splitext(p)[1] for p in chosen.values()}
    if len(formats) > 1:
        raise TransformError(f"--src_ckpt_dir {src} mixes {' and '.join(sorted(formats))} checkpoints across ranks; "
                             f"convert them to one format")
    if common is not None:
        logger.info("transform: using global step %d, the newest listed in every rank's %s", common, META_FILE)
    return chosen


def _common_meta_step(dirs):
    """The newest global step listed in every rank's meta.json; None unless every rank has one."""
    steps = None
    for directory in dirs.values():
        listed = {e['global_step'] for e in meta_entries(directory) if 'global_step' in e}
        if not listed:
            return None
        steps = listed if steps is None else steps & listed
    if not steps:
        raise TransformError(f"no checkpoint step is listed in the {META_FILE} of every rank directory "
                             f"({_ranks_text(dirs)}); the ranks were saved at different steps, copy a complete set")
    return max(steps)


# ----------------------------------------------------------------------------------------------- checking
def _state_exempt(name, present_prefixes, layouts):
    """Optimizer or accumulation state (`<prefix>.<param>` laid out like `<param>`) may be absent as a whole group:
    a weights-only checkpoint transformed with a training strategy."""
    prefix, _, rest = name.partition('.')
    return bool(rest) and rest in layouts and prefix not in present_prefixes


def check_source(files, src, dst, expected_shapes=None):
    """Check the source checkpoints `files` (rank -> path) against the strategies before transforming; returns
    (name -> full shape, number of source bytes). Raises TransformError naming what does not fit."""
    ranks = sorted(files)
    if src is None:
        if ranks != [0]:
            raise TransformError(f"--src_ckpt_strategy is None (a complete checkpoint) but the source has "
                                 f"{len(ranks)} rank directories ({_ranks_text(ranks)}); pass the strategy file or "
                                 f"directory the checkpoint was saved with")
    else:
        expected = set(range(src.rank_num))
        missing, extra = sorted(expected - set(ranks)), sorted(set(ranks) - expected)
        if missing:
            raise TransformError(f"the source strategy {src.given} describes {src.rank_num} ranks "
                                 f"({_ranks_text(expected)}) but the source lacks {_ranks_text(missing)} (found "
                                 f"{_ranks_text(ranks)}); copy every rank's checkpoint directory into the source")
        if extra:
            raise TransformError(f"the source has {_ranks_text(extra)} beyond the {src.rank_num} ranks the source "
                                 f"strategy {src.given} describes; pass the strategy the checkpoint was saved with "
                                 f"(for pipeline parallel: the directory with every stage's strategy file)")
    full, first_seen, present, total_bytes = {}, {}, set(), 0
    for count, rank in enumerate(ranks, 1):
        entries = {name: tuple(p.shape) for name, p in load_checkpoint_file(files[rank]).items()}
        present.update(entries)
        where = f"rank_{rank} checkpoint {files[rank]}"
        if src is not None:
            _check_rank_names(entries, src, rank, where)
        for name, shape in entries.items():
            layout = src.layouts.get(name) if src is not None else None
            if layout is not None and len(layout.tensor_map) != len(shape):
                raise TransformError(f"{where}: {name} has {len(shape)} dims but the source strategy maps "
                                     f"{len(layout.tensor_map)}; pass the strategy the checkpoint was saved with")
            whole = layout.full_shape(shape) if layout is not None else shape
            if layout is not None and layout.declared_shape not in (None, whole) and not layout.uneven:
                raise TransformError(f"{where}: {name} of shape {list(shape)} is a slice of {list(whole)} under the "
                                     f"source strategy {src.given}, which declares {list(layout.declared_shape)}; "
                                     f"pass the strategy the checkpoint was saved with")
            if name in full and full[name] != whole:
                raise TransformError(f"{name} has shape {list(shape)} in {where} but "
                                     f"{list(first_seen[name][1])} on rank_{first_seen[name][0]}: the rank "
                                     f"checkpoints come from different models or layouts")
            full.setdefault(name, whole)
            first_seen.setdefault(name, (rank, shape))
        total_bytes += os.path.getsize(files[rank])
        logger.info("transform: checked rank_%d (%d/%d): %d entries", rank, count, len(ranks), len(entries))
    if dst is not None:
        _check_destination_fit(full, present, src, dst)
    if expected_shapes:
        wrong = [f"{n}: checkpoint {list(full[n])} vs model {list(s)}" for n, s in expected_shapes.items()
                 if n in full and tuple(full[n]) != tuple(s)]
        if wrong:
            raise TransformError(f"the source checkpoint, laid out by "
                                 f"{'the source strategy ' + src.given if src else 'no strategy (complete)'}, does "
                                 f"not fit the model: {_listing(wrong, 5)}; set src_strategy_path_or_dir to the "
                                 f"strategy the checkpoint was saved with")
    return full, total_bytes


def _check_rank_names(entries, src, rank, where):
    stage = src.stage_of(rank)
    on_stage = src.names_on_stage(stage)
    prefixes = {n.partition('.')[0] for n in entries}
    unknown = [n for n, shape in entries.items() if n not in src.layouts and math.prod(shape) > 1]
    elsewhere = [n for n in entries if n in src.layouts and n not in on_stage]
    missing = [n for n in sorted(on_stage) if n not in entries and not _state_exempt(n, prefixes, src.layouts)]
    if unknown:
        raise TransformError(f"{where} has parameters the source strategy {src.given} does not lay out: "
                             f"{_listing(unknown)}; pass the strategy the checkpoint was saved with")
    if elsewhere:
        raise TransformError(f"{where} (pipeline stage {stage}) holds parameters the source strategy places on "
                             f"other stages: {_listing(elsewhere)}; pass the strategy the checkpoint was saved with")
    if missing:
        raise TransformError(f"{where} lacks parameters the source strategy {src.given} expects on stage {stage}: "
                             f"{_listing(missing)}; the checkpoint is incomplete or from another model")


def _check_destination_fit(full, present, src, dst):
    source_names = set(src.layouts) if src is not None else {n for n, s in full.items() if math.prod(s) > 1}
    prefixes = {n.partition('.')[0] for n in present}
    unplaced = sorted(n for n in source_names if n not in dst.layouts and n in present)
    if unplaced:
        raise TransformError(f"the destination strategy {dst.given} has no layout for {_listing(unplaced)} which "
                             f"the source checkpoint holds; pass a destination strategy of the same model")
    absent = sorted(n for n in dst.layouts if n not in present and not _state_exempt(n, prefixes, dst.layouts))
    if absent:
        raise TransformError(f"the destination strategy {dst.given} lays out parameters the source checkpoint "
                             f"does not have: {_listing(absent)}; pass a destination strategy of the same model")
    bad = []
    for name, layout in dst.layouts.items():
        if name not in full or layout.uneven:
            continue
        if len(layout.tensor_map) != len(full[name]):
            bad.append(f"{name} {list(full[name])} (the strategy maps {len(layout.tensor_map)} dims)")
        elif layout.declared_shape not in (None, tuple(full[name])):
            bad.append(f"{name} {list(full[name])} (the strategy declares {list(layout.declared_shape)})")
        bad += [f"{name} {list(full[name])}: dim {d} of size {n} into {k} slices"
                for d, n, k in layout.indivisible_dims(full[name])]
    if bad:
        raise TransformError(f"shapes do not fit the destination strategy {dst.given}: {_listing(bad, 5)}; "
                             f"pass a destination strategy made for this model")


# ----------------------------------------------------------------------------------------------- transform
@dataclasses.dataclass
class TransformSummary:
    """What a transform wrote."""
    dst_dir: str
    src_ranks: int
    dst_ranks: int
    parameters: int
    bytes_read: int
    bytes_written: int
    seconds: float

    def __str__(self):
        return (f"transformed {self.src_ranks} source rank(s) into {self.dst_ranks} destination rank(s) at "
                f"{self.dst_dir}: {self.parameters} parameters, {self.bytes_read / 2**20:.1f} MiB read, "
                f"{self.bytes_written / 2**20:.1f} MiB written in {self.seconds:.1f} s")


def _check_destination_dir(src, dst, overwrite=False):
    src_real, dst_real = os.path.realpath(src), os.path.realpath(dst)
    if src_real == dst_real:
        raise TransformUsageError(f"--src_ckpt_dir and --dst_ckpt_dir are the same directory ({src_real}); pass a new "
                                  f"or empty destination")
    if dst_real.startswith(src_real.rstrip(os.sep) + os.sep) or src_real.startswith(dst_real.rstrip(os.sep) + os.sep):
        raise TransformUsageError(f"--dst_ckpt_dir {dst} and --src_ckpt_dir {src} lie inside one another; pass a "
                                  f"destination outside the source")
    if os.path.exists(dst) and not os.path.isdir(dst):
        raise TransformUsageError(f"--dst_ckpt_dir {dst} is a file; pass a new or empty directory")
    if os.path.isdir(dst) and os.listdir(dst) and not overwrite:
        raise TransformUsageError(f"--dst_ckpt_dir {dst} is not empty; pass a new or empty directory (nothing there "
                                  f"is overwritten), or --overwrite to replace it")


def transform_checkpoint(src_ckpt_dir, dst_ckpt_dir, src_strategy=None, dst_strategy=None, prefix='checkpoint_',
                         expected_shapes=None, overwrite=False):
    """Reshard the checkpoint at `src_ckpt_dir` (laid out by `src_strategy`, None = complete) into the layout of
    `dst_strategy` (None = complete) under `dst_ckpt_dir`, which must be new or empty (or, with `overwrite`, is
    replaced whole once the new one is complete) and appears complete or not at all. `expected_shapes` (name -> full
    shape) additionally checks the source against a model. Returns a TransformSummary; raises TransformError
    (TransformUsageError for a path that cannot be used; CheckpointError for an unreadable file) before writing
    anything."""
    start = time.time()
    src = os.path.abspath(os.fspath(src_ckpt_dir))
    dst = os.path.abspath(os.fspath(dst_ckpt_dir))
    if not prefix or os.sep in prefix or prefix.startswith('.'):
        raise TransformUsageError(f"--prefix {prefix!r} must be a plain, non-empty file-name prefix")
    if not os.path.exists(src):
        raise TransformUsageError(f"--src_ckpt_dir {src}: no such file or directory")
    _check_destination_dir(src, dst, overwrite)
    parent = os.path.dirname(dst)
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f'.{os.path.basename(dst)}.partial.', dir=parent)
    try:
        source = load_strategy(src_strategy, staging, '--src_ckpt_strategy')
        target = load_strategy(dst_strategy, staging, '--dst_ckpt_strategy')
        files = select_source_checkpoints(src)
        full, bytes_read = check_source(files, source, target, expected_shapes)
        fmt = os.path.splitext(next(iter(files.values())))[1][1:]
        linked = os.path.join(staging, 'source')
        for rank, path in files.items():
            os.makedirs(os.path.join(linked, f'rank_{rank}'))
            os.symlink(path, os.path.join(linked, f'rank_{rank}', os.path.basename(path)))
        logger.info("transform: resharding %d rank(s) with MindSpore (%s -> %s)", len(files),
                    source.given if source else 'complete', target.given if target else 'complete')
        raw = os.path.join(staging, 'raw')
        try:
            ms.transform_checkpoints(linked, raw, prefix, source.file if source else None,
                                     target.file if target else None, output_format=fmt)
        except Exception as err:  # MindSpore's ValueError/RuntimeError: name the inputs, keep one line
            raise TransformError(f"MindSpore could not transform {src}: {_first_line(err)}") from None
        out = os.path.join(staging, 'out')
        dst_ranks = target.rank_num if target else 1
        written = _finalize(raw, out, prefix, fmt, dst_ranks)
        _publish(out, dst, overwrite)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    summary = TransformSummary(dst, len(files), dst_ranks, len(full), bytes_read, written, time.time() - start)
    logger.info("transform: %s", summary)
    return summary


def _finalize(raw, out, prefix, fmt, dst_ranks):
    """Rewrite MindSpore's output as one CRC-checked file per rank (folding per-stage parts), with `meta.json`
    for training checkpoints; returns the bytes written."""
    produced = rank_directories(raw)
    if sorted(produced) != list(range(dst_ranks)):
        raise TransformError(f"MindSpore wrote {_ranks_text(produced)} but the destination strategy describes "
                             f"{dst_ranks} rank(s)")
    written = 0
    for rank in range(dst_ranks):
        params = {}
        for part in _checkpoint_files(produced[rank]):  # MindSpore's own fresh output: written without a CRC
            params.update(ms.load_checkpoint(os.path.join(produced[rank], part), format=fmt))
        directory = os.path.join(out, f'rank_{rank}')
        name = f'{prefix}{rank}.{fmt}'
        save_checkpoint_atomic(params, os.path.join(directory, name))
        counters = [params.get(k) for k in ('epoch_num', 'step_num', 'global_step')]
        if all(c is not None for c in counters):
            epoch, step, global_step = (int(c.asnumpy().reshape(-1)[0]) for c in counters)
            record_checkpoint(directory, name, epoch, step, global_step, keep_max=0)
        size = os.path.getsize(os.path.join(directory, name))
        written += size
        logger.info("transform: wrote rank_%d (%d/%d): %d entries, %.1f MiB", rank, rank + 1, dst_ranks,
                    len(params), size / 2**20)
    return written


def _publish(out, dst, overwrite=False):
    """Move the finished tree into place in one rename (an empty `dst` directory is replaced; one that gained files
    since it was checked makes the rename fail rather than lose them); with `overwrite`, `dst` is replaced whole."""
    if overwrite and os.path.isdir(dst):
        replace_output(out, dst)
    else:
        os.rename(out, dst)
    directory = os.path.dirname(dst)
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ----------------------------------------------------------------------------------------------- online (Trainer)
def _fingerprint(files_root, strategies, prefix):
    """A key for one transform request: the source checkpoint files (path, size, mtime) and strategy contents."""
    digest = hashlib.sha256(prefix.encode())
    root = os.path.abspath(files_root)
    paths = [root] if os.path.isfile(root) else sorted(
        glob.glob(os.path.join(root, '**', '*'), recursive=True))
    for path in paths:
        if os.path.isfile(path) and path.endswith(CHECKPOINT_SUFFIXES + (META_FILE,)):
            stat = os.stat(path)
            digest.update(f"{os.path.relpath(path, root)}|{stat.st_size}|{stat.st_mtime_ns}\n".encode())
    for strategy in strategies:
        if _is_none(strategy):
            digest.update(b'complete\n')
            continue
        strategy = os.path.abspath(os.fspath(strategy))
        members = sorted(glob.glob(os.path.join(strategy, '*'))) if os.path.isdir(strategy) else [strategy]
        for member in members:
            if os.path.isfile(member):
                digest.update(os.path.basename(member).encode() + _content(member))
    return digest.hexdigest()


def transform_for_run(checkpoint, src_strategy, output_dir, rank_id=0, device_num=1, dst_strategy=None,
                      expected_shapes=None, timeout=7200.0, poll=2.0):
    """Reshard `checkpoint` for the current run (auto_trans_ckpt) and return the directory this rank loads.

    The result goes to `<output_dir>/transformed_checkpoint/<name>/`. Rank 0 transforms, then writes a flag file
    beside it (`.<name>.succeed` or `.<name>.failed`, keyed by the source files and strategies); the other ranks
    wait for the flag, for at most `timeout` seconds. A finished transform of the same source is reused. With
    `dst_strategy` None (the complete layout: one device, or data parallel) every rank loads rank_0."""
    checkpoint = os.path.abspath(os.fspath(checkpoint))
    if _is_none(src_strategy) and dst_strategy is None:
        ranks = rank_directories(checkpoint)
        if len(ranks) > 1:
            raise TransformError(f"auto_trans_ckpt: {checkpoint} holds per-rank checkpoints ({_ranks_text(ranks)}) "
                                 f"but src_strategy_path_or_dir is not set; set it to the strategy file or directory "
                                 f"the checkpoint was saved with")
        logger.info("auto_trans_ckpt: %s is a complete checkpoint and this run uses the complete layout; nothing "
                    "to reshard", checkpoint)
        return checkpoint
    name = os.path.splitext(os.path.basename(checkpoint.rstrip(os.sep)))[0] or 'checkpoint'
    root = os.path.join(os.path.abspath(output_dir), 'transformed_checkpoint')
    dst = os.path.join(root, name)
    if (os.path.realpath(checkpoint) + os.sep).startswith(os.path.realpath(root) + os.sep):
        raise TransformError(f"auto_trans_ckpt: {checkpoint} lies in {root}, where resharded checkpoints are "
                             f"written (and replaced); load it without auto_trans_ckpt, or move it elsewhere first")
    succeed, failed = os.path.join(root, f'.{name}.succeed'), os.path.join(root, f'.{name}.failed')
    key = _fingerprint(checkpoint, (src_strategy, dst_strategy), 'checkpoint_')
    load_rank = rank_id if dst_strategy is not None else 0
    if rank_id == 0:
        if _flag_key(succeed) == key and os.path.isdir(dst):
            logger.info("auto_trans_ckpt: reusing %s (transformed earlier from the same checkpoint and strategies)",
                        dst)
        else:
            os.makedirs(root, exist_ok=True)
            for flag in (succeed, failed):
                if os.path.exists(flag):
                    os.remove(flag)
            if os.path.exists(dst):
                shutil.rmtree(dst)  # an older transform (another source or layout) under this name
            try:
                transform_checkpoint(checkpoint, dst, src_strategy, dst_strategy, expected_shapes=expected_shapes)
            except Exception as err:
                write_json_atomic(failed, {'key': key, 'error': str(err)})
                raise
            write_json_atomic(succeed, {'key': key, 'source': checkpoint})
    else:
        _wait_for_rank0(succeed, failed, key, dst, rank_id, timeout, poll)
    return os.path.join(dst, f'rank_{load_rank}')


def _flag_key(path):
    try:
        with open(path, encoding='utf-8') as f:
            return json.load(f).get('key')
    except (OSError, ValueError, AttributeError):
        return None


def _wait_for_rank0(succeed, failed, key, dst, rank_id, timeout, poll):
    deadline = time.time() + timeout
    logger.info("auto_trans_ckpt: rank %d waits for rank 0 to transform the checkpoint into %s", rank_id, dst)
    while True:
        if _flag_key(succeed) == key:
            return
        # a failure flag older than this process is from an earlier run (rank 0 removes it before retrying)
        if _flag_key(failed) == key and os.path.getmtime(failed) >= _PROCESS_START:
            with open(failed, encoding='utf-8') as f:
                error = json.load(f).get('error', '')
            raise TransformError(f"auto_trans_ckpt: rank 0 failed to transform the checkpoint: {error}")
        if time.time() >= deadline:
            raise TransformError(f"auto_trans_ckpt: rank {rank_id} waited {timeout:.0f} s for rank 0 to transform "
                                 f"the checkpoint into {dst} (flag {succeed}); check rank 0's log, and that "
                                 f"output_dir is on a file system every rank shares")
        time.sleep(poll)


# ----------------------------------------------------------------------------------------------- CLI
def build_parser():
    parser = OneLineArgumentParser(prog='transform_ckpt.py', description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--src_ckpt_strategy', default=None,
                        help='strategy of the source: a file, a directory of per-stage files, or None (complete)')
    parser.add_argument('--dst_ckpt_strategy', default=None,
                        help='strategy to reshard into: a file, a directory of per-stage files, or None (complete)')
    parser.add_argument('--src_ckpt_dir', required=True,
                        help='source: a directory of rank_<N>/ directories, or one complete checkpoint file')
    parser.add_argument('--dst_ckpt_dir', required=True, help='destination: a new or empty directory')
    parser.add_argument('--prefix', default='checkpoint_', help='destination file prefix (default checkpoint_)')
    parser.add_argument('--overwrite', action='store_true', help='replace a non-empty --dst_ckpt_dir')
    return parser


def main(argv=None):
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as stop:  # a bad flag (its line is written) or --help
        return stop.code
    try:
        summary = transform_checkpoint(args.src_ckpt_dir, args.dst_ckpt_dir, args.src_ckpt_strategy,
                                       args.dst_ckpt_strategy, args.prefix, overwrite=args.overwrite)
    except UsageError as err:
        sys.stderr.write(f"transform_ckpt.py: error: {_first_line(err)}\n")
        return 2
    except (CheckpointError, OSError) as err:  # the checkpoints' or strategies' content, or the disk
        sys.stderr.write(f"transform_ckpt.py: error: {_first_line(err)}\n")
        return 1
    except Exception as err:  # pylint: disable=broad-except
        sys.stderr.write(f"transform_ckpt.py: error: {type(err).__name__}: {_first_line(err)}\n")
        return 1
    print(summary)
    return 0


if __name__ == '__main__':
    sys.exit(main())
