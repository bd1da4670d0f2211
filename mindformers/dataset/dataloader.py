"""Data loaders: locating MindRecord files, and `TextCorpusDataset` (raw text tokenized in memory)."""
import atexit
import os
import re
import shutil
import tempfile

import mindspore.dataset as ds

from mindformers.dataset.mindrecord_io import check_mindrecord_files, pending_writes, write_mindrecord
from mindformers.dataset.preprocess import build_lm_samples, expand_inputs, iter_documents
from mindformers.tools.build import build_tokenizer
from mindformers.tools.logger import logger
from mindformers.tools.register import MindFormerRegister, MindFormerModuleType
from mindformers.tools.utils import resolve_path

_MINDRECORD_NAME = re.compile(r'.*\.mindrecord\d*$')


def _natural_key(path):
    return [int(part) if part.isdigit() else part for part in re.split(r'(\d+)', path)]


def _files_in_dir(directory, where):
    names = sorted(os.listdir(directory), key=_natural_key)
    found = [os.path.join(directory, n) for n in names if _MINDRECORD_NAME.match(n)]
    if not found:
        if not names:
            raise ValueError(f"{where}: directory {directory} is empty (expected *.mindrecord files)")
        shown = ', '.join(names[:8]) + (', ...' if len(names) > 8 else '')
        raise ValueError(f"{where}: no MindRecord files (*.mindrecord) in {directory} (found: {shown})"
                         f"{pending_writes(directory)}")
    return found


def find_mindrecord_files(dataset_dir=None, dataset_files=None, where='data_loader'):
    """MindRecord data files named by `dataset_files` (a path or list; directories are searched) or found in
    `dataset_dir` (a directory, or one file). Files named `*.mindrecord` or `*.mindrecord<N>` (splits) count;
    each must have its `.db` index beside it, and be whole and of one write (`check_mindrecord_files`). Raises
    ValueError naming the key and path at fault."""
    if dataset_files:
        items, key = ([dataset_files] if isinstance(dataset_files, (str, os.PathLike)) else list(dataset_files),
                      f'{where}.dataset_files')
    elif dataset_dir:
        items, key = [dataset_dir], f'{where}.dataset_dir'
    else:
        raise ValueError(f"{where}.dataset_dir is empty: set it to a directory of MindRecord files (made with "
                         f"python -m mindformers.tools.dataset_preprocess.text_to_mindrecord)")
    files = []
    for item in items:
        path = resolve_path(os.fspath(item))
        if os.path.isdir(path):
            files += _files_in_dir(path, key)
        elif os.path.isfile(path):
            files.append(path)
        else:
            raise ValueError(f"{key}: not found: {path}")
    for path in files:
        if not os.path.isfile(path + '.db'):
            raise ValueError(f"{key}: {path} has no index file {os.path.basename(path)}.db beside it "
                             f"(a MindRecord file is incomplete without it)")
    check_mindrecord_files(files, key)
    return files


_TEMPORARY_FILES = {}  # cache key -> (tokenizer kept alive so its id stays unique, MindRecord file of the samples)


def temporary_mindrecord(paths, tokenizer, options, write):
    """A temporary MindRecord file (removed at exit) of samples made from the files `paths` with `tokenizer`:
    `write(directory)` writes it and returns the data file. The same request (same files, unchanged, same tokenizer
    object, equal `options` tuple) reuses the file, e.g. for repeated evaluation."""
    key = (tuple((p, os.path.getmtime(p), os.path.getsize(p)) for p in paths), id(tokenizer)) + tuple(options)
    cached = _TEMPORARY_FILES.get(key)
    if cached and os.path.isfile(cached[1]):
        return cached[1]
    tmp_dir = tempfile.mkdtemp(prefix='mindformers_data_')
    atexit.register(shutil.rmtree, tmp_dir, ignore_errors=True)
    data_file = write(tmp_dir)
    _TEMPORARY_FILES[key] = (tokenizer, data_file)
    return data_file


def _corpus_file(paths, tokenizer, seq_length, text_key, split_lines, split, eval_fraction, max_samples):
    """Tokenize, split and store the samples in a temporary MindRecord file (see `temporary_mindrecord`)."""
    options = (int(seq_length), text_key, bool(split_lines), split, float(eval_fraction), max_samples)
    return temporary_mindrecord(paths, tokenizer, options, lambda directory: _write_corpus(
        directory, paths, tokenizer, seq_length, text_key, split_lines, split, eval_fraction, max_samples))


def _write_corpus(directory, paths, tokenizer, seq_length, text_key, split_lines, split, eval_fraction, max_samples):
    samples, stats = build_lm_samples(iter_documents(paths, text_key, split_lines, with_where=True), tokenizer,
                                      seq_length)
    if split != 'all':
        if len(samples) < 2:
            raise ValueError(f"TextCorpusDataset: {len(samples)} sample(s) of {seq_length + 1} tokens from "
                             f"{', '.join(paths)} cannot be split into train and eval")
        n_eval = min(max(1, round(len(samples) * eval_fraction)), len(samples) - 1)
        samples = samples[:-n_eval] if split == 'train' else samples[-n_eval:]
    if max_samples:
        samples = samples[:int(max_samples)]
    logger.info("TextCorpusDataset: %d documents, %d tokens -> %d samples of %d tokens; split %r: %d samples",
                stats['documents'], stats['tokens'], stats['samples'], seq_length + 1, split, len(samples))
    data_file, = write_mindrecord(os.path.join(directory, 'corpus.mindrecord'), [samples], seq_length)
    return data_file


@MindFormerRegister.register(MindFormerModuleType.DATASET_LOADER)
class TextCorpusDataset:
    """Raw text files tokenized in memory into samples of `seq_length + 1` tokens; returns a `mindspore.dataset`
    with one int32 column `input_ids` [seq_length + 1].

    `files` (or `dataset_dir`): .txt / .jsonl / .json files, directories or globs (resolved with `resolve_path`),
    read as by `text_to_mindrecord` (`text_key`, `split_lines`). `tokenizer`: a tokenizer object or a config
    mapping with `type`. `split`: 'all', or 'train' / 'eval' for the first `1 - eval_fraction` / the last
    `eval_fraction` of the samples. `max_samples` keeps the first samples of the split. `sampler`: shuffling and
    sharding (see `seeded_sampler`); without one, `shuffle` (default False) uses MindSpore's global seed.

    The samples are stored in a temporary MindRecord file so that shuffling and sharding follow exactly the same
    sampler as preprocessed MindRecord data.
    """

    def __new__(cls, files=None, tokenizer=None, seq_length=None, split='all', eval_fraction=0.1, max_samples=None,
                text_key='text', split_lines=False, dataset_dir=None, sampler=None, shuffle=None,
                num_parallel_workers=None):
        files = files or dataset_dir
        if not files:
            raise ValueError("TextCorpusDataset needs files (or dataset_dir): raw .txt/.jsonl files, directories or "
                             "glob patterns")
        if seq_length is None:
            raise ValueError("TextCorpusDataset needs seq_length (the model's; samples hold seq_length + 1 tokens)")
        if shuffle is not None and sampler is not None:
            raise ValueError("TextCorpusDataset: pass either shuffle or sampler, not both")
        if split not in ('all', 'train', 'eval'):
            raise ValueError(f"TextCorpusDataset: split must be 'all', 'train' or 'eval', got {split!r}")
        if not 0 < eval_fraction < 1:
            raise ValueError(f"TextCorpusDataset: eval_fraction must lie in (0, 1), got {eval_fraction}")
        if isinstance(tokenizer, dict):
            tokenizer = build_tokenizer(tokenizer, where='data_loader.tokenizer')
        if tokenizer is None:
            raise ValueError("TextCorpusDataset needs a tokenizer (an object or a config with 'type')")
        data_file = _corpus_file(expand_inputs(files), tokenizer, seq_length, text_key, split_lines, split,
                                 eval_fraction, max_samples)
        kwargs = {'num_parallel_workers': num_parallel_workers} if num_parallel_workers else {}
        if sampler is None:
            kwargs['shuffle'] = bool(shuffle)
        return ds.MindDataset(data_file, sampler=sampler, **kwargs)
