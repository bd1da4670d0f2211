"""mindformers: a MindSpore-native suite for large transformer language models.

The public names below load on first use (PEP 562), so `import mindformers` (and with it every
`mindformers.tools.*` command-line tool) starts without loading MindSpore. The registry loads the library's own
classes on its first lookup (`MindFormerRegister.get_cls`)."""
import importlib
import sys
import types

__version__ = '0.1.0'

_EXPORTS = {module: names.split() for module, names in {
    'mindformers.tools.register': 'MindFormerRegister MindFormerModuleType MindFormerConfig',
    'mindformers.tools.build': 'build_module build_trainer build_pipeline build_processor build_tokenizer '
                               'build_dataset build_dataset_loader build_model build_model_config build_modules '
                               'build_loss build_callback build_wrapper build_metric build_tools',
    'mindformers.core': 'init_context ContextConfig ParallelContextConfig ParallelConfig RecomputeConfig '
                        'build_parallel_config build_lr build_optim CrossEntropyLoss PerplexityMetric ADGENMetric '
                        'MFLossMonitor CheckpointMonitor CheckpointMointor AdamWeightDecay ClipGradNorm',
    'mindformers.dataset': 'CausalLanguageModelDataset KeyWordGenDataset ADGenDataLoader',
    'mindformers.models.auto': 'AutoConfig AutoModel AutoProcessor AutoTokenizer',
    'mindformers.models.peft_adapter': 'save_peft_adapter load_peft_adapter',
    'mindformers.generation': 'GeneratorMixin GenerationConfig DecodingSession BaseStreamer TextStreamer '
                              'TextIteratorStreamer',
    'mindformers.wrapper': 'MFTrainOneStepCell',
    'mindformers.trainer': 'Trainer TrainingArguments',
    'mindformers.pipeline': 'pipeline BasePipeline TextGenerationPipeline',
}.items()}
_HOME = {name: module for module, names in _EXPORTS.items() for name in names}
_MODELS = 'mindformers.models'  # every class it exports: base classes and each family's config, models, tokenizers


def _model_classes():
    models = importlib.import_module(_MODELS)
    return {name: value for name, value in vars(models).items() if isinstance(value, type)}


def __getattr__(name):
    if name == '__all__':
        return sorted(set(_HOME) | set(_model_classes()))
    if name in _HOME:
        value = getattr(importlib.import_module(_HOME[name]), name)
    elif not name.startswith('_') and name in _model_classes():
        value = _model_classes()[name]
    else:
        raise AttributeError(f"module 'mindformers' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_HOME))


class _Package(types.ModuleType):
    """`mindformers.pipeline` is the `pipeline()` function, as it always was: the import system binds each loaded
    subpackage on its parent, which here would replace the function with the `mindformers.pipeline` package."""

    def __setattr__(self, name, value):
        if name == 'pipeline' and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
