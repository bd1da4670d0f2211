"""Process context: device, graph/pynative mode, and (optionally) the distributed group."""
import glob
import os
from dataclasses import dataclass, field, fields

import mindspore as ms
import numpy as np
from mindspore import ops

from mindformers.tools.logger import logger

_DEVICE_PROBES = {
    'Ascend': lambda: bool(glob.glob('/dev/davinci[0-9]*')),
    'GPU': lambda: bool(glob.glob('/dev/nvidia[0-9]*')),
    'CPU': lambda: True,
}


def device_available(device_target):
    """True when `device_target` ('Ascend', 'GPU', 'CPU') has hardware and a loadable MindSpore backend."""
    if device_target not in _DEVICE_PROBES:
        raise ValueError(f"unknown device_target {device_target!r}; use one of Ascend, GPU, CPU")
    if device_target == 'CPU':
        return True
    return _DEVICE_PROBES[device_target]() and ms.hal.is_available(device_target)


def best_device():
    """The first available of Ascend, GPU, CPU."""
    for target in ('Ascend', 'GPU', 'CPU'):
        if device_available(target):
            return target
    return 'CPU'


def _set_context_keys():
    """The keywords `mindspore.set_context` accepts (read from MindSpore)."""
    from mindspore import context
    return set(context._context().setters) | {k for k in context.ms_ctx_param.__members__ if not k.startswith('_')}


def _set_auto_parallel_context_keys():
    """The keywords `mindspore.set_auto_parallel_context` accepts (read from MindSpore)."""
    from mindspore.parallel import _auto_parallel_context
    return set(_auto_parallel_context._set_auto_parallel_context_func_map)


class _FromDict:
    """`from_dict(mapping)`: known keys become fields, other keywords of the MindSpore setter (`_mindspore_keys`)
    go to `extra` (passed on as is), anything else is refused (ValueError naming `<SECTION>.<key>`)."""
    SECTION = ''

    @classmethod
    def from_dict(cls, mapping):
        if mapping is not None and not isinstance(mapping, dict):
            raise ValueError(f"{cls.SECTION} must be a mapping, got {mapping!r}")
        mapping = dict(mapping or {})
        known = {f.name for f in fields(cls)} - {'extra'}
        extra = {k: mapping.pop(k) for k in list(mapping) if k not in known}
        passed_on = cls._mindspore_keys()
        unknown = sorted(set(extra) - passed_on, key=str)
        if unknown:
            from mindformers.tools.register.config import unknown_key_message
            raise ValueError('; '.join(unknown_key_message(f"{cls.SECTION}.{key}", known | passed_on)
                                       for key in unknown))
        return cls(**mapping, extra=extra)

    @staticmethod
    def _mindspore_keys():
        return set()


@dataclass
class ContextConfig(_FromDict):
    """MindSpore context settings. `mode` 0 = GRAPH_MODE (compiled, default), 1 = PYNATIVE_MODE.
    `device_target` None picks the best device present. `enable_compile_cache` / `compile_cache_path` are applied by
    each training, not process-wide (`mindformers.core.context.compile_cache.TrainingCompileCache`)."""
    mode: int = 0
    device_target: str = None
    device_id: int = None
    max_call_depth: int = 10000
    max_device_memory: str = None
    save_graphs: bool = False
    save_graphs_path: str = './graph'
    jit_config: dict = None
    enable_compile_cache: bool = False
    compile_cache_path: str = None
    extra: dict = field(default_factory=dict)
    SECTION = 'context'
    _mindspore_keys = staticmethod(_set_context_keys)


@dataclass
class ParallelContextConfig(_FromDict):
    """Distributed context. `parallel_mode`: 0/'data_parallel', 1/'semi_auto_parallel', 2/'auto_parallel',
    3/'hybrid_parallel', or 'stand_alone'."""
    parallel_mode: object = 0
    gradients_mean: bool = True
    full_batch: bool = False
    enable_parallel_optimizer: bool = False
    search_mode: str = 'sharding_propagation'
    strategy_ckpt_save_file: str = None
    strategy_ckpt_load_file: str = None
    device_num: int = None
    extra: dict = field(default_factory=dict)
    SECTION = 'parallel'
    _mindspore_keys = staticmethod(_set_auto_parallel_context_keys)


_PARALLEL_MODES = {0: 'data_parallel', 1: 'semi_auto_parallel', 2: 'auto_parallel', 3: 'hybrid_parallel',
                   'stand_alone': 'stand_alone', 'data_parallel': 'data_parallel',
                   'semi_auto_parallel': 'semi_auto_parallel', 'auto_parallel': 'auto_parallel',
                   'hybrid_parallel': 'hybrid_parallel'}
# set by msrun (dynamic cluster), by run_distribute.sh (HCCL rank table) and by mpirun
_LAUNCHER_ENV = ('MS_ROLE', 'RANK_TABLE_FILE', 'OMPI_COMM_WORLD_SIZE')


def init_context(use_parallel=False, context_config=None, parallel_config=None):
    """Set the MindSpore context and, with `use_parallel`, join the process group.

    Returns `(rank_id, device_num)`. Raises RuntimeError naming the device when the requested one is absent."""
    if not isinstance(context_config, ContextConfig):
        context_config = ContextConfig.from_dict(context_config)
    if not isinstance(parallel_config, ParallelContextConfig):
        parallel_config = ParallelContextConfig.from_dict(parallel_config)
    target = context_config.device_target or best_device()
    if not device_available(target):
        raise RuntimeError(f"device_target {target!r} was requested but is not available on this machine "
                           f"(available: {best_device()}); set context.device_target or --device_target accordingly")
    if context_config.mode not in (0, 1, 'GRAPH_MODE', 'PYNATIVE_MODE'):
        raise ValueError(f"context.mode must be 0 (GRAPH_MODE) or 1 (PYNATIVE_MODE), got {context_config.mode!r}")
    mode = {'GRAPH_MODE': 0, 'PYNATIVE_MODE': 1}.get(context_config.mode, context_config.mode)
    device_id = None
    if (context_config.device_id is not None or os.environ.get('DEVICE_ID')) and target != 'CPU':
        device_id = context_config.device_id if context_config.device_id is not None else int(os.environ['DEVICE_ID'])
    _set_device(target, device_id)
    ms.set_context(mode=mode, **context_config.extra)
    ms.set_recursion_limit(context_config.max_call_depth)
    if context_config.save_graphs:
        os.environ.update(MS_DEV_SAVE_GRAPHS=str(2 if context_config.save_graphs is True else
                                                 int(context_config.save_graphs)),
                          MS_DEV_SAVE_GRAPHS_PATH=context_config.save_graphs_path)
    if context_config.max_device_memory and target != 'CPU':
        ms.runtime.set_memory(max_size=context_config.max_device_memory)
    if context_config.jit_config:
        ms.set_context(jit_config=dict(context_config.jit_config))

    if not use_parallel:
        workers = os.environ.get('MS_WORKER_NUM', '1')
        if os.environ.get('MS_ROLE') == 'MS_WORKER' and workers.isdigit() and int(workers) > 1:
            raise RuntimeError(f"this process is one of {workers} msrun workers but use_parallel is False: each would "
                               f"train alone on all the data and write the same rank_0 files; pass --use_parallel "
                               f"True (or set use_parallel: True in the YAML)")
        return 0, 1

    mode_name = _PARALLEL_MODES.get(parallel_config.parallel_mode)
    if mode_name is None:
        raise ValueError(f"parallel.parallel_mode {parallel_config.parallel_mode!r} is not one of "
                         f"0 (data_parallel), 1 (semi_auto_parallel), 2 (auto_parallel), 3 (hybrid_parallel)")
    if target == 'CPU' and mode_name in ('semi_auto_parallel', 'auto_parallel'):
        raise RuntimeError(f"parallel.parallel_mode {mode_name} needs Ascend or GPU (MindSpore supports it only with "
                           f"hccl/nccl); on CPU use parallel_mode 0 (data_parallel) under msrun")
    if not any(os.environ.get(name) for name in _LAUNCHER_ENV):
        raise RuntimeError("use_parallel is True but this process was not started by a distributed launcher (none "
                           f"of {', '.join(_LAUNCHER_ENV)} is set): start it with scripts/msrun_launcher.sh (or "
                           "msrun), or with scripts/run_distribute.sh and a rank table on Ascend; for one process "
                           "set use_parallel: False")
    from mindspore import communication
    communication.init()
    rank_id = communication.get_rank()
    device_num = communication.get_group_size()
    auto_kwargs = dict(parallel_mode=mode_name, gradients_mean=parallel_config.gradients_mean,
                       device_num=device_num)
    if mode_name in ('semi_auto_parallel', 'auto_parallel'):
        auto_kwargs.update(full_batch=parallel_config.full_batch,
                           enable_parallel_optimizer=parallel_config.enable_parallel_optimizer)
        if mode_name == 'auto_parallel':
            auto_kwargs['search_mode'] = parallel_config.search_mode
        if parallel_config.strategy_ckpt_save_file:
            auto_kwargs['strategy_ckpt_save_file'] = parallel_config.strategy_ckpt_save_file
        if parallel_config.strategy_ckpt_load_file:
            auto_kwargs['strategy_ckpt_load_file'] = parallel_config.strategy_ckpt_load_file
    auto_kwargs.update(parallel_config.extra)
    ms.set_auto_parallel_context(**auto_kwargs)
    logger.info("distributed: rank %d of %d, parallel_mode %s", rank_id, device_num, mode_name)
    return rank_id, device_num


def _set_device(target, device_id):
    """`mindspore.set_device`, which a process may call only before its first computation and then only with the same
    values: nothing to do when the device in use is already the one asked for."""
    current = ms.get_current_device()
    if current.device_target == target and device_id in (None, current.device_id):
        return
    try:
        ms.set_device(target, device_id)
    except RuntimeError as error:
        raise RuntimeError(f"device_target {target!r}{'' if device_id is None else f' (device_id {device_id})'} was "
                           f"requested, but this process already computes on {current.device_target} "
                           f"{current.device_id}; set the device before anything runs on MindSpore "
                           f"({error})") from None


def sum_over_ranks(values):
    """Element-wise sum of a list of floats over all ranks of the process group, as float64 NumPy (every rank
    gets the same result). Collectives carry no float64, so each value travels as a float32 (high, low) pair and
    the sum keeps float64 precision, e.g. token counts beyond 2**24."""
    values = np.asarray(values, np.float64).reshape(-1)
    high = values.astype(np.float32)
    low = (values - high).astype(np.float32)
    gathered = ops.AllGather()(ms.Tensor(np.stack([high, low])[None]))  # [ranks, 2, n]
    return gathered.asnumpy().astype(np.float64).sum(axis=(0, 1))
