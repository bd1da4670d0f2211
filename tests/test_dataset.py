"""CausalLanguageModelDataset: MindRecord and raw-text loaders, seeded shuffle, sharding, batching, clear errors."""
import os

import numpy as np
import pytest
import mindspore.dataset as ds
from mindspore.mindrecord import FileWriter

from mindformers.dataset.causal_language_model_dataset import (CausalLanguageModelDataset, check_dataset_columns,
                                                               get_dataset_columns_and_lengths)
from mindformers.dataset.dataloader import TextCorpusDataset
from mindformers.models.gpt2.gpt2_tokenizer import GPT2Tokenizer
from mindformers.dataset.mindrecord_io import DataError, write_sft_mindrecord
from mindformers.tools.build import build_dataset
from mindformers.tools.dataset_preprocess.text_to_mindrecord import build_lm_samples, write_mindrecord

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CORPUS = os.path.join(REPO, 'mindformers', 'assets', 'corpus', 'tiny_shakespeare.txt')
SEQ = 8
N = 20
TOKENIZER = GPT2Tokenizer(vocab_file='assets/gpt2_tiny/vocab.json', merges_file='assets/gpt2_tiny/merges.txt')


SAMPLES = np.repeat(np.arange(N, dtype=np.int32)[:, None], SEQ + 1, axis=1)  # sample i is filled with i


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
    """A directory with one MindRecord file of the N SAMPLES."""
    root = tmp_path_factory.mktemp('mindrecord')
    write_mindrecord(str(root / 'train.mindrecord'), [SAMPLES], SEQ)
    return str(root)


def config(data_dir, **overrides):
    cfg = {'data_loader': {'type': 'MindDataset', 'dataset_dir': data_dir, 'shuffle': True},
           'input_columns': ['input_ids'], 'batch_size': 1, 'drop_remainder': True, 'repeat': 1, 'seed': 1,
           'seq_length': SEQ}
    loader = overrides.pop('data_loader', {})
    cfg.update(overrides)
    cfg['data_loader'] = dict(cfg['data_loader'], **loader)
    return cfg


def epochs(dataset, num_epochs=2):
    """Per epoch, the sample ids in iteration order."""
    iterator = dataset.create_tuple_iterator(num_epochs=num_epochs, output_numpy=True)
    return [[int(v) for batch in iterator for v in batch[0][:, 0]] for _ in range(num_epochs)]


def test_batches_are_int32_and_registered_build_works(data_dir):
    dataset = build_dataset({'type': 'CausalLanguageModelDataset',
                             'dataset_config': config(data_dir, batch_size=4)})
    assert dataset.get_dataset_size() == N // 4
    batch = next(dataset.create_tuple_iterator(num_epochs=1, output_numpy=True))
    assert len(batch) == 1 and batch[0].shape == (4, SEQ + 1) and batch[0].dtype == np.int32
    assert get_dataset_columns_and_lengths(dataset) == {'input_ids': SEQ + 1}


def test_int64_records_are_cast_to_int32(tmp_path):
    writer = FileWriter(str(tmp_path / 'wide.mindrecord'))
    writer.add_schema({'input_ids': {'type': 'int64', 'shape': [-1]}}, 'int64 samples')
    writer.write_raw_data([{'input_ids': np.arange(SEQ + 1, dtype=np.int64) + i} for i in range(4)])
    writer.commit()
    dataset = CausalLanguageModelDataset(config(str(tmp_path), batch_size=2))
    batch = next(dataset.create_tuple_iterator(num_epochs=1, output_numpy=True))[0]
    assert batch.dtype == np.int32 and batch.shape == (2, SEQ + 1)


def test_shuffle_is_a_pure_function_of_seed_and_epoch(data_dir):
    first = epochs(CausalLanguageModelDataset(config(data_dir, seed=7)), 3)
    again = epochs(CausalLanguageModelDataset(config(data_dir, seed=7)), 3)
    other = epochs(CausalLanguageModelDataset(config(data_dir, seed=8)), 3)
    assert first == again
    assert first != other and first[0] != other[0]
    assert all(sorted(e) == list(range(N)) for e in first + other)
    assert first[0] != first[1] != first[2]  # reshuffled every epoch
    # a run can start at any epoch: start_epoch=1 reproduces epochs 1 and 2, with repeats and shards too
    resumed = epochs(CausalLanguageModelDataset(config(data_dir, seed=7, start_epoch=1)), 2)
    assert resumed == first[1:]
    sharded = dict(seed=7, repeat=2, rank_id=1, device_num=2)
    full = epochs(CausalLanguageModelDataset(config(data_dir, **sharded)), 3)
    assert epochs(CausalLanguageModelDataset(config(data_dir, start_epoch=2, **sharded)), 1) == full[2:]
    unshuffled = epochs(CausalLanguageModelDataset(config(data_dir, data_loader={'shuffle': False})), 1)
    assert unshuffled == [list(range(N))]


def test_two_shards_partition_every_epoch(data_dir):
    shards = [epochs(CausalLanguageModelDataset(config(data_dir, rank_id=r, device_num=2, batch_size=2)), 2)
              for r in (0, 1)]
    for epoch in range(2):
        a, b = shards[0][epoch], shards[1][epoch]
        assert len(a) == len(b) == N // 2
        assert not set(a) & set(b) and sorted(a + b) == list(range(N))
    assert shards[0][0] != shards[0][1]


def test_drop_remainder_and_repeat(data_dir):
    kept = CausalLanguageModelDataset(config(data_dir, batch_size=6, drop_remainder=False))
    sizes = [b[0].shape[0] for b in kept.create_tuple_iterator(num_epochs=1, output_numpy=True)]
    assert sizes == [6, 6, 6, 2]
    dropped = CausalLanguageModelDataset(config(data_dir, batch_size=6, drop_remainder=True))
    assert dropped.get_dataset_size() == 3
    repeated = CausalLanguageModelDataset(config(data_dir, batch_size=6, repeat=2))
    assert repeated.get_dataset_size() == 6
    ids = [int(v) for b in repeated.create_tuple_iterator(num_epochs=1, output_numpy=True) for v in b[0][:, 0]]
    assert len(ids) == 36 and len(set(ids[:18])) == 18


def test_single_file_and_dataset_files(data_dir):
    path = os.path.join(data_dir, 'train.mindrecord')
    for loader in ({'dataset_dir': path}, {'dataset_dir': None, 'dataset_files': [path]}):
        dataset = CausalLanguageModelDataset(config(data_dir, data_loader=loader, batch_size=5))
        assert dataset.get_dataset_size() == 4


def test_text_corpus_loader_trains_from_raw_text(tmp_path):
    text = open(CORPUS, encoding='utf-8').read(6000)
    (tmp_path / 'corpus.txt').write_text(text, encoding='utf-8')
    expected, _ = build_lm_samples([text], TOKENIZER, 31)
    # `dataset_dir: ''` is what a YAML inheriting the MindDataset loader of run_gpt2.yaml carries along
    loader = {'type': 'TextCorpusDataset', 'files': [str(tmp_path / 'corpus.txt')], 'tokenizer': TOKENIZER,
              'shuffle': False, 'dataset_dir': ''}
    parts = {}
    for split in ('train', 'eval'):
        dataset = CausalLanguageModelDataset({'data_loader': dict(loader, split=split), 'batch_size': 1,
                                              'drop_remainder': False, 'seq_length': 31})
        parts[split] = np.concatenate([b[0] for b in dataset.create_tuple_iterator(num_epochs=1, output_numpy=True)])
    assert len(parts['eval']) == round(len(expected) * 0.1)
    np.testing.assert_array_equal(np.concatenate([parts['train'], parts['eval']]), expected)

    limited = CausalLanguageModelDataset({'data_loader': dict(loader, split='train', max_samples=8, shuffle=True),
                                          'batch_size': 4, 'seq_length': 31, 'seed': 3, 'rank_id': 1,
                                          'device_num': 2})
    assert limited.get_dataset_size() == 1
    direct = TextCorpusDataset(files=str(tmp_path / 'corpus.txt'), tokenizer=TOKENIZER, seq_length=31)
    assert direct.get_dataset_size() == len(expected)
    again = TextCorpusDataset(files=str(tmp_path / 'corpus.txt'), tokenizer=TOKENIZER, seq_length=31)
    assert again.dataset_files == direct.dataset_files  # the same request reuses its tokenized file
    other = TextCorpusDataset(files=str(tmp_path / 'corpus.txt'), tokenizer=TOKENIZER, seq_length=15)
    assert other.dataset_files != direct.dataset_files


def test_check_dataset_columns_on_a_user_dataset():
    user = ds.NumpySlicesDataset({'input_ids': np.zeros((4, 17), np.int32)}, shuffle=False).batch(2)
    assert check_dataset_columns(user, ['input_ids'], seq_length=16) == {'input_ids': 17}
    with pytest.raises(ValueError, match=r"seq_length 32 needs seq_length \+ 1 = 33"):
        check_dataset_columns(user, ['input_ids'], seq_length=32, where='train_dataset')


def write_columns(path, columns):
    writer = FileWriter(str(path))
    writer.add_schema({c: {'type': 'int32', 'shape': [SEQ + 1]} for c in columns}, 'other columns')
    writer.write_raw_data([{c: np.zeros(SEQ + 1, np.int32) for c in columns}])
    writer.commit()


@pytest.mark.parametrize('case, needle', [
    ('missing_dir', 'data_loader.dataset_dir: not found: {root}/nope'),
    ('empty_dir', 'directory {root}/empty is empty'),
    ('no_mindrecord', 'no MindRecord files (*.mindrecord) in {root}/texts (found: a.txt)'),
    ('unset_dir', 'data_loader.dataset_dir is empty'),
    ('no_index', 'has no index file lonely.mindrecord.db'),
    ('wrong_columns', "expected column(s) ['input_ids'], found ['mask', 'text_ids']"),
    ('seq_length', "holds 9 tokens per sample, but the model's seq_length 16 needs seq_length + 1 = 17"),
    ('unknown_key', "unknown dataset_config key 'batchsize'; did you mean 'batch_size'?"),
    ('bad_rank', 'rank_id 2 must lie in [0, device_num=2)'),
    ('zero_batch', 'dataset_config.batch_size must be an integer >= 1, got 0'),
    ('too_small', '20 sample(s) for this shard, fewer than batch_size 32'),
    ('no_type', "data_loader needs a 'type'"),
    ('bad_loader', "unknown dataset_loader type 'MindDataSet'"),
    # MindRecord files that are not whole: named, never read as they are
    ('truncated', '{root}/cut/train.mindrecord is truncated ('),
    ('truncated_header', '{root}/cut/train.mindrecord is not a MindRecord data file, or its header is truncated'),
    ('foreign_index', 'index {root}/mixed/train.mindrecord.db does not belong to train.mindrecord (5 rows indexed, '
                      '20 in the file)'),
    ('damaged_index', 'index {root}/mixed/train.mindrecord.db is damaged'),
    ('two_outputs', '{root}/mixed holds two different outputs named train.mindrecord: train.mindrecord and '
                    'train.mindrecord0..train.mindrecord1 (2 files)'),
    ('stale_shard', '{root}/mixed holds files of two different writes of train.mindrecord: '
                    'train.mindrecord0..train.mindrecord2 (3 files) and train.mindrecord0..train.mindrecord1 (2 files)'),
    ('missing_shard', '{root}/mixed/train.mindrecord0 is one of the files train.mindrecord0..train.mindrecord2 '
                      '(3 files) written together, but train.mindrecord1 is missing'),
])
def test_clear_errors(tmp_path, data_dir, case, needle):
    root = tmp_path
    (root / 'empty').mkdir()
    (root / 'texts').mkdir()
    (root / 'texts' / 'a.txt').write_text('hi')
    cfg = config(data_dir)
    if case == 'missing_dir':
        cfg = config(str(root / 'nope'))
    elif case == 'empty_dir':
        cfg = config(str(root / 'empty'))
    elif case == 'no_mindrecord':
        cfg = config(str(root / 'texts'))
    elif case == 'unset_dir':
        cfg = config('')
    elif case == 'no_index':
        (root / 'lonely').mkdir()
        (root / 'lonely' / 'lonely.mindrecord').write_bytes(b'')
        cfg = config(str(root / 'lonely'))
    elif case == 'wrong_columns':
        write_columns(root / 'cols.mindrecord', ['text_ids', 'mask'])
        cfg = config(str(root / 'cols.mindrecord'))
    elif case == 'seq_length':
        cfg = config(data_dir, seq_length=16)
    elif case == 'unknown_key':
        cfg = config(data_dir, batchsize=2)
    elif case == 'bad_rank':
        cfg = config(data_dir, rank_id=2, device_num=2)
    elif case == 'zero_batch':
        cfg = config(data_dir, batch_size=0)
    elif case == 'too_small':
        cfg = config(data_dir, batch_size=32)
    elif case == 'no_type':
        cfg['data_loader'].pop('type')
    elif case == 'bad_loader':
        cfg = config(data_dir, data_loader={'type': 'MindDataSet'})
    elif case.startswith('truncated'):
        write_mindrecord(str(root / 'cut' / 'train.mindrecord'), [SAMPLES], SEQ)
        path = root / 'cut' / 'train.mindrecord'
        os.truncate(path, 100 if case == 'truncated_header' else os.path.getsize(path) - 10)
        cfg = config(str(root / 'cut'))
    elif case.endswith('index'):  # an index of another write (or none at all) beside the data
        write_mindrecord(str(root / 'mixed' / 'train.mindrecord'), [SAMPLES], SEQ)
        write_mindrecord(str(root / 'other' / 'train.mindrecord'), [SAMPLES[:5]], SEQ)
        os.replace(root / 'other' / 'train.mindrecord.db', root / 'mixed' / 'train.mindrecord.db')
        if case == 'damaged_index':
            (root / 'mixed' / 'train.mindrecord.db').write_bytes(b'not sqlite' * 100)
        cfg = config(str(root / 'mixed'))
    elif case in ('two_outputs', 'stale_shard', 'missing_shard'):  # sets of one output name mixed up
        (root / 'mixed').mkdir()
        splits = {'two_outputs': (1, 2), 'stale_shard': (3, 2), 'missing_shard': (3,)}[case]
        for index, num_splits in enumerate(splits):
            write_mindrecord(str(root / f'w{index}' / 'train.mindrecord'), [SAMPLES], SEQ, num_splits=num_splits)
            for name in os.listdir(root / f'w{index}'):
                os.replace(root / f'w{index}' / name, root / 'mixed' / name)
        if case == 'missing_shard':
            os.remove(root / 'mixed' / 'train.mindrecord1')
        cfg = config(str(root / 'mixed'))
    with pytest.raises(ValueError) as info:
        CausalLanguageModelDataset(cfg)
    assert needle.format(root=root) in str(info.value)


def iterate(dataset):
    for _ in dataset.create_tuple_iterator(num_epochs=1, output_numpy=True):
        pass


def test_token_ids_are_checked_against_the_vocabulary_as_rows_are_read(tmp_path):
    rows = SAMPLES.copy()
    rows[13, 4] = 700  # >= vocab_size 512
    rows[17, 2] = -3
    write_mindrecord(str(tmp_path / 'bad' / 'train.mindrecord'), [rows], SEQ)
    write_mindrecord(str(tmp_path / 'good' / 'train.mindrecord'), [SAMPLES], SEQ)
    bad = str(tmp_path / 'bad')
    with pytest.raises(DataError) as info:
        iterate(CausalLanguageModelDataset(config(bad, vocab_size=512, batch_size=4)))
    assert (f"{bad}/train.mindrecord row 13: column 'input_ids' holds the token id 700, outside the model's "
            f"vocab_size 512; token ids must lie in [0, vocab_size)") in str(info.value)
    with pytest.raises(DataError, match=f"{bad}/train.mindrecord row 17: column 'input_ids' holds the negative "
                                        f"token id -3"):  # without a vocab_size, negative ids are still refused
        iterate(CausalLanguageModelDataset(config(bad, batch_size=4)))
    iterate(CausalLanguageModelDataset(config(str(tmp_path / 'good'), vocab_size=N, batch_size=4)))  # ids 0..N-1


def test_labels_may_hold_minus_100_but_no_other_negative_id(tmp_path):
    ids = np.tile(np.arange(SEQ + 1, dtype=np.int32), (8, 1))
    labels = np.where(np.arange(SEQ + 1) < 4, -100, ids).astype(np.int32)
    write_sft_mindrecord(str(tmp_path / 'ok' / 'sft.mindrecord'), [{'input_ids': ids, 'labels': labels}], SEQ)
    cfg = config(str(tmp_path / 'ok'), vocab_size=SEQ + 1, batch_size=2, input_columns=['input_ids', 'labels'])
    batches = list(build_dataset({'type': 'InstructionDataset', 'dataset_config': cfg}).create_dict_iterator(
        num_epochs=1, output_numpy=True))
    assert len(batches) == 4 and (batches[0]['labels'][:, :4] == -100).all()
    labels[6, 5] = -1
    write_sft_mindrecord(str(tmp_path / 'bad' / 'sft.mindrecord'), [{'input_ids': ids, 'labels': labels}], SEQ)
    with pytest.raises(DataError, match=r"sft.mindrecord row 6: column 'labels' holds the negative token id -1"):
        iterate(build_dataset({'type': 'InstructionDataset',
                               'dataset_config': dict(cfg, data_loader={'type': 'MindDataset',
                                                                        'dataset_dir': str(tmp_path / 'bad')})}))


def test_rows_of_different_lengths_are_named_by_file_and_row(tmp_path):
    writer = FileWriter(str(tmp_path / 'ragged.mindrecord'))
    writer.add_schema({'input_ids': {'type': 'int32', 'shape': [-1]}}, 'rows of any length')
    writer.write_raw_data([{'input_ids': np.arange(SEQ + 1 - 2 * (i == 5), dtype=np.int32)} for i in range(12)])
    writer.commit()
    with pytest.raises(DataError) as info:
        iterate(CausalLanguageModelDataset(config(str(tmp_path), batch_size=4, data_loader={'shuffle': False})))
    assert (f"{tmp_path}/ragged.mindrecord row 5: column 'input_ids' holds 7 values, the other rows 9; every sample "
            f"must hold seq_length + 1 tokens") in str(info.value)


def test_trainer_gives_the_dataset_the_models_vocab_size(tmp_path):
    from mindformers import MindFormerConfig, Trainer
    rows = np.tile(np.arange(129, dtype=np.int32), (8, 1))  # run_gpt2_tiny: seq_length 128, vocab_size 512
    rows[1:, 100] = 600  # every batch of 2 holds a bad row: the first step fails before anything compiles
    write_mindrecord(str(tmp_path / 'data' / 'train.mindrecord'), [rows], 128)
    cfg = MindFormerConfig(os.path.join(REPO, 'configs', 'gpt2', 'run_gpt2_tiny.yaml'))
    cfg.merge_from_dict({'output_dir': str(tmp_path / 'out'), 'runner_config.batch_size': 2, 'callbacks': [],
                         'model.model_config.num_layers': 1, 'model.model_config.hidden_size': 32})
    cfg['train_dataset']['data_loader'] = {'type': 'MindDataset', 'dataset_dir': str(tmp_path / 'data')}
    with pytest.raises(DataError, match=f"{tmp_path}/data/train.mindrecord row 1: column 'input_ids' holds the token "
                                        f"id 600, outside the model's vocab_size 512"):
        Trainer(args=cfg).train()
