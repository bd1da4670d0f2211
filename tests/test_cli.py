"""run_mindformer.py: flags, overrides, and one clear line plus a non-zero exit for bad input."""
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, 'configs', 'gpt2', 'run_gpt2_tiny.yaml')


def run_cli(*args, cwd=None, timeout=600):
    proc = subprocess.run([sys.executable, os.path.join(REPO, 'run_mindformer.py'), *args], cwd=cwd or REPO,
                          capture_output=True, text=True, timeout=timeout)
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
    assert "no key 'runer_config'" in stderr


def test_unknown_config_lists_known_names(tmp_path):
    code, _, stderr = run_cli('--config', 'gpt3_tiny', '--output_dir', str(tmp_path))
    assert code == 2
    assert 'gpt2_tiny' in stderr


def test_yaml_syntax_error_names_file_and_line(tmp_path):
    bad = tmp_path / 'bad.yaml'
    bad.write_text('model:\n  model_config: {type: GPT2Config\nrunner_config: {}\n')
    code, _, stderr = run_cli('--config', str(bad))
    assert code == 2
    assert f'{bad}:' in stderr and 'YAML syntax error' in stderr


def test_missing_dataset_dir_is_one_clear_error(tmp_path):
    missing = tmp_path / 'nope'
    code, _, stderr = run_cli('--config', TINY, '--train_dataset_dir', str(missing), '--output_dir',
                              str(tmp_path / 'out'))
    assert code == 1
    lines = error_lines(stderr)
    assert len(lines) == 1 and str(missing) in lines[0], stderr


def test_missing_checkpoint_is_one_clear_error(tmp_path):
    code, _, stderr = run_cli('--config', TINY, '--run_mode', 'predict', '--predict_data', 'hi',
                              '--load_checkpoint', str(tmp_path / 'none.ckpt'), '--output_dir', str(tmp_path))
    assert code == 1
    assert 'none.ckpt' in stderr and 'not found' in stderr


def test_finetune_without_checkpoint_says_how_to_fix(tmp_path):
    code, _, stderr = run_cli('--config', TINY, '--run_mode', 'finetune', '--output_dir', str(tmp_path))
    assert code == 1
    assert '--load_checkpoint' in stderr
