"""Trainer: builds everything a run config names and runs train, finetune, evaluate and predict."""
import copy
import dataclasses
import inspect
import math
import os

import numpy as np
import mindspore as ms
from mindspore import nn, Tensor
from mindspore.nn.learning_rate_schedule import LearningRateSchedule
from mindspore.train.callback import RunContext

from mindformers.core.callback import TrainState, append_metrics
from mindformers.core.context import init_context, sum_over_ranks
from mindformers.core.context.compile_cache import TrainingCompileCache, disable_compile_cache
from mindformers.core.lr import build_lr
from mindformers.core.metric import PerplexityMetric
from mindformers.core.optim import build_optim
from mindformers.core.parallel_config import build_parallel_config
from mindformers.core.parallel_layout import run_layouts, write_strategy_files
from mindformers.generation.text_generator import encode_prompt
from mindformers.tools.build import (build_model, build_model_config, build_callback, build_wrapper, build_dataset,
                                     build_metric, build_tokenizer)
from mindformers.tools.checkpoint import CheckpointError, load_checkpoint_file, load_into_network, resolve_checkpoint
from mindformers.parallel.reshard import transform_for_run
from mindformers.tools.logger import logger, setup_file_logging
from mindformers.models.model_book import find_config
from mindformers.tools.register import MindFormerConfig, MindFormerRegister, MindFormerModuleType, validate_run_config
from mindformers.trainer.resume import check_run_shape, find_resume_checkpoint, restore_train_state
from mindformers.trainer.run_dir import RunLock, checkpoint_dirs, clear_earlier_run, refuse_earlier_run
from mindformers.trainer.training_args import TrainingArguments

SUPPORTED_TASKS = {'text_generation': 'gpt2'}
_TOKENIZING_LOADERS = ('TextCorpusDataset', 'ADGenDataLoader')  # data loaders that get processor.tokenizer
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
        return validate_run_config(config)

    def _dataset_arg(self, dataset, key):
        if isinstance(dataset, (str, os.PathLike)):
            use_dataset_dir(self.config, key, os.fspath(dataset))
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
        """Context, seeds and logs. The compile cache is used only by training, from its start to the end of its first
        step (`TrainingCompileCache`); evaluation and prediction (`compile_cache=False`) make sure it is off."""
        config = self.config
        if 'ids' not in _CONTEXT_DONE:
            parallel = dict(config.get('parallel') or {})
            context = dict(config.get('context') or {}, enable_compile_cache=False)  # see TrainingCompileCache
            _CONTEXT_DONE['ids'] = init_context(bool(config.get('use_parallel', False)), context, parallel)
        if not compile_cache:
            disable_compile_cache()
        self.rank_id, self.device_num = _CONTEXT_DONE['ids']
        ms.set_seed(int(config.seed))
        np.random.seed(int(config.seed))
        setup_file_logging(config.output_dir, self.rank_id, self.device_num)

    def _parallel_config(self):
        return build_parallel_config(self.config.get('parallel_config'), self.config.get('recompute_config'))

    def _model_section(self):
        if 'model' not in self.config:
            raise KeyError("the run config has no 'model' section (model.model_config and model.arch)")
        section = self.config.model
        for key in ('model_config', 'arch'):
            if key not in section:
                raise KeyError(f"model section lacks '{key}' (expected model.model_config.type and model.arch.type)")
        return section

    def _model_config(self, parallel):
        """The config object of the run config's model, laid out by `parallel`."""
        model_config = self._model_section().model_config
        if isinstance(model_config, dict) or not hasattr(model_config, 'to_dict'):
            return build_model_config(model_config, {'parallel_config': parallel})
        model_config.parallel_config = parallel
        return model_config

    def _validate_parallel(self, parallel, model_config):
        """Check `parallel` against this job and the model before the model is built (`ParallelConfig.validate`).
        In data-parallel mode MindSpore replicates the whole model on every rank, so an all-1 parallel_config there
        stands for data_parallel = the device count."""
        checked = parallel
        if (self.device_num > 1 and ms.get_auto_parallel_context('parallel_mode') == 'data_parallel'
                and (parallel.data_parallel, parallel.model_parallel, parallel.pipeline_stage) == (1, 1, 1)):
            checked = dataclasses.replace(parallel, data_parallel=self.device_num)
        checked.validate(self.device_num, model_config if hasattr(model_config, 'num_layers') else None)

    def _get_network(self):
        if self.model is not None:
            config = getattr(self.model, 'config', None)
            if config is not None and (self.config.get('parallel_config') or self.config.get('recompute_config')):
                config.parallel_config = self._parallel_config()
            self._validate_parallel(getattr(config, 'parallel_config', None) or self._parallel_config(), config)
            return self.model
        parallel = self._parallel_config()
        model_config = self._model_config(parallel)
        self._validate_parallel(parallel, model_config)
        self.model = build_model({'model_config': model_config, 'arch': self._model_section().arch})
        logger.info("built %s with %.2fM parameters", type(self.model).__name__,
                    sum(int(np.prod(p.shape)) for p in self.model.get_parameters()) / 1e6)
        return self.model

    def _load_weights(self, network, checkpoint):
        checkpoint = os.fspath(checkpoint)
        if _is_true(self.config.get('auto_trans_ckpt', False)):
            checkpoint = self._reshard_checkpoint(network, checkpoint)
        path = resolve_checkpoint(checkpoint, self.rank_id)
        load_into_network(network, load_checkpoint_file(path), path)
        logger.info("loaded weights from %s", path)
        return path

    def _reshard_checkpoint(self, network, checkpoint):
        """auto_trans_ckpt: reshard `checkpoint` (laid out by `src_strategy_path_or_dir`) into the complete layout
        under `<output_dir>/transformed_checkpoint/` (rank 0 transforms, the others wait); returns what this rank
        loads. Under semi-auto-parallel every rank loads the complete weights before the network is compiled, and
        MindSpore cuts each parameter to this rank's slice when it compiles (`_slice_parameter` in
        `mindspore/parallel/_utils.py` slices a parameter that is not yet sliced by its layout)."""
        return transform_for_run(checkpoint, self.config.get('src_strategy_path_or_dir'), self.config.output_dir,
                                 self.rank_id, self.device_num, None,
                                 {p.name: tuple(p.shape) for p in network.get_parameters()})

    def _set_auto_trans_ckpt(self, value):
        """A method's `auto_trans_ckpt=` argument overrides the config's (None keeps it)."""
        if value is not None:
            self.config['auto_trans_ckpt'] = value

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
        dataset_config['vocab_size'] = int(network.config.vocab_size)
        dataset_config['rank_id'], dataset_config['device_num'] = self.rank_id, self.device_num
        if key == 'eval_dataset':  # every rank reads all batches and evaluates its own stride (see _evaluate)
            dataset_config['rank_id'], dataset_config['device_num'] = 0, 1
        if key == 'train_dataset':  # runner_config.batch_size wins, as in MindFormers
            dataset_config['batch_size'] = self.config.runner_config.get('batch_size') or \
                dataset_config.get('batch_size', 1)
            dataset_config['start_epoch'] = start_epoch
        tokenizer_needed = (dataset_config.get('data_loader') or {}).get('type') in _TOKENIZING_LOADERS
        if tokenizer_needed and 'tokenizer' not in dataset_config['data_loader'] and 'tokenizer' not in dataset_config:
            dataset_config['data_loader']['tokenizer'] = self._get_tokenizer()
        return build_dataset({'type': section.get('type', 'CausalLanguageModelDataset'),
                              'dataset_config': dataset_config}, where=f'{key}_task')

    # ----------------------------------------------------------------- train
    def train(self, train_checkpoint=False, resume_training=None, auto_trans_ckpt=None, do_eval=None, **kwargs):
        """Train from scratch, or from `train_checkpoint` weights (True = newest under output_dir). Returns the
        final TrainState (losses, summary, last_checkpoint). `auto_trans_ckpt`: reshard the weights first (see
        `_reshard_checkpoint`)."""
        self._set_auto_trans_ckpt(auto_trans_ckpt)
        return self._train(self._checkpoint_arg(train_checkpoint), resume_training, do_eval, kwargs)

    def finetune(self, finetune_checkpoint=False, resume_training=None, auto_trans_ckpt=None, do_eval=None, **kwargs):
        """Train starting from pretrained weights: `finetune_checkpoint` (path, directory, or True for the newest
        under output_dir), else `load_checkpoint` / `model.model_config.checkpoint_name_or_path` of the YAML."""
        self._set_auto_trans_ckpt(auto_trans_ckpt)
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
        if self.optimizers is None and not self.config.get('optimizer'):
            raise ValueError("the run config has no 'optimizer' section: add one (e.g. optimizer: {type: AdamW, "
                             "learning_rate: 1.e-4}) or pass optimizers= to Trainer")
        self._setup()
        if self._only_save_strategy(training=True):
            return None
        config = self.config
        resume = self._resume_location(resume_training, checkpoint)
        overwrite = _is_true(config.get('overwrite_output_dir', False))
        if resume and overwrite:
            raise ValueError("overwrite_output_dir deletes the earlier run that resume_training continues: set only "
                             "one of them")
        ckpt_dirs = checkpoint_dirs(config, self.callbacks, self.rank_id)
        with RunLock(config.output_dir, self.rank_id):
            if not resume and not overwrite:
                refuse_earlier_run(config.output_dir, self.rank_id, ckpt_dirs)
            network = self._get_network()
            point = find_resume_checkpoint(resume, self.rank_id, self.device_num) if resume else None
            if checkpoint and point is None:
                self._load_weights(network, checkpoint)
            if overwrite:  # after the weights are read: they may come from the run being replaced
                clear_earlier_run(config.output_dir, self.rank_id, ckpt_dirs)
            return self._train_loop(network, point, do_eval)

    def _train_loop(self, network, point, do_eval):
        """Train `network` (from the ResumePoint `point`, or from its current weights when None)."""
        config = self.config
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
        run_shape = {'batch_size': int(dataset.get_batch_size()), 'gradient_accumulation_steps': accumulation,
                     'device_num': self.device_num, 'steps_per_epoch': steps_per_epoch}
        if point is not None:
            check_run_shape(point, run_shape)
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
                           total_steps=total_steps, initial_step=0, tokens_per_step=0, run_shape=run_shape)
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
        callbacks = [TrainingCompileCache(config, train_cell, dataset, self.rank_id), *callbacks, *self.callbacks]
        eval_every_steps, eval_every_epochs = self._eval_intervals(do_eval)
        logger.info("training: %d epoch(s) x %d step(s) = %d optimizer steps, %d batch(es) of %d per step",
                    epochs, steps_per_epoch, total_steps, accumulation, run_shape['batch_size'])

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
            micro_losses = []  # of the accumulation window's first micro batches
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
                    micro_losses.append(train_cell.accumulate(*batch))
                    continue
                loss, grad_norm = train_cell(*batch)
                self._record_step(state, [*micro_losses, loss], grad_norm, optimizer)
                micro_losses = []
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

    def _only_save_strategy(self, training):
        """With `only_save_strategy: True`: write this run's strategy files under `<output_dir>/strategy/`, build
        and run nothing else, and return True. On Ascend/GPU (semi- or auto-parallel) the network, or its train step
        when `training`, is compiled and MindSpore saves `ckpt_strategy_rank_{rank}.ckpt`. MindSpore cannot compile
        semi-auto-parallel on CPU (not even in its dry-run mode), so there the layout `parallel_config` gives the
        model is derived from its layers' shard declarations and written as MindSpore JSON strategy files, one per
        pipeline stage (`mindformers.core.parallel_layout`)."""
        if not _is_true(self.config.get('only_save_strategy', False)):
            return False
        directory = os.path.join(self.config.output_dir, 'strategy')
        parallel = self._parallel_config()
        if ms.get_context('device_target') == 'CPU':
            model_config = self._model_config(parallel)
            parallel.validate(parallel.data_parallel * parallel.model_parallel * parallel.pipeline_stage, model_config)
            model_class = MindFormerRegister.get_cls(MindFormerModuleType.MODELS,
                                                     self._model_section().arch.get('type'), where='model.arch.type')
            if self.rank_id == 0:
                paths = write_strategy_files(run_layouts(self.config, model_config, model_class, parallel), directory)
                logger.info("only_save_strategy: MindSpore cannot compile semi-auto-parallel on CPU; wrote the "
                            "strategy files derived from the layers' shard declarations instead: %s", ', '.join(paths))
            return True
        mode = ms.get_auto_parallel_context('parallel_mode')
        if mode not in ('semi_auto_parallel', 'auto_parallel'):
            raise ValueError(f"only_save_strategy: a strategy exists under semi- or auto-parallel only, but "
                             f"parallel_mode is {mode}; set use_parallel: True and parallel.parallel_mode: 1")
        path = os.path.join(directory, f'ckpt_strategy_rank_{self.rank_id}.ckpt')
        ms.set_auto_parallel_context(strategy_ckpt_config={'save_file': path, 'only_trainable_params': False})
        if parallel.pipeline_stage > 1:
            ms.set_auto_parallel_context(pipeline_stages=parallel.pipeline_stage)
        network = self._get_network()
        # full_batch: every rank is fed the global batch of one step (runner_config.batch_size is per dp rank)
        batch = int(self.config.runner_config.get('batch_size') or 1) * parallel.data_parallel * \
            (parallel.micro_batch_num if parallel.pipeline_stage > 1 else 1)
        seq = int(network.config.seq_length)
        if training:
            steps = network if parallel.pipeline_stage == 1 else nn.PipelineCell(network, parallel.micro_batch_num)
            cell, _ = self._build_train_cell(steps, 1, 1)
            cell.compile(Tensor(np.zeros((batch, seq + 1), np.int32)))
        else:
            network.set_train(False)
            network.compile(Tensor(np.zeros((batch, seq), np.int32)))
        logger.info("only_save_strategy: compiled under %s; MindSpore saved %s", mode, path)
        return True

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
    def _record_step(state, losses, grad_norm, optimizer):
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

    def _eval_during_training(self, network, train_cell, state):
        result = self._evaluate(network)
        state.eval_results = result
        logger.info("eval at step %d: %s", state.cur_step_num, _describe(result))
        append_metrics(state, {'step': state.cur_step_num, 'epoch': state.cur_epoch_num,
                               **{f'eval_{key}': value for key, value in result.items()}})
        train_cell.set_train(True)

    # ----------------------------------------------------------------- evaluate / predict
    def evaluate(self, eval_checkpoint=False, auto_trans_ckpt=None, **generate_kwargs):
        """Evaluate on the eval dataset with the config's `metric`: perplexity by default, returning
        {'loss': mean token loss, 'PPL': exp(loss), 'tokens'}; a generation-based metric (ADGENMetric) generates a
        continuation of each prompt and returns the metric's scores and 'samples' (see `_evaluate_by_generation`;
        `generate_kwargs` such as max_new_tokens override the config's `generation` section there)."""
        if generate_kwargs and not getattr(self._metric(), 'generation_based', False):
            raise TypeError(f"unknown argument(s): {', '.join(sorted(generate_kwargs))} (generation options only "
                            f"apply to a generation-based metric, e.g. metric: {{type: ADGENMetric}})")
        self._set_auto_trans_ckpt(auto_trans_ckpt)
        self._setup(compile_cache=False)
        if self._only_save_strategy(training=False):
            return None
        network = self._get_network()
        checkpoint = self._checkpoint_arg(eval_checkpoint)
        if checkpoint:
            self._load_weights(network, checkpoint)
        result = self._evaluate(network, generate_kwargs)
        logger.info("eval: %s", _describe(result))
        return result

    def _metric(self):
        """The metric to evaluate with: `compute_metrics` given to the Trainer (a metric, or a dict or list holding
        one), else the one the config's `metric` section names (a registered METRIC), else None (perplexity). Only
        metrics the evaluation can feed are accepted: PerplexityMetric (loss sums) or a generation-based one
        (`generation_based = True`: generated and reference texts); any other is refused, never replaced."""
        metric = self.compute_metrics
        where = 'compute_metrics'
        if isinstance(metric, dict):
            metric = list(metric.values())
        if isinstance(metric, (list, tuple, set)):
            if len(metric) != 1:
                raise ValueError(f"compute_metrics holds {len(metric)} metrics; evaluation computes one: pass one "
                                 f"metric")
            metric = next(iter(metric))
        if metric is None:
            section = self.config.get('metric')
            if not section or not section.get('type'):
                return None
            metric, where = build_metric(dict(section), where='metric'), f"metric.type {section.get('type')}"
        if not isinstance(metric, PerplexityMetric) and not getattr(metric, 'generation_based', False):
            raise ValueError(f"{where}: {type(metric).__name__} cannot be computed by evaluation, which feeds "
                             f"either loss sums (PerplexityMetric) or generated and reference texts (a metric with "
                             f"generation_based = True, e.g. ADGENMetric)")
        return metric

    def _evaluate(self, network, generate_kwargs=None):
        """Perplexity over the eval data, or the config's generation-based metric (`_evaluate_by_generation`).
        Under data parallel the result is global, the same on every rank: a config-built eval dataset is read whole
        by every rank, which evaluates batches rank_id, rank_id + device_num, ... (so the batches are exactly a
        single process's); a given dataset is evaluated as each rank has it. Loss sums and token counts are then
        added over the ranks."""
        metric = self._metric()
        if getattr(metric, 'generation_based', False):
            return self._evaluate_by_generation(network, metric, generate_kwargs or {})
        dataset = self._build_dataset('eval_dataset', self.eval_dataset, network)
        stride = self.device_num if self.eval_dataset is None else 1
        cell = _EvalLossCell(network)
        network.set_train(False)
        metric = metric or PerplexityMetric()
        metric.clear()
        arg_columns = _column_arguments(cell, dataset.get_col_names()) or [0]
        for index, batch in enumerate(dataset.create_tuple_iterator(num_epochs=1, output_numpy=False)):
            if index % stride != self.rank_id % stride:
                continue
            batch = [t if t.dtype == ms.int32 else t.astype(ms.int32) for t in batch]
            loss_sum, count = cell(*[None if i is None else batch[i] for i in arg_columns])
            metric.update(float(loss_sum.asnumpy()), float(count.asnumpy()))
        if self.device_num > 1:
            metric.total_loss, metric.total_tokens = sum_over_ranks([metric.total_loss, metric.total_tokens])
        result = metric.eval()
        result['tokens'] = int(metric.total_tokens)
        return result

    def _evaluate_by_generation(self, network, metric, generate_kwargs):
        """Scores of a generation-based metric: each eval batch's `input_ids` (left-padded prompts) are continued
        with `network.generate` (greedy unless the config's `generation` section or `generate_kwargs` say
        otherwise; max_new_tokens defaults to the eval dataset's max_target_length), the prompts are cut off, and
        the decoded continuations and `labels` (reference ids, -100 after them) go to `metric.update(preds, refs)`.
        Returns `metric.eval()` and 'samples'. Under data parallel the metric's `totals` and `count` are added over
        the ranks."""
        dataset = self._build_dataset('eval_dataset', self.eval_dataset, network)
        missing = [c for c in ('input_ids', 'labels') if c not in dataset.get_col_names()]
        if missing:
            raise ValueError(f"metric {type(metric).__name__} generates from the eval data's input_ids and scores "
                             f"against its labels, but the eval dataset has no {missing} (columns: "
                             f"{dataset.get_col_names()}); use e.g. KeyWordGenDataset with phase: eval")
        stride = self.device_num if self.eval_dataset is None else 1
        tokenizer = self._get_tokenizer()
        pad = tokenizer.eos_token_id if tokenizer.pad_token_id is None else tokenizer.pad_token_id
        options = {'do_sample': False, **dict(self.config.get('generation') or {}), **generate_kwargs}
        eval_config = self.config.get('eval_dataset') or (self.config.get('eval_dataset_task') or {}).get(
            'dataset_config') or {}
        max_target = eval_config.get('max_target_length') or (eval_config.get('data_loader') or {}).get(
            'max_target_length')
        if max_target and 'max_new_tokens' not in options and 'max_length' not in options:
            options['max_new_tokens'] = int(max_target)
        metric.clear()
        for index, batch in enumerate(dataset.create_dict_iterator(num_epochs=1, output_numpy=True)):
            if index % stride != self.rank_id % stride:
                continue
            prompts = [_without_left_padding(row, pad) for row in batch['input_ids']]
            outputs = network.generate(prompts, **options)
            preds = [tokenizer.decode(out[len(prompt):], skip_special_tokens=True)
                     for prompt, out in zip(prompts, outputs)]
            refs = [tokenizer.decode(row[row >= 0], skip_special_tokens=True) for row in batch['labels']]
            metric.update(preds, refs)
        if self.device_num > 1:
            keys = list(metric.totals)
            summed = sum_over_ranks([metric.totals[key] for key in keys] + [metric.count])
            metric.totals, metric.count = dict(zip(keys, summed[:-1])), int(summed[-1])
        result = metric.eval()
        result['samples'] = int(metric.count)
        return result

    def predict(self, predict_checkpoint=None, auto_trans_ckpt=None, input_data=None, batch_size=None,
                **generate_kwargs):
        """Continue each prompt of `input_data` (a str or list of str), encoded by `tokenizer.encode_prompt` (its
        BOS, no EOS). Returns `[{'text_generation_text': [text]}, ...]`, one entry per prompt, each text including its
        prompt. A prompt that is not valid text or has ids outside the model's vocabulary raises ValueError naming
        its index."""
        self._set_auto_trans_ckpt(auto_trans_ckpt)
        self._setup(compile_cache=False)
        if self._only_save_strategy(training=False):
            return None
        network = self._get_network()
        checkpoint = self._checkpoint_arg(predict_checkpoint)
        if checkpoint:
            self._load_weights(network, checkpoint)
        if input_data is None:
            input_data = self.config.get('input_data')
        if input_data is None:
            raise ValueError("predict needs input_data (a prompt or a list of prompts; --predict_data on the CLI)")
        prompts = [input_data] if isinstance(input_data, str) else list(input_data)
        tokenizer, vocab_size = self._get_tokenizer(), int(network.config.vocab_size)
        encoded = [encode_prompt(tokenizer, text, vocab_size, index) for index, text in enumerate(prompts)]
        batch_size = int(batch_size or len(prompts))
        results = []
        for start in range(0, len(encoded), batch_size):
            outputs = network.generate(encoded[start:start + batch_size], **generate_kwargs)
            results += [{'text_generation_text': [tokenizer.decode(out, skip_special_tokens=True)]}
                        for out in outputs]
        return results


def use_dataset_dir(config, key, path):
    """Make the run config's `key` section ('train_dataset' or 'eval_dataset') read `path`: a MindRecord directory
    or file replaces the YAML's own loader (e.g. the bundled text corpus); a loader that reads the raw files its
    `dataset_dir` names (MindDataset, ADGenDataLoader's JSON) keeps its type and settings. Raises FileNotFoundError
    naming `key` when `path` does not exist."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"{key}: {path} does not exist (expected a MindRecord directory or file)")
    section = config.get(key) or MindFormerConfig()
    loader = dict(section.get('data_loader') or {})
    if loader.get('type') in ('MindDataset', 'ADGenDataLoader'):
        loader['dataset_dir'] = path
    else:
        loader = {'type': 'MindDataset', 'dataset_dir': path, 'shuffle': loader.get('shuffle', key == 'train_dataset')}
    section['data_loader'] = loader
    config[key] = section


def _is_true(value):
    """A config switch: True, or the text 'true' in any case (CLI values arrive as text)."""
    return str(value).strip().lower() == 'true'


def _describe(result):
    """One log line for an evaluation result."""
    if 'PPL' in result:
        return f"loss {result['loss']:.4f}, PPL {result['PPL']:.3f} over {result['tokens']} tokens"
    scores = ', '.join(f"{key} {value:.4f}" for key, value in result.items() if key != 'samples')
    return f"{scores} over {result.get('samples')} samples"


def _without_left_padding(row, pad):
    """The ids of a left-padded prompt row without its leading `pad` ids."""
    start = 0
    while start < len(row) and row[start] == pad:
        start += 1
    if start == len(row):
        raise ValueError("an eval sample's input_ids are all padding: there is no prompt to continue")
    return [int(i) for i in row[start:]]


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
