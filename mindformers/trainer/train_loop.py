"""The train loop: optimizer steps over the training data with gradient accumulation, resume arithmetic (which
epoch and batch a checkpoint continues from), callbacks, step records and evaluation during training."""
import math
import os

import numpy as np
import mindspore as ms
from mindspore import Tensor
from mindspore.nn.learning_rate_schedule import LearningRateSchedule
from mindspore.train.callback import RunContext

from mindformers.core.callback import TrainState, append_metrics
from mindformers.core.context.compile_cache import TrainingCompileCache
from mindformers.core.lr import build_lr
from mindformers.core.optim import build_optim
from mindformers.tools.build import build_callback, build_wrapper
from mindformers.tools.checkpoint import CheckpointError
from mindformers.tools.logger import logger
from mindformers.trainer.evaluation import describe
from mindformers.trainer.resume import check_run_shape, restore_train_state
from mindformers.trainer.utils import column_arguments

__all__ = ['TrainLoop', 'build_train_cell', 'resume_location', 'eval_intervals', 'record_step']


def build_train_cell(config, network, total_steps, accumulation, optimizer=None):
    """(train step cell, optimizer): the run config's `runner_wrapper` (default MFTrainOneStepCell) around `network`
    and `optimizer` (default: the config's `optimizer` with its `lr_schedule` over `total_steps`, over the network's
    trainable parameters only: frozen ones get no optimizer state). A given optimizer holding frozen parameters is
    refused: it would keep moments for them and decay them."""
    if optimizer is not None:
        frozen = [p.name for p in optimizer.parameters if not p.requires_grad]
        if frozen:
            raise ValueError(f"optimizers: the optimizer updates {len(frozen)} frozen parameter(s) (e.g. "
                             f"{', '.join(frozen[:3])}); build it over model.trainable_params()")
    else:
        lr = build_lr(dict(config.lr_schedule), total_steps=total_steps) if config.get('lr_schedule') else None
        optimizer = build_optim(dict(config.optimizer), params=network.trainable_params(), learning_rate=lr)
    wrapper_cfg = dict(config.get('runner_wrapper') or {'type': 'MFTrainOneStepCell'})
    scale_sense = wrapper_cfg.get('scale_sense')
    if isinstance(scale_sense, dict):
        wrapper_cfg['scale_sense'] = build_wrapper(dict(scale_sense), where='runner_wrapper.scale_sense')
    train_cell = build_wrapper(wrapper_cfg, default_args={
        'network': network, 'optimizer': optimizer, 'gradient_accumulation_steps': accumulation},
        where='runner_wrapper')
    train_cell.set_train(True)
    return train_cell, optimizer


def resume_location(config, resume_training, checkpoint):
    """None, or where to resume from: True -> `checkpoint` if it is a directory, else `<output_dir>/checkpoint`; a
    path -> that path. `resume_training` None falls back to the config's `resume_training`."""
    value = config.get('resume_training', False) if resume_training is None else resume_training
    if isinstance(value, str) and value.strip().lower() in ('true', 'false', ''):
        value = value.strip().lower() == 'true'
    if not value:
        return None
    if value is True:
        if checkpoint and os.path.isdir(os.fspath(checkpoint)):
            return os.fspath(checkpoint)
        return os.path.join(config.output_dir, 'checkpoint')
    return os.fspath(value)


def eval_intervals(config, do_eval):
    """(every n optimizer steps, every n epochs) to evaluate at; 0 = never. do_eval without either: each epoch."""
    if not (config.get('do_eval', False) if do_eval is None else do_eval):
        return 0, 0
    steps, epochs = int(config.get('eval_step_interval') or 0), int(config.get('eval_epoch_interval') or 0)
    return (steps, epochs) if steps or epochs else (0, 1)


def record_step(state, losses, grad_norm, optimizer):
    """Count an optimizer step; its loss is the mean of its micro batches' `losses` (Tensors)."""
    state.cur_step_num += 1
    state.step_in_epoch += 1
    state.loss = float(np.mean([float(loss.asnumpy()) for loss in losses]))
    state.grad_norm = float(grad_norm.asnumpy())
    lr = optimizer.learning_rate
    if isinstance(lr, LearningRateSchedule):
        lr = lr(Tensor(state.cur_step_num - 1, ms.int32))
    state.lr = float(np.asarray(lr.asnumpy()).reshape(-1)[0])
    state.losses.append(state.loss)
    if not math.isfinite(state.loss):
        logger.warning("step %d: loss is %s", state.cur_step_num, state.loss)


def _call(callbacks, event, run_context):
    for cb in callbacks:
        getattr(cb, event)(run_context)


class TrainLoop:
    """One training run of `network` per the run `config` (`runner_config` epochs, gradient_accumulation_steps).

    `make_dataset(start_epoch)` gives the training dataset starting at that epoch; `dataset_given`: it is the user's
    dataset object, which cannot start at an epoch (its earlier epochs are read and dropped on resume). `point`: the
    ResumePoint to continue from, or None for the network's current weights. Construction builds the dataset, the
    train cell and `state` (a TrainState, restored from `point`); `run(do_eval)` trains and returns `state`.
    `evaluate()` returns an evaluation result dict, run every `eval_intervals`."""

    def __init__(self, config, network, make_dataset, point=None, optimizer=None, callbacks=(), evaluate=None,
                 rank_id=0, device_num=1, dataset_given=False):
        self.config, self.network, self.evaluate = config, network, evaluate
        self.rank_id, self.device_num, self.extra_callbacks = rank_id, device_num, list(callbacks)
        runner = config.runner_config
        self.epochs = int(runner.get('epochs', 1))
        self.accumulation = accumulation = int(runner.get('gradient_accumulation_steps', 1) or 1)
        start_epoch, skip_batches = (0, 0) if point is None else (point.epoch - 1, point.step_in_epoch * accumulation)
        dataset = make_dataset(start_epoch)
        batches_per_epoch = dataset.get_dataset_size()
        steps_per_epoch = batches_per_epoch // accumulation
        if steps_per_epoch < 1:
            raise ValueError(f"the training dataset has {batches_per_epoch} batch(es) per epoch, fewer than "
                             f"gradient_accumulation_steps={accumulation}; use more data or a smaller batch_size")
        run_shape = {'batch_size': int(dataset.get_batch_size()), 'gradient_accumulation_steps': accumulation,
                     'device_num': device_num, 'steps_per_epoch': steps_per_epoch}
        if point is not None:
            check_run_shape(point, run_shape)
        if point is not None and point.step_in_epoch >= steps_per_epoch:  # saved at an epoch's end
            start_epoch, skip_batches = point.epoch, 0
            if not dataset_given:
                dataset = make_dataset(start_epoch)
        total_steps = self.epochs * steps_per_epoch
        if start_epoch >= self.epochs:
            raise ValueError(f"resume_training: {point.path} is from epoch {point.epoch} step {point.step_in_epoch}, "
                             f"which is already the end of this {self.epochs}-epoch run; raise runner_config.epochs "
                             f"to train further")
        self.dataset, self.run_shape = dataset, run_shape
        self.start_epoch, self.skip_batches, self.steps_per_epoch = start_epoch, skip_batches, steps_per_epoch
        self.replay_epochs = start_epoch if dataset_given else 0

        self.train_cell, self.optimizer = build_train_cell(config, network, total_steps, accumulation, optimizer)
        self.state = state = TrainState(
            train_network=self.train_cell, network=network, optimizer=self.optimizer, rank_id=rank_id,
            output_dir=config.output_dir, epoch_num=self.epochs, batch_num=steps_per_epoch, total_steps=total_steps,
            initial_step=0, tokens_per_step=0, run_shape=run_shape)
        if point is not None:
            restore_train_state(self.train_cell, point)
            state.cur_step_num = state.initial_step = start_epoch * steps_per_epoch + skip_batches // accumulation
            if state.cur_step_num != point.global_step:
                raise CheckpointError(f"resume_training: {point.path} was saved at global step {point.global_step}, "
                                      f"but epoch {point.epoch} step {point.step_in_epoch} is step "
                                      f"{state.cur_step_num} of this run; resume with the same data, batch_size, "
                                      f"gradient_accumulation_steps and device count")
            logger.info("resuming from %s: epoch %d, step %d of %d done", point.path, start_epoch + 1,
                        state.cur_step_num, total_steps)

    def run(self, do_eval=None):
        """Train to the end of `runner_config.epochs` (or until a callback requests a stop); returns `state`."""
        config, state, accumulation, train_cell = self.config, self.state, self.accumulation, self.train_cell
        callbacks = [build_callback(dict(cb), where='callbacks') for cb in config.get('callbacks') or []]
        callbacks = [TrainingCompileCache(config, train_cell, self.dataset, self.rank_id), *callbacks,
                     *self.extra_callbacks]
        eval_every_steps, eval_every_epochs = eval_intervals(config, do_eval)
        logger.info("training: %d epoch(s) x %d step(s) = %d optimizer steps, %d batch(es) of %d per step",
                    self.epochs, self.steps_per_epoch, state.total_steps, accumulation, self.run_shape['batch_size'])

        run_context = RunContext(state)
        _call(callbacks, 'on_train_begin', run_context)
        arg_columns = column_arguments(self.network, self.dataset.get_col_names())
        iterator = self.dataset.create_tuple_iterator(num_epochs=self.epochs - self.start_epoch + self.replay_epochs,
                                                      output_numpy=False)
        for _ in range(self.replay_epochs):
            for _ in iterator:
                pass
        first_epoch = self.start_epoch + 1
        for epoch in range(first_epoch, self.epochs + 1):
            state.cur_epoch_num = epoch
            skip = self.skip_batches if epoch == first_epoch else 0  # done before the checkpoint resumed from
            state.step_in_epoch = skip // accumulation
            _call(callbacks, 'on_train_epoch_begin', run_context)
            micro_losses = []  # of the accumulation window's first micro batches
            for batch_index, batch in enumerate(iterator):
                if batch_index < skip or batch_index >= self.steps_per_epoch * accumulation:
                    continue  # resumed past it, or a partial accumulation window at the epoch end
                batch = [t if t.dtype != ms.int64 else t.astype(ms.int32) for t in batch]
                batch = batch if arg_columns is None else [None if i is None else batch[i] for i in arg_columns]
                if not state.tokens_per_step:
                    state.tokens_per_step = int(batch[0].shape[0]) * max(int(batch[0].shape[-1]) - 1, 1) * \
                        accumulation * self.device_num
                if (batch_index + 1) % accumulation:
                    micro_losses.append(train_cell.accumulate(*batch))
                    continue
                loss, grad_norm = train_cell(*batch)
                record_step(state, [*micro_losses, loss], grad_norm, self.optimizer)
                micro_losses = []
                _call(callbacks, 'on_train_step_end', run_context)
                if eval_every_steps and state.cur_step_num % eval_every_steps == 0:
                    self._evaluate()
                if run_context.get_stop_requested():
                    break
            _call(callbacks, 'on_train_epoch_end', run_context)
            if eval_every_epochs and epoch % eval_every_epochs == 0:
                self._evaluate()
            if run_context.get_stop_requested():
                break
        _call(callbacks, 'on_train_end', run_context)
        return state

    def _evaluate(self):
        state = self.state
        result = self.evaluate()
        state.eval_results = result
        logger.info("eval at step %d: %s", state.cur_step_num, describe(result))
        append_metrics(state, {'step': state.cur_step_num, 'epoch': state.cur_epoch_num,
                               **{f'eval_{key}': value for key, value in result.items()}})
        self.train_cell.set_train(True)
