"""Real data parallel on CPU: `run_mindformer.py --use_parallel True` under msrun with 2 local workers.

Each rank reads its shard (the sampler deals samples to ranks in turn, so the two rank batches of step k together
are exactly batch k of one process with twice the batch size), gradients are averaged, and every logged step equals
a single-process run with the same global batch. The DP run stops after epoch 1 and is resumed to epoch 2 by a
second msrun launch; eval (aggregated over ranks) and predict run under msrun too."""
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys

import pytest

from helpers.cli import json_result

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCHER = os.path.join(REPO, 'scripts', 'msrun_launcher.sh')
pytestmark = pytest.mark.slow

# 16 training samples: 2 ranks x batch 2 (or 1 process x batch 4) = 4 steps an epoch; the schedule spans both epochs
# whichever run the steps are in, so a run of epoch 1 resumed to epoch 2 is one 8-step run.
CALLBACKS = [{'type': 'MFLossMonitor', 'per_print_times': 1},
             {'type': 'CheckpointMonitor', 'prefix': 'dp', 'save_checkpoint_steps': 3, 'keep_checkpoint_max': 5}]
COMMON = ['--config', 'configs/gpt2/run_gpt2_tiny.yaml', '--model.model_config.num_layers', '1',
          '--model.model_config.hidden_size', '32', '--model.model_config.num_heads', '2',
          '--model.model_config.seq_length', '32', '--model.model_config.max_decode_length', '40',
          '--train_dataset.data_loader.max_samples', '16', '--eval_dataset.data_loader.max_samples', '10',
          '--eval_dataset.batch_size', '2', '--lr_schedule.total_steps', '8', '--do_eval', 'True',
          '--options', f'callbacks={json.dumps(CALLBACKS)}']
STEPS = 8
PROMPT = 'ROMEO:'


def free_port():
    with socket.socket() as sock:
        sock.bind(('127.0.0.1', 0))
        return sock.getsockname()[1]


def _tail(path, lines=25):
    try:
        with open(path, errors='replace') as f:
            return ''.join(f.readlines()[-lines:])
    except OSError as err:
        return f'<{err}>'


def run(cmd, log_dirs, timeout=300):
    """Run `cmd` from the repo root; on failure or timeout, fail showing its output and the tails of every log in
    `log_dirs` (msrun's worker_<i>.log / scheduler.log, and mindformer.log of each rank)."""
    env = dict(os.environ, PYTHON=sys.executable)
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=timeout)
        problem = None if proc.returncode == 0 else f'exit code {proc.returncode}'
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        problem = f'no result after {timeout} s'
    if problem:
        logs = []
        for log_dir in log_dirs:
            for folder, _, names in os.walk(log_dir):
                logs += [os.path.join(folder, n) for n in sorted(names) if n.endswith('.log')]
        report = '\n'.join(f'----- {path}\n{_tail(path)}' for path in logs)
        pytest.fail(f"{' '.join(cmd)}: {problem}\n----- output\n{output[-3000:]}\n{report}", pytrace=False)
    return output


def msrun(args, out, log_dir):
    return ['msrun', '--worker_num=2', '--local_worker_num=2', f'--master_port={free_port()}', f'--log_dir={log_dir}',
            '--join=True', '--cluster_time_out=120', 'run_mindformer.py', *COMMON, '--use_parallel', 'True',
            '--output_dir', out, *args]


def metrics(out, rank):
    """{step: record} of a rank's metrics.jsonl (training steps; eval records under ('eval', step))."""
    records = {}
    with open(os.path.join(out, 'log', f'rank_{rank}', 'metrics.jsonl')) as f:
        for line in f:
            record = json.loads(line)
            records[('eval', record['step']) if 'eval_loss' in record else record['step']] = record
    return records


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp('dp')
    ref, out = str(root / 'reference'), str(root / 'dp')
    run([sys.executable, 'run_mindformer.py', *COMMON, '--run_mode', 'train', '--batch_size', '4', '--epochs', '2',
         '--output_dir', ref], [ref])
    # epoch 1 through the launcher script, then both workers have stopped; epoch 2 resumes with a new msrun
    command = ' '.join(['run_mindformer.py', *map(shlex.quote, COMMON), '--use_parallel True --run_mode train',
                        '--batch_size 2 --epochs 1 --output_dir', out])
    run(['bash', LAUNCHER, command, '2', '2', '127.0.0.1', str(free_port()), '0', str(root / 'log1'), 'True', '120'],
        [str(root / 'log1'), out])
    run(msrun(['--run_mode', 'train', '--batch_size', '2', '--epochs', '2', '--resume_training', 'True'], out,
              str(root / 'log2')), [str(root / 'log2'), out])
    return {'root': root, 'ref': ref, 'out': out}


def test_each_rank_reads_half_of_the_data(runs):
    for rank in (0, 1):
        log = _tail(os.path.join(runs['out'], 'log', f'rank_{rank}', 'mindformer.log'), 10 ** 6)
        assert f'8 samples for shard {rank}/2, batch_size 2 -> 4 batches per epoch' in log
    assert '16 samples for shard 0/1, batch_size 4 -> 4 batches per epoch' in \
        _tail(os.path.join(runs['ref'], 'log', 'rank_0', 'mindformer.log'), 10 ** 6)


def test_every_step_equals_one_process_with_the_global_batch(runs):
    reference = metrics(runs['ref'], 0)
    assert [k for k in reference if not isinstance(k, tuple)] == list(range(1, STEPS + 1))
    for rank in (0, 1):
        steps = metrics(runs['out'], rank)
        assert [k for k in steps if not isinstance(k, tuple)] == list(range(1, STEPS + 1))
        for step in range(1, STEPS + 1):
            for key in ('loss', 'grad_norm', 'lr'):
                assert steps[step][key] == pytest.approx(reference[step][key], rel=0, abs=1e-5), (rank, step, key)
    # the shards differ, so a rank's own loss would not match: what is logged is the mean over ranks
    assert reference[1]['loss'] != reference[2]['loss']


def test_checkpoints_land_per_rank_and_resume_continues_exactly(runs):
    for rank in (0, 1):
        rank_dir = os.path.join(runs['out'], 'checkpoint', f'rank_{rank}')
        with open(os.path.join(rank_dir, 'meta.json')) as f:
            meta = json.load(f)
        assert [e['global_step'] for e in meta['checkpoints']] == [3, 4, 6, 8]
        assert all(e['file'].startswith(f'dp_rank_{rank}-') and os.path.isfile(os.path.join(rank_dir, e['file']))
                   for e in meta['checkpoints'])
        log = _tail(os.path.join(runs['out'], 'log', f'rank_{rank}', 'mindformer.log'), 10 ** 6)
        assert re.search(rf'resuming from \S*rank_{rank}/dp_rank_{rank}-1_4\.ckpt: epoch 2, step 4 of 8 done', log)
    # each step was logged once: the resumed run started at step 5 (losses checked against the reference above)
    with open(os.path.join(runs['out'], 'log', 'rank_0', 'metrics.jsonl')) as f:
        logged = [json.loads(line)['step'] for line in f if 'loss' in json.loads(line)]
    assert logged == list(range(1, STEPS + 1))


def test_eval_is_aggregated_over_ranks(runs):
    reference = metrics(runs['ref'], 0)
    for rank in (0, 1):
        steps = metrics(runs['out'], rank)
        for step in (4, 8):
            assert steps[('eval', step)]['eval_tokens'] == reference[('eval', step)]['eval_tokens'] == 10 * 32
            assert steps[('eval', step)]['eval_loss'] == pytest.approx(reference[('eval', step)]['eval_loss'],
                                                                       rel=0, abs=1e-5)
    log_dir = str(runs['root'] / 'log_eval')
    run(msrun(['--run_mode', 'eval', '--load_checkpoint', os.path.join(runs['out'], 'checkpoint')], runs['out'],
              log_dir), [log_dir])
    for rank in (0, 1):
        log = _tail(os.path.join(log_dir, f'worker_{rank}.log'), 10 ** 6)  # the worker's stdout and stderr
        assert f'loaded weights from {runs["out"]}/checkpoint/rank_{rank}/' in log
        assert f'mindformers[rank {rank}] - INFO - eval: loss' in log  # console lines name their rank
        scores = json_result(log)  # the scores run_mindformer.py printed
        assert scores['tokens'] == 320, log[-2000:]
        assert scores['loss'] == pytest.approx(reference[('eval', 8)]['eval_loss'], rel=0, abs=1e-4)


def test_predict_under_msrun(runs):
    log_dir = str(runs['root'] / 'log_predict')
    run(msrun(['--run_mode', 'predict', '--load_checkpoint', os.path.join(runs['out'], 'checkpoint'),
               '--predict_data', PROMPT], runs['out'], log_dir), [log_dir])
    texts = []
    for rank in (0, 1):
        log = _tail(os.path.join(log_dir, f'worker_{rank}.log'), 10 ** 6)
        match = re.search(rf'^({re.escape(PROMPT)}.*?)^-{{40}}$', log, re.S | re.M)
        assert match, log[-2000:]
        texts.append(match.group(1))
    assert texts[0] == texts[1] and len(texts[0]) > len(PROMPT) + 1
