"""`convert_weight.py` as users run it: a subprocess from the repo root."""
import json
import os

import numpy as np
import pytest
import torch
import transformers
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

from helpers.cli import error_line, json_result, run as run_tool

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HF_CONFIG = dict(vocab_size=64, n_embd=32, n_layer=2, n_head=2, n_positions=16, n_inner=96)


def run(*args):
    return run_tool('convert_weight.py', *args, timeout=120)


def hf_tensors(path):
    return load_file(os.path.join(path, 'model.safetensors') if os.path.isdir(path) else path)


@pytest.fixture(scope='module')
def hf_dir(tmp_path_factory):
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(**HF_CONFIG))
    directory = tmp_path_factory.mktemp('hf')
    model.save_pretrained(directory)
    return directory


@pytest.fixture(scope='module')
def ckpt(hf_dir, tmp_path_factory):
    path = tmp_path_factory.mktemp('ms') / 'gpt2.ckpt'
    result = run('--model', 'gpt2', '--input_path', hf_dir, '--output_path', path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f'{path}\ngpt2 HuggingFace -> mindformers: 28 tensors, ')  # for people
    summary = json_result(result.stdout)  # for scripts
    assert summary == {'model': 'gpt2', 'reversed': False, 'output_path': str(path), 'tensors': 28,
                       'parameters': summary['parameters'], 'dtype': None}
    assert summary['parameters'] == sum(value.size for value in hf_tensors(hf_dir).values())
    return path


def test_round_trip_gives_identical_tensors(hf_dir, ckpt, tmp_path):
    out = tmp_path / 'back'
    result = run('--model', 'gpt2', '--reversed', '--input_path', ckpt, '--output_path', out,
                 '--config', hf_dir / 'config.json')
    assert result.returncode == 0, result.stderr
    assert json_result(result.stdout)['output_path'] == str(out)
    original, back = hf_tensors(hf_dir), hf_tensors(out)
    assert set(back) == set(original) - {'lm_head.weight'}
    for name, value in back.items():
        np.testing.assert_array_equal(value, original[name], err_msg=name)
    with open(out / 'config.json', encoding='utf-8') as f:
        config = json.load(f)
    assert config['model_type'] == 'gpt2' and config['architectures'] == ['GPT2LMHeadModel']
    assert {key: config[key] for key in HF_CONFIG} == HF_CONFIG
    assert not [name for name in os.listdir(tmp_path) if name != 'back']  # no temporary directory left behind


def test_reverse_to_safetensors_file_and_guessed_heads(ckpt, tmp_path):
    out = tmp_path / 'gpt2.safetensors'
    result = run('--model', 'gpt2', '--reversed', '--input_path', ckpt, '--output_path', out, '--dtype', 'bf16')
    assert result.returncode == 0, result.stderr
    with safe_open(str(out), framework='pt') as f:
        assert {f.get_tensor(name).dtype for name in f.keys()} == {torch.bfloat16}
    # without a config the head count is a guess, and said so
    result = run('--model', 'gpt2', '--reversed', '--input_path', ckpt, '--output_path', tmp_path / 'dir')
    assert result.returncode == 0, result.stderr
    assert 'num_heads is not stored in the weights' in result.stderr
    with open(tmp_path / 'dir' / 'config.json', encoding='utf-8') as f:
        assert json.load(f)['n_head'] == 1


def test_fp16_output(hf_dir, tmp_path):
    import mindspore as ms
    out = tmp_path / 'gpt2_fp16.ckpt'
    result = run('--model', 'gpt2', '--input_path', hf_dir / 'model.safetensors', '--output_path', out,
                 '--dtype', 'fp16')
    assert result.returncode == 0, result.stderr
    assert json_result(result.stdout)['dtype'] == 'fp16'
    params = ms.load_checkpoint(str(out))
    assert len(params) == 28 and {p.dtype for p in params.values()} == {ms.float16}
    expected = hf_tensors(hf_dir)['transformer.h.0.attn.c_attn.weight'].T.astype(np.float16)
    np.testing.assert_array_equal(params['backbone.layers.0.attention.qkv_proj.weight'].asnumpy(), expected)


def _write_hf(directory, tensors, hf_dir):
    os.makedirs(directory)
    save_file(tensors, str(directory / 'model.safetensors'), metadata={'format': 'pt'})
    with open(hf_dir / 'config.json', encoding='utf-8') as src, open(directory / 'config.json', 'w') as dst:
        dst.write(src.read())


@pytest.mark.parametrize('change, named', [
    ('missing', 'missing transformer.h.1.ln_2.bias'),
    ('unexpected', 'unexpected transformer.h.0.attn.rotary.weight'),
    ('shape', 'wrong shape transformer.wpe.weight (8, 32) (expected (16, 32))'),
])
def test_bad_weights_exit_1_naming_the_tensor(hf_dir, tmp_path, change, named):
    tensors = hf_tensors(hf_dir)
    if change == 'missing':
        del tensors['transformer.h.1.ln_2.bias']
    elif change == 'unexpected':
        tensors['transformer.h.0.attn.rotary.weight'] = np.ones(4, np.float32)
    else:
        tensors['transformer.wpe.weight'] = tensors['transformer.wpe.weight'][:8].copy()
    _write_hf(tmp_path / 'bad', tensors, hf_dir)
    out = tmp_path / 'out' / 'gpt2.ckpt'
    line = error_line(run('--model', 'gpt2', '--input_path', tmp_path / 'bad', '--output_path', out), code=1)
    assert named in line
    assert not os.path.exists(tmp_path / 'out') or not os.listdir(tmp_path / 'out')


def test_reverse_of_incomplete_checkpoint_exits_1(ckpt, hf_dir, tmp_path):
    import mindspore as ms
    params = ms.load_checkpoint(str(ckpt))
    del params['backbone.layers.0.mlp.fc_in.bias']
    ms.save_checkpoint([{'name': n, 'data': p} for n, p in params.items()], str(tmp_path / 'partial.ckpt'))
    line = error_line(run('--model', 'gpt2', '--reversed', '--input_path', tmp_path / 'partial.ckpt',
                          '--output_path', tmp_path / 'hf_out', '--config', hf_dir / 'config.json'), code=1)
    assert 'missing backbone.layers.0.mlp.fc_in.bias' in line
    assert not os.path.exists(tmp_path / 'hf_out')
    assert sorted(os.listdir(tmp_path)) == ['partial.ckpt']


def test_usage_errors_exit_2_with_one_line(hf_dir, ckpt, tmp_path):
    line = error_line(run('--model', 'gpt3', '--input_path', hf_dir, '--output_path', tmp_path / 'x.ckpt'))
    assert "unknown --model 'gpt3'" in line and 'gpt2' in line
    line = error_line(run('--model', 'gpt2', '--input_path', tmp_path / 'nowhere', '--output_path',
                          tmp_path / 'x.ckpt'))
    assert 'nowhere' in line and 'does not exist' in line
    line = error_line(run('--model', 'gpt2', '--input_path', hf_dir, '--output_path', tmp_path / 'x.ckpt',
                          '--dtype', 'fp8'))
    assert '--dtype' in line
    (tmp_path / 'full').mkdir()
    (tmp_path / 'full' / 'keep.txt').write_text('mine')
    line = error_line(run('--model', 'gpt2', '--reversed', '--input_path', ckpt, '--output_path',
                          tmp_path / 'full'))
    assert f"--output_path {tmp_path / 'full'} already exists; pass --overwrite to replace it" in line
    assert os.listdir(tmp_path / 'full') == ['keep.txt']
    assert sorted(os.listdir(tmp_path)) == ['full']
    (tmp_path / 'a_file').write_text('mine')
    line = error_line(run('--model', 'gpt2', '--input_path', hf_dir, '--output_path', tmp_path / 'a_file' / 'x.ckpt'))
    assert line == f"convert_weight.py: error: --output_path {tmp_path / 'a_file' / 'x.ckpt'}: {tmp_path / 'a_file'} " \
                   f"is a file, not a directory"
    line = error_line(run('--model', 'gpt2', '--input_path', hf_dir, '--output_path', tmp_path / 'full'))
    assert f"--output_path {tmp_path / 'full'} is a directory; give a file path" in line
    line = error_line(run('--model', 'gpt2', '--input_path', hf_dir, '--output_path', tmp_path / 'x.ckpt',
                          '--config', tmp_path / 'no_config.json'))
    assert 'no_config.json is not a file' in line
    assert sorted(os.listdir(tmp_path)) == ['a_file', 'full']


def _truncate(path):
    data = open(path, 'rb').read()
    with open(path, 'wb') as f:
        f.write(data[:len(data) // 2])


def test_truncated_safetensors_are_named_and_exit_1(hf_dir, ckpt, tmp_path):
    (tmp_path / 'hf').mkdir()
    for name in ('config.json', 'model.safetensors'):
        (tmp_path / 'hf' / name).write_bytes((hf_dir / name).read_bytes())
    _truncate(tmp_path / 'hf' / 'model.safetensors')
    line = error_line(run('--model', 'gpt2', '--input_path', tmp_path / 'hf', '--output_path', tmp_path / 'o.ckpt'),
                      code=1)
    assert f"HF weight file {tmp_path / 'hf' / 'model.safetensors'} is truncated or corrupt" in line
    ours = tmp_path / 'ours.safetensors'
    assert run('--model', 'gpt2', '--input_path', hf_dir, '--output_path', ours).returncode == 0
    _truncate(ours)
    line = error_line(run('--model', 'gpt2', '--reversed', '--input_path', ours, '--output_path', tmp_path / 'back',
                          '--config', hf_dir / 'config.json'), code=1)
    assert f"checkpoint {ours} is truncated or corrupt" in line
    assert sorted(os.listdir(tmp_path)) == ['hf', 'ours.safetensors']
    # the same files through the Python loaders
    from mindformers import AutoModel
    from mindformers.tools.checkpoint import CheckpointError, load_checkpoint_file
    with pytest.raises(CheckpointError, match=f"checkpoint {ours} is truncated or corrupt"):
        load_checkpoint_file(str(ours))
    with pytest.raises(ValueError, match=f"HF weight file {tmp_path / 'hf' / 'model.safetensors'} is truncated"):
        AutoModel.from_pretrained(tmp_path / 'hf')


def test_existing_output_needs_overwrite_and_is_replaced_whole(hf_dir, ckpt, tmp_path):
    out = tmp_path / 'gpt2.ckpt'
    out.write_bytes(b'old model')
    os.chmod(out, 0o444)
    line = error_line(run('--model', 'gpt2', '--input_path', hf_dir, '--output_path', out))
    assert line == f"convert_weight.py: error: --output_path {out} already exists; pass --overwrite to replace it"
    assert out.read_bytes() == b'old model'
    result = run('--model', 'gpt2', '--input_path', hf_dir, '--output_path', out, '--overwrite')
    assert result.returncode == 0, result.stderr
    assert out.read_bytes() == ckpt.read_bytes()
    (tmp_path / 'hf_out').mkdir()
    (tmp_path / 'hf_out' / 'stale.bin').write_bytes(b'old')
    result = run('--model', 'gpt2', '--reversed', '--input_path', ckpt, '--output_path', tmp_path / 'hf_out',
                 '--config', hf_dir / 'config.json', '--overwrite')
    assert result.returncode == 0, result.stderr
    assert sorted(os.listdir(tmp_path / 'hf_out')) == ['config.json', 'model.safetensors']
    # a failed --overwrite leaves the old output as it was, and nothing beside it
    bad = tmp_path / 'bad.ckpt'
    bad.write_bytes(b'\x00garbage' * 10)
    line = error_line(run('--model', 'gpt2', '--reversed', '--input_path', bad, '--output_path', tmp_path / 'hf_out',
                          '--config', hf_dir / 'config.json', '--overwrite'), code=1)
    assert 'bad.ckpt is truncated or corrupt' in line
    assert sorted(os.listdir(tmp_path / 'hf_out')) == ['config.json', 'model.safetensors']
    assert sorted(os.listdir(tmp_path)) == ['bad.ckpt', 'gpt2.ckpt', 'hf_out']


def test_config_from_run_yaml_sets_heads():
    from mindformers.models.gpt2.convert_gpt2 import ConversionError, load_config
    config = load_config(os.path.join(REPO, 'configs', 'gpt2', 'run_gpt2_tiny.yaml'))
    assert (config.num_heads, config.hidden_size) == (4, 192)  # heads that no weight shape reveals
    with pytest.raises(ConversionError, match='README.md is not valid JSON'):
        load_config(os.path.join(REPO, 'README.md'))
