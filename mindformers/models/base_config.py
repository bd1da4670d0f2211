"""BaseConfig: the parent of every model config (plain attributes, YAML/JSON round trip)."""
import json
import os

from mindformers.core.parallel_config import ParallelConfig, build_parallel_config


class BaseConfig:
    """Holds a model's hyper-parameters as attributes.

    Subclasses declare their documented fields as keyword arguments and call `super().__init__(**kwargs)`;
    unknown keywords are kept as attributes (so YAML generation defaults such as `top_k` travel with the model).
    `parallel_config` accepts a mapping or a ParallelConfig; `checkpoint_name_or_path` names weights to load."""

    model_type = 'base'

    def __init__(self, parallel_config=None, checkpoint_name_or_path='', **kwargs):
        self.parallel_config = build_parallel_config(parallel_config) \
            if not isinstance(parallel_config, ParallelConfig) else parallel_config
        self.checkpoint_name_or_path = checkpoint_name_or_path or ''
        for key, value in kwargs.items():
            if key == 'type':
                continue
            setattr(self, key, value)

    def to_dict(self):
        """JSON-friendly dict of every field, with `type` set to the class name."""
        out = {'type': type(self).__name__}
        for key, value in self.__dict__.items():
            if key.startswith('_'):
                continue
            out[key] = value.to_dict() if hasattr(value, 'to_dict') else value
        return out

    def __repr__(self):
        return f"{type(self).__name__}({json.dumps(self.to_dict(), ensure_ascii=False, default=str)})"

    def save_pretrained(self, save_directory):
        """Write `config.json` (`to_dict()`, atomically) into `save_directory`; returns its path."""
        os.makedirs(save_directory, exist_ok=True)
        path = os.path.join(save_directory, 'config.json')
        tmp = f"{path}.tmp.{os.getpid()}"
        with open(tmp, 'w', encoding='utf-8') as f:
            json.dump(self.to_dict(), f, indent=2, ensure_ascii=False, default=str)
        os.replace(tmp, path)
        return path

    @classmethod
    def from_pretrained(cls, name_or_path, **kwargs):
        """The config of a registered name, run YAML or directory (see AutoConfig.from_pretrained); on a subclass
        the source must hold that class's config."""
        from mindformers.models.auto import AutoConfig
        config = AutoConfig.from_pretrained(name_or_path, **kwargs)
        if not isinstance(config, cls):
            raise ValueError(f"{name_or_path} holds a {type(config).__name__}, not a {cls.__name__}")
        return config

    @classmethod
    def from_dict(cls, mapping):
        args = {k: v for k, v in dict(mapping).items() if k != 'type'}
        return cls(**args)
