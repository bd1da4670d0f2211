"""scripts/msrun_launcher.sh with JOIN=True: how each worker ended, from its worker_<i>.log, whatever msrun says."""
import json
import os
import shlex
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from mindformers.tools.msrun_summary import summarize

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCHER = os.path.join(REPO, 'scripts', 'msrun_launcher.sh')


class Lines:
    def __init__(self):
        self.text = ''

    def write(self, text):
        self.text += text


def write_log(log_dir, rank, *lines, returncode=None, ended=None):
    """worker_<rank>.log, and its .status record when `returncode` is given (msrun_worker.py writes one)."""
    path = log_dir / f'worker_{rank}.log'
    path.write_text(''.join(f'{line}\n' for line in lines))
    if returncode is not None:
        record = {'rank': str(rank), 'returncode': returncode, 'ended': ended or time.time(),
                  'signal': signal.Signals(-returncode).name if returncode < 0 else None}
        (log_dir / f'worker_{rank}.status').write_text(json.dumps(record))
    return path


def test_a_failure_reported_after_every_worker_finished_is_not_a_failed_run(tmp_path):
    for rank in (0, 1):
        write_log(tmp_path, rank, 'step 8/8 ...', 'saved checkpoint ...', returncode=0)
    out = Lines()
    assert summarize(str(tmp_path), 1, out=out) == 0
    assert out.text == (f"msrun_launcher.sh: all 2 worker(s) finished (msrun's status 1 comes from its own "
                        f"shutdown, not from the workers); logs in {tmp_path}\n")


def test_the_worker_that_died_is_named_and_the_survivor_is_not_blamed(tmp_path):
    killed = write_log(tmp_path, 1, 'step 2/8 ...', returncode=-9, ended=time.time() - 5)
    survivor = write_log(tmp_path, 0, 'step 2/8 ...')  # stopped by msrun: no record
    out = Lines()
    assert summarize(str(tmp_path), 1, out=out) == 1
    first, second = out.text.splitlines()
    assert first.startswith('msrun_launcher.sh: error: worker 1 was killed by SIGKILL at ')
    assert 'the first to end' in first
    assert 'out of memory?' in first and 'last line: step 2/8' in first and first.endswith(f'see {killed}')
    assert second == f'msrun_launcher.sh: worker 0 was stopped by msrun after worker 1 ended; see {survivor}'


def test_an_error_line_is_quoted_and_stale_records_are_ignored(tmp_path):
    write_log(tmp_path, 0, 'step 1/8', 'run_mindformer.py: error: data_loader: no such file', 'teardown noise',
              returncode=1)
    write_log(tmp_path, 1, 'step 8/8', returncode=0)
    stale = time.time() - 3600  # the record of an earlier launch into the same LOG_DIR
    os.utime(tmp_path / 'worker_1.status', (stale, stale))
    out = Lines()
    assert summarize(str(tmp_path), 1, since=time.time() - 60, out=out) == 1
    lines = out.text.splitlines()
    assert lines[0].startswith('msrun_launcher.sh: error: worker 0 exited with status 1 at ')
    assert 'the first to end' in lines[0]
    assert lines[0].endswith(f": run_mindformer.py: error: data_loader: no such file; see {tmp_path / 'worker_0.log'}")
    assert lines[1] == f"msrun_launcher.sh: worker 1 was stopped by msrun after worker 0 ended; see " \
                       f"{tmp_path / 'worker_1.log'}"


@pytest.mark.slow
def test_launcher_names_the_worker_killed_mid_training(tmp_path):
    """Rank 1 is SIGKILLed at step 2 (as the OOM killer would): the launcher names worker_1.log and exits non-zero,
    and rank 0, stopped by msrun, is not blamed."""
    script = tmp_path / 'train_and_die.py'
    script.write_text(textwrap.dedent(f"""
        import os, signal, sys
        sys.path.insert(0, {REPO!r})
        import mindspore as ms
        import run_mindformer
        from mindformers import MindFormerRegister, MindFormerModuleType

        @MindFormerRegister.register(MindFormerModuleType.CALLBACK)
        class DieAtStep2(ms.train.Callback):
            def on_train_step_end(self, run_context):
                state = run_context.original_args()
                if state.rank_id == 1 and state.cur_step_num == 2:
                    os.kill(os.getpid(), signal.SIGKILL)

        sys.exit(run_mindformer.main())
        """))
    command = ' '.join(map(shlex.quote, [
        str(script), '--config', 'configs/gpt2/run_gpt2_tiny.yaml', '--use_parallel', 'True', '--run_mode', 'train',
        '--output_dir', str(tmp_path / 'out'), '--model.model_config.num_layers', '1',
        '--train_dataset.data_loader.max_samples', '64', '--batch_size', '2',
        '--options', 'callbacks=[{type: MFLossMonitor, per_print_times: 1}, {type: DieAtStep2}]']))
    with __import__('socket').socket() as sock:
        sock.bind(('127.0.0.1', 0))
        port = sock.getsockname()[1]
    # MS_NODE_TIMEOUT: msrun's scheduler declares the killed rank dead after 10 s without a heartbeat, not the
    # default 30 s (that is what ends rank 0, blocked in its next all-reduce)
    proc = subprocess.run(['bash', LAUNCHER, command, '2', '2', '127.0.0.1', str(port), '0', str(tmp_path / 'log'),
                           'True', '120'], cwd=REPO, env=dict(os.environ, PYTHON=sys.executable, MS_NODE_TIMEOUT='10'),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith('msrun_launcher.sh: error:')]
    assert len(errors) == 1 and errors[0].endswith(str(tmp_path / 'log' / 'worker_1.log')), proc.stderr
    assert errors[0].startswith('msrun_launcher.sh: error: worker 1 was killed by SIGKILL'), proc.stderr
    assert 'the first to end' in errors[0]
    # rank 0 either ends on its own once its peer is gone, or is stopped by msrun: either way it is not the cause
    survivor = [line for line in proc.stderr.splitlines() if line.startswith('msrun_launcher.sh: worker 0 ')]
    assert len(survivor) == 1 and ('after worker 1' in survivor[0]), proc.stderr
