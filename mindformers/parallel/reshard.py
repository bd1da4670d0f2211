"""Resharding checkpoints between parallel layouts with strategy files, on MindSpore's `transform_checkpoints`.

`transform_checkpoint` (what `mindformers/tools/transform_ckpt.py` runs) checks the source before anything is
written: every rank the source strategy describes has exactly one checkpoint (the newest step listed in every rank's
`meta.json` when several are kept), parameter names agree with both strategies, and shapes split as the strategies
say. A delta checkpoint (its `meta.json` entry has `delta`: the trainable parameters of a model with a frozen base,
e.g. LoRA's) may hold a part of what the strategies lay out; its result keeps the `delta` record. The destination appears complete or not at all: `<dst>/rank_<k>/<prefix><k>.ckpt` (or `.safetensors`, the
source's format), CRC-checked, with a `meta.json` when the source was a training checkpoint (so a run can resume
from it in the new layout). `transform_for_run` is the Trainer's `auto_trans_ckpt`: rank 0 transforms, the other
ranks wait for it."""
import dataclasses
import glob
import hashlib
import json
import math
import os
import re
import shutil
import tempfile
import time

import mindspore as ms

from mindformers.parallel.strategy import StrategyError, StrategyUsageError, is_complete, load_strategy
from mindformers.tools.checkpoint import (META_FILE, first_line, fsync_path, load_checkpoint_file, meta_entries,
                                          meta_entry, record_checkpoint, resolve_checkpoint, save_checkpoint_atomic,
                                          verify_checkpoint, write_json_atomic)
from mindformers.tools.logger import logger
from mindformers.tools.utils import replace_output

__all__ = ['TransformError', 'TransformUsageError', 'TransformSummary', 'transform_checkpoint', 'transform_for_run',
           'select_source_checkpoints', 'check_source', 'rank_directories', 'CHECKPOINT_SUFFIXES']

CHECKPOINT_SUFFIXES = ('.ckpt', '.safetensors')
_PROCESS_START = time.time()
_RANK_DIR = re.compile(r'rank_(\d+)')

TransformError = StrategyError  # the name transform_ckpt has always raised: input that cannot be resharded as asked
TransformUsageError = StrategyUsageError  # a path that cannot be used (the CLI exits 2)


def _listing(names, limit=8):
    names = list(names)
    more = f" (and {len(names) - limit} more)" if len(names) > limit else ''
    return ', '.join(str(n) for n in names[:limit]) + more


def _ranks_text(ranks):
    return _listing([f'rank_{r}' for r in sorted(ranks)]) or 'none'


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


def delta_record(files):
    """The `delta` record the source checkpoints' meta.json entries share (None: whole checkpoints); ranks that mix
    delta and whole checkpoints are a TransformError."""
    records = {rank: (meta_entry(path) or {}).get('delta') for rank, path in files.items()}
    deltas = sorted(rank for rank, record in records.items() if record is not None)
    if deltas and len(deltas) != len(records):
        raise TransformError(f"the source mixes delta checkpoints ({_ranks_text(deltas)}: trainable parameters "
                             f"only) with whole ones; transform checkpoints of one run")
    return records[deltas[0]] if deltas else None


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


def check_source(files, src, dst, expected_shapes=None, partial=False):
    """Check the source checkpoints `files` (rank -> path) against the strategies before transforming; returns
    (name -> full shape, number of source bytes). `partial`: the checkpoints are deltas, which may lack parameters
    the strategies lay out (the frozen base). Raises TransformError naming what does not fit."""
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
            _check_rank_names(entries, src, rank, where, partial)
        for name, shape in entries.items():
            layout = src.layouts.get(name) if src is not None else None
            if layout is not None and len(layout.tensor_map) != len(shape):
                raise TransformError(f"{where}: {name} has {len(shape)} dims but the source strategy maps "
                                     f"{len(layout.tensor_map)}; pass the strategy the checkpoint was saved with")
            whole = layout.full_shape(shape) if layout is not None else shape
            if layout is not None and layout.shape not in (None, whole) and not layout.uneven:
                raise TransformError(f"{where}: {name} of shape {list(shape)} is a slice of {list(whole)} under the "
                                     f"source strategy {src.given}, which declares {list(layout.shape)}; "
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
        _check_destination_fit(full, present, src, dst, partial)
    if expected_shapes:
        wrong = [f"{n}: checkpoint {list(full[n])} vs model {list(s)}" for n, s in expected_shapes.items()
                 if n in full and tuple(full[n]) != tuple(s)]
        if wrong:
            raise TransformError(f"the source checkpoint, laid out by "
                                 f"{'the source strategy ' + src.given if src else 'no strategy (complete)'}, does "
                                 f"not fit the model: {_listing(wrong, 5)}; set src_strategy_path_or_dir to the "
                                 f"strategy the checkpoint was saved with")
    return full, total_bytes


def _check_rank_names(entries, src, rank, where, partial=False):
    stage = src.stage_of(rank)
    on_stage = src.names_on_stage(stage)
    prefixes = {n.partition('.')[0] for n in entries}
    unknown = [n for n, shape in entries.items() if n not in src.layouts and math.prod(shape) > 1]
    elsewhere = [n for n in entries if n in src.layouts and n not in on_stage]
    missing = [] if partial else \
        [n for n in sorted(on_stage) if n not in entries and not _state_exempt(n, prefixes, src.layouts)]
    if unknown:
        raise TransformError(f"{where} has parameters the source strategy {src.given} does not lay out: "
                             f"{_listing(unknown)}; pass the strategy the checkpoint was saved with")
    if elsewhere:
        raise TransformError(f"{where} (pipeline stage {stage}) holds parameters the source strategy places on "
                             f"other stages: {_listing(elsewhere)}; pass the strategy the checkpoint was saved with")
    if missing:
        raise TransformError(f"{where} lacks parameters the source strategy {src.given} expects on stage {stage}: "
                             f"{_listing(missing)}; the checkpoint is incomplete or from another model (a delta "
                             f"checkpoint, of the trainable parameters only, is told by the meta.json beside it)")


def _check_destination_fit(full, present, src, dst, partial=False):
    source_names = set(src.layouts) if src is not None else {n for n, s in full.items() if math.prod(s) > 1}
    prefixes = {n.partition('.')[0] for n in present}
    unplaced = sorted(n for n in source_names if n not in dst.layouts and n in present)
    if unplaced:
        raise TransformError(f"the destination strategy {dst.given} has no layout for {_listing(unplaced)} which "
                             f"the source checkpoint holds; pass a destination strategy of the same model")
    absent = [] if partial else \
        sorted(n for n in dst.layouts if n not in present and not _state_exempt(n, prefixes, dst.layouts))
    if absent:
        raise TransformError(f"the destination strategy {dst.given} lays out parameters the source checkpoint "
                             f"does not have: {_listing(absent)}; pass a destination strategy of the same model")
    bad = []
    for name, layout in dst.layouts.items():
        if name not in full or layout.uneven:
            continue
        if len(layout.tensor_map) != len(full[name]):
            bad.append(f"{name} {list(full[name])} (the strategy maps {len(layout.tensor_map)} dims)")
        elif layout.shape not in (None, tuple(full[name])):
            bad.append(f"{name} {list(full[name])} (the strategy declares {list(layout.shape)})")
        bad += [f"{name} {list(full[name])}: dim {d} of size {n} into {k} slices"
                for d, n, k in layout.indivisible_axes(full[name])]
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
        delta = delta_record(files)
        full, bytes_read = check_source(files, source, target, expected_shapes, partial=delta is not None)
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
            raise TransformError(f"MindSpore could not transform {src}: {first_line(err)}") from None
        out = os.path.join(staging, 'out')
        dst_ranks = target.rank_num if target else 1
        written = _finalize(raw, out, prefix, fmt, dst_ranks, delta)
        _publish(out, dst, overwrite)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    summary = TransformSummary(dst, len(files), dst_ranks, len(full), bytes_read, written, time.time() - start)
    logger.info("transform: %s", summary)
    return summary


def _finalize(raw, out, prefix, fmt, dst_ranks, delta=None):
    """Rewrite MindSpore's output as one CRC-checked file per rank (folding per-stage parts), with `meta.json`
    for training checkpoints (recording `delta` for delta checkpoints); returns the bytes written."""
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
            record_checkpoint(directory, name, epoch, step, global_step, keep_max=0, delta=delta)
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
    fsync_path(os.path.dirname(dst))


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
        if is_complete(strategy):
            digest.update(b'complete\n')
            continue
        strategy = os.path.abspath(os.fspath(strategy))
        members = sorted(glob.glob(os.path.join(strategy, '*'))) if os.path.isdir(strategy) else [strategy]
        for member in members:
            if os.path.isfile(member):
                with open(member, 'rb') as f:
                    digest.update(os.path.basename(member).encode() + f.read())
    return digest.hexdigest()


def transform_for_run(checkpoint, src_strategy, output_dir, rank_id=0, device_num=1, dst_strategy=None,
                      expected_shapes=None, timeout=7200.0, poll=2.0):
    """Reshard `checkpoint` for the current run (auto_trans_ckpt) and return the directory this rank loads.

    The result goes to `<output_dir>/transformed_checkpoint/<name>/`. Rank 0 transforms, then writes a flag file
    beside it (`.<name>.succeed` or `.<name>.failed`, keyed by the source files and strategies); the other ranks
    wait for the flag, for at most `timeout` seconds. A finished transform of the same source is reused. With
    `dst_strategy` None (the complete layout: one device, or data parallel) every rank loads rank_0."""
    checkpoint = os.path.abspath(os.fspath(checkpoint))
    if is_complete(src_strategy) and dst_strategy is None:
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
