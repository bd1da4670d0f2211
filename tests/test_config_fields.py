"""Family configs are dataclass-like: typed fields with defaults declared once on the class, documented in its
docstring; BaseConfig turns them into a keyword-only constructor that refuses unknown keys, round-trips through
to_dict / save_pretrained / AutoConfig, and validates."""
import inspect
import re
from typing import ClassVar, Optional

import pytest

from mindformers.models.auto import AutoConfig
from mindformers.models.base_config import BaseConfig
from mindformers.tools.register.family import families

FAMILY_CONFIGS = {name: spec.get_class('config') for name, spec in families().items()}


@pytest.mark.parametrize('family', sorted(FAMILY_CONFIGS))
def test_fields_are_declared_once_and_documented(family):
    config_class = FAMILY_CONFIGS[family]
    assert '__init__' not in vars(config_class)  # no hand-written `self.x = x` block
    fields = config_class.field_names()
    assert {'parallel_config', 'checkpoint_name_or_path', 'max_new_tokens', 'seq_length'} <= fields
    signature = inspect.signature(config_class)
    assert set(signature.parameters) == fields
    assert all(p.kind is p.KEYWORD_ONLY for p in signature.parameters.values())
    defaults = config_class()
    for name, parameter in signature.parameters.items():
        if name != 'parallel_config':  # a mapping or None becomes a ParallelConfig
            assert getattr(defaults, name) == parameter.default, name
    documented = config_class.__doc__ + BaseConfig.__doc__
    undocumented = sorted(name for name in fields if not re.search(rf'\b{name}\b', documented))
    assert not undocumented, f"{config_class.__name__} docstring lacks {undocumented}"


@pytest.mark.parametrize('family', sorted(FAMILY_CONFIGS))
def test_round_trips_keep_every_field(family, tmp_path):
    config_class = FAMILY_CONFIGS[family]
    config = config_class(seq_length=64, max_new_tokens=3, top_k=2, parallel_config={'data_parallel': 2})
    data = config.to_dict()
    assert set(data) == config_class.field_names() | {'type'} and data['type'] == config_class.__name__
    assert config_class.from_dict(data).to_dict() == data
    config.save_pretrained(str(tmp_path))
    loaded = AutoConfig.from_pretrained(str(tmp_path))
    assert type(loaded) is config_class and loaded.to_dict() == data
    assert loaded.parallel_config.data_parallel == 2


def test_a_config_declared_with_annotations():
    class ToyConfig(BaseConfig):
        """Toy: width (8), depth (None: 2 * width), tag ('t')."""
        model_type: ClassVar[str] = 'toy'
        width: int = 8
        depth: Optional[int] = None
        tag: str = 't'

        def validate(self):
            self.check_positive_ints('width')

    assert ToyConfig.field_names() == BaseConfig.field_names() | {'width', 'depth', 'tag'}
    assert {'parallel_config', 'checkpoint_name_or_path', 'compute_dtype', 'top_k'} <= BaseConfig.field_names()
    toy = ToyConfig(width=4, type='ToyConfig')
    assert (toy.width, toy.depth, toy.tag, toy.checkpoint_name_or_path) == (4, None, 't', '')
    with pytest.raises(TypeError, match=r"ToyConfig: unknown field 'widht' \(did you mean width"):
        ToyConfig(widht=4)
    with pytest.raises(TypeError):
        ToyConfig(4)  # keywords only
    with pytest.raises(ValueError, match=r'ToyConfig\.width must be a positive integer, got 0'):
        ToyConfig(width=0)

    class WiderConfig(ToyConfig):
        """Wider toy: width (16), heads (2)."""
        width: int = 16
        heads: int = 2

    wider = WiderConfig()
    assert (wider.width, wider.heads, wider.tag) == (16, 2, 't') and ToyConfig().width == 8
    assert list(inspect.signature(WiderConfig).parameters)[-4:] == ['width', 'depth', 'tag', 'heads']
    assert list(WiderConfig.field_names() - ToyConfig.field_names()) == ['heads']


def test_declarations_a_dataclass_would_refuse_are_refused():
    with pytest.raises(TypeError, match='sizes: a list default would be shared'):
        class Shared(BaseConfig):  # pylint: disable=unused-variable
            sizes: list = []
    with pytest.raises(TypeError, match='width has no default'):
        class NoDefault(BaseConfig):  # pylint: disable=unused-variable
            width: int
