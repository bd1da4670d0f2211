"""Checkpoint files: atomic writes, `meta.json` beside them, and loading with clear errors.

Layout: `<output_dir>/checkpoint/rank_<i>/<prefix>_rank_<i>-<epoch>_<step>.ckpt` plus `meta.json`
(`last_epoch`, `last_step`, `last_ckpt_file`, `global_step`, and `checkpoints`: the kept files, oldest first, each
with its epoch, step, global step and SHA-256; a checkpoint holding only the trainable parameters of a model whose
base is frozen, e.g. a LoRA delta, also has `delta`: what it was trained with, see `mindformers.trainer.delta`)."""
import hashlib
import json
import os

import mindspore as ms
import numpy as np

from mindformers.tools.file_io import first_line, fsync_path, write_json_atomic  # noqa: F401 (re-exported)
from mindformers.tools.logger import logger

META_FILE = 'meta.json'


class CheckpointError(ValueError):
    """A missing, corrupt or mismatched checkpoint; the message names the file."""


def save_checkpoint_atomic(save_obj, path, append_dict=None):
    """Write a checkpoint to `path` so that it either exists complete or not at all.

    `save_obj`: a Cell, a list of Parameters, or a dict name -> Tensor/ndarray. The file is written under a hidden
    temporary name in the same directory, fsynced, then renamed."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fmt = 'safetensors' if path.endswith('.safetensors') else 'ckpt'
    if isinstance(save_obj, dict):
        save_obj = [{'name': k, 'data': v if isinstance(v, ms.Tensor) else ms.Tensor(np.asarray(v))}
                    for k, v in save_obj.items()]
    tmp_stem = os.path.join(directory, f".{os.path.basename(path)}.partial.{os.getpid()}")
    tmp_file = f"{tmp_stem}.{fmt}"
    try:
        ms.save_checkpoint(save_obj, tmp_stem, append_dict=append_dict, format=fmt,
                           crc_check=fmt == 'ckpt')
        with open(tmp_file, 'rb+') as f:
            os.fsync(f.fileno())
        os.replace(tmp_file, path)
        fsync_path(directory)
    except (RuntimeError, OSError) as err:  # e.g. a full disk; MindSpore's message names no file
        raise CheckpointError(f"could not write checkpoint {path} ({first_line(err)}); is the disk full or the "
                              f"directory read-only? Nothing was written: the previous checkpoints are intact") from None
    finally:
        for leftover in (tmp_file, f"{tmp_stem}.tmp"):  # MindSpore writes <stem>.tmp before naming it <stem>.<fmt>
            if os.path.exists(leftover):
                os.remove(leftover)
    return path


def remove_partial_files(directory):
    """Delete the temporary files of saves that were interrupted (hidden `.<name>.partial.<pid>.*`); returns their
    names. Call it only where no other process writes into `directory` (each rank has its own)."""
    if not os.path.isdir(directory):
        return []
    stale = sorted(f for f in os.listdir(directory) if f.startswith('.') and '.partial.' in f)
    for name in stale:
        try:
            os.remove(os.path.join(directory, name))
        except OSError as err:
            logger.warning("could not remove %s: %s", name, err)
    if stale:
        logger.info("removed %d incomplete checkpoint file(s) left by an interrupted save in %s", len(stale),
                    directory)
    return stale


def load_checkpoint_file(path):
    """Load a `.ckpt` or `.safetensors` file into a dict name -> Parameter; corrupt files raise CheckpointError."""
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint file not found: {path}")
    fmt = 'safetensors' if path.endswith('.safetensors') else 'ckpt'
    try:
        kwargs = {'crc_check': True} if fmt == 'ckpt' else {}
        return ms.load_checkpoint(path, format=fmt, **kwargs)
    except Exception as err:  # MindSpore raises ValueError/RuntimeError with long C++ traces
        raise CheckpointError(f"checkpoint {path} is truncated or corrupt ({first_line(err)}); "
                              f"use an earlier checkpoint or re-create it") from None


def load_into_network(network, param_dict, path='<checkpoint>', strict=True):
    """Load `param_dict` into `network`. With `strict`, every network parameter must be present with the same
    shape, and every other entry must be training state of the network's parameters (`<state>.<parameter>`, e.g.
    optimizer moments) or a scalar counter: a checkpoint of a larger model (more layers) is refused rather than
    partly loaded. Errors name the parameters."""
    net_params = {p.name: p for p in network.get_parameters()}
    missing = [n for n in net_params if n not in param_dict]
    unexpected = [n for n, v in param_dict.items() if n not in net_params and int(np.prod(v.shape)) > 1
                  and n.split('.', 1)[-1] not in net_params]
    if unexpected and strict:
        raise CheckpointError(f"checkpoint {path} holds {len(unexpected)} parameter(s) the model does not have: "
                              f"{', '.join(unexpected[:10])}{' ...' if len(unexpected) > 10 else ''}; it was saved "
                              f"from another model configuration (e.g. more layers): use the model_config it was "
                              f"trained with")
    mismatched = [f"{n}: checkpoint {tuple(param_dict[n].shape)} vs model {tuple(p.shape)}"
                  for n, p in net_params.items() if n in param_dict and tuple(param_dict[n].shape) != tuple(p.shape)]
    if mismatched:
        raise CheckpointError(f"checkpoint {path} does not fit the model: shape mismatch for "
                              f"{'; '.join(mismatched[:10])}{' ...' if len(mismatched) > 10 else ''}")
    if missing and strict:
        raise CheckpointError(f"checkpoint {path} lacks {len(missing)} model parameter(s): "
                              f"{', '.join(missing[:10])}{' ...' if len(missing) > 10 else ''}")
    ms.load_param_into_net(network, {n: param_dict[n] for n in net_params if n in param_dict}, strict_load=False)
    return missing


def listing(items, limit=10):
    """'a, b, c ... (+N more)': at most `limit` of `items`."""
    items = list(items)
    return ', '.join(items[:limit]) + (f" ... (+{len(items) - limit} more)" if len(items) > limit else '')


def shape_of(value):
    """The shape of a tensor or array, or `value` itself when it is a shape (a tuple)."""
    return value if isinstance(value, tuple) else tuple(value.shape)


def fit_problems(params, own, missing=(), unexpected=(), unexpected_label='unexpected'):
    """How the checkpoint `params` (name -> tensor, or name -> shape tuple) fails to fit the parameters `own` (name -> Parameter), as
    phrases: 'missing <names>', '<unexpected_label> <names>', 'shape mismatch <name> (checkpoint <shape>, model
    <shape>)' for the names both hold. Empty when it fits."""
    mismatched = [f"{n} (checkpoint {shape_of(params[n])}, model {tuple(p.shape)})"
                  for n, p in own.items() if n in params and shape_of(params[n]) != tuple(p.shape)]
    return [f"{label} {listing(names)}" for label, names in (('missing', missing), (unexpected_label, unexpected),
                                                            ('shape mismatch', mismatched)) if names]


def file_sha256(path, chunk=1 << 20):
    digest = hashlib.sha256()
    with open(path, 'rb') as f:
        for block in iter(lambda: f.read(chunk), b''):
            digest.update(block)
    return digest.hexdigest()


def read_meta(directory):
    """The parsed `meta.json` of a rank directory, or None when absent or unreadable."""
    path = os.path.join(directory, META_FILE)
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding='utf-8') as f:
            meta = json.load(f)
    except (OSError, json.JSONDecodeError) as err:
        logger.warning("ignoring unreadable %s: %s", path, err)
        return None
    return meta if isinstance(meta, dict) else None


def meta_entries(directory):
    """The checkpoints `meta.json` lists for `directory`, oldest first: dicts with `file`, `epoch`, `step`,
    `global_step` and `sha256`."""
    meta = read_meta(directory) or {}
    return [e for e in meta.get('checkpoints', []) if isinstance(e, dict) and e.get('file')]


def verify_checkpoint(path, sha256=None):
    """Check that `path` exists and, when `sha256` is given, that its content has that checksum; else raise
    CheckpointError naming the file."""
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint file not found: {path}")
    if sha256 and file_sha256(path) != sha256:
        raise CheckpointError(f"checkpoint {path} is corrupt: its SHA-256 differs from the one recorded in "
                              f"{META_FILE} when it was written")
    return path


def meta_entry(path):
    """The entry `meta.json` beside the checkpoint `path` records for it (file, epoch, step, global_step, sha256, and
    `run` / `delta` when recorded), or None."""
    directory, name = os.path.split(os.path.abspath(path))
    for entry in meta_entries(directory):
        if entry['file'] == name:
            return entry
    return None


def _recorded_sha256(path):
    """The checksum `meta.json` beside `path` recorded for it, or None."""
    return (meta_entry(path) or {}).get('sha256')


def resolve_checkpoint(path, rank_id=0):
    """Turn a `load_checkpoint` value into one verified file.

    A file is returned as is (its checksum is verified when `meta.json` beside it records one). A directory is
    searched in order: `rank_<rank_id>/` inside it, the newest checkpoint its `meta.json` lists whose checksum
    holds (corrupt ones are reported and skipped), then the `.ckpt`/`.safetensors` file with the highest
    (epoch, step) in its name. Modification times are never used."""
    if os.path.isfile(path):
        return verify_checkpoint(path, _recorded_sha256(path))
    if not os.path.isdir(path):
        raise CheckpointError(f"checkpoint not found: {path} is neither a file nor a directory")
    rank_dir = os.path.join(path, f'rank_{rank_id}')
    if os.path.isdir(rank_dir):
        return resolve_checkpoint(rank_dir, rank_id)
    entries = meta_entries(path)
    if entries:
        return newest_good_checkpoint(path, entries)[0]
    files = [f for f in os.listdir(path) if f.endswith(('.ckpt', '.safetensors')) and not f.startswith('.')]
    if not files:
        raise CheckpointError(f"no checkpoint file (*.ckpt, *.safetensors) in directory {path}")
    return os.path.join(path, max(files, key=_epoch_step_key))


def newest_good_checkpoint(directory, entries):
    """(path, entry) of the newest of `entries` (meta.json entries, oldest first) whose file is present and
    intact. Each bad one is logged by name before falling back to the previous; none good raises CheckpointError."""
    problems = []
    for entry in reversed(entries):
        path = os.path.join(directory, entry['file'])
        try:
            verify_checkpoint(path, entry.get('sha256'))
        except CheckpointError as err:
            problems.append(str(err))
            logger.warning("%s; falling back to the previous checkpoint", err)
            continue
        return path, entry
    raise CheckpointError(f"no intact checkpoint in {directory}: {'; '.join(problems)}")


def _epoch_step_key(filename):
    stem = filename.rsplit('.', 1)[0]
    try:
        epoch, step = stem.rsplit('-', 1)[1].split('_')
        return int(epoch), int(step), filename
    except (IndexError, ValueError):
        return -1, -1, filename


def record_checkpoint(directory, filename, epoch, step, global_step, keep_max, run=None, delta=None):
    """After `filename` is complete on disk: add it to `meta.json` with its SHA-256 (and `run`, a dict describing
    the run's batch layout, and `delta`, the description of a checkpoint holding only the trainable parameters,
    when given), then delete the oldest files beyond `keep_max` (their entries go first, so meta.json never lists a
    missing file)."""
    entry = {'file': filename, 'epoch': int(epoch), 'step': int(step), 'global_step': int(global_step),
             'sha256': file_sha256(os.path.join(directory, filename))}
    if run:
        entry['run'] = dict(run)
    if delta is not None:
        entry['delta'] = dict(delta)
    kept = [e for e in meta_entries(directory)
            if e['file'] != filename and os.path.isfile(os.path.join(directory, e['file']))]
    kept.append(entry)
    removed = kept[:-keep_max] if keep_max and keep_max > 0 else []
    kept = kept[len(removed):]
    write_json_atomic(os.path.join(directory, META_FILE),
                      {'last_epoch': entry['epoch'], 'last_step': entry['step'], 'global_step': entry['global_step'],
                       'last_ckpt_file': filename, 'checkpoints': kept})
    for old in removed:
        try:
            os.remove(os.path.join(directory, old['file']))
        except OSError as err:
            logger.warning("could not remove old checkpoint %s: %s", old['file'], err)
