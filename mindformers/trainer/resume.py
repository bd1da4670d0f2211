"""Resuming a run: find the newest checkpoint every rank completed, and put a train cell back in that state."""
import dataclasses
import os

import mindspore as ms

from mindformers.tools.checkpoint import (CheckpointError, META_FILE, load_checkpoint_file, meta_entries,
                                          meta_entry, newest_good_checkpoint, verify_checkpoint)
from mindformers.tools.logger import logger
from mindformers.trainer.delta import check_delta, frozen_names, is_delta

# train-cell state that may legitimately be absent from a checkpoint (zero at every step boundary)
_OPTIONAL_PREFIXES = ('accu_grads.',)
# counters saved beside the train cell's parameters (CheckpointMonitor's append_dict)
_COUNTERS = ('epoch_num', 'step_num')
_START_HINT = ("Start the run without resume_training (drop --resume_training); it saves a checkpoint every "
               "save_checkpoint_steps optimizer steps and at the end, and resume_training continues from the newest")
_RUN_FIELDS = ('batch_size', 'gradient_accumulation_steps', 'device_num', 'steps_per_epoch')


@dataclasses.dataclass
class ResumePoint:
    """Where a run continues: the checkpoint file and the counters saved with it (epoch 1-based; `step_in_epoch`
    optimizer steps of that epoch were done; `global_step` in all). `run`: the batch_size, gradient_accumulation_steps,
    device_num and steps_per_epoch of the run that saved it, when its meta.json recorded them. `delta`: for a
    checkpoint of the trainable parameters alone, what its meta.json records of it (see `mindformers.trainer.delta`);
    the frozen base weights come from where the run loads its base."""
    path: str
    epoch: int
    step_in_epoch: int
    global_step: int
    run: dict = None
    delta: dict = None


def _point(path, entry):
    return ResumePoint(path, int(entry['epoch']), int(entry['step']), int(entry['global_step']), entry.get('run'),
                       entry.get('delta'))


def find_resume_checkpoint(location, rank_id=0, device_num=1):
    """The ResumePoint for `location`: a checkpoint file, a rank directory (with `meta.json`), or a directory of
    `rank_<i>/` directories. With several ranks, the newest global step that every rank's `meta.json` lists is
    taken; a corrupt or missing file (checked by SHA-256, on every rank whose directory is visible here) makes all
    ranks fall back to the previous common step, and the fallback is logged by name."""
    location = os.fspath(location)
    if os.path.isfile(location):
        return _point_from_file(location)
    if not os.path.isdir(location):
        raise CheckpointError(f"resume_training: nothing has been saved yet: {location} is neither a checkpoint "
                              f"file nor a directory. {_START_HINT}")
    own_dir = os.path.join(location, f'rank_{rank_id}')
    if not os.path.isdir(own_dir):
        if device_num > 1 or not meta_entries(location):
            raise CheckpointError(f"resume_training: nothing has been saved yet under {location} (no "
                                  f"rank_{rank_id}/ directory with a {META_FILE}). {_START_HINT}")
        own_dir, location = location, None
    own = meta_entries(own_dir)
    if not own:
        raise CheckpointError(f"resume_training: nothing has been saved yet in {own_dir} (no {META_FILE} listing "
                              f"a complete checkpoint). {_START_HINT}")
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
        return _point(path, entry)
    raise CheckpointError(f"resume_training: no checkpoint under {location} is intact on every rank")


def _point_from_file(path):
    entry = meta_entry(path)
    if entry is not None:
        verify_checkpoint(path, entry.get('sha256'))
        return _point(path, entry)
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
    loss scale. Every state parameter must be present with its shape (accumulation buffers may be absent; so may
    the frozen base of a delta checkpoint, which must then fit the network and its base weights: `check_delta`)."""
    params = load_checkpoint_file(point.path)
    own = {p.name: p for p in train_cell.get_parameters()}
    network = getattr(train_cell, 'network', None)
    base = set()
    if network is not None and is_delta(network, params, point.delta):
        check_delta(network, params, point.path, point.delta)
        base = frozen_names(network)
    missing = [n for n in own if n not in params and not n.startswith(_OPTIONAL_PREFIXES) and n not in base]
    unexpected = [n for n in params if n not in own and n not in _COUNTERS]
    mismatched = [f"{n} (checkpoint {tuple(params[n].shape)}, run {tuple(p.shape)})" for n, p in own.items()
                  if n in params and tuple(params[n].shape) != tuple(p.shape)]
    if missing or unexpected or mismatched:
        detail = '; '.join(filter(None, [missing and f"missing {', '.join(missing[:8])}",
                                         unexpected and f"not in this run {', '.join(unexpected[:8])}",
                                         mismatched and f"shape mismatch {', '.join(mismatched[:8])}"]))
        raise CheckpointError(f"resume_training: {point.path} does not fit this run ({detail}); resume with the "
                              f"model, optimizer and wrapper settings it was saved with")
    loadable = {n: params[n] for n in own if n in params}
    if base:  # load_param_into_net would warn about each frozen parameter it leaves as it is
        for name, value in loadable.items():
            own[name].set_data(value.astype(own[name].dtype))
    else:
        ms.load_param_into_net(train_cell, loadable, strict_load=False)
    if point.global_step is None:
        point.global_step = int(train_cell.optimizer.global_step.asnumpy().reshape(-1)[0])
    return point


def check_run_shape(point, run_shape):
    """Refuse to resume `point` in a run whose batch_size, gradient_accumulation_steps, device count or steps per
    epoch (`run_shape`) differ from the run that saved it (as its meta.json recorded): the data position and the
    schedule would no longer be the ones it stopped at."""
    saved = point.run or {}
    changed = [f"{key} {saved[key]} (now {run_shape[key]})" for key in _RUN_FIELDS
               if key in saved and key in run_shape and saved[key] != run_shape[key]]
    if changed:
        raise CheckpointError(f"resume_training: {point.path} was saved by a run with {', '.join(changed)}; resume "
                              f"with the data and settings it was saved with, or start a new run (another "
                              f"--output_dir, or load its weights with --load_checkpoint)")
