"""Trainer: the public API. Resolves the run config and builds what it names (network through `build.build_network`,
tokenizer, datasets, weights); `train`/`finetune` run `train_loop.TrainLoop`, `evaluate` runs `evaluation.evaluate`,
`predict` runs the text-generation pipeline."""
import copy
import os

import numpy as np
import mindspore as ms

from mindformers.core.context import init_context
from mindformers.core.context.compile_cache import disable_compile_cache
from mindformers.pipeline import pipeline
from mindformers.tools.build import build_dataset, build_tokenizer
from mindformers.tools.checkpoint import load_checkpoint_file, meta_entry, resolve_checkpoint
from mindformers.tools.weights import find_weights, open_weights
from mindformers.models.convert_utils import hf_directory_converter
from mindformers.parallel.reshard import transform_for_run
from mindformers.tools.logger import logger, setup_file_logging
from mindformers.models.model_book import find_config, has_weights
from mindformers.tools.register import MindFormerConfig, MindFormerRegister, MindFormerModuleType
from mindformers.trainer.run_config import validate_run_config
from mindformers.trainer.build import build_network, model_section, run_parallel_config, validate_parallel
from mindformers.trainer.delta import delta_info, is_delta, load_weights
from mindformers.trainer.evaluation import describe, evaluate, generation_options, resolve_metric
from mindformers.trainer.pet_method import apply_to_config, apply_to_model, check_pet_method, pet_model_name
from mindformers.trainer.resume import find_resume_checkpoint
from mindformers.trainer.run_dir import RunLock, checkpoint_dirs, clear_earlier_run, refuse_earlier_run
from mindformers.trainer.strategy import save_strategy
from mindformers.trainer.train_loop import TrainLoop, resume_location
from mindformers.trainer.training_args import TrainingArguments
from mindformers.trainer.utils import is_true

SUPPORTED_TASKS = {'text_generation': 'gpt2'}
_TOKENIZING_LOADERS = ('TextCorpusDataset', 'ADGenDataLoader')  # data loaders that get processor.tokenizer
_CONTEXT_DONE = {}


@MindFormerRegister.register(MindFormerModuleType.TRAINER)
class Trainer:
    """The high-level runner.

    `args`: a YAML path, a MindFormerConfig/dict (a full run config) or TrainingArguments (overriding the YAML of
    the model). `model`: a registered name (`gpt2`, `gpt2_tiny`, ...) or a model instance. `train_dataset` /
    `eval_dataset`: a MindRecord directory or file, or a `mindspore.dataset` object yielding the model's columns.
    `pet_method`: a parameter-efficient tuning algorithm ('lora', or another registered pet_type): with a model
    name, that name's `<name>_<pet_method>` config when there is one; else the config's or model's PET, which must
    be of that type, or the algorithm's defaults (see `mindformers.trainer.pet_method`). A model with frozen
    parameters trains and saves its trainable ones only (see `CheckpointMonitor.save_trainable_params`).
    """

    def __init__(self, args=None, task='text_generation', model=None, model_name=None, train_dataset=None,
                 eval_dataset=None, tokenizer=None, optimizers=None, callbacks=None, compute_metrics=None,
                 pet_method='', **kwargs):
        if kwargs:
            raise TypeError(f"Trainer got unknown argument(s): {', '.join(sorted(kwargs))}")
        if task not in SUPPORTED_TASKS:
            raise ValueError(f"task {task!r} is not supported; supported tasks: {', '.join(SUPPORTED_TASKS)}")
        pet_method = check_pet_method(pet_method)
        self.task = task
        self.model = model if model is not None and not isinstance(model, str) else None
        if isinstance(model, str):
            model_name = pet_model_name(model, pet_method)
        self.config = self._resolve_config(args, model_name or (None if self.model is not None else None))
        if pet_method and self.model is not None:
            apply_to_model(self.model, pet_method)
        elif pet_method:
            apply_to_config(self.config, pet_method, getattr(self.config, '_source', None) or 'the run config')
        self._base_checkpoint = None  # the whole checkpoint last loaded into the network: the base of its delta
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
        return run_parallel_config(self.config)

    def _get_network(self, checkpoint=None):
        """The model instance given to the Trainer (its config takes the run's parallel_config, if one is set), or
        the run config's model (`build_network`, with the whole weights `checkpoint` if given); validated for this
        job's device count."""
        if self.model is None:
            self.model = build_network(self.config, device_num=self.device_num, checkpoint=checkpoint)
            return self.model
        config = getattr(self.model, 'config', None)
        if config is not None and (self.config.get('parallel_config') or self.config.get('recompute_config')):
            config.parallel_config = self._parallel_config()
        validate_parallel(getattr(config, 'parallel_config', None) or self._parallel_config(), config,
                          self.device_num)
        return self.model

    def _network_with_weights(self, checkpoint):
        """The network holding `checkpoint`'s weights (None: the weights it is built with). When the Trainer builds
        the network for whole weights it can read tensor by tensor (`_streamable`), it builds it without
        initialising them and loads them while it is built (`build_network(checkpoint=...)`); else they load over
        the built network (`_load_weights`)."""
        streamed = self._streamable(checkpoint) if checkpoint else None
        built_here = self.model is None
        network = self._get_network(streamed)
        if streamed:
            self._base_checkpoint = streamed
            logger.info("loaded weights from %s", streamed)
        elif checkpoint and not (built_here and checkpoint == _model_config(self.config).get(
                'checkpoint_name_or_path')):  # finetune's default: loaded as the network was built
            self._load_weights(network, checkpoint)
        return network

    def _streamable(self, checkpoint):
        """What the network is built with for `checkpoint` (a load_checkpoint value): a model name with published
        weights, a HuggingFace model directory, or the safetensors file / sharded set / PyTorch file it names (a
        directory: its index or weight file, its rank_<id>/, its newest checkpoint). None when the weights load after
        the network is built, as before: a network given to the Trainer, auto_trans_ckpt (resharding needs the
        network), a MindSpore .ckpt (read whole: a training checkpoint) and a PET delta (loaded over the base)."""
        if self.model is not None or is_true(self.config.get('auto_trans_ckpt', False)):
            return None
        checkpoint = os.fspath(checkpoint)
        if not os.path.exists(checkpoint):
            return checkpoint if has_weights(checkpoint) else None
        if hf_directory_converter(checkpoint) is not None:
            return checkpoint
        if os.path.isdir(checkpoint) and not os.path.isdir(os.path.join(checkpoint, f'rank_{self.rank_id}')):
            path = find_weights(checkpoint)
        else:
            path = resolve_checkpoint(checkpoint, self.rank_id)
        if path.endswith('.ckpt') or (meta_entry(path) or {}).get('delta') or self._holds_delta(path):
            return None
        return path

    def _holds_delta(self, path):
        """Whether the weights at `path` are a PET delta of the run's model (`delta.is_delta`, on the names and
        shapes alone: the model's cells are built without weights to tell)."""
        model_config = _model_config(self.config)
        if not model_config.get('pet_config'):
            return False
        probe_config = copy.copy(self.config)
        probe_config['model'] = {**model_section(self.config), 'model_config': {
            **model_config, 'quantization': None, 'quantization_config': None}}
        probe = build_network(probe_config, device_num=self.device_num, allocate=False)
        shapes = open_weights(path).shapes()
        return is_delta(probe, {name: np.broadcast_to(np.float32(0), shape) for name, shape in shapes.items()})

    def _warn_without_weights(self, checkpoint, what):
        """Log a warning when `what` (predict / evaluate) is about to run a network built with random weights."""
        if checkpoint or self.model is not None or _model_config(self.config).get('checkpoint_name_or_path'):
            return
        logger.warning("%s runs on randomly initialised weights: no weights were given. Load some with "
                       "--load_checkpoint <file | directory | sharded set | HuggingFace directory | model name> "
                       "(load_checkpoint in the run config, %s_checkpoint= in Python) or "
                       "model.model_config.checkpoint_name_or_path", what, 'eval' if what == 'evaluate' else what)

    def _load_weights(self, network, checkpoint):
        checkpoint = os.fspath(checkpoint)
        if is_true(self.config.get('auto_trans_ckpt', False)):
            checkpoint = self._reshard_checkpoint(network, checkpoint)
        path = resolve_checkpoint(checkpoint, self.rank_id)
        if load_weights(network, load_checkpoint_file(path), path) == 'whole':
            self._base_checkpoint = path
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
        resume = resume_location(config, resume_training, checkpoint)
        overwrite = is_true(config.get('overwrite_output_dir', False))
        if resume and overwrite:
            raise ValueError("overwrite_output_dir deletes the earlier run that resume_training continues: set only "
                             "one of them")
        ckpt_dirs = checkpoint_dirs(config, self.callbacks, self.rank_id)
        with RunLock(config.output_dir, self.rank_id):
            if not resume and not overwrite:
                refuse_earlier_run(config.output_dir, self.rank_id, ckpt_dirs)
            point = find_resume_checkpoint(resume, self.rank_id, self.device_num) if resume else None
            # a delta resumes over the base weights it names
            load = checkpoint and (point is None or point.delta is not None and not _within(checkpoint, resume))
            network = self._network_with_weights(checkpoint if load else None)
            if overwrite:  # after the weights are read: they may come from the run being replaced
                clear_earlier_run(config.output_dir, self.rank_id, ckpt_dirs)
            return self._train_loop(network, point, do_eval)

    def _train_loop(self, network, point, do_eval):
        """Train `network` (from the ResumePoint `point`, or from its current weights when None)."""
        def make_dataset(start_epoch):
            return self._build_dataset('train_dataset', self.train_dataset, network, start_epoch=start_epoch)

        loop = TrainLoop(self.config, network, make_dataset, point=point, optimizer=self.optimizers,
                         callbacks=self.callbacks, evaluate=lambda: self._evaluate(network), rank_id=self.rank_id,
                         device_num=self.device_num, dataset_given=self.train_dataset is not None)
        self.state = loop.state
        loop.state.delta_info = delta_info(network, self._base_source(network, point))
        return loop.run(do_eval)

    def _base_source(self, network, point):
        """Where `network`'s base weights came from: the whole checkpoint loaded last, else the model config's
        checkpoint_name_or_path, else the base the resumed delta was trained on ('' for initial weights)."""
        recorded = ((point.delta or {}).get('base') or {}).get('checkpoint', '') if point is not None else ''
        config = getattr(network, 'config', None)
        return self._base_checkpoint or getattr(config, 'checkpoint_name_or_path', '') or recorded

    def _only_save_strategy(self, training):
        """With `only_save_strategy: True`: write this run's strategy files (`strategy.save_strategy`), build and
        run nothing else, and return True."""
        if not is_true(self.config.get('only_save_strategy', False)):
            return False
        save_strategy(self.config, self.rank_id, self._get_network, training, self.optimizers)
        return True

    # ----------------------------------------------------------------- evaluate / predict
    def evaluate(self, eval_checkpoint=False, auto_trans_ckpt=None, **generate_kwargs):
        """Evaluate on the eval dataset with the run's metric (`compute_metrics`, else the config's `metric`, else
        perplexity: {'loss': mean token loss, 'PPL': exp(loss), 'tokens'}), fed what it declares it consumes (see
        `mindformers.core.metric.contract`). A metric that consumes 'text' (ADGENMetric) generates a continuation of
        each prompt and returns its scores and 'samples'; `generate_kwargs` such as max_new_tokens override the
        config's `generation` section there."""
        if generate_kwargs and self._metric().consumes != 'text':
            raise TypeError(f"unknown argument(s): {', '.join(sorted(generate_kwargs))} (generation options only "
                            f"apply to a generation-based metric, one with consumes = 'text', e.g. metric: "
                            f"{{type: ADGENMetric}})")
        self._set_auto_trans_ckpt(auto_trans_ckpt)
        self._setup(compile_cache=False)
        if self._only_save_strategy(training=False):
            return None
        checkpoint = self._checkpoint_arg(eval_checkpoint)
        self._warn_without_weights(checkpoint, 'evaluate')
        network = self._network_with_weights(checkpoint)
        result = self._evaluate(network, generate_kwargs)
        logger.info("eval: %s", describe(result))
        return result

    def _metric(self):
        return resolve_metric(self.compute_metrics, self.config)

    def _evaluate(self, network, generate_kwargs=None):
        """The run's metric over the eval data (`evaluation.evaluate`). Under data parallel the result is global, the
        same on every rank: a config-built eval dataset is read whole by every rank, which evaluates batches
        rank_id, rank_id + device_num, ... (so the batches are exactly a single process's); a given dataset is
        evaluated as each rank has it. The metric's sums are then added over the ranks."""
        metric = self._metric()
        dataset = self._build_dataset('eval_dataset', self.eval_dataset, network)
        text = metric.consumes == 'text'
        return evaluate(network, metric, dataset, rank_id=self.rank_id, device_num=self.device_num,
                        stride=self.device_num if self.eval_dataset is None else 1,
                        tokenizer=self._get_tokenizer() if text else None,
                        options=generation_options(self.config, generate_kwargs or {}) if text else None)

    def predict(self, predict_checkpoint=None, auto_trans_ckpt=None, input_data=None, batch_size=None,
                **generate_kwargs):
        """Continue each prompt of `input_data` (a str or list of str) with the text-generation pipeline
        (`pipeline('text_generation', model=..., tokenizer=...)`; one batch of every prompt unless `batch_size`).
        Returns `[{'text_generation_text': [text]}, ...]`, one entry per prompt, each text including its prompt. A
        prompt that is not valid text or has ids outside the model's vocabulary raises ValueError naming its index."""
        self._set_auto_trans_ckpt(auto_trans_ckpt)
        self._setup(compile_cache=False)
        if self._only_save_strategy(training=False):
            return None
        checkpoint = self._checkpoint_arg(predict_checkpoint)
        self._warn_without_weights(checkpoint, 'predict')
        network = self._network_with_weights(checkpoint)
        if input_data is None:
            input_data = self.config.get('input_data')
        if input_data is None:
            raise ValueError("predict needs input_data (a prompt or a list of prompts; --predict_data on the CLI)")
        prompts = [input_data] if isinstance(input_data, str) else list(input_data)
        generator = pipeline('text_generation', model=network, tokenizer=self._get_tokenizer())
        return generator(prompts, batch_size=int(batch_size or max(len(prompts), 1)), **generate_kwargs)


def _model_config(config):
    """The run config's model.model_config section ({} when absent)."""
    return (config.get('model') or {}).get('model_config') or {}


def _within(path, location):
    """True when `path` is `location` or lies inside it (or the other way round)."""
    path, location = os.path.realpath(os.fspath(path)), os.path.realpath(os.fspath(location))
    return path == location or path.startswith(location + os.sep) or location.startswith(path + os.sep)


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
