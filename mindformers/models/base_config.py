"""BaseConfig: the parent of every model config: typed fields declared once, YAML/JSON round trip."""
import inspect
import json
import os
import typing
from typing import ClassVar, Optional

from mindformers.core.parallel_config import ParallelConfig, build_parallel_config
from mindformers.pet.config import PetConfig, pet_config_from_dict
from mindformers.quantization.config import config_settings

_MUTABLE = (list, dict, set)


def _is_class_var(annotation):
    if isinstance(annotation, str):
        return annotation.startswith(('ClassVar', 'typing.ClassVar'))
    return annotation is ClassVar or typing.get_origin(annotation) is ClassVar


def _declared_fields(cls):
    """{name: (default, annotation)} of the annotated class attributes of `cls` and its bases (bases first), ClassVars
    left out."""
    fields = {}
    for klass in reversed(cls.__mro__):
        for name, annotation in inspect.get_annotations(klass).items():
            if _is_class_var(annotation):
                continue
            if name not in vars(klass):
                raise TypeError(f"{cls.__name__}.{name} has no default; every config field needs one")
            default = vars(klass)[name]
            if isinstance(default, _MUTABLE):
                raise TypeError(f"{cls.__name__}.{name}: a {type(default).__name__} default would be shared by "
                                f"every instance; use None or a tuple")
            fields[name] = (default, annotation)
    return fields


KV_CACHE_DTYPES = ('float32', 'float16')


def check_kv_cache_dtype(value, where='kv_cache_dtype'):
    """ValueError naming `where` unless `value` is None (the compute dtype) or one of KV_CACHE_DTYPES."""
    if value is None or value in KV_CACHE_DTYPES:
        return
    why = " (bfloat16: MindSpore's CPU scatter ops have no bfloat16 kernel)" if value == 'bfloat16' else ''
    raise ValueError(f"{where} must be one of {', '.join(KV_CACHE_DTYPES)} (or unset: the compute_dtype), got "
                     f"{value!r}{why}")


class BaseConfig:
    """Holds a model's hyper-parameters as attributes.

    A config class declares each field once, as an annotated class attribute with its default (as a dataclass
    does; a ClassVar annotation marks a class constant), and documents every field in its docstring:

        @MindFormerRegister.register(MindFormerModuleType.CONFIG)
        class MyConfig(BaseConfig):
            model_type: ClassVar[str] = 'my'
            hidden_size: int = 64
            num_layers: int = 2

    `MyConfig(**fields)` takes keywords only: it refuses any keyword that is not a field (TypeError naming it and
    the closest fields; `type`, the registry name, is ignored), sets every field (its default when not given) and
    calls `validate()`. A subclass changes an inherited default by declaring the field again.

    Fields every config has (a family's docstring gives its own defaults where they differ):
    Run: parallel_config (a mapping or a ParallelConfig; None: the defaults), checkpoint_name_or_path ('': weights
        to load at model construction), offset (0: MindFormers' shift of the layers' pipeline stages).
    Precision ('float32' | 'float16' | 'bfloat16', all 'float32'): param_init_type, compute_dtype,
        layernorm_compute_type, softmax_compute_type; initializer_range (0.02): init std; use_flash_attention
        (False; no CPU kernel).
    Tokens: ignore_token_id (-100): targets left out of the loss.
    Tuning: pet_config (None): a parameter-efficient tuning algorithm applied when the model is built, as a mapping
        with `pet_type` (lora, ...; see `mindformers.pet`) or a PetConfig.
    Inference: quantization (None; 'int8': weight-only int8, the float weights quantized as they load, see
        `mindformers.quantization`), quantization_config (None: {scheme: block32, embeddings: false}; scheme
        block32 (an fp16 scale per 32 weights, llama.cpp's Q8_0) or channel (an fp32 scale per output row),
        embeddings: the embedding tables int8 too), kv_cache_dtype (None: the compute_dtype; 'float32' | 'float16':
        the dtype a decoding session stores keys and values in, e.g. float16 under fp32 computation halves the
        cache, see `mindformers.generation.session`).
    Generation defaults (GenerationConfig.from_model_config): batch_size (1), use_past (False: decode with the KV
        cache), max_decode_length (512), max_new_tokens (None: the default number of tokens `generate()` adds),
        top_k (5), top_p (1.0), do_sample (False), repetition_penalty (1.0)."""

    model_type: ClassVar[str] = 'base'
    parallel_config: Optional[ParallelConfig] = None
    checkpoint_name_or_path: str = ''
    offset: int = 0
    param_init_type: str = 'float32'
    compute_dtype: str = 'float32'
    layernorm_compute_type: str = 'float32'
    softmax_compute_type: str = 'float32'
    initializer_range: float = 0.02
    use_flash_attention: bool = False
    ignore_token_id: int = -100
    batch_size: int = 1
    use_past: bool = False
    max_decode_length: int = 512
    max_new_tokens: Optional[int] = None
    top_k: int = 5
    top_p: float = 1.0
    do_sample: bool = False
    repetition_penalty: float = 1.0
    pet_config: Optional[PetConfig] = None
    quantization: Optional[str] = None
    quantization_config: Optional[dict] = None
    kv_cache_dtype: Optional[str] = None

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        cls._fields = _declared_fields(cls)
        cls.__signature__ = inspect.Signature([
            inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=annotation)
            for name, (default, annotation) in cls._fields.items()])

    def __init__(self, **kwargs):
        kwargs.pop('type', None)
        unknown = sorted(key for key in kwargs if key not in self._fields)
        if unknown:
            from mindformers.tools.register.config import unknown_key_message
            raise TypeError(f"{type(self).__name__}: " + '; '.join(
                unknown_key_message(key, self._fields, 'field') for key in unknown))
        for name, (default, _) in self._fields.items():
            setattr(self, name, kwargs.get(name, default))
        if not isinstance(self.parallel_config, ParallelConfig):
            self.parallel_config = build_parallel_config(self.parallel_config)
        self.checkpoint_name_or_path = self.checkpoint_name_or_path or ''
        self.pet_config = pet_config_from_dict(self.pet_config, f"{type(self).__name__}.pet_config")
        config_settings(self)
        check_kv_cache_dtype(self.kv_cache_dtype, f"{type(self).__name__}.kv_cache_dtype")
        self.validate()

    def validate(self):
        """Raise ValueError naming the first inconsistent field (each family checks its own)."""

    @classmethod
    def field_names(cls):
        """The keyword arguments this config class accepts (its fields)."""
        return set(cls._fields)

    def to_dict(self):
        """JSON-friendly dict of every field, with `type` set to the class name."""
        out = {'type': type(self).__name__}
        for key in self._fields:
            value = getattr(self, key)
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

    # checks shared by the families' `validate`; each raises ValueError naming `<ConfigClass>.<field>`
    def check_positive_ints(self, *names, optional=False):
        """Each field is an int >= 1 (or None when `optional`)."""
        for name in names:
            value = getattr(self, name)
            if optional and value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{type(self).__name__}.{name} must be a positive integer"
                                 f"{' or None' if optional else ''}, got {value!r}")

    def check_probabilities(self, *names):
        """Each field (a dropout rate) lies in [0, 1)."""
        for name in names:
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not 0 <= value < 1:
                raise ValueError(f"{type(self).__name__}.{name} must be in [0, 1), got {value!r}")

    def check_dtypes(self, *names):
        """Each field names a supported dtype ('float32' | 'float16' | 'bfloat16')."""
        from mindformers.modules.layers import to_mstype
        for name in names:
            to_mstype(getattr(self, name), f"{type(self).__name__}.{name}")

    def check_fixed(self, expected):
        """`expected` maps a field to (the only supported value, why): anything else is refused."""
        for name, (value, why) in expected.items():
            if bool(getattr(self, name)) != value:
                raise ValueError(f"{type(self).__name__}.{name}={getattr(self, name)!r} is not supported ({why}); "
                                 f"set {name}: {value}")

    def check_model_parallel(self, sizes):
        """Under model parallel, each (name, size) of `sizes` and the vocabulary (unless vocab_emb_dp) split evenly."""
        parallel = self.parallel_config
        mp = parallel.model_parallel
        if mp <= 1:
            return
        owner = type(self).__name__
        for name, value in sizes:
            if value % mp:
                raise ValueError(f"{owner}.{name} ({value}) must be divisible by parallel_config.model_parallel "
                                 f"({mp})")
        if not parallel.vocab_emb_dp and self.vocab_size % mp:
            raise ValueError(f"{owner}.vocab_size ({self.vocab_size}) must be divisible by parallel_config."
                             f"model_parallel ({mp}) unless parallel_config.vocab_emb_dp is True")

    @classmethod
    def from_dict(cls, mapping):
        args = {k: v for k, v in dict(mapping).items() if k != 'type'}
        return cls(**args)


BaseConfig._fields = _declared_fields(BaseConfig)
