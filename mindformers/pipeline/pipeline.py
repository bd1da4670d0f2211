"""pipeline(): a ready-to-call task pipeline from a registered model name, a directory, a YAML or a model object."""
import os

from mindformers.models.base_config import check_kv_cache_dtype
from mindformers.pipeline.base_pipeline import positive_int
from mindformers.quantization import quantization_settings, quantize_model
from mindformers.tools.register import MindFormerRegister, MindFormerModuleType

BUILD_TIME = ('batch_size', 'use_past', 'seq_length', 'quantization', 'quantization_config', 'kv_cache_dtype')


def _task_class(task):
    if isinstance(task, str) and MindFormerRegister.is_exist(MindFormerModuleType.PIPELINE, task):
        return MindFormerRegister.get_cls(MindFormerModuleType.PIPELINE, task)
    names = MindFormerRegister.names(MindFormerModuleType.PIPELINE)
    known = [n for n in names if not n[0].isupper()] or names  # task aliases, not class names
    raise ValueError(f"unknown pipeline task {task!r} (known tasks: {', '.join(known)})")


def _build_options(kwargs):
    """Pop and check the build-time options."""
    given = {k: kwargs.pop(k, None) for k in BUILD_TIME}
    build = {k: v for k, v in given.items() if v is not None}
    for name in ('batch_size', 'seq_length'):
        if name in build:
            positive_int(build[name], name)
    if 'use_past' in build and not isinstance(build['use_past'], bool):
        raise ValueError(f"use_past must be True or False, got {build['use_past']!r}")
    quantization_settings(build.get('quantization'), build.get('quantization_config'), 'pipeline()')
    check_kv_cache_dtype(build.get('kv_cache_dtype'), 'pipeline().kv_cache_dtype')
    return build


def pipeline(task='text_generation', model=None, tokenizer=None, **kwargs):
    """Build the pipeline registered for `task` ('text_generation', or a user pipeline's registered name).

    `model`: a registered name (e.g. 'gpt2_tiny'), a directory from `save_pretrained` or HuggingFace, a run YAML,
    or a model instance. `tokenizer`: an instance, or a name/directory/YAML to load it from; by default it is
    loaded like the model. `batch_size`, `use_past` and `seq_length` configure the model when it is built (for an
    instance, `use_past` and `batch_size` are set on its config and `seq_length` must match it);
    `quantization='int8'` (with an optional `quantization_config={'scheme': 'block32' | 'channel', 'embeddings':
    bool}`) makes it weight-only int8 (quantized as its weights load; an instance is quantized in place);
    `kv_cache_dtype` ('float32' | 'float16') sets the dtype of its decoding sessions' KV cache. Every
    other keyword is a default option of the pipeline's call (for text generation: generate options)."""
    from mindformers.models.auto import AutoModel, AutoTokenizer
    pipeline_cls = _task_class(task)
    if model is None:
        raise ValueError("pipeline() needs model= (a registered name such as 'gpt2_tiny', a directory, a YAML "
                         "path or a model instance)")
    build = _build_options(kwargs)
    if isinstance(model, (str, os.PathLike)):
        source = os.fspath(model)
        model = AutoModel.from_pretrained(source, **build)
        if tokenizer is None:
            tokenizer = AutoTokenizer.from_pretrained(source)
    else:
        config = getattr(model, 'config', None)
        if config is None:
            raise TypeError(f"pipeline(model=...) takes a model name, a directory, a YAML path or a model with a "
                            f"`config`, got {type(model).__name__}")
        if 'seq_length' in build and build['seq_length'] != int(config.seq_length):
            raise ValueError(f"pipeline(seq_length={build['seq_length']}) does not match the given model's "
                             f"seq_length {config.seq_length}; build the model with that seq_length instead")
        for name in ('use_past', 'batch_size', 'kv_cache_dtype'):
            if name in build:
                setattr(config, name, build[name])
        if 'kv_cache_dtype' in build:
            model.__dict__.pop('_generate_sessions', None)  # sessions built before hold the old cache
        settings = quantization_settings(build.get('quantization'), build.get('quantization_config'), 'pipeline()')
        if settings is not None:
            quantize_model(model, **settings)
    if isinstance(tokenizer, (str, os.PathLike)):
        tokenizer = AutoTokenizer.from_pretrained(os.fspath(tokenizer))
    model.set_train(False)
    return pipeline_cls(model=model, tokenizer=tokenizer, **kwargs)
