"""`python -m mindformers.serve` on loopback for the serving tests, and plain-HTTP JSON calls to it (stdlib only)."""
import contextlib
import json
import socket
import subprocess
import time
import urllib.error
import urllib.request

from helpers import REPO
from helpers.cli import command, tool_env


def free_port():
    with socket.socket() as sock:
        sock.bind(('127.0.0.1', 0))
        return sock.getsockname()[1]


def call(url, body=None, timeout=60):
    """GET `url` (or POST `body` as JSON) -> (HTTP status, the decoded JSON answer)."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={'Content-Type': 'application/json'})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


@contextlib.contextmanager
def served(*args, log_path, timeout=300):
    """Runs `python -m mindformers.serve *args --host 127.0.0.1 --port <free>` (its output to `log_path`) and yields
    its base URL once GET /health answers 200; stops it on exit. A server that dies or never gets ready fails with
    the tail of its log."""
    url = f'http://127.0.0.1:{free_port()}'
    with open(log_path, 'wb') as log:
        proc = subprocess.Popen(command('mindformers.serve', *args, '--host', '127.0.0.1', '--port', url.rsplit(':', 1)[1]),
                                cwd=REPO, env=tool_env(), stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + timeout
        while not _ready(url):
            if proc.poll() is not None or time.monotonic() > deadline:
                with open(log_path, encoding='utf-8', errors='replace') as log:
                    raise AssertionError(f'server not ready (exit {proc.poll()}):\n{log.read()[-3000:]}')
            time.sleep(0.3)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _ready(url):
    try:
        with urllib.request.urlopen(url + '/health', timeout=5) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):  # 503 while loading (HTTPError is a URLError), or not listening yet
        return False
