"""The run's model from its run config: the one builder behind the Trainer, `only_save_strategy` and the
`export_strategy` CLI, so the three cannot disagree about the network a config describes."""
import copy
import dataclasses
import os

import numpy as np
import mindspore as ms

from mindformers.parallel.config import build_parallel_config
from mindformers.tools.build import build_model, build_model_config
from mindformers.tools.logger import logger
from mindformers.tools.weights import built_for_checkpoint

__all__ = ['build_network', 'model_section', 'run_parallel_config', 'validate_parallel']


def model_section(config):
    """The run config's `model` section; KeyError when it or its `model_config` / `arch` is missing."""
    if 'model' not in config:
        raise KeyError("the run config has no 'model' section (model.model_config and model.arch)")
    section = config['model']
    for key in ('model_config', 'arch'):
        if key not in section:
            raise KeyError(f"model section lacks '{key}' (expected model.model_config.type and model.arch.type)")
    return section


def run_parallel_config(config):
    """The ParallelConfig of the run config's `parallel_config` and `recompute_config` sections."""
    return build_parallel_config(config.get('parallel_config'), config.get('recompute_config'))


def validate_parallel(parallel, model_config, device_num):
    """`parallel.validate(device_num, model_config)` before a model is built for it. In data-parallel mode MindSpore
    replicates the whole model on every rank, so an all-1 parallel_config there stands for data_parallel =
    `device_num`."""
    if (device_num > 1 and ms.get_auto_parallel_context('parallel_mode') == 'data_parallel'
            and (parallel.data_parallel, parallel.model_parallel, parallel.pipeline_stage) == (1, 1, 1)):
        parallel = dataclasses.replace(parallel, data_parallel=device_num)
    parallel.validate(device_num, model_config if hasattr(model_config, 'num_layers') else None)


def build_network(config, parallel=None, device_num=None, allocate=True, checkpoint=None):
    """The model a run config's `model` section describes (`model.arch` on `model.model_config`), laid out by
    `parallel` (default: `run_parallel_config(config)`) and validated for `device_num` devices (default: the devices
    `parallel` spans, data x model x pipeline). `checkpoint`: whole weights to build it with, in place of
    `checkpoint_name_or_path` (anything that takes). A model with weights to load (`checkpoint`, or
    `checkpoint_name_or_path`) is built without initialising what they set and reads them tensor by tensor while it
    is built (`BaseModel.load_checkpoint`: per-tensor HF conversion, int8 quantization as they load).
    `allocate=False` builds the cells without allocating weights and without loading `checkpoint_name_or_path`:
    enough to derive parameter layouts (strategy files) of any size."""
    parallel = run_parallel_config(config) if parallel is None else parallel
    if device_num is None:
        device_num = parallel.data_parallel * parallel.model_parallel * parallel.pipeline_stage
    section = model_section(config)
    model_config = section['model_config']
    if isinstance(model_config, dict) or not hasattr(model_config, 'to_dict'):
        model_config = build_model_config(model_config, {'parallel_config': parallel})
    else:
        model_config = model_config if allocate and not checkpoint else copy.copy(model_config)
        model_config.parallel_config = parallel
    if checkpoint:
        model_config.checkpoint_name_or_path = os.fspath(checkpoint)
    validate_parallel(parallel, model_config, device_num)
    if allocate:
        def build():
            return build_model({'model_config': model_config, 'arch': section['arch']})
        network = built_for_checkpoint(build) if getattr(model_config, 'checkpoint_name_or_path', '') else build()
        logger.info("built %s with %.2fM parameters", type(network).__name__,
                    sum(int(np.prod(p.shape)) for p in network.get_parameters()) / 1e6)
        return network
    from mindspore.nn.utils import no_init_parameters
    model_config.checkpoint_name_or_path = ''
    with no_init_parameters():
        return build_model({'model_config': model_config, 'arch': section['arch']})
