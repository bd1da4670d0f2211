"""Shared benchmark plumbing: each measurement runs in its own process (`--worker NAME`), variants are interleaved
round-robin, and medians over rounds are reported, so machine noise hits every variant alike."""
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from importlib import metadata


def peak_rss_mb():
    """Peak resident set size of this process in MB: Linux's VmHWM (ru_maxrss carries a parent's peak across
    fork + exec, so a small worker of a large parent would report the parent's), else ru_maxrss (KB)."""
    try:
        with open('/proc/self/status', encoding='ascii') as f:
            return next(int(line.split()[1]) for line in f if line.startswith('VmHWM:')) / 1024
    except (OSError, StopIteration, ValueError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def report(figures):
    """Print one worker's figures as the JSON line the parent reads."""
    print(json.dumps(figures), flush=True)


def step_figures(times, warmup, tokens_per_step, start):
    """A training worker's figures from its per-step wall times (s): throughput over the steps after `warmup`, the
    first step, setup + first step (from `start`, a `time.perf_counter()` taken before building anything), peak RSS."""
    measured = times[warmup:]
    return {'tokens_per_s': tokens_per_step * len(measured) / sum(measured), 'first_step_s': times[0],
            'setup_and_first_step_s': time.perf_counter() - start - sum(times[1:]), 'peak_rss_mb': peak_rss_mb()}


def run_worker(script, name, *extra):
    """Run `script --worker name *extra` in a fresh interpreter; returns its JSON figures or exits with its stderr."""
    proc = subprocess.run([sys.executable, script, '--worker', name, *map(str, extra)], capture_output=True,
                          text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith('{')]
    if proc.returncode or not lines:
        sys.exit(f"{name} worker failed:\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1])


def interleave(script, names, rounds, extra=lambda name, round_index: ()):
    """Each round runs every variant's worker once, in order: {name: [figures per round]}. `extra(name,
    round_index)` gives a worker's further arguments. Progress goes to stderr."""
    results = {name: [] for name in names}
    for round_index in range(rounds):
        for name in names:
            results[name].append(run_worker(script, name, *extra(name, round_index)))
            print(f"round {round_index + 1}/{rounds} {name}: {results[name][-1]['tokens_per_s']:.0f} tokens/s",
                  file=sys.stderr)
    return results


def medians(runs):
    """{variant: [figures per round]} -> {variant: {key: median}} over the numeric keys."""
    return {name: {key: statistics.median(r[key] for r in rounds) for key, value in rounds[0].items()
                   if isinstance(value, (int, float)) and not isinstance(value, bool)}
            for name, rounds in runs.items()}


def round_ratios(runs, ours, ref, key='tokens_per_s'):
    """`ours` / `ref` per round (the two ran minutes apart in the same round): a list, one per round. Their median
    follows the machine's drift between rounds less than the ratio of the two medians does."""
    return [a[key] / b[key] for a, b in zip(runs[ours], runs[ref])]


def ratio_line(label, ratios):
    """One printed line: the per-round ratios and their median."""
    return f"{label}: per round {', '.join(f'{r:.2f}' for r in ratios)}; median {statistics.median(ratios):.2f}"


def environment(packages=('mindspore', 'torch', 'transformers', 'peft', 'numpy')):
    """Where the figures were taken: CPU model and count, Python and package versions, the repository's commit."""
    cpu = platform.processor() or platform.machine()
    try:
        with open('/proc/cpuinfo', encoding='utf-8') as f:
            cpu = next((line.split(':', 1)[1].strip() for line in f if line.startswith('model name')), cpu)
    except OSError:
        pass
    versions = {}
    for name in packages:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    commit = subprocess.run(['git', '-C', repo, 'rev-parse', '--short', 'HEAD'], capture_output=True, text=True)
    return {'cpu': cpu, 'cpu_count': os.cpu_count(), 'python': platform.python_version(), **versions,
            'commit': commit.stdout.strip() or None,
            'date': time.strftime('%Y-%m-%d %H:%M', time.gmtime()) + ' UTC'}


def write_json(path, figures):
    if path:
        with open(path, 'w', encoding='utf-8') as f:
            json.dump(figures, f, indent=2)
