"""Resuming a run: find the newest checkpoint every rank completed, and put a train cell back in that state."""
import dataclasses
import os

import mindspore as ms

from mindformers.tools.checkpoint import (CheckpointError, META_FILE, load_checkpoint_file, meta_entries,
                                          newest_good_checkpoint, verify_checkpoint)
from mindformers.tools.logger import logger

# train-cell state that may legitimately be absent from a checkpoint (zero at every step boundary)
_OPTIONAL_PREFIXES = ('accu_grads.',)


@dataclasses.dataclass
class ResumePoint:
    """Where a run continues: the checkpoint file and the counters saved with it (epoch 1-based; `step_in_epoch`
    optimizer steps of that epoch were done; `global_step` in all)."""
    path: str
    epoch: int
    step_in_epoch: int
    global_step: int


def find_resume_checkpoint(location, rank_id=0, device_num=1):
    """The ResumePoint for `location`: a checkpoint file, a rank directory (with `meta.json`), or a directory of
    `rank_<i>/` directories. With several ranks, the newest global step that every rank's `meta.json` lists is
    taken; a corrupt or missing file (checked by SHA-256, on every rank whose directory is visible here) makes all
    ranks fall back to the previous common step, and the fallback is logged by name."""
    location = os.fspath(location)
    if os.path.isfile(location):
        return _point_from_file(location)
    if not os.path.isdir(location):
        raise CheckpointError(f"resume_training: {location} is neither a checkpoint file nor a directory")
    own_dir = os.path.join(location, f'rank_{rank_id}')
    if not os.path.isdir(own_dir):
        if device_num > 1 or not meta_entries(location):
            raise CheckpointError(f"resume_training: no rank_{rank_id}/ directory with a {META_FILE} under "
                                  f"{location}")
        own_dir, location = location, None
    own = meta_entries(own_dir)
    if not own:
        raise CheckpointError(f"resume_training: {own_dir} has no {META_FILE} listing a complete checkpoint "
                              f"(start without resume_training, or point it at a checkpoint file)")
    others = {}
    if location is not None:
        for rank in range(device_num):
            rank_dir = os.path.join(location, f'rank_{rank}')
            if rank != rank_id and os.path.isdir(rank_dir):
                others[rank_dir] = {e['global_step']: e for e in meta_entries(rank_dir)}
        if device_num > 1 and len(others) < device_num - 1:
            logger.warning("resume_training: only %d of %d rank directories are visible under %s; trusting the "
                           "others to hold the same steps", len(others) + 1, device_num, location)
    common = [e for e in own if all(e['global_step'] in steps for steps in others.values())]
    if not common:
        raise CheckpointError(f"resume_training: no global step is complete on every rank under {location}")
    while common:
        path, entry = newest_good_checkpoint(own_dir, common)
        try:
            for rank_dir, steps in others.items():
                other = steps[entry['global_step']]
                verify_checkpoint(os.path.join(rank_dir, other['file']), other.get('sha256'))
        except CheckpointError as err:
            logger.warning("%s; all ranks fall back to the previous common checkpoint", err)
            common = common[:common.index(entry)]
            continue
        return ResumePoint(path, int(entry['epoch']), int(entry['step']), int(entry['global_step']))
    raise CheckpointError(f"resume_training: no checkpoint under {location} is intact on every rank")


def _point_from_file(path):
    directory, name = os.path.split(os.path.abspath(path))
    for entry in meta_entries(directory):
        if entry['file'] == name:
            verify_checkpoint(path, entry.get('sha256'))
            return ResumePoint(path, int(entry['epoch']), int(entry['step']), int(entry['global_step']))
    params = load_checkpoint_file(path)  # no meta.json entry: read the counters saved inside the file
    try:
        epoch, step = (int(params[key].asnumpy().reshape(-1)[0]) for key in ('epoch_num', 'step_num'))
    except KeyError:
        raise CheckpointError(f"resume_training: {path} holds no epoch_num/step_num counters (it is not a "
                              f"training checkpoint); use it as load_checkpoint to start from its weights") from None
    global_step = int(params['global_step'].asnumpy().reshape(-1)[0]) if 'global_step' in params else None
    return ResumePoint(path, epoch, step, global_step)


def restore_train_state(train_cell, point):
    """Load the checkpoint of `point` into `train_cell`: model weights, optimizer moments and update count,
    loss scale. Every state parameter must be present with its shape (accumulation buffers may be absent)."""
    params = load_checkpoint_file(point.path)
    own = {p.name: p for p in train_cell.get_parameters()}
    missing = [n for n in own if n not in params and not n.startswith(_OPTIONAL_PREFIXES)]
    mismatched = [f"{n} (checkpoint {tuple(params[n].shape)}, run {tuple(p.shape)})" for n, p in own.items()
                  if n in params and tuple(params[n].shape) != tuple(p.shape)]
    if missing or mismatched:
        detail = '; '.join(filter(None, [missing and f"missing {', '.join(missing[:8])}",
                                         mismatched and f"shape mismatch {', '.join(mismatched[:8])}"]))
        raise CheckpointError(f"resume_training: {point.path} does not fit this run ({detail}); resume with the "
                              f"model, optimizer and wrapper settings it was saved with")
    ms.load_param_into_net(train_cell, {n: params[n] for n in own if n in params}, strict_load=False)
    if point.global_step is None:
        point.global_step = int(train_cell.optimizer.global_step.asnumpy().reshape(-1)[0])
    return point
