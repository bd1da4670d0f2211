"""AutoConfig, AutoModel, AutoTokenizer, AutoProcessor: objects from a registered model name, a run YAML, a directory
written by `save_pretrained`, or a HuggingFace model directory (families in `convert_utils.HF_FAMILIES`, converted on
load). Our directories are told apart by the `type` key in their config.json; HF ones carry `model_type`."""
import importlib
import json
import os

import numpy as np

from mindformers.models.convert_utils import HF_FAMILIES, load_hf_weights
from mindformers.tools.build import build_model_config, build_model, build_processor, build_tokenizer
from mindformers.tools.model_book import CHECKPOINTS, find_config
from mindformers.tools.register import MindFormerConfig, MindFormerRegister, MindFormerModuleType

CONFIG_FILE = 'config.json'
PROCESSOR_CONFIG_FILE = 'processor_config.json'


def _run_config(name_or_path):
    """The run config behind a registered name or a YAML path."""
    if str(name_or_path).endswith(('.yaml', '.yml')):
        return MindFormerConfig(os.fspath(name_or_path))
    return MindFormerConfig(find_config(name_or_path))


def _read_config_json(directory):
    path = os.path.join(directory, CONFIG_FILE)
    if not os.path.isfile(path):
        raise ValueError(f"{directory} has no {CONFIG_FILE}: expected a directory written by save_pretrained or a "
                         f"HuggingFace model directory")
    with open(path, encoding='utf-8') as f:
        data = json.load(f)
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object")
    return data


def _hf_family(directory, data):
    """The conversion module of a HF directory's `model_type`, or a clear error."""
    model_type = data.get('model_type')
    if model_type not in HF_FAMILIES:
        raise ValueError(f"{os.path.join(directory, CONFIG_FILE)} has model_type {model_type!r}, which has no "
                         f"converter (supported HuggingFace model types: {', '.join(sorted(HF_FAMILIES))})")
    return importlib.import_module(HF_FAMILIES[model_type][0])


def _is_ours(data):
    return 'type' in data


class AutoConfig:
    """`AutoConfig.from_pretrained(name | yaml | directory, **overrides)` -> the model config object."""

    @classmethod
    def from_pretrained(cls, name_or_path, **kwargs):
        if os.path.isdir(str(name_or_path)):
            data = _read_config_json(name_or_path)
            config = build_model_config(data) if _is_ours(data) else \
                _hf_family(name_or_path, data).config_from_hf(data)
            for key, value in kwargs.items():
                setattr(config, key, value)
            return config
        section = dict(_run_config(name_or_path).model.model_config)
        section.update(kwargs)
        return build_model_config(section)


class AutoModel:
    """`AutoModel.from_pretrained(name | yaml | directory, **config_overrides)` and `AutoModel.from_config(config)`."""

    @classmethod
    def from_config(cls, config, **kwargs):
        """Build the model class registered for this config type (`GPT2Config` -> `GPT2LMHeadModel`)."""
        if isinstance(config, (str, os.PathLike)):
            config = AutoConfig.from_pretrained(os.fspath(config), **kwargs)
        arch = _ARCH_FOR_CONFIG.get(type(config).__name__)
        if arch is None:
            raise ValueError(f"no model class is known for {type(config).__name__}; "
                             f"known: {', '.join(sorted(_ARCH_FOR_CONFIG))}")
        return MindFormerRegister.get_cls(MindFormerModuleType.MODELS, arch)(config)

    @classmethod
    def from_pretrained(cls, name_or_path, **kwargs):
        if not os.path.isdir(str(name_or_path)):
            run_config = _run_config(name_or_path)
            if kwargs:
                run_config.model.model_config.merge_from_dict(kwargs)
            model_config = run_config.model.model_config
            if not model_config.get('checkpoint_name_or_path') and name_or_path in CHECKPOINTS:
                model_config.checkpoint_name_or_path = name_or_path  # published weights: fetched and loaded
            return build_model(run_config.model)
        directory = os.fspath(name_or_path)
        data = _read_config_json(directory)
        config = AutoConfig.from_pretrained(directory, **kwargs)
        if _is_ours(data):
            weights = sorted(f for f in os.listdir(directory) if f.endswith(('.ckpt', '.safetensors')))
            if len(weights) > 1:
                raise ValueError(f"{directory} holds several weight files ({', '.join(weights)}); keep one")
            if weights and not config.checkpoint_name_or_path:
                config.checkpoint_name_or_path = os.path.join(directory, weights[0])
            return cls.from_config(config)
        config.checkpoint_name_or_path = ''
        model = cls.from_config(config)
        converted = _hf_family(directory, data).convert_hf_to_ms(load_hf_weights(directory), config)
        _load_arrays(model, converted, directory)
        return model


def _load_arrays(model, arrays, source):
    """Load name -> ndarray into `model` (strict: names and shapes must fit), cast to each parameter's dtype."""
    import mindspore as ms
    from mindformers.tools.checkpoint import load_into_network
    params = {p.name: p for p in model.get_parameters()}
    model.check_checkpoint(arrays, source)
    tensors = {name: ms.Parameter(ms.Tensor(np.asarray(value)).astype(params[name].dtype), name=name)
               for name, value in arrays.items() if name in params}
    load_into_network(model, tensors, source)


class AutoTokenizer:
    """`AutoTokenizer.from_pretrained(name | yaml | directory)`; a directory may be ours or HuggingFace's."""

    @classmethod
    def from_pretrained(cls, name_or_path, **kwargs):
        from mindformers.models.base_tokenizer import TOKENIZER_CONFIG_FILE
        if not os.path.isdir(str(name_or_path)):
            section = dict(_run_config(name_or_path).processor.tokenizer)
            section.update(kwargs)
            return build_tokenizer(section, where='processor.tokenizer')
        directory = os.fspath(name_or_path)
        class_name = None
        config_path = os.path.join(directory, TOKENIZER_CONFIG_FILE)
        if os.path.isfile(config_path):
            with open(config_path, encoding='utf-8') as f:
                class_name = json.load(f).get('tokenizer_class')
        if class_name is None or not MindFormerRegister.is_exist(MindFormerModuleType.TOKENIZER, class_name):
            data = _read_config_json(directory) if os.path.isfile(os.path.join(directory, CONFIG_FILE)) else {}
            if data.get('model_type') not in HF_FAMILIES:
                raise ValueError(f"{directory}: cannot tell which tokenizer to load (tokenizer_class "
                                 f"{class_name!r} in {TOKENIZER_CONFIG_FILE} is not registered, and config.json "
                                 f"names no supported model_type)")
            class_name = HF_FAMILIES[data['model_type']][1]
        tok_cls = MindFormerRegister.get_cls(MindFormerModuleType.TOKENIZER, class_name)
        return tok_cls.from_pretrained(directory, **kwargs)


class AutoProcessor:
    """`AutoProcessor.from_pretrained(name | yaml | directory)`: the processor (tokenizer + input settings)."""

    @classmethod
    def from_pretrained(cls, name_or_path, **kwargs):
        from mindformers.models.base_processor import BaseProcessor
        if os.path.isdir(str(name_or_path)):
            path = os.path.join(name_or_path, PROCESSOR_CONFIG_FILE)
            if not os.path.isfile(path):
                tokenizer = AutoTokenizer.from_pretrained(name_or_path)  # a tokenizer-only directory
                return BaseProcessor(tokenizer=tokenizer, **kwargs)
            with open(path, encoding='utf-8') as f:
                class_name = json.load(f).get('type', 'BaseProcessor')
            proc_cls = MindFormerRegister.get_cls(MindFormerModuleType.PROCESSOR, class_name, where=path)
            return proc_cls.from_pretrained(name_or_path, **kwargs)
        section = dict(_run_config(name_or_path).processor)
        section.update(kwargs)
        section.setdefault('type', 'BaseProcessor')
        return build_processor(section, where='processor')


_ARCH_FOR_CONFIG = {'GPT2Config': 'GPT2LMHeadModel'}


def register_auto(config_name, model_name):
    """Tell AutoModel.from_config which registered model class a config class builds."""
    _ARCH_FOR_CONFIG[config_name] = model_name
