"""ChatGLM2 weight conversion against transformers `GlmForCausalLM` configured as ChatGLM2 (2 KV heads, RoPE on half
of each head, q/k/v biases, untied head; tiny random weights, fp32): HF `glm` -> ours gives the same logits and
greedy tokens, `--reversed` loads back in transformers, the original ChatGLM2 naming (`transformer.encoder...`, fused
query_key_value and dense_h_to_4h, pytorch_model.bin, its own config.json) converts to the same tensors, AutoModel
converts both kinds of directory on load, and bad inputs are refused naming the tensor."""
import functools
import json
import os

import numpy as np
import pytest
import torch
import transformers

from mindformers.models.auto import AutoModel, AutoTokenizer
from mindformers.models.convert_utils import ConversionError, load_ms_weights
from mindformers.models.glm2.convert_glm2 import config_from_hf, config_to_hf, convert_hf_to_ms
from mindformers.models.glm2.glm2_config import ChatGLM2Config
from mindformers.models.glm2.modeling_glm2 import ChatGLM2ForConditionalGeneration
from helpers.cli import convert_weight_main as cli, error_line as one_error_line, run
from helpers.hf_reference import (TOL, VOCAB, assert_same_greedy, assert_same_tensors, converted_by_cli, hf_logits,
                                  hf_tokenizer_dir, ids_for, max_diff, model_from, our_logits, perturb_,
                                  state_dict_of)

HIDDEN, LAYERS, HEADS, KV_HEADS, HEAD_DIM, FFN, SEQ = 64, 2, 4, 2, 16, 96, 64


@functools.lru_cache(maxsize=None)
def hf_glm_model(attention_bias=True):
    torch.manual_seed(2)
    config = transformers.GlmConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=FFN,
                                    num_hidden_layers=LAYERS, num_attention_heads=HEADS, num_key_value_heads=KV_HEADS,
                                    head_dim=HEAD_DIM, max_position_embeddings=SEQ, rms_norm_eps=1e-5,
                                    attention_bias=attention_bias, tie_word_embeddings=False, pad_token_id=0,
                                    bos_token_id=1, eos_token_id=2,
                                    rope_parameters={'rope_type': 'default', 'rope_theta': 10000.0,
                                                     'partial_rotary_factor': 0.5})
    return perturb_(transformers.GlmForCausalLM(config), seed=4)


def _chatglm_tensors(hf_model):
    """The GlmForCausalLM tensors re-packed in the original ChatGLM2 names (q|k|v rows fused, [gate; up])."""
    hf = state_dict_of(hf_model)
    out = {'transformer.embedding.word_embeddings.weight': hf['model.embed_tokens.weight'],
           'transformer.rotary_pos_emb.inv_freq': np.ones(HEAD_DIM // 4, np.float32),
           'transformer.encoder.final_layernorm.weight': hf['model.norm.weight'],
           'transformer.output_layer.weight': hf['lm_head.weight']}
    for i in range(LAYERS):
        ours, theirs = f'model.layers.{i}.', f'transformer.encoder.layers.{i}.'
        for kind in ('weight', 'bias'):
            out[f'{theirs}self_attention.query_key_value.{kind}'] = np.concatenate(
                [hf[f'{ours}self_attn.{p}_proj.{kind}'] for p in 'qkv'])
        out.update({f'{theirs}input_layernorm.weight': hf[f'{ours}input_layernorm.weight'],
                    f'{theirs}self_attention.dense.weight': hf[f'{ours}self_attn.o_proj.weight'],
                    f'{theirs}post_attention_layernorm.weight': hf[f'{ours}post_attention_layernorm.weight'],
                    f'{theirs}mlp.dense_h_to_4h.weight': hf[f'{ours}mlp.gate_up_proj.weight'],
                    f'{theirs}mlp.dense_4h_to_h.weight': hf[f'{ours}mlp.down_proj.weight']})
    return out


CHATGLM_CONFIG = {'model_type': 'chatglm', 'architectures': ['ChatGLMModel'], 'add_bias_linear': False,
                  'add_qkv_bias': True, 'apply_query_key_layer_scaling': True,
                  'apply_residual_connection_post_layernorm': False, 'attention_softmax_in_fp32': True,
                  'ffn_hidden_size': FFN, 'fp32_residual_connection': False, 'hidden_size': HIDDEN,
                  'kv_channels': HEAD_DIM, 'layernorm_epsilon': 1e-5, 'multi_query_attention': True,
                  'multi_query_group_num': KV_HEADS, 'num_attention_heads': HEADS, 'num_layers': LAYERS,
                  'original_rope': True, 'padded_vocab_size': VOCAB, 'post_layer_norm': True, 'rmsnorm': True,
                  'seq_length': SEQ, 'use_cache': True, 'torch_dtype': 'float32', 'tie_word_embeddings': False,
                  'eos_token_id': 2, 'pad_token_id': 0}


@pytest.fixture(scope='session')
def hf_glm(tmp_path_factory):
    """(HF GlmForCausalLM directory written by save_pretrained, the HF model)."""
    directory = tmp_path_factory.mktemp('hf_glm')
    hf_glm_model().save_pretrained(directory)
    return directory, hf_glm_model()


@pytest.fixture(scope='session')
def chatglm_dir(tmp_path_factory):
    """The same weights as the original ChatGLM2 files: pytorch_model.bin and its config.json."""
    directory = tmp_path_factory.mktemp('chatglm')
    tensors = {name: torch.from_numpy(value) for name, value in _chatglm_tensors(hf_glm_model()).items()}
    torch.save(tensors, directory / 'pytorch_model.bin')
    (directory / 'config.json').write_text(json.dumps(CHATGLM_CONFIG))
    return directory


@pytest.fixture(scope='session')
def glm_ckpt(hf_glm, tmp_path_factory):
    return converted_by_cli('glm2', hf_glm[0], tmp_path_factory)


def test_hf_glm_to_ours_gives_the_same_logits_and_greedy_tokens(hf_glm, glm_ckpt):
    glm_model = model_from(config_from_hf, ChatGLM2ForConditionalGeneration, hf_glm[0], glm_ckpt)
    ids = ids_for(2, 24, seed=11)
    assert max_diff('glm2 HF glm->ours', our_logits(glm_model, ids), hf_logits(hf_glm[1], ids)) < TOL
    assert_same_greedy(hf_glm[1], glm_model, ids_for(1, 7, seed=12)[0].tolist())


def test_config_from_glm_reads_the_sizes(hf_glm):
    with open(hf_glm[0] / 'config.json', encoding='utf-8') as f:
        config = config_from_hf(json.load(f))
    assert (config.vocab_size, config.hidden_size, config.num_layers, config.num_heads, config.kv_heads,
            config.head_size, config.rotary_size, config.ffn_size, config.seq_length) == (
                VOCAB, HIDDEN, LAYERS, HEADS, KV_HEADS, HEAD_DIM, HEAD_DIM // 2, FFN, SEQ)
    assert (config.norm_eps, config.rope_theta, config.add_qkv_bias) == (1e-5, 10000.0, True)


def test_reversed_directory_loads_in_transformers(hf_glm, glm_ckpt, tmp_path):
    out = tmp_path / 'hf_back'
    assert cli('--model', 'glm2', '--reversed', '--input_path', glm_ckpt, '--output_path', out,
               '--config', hf_glm[0] / 'config.json') == 0
    with open(out / 'config.json', encoding='utf-8') as f:
        written = json.load(f)
    assert written['model_type'] == 'glm' and written['architectures'] == ['GlmForCausalLM']
    back = transformers.GlmForCausalLM.from_pretrained(out).eval()
    assert back.config.rope_parameters['partial_rotary_factor'] == 0.5 and back.config.attention_bias
    assert_same_tensors(state_dict_of(back), state_dict_of(hf_glm[1]))
    ids = ids_for(2, 24, seed=13)
    assert max_diff('glm2 reversed', hf_logits(back, ids), hf_logits(hf_glm[1], ids)) == 0.0


def test_original_chatglm2_naming_converts_to_the_same_weights(hf_glm, glm_ckpt, chatglm_dir, tmp_path):
    out = tmp_path / 'from_chatglm.ckpt'
    assert cli('--model', 'glm2', '--input_path', chatglm_dir, '--output_path', out) == 0
    assert_same_tensors(load_ms_weights(str(out)), load_ms_weights(str(glm_ckpt)))
    config = config_from_hf(CHATGLM_CONFIG)
    assert (config.kv_heads, config.head_size, config.ffn_size, config.seq_length) == (KV_HEADS, HEAD_DIM, FFN, SEQ)
    config.checkpoint_name_or_path = str(out)
    ids = ids_for(2, 24, seed=14)
    assert max_diff('glm2 chatglm naming', our_logits(ChatGLM2ForConditionalGeneration(config), ids),
                    hf_logits(hf_glm[1], ids)) < TOL


def test_automodel_converts_both_kinds_of_directory(hf_glm, chatglm_dir):
    ids = ids_for(1, 16, seed=15)
    expected = hf_logits(hf_glm[1], ids)
    for label, directory in (('glm', hf_glm[0]), ('chatglm', chatglm_dir)):
        model = AutoModel.from_pretrained(directory)
        assert isinstance(model, ChatGLM2ForConditionalGeneration)
        assert max_diff(f'glm2 AutoModel {label}', our_logits(model, ids), expected) < TOL


def test_autotokenizer_reads_an_original_chatglm2_directory(tmp_path):
    from mindformers.models.glm2.glm2_tokenizer import ChatGLM2Tokenizer
    directory = hf_tokenizer_dir(tmp_path / 'hf', 'glm2', 'chatglm', {  # as in THUDM/chatglm2-6b
        'name_or_path': 'THUDM/chatglm2-6b', 'remove_space': False, 'do_lower_case': False,
        'tokenizer_class': 'ChatGLMTokenizer', 'auto_map': {'AutoTokenizer': ['tokenization_chatglm.ChatGLMTokenizer',
                                                                               None]}})
    tokenizer = AutoTokenizer.from_pretrained(directory)
    assert isinstance(tokenizer, ChatGLM2Tokenizer)
    reference = ChatGLM2Tokenizer(vocab_file=str(directory / 'tokenizer.model'))
    assert tokenizer.encode('你好') == reference.encode('你好')


def test_glm_without_qkv_bias_converts_too():
    """attention_bias=False is representable (ChatGLM2Config.add_qkv_bias=False): converted, not refused."""
    hf_model = hf_glm_model(attention_bias=False)
    config = config_from_hf(hf_model.config.to_dict())
    assert config.add_qkv_bias is False
    model = ChatGLM2ForConditionalGeneration(config)
    converted = convert_hf_to_ms(state_dict_of(hf_model), config)
    for param in model.get_parameters():
        param.set_data(__import__('mindspore').Tensor(converted[param.name]))
    ids = ids_for(1, 16, seed=16)
    assert max_diff('glm2 no qkv bias', our_logits(model, ids), hf_logits(hf_model, ids)) < TOL
    assert config_to_hf(config)['attention_bias'] is False


# ---------------------------------------------------------------------------------------------------------------
# errors


def _our_config():
    return ChatGLM2Config(padded_vocab_size=VOCAB, hidden_size=HIDDEN, ffn_hidden_size=FFN, num_layers=LAYERS,
                          num_attention_heads=HEADS, multi_query_group_num=KV_HEADS, kv_channels=HEAD_DIM,
                          seq_length=SEQ)


QKV = 'transformer.encoder.layers.0.self_attention.query_key_value'


@pytest.mark.parametrize('naming, change, named', [
    ('glm', lambda sd: sd.pop('model.layers.1.self_attn.k_proj.bias'),
     r"missing model\.layers\.1\.self_attn\.k_proj\.bias"),
    ('glm', lambda sd: sd.pop('model.layers.0.mlp.gate_up_proj.weight'),
     r"missing model\.layers\.0\.mlp\.gate_up_proj\.weight($|;)"),
    ('glm', lambda sd: sd.update({'model.layers.0.mlp.gate_up_proj.weight': np.ones((FFN, HIDDEN), np.float32)}),
     r"wrong shape model\.layers\.0\.mlp\.gate_up_proj\.weight \(96, 64\) \(expected \(192, 64\)\)"),
    ('glm', lambda sd: sd.update({'model.layers.0.self_attn.o_proj.bias': np.ones(HIDDEN, np.float32)}),
     r"unexpected model\.layers\.0\.self_attn\.o_proj\.bias"),
    ('chatglm', lambda sd: sd.pop('transformer.encoder.layers.1.mlp.dense_h_to_4h.weight'),
     r"missing transformer\.encoder\.layers\.1\.mlp\.dense_h_to_4h\.weight($|;)"),
    ('chatglm', lambda sd: sd.update({QKV + '.weight': np.ones((HIDDEN + 2 * HEAD_DIM, HIDDEN), np.float32)}),
     r"wrong shape transformer\.encoder\.layers\.0\.self_attention\.query_key_value\.weight \(96, 64\) "
     r"\(expected \(128, 64\)\)"),
    ('chatglm', lambda sd: sd.update({QKV + '.bias': np.ones(HIDDEN, np.float32)}),
     r"wrong shape transformer\.encoder\.layers\.0\.self_attention\.query_key_value\.bias \(64,\) "
     r"\(expected \(128,\)\)"),
    ('chatglm', lambda sd: sd.update({'transformer.prefix_encoder.embedding.weight': np.ones((4, 8), np.float32)}),
     r"unexpected transformer\.prefix_encoder\.embedding\.weight"),
    ('chatglm', lambda sd: sd.update({'transformer.encoder.layers.2.input_layernorm.weight': np.ones(HIDDEN)}),
     r"unexpected transformer\.encoder\.layers\.2\.input_layernorm\.weight"),
])
def test_bad_tensors_are_named_in_the_input_naming(naming, change, named):
    state_dict = state_dict_of(hf_glm_model()) if naming == 'glm' else _chatglm_tensors(hf_glm_model())
    change(state_dict)
    with pytest.raises(ConversionError, match=r"ChatGLM2 weights do not fit the model \(.*" + named):
        convert_hf_to_ms(state_dict, _our_config())


def test_cli_exit_1_with_one_line_naming_the_tensor(chatglm_dir, tmp_path):
    bad = tmp_path / 'bad'
    bad.mkdir()
    tensors = torch.load(chatglm_dir / 'pytorch_model.bin', weights_only=True)
    del tensors['transformer.encoder.layers.0.self_attention.query_key_value.bias']
    torch.save(tensors, bad / 'pytorch_model.bin')
    (bad / 'config.json').write_text(json.dumps(CHATGLM_CONFIG))
    line = one_error_line(run('convert_weight.py', '--model', 'glm2', '--input_path', bad, '--output_path',
                              tmp_path / 'out.ckpt'), code=1)
    assert 'missing transformer.encoder.layers.0.self_attention.query_key_value.bias' in line
    assert not os.path.exists(tmp_path / 'out.ckpt')


@pytest.mark.parametrize('change, message', [
    ({'rope_parameters': {'rope_type': 'default', 'rope_theta': 1e4, 'partial_rotary_factor': 1.0}},
     'partial_rotary_factor 1.0 is not supported'),
    ({'rope_parameters': {'rope_type': 'linear', 'rope_theta': 1e4, 'factor': 2.0}},
     "rope_type 'linear' cannot be reproduced"),
    ({'tie_word_embeddings': True}, 'tie_word_embeddings'),
    ({'hidden_act': 'gelu'}, "hidden_act 'gelu'"),
])
def test_glm_configs_chatglm2_cannot_represent_are_refused(hf_glm, change, message):
    with open(hf_glm[0] / 'config.json', encoding='utf-8') as f:
        data = json.load(f)
    with pytest.raises(ConversionError, match=message):
        config_from_hf({**data, **change})


def test_chatglm_config_variants():
    old_spelling = {'model_type': 'glm', 'vocab_size': VOCAB, 'hidden_size': HIDDEN, 'num_attention_heads': HEADS,
                    'head_dim': HEAD_DIM, 'partial_rotary_factor': 0.5, 'rope_theta': 50000.0}
    assert config_from_hf(old_spelling).rope_ratio == 5.0  # transformers 4.x spelling (top-level rope keys)
    with pytest.raises(ConversionError, match='partial_rotary_factor 0.25'):
        config_from_hf(dict(old_spelling, partial_rotary_factor=0.25))
    v1 = {'model_type': 'chatglm', 'vocab_size': 130528, 'position_encoding_2d': True, 'num_layers': 28}
    with pytest.raises(ConversionError, match='ChatGLM-6B v1'):
        config_from_hf(v1)
    with pytest.raises(ValueError, match='rmsnorm'):
        config_from_hf(dict(CHATGLM_CONFIG, rmsnorm=False))
    assert config_from_hf(dict(CHATGLM_CONFIG, rope_ratio=16)).rope_theta == 160000.0
    written = config_to_hf(config_from_hf(CHATGLM_CONFIG))
    assert written['rope_parameters'] == {'rope_type': 'default', 'rope_theta': 10000.0, 'partial_rotary_factor': 0.5}
    assert (written['num_key_value_heads'], written['head_dim'], written['tie_word_embeddings']) == (KV_HEADS,
                                                                                                     HEAD_DIM, False)
