"""CausalLanguageModelDataset: batches of token samples of `seq_length + 1` for next-token prediction."""
import inspect
import re

import numpy as np
import mindspore.dataset as ds

from mindformers.dataset.base_dataset import BaseDataset, seeded_sampler
from mindformers.dataset.dataloader import find_mindrecord_files
from mindformers.dataset.mindrecord_io import DataError, find_bad_row, read_header, token_problem
from mindformers.tools.build import build_dataset_loader
from mindformers.tools.logger import logger
from mindformers.tools.register import MindFormerRegister, MindFormerModuleType


def get_dataset_columns_and_lengths(dataset):
    """{column name: length of its last axis} of a `mindspore.dataset` object (reads the first row; -1 for
    scalars)."""
    shapes = dataset.output_shapes()
    return {name: (int(shape[-1]) if len(shape) else -1) for name, shape in zip(dataset.get_col_names(), shapes)}


def check_dataset_columns(dataset, input_columns, seq_length=None, where='dataset'):
    """Raise ValueError unless `dataset` has every column of `input_columns` and, when `seq_length` is given, the
    first column holds `seq_length + 1` tokens per sample (the model reads [:-1] and predicts [1:])."""
    lengths = get_dataset_columns_and_lengths(dataset)
    missing = [c for c in input_columns if c not in lengths]
    if missing:
        raise ValueError(f"{where}: expected column(s) {list(input_columns)}, found {list(lengths)} "
                         f"(missing {missing})")
    if seq_length is not None:
        column = input_columns[0]
        length, expected = lengths[column], int(seq_length) + 1
        if length != expected:
            raise ValueError(f"{where}: column {column!r} holds {length} tokens per sample, but the model's "
                             f"seq_length {seq_length} needs seq_length + 1 = {expected} (this data fits "
                             f"seq_length {length - 1}; rebuild it or change model.model_config.seq_length)")
    return lengths


_BAD_DATA = '[bad data]'  # starts the message of a check failing inside the pipeline (see _NamedErrors)
_TOKEN_FIX = ("token ids must lie in [0, vocab_size): re-create the data with the model's tokenizer, or set "
              "model_config.vocab_size to the tokenizer's")
_LENGTH_FIX = ("every sample must hold seq_length + 1 tokens: re-create the data (python -m "
               "mindformers.tools.dataset_preprocess.text_to_mindrecord)")


class _RowLength:
    """Map over rows of a variable-length column: raise unless a row holds `width` values (batching would)."""

    def __init__(self, column, width):
        self.column, self.width = column, width

    def __call__(self, row):
        if row.shape[-1:] != (self.width,):
            raise ValueError(f"{_BAD_DATA} column {self.column!r} holds rows of {row.shape[-1] if row.ndim else 1} "
                             f"and {self.width} values")
        return row


class _Int32Batch:
    """Map over batches of a column: cast to int32, after checking its token ids (`token_problem`) if `tokens`."""

    def __init__(self, column, tokens, vocab_size):
        self.column, self.tokens, self.vocab_size = column, tokens, vocab_size

    def __call__(self, batch):
        problem = token_problem(batch, self.column, self.vocab_size) if self.tokens else None
        if problem:
            raise ValueError(f"{_BAD_DATA} {problem}")
        return batch.astype(np.int32)


class _NamedErrors:
    """Iterator of a dataset built here: a check failing inside the pipeline, or MindSpore failing to batch rows
    of different lengths, raises DataError naming the file and row (`find_bad_row`) instead of MindSpore's
    RuntimeError."""

    def __init__(self, iterator, where, files, widths, token_columns, vocab_size):
        self._iterator, self._where, self._files = iterator, where, files
        self._widths, self._token_columns, self._vocab_size = widths, token_columns, vocab_size

    def __iter__(self):
        return self

    def __next__(self):
        try:
            return next(self._iterator)
        except RuntimeError as err:
            text = str(err)
            found = re.search(re.escape(_BAD_DATA) + r' (.*)', text)
            if not found and 'Cannot batch tensors with different shapes' not in text:
                raise
            located = find_bad_row(self._files, self._widths, self._token_columns, self._vocab_size) \
                if self._files else None
            if located:
                where, problem = f"{self._where}: {located[0]} row {located[1]}", located[2]
            else:
                where, problem = self._where, found.group(1) if found else 'rows of different lengths'
            fix = _TOKEN_FIX if 'token id' in problem else _LENGTH_FIX
            raise DataError(f"{where}: {problem}; {fix}") from None

    def __getattr__(self, name):
        return getattr(self._iterator, name)


def _variable_columns(files, columns):
    """The columns of `columns` whose MindRecord schema (in `files[0]`) has a variable length."""
    schema = read_header(files[0])['schema'][0]['schema'] if files else {}
    return [c for c in columns if -1 in (schema.get(c) or {}).get('shape', ())]


def _accepts(cls, name):
    try:
        params = inspect.signature(cls).parameters
    except (TypeError, ValueError):
        return False
    return name in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


@MindFormerRegister.register(MindFormerModuleType.DATASET)
class CausalLanguageModelDataset(BaseDataset):
    """Build the training or evaluation dataset of a causal language model; returns a batched `mindspore.dataset`.

    `dataset_config` (MindFormers r1.0 keys):
      data_loader: {type: MindDataset, dataset_dir | dataset_files, shuffle} or any registered DATASET_LOADER,
          e.g. {type: TextCorpusDataset, files, tokenizer, split, shuffle} (it gets `seq_length` and the sampler);
      input_columns (default [input_ids]), batch_size (1), drop_remainder (True), repeat (1),
      num_parallel_workers (1), python_multiprocessing (False), seed (0),
      rank_id / device_num: this process's data-parallel shard and the number of shards (0 / 1),
      seq_length: the model's; the data must hold seq_length + 1 tokens per sample (checked when given),
      vocab_size: the model's; token ids must lie in [0, vocab_size) (negative ids are refused anyway), checked
          as batches are read: a bad sample raises DataError naming its file and row,
      start_epoch: begin with that epoch's order (order is a pure function of seed and epoch).
    Output columns are int32, [batch_size, seq_length + 1]. The Trainer also accepts a ready `mindspore.dataset`
    object instead (check it with `check_dataset_columns`).
    """
    KNOWN_KEYS = frozenset({'data_loader', 'input_columns', 'output_columns', 'batch_size', 'drop_remainder',
                            'repeat', 'num_parallel_workers', 'python_multiprocessing', 'seed', 'rank_id',
                            'device_num', 'seq_length', 'vocab_size', 'start_epoch', 'eod_reset'})

    def __new__(cls, dataset_config=None):
        config = dict(dataset_config or {})
        cls._check_keys(config)
        if config.get('eod_reset'):
            raise ValueError("CausalLanguageModelDataset: eod_reset (per-document position ids and masks) is not "
                             "supported; set eod_reset: False")
        input_columns = list(config.get('input_columns') or ['input_ids'])
        output_columns = list(config.get('output_columns') or input_columns)
        if output_columns != input_columns:
            raise ValueError(f"CausalLanguageModelDataset: output_columns {output_columns} must equal "
                             f"input_columns {input_columns} (no column transforms without eod_reset)")
        batch_size, workers = (cls._positive_int(config, key) for key in ('batch_size', 'num_parallel_workers'))
        dataset, where, files = cls._build_loader(config, workers)
        lengths = check_dataset_columns(dataset, input_columns, config.get('seq_length'), where=where)
        dataset = dataset.project(input_columns)
        samples = dataset.get_dataset_size()
        dataset = cls._batched(dataset, config, input_columns, lengths, where, files)
        logger.info("%s: %d samples for shard %s, batch_size %d -> %d batches per epoch", where, samples,
                    f"{config.get('rank_id') or 0}/{config.get('device_num') or 1}", batch_size,
                    dataset.get_dataset_size())
        return dataset

    @classmethod
    def _batched(cls, dataset, config, columns, lengths, where, files):
        """`dataset` batched (batch_size, drop_remainder), cast to int32 and repeated, with its token ids checked as
        batches are read (the first column and 'labels': in [0, vocab_size), labels may be -100); its iterators
        raise DataError naming the file and row of a bad sample (`_NamedErrors`)."""
        batch_size, repeat, workers = (cls._positive_int(config, key) for key in
                                       ('batch_size', 'repeat', 'num_parallel_workers'))
        vocab_size = cls._positive_int(config, 'vocab_size', default=None)
        drop_remainder = bool(config.get('drop_remainder', True))
        samples = dataset.get_dataset_size()
        if drop_remainder and samples < batch_size:
            raise ValueError(f"{where}: {samples} sample(s) for this shard, fewer than batch_size {batch_size} with "
                             f"drop_remainder: no batch would be produced (use more data or a smaller batch_size)")
        for column in _variable_columns(files, columns):
            dataset = dataset.map(operations=_RowLength(column, lengths[column]), input_columns=[column])
        dataset = dataset.batch(batch_size, drop_remainder=drop_remainder, num_parallel_workers=workers)
        token_columns = {columns[0], 'labels'} & set(columns)
        for column in columns:
            dataset = dataset.map(operations=_Int32Batch(column, column in token_columns, vocab_size),
                                  input_columns=[column], num_parallel_workers=workers,
                                  python_multiprocessing=bool(config.get('python_multiprocessing', False)))
        if repeat > 1:
            dataset = dataset.repeat(repeat)
        widths = {column: lengths[column] for column in columns}
        for name in ('create_tuple_iterator', 'create_dict_iterator'):
            create = getattr(dataset, name)
            setattr(dataset, name, lambda *args, _create=create, **kwargs: _NamedErrors(
                _create(*args, **kwargs), where, files, widths, token_columns, vocab_size))
        return dataset

    @classmethod
    def _build_loader(cls, config, workers):
        """(unbatched dataset, description for errors, its MindRecord files or None) for `config['data_loader']`,
        shuffled and sharded."""
        loader = dict(config.get('data_loader') or {})
        if 'type' not in loader:
            raise ValueError("CausalLanguageModelDataset: dataset_config.data_loader needs a 'type' (e.g. MindDataset "
                             "with dataset_dir, or TextCorpusDataset with files)")
        loader_type = loader.pop('type')
        num_shards, shard_id = cls._shard_info(config)
        shuffle = loader.pop('shuffle', True)
        # the sampler reshuffles once per pass, and an epoch makes `repeat` passes
        start_pass = int(config.get('start_epoch') or 0) * cls._positive_int(config, 'repeat')
        sampler = seeded_sampler(shuffle, seed=config.get('seed') or 0, num_shards=num_shards, shard_id=shard_id,
                                 start_pass=start_pass)
        if loader_type in ('MindDataset', ds.MindDataset):
            dataset_dir, dataset_files = loader.pop('dataset_dir', None), loader.pop('dataset_files', None)
            files = find_mindrecord_files(dataset_dir, dataset_files)
            where = f"MindRecord data {dataset_dir or files[0]}"
            try:
                return ds.MindDataset(files, sampler=sampler, num_parallel_workers=workers, **loader), where, files
            except TypeError as err:
                raise TypeError(f"data_loader (MindDataset): {err}") from err
        loader_cls = loader_type if inspect.isclass(loader_type) else MindFormerRegister.get_cls(
            MindFormerModuleType.DATASET_LOADER, loader_type, where='data_loader.type')
        # our loaders take the seeded sampler; others get MindSpore's num_shards / shard_id / shuffle
        if _accepts(loader_cls, 'sampler'):
            defaults = {'sampler': sampler}
        else:
            defaults = {'num_shards': num_shards, 'shard_id': shard_id, 'shuffle': shuffle}
        if _accepts(loader_cls, 'seq_length') and config.get('seq_length') is not None:
            defaults['seq_length'] = int(config['seq_length'])
        if _accepts(loader_cls, 'num_parallel_workers'):
            defaults['num_parallel_workers'] = workers
        dataset = build_dataset_loader(dict(loader, type=loader_cls), default_args=defaults, where='data_loader')
        return dataset, f"data_loader ({getattr(loader_cls, '__name__', loader_type)})", None
