"""`only_save_strategy`: write a run's parallel strategy files instead of running it."""
import os

import numpy as np
import mindspore as ms
from mindspore import nn, Tensor

from mindformers.parallel.layout import run_layouts, strategy_only_trainable
from mindformers.parallel.strategy import write_strategy_files
from mindformers.tools.logger import logger
from mindformers.trainer.build import build_network, run_parallel_config
from mindformers.trainer.train_loop import build_train_cell

__all__ = ['save_strategy']


def save_strategy(config, rank_id, get_network, training, optimizer=None):
    """Write the strategy files of the run `config` under `<output_dir>/strategy/`.

    On CPU MindSpore cannot compile semi-auto-parallel (not even in its dry-run mode), so the layout the run's
    `parallel_config` gives its model (`build_network` without weights) is derived from its layers' shard
    declarations and written by rank 0 as MindSpore JSON strategy files, one per pipeline stage
    (`parallel.layout.run_layouts`, as the `export_strategy` CLI does). On Ascend/GPU (semi- or auto-parallel)
    `get_network()` is compiled, or its train step when `training`, and MindSpore saves
    `ckpt_strategy_rank_{rank}.ckpt`. Both lay out every parameter unless the config's
    `parallel.strategy_ckpt_config.only_trainable_params` is True (then the trainable ones, e.g. a LoRA delta)."""
    directory = os.path.join(config.output_dir, 'strategy')
    parallel = run_parallel_config(config)
    if ms.get_context('device_target') == 'CPU':
        network = build_network(config, parallel, allocate=False)
        if rank_id == 0:
            paths = write_strategy_files(run_layouts(config, network, None, parallel), directory)
            logger.info("only_save_strategy: MindSpore cannot compile semi-auto-parallel on CPU; wrote the "
                        "strategy files derived from the layers' shard declarations instead: %s", ', '.join(paths))
        return
    mode = ms.get_auto_parallel_context('parallel_mode')
    if mode not in ('semi_auto_parallel', 'auto_parallel'):
        raise ValueError(f"only_save_strategy: a strategy exists under semi- or auto-parallel only, but "
                         f"parallel_mode is {mode}; set use_parallel: True and parallel.parallel_mode: 1")
    path = os.path.join(directory, f'ckpt_strategy_rank_{rank_id}.ckpt')
    ms.set_auto_parallel_context(strategy_ckpt_config={'save_file': path,
                                                       'only_trainable_params': strategy_only_trainable(config)})
    if parallel.pipeline_stage > 1:
        ms.set_auto_parallel_context(pipeline_stages=parallel.pipeline_stage)
    network = get_network()
    # full_batch: every rank is fed the global batch of one step (runner_config.batch_size is per dp rank)
    batch = int(config.runner_config.get('batch_size') or 1) * parallel.data_parallel * \
        (parallel.micro_batch_num if parallel.pipeline_stage > 1 else 1)
    seq = int(network.config.seq_length)
    if training:
        steps = network if parallel.pipeline_stage == 1 else nn.PipelineCell(network, parallel.micro_batch_num)
        cell, _ = build_train_cell(config, steps, 1, 1, optimizer)
        cell.compile(Tensor(np.zeros((batch, seq + 1), np.int32)))
    else:
        network.set_train(False)
        network.compile(Tensor(np.zeros((batch, seq), np.int32)))
    logger.info("only_save_strategy: compiled under %s; MindSpore saved %s", mode, path)
