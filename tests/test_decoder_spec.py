"""DecoderSpec: LLaMA, ChatGLM2 and PengCheng.Mind each fill the one typed spec of the LLaMA-style decoder from
their own field names; the values are the published architectures', bad values are named in the config's words,
and the models build the parameters the spec describes."""
import dataclasses
import re

import pytest
from mindspore.nn.utils import no_init_parameters

from mindformers.models.auto import AutoConfig, AutoModel
from mindformers.models.decoder_spec import SPEC_FIELDS, DecoderConfig, DecoderSpec, DecoderSpecError
from mindformers.models.glm2 import ChatGLM2Config
from mindformers.models.llama import LlamaConfig

SIZES = ('vocab_size', 'hidden_size', 'num_layers', 'num_heads', 'kv_heads', 'head_size', 'ffn_size', 'rotary_size')
SWITCHES = ('rotary_interleaved', 'rope_theta', 'norm_type', 'norm_eps', 'attention_bias', 'out_bias', 'mlp_bias',
            'tied_head')
# the published architectures (MindFormers r1.0 YAMLs, HF / Meta / THUDM / PCL configs)
PUBLISHED = {
    'llama_7b': ((32000, 4096, 32, 32, 32, 128, 11008, 128), (False, 10000.0, 'rmsnorm', 1e-6) + (False,) * 4),
    'llama2_70b': ((32000, 8192, 80, 64, 8, 128, 28672, 128), (False, 10000.0, 'rmsnorm', 1e-5) + (False,) * 4),
    'glm2_6b': ((65024, 4096, 28, 32, 2, 128, 13696, 64),
                (True, 10000.0, 'rmsnorm', 1e-5, True, False, False, False)),
    'pengcheng_mind_7b': ((125952, 4096, 32, 32, 32, 128, 10880, 128),
                          (False, 10000.0, 'layernorm', 1e-5, True, True, True, True)),
}
TINY = ('llama_tiny', 'glm2_tiny', 'pengcheng_mind_tiny')


@pytest.mark.parametrize('name', sorted(PUBLISHED))
def test_each_family_fills_the_spec_with_its_published_values(name):
    config = AutoConfig.from_pretrained(name)
    assert isinstance(config, DecoderConfig)
    spec = config.decoder_spec()
    assert isinstance(spec, DecoderSpec)
    sizes, switches = PUBLISHED[name]
    assert tuple(getattr(spec, field) for field in SIZES) == sizes
    assert tuple(getattr(spec, field) for field in SWITCHES) == switches
    assert (spec.extend_method, spec.scaling_factor) == ('None', 1.0)


def test_spec_follows_the_config_fields():
    llama = LlamaConfig(vocab_size=128, hidden_size=64, num_layers=2, num_heads=4, n_kv_heads=2, head_dim=24,
                        rotary_dim=8, theta=500000.0, qkv_has_bias=True, extend_method='PI', scaling_factor=2.0)
    assert llama.decoder_spec() == DecoderSpec(
        vocab_size=128, hidden_size=64, num_layers=2, num_heads=4, kv_heads=2, head_size=24, ffn_size=256,
        rotary_size=8, rope_theta=500000.0, extend_method='PI', scaling_factor=2.0, attention_bias=True)
    glm2 = ChatGLM2Config(padded_vocab_size=96, hidden_size=64, num_layers=1, num_attention_heads=4, kv_channels=16,
                          multi_query_attention=False, rope_ratio=2.0, add_qkv_bias=False)
    spec = glm2.decoder_spec()
    assert (spec.vocab_size, spec.kv_heads, spec.head_size, spec.rotary_size, spec.rope_theta, spec.attention_bias) \
        == (96, 4, 16, 8, 20000.0, False)
    llama.n_kv_heads = 1  # configs stay mutable; the spec is read from the fields each time
    assert llama.decoder_spec().kv_heads == 1 and llama.kv_heads == 1


@pytest.mark.parametrize('name', TINY + tuple(PUBLISHED))
def test_old_property_names_read_the_spec(name):
    """Until the decoder reads `decoder_spec()`, every spec field is also an attribute of the config."""
    config = AutoConfig.from_pretrained(name)
    spec = config.decoder_spec()
    for field in SPEC_FIELDS:
        assert getattr(config, field) == getattr(spec, field), field
    derived = [field for field in SPEC_FIELDS if field not in config.field_names()]
    assert 'kv_heads' in derived
    for field in derived:
        with pytest.raises(AttributeError):
            setattr(config, field, 1)


@pytest.mark.parametrize('make, message', [
    (lambda: LlamaConfig(hidden_size=64, num_heads=4, n_kv_heads=3),
     'LlamaConfig: num_heads (4) must be a multiple of n_kv_heads (3)'),
    (lambda: LlamaConfig(hidden_size=64, num_heads=4, rotary_dim=6, head_dim=4),
     'LlamaConfig: rotary_dim (6) must be even and at most the head size (4)'),
    (lambda: LlamaConfig(theta=0), 'LlamaConfig: theta must be a positive number, got 0'),
    (lambda: LlamaConfig(qkv_has_bias='yes'), "LlamaConfig: qkv_has_bias must be True or False, got 'yes'"),
    (lambda: LlamaConfig(rms_norm_eps=-1.0), 'LlamaConfig: rms_norm_eps must be a positive number'),
    (lambda: ChatGLM2Config(num_attention_heads=4, kv_channels=16, hidden_size=64, multi_query_group_num=3),
     'ChatGLM2Config: num_attention_heads (4) must be a multiple of multi_query_group_num (3)'),
    (lambda: ChatGLM2Config(rope_ratio=-1), 'ChatGLM2Config: 10000 * rope_ratio must be a positive number'),
    (lambda: AutoConfig.from_pretrained('pengcheng_mind_tiny', layernorm_epsilon=0),
     'PengChengMindConfig: layernorm_epsilon must be a positive number, got 0'),
])
def test_bad_values_are_named_in_the_config_words(make, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        make()


def test_the_spec_checks_itself():
    good = dict(vocab_size=8, hidden_size=8, num_layers=1, num_heads=2, kv_heads=2, head_size=4, ffn_size=8,
                rotary_size=4)
    DecoderSpec(**good)
    for change, named in ((dict(norm_type='batchnorm'), 'norm_type must be one of rmsnorm, layernorm'),
                          (dict(extend_method='YaRN'), 'extend_method must be one of None, PI, NTK'),
                          (dict(ffn_size=0), 'ffn_size must be a positive integer'),
                          (dict(num_layers=True), 'num_layers must be a positive integer'),
                          (dict(rotary_size=3), 'rotary_size (3) must be even'),
                          (dict(tied_head=1), 'tied_head must be True or False')):
        with pytest.raises(DecoderSpecError, match=re.escape(named)):
            DecoderSpec(**{**good, **change})
    spec = DecoderSpec(**good)
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.num_heads = 4


def _expected_parameters(spec):
    """The parameters the LLaMA-style decoder owes a spec: HF LlamaForCausalLM names, plus `.bias` where the spec
    asks for biases, no lm_head when the head is tied."""
    hidden, q_rows, kv_rows = spec.hidden_size, spec.num_heads * spec.head_size, spec.kv_heads * spec.head_size
    norm = {'weight': (hidden,), **({'bias': (hidden,)} if spec.norm_type == 'layernorm' else {})}
    shapes = {'model.embed_tokens.weight': (spec.vocab_size, hidden)}
    shapes.update({f'model.norm.{kind}': shape for kind, shape in norm.items()})
    if not spec.tied_head:
        shapes['lm_head.weight'] = (spec.vocab_size, hidden)
    for i in range(spec.num_layers):
        layer = f'model.layers.{i}.'
        for name in ('input_layernorm', 'post_attention_layernorm'):
            shapes.update({f'{layer}{name}.{kind}': shape for kind, shape in norm.items()})
        projections = {'self_attn.q_proj': (q_rows, hidden, spec.attention_bias),
                       'self_attn.k_proj': (kv_rows, hidden, spec.attention_bias),
                       'self_attn.v_proj': (kv_rows, hidden, spec.attention_bias),
                       'self_attn.o_proj': (hidden, q_rows, spec.out_bias),
                       'mlp.gate_proj': (spec.ffn_size, hidden, spec.mlp_bias),
                       'mlp.up_proj': (spec.ffn_size, hidden, spec.mlp_bias),
                       'mlp.down_proj': (hidden, spec.ffn_size, spec.mlp_bias)}
        for name, (rows, cols, bias) in projections.items():
            shapes[f'{layer}{name}.weight'] = (rows, cols)
            if bias:
                shapes[f'{layer}{name}.bias'] = (rows,)
    return shapes


@pytest.mark.parametrize('name', TINY)
def test_models_build_the_parameters_their_spec_describes(name):
    config = AutoConfig.from_pretrained(name)
    with no_init_parameters():
        model = AutoModel.from_config(config)
    built = {p.name: tuple(p.shape) for p in model.get_parameters()}
    assert built == _expected_parameters(config.decoder_spec())

