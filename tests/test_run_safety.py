"""Nothing lost, nothing silently wrong: output directories of earlier and concurrent runs, data the user named,
resume with changed settings, checkpoints of another model, a full disk while saving."""
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import mindspore as ms
import mindspore.dataset as ds

from mindformers import GPT2Config, GPT2LMHeadModel, MindFormerConfig, Trainer, TrainingArguments
from mindformers.tools.checkpoint import CheckpointError, load_checkpoint_file, load_into_network
from mindformers.trainer.run_dir import OutputDirError, RunLock

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_YAML = os.path.join(REPO, 'configs', 'gpt2', 'run_gpt2_tiny.yaml')
SEQ, VOCAB = 16, 64


def tiny_model(num_layers=2):
    ms.set_seed(0)
    return GPT2LMHeadModel(GPT2Config(seq_length=SEQ, vocab_size=VOCAB, hidden_size=32, num_layers=num_layers,
                                      num_heads=2, hidden_dropout_rate=0.0, attention_dropout_rate=0.0,
                                      embedding_dropout_prob=0.0, eos_token_id=1, pad_token_id=0))


def dataset(rows=32, batch=4):
    data = np.random.default_rng(0).integers(2, VOCAB, size=(rows, SEQ + 1)).astype(np.int32)
    return ds.NumpySlicesDataset({'input_ids': data}, shuffle=False).batch(batch, drop_remainder=True)


def train(out, model=None, batch=4, rows=32, epochs=1, resume_training=None, **kwargs):
    args = TrainingArguments(output_dir=str(out), batch_size=batch, num_train_epochs=epochs, learning_rate=1e-3,
                             save_steps=2, save_total_limit=2, logging_steps=100, **kwargs)
    trainer = Trainer(task='text_generation', model=model or tiny_model(), args=args,
                      train_dataset=dataset(rows, batch))
    return trainer.train(resume_training=resume_training)


def checkpoint_files(out):
    return sorted(f for f in os.listdir(out / 'checkpoint' / 'rank_0') if f.endswith('.ckpt'))


def test_second_run_into_the_same_output_dir_is_refused_and_loses_nothing(tmp_path):
    train(tmp_path)
    before = {f: (tmp_path / 'checkpoint' / 'rank_0' / f).read_bytes() for f in checkpoint_files(tmp_path)}
    metrics = (tmp_path / 'log' / 'rank_0' / 'metrics.jsonl').read_text()
    assert before
    with pytest.raises(OutputDirError, match='already holds an earlier run') as err:
        train(tmp_path)
    assert '--resume_training' in str(err.value) and '--overwrite_output_dir' in str(err.value)
    assert {f: (tmp_path / 'checkpoint' / 'rank_0' / f).read_bytes() for f in checkpoint_files(tmp_path)} == before
    assert (tmp_path / 'log' / 'rank_0' / 'metrics.jsonl').read_text() == metrics


def test_overwrite_output_dir_replaces_the_earlier_run_on_purpose(tmp_path):
    train(tmp_path, rows=48)  # 12 steps: checkpoints at steps 10 and 12 kept
    old = checkpoint_files(tmp_path)
    state = train(tmp_path, overwrite_output_dir=True)  # 8 steps
    new = checkpoint_files(tmp_path)
    assert new != old and all(name.endswith(('_6.ckpt', '_8.ckpt')) for name in new)
    steps = [json.loads(line)['step'] for line in (tmp_path / 'log' / 'rank_0' / 'metrics.jsonl').open()]
    assert steps == [8]  # only this run's (logging_steps=100: the last step is logged)
    meta = json.loads((tmp_path / 'checkpoint' / 'rank_0' / 'meta.json').read_text())
    assert [e['file'] for e in meta['checkpoints']] == new and state.cur_step_num == 8


def test_resume_and_overwrite_together_are_refused(tmp_path):
    with pytest.raises(ValueError, match='set only one of them'):
        train(tmp_path, overwrite_output_dir=True, resume_training=True)


def test_a_second_writer_of_one_output_dir_is_refused_while_the_first_runs(tmp_path):
    holder = subprocess.Popen([sys.executable, '-c', textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {REPO!r})
        from mindformers.trainer.run_dir import RunLock
        with RunLock({str(tmp_path)!r}, 0):
            print('locked', flush=True)
            time.sleep(60)
        """)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == 'locked'
        with pytest.raises(OutputDirError, match=rf'in use by another run \(pid {holder.pid} '):
            train(tmp_path)
        assert not (tmp_path / 'checkpoint').exists()
        with RunLock(tmp_path, 1):  # another rank of a job has its own lock
            pass
    finally:
        holder.kill()
        holder.wait()
    with RunLock(tmp_path, 0):  # released by the kernel when its holder died
        pass


def test_train_dataset_directory_given_to_the_api_is_the_data_trained_on(tmp_path):
    with pytest.raises(FileNotFoundError, match='train_dataset: .*nowhere does not exist'):
        Trainer(model='gpt2_tiny', train_dataset=str(tmp_path / 'nowhere'))
    data_dir = tmp_path / 'data'
    data_dir.mkdir()
    trainer = Trainer(model='gpt2_tiny', train_dataset=str(data_dir))
    assert dict(trainer.config.train_dataset.data_loader) == {'type': 'MindDataset', 'dataset_dir': str(data_dir),
                                                              'shuffle': True}


def test_resume_with_another_batch_size_is_refused(tmp_path):
    """Stopped at the end of the first epoch with batch 4 (8 steps): with batch 8 the same checkpoint would look
    like a mid-epoch one of a 4-step epoch, and half an epoch would be trained again."""
    train(tmp_path)
    with pytest.raises(CheckpointError, match=r'batch_size 4 \(now 8\)'):
        train(tmp_path, batch=8, epochs=2, resume_training=True)


def test_resume_into_a_model_with_fewer_layers_is_refused(tmp_path):
    train(tmp_path)
    with pytest.raises(CheckpointError, match=r'not in this run .*layers\.1\.'):
        args = TrainingArguments(output_dir=str(tmp_path), batch_size=4, num_train_epochs=2, learning_rate=1e-3)
        Trainer(model=tiny_model(num_layers=1), args=args, train_dataset=dataset()).train(resume_training=True)


def test_checkpoint_of_a_larger_model_is_refused_for_predict_and_finetune(tmp_path):
    train(tmp_path, model=tiny_model(num_layers=4))
    path = str(tmp_path / 'checkpoint' / 'rank_0' / checkpoint_files(tmp_path)[-1])
    small = tiny_model(num_layers=2)
    with pytest.raises(CheckpointError, match=r'parameter\(s\) the model does not have: .*layers\.2\.'):
        load_into_network(small, load_checkpoint_file(path), path)
    same = tiny_model(num_layers=4)  # the optimizer state beside the weights is not "extra"
    assert load_into_network(same, load_checkpoint_file(path), path) == []


def test_resume_before_anything_was_saved_says_how_to_start(tmp_path):
    with pytest.raises(CheckpointError, match='nothing has been saved yet.*without resume_training'):
        train(tmp_path, resume_training=True)


def test_yaml_without_optimizer_section_says_what_to_add(tmp_path):
    config = MindFormerConfig(TINY_YAML)
    del config['optimizer']
    config.merge_from_dict({'output_dir': str(tmp_path), 'model.model_config.num_layers': 1,
                            'train_dataset.data_loader.max_samples': 8})
    with pytest.raises(ValueError, match="no 'optimizer' section"):
        Trainer(args=config).train()


def test_disk_full_while_saving_leaves_no_partial_file(tmp_path):
    """RLIMIT_FSIZE makes writes past 200 kB fail (EFBIG), as a full disk would."""
    script = textwrap.dedent(f"""
        import os, resource, signal, sys
        import numpy as np
        sys.path.insert(0, {REPO!r})
        from mindformers.tools.checkpoint import CheckpointError, save_checkpoint_atomic
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))
        try:
            save_checkpoint_atomic({{'w': np.ones((1000, 1000), np.float32)}}, {str(tmp_path / 'a.ckpt')!r})
        except CheckpointError as err:
            print('ERROR', err)
        """)
    proc = subprocess.run([sys.executable, '-c', script], capture_output=True, text=True, timeout=300)
    assert 'ERROR could not write checkpoint' in proc.stdout and 'a.ckpt' in proc.stdout, proc.stderr
    assert os.listdir(tmp_path) == []


def test_checkpoint_directories_of_config_and_given_callbacks_are_checked(tmp_path):
    from mindformers.core.callback import CheckpointMonitor
    from mindformers.trainer.run_dir import checkpoint_dirs, refuse_earlier_run
    config = MindFormerConfig({'output_dir': str(tmp_path), 'callbacks': [
        {'type': 'MFLossMonitor'}, {'type': 'CheckpointMonitor', 'directory': str(tmp_path / 'yaml_ckpt')}]})
    dirs = checkpoint_dirs(config, [CheckpointMonitor(directory=str(tmp_path / 'api_ckpt'))], rank_id=1)
    assert dirs == [str(tmp_path / 'api_ckpt' / 'rank_1'), str(tmp_path / 'yaml_ckpt' / 'rank_1')]
    refuse_earlier_run(str(tmp_path), 1, dirs)  # nothing there yet
    (tmp_path / 'api_ckpt' / 'rank_1').mkdir(parents=True)
    (tmp_path / 'api_ckpt' / 'rank_1' / 'x_rank_1-1_4.ckpt').write_bytes(b'')
    with pytest.raises(OutputDirError, match=r'1 checkpoint\(s\) in .*api_ckpt/rank_1'):
        refuse_earlier_run(str(tmp_path), 1, dirs)
