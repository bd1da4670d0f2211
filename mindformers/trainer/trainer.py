"""Trainer: builds everything a run config names and runs train, finetune, evaluate and predict."""
import copy
import hashlib
import inspect
import json
import math
import os

import numpy as np
import mindspore as ms
from mindspore import nn, Tensor
from mindspore.nn.learning_rate_schedule import LearningRateSchedule
from mindspore.train.callback import RunContext

from mindformers.core.callback import TrainState, append_metrics
from mindformers.core.context import init_context
from mindformers.core.lr import build_lr
from mindformers.core.metric import PerplexityMetric
from mindformers.core.optim import build_optim
from mindformers.core.parallel_config import build_parallel_config
from mindformers.tools.build import build_model, build_callback, build_wrapper, build_dataset, build_tokenizer
from mindformers.tools.checkpoint import CheckpointError, load_checkpoint_file, load_into_network, resolve_checkpoint
from mindformers.tools.logger import logger, setup_file_logging
from mindformers.tools.model_book import find_config
from mindformers.tools.utils import cache_dir
from mindformers.tools.register import MindFormerConfig, MindFormerRegister, MindFormerModuleType
from mindformers.trainer.resume import find_resume_checkpoint, restore_train_state
from mindformers.trainer.training_args import TrainingArguments

SUPPORTED_TASKS = {'text_generation': 'gpt2'}
_CONTEXT_DONE = {}


class _EvalLossCell(nn.Cell):
    """`(loss_sum, token_count)` of next-token prediction on `input_ids [B, S+1]` (run with the model in eval mode)."""

    def __init__(self, network):
        super().__init__(auto_prefix=False)
        self.network = network

    def construct(self, input_ids, attention_mask=None, labels=None):
        mean, count = self.network.next_token_loss(input_ids, attention_mask, labels)
        return mean * count, count


@MindFormerRegister.register(MindFormerModuleType.TRAINER)
class Trainer:
    """The high-level runner.

    `args`: a YAML path, a MindFormerConfig/dict (a full run config) or TrainingArguments (overriding the YAML of
    the model). `model`: a registered name (`gpt2`, `gpt2_tiny`, ...) or a model instance. `train_dataset` /
    `eval_dataset`: a MindRecord directory or file, or a `mindspore.dataset` object yielding the model's columns.
    """

    def __init__(self, args=None, task='text_generation', model=None, model_name=None, train_dataset=None,
                 eval_dataset=None, tokenizer=None, optimizers=None, callbacks=None, compute_metrics=None,
                 pet_method='', **kwargs):
        if kwargs:
            raise TypeError(f"Trainer got unknown argument(s): {', '.join(sorted(kwargs))}")
        if task not in SUPPORTED_TASKS:
            raise ValueError(f"task {task!r} is not supported; supported tasks: {', '.join(SUPPORTED_TASKS)}")
        if pet_method:
            raise NotImplementedError(f"pet_method={pet_method!r}: parameter-efficient tuning is not available yet "
                                      f"(planned: LoRA); use pet_method=''")
        self.task = task
        self.model = model if model is not None and not isinstance(model, str) else None
        if isinstance(model, str):
            model_name = model
        self.config = self._resolve_config(args, model_name or (None if self.model is not None else None))
        self.tokenizer = tokenizer
        self.optimizers = optimizers
        self.callbacks = list(callbacks or [])
        self.compute_metrics = compute_metrics
        self.train_dataset = self._dataset_arg(train_dataset, 'train_dataset')
        self.eval_dataset = self._dataset_arg(eval_dataset, 'eval_dataset')
        self.rank_id, self.device_num = 0, 1
        self.state = None

    # ----------------------------------------------------------------- config
    def _resolve_config(self, args, model_name):
        if isinstance(args, (str, os.PathLike)):
            config = MindFormerConfig(os.fspath(args))
        elif isinstance(args, dict):
            config = MindFormerConfig(copy.deepcopy(dict(args)))
        else:
            name = model_name or SUPPORTED_TASKS[self.task]
            config = MindFormerConfig(find_config(name))
            if isinstance(args, TrainingArguments):
                args.apply_to(config)
            elif args is not None:
                raise TypeError(f"args must be a YAML path, a config mapping or TrainingArguments, "
                                f"got {type(args).__name__}")
        config.setdefault('output_dir', './output')
        config.setdefault('seed', 0)
        config.setdefault('runner_config', {})
        return config

    def _dataset_arg(self, dataset, key):
        if isinstance(dataset, (str, os.PathLike)):
            self.config.merge_from_dict({f'{key}.data_loader.dataset_dir': os.fspath(dataset)})
            return None
        return dataset

    def set_parallel_config(self, data_parallel=1, model_parallel=1, pipeline_stage=1, micro_batch_num=1,
                            micro_batch_interleave_num=1, optimizer_shard=False, vocab_emb_dp=True,
                            use_seq_parallel=False, gradient_aggregation_group=4, expert_parallel=1):
        """Set `parallel_config` (applied to the model when it is built, or to the given instance's config)."""
        self.config['parallel_config'] = dict(
            data_parallel=data_parallel, model_parallel=model_parallel, pipeline_stage=pipeline_stage,
            micro_batch_num=micro_batch_num, micro_batch_interleave_num=micro_batch_interleave_num,
            optimizer_shard=optimizer_shard, vocab_emb_dp=vocab_emb_dp, use_seq_parallel=use_seq_parallel,
            gradient_aggregation_group=gradient_aggregation_group, expert_parallel=expert_parallel)

    def set_recompute_config(self, recompute=False, select_recompute=False, parallel_optimizer_comm_recompute=False,
                             mp_comm_recompute=True, recompute_slice_activation=False):
        """Set `recompute_config`; `recompute=True` recomputes every transformer block in the backward pass."""
        self.config['recompute_config'] = dict(
            recompute=recompute, select_recompute=select_recompute,
            parallel_optimizer_comm_recompute=parallel_optimizer_comm_recompute,
            mp_comm_recompute=mp_comm_recompute, recompute_slice_activation=recompute_slice_activation)

    # ----------------------------------------------------------------- building
    def _setup(self, compile_cache=True):
        """Context, seeds and logs. MindSpore's compile cache matches cached graphs to new ones by the order they are
        compiled in, so it is used only for training (one fixed sequence of graphs per config); evaluation and
        generation (graphs per prompt-length bucket) turn it off, also after training in the same process."""
        config = self.config
        if 'ids' not in _CONTEXT_DONE:
            parallel = dict(config.get('parallel') or {})
            context = dict(config.get('context') or {})
            if not compile_cache:
                context['enable_compile_cache'] = False
            elif context.get('enable_compile_cache') and not context.get('compile_cache_path'):
                context['compile_cache_path'] = _compile_cache_path(config)
            _CONTEXT_DONE['ids'] = init_context(bool(config.get('use_parallel', False)), context, parallel)
        if not compile_cache and ms.get_context('enable_compile_cache'):
            ms.set_context(enable_compile_cache=False)
        self.rank_id, self.device_num = _CONTEXT_DONE['ids']
        ms.set_seed(int(config.seed))
        np.random.seed(int(config.seed))
        setup_file_logging(config.output_dir, self.rank_id)

    def _parallel_config(self):
        return build_parallel_config(self.config.get('parallel_config'), self.config.get('recompute_config'))

    def _get_network(self):
        if self.model is not None:
            config = getattr(self.model, 'config', None)
            if config is not None and (self.config.get('parallel_config') or self.config.get('recompute_config')):
                config.parallel_config = self._parallel_config()
            return self.model
        if 'model' not in self.config:
            raise KeyError("the run config has no 'model' section (model.model_config and model.arch)")
        self.model = build_model(self.config.model, default_args={'parallel_config': self._parallel_config()})
        logger.info("built %s with %.2fM parameters", type(self.model).__name__,
                    sum(int(np.prod(p.shape)) for p in self.model.get_parameters()) / 1e6)
        return self.model

    def _load_weights(self, network, checkpoint):
        path = resolve_checkpoint(os.fspath(checkpoint), self.rank_id)
        load_into_network(network, load_checkpoint_file(path), path)
        logger.info("loaded weights from %s", path)
        return path

    def _checkpoint_arg(self, value):
        """True → newest checkpoint under output_dir; a str → that path; False/None → load_checkpoint of the YAML."""
        if value is True:
            return os.path.join(self.config.output_dir, 'checkpoint')
        if isinstance(value, (str, os.PathLike)) and value:
            return value
        return self.config.get('load_checkpoint') or None

    def _get_tokenizer(self):
        if self.tokenizer is None:
            tok_cfg = (self.config.get('processor') or {}).get('tokenizer')
            if not tok_cfg:
                raise ValueError("no tokenizer: pass tokenizer= to Trainer or set processor.tokenizer in the YAML")
            self.tokenizer = build_tokenizer(tok_cfg, where='processor.tokenizer')
        return self.tokenizer

    def _build_dataset(self, key, given, network, start_epoch=0):
        if given is not None:
            return given
        section = self.config.get(f'{key}_task')
        if not section:
            raise ValueError(f"no {key}: pass {key}= to Trainer (a directory or a mindspore dataset) or set "
                             f"{key}_task in the YAML")
        dataset_config = copy.deepcopy(dict(self.config.get(key) or section.get('dataset_config') or {}))
        dataset_config.setdefault('seed', int(self.config.seed))
        dataset_config['seq_length'] = int(network.config.seq_length)
        dataset_config['rank_id'], dataset_config['device_num'] = self.rank_id, self.device_num
        if key == 'train_dataset':  # runner_config.batch_size wins, as in MindFormers
            dataset_config['batch_size'] = self.config.runner_config.get('batch_size') or \
                dataset_config.get('batch_size', 1)
            dataset_config['start_epoch'] = start_epoch
        tokenizer_needed = (dataset_config.get('data_loader') or {}).get('type') == 'TextCorpusDataset'
        if tokenizer_needed and 'tokenizer' not in dataset_config['data_loader']:
            dataset_config['data_loader']['tokenizer'] = self._get_tokenizer()
        return build_dataset({'type': section.get('type', 'CausalLanguageModelDataset'),
                              'dataset_config': dataset_config}, where=f'{key}_task')

    # ----------------------------------------------------------------- train
    def train(self, train_checkpoint=False, resume_training=None, do_eval=None, **kwargs):
        """Train from scratch, or from `train_checkpoint` weights (True = newest under output_dir). Returns the
        final TrainState (losses, summary, last_checkpoint)."""
        return self._train(self._checkpoint_arg(train_checkpoint), resume_training, do_eval, kwargs)

    def finetune(self, finetune_checkpoint=False, resume_training=None, do_eval=None, **kwargs):
        """Train starting from pretrained weights: `finetune_checkpoint` (path, directory, or True for the newest
        under output_dir), else `load_checkpoint` / `model.model_config.checkpoint_name_or_path` of the YAML."""
        checkpoint = self._checkpoint_arg(finetune_checkpoint)
        if checkpoint is None:
            model_cfg = (self.config.get('model') or {}).get('model_config') or {}
            checkpoint = model_cfg.get('checkpoint_name_or_path') or None
        if checkpoint is None and self.model is None:
            raise ValueError("finetune needs pretrained weights: pass finetune_checkpoint=<path|True>, a model "
                             "instance, or set load_checkpoint in the config (--load_checkpoint on the CLI)")
        return self._train(checkpoint, resume_training, do_eval, kwargs)

    def _train(self, checkpoint, resume_training, do_eval, kwargs):
        if kwargs:
            raise TypeError(f"unknown argument(s): {', '.join(sorted(kwargs))}")
        self._setup()
        config = self.config
        network = self._get_network()
        resume = self._resume_location(resume_training, checkpoint)
        point = find_resume_checkpoint(resume, self.rank_id, self.device_num) if resume else None
        if checkpoint and point is None:
            self._load_weights(network, checkpoint)

        runner = config.runner_config
        epochs = int(runner.get('epochs', 1))
        accumulation = int(runner.get('gradient_accumulation_steps', 1) or 1)
        start_epoch, skip_batches = (0, 0) if point is None else (point.epoch - 1, point.step_in_epoch * accumulation)
        dataset = self._build_dataset('train_dataset', self.train_dataset, network, start_epoch=start_epoch)
        batches_per_epoch = dataset.get_dataset_size()
        steps_per_epoch = batches_per_epoch // accumulation
        if steps_per_epoch < 1:
            raise ValueError(f"the training dataset has {batches_per_epoch} batch(es) per epoch, fewer than "
                             f"gradient_accumulation_steps={accumulation}; use more data or a smaller batch_size")
        if point is not None and point.step_in_epoch >= steps_per_epoch:  # saved at an epoch's end
            start_epoch, skip_batches = point.epoch, 0
            if self.train_dataset is None:
                dataset = self._build_dataset('train_dataset', None, network, start_epoch=start_epoch)
        total_steps = epochs * steps_per_epoch
        if start_epoch >= epochs:
            raise ValueError(f"resume_training: {point.path} is from epoch {point.epoch} step {point.step_in_epoch}, "
                             f"which is already the end of this {epochs}-epoch run; raise runner_config.epochs to "
                             f"train further")

        train_cell, optimizer = self._build_train_cell(network, total_steps, accumulation)
        state = TrainState(train_network=train_cell, network=network, optimizer=optimizer, rank_id=self.rank_id,
                           output_dir=config.output_dir, epoch_num=epochs, batch_num=steps_per_epoch,
                           total_steps=total_steps, initial_step=0, tokens_per_step=0)
        if point is not None:
            restore_train_state(train_cell, point)
            state.cur_step_num = state.initial_step = start_epoch * steps_per_epoch + skip_batches // accumulation
            if state.cur_step_num != point.global_step:
                raise CheckpointError(f"resume_training: {point.path} was saved at global step {point.global_step}, "
                                      f"but epoch {point.epoch} step {point.step_in_epoch} is step "
                                      f"{state.cur_step_num} of this run; resume with the same data, batch_size, "
                                      f"gradient_accumulation_steps and device count")
            logger.info("resuming from %s: epoch %d, step %d of %d done", point.path, start_epoch + 1,
                        state.cur_step_num, total_steps)
        self.state = state
        callbacks = [build_callback(dict(cb), where='callbacks') for cb in config.get('callbacks') or []]
        callbacks += self.callbacks
        eval_every_steps, eval_every_epochs = self._eval_intervals(do_eval)
        logger.info("training: %d epoch(s) x %d step(s) = %d optimizer steps, %d batch(es) of %d per step",
                    epochs, steps_per_epoch, total_steps, accumulation, int(runner.get('batch_size', 0) or 0))

        run_context = RunContext(state)
        _call(callbacks, 'on_train_begin', run_context)
        # a user's dataset object cannot start at an epoch: its earlier epochs are read and dropped instead
        replay_epochs = start_epoch if self.train_dataset is not None else 0
        arg_columns = _column_arguments(network, dataset.get_col_names())
        iterator = dataset.create_tuple_iterator(num_epochs=epochs - start_epoch + replay_epochs, output_numpy=False)
        for _ in range(replay_epochs):
            for _ in iterator:
                pass
        for epoch in range(start_epoch + 1, epochs + 1):
            state.cur_epoch_num = epoch
            state.step_in_epoch = skip_batches // accumulation if epoch == start_epoch + 1 else 0
            _call(callbacks, 'on_train_epoch_begin', run_context)
            for batch_index, batch in enumerate(iterator):
                if batch_index < skip_batches and epoch == start_epoch + 1:
                    continue  # done before the checkpoint we resumed from
                if batch_index >= steps_per_epoch * accumulation:
                    continue  # drop a partial accumulation window at the epoch end
                batch = [t if t.dtype != ms.int64 else t.astype(ms.int32) for t in batch]
                batch = batch if arg_columns is None else [None if i is None else batch[i] for i in arg_columns]
                if not state.tokens_per_step:
                    state.tokens_per_step = int(batch[0].shape[0]) * max(int(batch[0].shape[-1]) - 1, 1) * \
                        accumulation * self.device_num
                if (batch_index + 1) % accumulation:
                    train_cell.accumulate(*batch)
                    continue
                loss, grad_norm = train_cell(*batch)
                self._record_step(state, loss, grad_norm, optimizer)
                _call(callbacks, 'on_train_step_end', run_context)
                if eval_every_steps and state.cur_step_num % eval_every_steps == 0:
                    self._eval_during_training(network, train_cell, state)
                if run_context.get_stop_requested():
                    break
            _call(callbacks, 'on_train_epoch_end', run_context)
            if eval_every_epochs and epoch % eval_every_epochs == 0:
                self._eval_during_training(network, train_cell, state)
            if run_context.get_stop_requested():
                break
        _call(callbacks, 'on_train_end', run_context)
        return state

    def _resume_location(self, resume_training, checkpoint):
        """None, or where to resume from: True -> `checkpoint` if it is a directory, else
        `<output_dir>/checkpoint`; a path -> that path. Falls back to the config's `resume_training`."""
        value = self.config.get('resume_training', False) if resume_training is None else resume_training
        if isinstance(value, str) and value.strip().lower() in ('true', 'false', ''):
            value = value.strip().lower() == 'true'
        if not value:
            return None
        if value is True:
            if checkpoint and os.path.isdir(os.fspath(checkpoint)):
                return os.fspath(checkpoint)
            return os.path.join(self.config.output_dir, 'checkpoint')
        return os.fspath(value)

    def _build_train_cell(self, network, total_steps, accumulation):
        config = self.config
        if self.optimizers is not None:
            optimizer = self.optimizers
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

    def _eval_intervals(self, do_eval):
        """(every n optimizer steps, every n epochs) to evaluate at; 0 = never. do_eval without either: each epoch."""
        config = self.config
        if not (config.get('do_eval', False) if do_eval is None else do_eval):
            return 0, 0
        steps, epochs = int(config.get('eval_step_interval') or 0), int(config.get('eval_epoch_interval') or 0)
        return (steps, epochs) if steps or epochs else (0, 1)

    @staticmethod
    def _record_step(state, loss, grad_norm, optimizer):
        state.cur_step_num += 1
        state.step_in_epoch += 1
        state.loss = float(loss.asnumpy())
        state.grad_norm = float(grad_norm.asnumpy())
        lr = optimizer.learning_rate
        if isinstance(lr, LearningRateSchedule):
            lr = lr(Tensor(state.cur_step_num - 1, ms.int32))
        state.lr = float(np.asarray(lr.asnumpy()).reshape(-1)[0])
        state.losses.append(state.loss)
        if not math.isfinite(state.loss):
            logger.warning("step %d: loss is %s", state.cur_step_num, state.loss)

    def _eval_during_training(self, network, train_cell, state):
        result = self._evaluate(network)
        state.eval_results = result
        logger.info("eval at step %d: loss %.4f, PPL %.3f over %d tokens", state.cur_step_num, result['loss'],
                    result['PPL'], result['tokens'])
        append_metrics(state, {'step': state.cur_step_num, 'epoch': state.cur_epoch_num,
                               'eval_loss': result['loss'], 'eval_PPL': result['PPL'], 'eval_tokens': result['tokens']})
        train_cell.set_train(True)

    # ----------------------------------------------------------------- evaluate / predict
    def evaluate(self, eval_checkpoint=False, **kwargs):
        """Perplexity on the eval dataset: returns {'loss': mean token loss, 'PPL': exp(loss)}."""
        if kwargs:
            raise TypeError(f"unknown argument(s): {', '.join(sorted(kwargs))}")
        self._setup(compile_cache=False)
        network = self._get_network()
        checkpoint = self._checkpoint_arg(eval_checkpoint)
        if checkpoint:
            self._load_weights(network, checkpoint)
        result = self._evaluate(network)
        logger.info("eval: loss %.4f, PPL %.3f over %d tokens", result['loss'], result['PPL'], result['tokens'])
        return result

    def _evaluate(self, network):
        dataset = self._build_dataset('eval_dataset', self.eval_dataset, network)
        cell = _EvalLossCell(network)
        network.set_train(False)
        metric = PerplexityMetric()
        arg_columns = _column_arguments(cell, dataset.get_col_names()) or [0]
        for batch in dataset.create_tuple_iterator(num_epochs=1, output_numpy=False):
            batch = [t if t.dtype == ms.int32 else t.astype(ms.int32) for t in batch]
            loss_sum, count = cell(*[None if i is None else batch[i] for i in arg_columns])
            metric.update(float(loss_sum.asnumpy()), float(count.asnumpy()))
        result = metric.eval()
        result['tokens'] = int(metric.total_tokens)
        return result

    def predict(self, predict_checkpoint=None, input_data=None, batch_size=None, **generate_kwargs):
        """Continue each prompt of `input_data` (a str or list of str). Returns
        `[{'text_generation_text': [text]}, ...]`, one entry per prompt, each text including its prompt."""
        self._setup(compile_cache=False)
        network = self._get_network()
        checkpoint = self._checkpoint_arg(predict_checkpoint)
        if checkpoint:
            self._load_weights(network, checkpoint)
        if input_data is None:
            input_data = self.config.get('input_data')
        if input_data is None:
            raise ValueError("predict needs input_data (a prompt or a list of prompts; --predict_data on the CLI)")
        prompts = [input_data] if isinstance(input_data, str) else list(input_data)
        tokenizer = self._get_tokenizer()
        batch_size = int(batch_size or len(prompts))
        results = []
        for start in range(0, len(prompts), batch_size):
            chunk = prompts[start:start + batch_size]
            ids = [tokenizer.encode(p) for p in chunk]
            outputs = network.generate(ids, **generate_kwargs)
            results += [{'text_generation_text': [tokenizer.decode(out, skip_special_tokens=True)]}
                        for out in outputs]
        return results


def _compile_cache_path(config):
    """A compile-cache directory per (model, wrapper, optimizer, batch, parallel layout, MindSpore version): MindSpore
    keeps one cached graph per directory and checks only the source files it came from, so runs that differ in
    shapes or settings must not share one."""
    keys = ('model', 'runner_config', 'runner_wrapper', 'optimizer', 'lr_schedule', 'parallel_config',
            'recompute_config', 'use_parallel', 'parallel')
    described = json.dumps({k: config.get(k) for k in keys} | {'mindspore': ms.__version__}, sort_keys=True,
                           default=str)
    return cache_dir('compile_cache', hashlib.sha256(described.encode()).hexdigest()[:16])


def _column_arguments(network, columns):
    """Which dataset column feeds each argument of `network.construct` when the columns are named after its
    arguments: a list of column indexes, None where an argument keeps its default (attention_mask for an
    (input_ids, labels) dataset: MindFormers feeds columns positionally, but our models take labels third).
    None when some column is named otherwise: the columns are then passed in their order."""
    params = list(inspect.signature(network.construct).parameters)
    columns = list(columns)
    if not columns or any(c not in params for c in columns):
        return None
    return [columns.index(p) if p in columns else None for p in params[:max(map(params.index, columns)) + 1]]


def _call(callbacks, event, run_context):
    for cb in callbacks:
        getattr(cb, event)(run_context)
