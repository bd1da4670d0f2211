"""Shared benchmark plumbing: each measurement runs in its own process (`--worker NAME`), variants are interleaved
round-robin, and medians over rounds are reported, so machine noise hits every variant alike."""
import json
import resource
import statistics
import subprocess
import sys


def peak_rss_mb():
    """Peak resident set size of this process in MB (Linux reports ru_maxrss in KB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def report(figures):
    """Print one worker's figures as the JSON line the parent reads."""
    print(json.dumps(figures), flush=True)


def run_worker(script, name, *extra):
    """Run `script --worker name *extra` in a fresh interpreter; returns its JSON figures or exits with its stderr."""
    proc = subprocess.run([sys.executable, script, '--worker', name, *map(str, extra)], capture_output=True,
                          text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith('{')]
    if proc.returncode or not lines:
        sys.exit(f"{name} worker failed:\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1])


def medians(runs):
    """{variant: [figures per round]} -> {variant: {key: median}} over the numeric keys."""
    return {name: {key: statistics.median(r[key] for r in rounds) for key, value in rounds[0].items()
                   if isinstance(value, (int, float)) and not isinstance(value, bool)}
            for name, rounds in runs.items()}


def write_json(path, figures):
    if path:
        with open(path, 'w', encoding='utf-8') as f:
            json.dump(figures, f, indent=2)
