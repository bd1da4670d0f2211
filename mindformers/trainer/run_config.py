"""validate_run_config: every key of a run config is one we know, every count is a positive integer, and every
MindFormers switch we accept but do not implement keeps its default."""
import inspect
import numbers

from mindformers.core.context.build_context import ContextConfig, ParallelContextConfig
from mindformers.generation.generation_config import GenerationConfig
from mindformers.parallel.config import build_parallel_config
from mindformers.tools.register import MindFormerRegister, MindFormerModuleType as T
from mindformers.tools.register.check import keyword_names
from mindformers.tools.register.config import ConfigError, unknown_key_message

RUN_MODES = ('train', 'finetune', 'eval', 'predict', 'serve')
# top-level keys read by the Trainer or run_mindformer.py (sections are checked below)
_TOP_LEVEL = {'seed', 'run_mode', 'output_dir', 'overwrite_output_dir', 'load_checkpoint', 'src_strategy_path_or_dir',
              'auto_trans_ckpt', 'only_save_strategy', 'resume_training', 'use_parallel', 'do_eval', 'eval_step_interval',
              'eval_epoch_interval', 'input_data', 'context', 'parallel', 'parallel_config', 'recompute_config',
              'runner_config', 'runner_wrapper', 'trainer', 'model', 'optimizer', 'lr_schedule', 'callbacks', 'metric',
              'processor', 'generation', 'train_dataset', 'train_dataset_task', 'eval_dataset', 'eval_dataset_task'}
# MindFormers top-level keys of features we do not implement: accepted with these values only (what to do instead)
_UNSUPPORTED_TOP_LEVEL = {
    'micro_batch_interleave_num': ((1,), 'micro-batch interleaving is not implemented'),
    'remote_save_url': ((None, ''), 'saving to OBS/ModelArts is not implemented; copy output_dir yourself'),
    'profile': ((False,), 'the profiler is not wired in; use MindSpore Profiler in your own script'),
    'profile_communication': ((False,), 'the profiler is not wired in'),
    'profile_memory': ((False,), 'the profiler is not wired in'),
    'init_start_profile': ((False,), 'the profiler is not wired in'),
    'auto_tune': ((False,), 'dataset autotune is not implemented'),
    'layer_scale': ((False,), 'layer-wise learning-rate scaling is not implemented'),
    'lr_scale': ((False,), 'learning-rate scaling is not implemented'),
    'eval_callbacks': ((None, []), 'evaluation callbacks are not implemented; use callbacks'),
    'moe_config': ((None, {}), 'mixture of experts is not implemented'),
}
# settings of the switched-off features above: inert, accepted as they are
_INERT_TOP_LEVEL = {'profile_start_step', 'profile_stop_step', 'filepath_prefix', 'autotune_per_step', 'layer_decay',
                    'lr_scale_factor'}
# sections the command line may create when the YAML lacks them (`--generation.max_new_tokens 5`)
CREATABLE_SECTIONS = ('context', 'parallel', 'parallel_config', 'recompute_config', 'runner_config', 'generation',
                      'trainer')
_RUNNER_COUNTS = ('epochs', 'batch_size', 'gradient_accumulation_steps')
_RUNNER_KEYS = set(_RUNNER_COUNTS) | {'sink_mode', 'sink_size'}
_TRAINER_TYPES = ('Trainer', 'CausalLanguageModelingTrainer')
# sections built through the registry: (module type, default type, nested sections built the same way)
_BUILT = {
    'optimizer': (T.OPTIMIZER, None, {'learning_rate': (T.LR, None)}),
    'lr_schedule': (T.LR, None, {}),
    'runner_wrapper': (T.WRAPPER, 'MFTrainOneStepCell', {'scale_sense': (T.WRAPPER, None)}),
    'metric': (T.METRIC, None, {}),
    'processor': (T.PROCESSOR, 'BaseProcessor', {'tokenizer': (T.TOKENIZER, None)}),
}
# keyword arguments the Trainer passes itself (a YAML may still name them)
_SUPPLIED = {T.OPTIMIZER: {'params'}, T.WRAPPER: {'network', 'optimizer'}, T.MODELS: {'config'}}
# keys a dataset reads from its data_loader section before building the loader class
_LOADER_EXTRA = {'MindDataset': {'dataset_dir'}}


def validate_run_config(config, source=None):
    """Check a full run config (a mapping, e.g. a MindFormerConfig) and return it; raise ConfigError naming the
    dotted key, `source` (default: the YAML file the config was loaded from) and the closest valid names.

    Checks: top-level keys; the keys of context, parallel, parallel_config, recompute_config, runner_config,
    trainer, generation, model.model_config (the fields of the class `model_config.type` names, which is then
    built to check the values) and of every section built through the registry (optimizer, lr_schedule,
    runner_wrapper, callbacks, metric, processor, the datasets and their data loaders: the keyword arguments of the
    class `type` names, unless it takes **kwargs); runner_config counts are positive integers; MindFormers switches
    we do not implement keep their defaults."""
    source = source if source is not None else getattr(config, '_source', None)
    try:
        _check(config)
    except (ValueError, TypeError, KeyError) as err:
        message = err.args[0] if err.args else str(err)
        raise ConfigError(f"{source}: {message}" if source else str(message)) from None
    return config


def _check(config):
    for key in config:
        if key in _TOP_LEVEL or key in _INERT_TOP_LEVEL:
            continue
        if key in _UNSUPPORTED_TOP_LEVEL:
            allowed, why = _UNSUPPORTED_TOP_LEVEL[key]
            if config[key] not in allowed:
                raise ValueError(f"{key}={config[key]!r} is not supported ({why}); remove it")
            continue
        raise ValueError(unknown_key_message(key, _TOP_LEVEL | _INERT_TOP_LEVEL | set(_UNSUPPORTED_TOP_LEVEL)))
    if config.get('run_mode') is not None and config['run_mode'] not in RUN_MODES:
        raise ValueError(f"run_mode {config['run_mode']!r} is not one of {', '.join(RUN_MODES)}")
    _check_runner(_section(config, 'runner_config'))
    _check_trainer(_section(config, 'trainer'))
    ContextConfig.from_dict(_section(config, 'context'))
    ParallelContextConfig.from_dict(_section(config, 'parallel'))
    parallel = build_parallel_config(_section(config, 'parallel_config'), config.get('recompute_config'))
    generation = _section(config, 'generation')
    _check_keys(generation, GenerationConfig.names(), 'generation')
    GenerationConfig(**generation).validate()
    _check_model(config.get('model'), parallel)
    for key, (module_type, default_type, nested) in _BUILT.items():
        section = _section(config, key)
        if section:
            _check_built(section, module_type, key, default_type)
            for name, (nested_type, nested_default) in nested.items():
                if isinstance(section.get(name), dict):
                    _check_built(section[name], nested_type, f'{key}.{name}', nested_default)
    callbacks = config.get('callbacks') or []
    if not isinstance(callbacks, list):
        raise ValueError(f"callbacks must be a list of mappings with a 'type', got {callbacks!r}")
    for index, callback in enumerate(callbacks):
        _check_built(callback, T.CALLBACK, f'callbacks[{index}]')
    for key in ('train_dataset', 'eval_dataset'):
        _check_dataset(config, key)


def _section(config, key, where=None):
    """`config[key]` as a dict ({} when absent); anything else than a mapping is refused."""
    value = config.get(key)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ValueError(f"'{where or key}' must be a mapping (a section of keys), got {value!r}")
    return value


def _check_keys(section, known, where):
    unknown = sorted((k for k in section if k not in known), key=str)
    if unknown:
        raise ValueError('; '.join(unknown_key_message(f'{where}.{key}', known) for key in unknown))


def _check_runner(runner):
    _check_keys(runner, _RUNNER_KEYS, 'runner_config')
    for name in _RUNNER_COUNTS:
        value = runner.get(name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1):
            raise ValueError(f"runner_config.{name} must be a positive integer, got {value!r}")
    if runner.get('sink_mode') not in (None, False):
        raise ValueError(f"runner_config.sink_mode={runner['sink_mode']!r} is not supported (data sinking is not "
                         f"implemented: every step is fed from the host, with the same results); set sink_mode: "
                         f"False or remove it")
    if runner.get('sink_size') not in (None, -1):
        raise ValueError(f"runner_config.sink_size={runner['sink_size']!r} is not supported (it sizes data sinking, "
                         f"which is not implemented); remove it")


def _check_trainer(trainer):
    _check_keys(trainer, {'type', 'model_name'}, 'trainer')
    if trainer.get('type') not in (None, *_TRAINER_TYPES):
        raise ValueError(f"trainer.type {trainer['type']!r} is not supported: the one trainer here does causal "
                         f"language modelling (text generation); use type: Trainer (or "
                         f"CausalLanguageModelingTrainer) or remove it")
    if trainer.get('model_name') is not None and not isinstance(trainer['model_name'], str):
        raise ValueError(f"trainer.model_name must be a string (a label), got {trainer['model_name']!r}")


def _check_model(model, parallel):
    if model is None:
        return
    if not isinstance(model, dict):
        raise ValueError(f"'model' must be a mapping with model_config and arch, got {model!r}")
    _check_keys(model, {'model_config', 'arch'}, 'model')
    model_config = model.get('model_config')
    if model_config is not None:
        if not isinstance(model_config, dict) or 'type' not in model_config:
            raise ValueError(f"model.model_config must be a mapping with a 'type' (e.g. GPT2Config), "
                             f"got {model_config!r}")
        config_cls = MindFormerRegister.get_cls(T.CONFIG, model_config['type'], where='model.model_config.type')
        _check_keys(model_config, config_cls.field_names() | {'type'}, 'model.model_config')
        args = {k: v for k, v in model_config.items() if k != 'type'}
        args.setdefault('parallel_config', parallel)
        try:
            config_cls(**args)
        except (ValueError, TypeError) as err:
            raise ValueError(f"model.model_config: {err}") from None
    if model.get('arch') is not None:
        _check_built(model['arch'], T.MODELS, 'model.arch')


def _check_built(section, module_type, where, default_type=None):
    """The keys of a section the registry builds are keyword arguments of the class its `type` names."""
    if not isinstance(section, dict):
        raise ValueError(f"'{where}' must be a mapping with a 'type', got {section!r}")
    type_name = section.get('type', default_type)
    if type_name is None:
        raise ValueError(f"'{where}' has no 'type' (keys: {', '.join(map(str, section)) or 'none'})")
    cls = type_name if inspect.isclass(type_name) else \
        MindFormerRegister.get_cls(module_type, type_name, where=f'{where}.type')
    known = keyword_names(cls)
    if known is not None:
        extra = _SUPPLIED.get(module_type, set()) | _LOADER_EXTRA.get(getattr(cls, '__name__', None), set())
        _check_keys(section, known | {'type'} | extra, where)


def _check_dataset(config, key):
    """`<key>_task` is {type, dataset_config}; the dataset config (`<key>`, or the task's dataset_config) holds the
    dataset class's keys and a data_loader built through the registry."""
    task = _section(config, f'{key}_task')
    _check_keys(task, {'type', 'dataset_config'}, f'{key}_task')
    dataset_cls = MindFormerRegister.get_cls(T.DATASET, task.get('type', 'CausalLanguageModelDataset'),
                                             where=f'{key}_task.type')
    for where, section in ((key, _section(config, key)), (f'{key}_task.dataset_config',
                                                          _section(task, 'dataset_config', f'{key}_task.dataset_config'))):
        known = getattr(dataset_cls, 'KNOWN_KEYS', None)
        if known:
            _check_keys(section, set(known) | set(getattr(dataset_cls, 'IGNORED_KEYS', ())), where)
        if section.get('data_loader') is not None:
            _check_built(section['data_loader'], T.DATASET_LOADER, f'{where}.data_loader')
