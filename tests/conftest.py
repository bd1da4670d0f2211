"""Shared test setup: compiled mode on CPU, and helpers to find the repo."""
import os
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)


@pytest.fixture(scope='session', autouse=True)
def _cpu_graph_mode():
    import mindspore as ms
    ms.set_context(mode=0, device_target='CPU')
    yield


def pytest_configure(config):
    config.addinivalue_line('markers', 'slow: takes tens of seconds (kept in CI; deselect with -m "not slow")')


# compiled graphs and kernels go to a per-session cache, never the user's home
os.environ.setdefault('MINDFORMERS_CACHE', os.path.join(__import__('tempfile').mkdtemp(prefix='mf-test-cache-')))


@pytest.fixture(params=['kernels', 'plain'])
def kernel_mode(request, monkeypatch):
    """Runs a test twice: with the fused CPU kernels and with plain MindSpore ops (`MINDFORMERS_CPU_KERNELS=0`).
    Build the cells under test inside the test, after this fixture has set the mode."""
    import mindformers.modules.cpu_kernels as cpu_kernels
    monkeypatch.setenv('MINDFORMERS_CPU_KERNELS', '1' if request.param == 'kernels' else '0')
    saved = dict(cpu_kernels._STATE)
    cpu_kernels._STATE.clear()
    yield request.param
    cpu_kernels._STATE.clear()
    cpu_kernels._STATE.update(saved)
