"""Run one msrun worker's script and record how it ended: `msrun_worker.py STATUS_DIR SCRIPT [ARGS ...]`.

The script runs as a child with this process's environment (msrun's RANK_ID, MS_* variables); when it ends, its
exit status (or the signal that ended it) is written to `STATUS_DIR/worker_<RANK_ID>.status` (JSON) before this
process exits with the same status, so the record exists before msrun notices the exit and stops the other
workers. A worker that msrun stops leaves no record. `msrun_summary.py` reads the records.
It imports only the standard-library `mindformers.tools.file_io` (`import mindformers` is lazy), so it adds no
start-up time to the worker."""
import os
import signal
import subprocess
import sys
import time

if __name__ == '__main__' and os.path.dirname(os.path.abspath(__file__)) == os.path.abspath(sys.path[0]):
    # run by path (scripts/msrun_launcher.sh): import the package beside this checkout, not an installed one
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mindformers.tools.file_io import write_json_atomic  # noqa: E402


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) < 2:
        sys.stderr.write("usage: msrun_worker.py STATUS_DIR SCRIPT [ARGS ...]\n")
        return 2
    status_dir, command = argv[0], [sys.executable, *argv[1:]]
    child = subprocess.Popen(command)
    signal.signal(signal.SIGTERM, lambda signum, frame: child.send_signal(signum))
    signal.signal(signal.SIGINT, lambda signum, frame: child.send_signal(signum))
    code = child.wait()
    rank = os.environ.get('RANK_ID', str(os.getpid()))
    record = {'rank': rank, 'returncode': code, 'ended': time.time(),
              'signal': signal.Signals(-code).name if code < 0 else None}
    os.makedirs(status_dir, exist_ok=True)
    write_json_atomic(os.path.join(status_dir, f'worker_{rank}.status'), record, indent=None)
    return 128 - code if code < 0 else code


if __name__ == '__main__':
    sys.exit(main())
