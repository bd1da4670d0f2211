"""AutoConfig, AutoModel, AutoTokenizer: objects from a registered model name, a run YAML, or a saved directory."""
import json
import os

from mindformers.tools.build import build_model_config, build_model, build_tokenizer
from mindformers.tools.model_book import find_config
from mindformers.tools.register import MindFormerConfig, MindFormerRegister, MindFormerModuleType


def _run_config(name_or_path):
    """The run config behind a registered name or a YAML path."""
    if isinstance(name_or_path, str) and name_or_path.endswith(('.yaml', '.yml')):
        return MindFormerConfig(name_or_path)
    return MindFormerConfig(find_config(name_or_path))


def _config_from_dir(directory):
    path = os.path.join(directory, 'config.json')
    if not os.path.isfile(path):
        raise ValueError(f"{directory} has no config.json (expected a directory written by save_pretrained)")
    with open(path, encoding='utf-8') as f:
        data = json.load(f)
    return build_model_config(data)


class AutoConfig:
    """`AutoConfig.from_pretrained(name | yaml | directory, **overrides)` → the model config object."""

    @classmethod
    def from_pretrained(cls, name_or_path, **kwargs):
        if os.path.isdir(str(name_or_path)):
            config = _config_from_dir(name_or_path)
            for key, value in kwargs.items():
                setattr(config, key, value)
            return config
        section = dict(_run_config(name_or_path).model.model_config)
        section.update(kwargs)
        return build_model_config(section)


class AutoModel:
    """`AutoModel.from_pretrained(name | yaml | directory)` and `AutoModel.from_config(config)`."""

    @classmethod
    def from_config(cls, config, **kwargs):
        """Build the model class registered for this config type (`GPT2Config` → `GPT2LMHeadModel`)."""
        if isinstance(config, (str, os.PathLike)):
            config = AutoConfig.from_pretrained(os.fspath(config), **kwargs)
        arch = _ARCH_FOR_CONFIG.get(type(config).__name__)
        if arch is None:
            raise ValueError(f"no model class is known for {type(config).__name__}; "
                             f"known: {', '.join(sorted(_ARCH_FOR_CONFIG))}")
        return MindFormerRegister.get_cls(MindFormerModuleType.MODELS, arch)(config)

    @classmethod
    def from_pretrained(cls, name_or_path, **kwargs):
        if os.path.isdir(str(name_or_path)):
            config = AutoConfig.from_pretrained(name_or_path, **kwargs)
            weights = [f for f in os.listdir(name_or_path) if f.endswith(('.ckpt', '.safetensors'))]
            if len(weights) == 1 and not config.checkpoint_name_or_path:
                config.checkpoint_name_or_path = os.path.join(name_or_path, weights[0])
            model = cls.from_config(config)
        else:
            run_config = _run_config(name_or_path)
            if kwargs:
                run_config.model.model_config.merge_from_dict(kwargs)
            model = build_model(run_config.model)
        return model


class AutoTokenizer:
    """`AutoTokenizer.from_pretrained(name | yaml | directory)`."""

    @classmethod
    def from_pretrained(cls, name_or_path, **kwargs):
        if os.path.isdir(str(name_or_path)):
            path = os.path.join(name_or_path, 'tokenizer_config.json')
            if not os.path.isfile(path):
                raise ValueError(f"{name_or_path} has no tokenizer_config.json")
            with open(path, encoding='utf-8') as f:
                data = json.load(f)
            class_name = data.get('tokenizer_class') or data.get('type')
            tok_cls = MindFormerRegister.get_cls(MindFormerModuleType.TOKENIZER, class_name)
            return tok_cls.from_pretrained(name_or_path, **kwargs)
        section = dict(_run_config(name_or_path).processor.tokenizer)
        section.update(kwargs)
        return build_tokenizer(section, where='processor.tokenizer')


_ARCH_FOR_CONFIG = {'GPT2Config': 'GPT2LMHeadModel'}


def register_auto(config_name, model_name):
    """Tell AutoModel.from_config which registered model class a config class builds."""
    _ARCH_FOR_CONFIG[config_name] = model_name
