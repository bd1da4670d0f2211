"""`build_*`: turn a config section (a mapping with `type`) into an object through the registry."""
from mindformers.tools.register import MindFormerRegister, MindFormerModuleType as T, MindFormerConfig


def build_module(config=None, module_type=T.TOOLS, default_args=None, class_name=None, where=None, **kwargs):
    """Build from `config` (a mapping with `type`; `default_args` override its keys) or from `class_name` and
    keyword arguments. Returns None when both are missing. `where` names the YAML path in errors."""
    if config is None and class_name is None:
        return None
    if config is not None:
        cfg = config.to_dict() if isinstance(config, MindFormerConfig) else dict(config)
        return MindFormerRegister.get_instance_from_cfg(cfg, module_type, default_args, where=where or module_type)
    return MindFormerRegister.get_instance(module_type, class_name, **kwargs)


def _builder(module_type, name):
    def build(config=None, default_args=None, class_name=None, where=None, **kwargs):
        return build_module(config, module_type, default_args, class_name, where, **kwargs)
    build.__name__ = name
    build.__doc__ = f"Build a registered {module_type} object (see `build_module`)."
    return build


build_trainer = _builder(T.TRAINER, 'build_trainer')
build_pipeline = _builder(T.PIPELINE, 'build_pipeline')
build_processor = _builder(T.PROCESSOR, 'build_processor')
build_tokenizer = _builder(T.TOKENIZER, 'build_tokenizer')
build_dataset = _builder(T.DATASET, 'build_dataset')
build_dataset_loader = _builder(T.DATASET_LOADER, 'build_dataset_loader')
build_modules = _builder(T.MODULES, 'build_modules')
build_loss = _builder(T.LOSS, 'build_loss')
build_callback = _builder(T.CALLBACK, 'build_callback')
build_wrapper = _builder(T.WRAPPER, 'build_wrapper')
build_metric = _builder(T.METRIC, 'build_metric')
build_tools = _builder(T.TOOLS, 'build_tools')


def build_model_config(config, default_args=None):
    """Build a model config object (`model.model_config` section) through the CONFIG registry."""
    return build_module(config, T.CONFIG, default_args, where='model.model_config')


def build_model(config, default_args=None):
    """Build a model from a `model` section: `{model_config: {type: ...}, arch: {type: ...}}`.

    `default_args` are set on the model config before the model is built (e.g. `parallel_config`, `batch_size`)."""
    if config is None:
        return None
    config = dict(config)
    for key in ('model_config', 'arch'):
        if key not in config:
            raise KeyError(f"model section lacks '{key}' (expected model.model_config.type and model.arch.type)")
    model_config = config['model_config']
    if not hasattr(model_config, 'to_dict') or isinstance(model_config, dict):
        model_config = build_model_config(model_config, default_args)
    elif default_args:
        for key, value in default_args.items():
            setattr(model_config, key, value)
    arch = dict(config['arch'])
    return build_module(arch, T.MODELS, {'config': model_config}, where='model.arch')
