"""The compile cache of training (`mindformers.core.context.compile_cache`): keyed by everything that shapes the
training graph, so that a model of another size in a new process is a miss (MindSpore loaded the other model's graph
and crashed with SIGSEGV) and a warm run computes what a cold one does; used only where MindSpore can use it (not for
`python -c` or `python - < file`, where its dependency scan raised FileNotFoundError), by one process at a time, and
never from a directory left by a run that died before its first step completed. No run prints MindSpore's
deprecation warnings for the context settings."""
import fcntl
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import mindspore.dataset as ds

from mindformers import GPT2Config, GPT2LMHeadModel, AdamWeightDecay, MFTrainOneStepCell
from mindformers.core.context import compile_cache
from helpers.kernel_checks import cpu_kernels_set

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The MindFormers tutorial's API usage; Trainer falls back to run_gpt2.yaml, which turns the compile cache on.
SCRIPT = '''
import json
import sys

import numpy as np
import mindspore as ms
import mindspore.dataset as ds

from mindformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

hidden, output_dir = int(sys.argv[1]), sys.argv[2]
ms.set_seed(0)
model = GPT2LMHeadModel(GPT2Config(hidden_size=hidden, num_layers=2, num_heads=4, seq_length=16, vocab_size=128,
                                   hidden_dropout_rate=0.0, attention_dropout_rate=0.0, embedding_dropout_prob=0.0))
rows = np.random.default_rng(0).integers(2, 128, (8, 17)).astype(np.int32)
data = ds.NumpySlicesDataset({'input_ids': rows}, shuffle=False).batch(2, drop_remainder=True)
args = TrainingArguments(output_dir=output_dir, save_strategy='no')
print('LOSSES', json.dumps(Trainer(model=model, args=args, train_dataset=data).train().losses))
'''


def _train(tmp_path, hidden, entry='file'):
    """Train in a new process started as `python <file>`, `python - < file` or `python -c`; (losses, stderr)."""
    script = tmp_path / 'train.py'
    script.write_text(SCRIPT)
    command = {'file': [str(script)], 'stdin': ['-'], 'c': ['-c', SCRIPT]}[entry]
    output_dir = tmp_path / f'run_{len(list(tmp_path.glob("run_*")))}'
    cache = tmp_path / 'cache'
    if not cache.exists():  # its own compile cache; the session's built kernels
        kernels = os.path.join(os.environ['MINDFORMERS_CACHE'], 'kernels')
        os.makedirs(kernels, exist_ok=True)
        cache.mkdir()
        (cache / 'kernels').symlink_to(kernels)
    env = dict(os.environ, MINDFORMERS_CACHE=str(cache), PYTHONPATH=REPO)
    proc = subprocess.run([sys.executable, *command, str(hidden), str(output_dir)], cwd=tmp_path, env=env, text=True,
                          input=SCRIPT if entry == 'stdin' else None, capture_output=True, timeout=600)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stderr[-3000:]}"
    assert not [line for line in proc.stderr.splitlines() if 'deprecated' in line.lower()], proc.stderr
    return json.loads(proc.stdout.split('LOSSES', 1)[1]), proc.stderr


def _cache_lines(stderr):
    return [line.split(' - INFO - ', 1)[1] for line in stderr.splitlines() if '- INFO - compile cache' in line]


@pytest.mark.slow
def test_models_of_two_sizes_in_two_processes_each_get_their_own_cached_graph(tmp_path):
    cold, first = _train(tmp_path, 64)
    _, second = _train(tmp_path, 32)  # loaded the 64-wide graph and died with SIGSEGV
    warm, third = _train(tmp_path, 64)
    root = tmp_path / 'cache' / 'compile_cache'
    keys = sorted(path.name for path in root.iterdir())
    assert len(keys) == 2 and all((root / key / 'rank_0.complete').is_file() for key in keys)
    assert _cache_lines(first) == _cache_lines(third) != _cache_lines(second)
    assert _cache_lines(first)[0].startswith('compile cache: ' + str(root))
    np.testing.assert_allclose(warm, cold, rtol=1e-6)  # the cached graph computes what the compiled one did


@pytest.mark.slow
@pytest.mark.parametrize('entry', ['stdin', 'c'])
def test_entry_point_that_is_not_a_file_trains_without_the_cache(tmp_path, entry):
    losses, stderr = _train(tmp_path, 32, entry)
    assert len(losses) == 4 and np.isfinite(losses).all()
    name = {'stdin': '-', 'c': '-c'}[entry]
    assert _cache_lines(stderr) == [f"compile cache not used: the entry point '{name}' is not a script file; "
                                    f"compiling without it"]
    assert not (tmp_path / 'cache' / 'compile_cache').exists() or not os.listdir(tmp_path / 'cache' / 'compile_cache')


def _key(hidden=32, batch=2, seq=16):
    model = GPT2LMHeadModel(GPT2Config(hidden_size=hidden, num_layers=1, num_heads=4, seq_length=seq, vocab_size=64))
    cell = MFTrainOneStepCell(model, AdamWeightDecay(model.trainable_params()))
    cell.set_train(True)
    data = ds.NumpySlicesDataset({'input_ids': np.zeros((4, seq + 1), np.int32)}, shuffle=False).batch(batch)
    key, reason = compile_cache.training_cache_key(cell, data, {'runner_config': {'batch_size': batch}})
    assert reason is None
    return key


def test_key_follows_the_built_model_shapes_and_kernel_mode():
    with cpu_kernels_set(True):
        base = _key()
        assert _key() == base  # the same graph, built again
        others = [_key(hidden=64), _key(batch=4), _key(seq=8)]
    with cpu_kernels_set(False):
        others.append(_key())
    assert len({base, *others}) == 5


@pytest.fixture
def fresh_process_state(monkeypatch):
    """The cache state of a process that has not used the cache yet (and is left off after the test)."""
    monkeypatch.setattr(compile_cache, '_STATE', {})
    for name in compile_cache._ENV:  # pylint: disable=protected-access
        monkeypatch.delenv(name, raising=False)
    yield
    compile_cache.disable_compile_cache()


def test_a_directory_in_use_or_left_incomplete_is_not_loaded(tmp_path, fresh_process_state, monkeypatch):
    said = []
    monkeypatch.setattr(compile_cache.logger, 'info', lambda message, *args: said.append(message % args))
    path = tmp_path / 'key'
    path.mkdir()
    with open(path / 'rank_0.lock', 'a', encoding='utf-8') as held:  # another run is using it
        fcntl.flock(held, fcntl.LOCK_EX)
        assert compile_cache.enable_compile_cache(str(path)) is False
    assert said == [f"compile cache not used: another process is using {path}; compiling without it"]
    assert 'MS_COMPILER_CACHE_ENABLE' not in os.environ

    (path / 'rank_0' / 'graph_cache').mkdir(parents=True)  # a run died while compiling: no rank_0.complete
    (path / 'rank_0' / 'graph_cache' / 'compile_cache_0.mindir').write_bytes(b'truncated')
    assert compile_cache.enable_compile_cache(str(path)) is True
    assert not (path / 'rank_0').exists()
    assert os.environ['MS_COMPILER_CACHE_ENABLE'] == '1' and os.environ['MS_COMPILER_CACHE_PATH'] == str(path)
    compile_cache.disable_compile_cache(complete=True)
    assert 'MS_COMPILER_CACHE_ENABLE' not in os.environ and (path / 'rank_0.complete').is_file()
    # MindSpore reads the path once per process: a second directory is not used
    assert compile_cache.enable_compile_cache(str(tmp_path / 'other')) is False
    assert said[-1].startswith(f"compile cache not used: this process already cached into {path}")
    # MindSpore's own cache, switched on in the environment, is left alone
    monkeypatch.setattr(compile_cache, '_STATE', {})
    monkeypatch.setenv('MS_COMPILER_CACHE_ENABLE', '1')
    assert compile_cache.enable_compile_cache(str(path)) is False and 'MS_COMPILER_CACHE_ENABLE is set' in said[-1]


def test_init_context_uses_no_deprecated_setting(tmp_path):
    code = ("from mindformers import init_context; print(init_context(context_config=dict(mode=0, "
            "device_target='CPU', max_call_depth=4000, save_graphs=False, enable_compile_cache=True)))")
    proc = subprocess.run([sys.executable, '-c', code], cwd=tmp_path, env=dict(os.environ, PYTHONPATH=REPO),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip() == '(0, 1)', proc.stderr
    assert 'deprecated' not in proc.stderr.lower(), proc.stderr
