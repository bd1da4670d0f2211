"""Shared test setup: the repo first on sys.path, compiled mode on CPU, a per-session compile cache, and the shared
fixtures. Helpers live in the `helpers` package beside this file."""
import gc
import os
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)


def pytest_collection_finish(session):
    """MindSpore runs a full gc.collect() before compiling each graph; with torch, transformers and every test module
    imported, that pass costs ~0.3 s, hundreds of times. Freeze what collection left alive (modules, their objects):
    the passes skip it, and the objects the tests create are still collected."""
    gc.collect()
    gc.freeze()


@pytest.fixture(scope='session', autouse=True)
def _cpu_graph_mode():
    import mindspore as ms
    ms.set_context(mode=0)
    if ms.get_current_device().device_target != 'CPU':  # set_device: once, before anything runs
        ms.set_device('CPU')
    yield


# compiled graphs and kernels go to a per-session cache, never the user's home
os.environ.setdefault('MINDFORMERS_CACHE', os.path.join(__import__('tempfile').mkdtemp(prefix='mf-test-cache-')))


@pytest.fixture(scope='module')
def cpu_kernels_on():
    """For test modules that exercise the kernels even when the suite runs with MINDFORMERS_CPU_KERNELS=0."""
    from helpers.kernel_checks import cpu_kernels_set
    with cpu_kernels_set(True):
        yield


@pytest.fixture(params=['kernels', 'plain'])
def kernel_mode(request):
    """Runs a test twice: with the fused CPU kernels and with plain MindSpore ops. Build the cells under test inside
    the test, after this fixture has set the mode."""
    from helpers.kernel_checks import cpu_kernels_set
    with cpu_kernels_set(request.param == 'kernels'):
        yield request.param


@pytest.fixture
def clean_registry():
    """MindFormerRegister (yielded) with its tables restored after the test: register classes freely."""
    from helpers.registry import registry_restored
    with registry_restored() as register:
        yield register
