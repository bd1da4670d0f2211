"""run_mindformer.py: flags, overrides, and one clear line plus a non-zero exit for bad input."""
import json
import os
import signal
import subprocess
import sys

import pytest

from helpers.cli import json_result, run, run_ok

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, 'configs', 'gpt2', 'run_gpt2_tiny.yaml')


def run_cli(*args, cwd=REPO, timeout=600):
    proc = run('run_mindformer.py', *args, cwd=cwd, timeout=timeout)
    return proc.returncode, proc.stdout, proc.stderr


def error_lines(stderr):
    return [line for line in stderr.splitlines() if 'error' in line.lower() and '[WARNING]' not in line]


@pytest.mark.parametrize('args, needle', [
    (['--config', TINY, '--no_such_flag', '1'], "unrecognized argument '--no_such_flag'"),
    (['--config', TINY, '--run_mode', 'dance'], "invalid choice: 'dance'"),
    (['--config', TINY, '--epochs', '0'], '--epochs must be >= 1'),
    (['--config', TINY, '--epochs', 'two'], "invalid int value: 'two'"),
    (['--config', TINY, '--use_parallel', 'maybe'], 'expected True or False'),
    (['--config', TINY, '--options', 'novalue'], 'expects KEY=VALUE'),
    (['--config', TINY, '--runner_config.epochs'], 'needs a value'),
])
def test_bad_flags_exit_2_with_one_line(args, needle):
    code, _, stderr = run_cli(*args)
    assert code == 2
    lines = error_lines(stderr)
    assert len(lines) == 1 and needle in lines[0], stderr


def test_override_of_missing_section_names_the_key(tmp_path):
    code, _, stderr = run_cli('--config', TINY, '--runer_config.epochs', '2', '--output_dir', str(tmp_path))
    assert code == 2
    assert "no section 'runer_config'" in stderr and "did you mean 'runner_config'" in stderr


def test_unknown_config_lists_known_names(tmp_path):
    code, _, stderr = run_cli('--config', 'gpt3_tiny', '--output_dir', str(tmp_path))
    assert code == 2
    assert 'gpt2_tiny' in stderr


def test_yaml_syntax_error_names_file_and_line(tmp_path):
    bad = tmp_path / 'bad.yaml'
    bad.write_text('model:\n  model_config: {type: GPT2Config\nrunner_config: {}\n')
    code, _, stderr = run_cli('--config', str(bad))
    assert code == 1  # the file is wrong, not the command line
    assert f'{bad}:' in stderr and 'YAML syntax error' in stderr


def test_missing_dataset_dir_is_one_clear_error(tmp_path):
    missing = tmp_path / 'nope'
    code, _, stderr = run_cli('--config', TINY, '--train_dataset_dir', str(missing), '--output_dir',
                              str(tmp_path / 'out'))
    assert code == 2  # a path named on the command line
    lines = error_lines(stderr)
    assert len(lines) == 1 and str(missing) in lines[0], stderr


def test_missing_checkpoint_is_one_clear_error(tmp_path):
    code, _, stderr = run_cli('--config', TINY, '--run_mode', 'predict', '--predict_data', 'hi',
                              '--load_checkpoint', str(tmp_path / 'none.ckpt'), '--output_dir', str(tmp_path))
    assert code == 1
    assert 'none.ckpt' in stderr and 'not found' in stderr


def test_predict_data_that_is_not_utf8_exits_2_naming_the_prompt(tmp_path):
    proc = run('run_mindformer.py', '--config', TINY, '--run_mode', 'predict', '--predict_data', 'ROMEO:',
               b'caf\xe9', '--output_dir', tmp_path)
    assert proc.returncode == 2
    lines = error_lines(proc.stderr)
    assert len(lines) == 1 and "--predict_data prompt 1 'caf\\udce9' is not valid text: character 3 is the lone " \
                               "surrogate" in lines[0], proc.stderr


def test_finetune_without_checkpoint_says_how_to_fix(tmp_path):
    code, _, stderr = run_cli('--config', TINY, '--run_mode', 'finetune', '--output_dir', str(tmp_path))
    assert code == 1
    assert '--load_checkpoint' in stderr


def test_train_then_predict_end_to_end(tmp_path):
    """The README's embedded default, shortened: train, save, then continue a prompt from the checkpoint."""
    out = tmp_path / 'out'
    code, stdout, stderr = run_cli('--config', TINY, '--run_mode', 'train', '--epochs', '1', '--output_dir', str(out),
                                   '--train_dataset.data_loader.max_samples', '64', '--model.model_config.num_layers',
                                   '1')
    assert code == 0, stderr
    summary = json_result(stdout)
    assert summary['run_mode'] == 'train' and summary['steps'] == summary['total_steps'] > 0
    assert summary['final_loss'] < summary['first_loss'] and summary['loss_drop_percent'] > 0
    meta = json.loads((out / 'checkpoint' / 'rank_0' / 'meta.json').read_text())
    assert summary['last_checkpoint'] == str(out / 'checkpoint' / 'rank_0' / meta['last_ckpt_file'])
    # the same settings as the training run (as in the README): predict must not reuse the training run's
    # compiled graphs from the compile cache
    code, stdout, stderr = run_cli('--config', TINY, '--run_mode', 'predict', '--predict_data', 'ROMEO:',
                                   'JULIET:', 'To be', '--predict_batch_size', '2', '--load_checkpoint',
                                   str(out / 'checkpoint'), '--output_dir', str(out), '--epochs', '1',
                                   '--train_dataset.data_loader.max_samples', '64', '--model.model_config.num_layers',
                                   '1')
    assert code == 0, stderr
    texts = stdout.split('\n' + '-' * 40 + '\n')  # each result is followed by a rule; it may hold newlines
    assert len(texts) == 4 and texts[-1] == ''
    for text, prompt in zip(texts, ('ROMEO:', 'JULIET:', 'To be')):
        assert text.startswith(prompt) and len(text) > len(prompt)


def test_corrupt_checkpoint_is_named_and_left_alone(tmp_path):
    bad = tmp_path / 'broken.ckpt'
    bad.write_bytes(b'\x00garbage' * 100)
    code, _, stderr = run_cli('--config', TINY, '--run_mode', 'predict', '--predict_data', 'hi',
                              '--load_checkpoint', str(bad), '--output_dir', str(tmp_path / 'out'))
    assert code == 1
    lines = error_lines(stderr)
    assert len(lines) == 1 and 'broken.ckpt' in lines[0] and 'corrupt' in lines[0], stderr
    assert bad.read_bytes() == b'\x00garbage' * 100


def test_data_seq_length_mismatch_names_both_numbers(tmp_path):
    corpus = tmp_path / 'c.txt'
    corpus.write_text('To be, or not to be, that is the question. ' * 200)
    assets = os.path.join(REPO, 'mindformers', 'assets', 'gpt2_tiny')
    run_ok('mindformers.tools.dataset_preprocess.text_to_mindrecord', '--input', corpus, '--tokenizer',
           'GPT2Tokenizer', '--vocab_file', os.path.join(assets, 'vocab.json'), '--merges_file',
           os.path.join(assets, 'merges.txt'), '--seq_length', 32, '--output_file',
           tmp_path / 'data' / 'train.mindrecord')
    code, _, stderr = run_cli('--config', TINY, '--train_dataset_dir', str(tmp_path / 'data'), '--output_dir',
                              str(tmp_path / 'out'))
    assert code == 1
    lines = error_lines(stderr)
    assert len(lines) == 1 and '128' in lines[0] and '33' in lines[0], stderr


def test_resume_training_flag_continues_from_the_newest_checkpoint(tmp_path):
    common = ['--config', TINY, '--output_dir', str(tmp_path), '--train_dataset.data_loader.max_samples', '32',
              '--model.model_config.num_layers', '1', '--batch_size', '8']
    code, _, stderr = run_cli(*common, '--epochs', '1')
    assert code == 0, stderr
    code, stdout, stderr = run_cli(*common, '--epochs', '2', '--resume_training')
    assert code == 0, stderr
    assert 'resuming from' in stderr and 'gpt2_tiny_rank_0-1_4.ckpt' in stderr  # the log names the checkpoint
    summary = json_result(stdout)
    assert (summary['initial_step'], summary['steps'], summary['total_steps']) == (4, 4, 8)
    code, _, stderr = run_cli(*common, '--epochs', '2', '--resume_training', str(tmp_path / 'missing'))
    assert code == 1 and 'missing' in error_lines(stderr)[0]


def test_ctrl_c_during_training_exits_130_with_one_line(tmp_path):
    """Ctrl-C reaches the whole foreground process group as SIGINT; MindSpore's own handler would turn it into
    SIGTERM (status 143)."""
    proc = subprocess.Popen([sys.executable, os.path.join(REPO, 'run_mindformer.py'), '--config', TINY, '--run_mode',
                             'train', '--output_dir', str(tmp_path), '--model.model_config.num_layers', '1'],
                            cwd=REPO, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        for line in proc.stderr:
            if 'optimizer steps' in line:  # the loop starts: the first step compiles and runs graphs
                break
        os.killpg(proc.pid, signal.SIGINT)
        rest = proc.stderr.read()
        assert proc.wait(timeout=300) == 130, rest
    finally:
        if proc.poll() is None:
            proc.kill()
    assert 'run_mindformer.py: interrupted' in rest and 'training finished' not in rest
