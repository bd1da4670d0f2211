"""LoRA from the command line as MindFormers users run it: `run_mindformer.py --config configs/gpt2/run_gpt2_tiny_lora.yaml
--run_mode finetune --load_checkpoint <base>` writes delta checkpoints; predict loads the base (model_config's
checkpoint_name_or_path) and the delta (--load_checkpoint); a run killed with SIGKILL resumes to the uninterrupted
losses; under msrun with 2 data-parallel workers every step and the final delta equal one process with the global
batch. `--pet_method` adds LoRA's defaults to a config without PET and refuses an unknown or disagreeing type."""
import json
import os
import signal
import socket
import subprocess
import sys

import numpy as np
import pytest
import mindspore as ms

import run_mindformer
from helpers import REPO
from helpers.registry import register_bias_only_pet
from helpers.cli import command, json_result, run, run_ok, tool_env
from mindformers import AutoConfig, AutoModel
from mindformers.tools.checkpoint import META_FILE, load_checkpoint_file, save_checkpoint_atomic

STEPS = 8  # 16 samples, batch 4 (or 2 ranks x 2), 2 epochs
CALLBACKS = [{'type': 'MFLossMonitor', 'per_print_times': 1},
             {'type': 'CheckpointMonitor', 'prefix': 'lora', 'save_checkpoint_steps': 1, 'keep_checkpoint_max': 3}]
SMALL = {'num_layers': 1, 'hidden_size': 32, 'num_heads': 2, 'seq_length': 32}
COMMON = ['--config', 'configs/gpt2/run_gpt2_tiny_lora.yaml', *[a for key, value in SMALL.items()
                                                                for a in (f'--model.model_config.{key}', str(value))],
          '--model.model_config.max_decode_length', '40', '--train_dataset.data_loader.max_samples', '16',
          '--lr_schedule.learning_rate', '1e-2', '--options', f'callbacks={json.dumps(CALLBACKS)}']


def finetune(out, base, *extra):
    return ['run_mindformer.py', *COMMON, '--run_mode', 'finetune', '--load_checkpoint', base, '--output_dir',
            str(out), *extra]


def steps(out, rank=0):
    """{step: the last record logged for it} of a run's metrics.jsonl (a step redone after a kill: its redo)."""
    records = {}
    with open(os.path.join(out, 'log', f'rank_{rank}', 'metrics.jsonl'), encoding='utf-8') as f:
        for line in f:
            if line.endswith('\n') and '"loss"' in line:
                record = json.loads(line)
                records[record['step']] = record
    return records


def failure(proc):
    """The one error line of a run_mindformer.py that failed with exit status 1 (its log lines aside)."""
    lines = [line for line in proc.stderr.splitlines() if line.startswith('run_mindformer.py:')]
    assert proc.returncode == 1 and len(lines) == 1, proc.stderr[-3000:]
    return lines[0]


def newest_checkpoint(out, rank=0):
    rank_dir = os.path.join(out, 'checkpoint', f'rank_{rank}')
    with open(os.path.join(rank_dir, META_FILE), encoding='utf-8') as f:
        meta = json.load(f)
    return os.path.join(rank_dir, meta['last_ckpt_file']), meta['checkpoints'][-1]


@pytest.fixture(scope='module')
def reference(tmp_path_factory):
    """A base checkpoint of the small tiny GPT-2 and one LoRA finetune of it."""
    root = tmp_path_factory.mktemp('pet_cli')
    ms.set_seed(3)
    base = str(root / 'base.ckpt')
    save_checkpoint_atomic(AutoModel.from_config(AutoConfig.from_pretrained('gpt2_tiny', **SMALL)), base)
    out = str(root / 'reference')
    proc = run_ok(*finetune(out, base, '--batch_size', '4'))
    return {'root': root, 'base': base, 'out': out, 'summary': json_result(proc.stdout), 'steps': steps(out)}


@pytest.mark.slow
def test_finetune_from_the_tiny_lora_yaml_saves_delta_checkpoints(reference):
    summary = reference['summary']
    assert summary['run_mode'] == 'finetune' and summary['steps'] == STEPS and summary['final_loss'] < \
        summary['first_loss']
    path, entry = newest_checkpoint(reference['out'])
    assert summary['last_checkpoint'] == path and entry['global_step'] == STEPS
    params = [name for name in load_checkpoint_file(path) if '.' in name and not name.startswith('adam_')]
    assert sorted(params) == [f'backbone.layers.0.attention.qkv_proj.mindpet_delta_lora_{x}' for x in 'ab']
    assert entry['delta']['pet_config']['target_modules'] == ['qkv_proj']
    assert entry['delta']['base']['checkpoint'] == reference['base']


@pytest.mark.slow
def test_predict_loads_the_base_and_the_delta(reference):
    delta = os.path.join(reference['out'], 'checkpoint')
    predict = ['run_mindformer.py', *COMMON, '--run_mode', 'predict', '--load_checkpoint', delta,
               '--predict_data', 'ROMEO:']
    proc = run_ok(*predict, '--model.model_config.checkpoint_name_or_path', reference['base'])
    assert proc.stdout.startswith('ROMEO:')
    line = failure(run(*predict))  # no base: the YAML's fresh weights are not what the delta was trained on
    assert 'was trained on other base weights than this model holds' in line
    assert f"it was trained on {reference['base']}: load that as the base (model.model_config." \
           f"checkpoint_name_or_path)" in line


DIE_AT_STEP_4 = """
import os, signal, sys
sys.path.insert(0, {repo!r})
import mindspore as ms
import run_mindformer
from mindformers import MindFormerRegister, MindFormerModuleType


@MindFormerRegister.register(MindFormerModuleType.CALLBACK)
class DieAtStep4(ms.train.Callback):
    def on_train_step_end(self, run_context):
        if run_context.original_args().cur_step_num == 4:
            os.kill(os.getpid(), signal.SIGKILL)


sys.exit(run_mindformer.main())
"""


@pytest.mark.slow
def test_a_killed_lora_run_resumes_to_the_uninterrupted_losses(reference, tmp_path):
    """SIGKILLed right after step 4's checkpoint (a callback after CheckpointMonitor; a timed kill raced the run's
    end on fast machines), then resumed."""
    out = str(tmp_path / 'killed')
    driver = tmp_path / 'die_at_step_4.py'
    driver.write_text(DIE_AT_STEP_4.format(repo=REPO))
    argv = finetune(out, reference['base'], '--batch_size', '4')[1:]
    argv[argv.index('--options') + 1] = f"callbacks={json.dumps(CALLBACKS + [{'type': 'DieAtStep4'}])}"
    proc = subprocess.run([sys.executable, str(driver), *argv], cwd=REPO, env=tool_env(),
                          capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    done = len(steps(out))
    assert done == 4, done
    # resumed MindFormers' way, --load_checkpoint naming the checkpoint directory: no base weights, refused
    line = failure(run(*finetune(out, os.path.join(out, 'checkpoint'), '--batch_size', '4', '--resume_training')))
    assert "was trained on other base weights than this model holds" in line and reference['base'] in line
    # the base as --load_checkpoint (or model_config's checkpoint_name_or_path), the delta from <output_dir>/checkpoint
    resumed = json_result(run_ok(*finetune(out, reference['base'], '--batch_size', '4', '--resume_training')).stdout)
    assert 0 < resumed['initial_step'] <= done and resumed['steps'] == STEPS - resumed['initial_step']
    logged = steps(out)
    assert sorted(logged) == list(range(1, STEPS + 1))
    for step, record in logged.items():
        assert record['loss'] == pytest.approx(reference['steps'][step]['loss'], rel=0, abs=1e-6), step


def free_port():
    with socket.socket() as sock:
        sock.bind(('127.0.0.1', 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_data_parallel_lora_equals_one_process_with_the_global_batch(reference):
    out = str(reference['root'] / 'dp')
    log_dir = str(reference['root'] / 'msrun')
    argv = ['msrun', '--worker_num=2', '--local_worker_num=2', f'--master_port={free_port()}', f'--log_dir={log_dir}',
            '--join=True', '--cluster_time_out=120',
            *finetune(out, reference['base'], '--batch_size', '2', '--use_parallel', 'True')]
    proc = subprocess.run(argv, cwd=REPO, env=dict(tool_env(), PYTHON=sys.executable), capture_output=True, text=True,
                          timeout=600, check=False)
    logs = ''.join(open(os.path.join(log_dir, name), errors='replace').read()[-2000:]
                   for name in sorted(os.listdir(log_dir)) if name.endswith('.log'))
    assert proc.returncode == 0, proc.stdout[-2000:] + logs
    final, _ = newest_checkpoint(reference['out'])
    expected = load_checkpoint_file(final)
    for rank in (0, 1):
        logged = steps(out, rank)
        assert sorted(logged) == list(range(1, STEPS + 1))
        for step, record in logged.items():
            for key in ('loss', 'grad_norm', 'lr'):
                assert record[key] == pytest.approx(reference['steps'][step][key], rel=0, abs=1e-5), (rank, step)
        path, entry = newest_checkpoint(out, rank)
        delta = load_checkpoint_file(path)
        assert 'delta' in entry and sorted(delta) == sorted(expected)
        for name, value in expected.items():
            np.testing.assert_allclose(delta[name].asnumpy(), value.asnumpy(), rtol=0, atol=1e-5, err_msg=name)


# ------------------------------------------------------------------------------------------------ --pet_method
def test_pet_method_flag_adds_lora_defaults_to_a_config_without_pet():
    args, overrides = run_mindformer.parse_args(['--config', 'configs/gpt2/run_gpt2_tiny.yaml', '--pet_method',
                                                 'lora'])
    config = run_mindformer.build_config(args, overrides)
    assert config.model.model_config.pet_config == {'pet_type': 'lora'}


def test_pet_method_flag_refuses_an_unknown_or_disagreeing_type(clean_registry, capsys):
    other = register_bias_only_pet()
    for config, pet_method, needle in (
            ('configs/gpt2/run_gpt2_tiny.yaml', 'lorra', "--pet_method: unknown pet_type 'lorra'; supported: "),
            ('configs/gpt2/run_gpt2_tiny_lora.yaml', other,
             f"pet_method '{other}' disagrees with model.model_config.pet_config of --config "
             f"configs/gpt2/run_gpt2_tiny_lora.yaml (pet_type 'lora')")):
        assert run_mindformer.main(['--config', config, '--run_mode', 'finetune', '--pet_method', pet_method]) == 2
        lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith('run_mindformer.py:')]
        assert len(lines) == 1 and needle in lines[0], lines


def test_a_merge_flag_points_to_the_merge_tool(capsys):
    with pytest.raises(SystemExit) as exit_:
        run_mindformer.main(['--config', 'configs/gpt2/run_gpt2_tiny_lora.yaml', '--merge'])
    assert exit_.value.code == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and 'mindformers/tools/transform_ckpt_lora.py' in lines[-1], lines


@pytest.mark.parametrize('pet_config, needle', [
    ("{pet_type: lora, lora_rnk: 8}", "unknown key 'GPT2Config.pet_config.lora_rnk' (did you mean lora_rank"),
    ("{pet_type: lora, lora_rank: 0}", "GPT2Config.pet_config.lora_rank must be a positive integer, got 0"),
    ("{pet_type: lorra}", "GPT2Config.pet_config.pet_type: unknown pet_type 'lorra'; supported: "),
    ("{pet_type: lora, target_modules: '.*c_attn'}", None),
])
def test_a_bad_pet_config_in_a_yaml_is_one_line_naming_the_key_and_file(tmp_path, capsys, pet_config, needle):
    path = tmp_path / 'lora.yaml'
    path.write_text(f"base_config: {REPO}/configs/gpt2/run_gpt2_tiny_lora.yaml\n"
                    f"model:\n  model_config:\n    pet_config: {pet_config}\n", encoding='utf-8')
    code = run_mindformer.main(['--config', str(path), '--run_mode', 'train', '--output_dir', str(tmp_path)])
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith('run_mindformer.py:')]
    assert code == 1 and len(lines) == 1, lines
    if needle is None:  # a target pattern that matches nothing fails when the model is built, naming its Linears
        needle = "pet_config.target_modules: '.*c_attn' matches no Linear of GPT2LMHeadModel"
    assert needle in lines[0] and (str(path) in lines[0] or needle.startswith('pet_config')), lines[0]
