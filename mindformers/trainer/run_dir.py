"""The output directory of a training run: one run per directory, one writer at a time.

A new run (not a resume) refuses an `output_dir` that already holds another run's checkpoints or metrics, because
its checkpoint pruning and metrics would mix with them; `overwrite_output_dir` replaces them on purpose. While a run
trains, each rank holds an exclusive lock on `<output_dir>/.lock_rank_<i>`, so a second run writing there is refused
instead of overwriting checkpoints and interleaving logs."""
import fcntl
import json
import os
import socket
import sys
import time

from mindformers.core.callback import CheckpointMonitor
from mindformers.tools.checkpoint import META_FILE, meta_entries
from mindformers.tools.logger import logger

_CHECKPOINT_CALLBACKS = ('CheckpointMonitor', 'CheckpointMointor')
_RUN_FILES = ('metrics.jsonl', 'loss_curve.png')  # per-rank files of a run under <output_dir>/log/rank_<i>/


class OutputDirError(ValueError):
    """The output directory holds another run, or another process is writing to it."""


def checkpoint_dirs(config, callbacks, rank_id):
    """The rank directories this run's checkpoint callbacks write into: each CheckpointMonitor's `directory` (from
    the config's `callbacks` or the given callback objects), `<output_dir>/checkpoint` by default."""
    default = os.path.join(config.output_dir, 'checkpoint')
    roots = []
    for section in config.get('callbacks') or []:
        if section.get('type') in _CHECKPOINT_CALLBACKS:
            roots.append(section.get('directory') or default)
    for callback in callbacks:
        if isinstance(callback, CheckpointMonitor):
            roots.append(callback.directory or default)
    return sorted({os.path.join(os.path.abspath(root), f'rank_{rank_id}') for root in roots or [default]})


def _checkpoint_files(directory):
    if not os.path.isdir(directory):
        return []
    listed = [e['file'] for e in meta_entries(directory)]
    found = [f for f in os.listdir(directory) if f.endswith(('.ckpt', '.safetensors')) and not f.startswith('.')]
    return sorted(set(listed) | set(found))


def earlier_run(output_dir, rank_id, ckpt_dirs):
    """A description of what an earlier run left for this rank (checkpoints, metrics), or None when nothing."""
    found = []
    for directory in ckpt_dirs:
        files = _checkpoint_files(directory)
        if files:
            found.append(f"{len(files)} checkpoint(s) in {directory}")
    log_dir = os.path.join(output_dir, 'log', f'rank_{rank_id}')
    metrics = os.path.join(log_dir, 'metrics.jsonl')
    if os.path.isfile(metrics) and os.path.getsize(metrics):
        found.append(f"the metrics of a run in {metrics}")
    return '; '.join(found) or None


def refuse_earlier_run(output_dir, rank_id, ckpt_dirs):
    """Raise OutputDirError when an earlier run left checkpoints or metrics for this rank in `output_dir`."""
    found = earlier_run(output_dir, rank_id, ckpt_dirs)
    if found:
        raise OutputDirError(
            f"output_dir {output_dir} already holds an earlier run ({found}); a new run there would prune its "
            f"checkpoints and mix the metrics. Continue it with resume_training (--resume_training), train into "
            f"another directory (--output_dir DIR, or output_dir in the YAML / TrainingArguments), or replace it on "
            f"purpose with overwrite_output_dir (--overwrite_output_dir True), which deletes those files")


def clear_earlier_run(output_dir, rank_id, ckpt_dirs):
    """overwrite_output_dir: delete the checkpoints, meta.json, metrics and loss curve an earlier run left for this
    rank (nothing else in the directory), logging each deletion."""
    removed = []
    for directory in ckpt_dirs:
        for name in _checkpoint_files(directory) + [META_FILE]:
            path = os.path.join(directory, name)
            if os.path.isfile(path):
                os.remove(path)
                removed.append(path)
    for name in _RUN_FILES:
        path = os.path.join(output_dir, 'log', f'rank_{rank_id}', name)
        if os.path.isfile(path):
            os.remove(path)
            removed.append(path)
    if removed:
        logger.info("overwrite_output_dir: removed %d file(s) of the earlier run: %s", len(removed),
                    ', '.join(removed))
    return removed


class RunLock:
    """An exclusive lock on `<output_dir>/.lock_rank_<rank_id>` for the lifetime of a run (the kernel releases it
    when the process ends, however it ends). The file names the holder; a second holder gets OutputDirError."""

    def __init__(self, output_dir, rank_id):
        self.path = os.path.join(output_dir, f'.lock_rank_{rank_id}')
        self._fd = None

    def acquire(self):
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            with os.fdopen(fd, encoding='utf-8', errors='replace') as f:
                holder = f.read().strip()
            try:
                holder = json.loads(holder)
                who = f"pid {holder['pid']} on {holder['host']}, started {holder['started']}: {holder['command']}"
            except (ValueError, KeyError, TypeError):
                who = 'another process'
            raise OutputDirError(f"output_dir {os.path.dirname(self.path)} is in use by another run ({who}); "
                                 f"wait for it to finish, or train into another --output_dir") from None
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({'pid': os.getpid(), 'host': socket.gethostname(),
                                 'started': time.strftime('%Y-%m-%d %H:%M:%S'),
                                 'command': ' '.join(sys.argv) or sys.executable}).encode())
        self._fd = fd
        return self

    def release(self):
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the lock
            self._fd = None

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()
