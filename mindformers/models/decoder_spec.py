"""DecoderSpec: the typed shape of the LLaMA-style decoder (`models/llama/modeling_llama.py`). LLaMA, ChatGLM2 and
PengCheng.Mind each fill one from their own field names (`config.decoder_spec()`); the decoder reads nothing else
about its architecture."""
import dataclasses
import string
from typing import ClassVar

from mindformers.models.base_config import BaseConfig

NORM_TYPES = ('rmsnorm', 'layernorm')
EXTEND_METHODS = ('None', 'PI', 'NTK')


class DecoderSpecError(ValueError):
    """A value the decoder cannot be built with. The message names spec fields as `${field}`; `render(names)` words
    it with a config's own field names (spec field -> what to call it)."""

    def __init__(self, template):
        self.template = string.Template(template)
        super().__init__(self.render())

    def render(self, names=None):
        names = names or {}
        return self.template.safe_substitute({field.name: names.get(field.name, field.name)
                                              for field in dataclasses.fields(DecoderSpec)})


def _number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclasses.dataclass(frozen=True)
class DecoderSpec:
    """The architecture of a pre-norm decoder of rotary grouped-query attention and a SwiGLU MLP.

    Sizes: vocab_size (embedding rows), hidden_size, num_layers, num_heads (query heads), kv_heads (key/value heads;
        num_heads is a multiple of it), head_size (lanes per head), ffn_size (SwiGLU width).
    Rotary: rotary_size (the leading lanes of each head RoPE rotates; even, at most head_size), rotary_interleaved
        (False: HF's rotate-half pairs (i, i + rotary_size/2); True: Meta/GLM pairs (2i, 2i + 1)), rope_theta (the
        base), extend_method ('None' | 'PI': positions divided by scaling_factor | 'NTK': base raised to
        rope_theta * scaling_factor ** (d / (d - 2))), scaling_factor (> 0).
    Norms: norm_type ('rmsnorm' | 'layernorm': LayerNorm with bias), norm_eps.
    Biases and head: attention_bias (q/k/v projections), out_bias (o_proj), mlp_bias (the three SwiGLU
        projections), tied_head (logits against the token embedding; no lm_head).
    Construction checks every field and raises DecoderSpecError naming the first bad one."""

    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    kv_heads: int
    head_size: int
    ffn_size: int
    rotary_size: int
    rotary_interleaved: bool = False
    rope_theta: float = 10000.0
    extend_method: str = 'None'
    scaling_factor: float = 1.0
    norm_type: str = 'rmsnorm'
    norm_eps: float = 1e-5
    attention_bias: bool = False
    out_bias: bool = False
    mlp_bias: bool = False
    tied_head: bool = False

    def __post_init__(self):
        for name in ('vocab_size', 'hidden_size', 'num_layers', 'num_heads', 'kv_heads', 'head_size', 'ffn_size',
                     'rotary_size'):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise DecoderSpecError(f"${{{name}}} must be a positive integer, got {value!r}")
        for name in ('rotary_interleaved', 'attention_bias', 'out_bias', 'mlp_bias', 'tied_head'):
            if not isinstance(getattr(self, name), bool):
                raise DecoderSpecError(f"${{{name}}} must be True or False, got {getattr(self, name)!r}")
        for name in ('rope_theta', 'scaling_factor', 'norm_eps'):
            if not _number(getattr(self, name)) or getattr(self, name) <= 0:
                raise DecoderSpecError(f"${{{name}}} must be a positive number, got {getattr(self, name)!r}")
        if self.num_heads % self.kv_heads:
            raise DecoderSpecError(f"${{num_heads}} ({self.num_heads}) must be a multiple of ${{kv_heads}} "
                                   f"({self.kv_heads})")
        if self.rotary_size > self.head_size or self.rotary_size % 2:
            raise DecoderSpecError(f"${{rotary_size}} ({self.rotary_size}) must be even and at most the head size "
                                   f"({self.head_size})")
        for name, allowed in (('extend_method', EXTEND_METHODS), ('norm_type', NORM_TYPES)):
            if getattr(self, name) not in allowed:
                raise DecoderSpecError(f"${{{name}}} must be one of {', '.join(allowed)}, got "
                                       f"{getattr(self, name)!r}")


SPEC_FIELDS = tuple(field.name for field in dataclasses.fields(DecoderSpec))


def _spec_property(name):
    return property(lambda self: getattr(self.decoder_spec(), name),
                    doc=f"`decoder_spec().{name}` (read-only; set the config field it comes from)")


class DecoderConfig(BaseConfig):
    """A config whose model is the LLaMA-style decoder. A family implements `decoder_spec()` (building the
    DecoderSpec from its own fields through `make_decoder_spec`) and names in `decoder_names` the field each spec
    value comes from where the names differ, so a bad value is reported under the name the user wrote. Every spec
    field that is not also a config field reads as a property of the config (`config.kv_heads` =
    `config.decoder_spec().kv_heads`)."""

    decoder_names: ClassVar[dict] = {}

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        for name in SPEC_FIELDS:
            if not hasattr(cls, name):  # neither a field nor defined by the family
                setattr(cls, name, _spec_property(name))

    def decoder_spec(self):
        """The DecoderSpec of this config."""
        raise NotImplementedError(f"{type(self).__name__} does not define decoder_spec()")

    def validate(self):
        """A family checks its own fields first, then builds its spec (which checks the decoder's invariants)."""
        self.decoder_spec()

    def make_decoder_spec(self, **values):
        """DecoderSpec(**values); a bad value raises ValueError '<Config>: <message in the config's field names>'."""
        try:
            return DecoderSpec(**values)
        except DecoderSpecError as err:
            raise ValueError(f"{type(self).__name__}: {err.render(self.decoder_names)}") from None
