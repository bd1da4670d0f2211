"""KeyWordGenDataset and ADGenDataLoader: ADGEN-style keyword-to-text data (`{"content": ..., "summary": ...}` JSON
lines) for finetuning and for generation-based evaluation."""
import os

import mindspore.dataset as ds
import numpy as np

from mindformers.dataset.dataloader import temporary_mindrecord
from mindformers.dataset.instruction_dataset import InstructionDataset
from mindformers.dataset.mindrecord_io import write_sft_mindrecord
from mindformers.dataset.preprocess import IGNORE_INDEX, _require, _text, expand_inputs, iter_records, pack_sample
from mindformers.tools.build import build_tokenizer
from mindformers.tools.logger import logger
from mindformers.tools.register import MindFormerRegister, MindFormerModuleType

PHASES = ('train', 'eval')
VERSIONS = (1, 2)


def _length(value, key):
    if value is None:
        raise ValueError(f"ADGenDataLoader needs {key} (the number of tokens kept from each "
                         f"{'content' if key == 'max_source_length' else 'summary'}; set it in the dataset config)")
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"ADGenDataLoader: {key} must be an integer >= 1, got {value!r}")
    return value


def keyword_gen_samples(records, tokenizer, phase, max_source_length, max_target_length, seq_length,
                        columns=('content', 'summary'), version=1):
    """(input_ids, labels): int32 arrays [n, seq_length + 1] of the (where, record) pairs.

    The prompt is the content's tokens (at most `max_source_length`; with `version` 2 the content is first put in
    the tokenizer's `build_prompt`) with the tokenizer's special tokens for a prompt (`build_prompt_inputs`: GLM's
    `[gMASK] <sop>` after it, GLM2's `[gMASK] sop` before it, LLaMA's and GPT-2's BOS; never an EOS, which would end
    the text before the answer). The answer is the summary's tokens (at most `max_target_length`).
      train: prompt + answer + EOS, padded on the right with the pad id; labels equal input_ids on the answer and
             its EOS, -100 elsewhere (the model shifts both, as for InstructionDataset).
      eval:  input_ids = the prompt, padded on the left; labels = the answer's tokens, then -100.
    """
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    if eos is None:
        raise ValueError(f"ADGenDataLoader: {type(tokenizer).__name__} has no eos_token_id to end the answers")
    pad = eos if pad is None else pad
    width = int(seq_length) + 1
    n_special = len(tokenizer.build_prompt_inputs([]))
    needed = n_special + max_source_length + (max_target_length + 1 if phase == 'train' else 0)
    if max(needed, max_target_length) > width:
        parts = (f"{n_special} special tokens + max_source_length {max_source_length}" +
                 (f" + max_target_length {max_target_length} + 1 EOS" if phase == 'train' else ''))
        raise ValueError(f"ADGenDataLoader ({phase}): {parts} = {max(needed, max_target_length)} tokens do not fit "
                         f"the model's seq_length + 1 = {width}; lower them or raise seq_length")
    if version == 2 and not hasattr(tokenizer, 'build_prompt'):
        raise ValueError(f"ADGenDataLoader: version 2 puts the content in the tokenizer's build_prompt, which "
                         f"{type(tokenizer).__name__} does not have; use version 1")
    input_ids, labels = [], []
    for where, record in records:
        content = _text(_require(record, columns[0], where), where, columns[0])
        summary = _text(_require(record, columns[1], where), where, columns[1])
        if version == 2:
            content = tokenizer.build_prompt(content)
        source = tokenizer.encode(content, add_special_tokens=False)[:max_source_length]
        prompt = tokenizer.build_prompt_inputs(source)
        answer = tokenizer.encode(summary, add_special_tokens=False)[:max_target_length]
        if phase == 'train':
            ids = prompt + answer + [eos]
            _, sample_ids, sample_labels = pack_sample(ids, [False] * len(prompt) + [True] * (len(answer) + 1),
                                                       seq_length, pad)
        else:
            sample_ids = np.array([pad] * (width - len(prompt)) + prompt, np.int32)
            sample_labels = np.array(answer + [IGNORE_INDEX] * (width - len(answer)), np.int32)
        input_ids.append(sample_ids)
        labels.append(sample_labels)
    return np.stack(input_ids), np.stack(labels)


@MindFormerRegister.register(MindFormerModuleType.DATASET_LOADER)
class ADGenDataLoader:
    """ADGEN-style JSON data tokenized in memory into the samples of `keyword_gen_samples`; returns a
    `mindspore.dataset` with int32 columns `input_ids` and `labels`, each [seq_length + 1].

    `dataset_dir`: a .json file (one JSON object per line, or one JSON array), or directories / globs of them.
    `origin_columns`: the keys of the content and the summary (default ["content", "summary"]). `phase`: 'train'
    or 'eval'. `version`: 1 (the content as is) or 2 (the content in the tokenizer's `build_prompt`, as
    MindFormers does for ChatGLM2). `tokenizer`: an object or a config mapping with `type`. `max_samples` keeps the
    first records. `sampler` / `shuffle`: as `TextCorpusDataset` (the samples sit in a temporary MindRecord file,
    so shuffling and sharding follow the same seeded sampler as other data). A record with bad JSON, a missing key
    or a non-string value raises ValueError naming the file and line.
    """

    def __new__(cls, dataset_dir=None, tokenizer=None, phase='train', origin_columns=('content', 'summary'),
                max_source_length=None, max_target_length=None, seq_length=None, version=1, max_samples=None,
                sampler=None, shuffle=None, num_parallel_workers=None):
        if not dataset_dir:
            raise ValueError("ADGenDataLoader needs dataset_dir: an ADGEN-style .json file (content/summary lines)")
        if phase not in PHASES:
            raise ValueError(f"ADGenDataLoader: phase must be 'train' or 'eval', got {phase!r}")
        if version not in VERSIONS:
            raise ValueError(f"ADGenDataLoader: version must be 1 (content as is) or 2 (the tokenizer's "
                             f"build_prompt), got {version!r}")
        columns = list(origin_columns or ())
        if len(columns) != 2 or not all(isinstance(c, str) and c for c in columns):
            raise ValueError(f"ADGenDataLoader: origin_columns must name the content and summary keys, e.g. "
                             f"['content', 'summary'], got {origin_columns!r}")
        if seq_length is None:
            raise ValueError("ADGenDataLoader needs seq_length (the model's; samples hold seq_length + 1 tokens)")
        if shuffle is not None and sampler is not None:
            raise ValueError("ADGenDataLoader: pass either shuffle or sampler, not both")
        max_source_length = _length(max_source_length, 'max_source_length')
        max_target_length = _length(max_target_length, 'max_target_length')
        if isinstance(tokenizer, dict):
            tokenizer = build_tokenizer(tokenizer, where='data_loader.tokenizer')
        if tokenizer is None:
            raise ValueError("ADGenDataLoader needs a tokenizer (processor.tokenizer of the run config, or "
                             "tokenizer: {type: ...} in the dataset config)")
        files = expand_inputs(dataset_dir if isinstance(dataset_dir, (list, tuple)) else [dataset_dir])
        options = ('adgen', phase, tuple(columns), max_source_length, max_target_length, int(seq_length), version,
                   max_samples)

        def write(directory):
            records = iter_records(files)
            if max_samples:
                records = (item for _, item in zip(range(int(max_samples)), records))
            input_ids, labels = keyword_gen_samples(records, tokenizer, phase, max_source_length, max_target_length,
                                                    seq_length, columns, version)
            logger.info("ADGenDataLoader: %d %s samples of %d tokens from %s", len(input_ids), phase,
                        int(seq_length) + 1, ', '.join(files))
            data_file, = write_sft_mindrecord(os.path.join(directory, 'adgen.mindrecord'),
                                              [{'input_ids': input_ids, 'labels': labels}], seq_length)
            return data_file

        data_file = temporary_mindrecord(files, tokenizer, options, write)
        kwargs = {'num_parallel_workers': num_parallel_workers} if num_parallel_workers else {}
        if sampler is None:
            kwargs['shuffle'] = bool(shuffle)
        return ds.MindDataset(data_file, sampler=sampler, **kwargs)


@MindFormerRegister.register(MindFormerModuleType.DATASET)
class KeyWordGenDataset(InstructionDataset):
    """Batches of ADGEN-style keyword-to-text samples: int32 `input_ids` and `labels` [batch_size, seq_length + 1]
    (see `keyword_gen_samples` for the train and eval layouts).

    `dataset_config` takes the keys of `InstructionDataset` (batch_size, drop_remainder, repeat, seed, ...) and
    MindFormers' `tokenizer`, `max_source_length`, `max_target_length` (passed to an `ADGenDataLoader`; the
    Trainer gives it the run config's processor.tokenizer) and `ignore_pad_token_for_loss` (only True: padding is
    never trained). `data_loader`: {type: ADGenDataLoader, dataset_dir, phase: train | eval, shuffle,
    origin_columns, version} or MindDataset files of the same columns. Train-phase data finetunes; eval-phase data
    is for generation-based metrics (ADGENMetric), not perplexity.
    """
    KNOWN_KEYS = InstructionDataset.KNOWN_KEYS | {'tokenizer', 'max_source_length', 'max_target_length',
                                                  'ignore_pad_token_for_loss'}
    DATA_HINT = "read ADGEN-style JSON with data_loader: {type: ADGenDataLoader, dataset_dir: ..., phase: ...}"
    LOADER_KEYS = ('tokenizer', 'max_source_length', 'max_target_length')

    def __new__(cls, dataset_config=None):
        config = dict(dataset_config or {})
        cls._check_keys(config)
        if config.pop('ignore_pad_token_for_loss', True) is not True:
            raise ValueError("KeyWordGenDataset: ignore_pad_token_for_loss must be True (padding gets label -100)")
        given = {key: config.pop(key) for key in cls.LOADER_KEYS if key in config}
        loader = dict(config.get('data_loader') or {})
        if loader.get('type') in ('ADGenDataLoader', ADGenDataLoader):
            config['data_loader'] = {**given, **loader}
        return super().__new__(cls, config)
