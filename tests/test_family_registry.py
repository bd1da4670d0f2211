"""register_family: one declaration per family, read by the auto classes, pipeline(), convert_weight.py and the
registered model names. A test-only family built from existing blocks is registered the way a user would, used
through every entry point, and the registry is restored after."""
# pylint: disable=redefined-outer-name,unused-argument,protected-access  (the `registry` fixture, the snapshot)
import dataclasses
import glob
import json
import os
import pathlib
import re
from typing import ClassVar

import numpy as np
import pytest

import convert_weight
from helpers.registry import registry_restored
from mindformers.models.auto import AutoConfig, AutoModel, AutoTokenizer, register_auto
from mindformers.models.base_config import BaseConfig
from mindformers.models.convert_utils import FamilyConverter, NameTable, hf_family
from mindformers.models.llama import LlamaConfig, LlamaForCausalLM, LlamaTokenizer
from mindformers.pipeline import pipeline
from mindformers.tools import model_book
from mindformers.tools.download import file_digest
from mindformers.tools.register import FamilySpec, MindFormerRegister, MindFormerModuleType, register_family
from mindformers.tools.register import family as family_registry
from mindformers.tools.utils import PACKAGE_DIR, REPO_DIR

VOCAB_FILE = os.path.join(PACKAGE_DIR, 'assets', 'llama_tiny', 'tokenizer.model')
SIZES = ('vocab_size', 'hidden_size', 'num_layers', 'num_heads', 'n_kv_heads', 'intermediate_size', 'seq_length')


class ToyConfig(LlamaConfig):
    """A test family: LLaMA's fields (see LlamaConfig), with the LLaMA decoder switched to LayerNorm, SwiGLU biases
    and a tied head."""

    model_type: ClassVar[str] = 'toy'

    def decoder_spec(self):
        return dataclasses.replace(super().decoder_spec(), norm_type='layernorm', mlp_bias=True, tied_head=True)


class ToyForCausalLM(LlamaForCausalLM):
    """The LLaMA decoder built from ToyConfig's spec."""


class ToyTokenizer(LlamaTokenizer):
    """LLaMA's SentencePiece tokenizer under the family's own name."""


class ToyConverter(FamilyConverter):
    """A HuggingFace-like format of model_type 'toy' whose tensor names are ours."""

    family = 'Toy'
    config_class = ToyConfig
    model_class = f'{__name__}:ToyForCausalLM'
    hf_model_types = ('toy',)

    def __init__(self, names):
        table = NameTable(sorted({(re.sub(r'\.\d+\.', '.{i}.', name, count=1),) * 2 for name in names}))
        self.input_tables, self.output_table = (table,), table

    def config_from_hf(self, hf_config):
        return ToyConfig(**{key: hf_config[key] for key in SIZES})

    def config_to_hf(self, config, dtype='float32'):
        return {'model_type': 'toy', 'dtype': dtype, **{key: getattr(config, key) for key in SIZES}}


TOY_SIZES = dict(vocab_size=512, hidden_size=32, num_layers=1, num_heads=4, n_kv_heads=2, intermediate_size=64,
                 seq_length=32)


def _write_yaml(folder):
    os.makedirs(folder)
    run = {'model': {'model_config': {'type': 'ToyConfig', 'max_decode_length': 32, **TOY_SIZES},
                     'arch': {'type': 'ToyForCausalLM'}},
           'processor': {'tokenizer': {'type': 'ToyTokenizer', 'vocab_file': VOCAB_FILE}}}
    with open(os.path.join(folder, 'run_toy_tiny.yaml'), 'w', encoding='utf-8') as f:
        json.dump(run, f)  # JSON is YAML


@pytest.fixture
def registry(clean_registry):  # families and registered classes put back after the test
    yield clean_registry


def _register_toy(yaml_dir):
    with_shapes = ToyConverter(())
    names = with_shapes.model_shapes(ToyConfig(**TOY_SIZES))
    return register_family(FamilySpec(
        name='toy', config=ToyConfig, model=ToyForCausalLM, tokenizer=ToyTokenizer, converter=ToyConverter(names),
        hf_model_types=('toy',), yaml_dirs=(yaml_dir,)))


# ----------------------------------------------------------------------------------------------- the library's own
def test_every_shipped_run_yaml_is_a_registered_name():
    shipped = {}
    for pattern in ('configs/*/run_*.yaml', 'research/*/run_*.yaml'):
        for path in glob.glob(os.path.join(REPO_DIR, pattern)):
            shipped[os.path.basename(path)[len('run_'):-len('.yaml')]] = os.path.realpath(path)
    assert {name: os.path.realpath(path) for name, path in model_book.list_models().items()} == shipped


def test_each_family_is_declared_once_and_read_everywhere():
    found = family_registry.families()
    assert list(found) == ['gpt2', 'llama', 'glm2', 'glm', 'pangualpha', 'pengcheng_mind']
    for name, spec in found.items():
        config_class = spec.get_class('config')
        assert MindFormerRegister.get_cls(MindFormerModuleType.CONFIG, config_class.__name__) is config_class
        assert family_registry.family_of_config(config_class) is spec
        assert spec.get_class('model') is MindFormerRegister.get_cls(MindFormerModuleType.MODELS,
                                                                     spec.class_name('model'))
        assert spec.load_converter().convert_pt_to_ms, name
    assert convert_weight.converter_names() == sorted(found)
    assert family_registry.hf_model_types() == ['gpt2', 'llama', 'glm', 'chatglm', 'gpt_pangu']
    assert hf_family({'model_type': 'chatglm', 'inner_hidden_size': 16})[1] == 'ChatGLMTokenizer'
    assert hf_family({'model_type': 'chatglm', 'padded_vocab_size': 16})[1] == 'ChatGLM2Tokenizer'
    assert hf_family({'model_type': 'bert'}) is None


# ----------------------------------------------------------------------------------------------- a user's family
@pytest.mark.slow
def test_a_family_registered_in_one_place_works_everywhere(registry, tmp_path, monkeypatch):
    yaml_dir = str(tmp_path / 'yamls')
    _write_yaml(yaml_dir)
    _register_toy(yaml_dir)
    assert model_book.find_config('toy_tiny') == os.path.join(yaml_dir, 'run_toy_tiny.yaml')

    config = AutoConfig.from_pretrained('toy_tiny')
    assert type(config) is ToyConfig and config.hidden_size == 32
    model = AutoModel.from_config(config)
    assert type(model) is ToyForCausalLM
    names = {p.name for p in model.get_parameters()}
    assert 'lm_head.weight' not in names and 'model.norm.bias' in names and 'model.layers.0.mlp.up_proj.bias' in names
    tokenizer = AutoTokenizer.from_pretrained('toy_tiny')
    assert type(tokenizer) is ToyTokenizer

    import mindspore as ms
    ckpt = str(tmp_path / 'toy.ckpt')
    ms.save_checkpoint(model, ckpt)
    from mindformers.models import model_book as book
    monkeypatch.setattr(book, 'CHECKPOINTS', {})  # published weights for the name: a pipeline by name
    book.register_checkpoint('toy_tiny', pathlib.Path(ckpt).as_uri(), file_digest(ckpt))
    pipe = pipeline('text_generation', model='toy_tiny', max_new_tokens=3)
    assert type(pipe.model) is ToyForCausalLM and type(pipe.tokenizer) is ToyTokenizer
    (result,) = pipe('ROMEO:')
    assert result['text_generation_text'][0].startswith('ROMEO:')

    # convert_weight.py --model toy, both ways, and AutoModel on the HuggingFace-like directory it writes
    hf_dir = str(tmp_path / 'hf')
    assert convert_weight.main(['--model', 'toy', '--reversed', '--input_path', ckpt, '--output_path', hf_dir,
                                '--config', os.path.join(yaml_dir, 'run_toy_tiny.yaml')]) == 0
    with open(os.path.join(hf_dir, 'config.json'), encoding='utf-8') as f:
        assert json.load(f)['model_type'] == 'toy'
    back = str(tmp_path / 'back.ckpt')
    assert convert_weight.main(['--model', 'toy', '--input_path', hf_dir, '--output_path', back]) == 0
    original = {p.name: p.asnumpy() for p in model.get_parameters()}
    reloaded = {name: value.asnumpy() for name, value in ms.load_checkpoint(back).items()}
    assert set(reloaded) == set(original)
    assert all(np.array_equal(reloaded[name], original[name]) for name in original)
    from_hf = AutoModel.from_pretrained(hf_dir)
    assert type(from_hf) is ToyForCausalLM
    assert all(np.array_equal(p.asnumpy(), original[p.name]) for p in from_hf.get_parameters())


def test_the_registry_is_restored_after_a_test_family(tmp_path):
    with registry_restored():
        _register_toy(str(tmp_path))
        assert 'toy' in family_registry.families() and 'toy' in convert_weight.converter_names()
        assert MindFormerRegister.is_exist(MindFormerModuleType.CONFIG, 'ToyConfig')
    assert 'toy' not in family_registry.families() and 'toy' not in convert_weight.converter_names()
    assert not MindFormerRegister.is_exist(MindFormerModuleType.CONFIG, 'ToyConfig')
    assert 'toy' not in family_registry.hf_model_types()
    assert MindFormerRegister.is_exist(MindFormerModuleType.DATASET_LOADER, 'MindDataset')  # MindSpore's stay


def test_conflicting_registrations_are_refused(registry):
    llama = family_registry.get_family('llama')
    assert register_family(llama) is llama  # the same declaration again changes nothing
    with pytest.raises(ValueError, match=r"a family named 'llama' is already registered .*unregister_family"):
        register_family(dataclasses.replace(llama, yaml_dirs=('elsewhere',)))
    with pytest.raises(ValueError, match=r"family 'other': LlamaConfig already builds LlamaForCausalLM"):
        register_family(FamilySpec(name='other', config=LlamaConfig, model=ToyForCausalLM))
    with pytest.raises(ValueError, match=r"hf_model_types \('x',\) need a converter"):
        register_family(FamilySpec(name='other', config=ToyConfig, model=ToyForCausalLM, hf_model_types=('x',)))
    with pytest.raises(TypeError, match=r'yaml_dirs must be a tuple of strings'):
        register_family(FamilySpec(name='other', config=ToyConfig, model=ToyForCausalLM, yaml_dirs='configs/x'))
    with pytest.raises(ValueError, match=r"unknown model family 'lama' \(registered: .*llama"):
        family_registry.get_family('lama')
    assert 'other' not in family_registry.families()


def test_register_auto_and_config_subclasses_find_their_model(registry):
    class MyLlamaConfig(LlamaConfig):
        """LlamaConfig under another name: builds what its base builds."""

    assert family_registry.family_of_config(MyLlamaConfig).name == 'llama'
    MindFormerRegister.register_cls(ToyConfig, MindFormerModuleType.CONFIG)
    MindFormerRegister.register_cls(ToyForCausalLM, MindFormerModuleType.MODELS)
    register_auto('ToyConfig', 'ToyForCausalLM')  # the older spelling: a family named after the config
    assert family_registry.family_of_config(ToyConfig).get_class('model') is ToyForCausalLM
    register_auto('ToyConfig', 'ToyForCausalLM')  # again: nothing changes

    class BareConfig(BaseConfig):
        """A config no family builds."""

    with pytest.raises(ValueError, match='no model class is known for BareConfig'):
        AutoModel.from_config(BareConfig())
