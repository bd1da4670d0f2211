"""ChatGLM-6B weight conversion (tiny random weights in the HF release's layout: sharded pytorch_model.bin with its
index, per-layer rotary inv_freq buffers, the release's config.json): HF -> ours -> HF gives the same tensors, the
MindFormers r1.0 naming converts to the same weights, AutoModel / AutoTokenizer read a HF directory (told apart
from ChatGLM2's, which shares model_type 'chatglm'), and every bad tensor is named."""
import json
import math
import os
import shutil

import numpy as np
import pytest

from mindformers.models.auto import AutoModel, AutoTokenizer
from mindformers.models.convert_utils import ConversionError, hf_family, load_hf_weights, load_ms_weights, \
    save_ms_weights
from mindformers.models.glm import GLMForPreTraining
from mindformers.models.glm.convert_glm import config_from_hf, config_to_hf, convert_hf_to_ms
from helpers import REPO
from helpers.cli import convert_weight_main as cli, error_line as one_error_line, run
from helpers.glm_reference import (BOS, EOS, GMASK, HEAD, HIDDEN, INNER, LAYERS, MASK, PAD, RELEASE_CONFIG, SQRT56,
                                   VOCAB, HEADS, SEQ, our_logits, prompt_batch, random_weights, reference_logits,
                                   tiny_config, write_release)
from helpers.hf_reference import assert_same_tensors

def release_tensors():
    """The random weights as the release stores them: our (= HF) names plus each layer's inv_freq buffer."""
    tensors = dict(random_weights(seed=1))
    inv_freq = 1.0 / 10000 ** (np.arange(0, HEAD // 2, 2, dtype=np.float32) / (HEAD // 2))
    for i in range(LAYERS):
        tensors[f'transformer.layers.{i}.attention.rotary_emb.inv_freq'] = inv_freq.astype(np.float16)
    return tensors


def mf_tensors(ours):
    """Our tensors in the MindFormers r1.0 naming (embedding_table, gamma / beta), with optimizer states."""
    out = {}
    for name, value in ours.items():
        name = name.replace('word_embeddings.weight', 'word_embeddings.embedding_table')
        if 'layernorm' in name:
            name = name.replace('.weight', '.gamma').replace('.bias', '.beta')
        out[name] = value
    out['adam_m.lm_head.weight'] = np.zeros_like(ours['lm_head.weight'])
    out['global_step'] = np.array([10], np.int32)
    return out


@pytest.fixture(scope='module')
def release(tmp_path_factory):
    return write_release(tmp_path_factory.mktemp('chatglm_6b') / 'hf', release_tensors())


@pytest.fixture(scope='module')
def converted(release, tmp_path_factory):
    path = tmp_path_factory.mktemp('ours') / 'glm.ckpt'
    assert cli('--model', 'glm', '--input_path', release, '--output_path', path) == 0
    return path


def expected_ours():
    return random_weights(seed=1)


def test_release_converts_to_our_names_and_back_unchanged(release, converted, tmp_path):
    assert_same_tensors(load_ms_weights(str(converted)), expected_ours())
    back = tmp_path / 'hf_back'
    assert cli('--model', 'glm', '--reversed', '--input_path', converted, '--output_path', back, '--config',
               release / 'config.json') == 0
    assert_same_tensors(load_hf_weights(str(back)), expected_ours())  # the inv_freq buffers are not weights
    written = json.loads((back / 'config.json').read_text())
    assert written['model_type'] == 'chatglm' and written['architectures'] == ['ChatGLMModel']
    for key in ('vocab_size', 'hidden_size', 'num_layers', 'num_attention_heads', 'inner_hidden_size',
                'max_sequence_length', 'position_encoding_2d', 'bos_token_id', 'eos_token_id', 'mask_token_id',
                'gmask_token_id', 'pad_token_id', 'layernorm_epsilon'):
        assert written[key] == RELEASE_CONFIG[key], key
    assert config_from_hf(written).to_dict() == config_from_hf(RELEASE_CONFIG).to_dict()


def test_config_from_the_release_uses_the_published_alpha():
    config = config_from_hf(RELEASE_CONFIG)
    assert (config.vocab_size, config.hidden_size, config.num_layers, config.num_heads, config.inner_hidden_size,
            config.seq_length, config.bos_token_id, config.eos_token_id, config.mask_token_id,
            config.gmask_token_id, config.pad_token_id) == (VOCAB, HIDDEN, LAYERS, HEADS, INNER, SEQ, BOS, EOS,
                                                            MASK, GMASK, PAD)
    assert config.residual_alpha == pytest.approx(SQRT56)  # 2 layers, yet sqrt(56): the release's constant
    with pytest.raises(ConversionError, match=r'alpha is 2\.0, but the HF ChatGLM-6B code always uses sqrt\(56\)'):
        config_to_hf(tiny_config())


def test_automodel_reads_the_release_directory(release):
    model = AutoModel.from_pretrained(str(release))
    assert type(model) is GLMForPreTraining
    model.set_train(False)
    ids = prompt_batch()[:2]
    diff = np.abs(our_logits(model, ids) - reference_logits(expected_ours(), ids)).max()
    assert diff < 1e-4, diff


def test_mindformers_naming_converts_to_the_same_weights(tmp_path):
    source = tmp_path / 'mf'
    source.mkdir()
    save_ms_weights(mf_tensors(expected_ours()), str(source / 'glm_6b.ckpt'))
    out = tmp_path / 'from_mf.ckpt'
    # a MindFormers checkpoint has no config.json: the tiny sizes cannot be told from the tensors alone
    assert cli('--model', 'glm', '--input_path', source, '--output_path', out) == 2
    config = tmp_path / 'config.json'
    config.write_text(json.dumps(tiny_config(alpha=SQRT56).to_dict()))
    assert cli('--model', 'glm', '--input_path', source, '--output_path', out, '--config', config) == 0
    assert_same_tensors(load_ms_weights(str(out)), expected_ours())


def test_chatglm_versions_are_told_apart():
    v2 = {'model_type': 'chatglm', 'padded_vocab_size': 65024, 'multi_query_attention': True, 'num_layers': 28}
    assert hf_family(RELEASE_CONFIG)[0].endswith('glm.convert_glm') and hf_family(RELEASE_CONFIG)[1] == \
        'ChatGLMTokenizer'
    assert hf_family(v2) == ('mindformers.models.glm2.convert_glm2', 'ChatGLM2Tokenizer')
    with pytest.raises(ConversionError, match='ChatGLM2/3.*--model glm2'):
        config_from_hf(v2)
    with pytest.raises(ConversionError, match='quantization_bit=4'):
        config_from_hf(dict(RELEASE_CONFIG, quantization_bit=4))
    with pytest.raises(ConversionError, match=r'config\.json: GLMConfig\.num_attention|GLMConfig\.hidden_size'):
        config_from_hf(dict(RELEASE_CONFIG, num_attention_heads=3))


def test_autotokenizer_reads_a_release_directory(tmp_path):
    from mindformers.models.glm import ChatGLMTokenizer
    directory = tmp_path / 'hf'
    directory.mkdir()
    shutil.copy(os.path.join(REPO, 'mindformers', 'assets', 'glm_tiny', 'ice_text.model'), directory)
    (directory / 'config.json').write_text(json.dumps(RELEASE_CONFIG))
    (directory / 'tokenizer_config.json').write_text(json.dumps({  # the release's, minus auto_map
        'name_or_path': 'THUDM/chatglm-6b', 'bos_token': '<sop>', 'eos_token': '<eop>', 'gmask_token': '[gMASK]',
        'mask_token': '[MASK]', 'pad_token': '<pad>', 'unk_token': '<unk>', 'do_lower_case': False,
        'remove_space': False, 'num_image_tokens': 0, 'tokenizer_class': 'ChatGLMTokenizer'}))
    tokenizer = AutoTokenizer.from_pretrained(directory)
    assert isinstance(tokenizer, ChatGLMTokenizer)
    assert tokenizer.encode('你好')[-2:] == [GMASK, BOS]


# ---------------------------------------------------------------------------------------------------------------
# errors


QKV = 'transformer.layers.0.attention.query_key_value'


@pytest.mark.parametrize('naming, change, named', [
    ('hf', lambda sd: sd.pop('transformer.layers.1.mlp.dense_4h_to_h.bias'),
     r"missing transformer\.layers\.1\.mlp\.dense_4h_to_h\.bias"),
    ('hf', lambda sd: sd.pop('lm_head.weight'), r"missing lm_head\.weight"),
    ('hf', lambda sd: sd.update({QKV + '.weight': np.ones((2 * HIDDEN, HIDDEN), np.float32)}),
     r"wrong shape transformer\.layers\.0\.attention\.query_key_value\.weight \(128, 64\) \(expected \(192, 64\)\)"),
    ('hf', lambda sd: sd.update({'transformer.layers.2.input_layernorm.weight': np.ones(HIDDEN, np.float32)}),
     r"unexpected transformer\.layers\.2\.input_layernorm\.weight"),
    ('hf', lambda sd: sd.update({'transformer.prefix_encoder.embedding.weight': np.ones((4, 8), np.float32)}),
     r"unexpected transformer\.prefix_encoder\.embedding\.weight"),
    ('mf', lambda sd: sd.pop('transformer.final_layernorm.gamma'), r"missing transformer\.final_layernorm\.gamma"),
    ('mf', lambda sd: sd.update({'transformer.word_embeddings.embedding_table': np.ones((VOCAB, 32), np.float32)}),
     r"wrong shape transformer\.word_embeddings\.embedding_table \(1024, 32\) \(expected \(1024, 64\)\)"),
])
def test_bad_tensors_are_named_in_the_input_naming(naming, change, named):
    state_dict = release_tensors() if naming == 'hf' else mf_tensors(expected_ours())
    change(state_dict)
    with pytest.raises(ConversionError, match=r"GLM weights do not fit the model \(.*" + named):
        convert_hf_to_ms(state_dict, tiny_config(alpha=SQRT56))


def test_cli_exit_1_with_one_line_naming_the_tensor(tmp_path):
    tensors = release_tensors()
    del tensors['transformer.layers.0.attention.dense.weight']
    bad = write_release(tmp_path / 'bad', tensors)
    line = one_error_line(run('convert_weight.py', '--model', 'glm', '--input_path', bad, '--output_path',
                              tmp_path / 'out.ckpt'), code=1)
    assert 'missing transformer.layers.0.attention.dense.weight' in line
    assert not os.path.exists(tmp_path / 'out.ckpt')


def test_a_model_saved_with_its_config_converts_without_one(tmp_path):
    """Our own checkpoint directory (save_pretrained) carries its config: --reversed needs no --config."""
    model = GLMForPreTraining(tiny_config(alpha=math.sqrt(56)))
    model.save_pretrained(tmp_path / 'ours', checkpoint_format='ckpt')
    assert cli('--model', 'glm', '--reversed', '--input_path', tmp_path / 'ours' / 'model.ckpt', '--output_path',
               tmp_path / 'hf') == 0
    assert json.loads((tmp_path / 'hf' / 'config.json').read_text())['num_layers'] == LAYERS
