"""PET configurations: one dataclass per algorithm, named by `pet_type` as MindFormers' `model_config.pet_config`
names it. `pet_config_from_dict` turns the YAML mapping into one and refuses unknown types, unknown keys and bad
values with the key's dotted path."""
import dataclasses
from typing import ClassVar, Optional, Tuple, Union

from mindformers.tools.register.config import unknown_key_message

PatternList = Optional[Tuple[str, ...]]


@dataclasses.dataclass
class PetConfig:
    """Fields every algorithm has.

    freeze_include / freeze_exclude: glob patterns (`*` any text) on parameter names applied after the algorithm
    froze the base: names matching `freeze_include` are frozen too, names matching `freeze_exclude` train too
    (e.g. `['*embed_tokens*']`); a name matching both is left as the algorithm set it (MindPet's `freeze_delta`)."""

    pet_type: ClassVar[str] = ''
    freeze_include: PatternList = None
    freeze_exclude: PatternList = None

    def __post_init__(self):
        for name in ('freeze_include', 'freeze_exclude'):
            value = getattr(self, name)
            if value is None:
                continue
            if isinstance(value, str):
                value = (value,)
            if not all(isinstance(v, str) for v in value):
                raise ValueError(f"pet_config.{name} must be a list of glob patterns, got {value!r}")
            setattr(self, name, tuple(value))
        self.validate()

    def validate(self):
        """Raise ValueError naming `pet_config.<field>` for a bad value."""

    def to_dict(self):
        out = {'pet_type': self.pet_type}
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            out[field.name] = list(value) if isinstance(value, tuple) else value
        return out

    # shared checks
    def _positive_int(self, *names):
        for name in names:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"pet_config.{name} must be a positive integer, got {value!r}")

    def _probability(self, *names):
        for name in names:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
                raise ValueError(f"pet_config.{name} must be in [0, 1), got {value!r}")


@dataclasses.dataclass
class LoraConfig(PetConfig):
    """LoRA: y = x W^T + b + (lora_alpha / lora_rank) * dropout(x) A^T B^T on each targeted Linear, A [rank, in]
    Kaiming-uniform (bound 1/sqrt(in), as PEFT), B [out, rank] zero.

    target_modules: which Linears (see `mindformers.pet.targets`): a regex string, full-matched against each
        Linear's dotted path (`model.layers.0.self_attn.q_proj`), or a list of names, each matching a Linear whose
        path is that name or ends in `.<name>`; None: the family's default targets. A pattern matching nothing is
        an error.
    exclude_layers: regexes (or names, as in target_modules) of paths left out even when targeted."""

    pet_type: ClassVar[str] = 'lora'
    lora_rank: int = 8
    lora_alpha: float = 16
    lora_dropout: float = 0.0
    target_modules: Union[str, Tuple[str, ...], None] = None
    exclude_layers: Union[str, Tuple[str, ...], None] = None

    def validate(self):
        self._positive_int('lora_rank')
        if isinstance(self.lora_alpha, bool) or not isinstance(self.lora_alpha, (int, float)) or self.lora_alpha <= 0:
            raise ValueError(f"pet_config.lora_alpha must be a positive number, got {self.lora_alpha!r}")
        self._probability('lora_dropout')
        for name in ('target_modules', 'exclude_layers'):
            value = getattr(self, name)
            if isinstance(value, (list, tuple)):
                if not value or not all(isinstance(v, str) and v for v in value):
                    raise ValueError(f"pet_config.{name} must be a regex string or a non-empty list of names, "
                                     f"got {value!r}")
                setattr(self, name, tuple(value))
            elif value is not None and (not isinstance(value, str) or not value):
                raise ValueError(f"pet_config.{name} must be a regex string or a list of names, got {value!r}")

    @property
    def scaling(self):
        return float(self.lora_alpha) / self.lora_rank


_TYPES = {}


def register_pet_config(cls):
    """Make `cls` (a PetConfig subclass with its own `pet_type`) known to `pet_config_from_dict`."""
    if not (isinstance(cls, type) and issubclass(cls, PetConfig)) or not cls.pet_type:
        raise TypeError(f"register_pet_config takes a PetConfig subclass with a pet_type, got {cls!r}")
    _TYPES[cls.pet_type] = cls
    return cls


register_pet_config(LoraConfig)


def pet_types():
    """The registered pet_type names."""
    return sorted(_TYPES)


def pet_config_class(pet_type, where='pet_config.pet_type'):
    if pet_type not in _TYPES:
        raise ValueError(f"{where}: unknown pet_type {pet_type!r}; supported: {', '.join(pet_types())}")
    return _TYPES[pet_type]


def pet_config_from_dict(mapping, where='pet_config'):
    """A PetConfig from a mapping with `pet_type` (a PetConfig passes through). Unknown types and keys and bad
    values are ValueErrors naming `<where>.<key>`."""
    if mapping is None or isinstance(mapping, PetConfig):
        return mapping
    if not hasattr(mapping, 'items'):
        raise ValueError(f"{where} must be a mapping with pet_type, got {type(mapping).__name__}")
    data = dict(mapping)
    data.pop('type', None)
    if 'pet_type' not in data:
        raise ValueError(f"{where} lacks pet_type (one of {', '.join(pet_types())})")
    cls = pet_config_class(data.pop('pet_type'), f"{where}.pet_type")
    known = {field.name for field in dataclasses.fields(cls)}
    unknown = sorted(key for key in data if key not in known)
    if unknown:
        raise ValueError(f"{where} ({cls.pet_type}): " + '; '.join(
            unknown_key_message(f"{where}.{key}", known) for key in unknown))
    try:
        return cls(**data)
    except ValueError as error:
        raise ValueError(str(error).replace('pet_config.', f"{where}.", 1)) from None
