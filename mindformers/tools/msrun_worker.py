"""Run one msrun worker's script and record how it ended: `msrun_worker.py STATUS_DIR SCRIPT [ARGS ...]`.

The script runs as a child with this process's environment (msrun's RANK_ID, MS_* variables); when it ends, its
exit status (or the signal that ended it) is written to `STATUS_DIR/worker_<RANK_ID>.status` (JSON) before this
process exits with the same status, so the record exists before msrun notices the exit and stops the other
workers. A worker that msrun stops leaves no record. `msrun_summary.py` reads the records.
Standard library only: it adds no start-up time to the worker."""
import json
import os
import signal
import subprocess
import sys
import time


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
    path = os.path.join(status_dir, f'worker_{rank}.status')
    with open(f'{path}.tmp', 'w', encoding='utf-8') as f:
        json.dump(record, f)
    os.replace(f'{path}.tmp', path)
    return 128 - code if code < 0 else code


if __name__ == '__main__':
    sys.exit(main())
