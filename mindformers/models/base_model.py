"""BaseModel: the parent of every model (holds the config, loads weights, generates text)."""
import os

import numpy as np
from mindspore import nn

from mindformers.generation.text_generator import GeneratorMixin
from mindformers.tools.checkpoint import (CheckpointError, load_checkpoint_file, load_into_network,
                                          resolve_checkpoint)
from mindformers.tools.utils import resolve_path


def _listing(items, limit=10):
    shown = ', '.join(items[:limit])
    return shown + (f" ... (+{len(items) - limit} more)" if len(items) > limit else '')


class BaseModel(nn.Cell, GeneratorMixin):
    """A model cell built from a config (`self.config`).

    Subclasses build their layers, then call `self.load_checkpoint(config)` at the end of `__init__` so that
    `config.checkpoint_name_or_path` (a `.ckpt`/`.safetensors` file, or a checkpoint directory) is loaded."""

    def __init__(self, config, **kwargs):
        super().__init__(**kwargs)
        self.config = config

    def load_checkpoint(self, config=None):
        """Load `config.checkpoint_name_or_path` (default: `self.config`'s) if set; returns the file loaded or None.

        Strict: every model parameter must be present with the model's shape, and no parameter-like entry under the
        model's own top-level names may be left over (optimizer states such as `adam_m.*` are ignored). All
        problems are reported in one CheckpointError. Weights are never downloaded."""
        config = config or self.config
        given = getattr(config, 'checkpoint_name_or_path', '') or ''
        if not given:
            return None
        path = resolve_path(os.fspath(given))
        if not os.path.exists(path):
            raise CheckpointError(f"checkpoint_name_or_path {given!r} is not an existing file or directory "
                                  f"(downloading weights by name is not supported; convert them with "
                                  f"convert_weight.py and give the path)")
        path = resolve_checkpoint(path)
        param_dict = load_checkpoint_file(path)
        self.check_checkpoint(param_dict, path)
        load_into_network(self, param_dict, path)
        return path

    def check_checkpoint(self, param_dict, path='<checkpoint>'):
        """Raise CheckpointError naming every missing, unexpected or mis-shaped parameter of `param_dict`."""
        own = {p.name: p for p in self.get_parameters()}
        roots = {name.split('.', 1)[0] for name in own}
        missing = sorted(set(own) - set(param_dict))
        unexpected = sorted(n for n in param_dict if n not in own and n.split('.', 1)[0] in roots)
        mismatched = [f"{n} (checkpoint {tuple(param_dict[n].shape)}, model {tuple(p.shape)})"
                      for n, p in own.items() if n in param_dict and tuple(param_dict[n].shape) != tuple(p.shape)]
        problems = []
        if missing:
            problems.append(f"missing {_listing(missing)}")
        if unexpected:
            problems.append(f"unexpected {_listing(unexpected)}")
        if mismatched:
            problems.append(f"shape mismatch {_listing(mismatched)}")
        if not problems:
            return
        if len(missing) == len(own):
            problems.append(f"the checkpoint holds {_listing(sorted(param_dict), 5)} — convert foreign weights "
                            f"with convert_weight.py first")
        raise CheckpointError(f"checkpoint {path} does not fit {type(self).__name__}: {'; '.join(problems)}")

    def num_parameters(self, trainable_only=False):
        """Number of scalar parameters (each shared parameter counted once)."""
        params = self.trainable_params() if trainable_only else self.get_parameters()
        return int(sum(np.prod(p.shape) for p in params))
