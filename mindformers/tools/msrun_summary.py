"""After `msrun --join=True`: say how each worker ended, naming its `worker_<i>.log`.

msrun's own verdict is unreliable both ways: when one worker dies it may blame a survivor, and it may report
"exited with exception" after every worker finished and saved (its scheduler's shutdown). Each worker started
through `msrun_worker.py` leaves `worker_<rank>.status` beside its log with its exit status; a worker that msrun
stopped after another failed leaves none. The summary names the log and outcome of each worker that failed (with
run_mindformer.py's final `error:` line when there is one); the status is 0 when every worker exited 0, whatever
msrun says, else msrun's status (or 1).

Usage (scripts/msrun_launcher.sh calls it): python msrun_summary.py LOG_DIR MSRUN_STATUS START_EPOCH_SECONDS
Standard library only: it runs without loading MindSpore."""
import glob
import json
import os
import re
import sys
import time

_ERROR_LINE = re.compile(r'^\S+\.py: (error|interrupted)')


def _last_lines(path):
    """(the last `<prog>.py: error: ...` or `interrupted` line, the last line) of a log; '' where absent."""
    try:
        with open(path, encoding='utf-8', errors='replace') as f:
            lines = [line.rstrip('\n') for line in f if line.strip()]
    except OSError:
        return '', ''
    errors = [line for line in lines if _ERROR_LINE.match(line)]
    return (errors[-1] if errors else ''), (lines[-1] if lines else '')


def worker_outcomes(log_dir, since=0.0):
    """{rank: (log path, status record or None)} for the worker logs written in `log_dir` since `since`."""
    found = {}
    for path in glob.glob(os.path.join(log_dir, 'worker_*.log')):
        match = re.fullmatch(r'worker_(\d+)\.log', os.path.basename(path))
        if not match or os.path.getmtime(path) < since:
            continue
        record = None
        status = os.path.join(log_dir, f'worker_{match.group(1)}.status')
        if os.path.isfile(status) and os.path.getmtime(status) >= since:
            with open(status, encoding='utf-8') as f:
                record = json.load(f)
        found[int(match.group(1))] = (path, record)
    return dict(sorted(found.items()))


def summarize(log_dir, msrun_status, since=0.0, out=sys.stderr):
    """Write what became of each worker to `out`; return the exit status for the whole job."""
    outcomes = worker_outcomes(log_dir, since)
    if not outcomes:
        out.write(f"msrun_launcher.sh: no worker log written in {log_dir} by this launch; msrun exited with "
                  f"status {msrun_status}\n")
        return msrun_status or 1
    failed = {rank: (path, record) for rank, (path, record) in outcomes.items()
              if not record or record['returncode'] != 0}
    if not failed:
        note = f" (msrun's status {msrun_status} comes from its own shutdown, not from the workers)" \
            if msrun_status else ''
        out.write(f"msrun_launcher.sh: all {len(outcomes)} worker(s) finished{note}; logs in {log_dir}\n")
        return 0
    # the worker that ended first is the likeliest cause; the others ended (or were stopped) after losing it
    order = sorted(failed, key=lambda r: (failed[r][1] is None, (failed[r][1] or {}).get('ended', 0), r))
    first = order[0] if failed[order[0]][1] else None
    for rank in order:
        path, record = failed[rank]
        if record is None:
            by = f" after worker {first} ended" if first is not None else ''
            out.write(f"msrun_launcher.sh: worker {rank} was stopped by msrun{by}; see {path}\n")
            continue
        error, last = _last_lines(path)
        when = time.strftime('%H:%M:%S', time.localtime(record['ended']))
        how = f"was killed by {record['signal']}" if record.get('signal') else \
            f"exited with status {record['returncode']}"
        if error:
            detail = f": {error[-300:]}"
        elif record.get('signal') == 'SIGKILL':
            detail = f" (out of memory? nothing could be logged; last line: {last[-200:]})"
        else:
            detail = f" (last line: {last[-200:]})"
        if rank == first:
            out.write(f"msrun_launcher.sh: error: worker {rank} {how} at {when}, the first to end{detail}; "
                      f"see {path}\n")
        else:
            late = record['ended'] - failed[first][1]['ended']
            out.write(f"msrun_launcher.sh: worker {rank} {how} at {when}, {late:.0f} s after worker {first} (most "
                      f"likely because worker {first} was gone){detail}; see {path}\n")
    return msrun_status or 1


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 3:
        sys.stderr.write("usage: msrun_summary.py LOG_DIR MSRUN_STATUS START_EPOCH_SECONDS\n")
        return 2
    return summarize(argv[0], int(argv[1]), float(argv[2]))


if __name__ == '__main__':
    sys.exit(main())
