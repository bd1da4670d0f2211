"""MindSpore's compile cache for training, used only where it can work and keyed so that a cached graph is loaded
only for the graph it was compiled from.

MindSpore 2.10 (`MS_COMPILER_CACHE_ENABLE` / `MS_COMPILER_CACHE_PATH`) saves the graphs compiled while the cache is
on as `<path>/rank_<r>/graph_cache/compile_cache_<i>.mindir`, i counting those compiles, and on a later run loads
graph i for whatever is compiled i-th, checking only a hash of the entry script and its local imports: another
model or shape gets a wrong graph, or a crash (SIGSEGV). It reads the path once per process, and its dependency
scan opens `sys.argv[0]`, which fails for `python -c` / `python - < file`. Hence `TrainingCompileCache`: one
directory per key of everything that shapes the training graphs, the cache on from the start of one training per
process to the end of its first step (the graphs compiled later, e.g. for evaluation, depend on more than the key),
a lock per rank against concurrent runs, and a marker per rank written once a first step has completed (a directory
without it, left by a run that died while compiling, is emptied). Whenever the cache cannot be used the run trains
without it and logs one info line saying why."""
import fcntl
import functools
import hashlib
import inspect
import json
import os
import platform
import shutil
import sys

import numpy as np
import mindspore as ms
from mindspore import nn, Parameter, Tensor
from mindspore.ops import Primitive
from mindspore.train import Callback

from mindformers.tools.logger import logger
from mindformers.tools.utils import cache_dir

_ENV = ('MS_COMPILER_CACHE_ENABLE', 'MS_COMPILER_CACHE_PATH')
_STATE = {}  # 'used': the path this process cached into; 'saved_env', 'lock': while the cache is on


def unusable_reason():
    """Why MindSpore's compile cache cannot work in this process, or None. Its dependency scan starts from the
    entry script: there is none in an interactive session, and `python -c` / `python - < file` name one that does
    not exist (`<cwd>/-c`, `<cwd>/-`)."""
    from mindspore.graph import api  # pylint: disable=import-outside-toplevel
    if api.entry_script_path is None or not os.path.isfile(api.entry_script_path):
        return f"the entry point {sys.argv[0] if sys.argv else ''!r} is not a script file"
    try:
        api._get_compile_cache_dep_files()  # pylint: disable=protected-access
    except (OSError, SyntaxError, ValueError, ImportError) as error:
        return f"MindSpore cannot scan the imports of {api.entry_script_path} ({type(error).__name__}: {error})"
    return None


def enable_compile_cache(path, rank_id=0):
    """Turn MindSpore's compile cache on with `path` for the graphs compiled from now on in this process; False
    (and one info line saying why) when it cannot be used: see `unusable_reason`, MindSpore's own cache switched on
    in the environment, the path taken by a running process, or an earlier cache in this process (MindSpore reads
    the path once)."""
    disable_compile_cache()
    reason = unusable_reason()
    if reason is None and os.environ.get('MS_COMPILER_CACHE_ENABLE', '0') != '0':
        reason = "MS_COMPILER_CACHE_ENABLE is set in the environment (MindSpore caches every graph itself)"
    if reason is None and _STATE.get('used'):
        reason = f"this process already cached into {_STATE['used']} (MindSpore reads the cache path once)"
    lock = None
    if reason is None:
        os.makedirs(path, exist_ok=True)
        # held until the cache is turned off  # pylint: disable=consider-using-with
        lock = open(os.path.join(path, f'rank_{rank_id}.lock'), 'a', encoding='utf-8')
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            lock.close()
            reason = f"another process is using {path}"
    if reason is not None:
        logger.info("compile cache not used: %s; compiling without it", reason)
        return False
    if not os.path.exists(_marker(path, rank_id)):  # left by a run that died before its first step completed
        shutil.rmtree(os.path.join(path, f'rank_{rank_id}'), ignore_errors=True)
    _STATE.update(used=path, lock=lock, rank=rank_id, saved_env={name: os.environ.get(name) for name in _ENV})
    os.environ.update(MS_COMPILER_CACHE_ENABLE='1', MS_COMPILER_CACHE_PATH=path)
    logger.info("compile cache: %s", path)
    return True


def disable_compile_cache(complete=False):
    """Turn the cache off for the graphs compiled from now on (the environment as it was before
    `enable_compile_cache`); `complete`: what was compiled is a finished set (the marker that lets a later run
    load it)."""
    lock = _STATE.pop('lock', None)
    if lock is None:
        return
    for name, value in _STATE.pop('saved_env').items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
    if complete:
        with open(_marker(_STATE['used'], _STATE['rank']), 'w', encoding='utf-8'):
            pass
    lock.close()


def _marker(path, rank_id):
    return os.path.join(path, f'rank_{rank_id}.complete')


class TrainingCompileCache(Callback):
    """The compile cache for one training (`context.enable_compile_cache` of the run `config`): on from
    `on_train_begin` until its first step has ended, in `<context.compile_cache_path or
    $MINDFORMERS_CACHE/compile_cache>/<key>` with key = `training_cache_key(train_cell, dataset, config)`."""

    def __init__(self, config, train_cell, dataset, rank_id=0):
        super().__init__()
        context = config.get('context') or {}
        self.wanted = bool(context.get('enable_compile_cache'))
        self.root = context.get('compile_cache_path')
        self.config, self.train_cell, self.dataset, self.rank_id = config, train_cell, dataset, rank_id

    def on_train_begin(self, run_context):
        if not self.wanted:
            return
        key, reason = None, unusable_reason()
        if reason is None:
            key, reason = training_cache_key(self.train_cell, self.dataset, self.config)
        if key is None:
            disable_compile_cache()
            logger.info("compile cache not used: %s; compiling without it", reason)
            return
        root = self.root or cache_dir('compile_cache')
        enable_compile_cache(os.path.join(root, key), self.rank_id)

    def on_train_step_end(self, run_context):
        disable_compile_cache(complete=True)

    def on_train_end(self, run_context):
        disable_compile_cache()


def training_cache_key(train_cell, dataset, config):
    """(key, None), or (None, why) when the graphs cannot be keyed. The key is a digest of everything that shapes
    the training graphs: every cell of `train_cell` (model, loss, wrapper, optimizer, learning-rate schedule: class,
    settings, primitives with their attributes, constant tensors, parameter shapes and dtypes, and the source file of
    each class), the dataset's columns with their shapes and dtypes, the run config's runner/optimizer/parallel
    settings, the CPU-kernel mode, MindSpore's graph settings and version, Python's version, mindformers' sources
    (Python and kernel C++) and the entry script's (MindSpore checks these too, and would rewrite the directory)."""
    sources = {}
    cells = []
    for name, cell in train_cell.cells_and_names():
        cls = type(cell)
        path = f'{cls.__module__}.{cls.__qualname__}'
        if path not in sources and not cls.__module__.startswith('mindspore.'):
            try:
                sources[path] = _file_digest(inspect.getsourcefile(cls))
            except (OSError, TypeError):
                return None, f"the source of {path} is not a readable file"
        cells.append([name, path, _cell_settings(cell)])
    from mindspore.graph import api  # pylint: disable=import-outside-toplevel
    try:
        entry = [_file_digest(path) for path in api._get_compile_cache_dep_files()]  # pylint: disable=protected-access
    except (OSError, SyntaxError, ValueError, ImportError) as error:
        return None, f"MindSpore cannot scan the entry script's imports ({type(error).__name__})"
    try:  # reads the first batch: a bad one is the training loop's to report, naming its file and row
        columns = [list(dataset.get_col_names()), [list(s) for s in dataset.output_shapes()],
                   [str(t) for t in dataset.output_types()]]
    except RuntimeError:
        return None, "the dataset's first batch could not be read"
    described = {
        'cells': cells, 'sources': sources, 'entry': entry, 'mindformers': _source_digest(),
        'dataset': columns,
        'config': {k: config.get(k) for k in ('runner_config', 'runner_wrapper', 'optimizer', 'lr_schedule',
                                              'callbacks', 'parallel_config', 'recompute_config', 'use_parallel',
                                              'parallel')},
        'jit': [ms.get_context('mode'), ms.get_context('jit_config'), ms.get_current_device().device_target,
                ms.get_auto_parallel_context('parallel_mode'), ms.get_auto_parallel_context('device_num'),
                sorted((k, v) for k, v in os.environ.items() if k.startswith('MS_DEV_'))],
        'cpu_kernels': os.environ.get('MINDFORMERS_CPU_KERNELS', '1'),
        'versions': [ms.__version__, platform.python_version()],
    }
    try:
        text = json.dumps(described, sort_keys=True, default=_plain)
    except (TypeError, ValueError) as error:  # e.g. a circular reference among a cell's settings
        return None, f"the training graph's settings cannot be described ({error})"
    return hashlib.sha256(text.encode()).hexdigest()[:20], None


def _cell_settings(cell):
    """A cell's own (not its sub-cells') graph-shaping state as plain data."""
    settings = {key: value for key, value in vars(cell).items()
                if not key.startswith('_') and not isinstance(value, (nn.Cell, Primitive)) and key != 'arguments_key'}
    primitives, params = cell._primitives, cell._params  # pylint: disable=protected-access
    settings['_primitives'] = {key: [prim.name, sorted((k, str(v)) for k, v in prim.attrs.items())]
                               for key, prim in primitives.items() if prim is not None}
    settings['_params'] = {key: [list(p.shape), str(p.dtype), p.requires_grad]
                           for key, p in params.items() if p is not None}
    return settings


def _plain(value):
    """JSON for what json cannot write: parameters by name, shape and dtype (their values are inputs of the graph),
    other tensors (constants in it) also by a digest of their values; anything else by its type and, when simple,
    its fields."""
    if isinstance(value, Parameter):
        return [value.name, list(value.shape), str(value.dtype)]
    if isinstance(value, Tensor):
        data = value.asnumpy()
        return [list(data.shape), str(data.dtype), hashlib.sha256(np.ascontiguousarray(data).tobytes()).hexdigest()]
    if isinstance(value, (set, frozenset)):
        return sorted(map(str, value))
    if hasattr(value, 'to_dict'):
        return value.to_dict()
    fields = getattr(value, '__dict__', None)
    if isinstance(fields, dict) and not isinstance(value, type):
        return [type(value).__qualname__, {k: v for k, v in fields.items() if not k.startswith('_')}]
    return f'{type(value).__qualname__}:{value}' if type(value).__repr__ is not object.__repr__ else \
        type(value).__qualname__


def _file_digest(path):
    with open(path, 'rb') as f:
        return [os.path.basename(path), hashlib.sha256(f.read()).hexdigest()]


@functools.lru_cache(maxsize=1)
def _source_digest():
    """SHA-256 over the sources of the mindformers package: Python and the CPU kernels' C++."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    digest = hashlib.sha256()
    for folder, dirs, names in os.walk(root):
        dirs.sort()
        for name in sorted(n for n in names if n.endswith(('.py', '.cc', '.h'))):
            digest.update(os.path.relpath(os.path.join(folder, name), root).encode())
            with open(os.path.join(folder, name), 'rb') as f:
                digest.update(f.read())
    return digest.hexdigest()
