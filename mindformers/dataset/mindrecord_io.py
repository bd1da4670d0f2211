"""MindRecord output sets: atomic writing (an overwrite replaces the whole set) and the checks a reader makes before
trusting a set of files.

An output `<dir>/<name>` split N ways is the data files `<name>` (N = 1) or `<name>0` .. `<name>{N-1}`, each with
its `.db` index; every data file's header lists the N file names written together. A write goes into a hidden
directory `.<name>.tmp-<pid>-*` beside the output and is swapped in only once complete (`_swap_in`); a reader sees
the complete old set, the complete new set, or an incomplete one that `check_mindrecord_files` refuses, never a mix.
"""
import contextlib
import json
import os
import re
import shutil
import sqlite3
import struct
import tempfile
from urllib.parse import quote

import numpy as np

from mindformers.dataset.preprocess import IGNORE_INDEX
from mindformers.tools.checkpoint import fsync_path
from mindformers.tools.logger import logger

MAX_SPLITS = 1000  # MindRecord's limit on files per dataset
_COMMITTED, _SWAPPING = 'COMMITTED', 'SWAPPING'  # marks in a write's temporary directory (see _swap_in)
_RECREATE = "re-create the data (the dataset_preprocess tools with --overwrite replace a whole set)"


class DataError(ValueError):
    """Data files that cannot be used as they are; the message names the file (and row) and what to do."""


class WriteError(OSError):
    """Writing an output failed (disk full, file too large, I/O error); nothing new was left behind."""


def _natural_key(path):
    return [int(part) if part.isdigit() else part for part in re.split(r'(\d+)', path)]


# ----------------------------------------------------------------------------- headers
def read_header(path, where='data'):
    """The JSON header of the MindRecord data file `path` (shard_addresses, schema, page, ...)."""
    try:
        with open(path, 'rb') as f:
            raw = f.read(8)
            size = struct.unpack('<Q', raw)[0] if len(raw) == 8 else 0
            header = json.loads(f.read(size)) if 0 < size < (1 << 30) else None
        if not isinstance(header, dict) or not header.get('shard_addresses'):
            raise ValueError('no shard list')
    except (ValueError, UnicodeDecodeError):
        raise DataError(f"{where}: {path} is not a MindRecord data file, or its header is truncated; "
                        f"{_RECREATE}") from None
    return header


def _set_name(addresses):
    """Output name of the files written together: `<name>` alone, or `<name>0`, `<name>1`, ..."""
    return addresses[0] if len(addresses) == 1 else addresses[0][:-1]


def _span(addresses):
    return addresses[0] if len(addresses) == 1 else f"{addresses[0]}..{addresses[-1]} ({len(addresses)} files)"


def existing_outputs(output_file):
    """Files of the output set `output_file` (data files first, then indexes), whatever its split count: `<name>`,
    the shards `<name><N>` whose header names them part of `<name>`, and their `.db` indexes."""
    parent, name = os.path.split(os.path.abspath(output_file))
    found = []
    for entry in os.listdir(parent) if os.path.isdir(parent) else []:
        data = entry[:-3] if entry.endswith('.db') else entry
        if data != name and not (data.startswith(name) and data[len(name):].isdigit()):
            continue
        path = os.path.join(parent, data)
        if data != name and os.path.isfile(path):
            try:
                if _set_name(read_header(path)['shard_addresses']) != name:
                    continue  # a one-file output of its own, e.g. train.mindrecord1 beside train.mindrecord
            except DataError:
                pass  # unreadable: a leftover of this set
        found.append(os.path.join(parent, entry))
    return sorted(found, key=lambda p: (p.endswith('.db'), _natural_key(p)))


def mindrecord_files(output_file, num_splits=1):
    """Data file names MindRecord uses for `output_file` split `num_splits` ways (each has a `.db` index too)."""
    return [output_file] if num_splits == 1 else [f"{output_file}{i}" for i in range(num_splits)]


# ----------------------------------------------------------------------------- writing
def _running(pid):
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _swap_in(staging, parent, name):
    """Replace the output set `name` in `parent` by the files in `staging`/new: first the old data files, then their
    indexes, move to `staging`/old; then the new indexes, then the new data files, move in. No data file ever sits
    beside an index or a sibling shard of another write. Restartable: the SWAPPING mark says the old set is out."""
    if not os.path.exists(os.path.join(staging, _SWAPPING)):
        old = os.path.join(staging, 'old')
        os.makedirs(old, exist_ok=True)
        for path in existing_outputs(os.path.join(parent, name)):
            os.replace(path, os.path.join(old, os.path.basename(path)))
        open(os.path.join(staging, _SWAPPING), 'wb').close()
    new = os.path.join(staging, 'new')
    for entry in sorted(os.listdir(new), key=lambda e: (not e.endswith('.db'), _natural_key(e))):
        os.replace(os.path.join(new, entry), os.path.join(parent, entry))
    fsync_path(parent)


def recover_writes(output_file):
    """Finish or remove what writers of `output_file` that are no longer running left beside it: a write that had
    completed is swapped in (it was killed while swapping), an incomplete one is deleted."""
    parent, name = os.path.split(os.path.abspath(output_file))
    prefix = f'.{name}.tmp-'
    for entry in sorted(os.listdir(parent)) if os.path.isdir(parent) else []:
        pid = entry[len(prefix):].split('-')[0] if entry.startswith(prefix) else ''
        if not pid.isdigit() or _running(int(pid)):
            continue
        staging = os.path.join(parent, entry)
        if os.path.exists(os.path.join(staging, _COMMITTED)):
            _swap_in(staging, parent, name)
            logger.warning("%s: finished replacing it by the complete output of a writer (pid %s) killed while "
                           "swapping it in", os.path.join(parent, name), pid)
        else:
            logger.info("removing %s, left by a writer (pid %s) that did not finish", staging, pid)
        shutil.rmtree(staging, ignore_errors=True)


def _failure_reason(err):
    """The line of MindSpore's RuntimeError (or an OSError) that says what went wrong."""
    if isinstance(err, OSError) and err.strerror:
        return err.strerror
    lines = [line.strip() for line in str(err).splitlines() if line.strip().startswith('[ERROR]')]
    reason = lines[-1] if lines else (str(err).strip().splitlines() or [type(err).__name__])[0]
    return re.sub(r'^(\[(Internal )?ERROR\]\s*)+', '', reason)


@contextlib.contextmanager
def _write_errors(output_file):
    try:
        yield
    except (RuntimeError, OSError) as err:
        parent = os.path.dirname(output_file)
        try:
            free = f"{shutil.disk_usage(parent).free / 2 ** 20:.1f} MB free in {parent}"
        except OSError:
            free = f"cannot tell the free space in {parent}"
        raise WriteError(f"writing {output_file} failed: {_failure_reason(err)} (is the disk full? {free}); "
                         f"nothing was written, an existing output is unchanged") from None


def write_columns(output_file, blocks, widths, description, num_splits=1, overwrite=False):
    """Write `blocks` ({column: int array [n, width]} for the columns and widths of `widths`) as the int32
    MindRecord output set `output_file`, split `num_splits` ways; returns its data files.

    Atomic: the set is written in a hidden directory beside the output and swapped in only once complete (see
    `_swap_in`); what killed writers left behind is finished or removed first (`recover_writes`). An existing
    output (any split count) raises FileExistsError unless `overwrite`, which replaces the whole old set. A failing
    write raises WriteError (disk full, ...), any error leaves nothing new behind."""
    from mindspore.mindrecord import FileWriter
    output_file = os.path.abspath(output_file)
    parent, name = os.path.split(output_file)
    os.makedirs(parent, exist_ok=True)
    recover_writes(output_file)
    existing = existing_outputs(output_file)
    if existing and not overwrite:
        raise FileExistsError(f"output already exists: {existing[0]} (pass --overwrite to replace it)")
    staging = tempfile.mkdtemp(prefix=f'.{name}.tmp-{os.getpid()}-', dir=parent)
    committed = False
    try:
        with _write_errors(output_file):
            os.mkdir(os.path.join(staging, 'new'))
            writer = FileWriter(os.path.join(staging, 'new', name), shard_num=num_splits, overwrite=False)
            writer.add_schema({c: {'type': 'int32', 'shape': [int(w)]} for c, w in widths.items()}, description)
        for block in blocks:
            arrays = {c: np.asarray(block[c], dtype=np.int32) for c in widths}
            rows = len(next(iter(arrays.values())))
            if any(a.ndim != 2 or a.shape != (rows, int(widths[c])) for c, a in arrays.items()):
                expected = ' / '.join(dict.fromkeys(f"[n, {int(w)}]" for w in widths.values()))
                raise ValueError(f"sample block of shapes {[a.shape for a in arrays.values()]} does not match "
                                 f"{expected}")
            with _write_errors(output_file):
                writer.write_raw_data([dict(zip(arrays, row)) for row in zip(*arrays.values())])
        with _write_errors(output_file):
            writer.commit()
            new = os.path.join(staging, 'new')
            for path in [os.path.join(new, entry) for entry in os.listdir(new)] + [new]:
                fsync_path(path)  # what the swap publishes survives a power loss
            open(os.path.join(staging, _COMMITTED), 'wb').close()
            fsync_path(staging)
        committed = True
        _swap_in(staging, parent, name)
    finally:
        if not committed:  # once committed, an interrupted swap is finished by the next writer
            shutil.rmtree(staging, ignore_errors=True)
    shutil.rmtree(staging, ignore_errors=True)
    return mindrecord_files(output_file, num_splits)


def write_mindrecord(output_file, blocks, seq_length, num_splits=1, overwrite=False):
    """Write int32 blocks [n, seq_length + 1] to MindRecord column `input_ids` (see `write_columns`)."""
    return write_columns(output_file, ({'input_ids': block} for block in blocks), {'input_ids': int(seq_length) + 1},
                         'causal language model samples', num_splits, overwrite)


def write_sft_mindrecord(output_file, blocks, seq_length, num_splits=1, overwrite=False):
    """Write blocks {'input_ids', 'labels'} of int32 [n, seq_length + 1] to MindRecord (see `write_columns`)."""
    width = int(seq_length) + 1
    return write_columns(output_file, blocks, {'input_ids': width, 'labels': width},
                         'instruction samples with prompt-masked labels', num_splits, overwrite)


# ----------------------------------------------------------------------------- reading
def _check_file(path, header, where):
    """Raise DataError when data file `path` is shorter than its header says, or its index is not its own."""
    pages = header.get('page') or []
    if pages:
        last = max(pages, key=lambda page: page['page_id'])
        expected = header['header_size'] + last['page_id'] * header['page_size'] + last['page_size']
        size = os.path.getsize(path)
        if size < expected:
            raise DataError(f"{where}: {path} is truncated ({size} bytes, its header needs {expected}); "
                            f"{_RECREATE}")
    index = path + '.db'
    try:
        with contextlib.closing(sqlite3.connect(f"file:{quote(index)}?mode=ro", uri=True)) as db:
            indexed = db.execute('SELECT COUNT(*) FROM INDEXES').fetchone()[0]
    except sqlite3.Error as err:
        raise DataError(f"{where}: index {index} is damaged ({err}); {_RECREATE}") from None
    rows = max((page['end_row_id'] for page in pages), default=0)
    if rows and indexed != rows:
        raise DataError(f"{where}: index {index} does not belong to {os.path.basename(path)} ({indexed} rows "
                        f"indexed, {rows} in the file): they come from different writes; {_RECREATE}")


def pending_writes(directory):
    """A note on the writes in `directory` that were complete but killed while being swapped in ('' if none)."""
    pending = [entry for entry in sorted(os.listdir(directory)) if entry.startswith('.') and '.tmp-' in entry and
               os.path.exists(os.path.join(directory, entry, _COMMITTED))]
    return (f" (a write killed while replacing its output is pending in {os.path.join(directory, pending[0])}: "
            f"the next preprocessing run writing that output finishes it)") if pending else ''


def check_mindrecord_files(files, where='data'):
    """Raise DataError unless every data file of `files` is complete (not truncated, with its own index) and
    belongs to a whole set of files written together: each shard its header lists is present beside it, from the
    same write, and no two sets of one output name (stale shards of an earlier write) are read together."""
    headers = {}

    def header(path):
        if path not in headers:
            headers[path] = read_header(path, where)
        return headers[path]

    sets = {}
    for path in files:
        directory = os.path.dirname(path)
        addresses = list(header(path)['shard_addresses'])
        name = _set_name(addresses)
        for sibling in addresses:
            sibling_path = os.path.join(directory, sibling)
            if not os.path.isfile(sibling_path):
                raise DataError(f"{where}: {path} is one of the files {_span(addresses)} written together, but "
                                f"{sibling} is missing{pending_writes(directory)}; {_RECREATE}")
            other = list(header(sibling_path)['shard_addresses'])
            if other != addresses:
                raise DataError(f"{where}: {directory} holds files of two different writes of {name}: "
                                f"{_span(addresses)} and {_span(other)}{pending_writes(directory)}; delete "
                                f"the stale files or {_RECREATE}")
        seen = sets.setdefault((directory, name), addresses)
        if seen != addresses:
            raise DataError(f"{where}: {directory} holds two different outputs named {name}: {_span(seen)} and "
                            f"{_span(addresses)}; delete the stale files or {_RECREATE}")
        _check_file(path, header(path), where)


def find_bad_row(files, widths, token_columns=(), vocab_size=None):
    """(file, row, problem) of the first row of `files` (in file order) whose column `c` (of `widths`) does not
    hold `widths[c]` values, or whose `token_columns` hold an id outside [0, vocab_size) (`vocab_size` None: only
    negative ids; a 'labels' column may also hold IGNORE_INDEX); None when every row is fine. Reads every row up
    to the bad one: for explaining a failure, not for checking up front."""
    from mindspore.mindrecord import FileReader
    for path in files:
        reader = FileReader([path], num_consumer=1, columns=list(widths))
        try:
            for row, sample in enumerate(reader.get_next()):
                for column, width in widths.items():
                    values = np.asarray(sample[column]).reshape(-1)
                    if len(values) != width:
                        return path, row, f"column {column!r} holds {len(values)} values, the other rows {width}"
                    problem = token_problem(values, column, vocab_size) if column in token_columns else None
                    if problem:
                        return path, row, problem
        finally:
            reader.close()
    return None


def token_problem(values, column, vocab_size=None):
    """What is wrong with the token ids `values` of `column` (negative, or >= `vocab_size` when given; a 'labels'
    column may also hold IGNORE_INDEX), or None."""
    values = np.asarray(values).reshape(-1)
    if column == 'labels':
        values = values[values != IGNORE_INDEX]
    if not values.size:
        return None
    if values.min() < 0:
        return f"column {column!r} holds the negative token id {values.min()}"
    if vocab_size and values.max() >= vocab_size:
        return f"column {column!r} holds the token id {values.max()}, outside the model's vocab_size {vocab_size}"
    return None
