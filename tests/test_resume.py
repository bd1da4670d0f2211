"""Exact resume: N steps, stop, resume == 2N steps in one go; multi-rank resume point; corrupt-checkpoint fallback."""
import json
import os

import numpy as np
import pytest
import mindspore as ms
import mindspore.dataset as ds

from helpers.training import StopAt
from mindformers import GPT2Config, GPT2LMHeadModel, MindFormerConfig, Trainer, TrainingArguments
from mindformers.tools.checkpoint import CheckpointError, record_checkpoint, save_checkpoint_atomic
from mindformers.trainer.resume import find_resume_checkpoint

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_YAML = os.path.join(REPO, 'configs', 'gpt2', 'run_gpt2_tiny.yaml')
SEQ, VOCAB = 16, 64


def shuffled_dataset():
    rng = np.random.default_rng(0)
    rows = rng.integers(2, VOCAB, size=(48, SEQ + 1)).astype(np.int32)
    return ds.NumpySlicesDataset({'input_ids': rows}, shuffle=True).batch(4, drop_remainder=True)


def user_dataset_run(tmp_path, stop=None, resume=None, epochs=2, accumulation=1):
    ms.set_seed(0)
    model = GPT2LMHeadModel(GPT2Config(seq_length=SEQ, vocab_size=VOCAB, hidden_size=32, num_layers=2, num_heads=2,
                                       hidden_dropout_rate=0.0, attention_dropout_rate=0.0,
                                       embedding_dropout_prob=0.0, eos_token_id=1, pad_token_id=0))
    args = TrainingArguments(output_dir=str(tmp_path), batch_size=4, num_train_epochs=epochs, learning_rate=5e-3,
                             warmup_steps=3, save_steps=5, save_total_limit=10, logging_steps=100,
                             gradient_accumulation_steps=accumulation)
    trainer = Trainer(task='text_generation', model=model, args=args, train_dataset=shuffled_dataset(),
                      callbacks=[StopAt(stop)] if stop else None)
    return trainer.train(resume_training=resume)


@pytest.fixture(scope='module')
def user_dataset_reference(tmp_path_factory):
    """The losses of `user_dataset_run` uninterrupted: one run serves every stop point."""
    return user_dataset_run(tmp_path_factory.mktemp('ref')).losses


@pytest.mark.parametrize('stop', [7, 12])  # mid-epoch, and exactly an epoch's end (12 steps per epoch)
def test_resume_reproduces_uninterrupted_run_with_a_user_dataset(tmp_path, user_dataset_reference, stop):
    reference = user_dataset_reference
    assert len(reference) == 24
    first = user_dataset_run(tmp_path / 'run', stop=stop).losses
    assert len(first) == stop
    np.testing.assert_allclose(first, reference[:stop], rtol=0, atol=1e-6)
    resumed = user_dataset_run(tmp_path / 'run', resume=True)
    assert resumed.initial_step == stop and len(resumed.losses) == 24 - stop
    np.testing.assert_allclose(resumed.losses, reference[stop:], rtol=0, atol=1e-6)


def yaml_config(tmp_path, epochs=2):
    config = MindFormerConfig(TINY_YAML)
    config.merge_from_dict({
        'output_dir': str(tmp_path), 'runner_config.epochs': epochs, 'runner_config.batch_size': 4,
        'model.model_config.num_layers': 1, 'model.model_config.hidden_size': 32, 'model.model_config.num_heads': 2,
        'model.model_config.seq_length': 32, 'train_dataset.data_loader.max_samples': 24,
        'lr_schedule.learning_rate': 5e-3,
        'callbacks': [{'type': 'MFLossMonitor', 'per_print_times': 100},
                      {'type': 'CheckpointMonitor', 'prefix': 'tiny', 'save_checkpoint_steps': 4,
                       'keep_checkpoint_max': 2}]})
    return config


@pytest.fixture(scope='module')
def yaml_reference(tmp_path_factory):
    """The losses of the `yaml_config` run uninterrupted (2 epochs of 6 steps)."""
    return Trainer(args=yaml_config(tmp_path_factory.mktemp('yaml_ref'))).train().losses


@pytest.mark.slow
def test_resume_with_gradient_accumulation_and_no_buffers_saved(tmp_path):
    """Accumulation buffers are zero at every step boundary, so checkpoints leave them out and resume still
    continues exactly (12 batches of 4 per epoch = 6 steps of 2 micro batches)."""
    reference = user_dataset_run(tmp_path / 'ref', accumulation=2).losses
    assert len(reference) == 12
    user_dataset_run(tmp_path / 'run', stop=5, accumulation=2)
    saved = ms.load_checkpoint(str(find_resume_checkpoint(tmp_path / 'run' / 'checkpoint').path))
    assert any(n.startswith('adam_m.') for n in saved)
    assert not any(n.startswith('accu_grads.') for n in saved)
    resumed = user_dataset_run(tmp_path / 'run', resume=True, accumulation=2)
    np.testing.assert_allclose(resumed.losses, reference[5:], rtol=0, atol=1e-6)


def test_resume_from_yaml_dataset_and_cli_style_path(tmp_path, yaml_reference):
    """The bundled-corpus loader starts at the resumed epoch and skips the batches already trained on."""
    reference = yaml_reference
    assert len(reference) == 12  # 6 batches of 4 per epoch, 2 epochs
    Trainer(args=yaml_config(tmp_path / 'run'), callbacks=[StopAt(9)]).train()
    meta = json.loads((tmp_path / 'run' / 'checkpoint' / 'rank_0' / 'meta.json').read_text())
    assert meta['global_step'] == 9 and len(meta['checkpoints']) == 2  # steps 8 and 9 kept
    # resume from an explicit file: the step-8 checkpoint
    step8 = os.path.join(tmp_path, 'run', 'checkpoint', 'rank_0', meta['checkpoints'][0]['file'])
    resumed = Trainer(args=yaml_config(tmp_path / 'run')).train(resume_training=step8)
    np.testing.assert_allclose(resumed.losses, reference[8:], rtol=0, atol=1e-6)


def test_resume_falls_back_when_newest_checkpoint_is_corrupt(tmp_path, yaml_reference, capsys):
    reference = yaml_reference
    Trainer(args=yaml_config(tmp_path / 'run'), callbacks=[StopAt(9)]).train()
    rank_dir = tmp_path / 'run' / 'checkpoint' / 'rank_0'
    newest = rank_dir / json.loads((rank_dir / 'meta.json').read_text())['last_ckpt_file']
    newest.write_bytes(newest.read_bytes()[:1000])  # truncated, e.g. by a full disk
    resumed = Trainer(args=yaml_config(tmp_path / 'run')).train(resume_training=True)
    assert f"{newest.name} is corrupt" in capsys.readouterr().err
    np.testing.assert_allclose(resumed.losses, reference[8:], rtol=0, atol=1e-6)


def test_resume_with_other_settings_is_refused(tmp_path):
    Trainer(args=yaml_config(tmp_path), callbacks=[StopAt(4)]).train()
    config = yaml_config(tmp_path)
    config.model.model_config.hidden_size = 64
    with pytest.raises(CheckpointError, match='does not fit this run'):
        Trainer(args=config).train(resume_training=True)
    with pytest.raises(CheckpointError, match='neither a checkpoint file nor a directory'):
        Trainer(args=yaml_config(tmp_path)).train(resume_training=str(tmp_path / 'nowhere'))
    finished = yaml_config(tmp_path, epochs=1)
    finished['overwrite_output_dir'] = True
    Trainer(args=finished).train()
    with pytest.raises(ValueError, match='raise runner_config.epochs'):
        Trainer(args=yaml_config(tmp_path, epochs=1)).train(resume_training=True)


def test_multi_rank_resume_takes_newest_step_complete_on_every_rank(tmp_path, capsys):
    weights = {'w': np.ones((2, 2), np.float32)}

    def save(rank, step):
        rank_dir = tmp_path / f'rank_{rank}'
        name = f'net_rank_{rank}-1_{step}.ckpt'
        save_checkpoint_atomic(weights, str(rank_dir / name))
        record_checkpoint(str(rank_dir), name, 1, step, step, keep_max=5)
        return rank_dir / name

    for step in (10, 20, 30):
        save(0, step)
    for step in (10, 20):
        save(1, step)  # rank 1 was killed before finishing step 30
    point = find_resume_checkpoint(str(tmp_path), rank_id=0, device_num=2)
    assert point.global_step == 20 and point.path.endswith('net_rank_0-1_20.ckpt')
    assert find_resume_checkpoint(str(tmp_path), rank_id=1, device_num=2).global_step == 20
    # rank 1's step-20 file is damaged: both ranks fall back to step 10 together
    damaged = tmp_path / 'rank_1' / 'net_rank_1-1_20.ckpt'
    damaged.write_bytes(b'x' + damaged.read_bytes()[1:])
    assert find_resume_checkpoint(str(tmp_path), rank_id=0, device_num=2).global_step == 10
    assert 'net_rank_1-1_20.ckpt is corrupt' in capsys.readouterr().err
    with pytest.raises(CheckpointError, match='rank_2'):
        find_resume_checkpoint(str(tmp_path), rank_id=2, device_num=3)
