"""The repo's command-line tools as users run them: a subprocess from the repo root, with the checkout under test
first on PYTHONPATH (so it is the one imported, not an installed copy), and their machine-readable summaries."""
import json
import os
import subprocess
import sys

from helpers import REPO


def command(tool, *args):
    """The argv that runs `tool`: a script relative to the repo root ('run_mindformer.py') or a dotted module
    ('mindformers.tools.export_strategy', run with -m); `args` are str()-ed (bytes are passed as they are)."""
    target = [os.path.join(REPO, tool)] if tool.endswith('.py') else ['-m', tool]
    return [sys.executable, *target, *(a if isinstance(a, bytes) else str(a) for a in args)]


def tool_env(**extra):
    """os.environ with the repo first on PYTHONPATH, plus `extra`."""
    path = os.pathsep.join(p for p in (REPO, os.environ.get('PYTHONPATH')) if p)
    return dict(os.environ, PYTHONPATH=path, **extra)


def run(tool, *args, cwd=REPO, env=None, timeout=600):
    """Run `tool` (see `command`) to the end; returns the CompletedProcess (returncode, stdout, stderr as text).
    `env`: extra variables."""
    return subprocess.run(command(tool, *args), cwd=cwd, env=tool_env(**(env or {})), capture_output=True,
                          text=True, timeout=timeout, check=False)


def run_ok(tool, *args, **kwargs):
    """`run`, asserting exit status 0 (the failure shows the command and the tail of stderr)."""
    proc = run(tool, *args, **kwargs)
    assert proc.returncode == 0, f"{' '.join(proc.args)}\nexit {proc.returncode}\n{proc.stderr[-3000:]}"
    return proc


def json_result(stdout):
    """The summary a CLI printed: the last line of `stdout` that is a JSON object."""
    for line in reversed(stdout.splitlines()):
        if line.startswith('{'):
            try:
                return json.loads(line)
            except ValueError:
                continue
    raise AssertionError(f"no JSON summary line on stdout:\n{stdout[-3000:]}")


def error_line(result, code=2):
    """The single stderr line of a failed run (exit 2: the command line is wrong; 1: a file's content is)."""
    lines = result.stderr.strip().splitlines()
    assert result.returncode == code, result.stderr
    assert len(lines) == 1, result.stderr
    return lines[0]


def convert_weight_main(*args):
    """convert_weight.py in this process (no interpreter start-up); returns its exit code."""
    import convert_weight
    return convert_weight.main([str(arg) for arg in args])
