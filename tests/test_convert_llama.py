"""LLaMA weight conversion against transformers `LlamaForCausalLM` (tiny random models, fp32): HF -> ours gives the
same logits and greedy tokens, `--reversed` loads back in transformers, Meta `consolidated.NN.pth` (one and two
model-parallel shards, q/k rows in Meta's interleaved RoPE order) converts to the same tensors, AutoModel converts a
HF directory on load, and bad inputs are refused naming the tensor."""
import functools
import json
import os

import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file, save_file

from mindformers.models.auto import AutoModel, AutoTokenizer
from mindformers.models.convert_utils import ConversionError, load_ms_weights
from mindformers.models.llama.convert_llama import config_from_hf, config_to_hf, convert_hf_to_ms, load_config
from mindformers.models.llama.llama_config import LlamaConfig
from mindformers.models.llama.modeling_llama import LlamaForCausalLM
from helpers.cli import convert_weight_main as cli, error_line as one_error_line, run
from helpers.hf_reference import (OBSERVED, TOL, VOCAB, assert_same_greedy, assert_same_tensors, converted_by_cli,
                                  hf_logits, hf_tokenizer_dir, ids_for, max_diff, model_from, our_logits, perturb_,
                                  state_dict_of)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HIDDEN, LAYERS, HEADS, FFN, SEQ = 64, 2, 4, 176, 64


@pytest.fixture(scope='session', autouse=True)
def _report_observed():
    yield
    if OBSERVED:
        print('\nmax |delta logits|: ' + ', '.join(f"{k} {v:.2e}" for k, v in sorted(OBSERVED.items())))


# ---------------------------------------------------------------------------------------------------------------
# fixtures


@functools.lru_cache(maxsize=None)
def hf_llama_model(kind):
    """A tiny random HF LlamaForCausalLM: 4 heads with 4 (MHA) or 2 (GQA) key/value heads."""
    torch.manual_seed(0 if kind == 'mha' else 1)
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=FFN,
                                      num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                                      num_key_value_heads=HEADS if kind == 'mha' else 2,
                                      max_position_embeddings=SEQ, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2)
    return perturb_(transformers.LlamaForCausalLM(config), seed=3)


@pytest.fixture(scope='session', params=['mha', 'gqa'])
def hf_llama(request, tmp_path_factory):
    """(kind, HF directory written by save_pretrained, the HF model)."""
    model = hf_llama_model(request.param)
    directory = tmp_path_factory.mktemp(f'hf_llama_{request.param}')
    model.save_pretrained(directory)
    return request.param, directory, model


@pytest.fixture(scope='session')
def llama_converted(hf_llama, tmp_path_factory):
    """(our checkpoint converted from the HF directory by the CLI, our model loading it)."""
    checkpoint = converted_by_cli('llama', hf_llama[1], tmp_path_factory)
    return checkpoint, model_from(config_from_hf, LlamaForCausalLM, hf_llama[1], checkpoint)


# ---------------------------------------------------------------------------------------------------------------
# HF <-> ours


def test_hf_to_ours_gives_the_same_logits_and_greedy_tokens(hf_llama, llama_converted):
    kind, _, hf_model = hf_llama
    llama_model = llama_converted[1]
    ids = ids_for(2, 24, seed=1)
    assert max_diff(f'llama {kind} HF->ours', our_logits(llama_model, ids), hf_logits(hf_model, ids)) < TOL
    assert_same_greedy(hf_model, llama_model, ids_for(1, 7, seed=2)[0].tolist())


def test_config_from_hf_reads_the_sizes(hf_llama):
    kind, directory, _ = hf_llama
    with open(directory / 'config.json', encoding='utf-8') as f:
        config = config_from_hf(json.load(f))
    assert (config.vocab_size, config.hidden_size, config.num_layers, config.num_heads) == (VOCAB, HIDDEN, LAYERS,
                                                                                           HEADS)
    assert (config.kv_heads, config.head_size, config.ffn_size, config.seq_length) == (
        HEADS if kind == 'mha' else 2, HIDDEN // HEADS, FFN, SEQ)
    assert (config.rms_norm_eps, config.theta, config.extend_method) == (1e-5, 10000.0, 'None')


def test_reversed_directory_loads_in_transformers(hf_llama, llama_converted, tmp_path):
    kind, directory, hf_model = hf_llama
    out = tmp_path / 'hf_back'
    assert cli('--model', 'llama', '--reversed', '--input_path', llama_converted[0], '--output_path', out,
               '--config', directory / 'config.json') == 0
    assert sorted(os.listdir(out)) == ['config.json', 'model.safetensors']
    back = transformers.LlamaForCausalLM.from_pretrained(out).eval()
    assert (back.config.num_key_value_heads, back.config.intermediate_size) == (hf_model.config.num_key_value_heads,
                                                                                 FFN)
    assert_same_tensors(state_dict_of(back), state_dict_of(hf_model))
    ids = ids_for(2, 24, seed=4)
    assert max_diff(f'llama {kind} reversed', hf_logits(back, ids), hf_logits(hf_model, ids)) == 0.0


def _to_meta(hf_model):
    """HF LlamaForCausalLM tensors in Meta's names and RoPE row order (the inverse of the HF permutation)."""
    config = hf_model.config
    head_dim = config.hidden_size // config.num_attention_heads

    def unpermute(value, heads):
        rows, cols = value.shape
        return value.reshape(heads, 2, head_dim // 2, cols).transpose(0, 2, 1, 3).reshape(rows, cols)

    hf = state_dict_of(hf_model)
    meta = {'tok_embeddings.weight': hf['model.embed_tokens.weight'], 'norm.weight': hf['model.norm.weight'],
            'output.weight': hf['lm_head.weight'], 'rope.freqs': np.ones(head_dim // 2, np.float32)}
    for i in range(config.num_hidden_layers):
        layer = lambda name: hf[f'model.layers.{i}.{name}.weight']  # pylint: disable=cell-var-from-loop
        meta.update({
            f'layers.{i}.attention.wq.weight': unpermute(layer('self_attn.q_proj'), config.num_attention_heads),
            f'layers.{i}.attention.wk.weight': unpermute(layer('self_attn.k_proj'), config.num_key_value_heads),
            f'layers.{i}.attention.wv.weight': layer('self_attn.v_proj'),
            f'layers.{i}.attention.wo.weight': layer('self_attn.o_proj'),
            f'layers.{i}.feed_forward.w1.weight': layer('mlp.gate_proj'),
            f'layers.{i}.feed_forward.w3.weight': layer('mlp.up_proj'),
            f'layers.{i}.feed_forward.w2.weight': layer('mlp.down_proj'),
            f'layers.{i}.attention_norm.weight': layer('input_layernorm'),
            f'layers.{i}.ffn_norm.weight': layer('post_attention_layernorm')})
    return meta


def _write_meta(directory, meta, config, shards):
    """consolidated.NN.pth model-parallel shards (wo/w2/tok_embeddings split along dim 1, the other matrices
    along dim 0, vectors replicated) and params.json."""
    os.makedirs(directory)
    for rank in range(shards):
        part = {}
        for name, value in meta.items():
            if value.ndim == 1:
                part[name] = torch.from_numpy(value)
            else:
                axis = 1 if name.startswith('tok_embeddings') or name.endswith(('wo.weight', 'w2.weight')) else 0
                part[name] = torch.from_numpy(np.ascontiguousarray(np.split(value, shards, axis=axis)[rank]))
        torch.save(part, directory / f'consolidated.{rank:02d}.pth')
    params = {'dim': config.hidden_size, 'n_layers': config.num_hidden_layers, 'n_heads': config.num_attention_heads,
              'n_kv_heads': config.num_key_value_heads, 'multiple_of': 16, 'norm_eps': config.rms_norm_eps,
              'vocab_size': -1, 'max_seq_len': SEQ}
    (directory / 'params.json').write_text(json.dumps(params))
    return directory


def test_meta_checkpoints_convert_to_the_same_weights(hf_llama, llama_converted, tmp_path):
    kind, _, hf_model = hf_llama
    meta = _to_meta(hf_model)
    expected = load_ms_weights(str(llama_converted[0]))
    for shards in (1, 2):
        directory = _write_meta(tmp_path / f'meta{shards}', meta, hf_model.config, shards)
        out = tmp_path / f'from_meta{shards}.ckpt'
        assert cli('--model', 'llama', '--input_path', directory, '--output_path', out) == 0
        assert_same_tensors(load_ms_weights(str(out)), expected)
    # the config comes from params.json: vocab_size -1 is read off the embedding, the SwiGLU width off w1
    config = load_config_from_meta(tmp_path / 'meta2')
    assert (config.vocab_size, config.ffn_size, config.kv_heads, config.seq_length) == (
        VOCAB, FFN, hf_model.config.num_key_value_heads, SEQ)
    config.checkpoint_name_or_path = str(tmp_path / 'from_meta2.ckpt')
    ids = ids_for(2, 24, seed=5)
    assert max_diff(f'llama {kind} Meta 2 shards', our_logits(LlamaForCausalLM(config), ids),
                    hf_logits(hf_model, ids)) < TOL


def load_config_from_meta(directory):
    from mindformers.models.llama.convert_llama import CONVERTER
    return CONVERTER.config_beside(str(directory), CONVERTER.read_input(str(directory)))


def test_automodel_converts_a_hf_directory(hf_llama):
    kind, directory, hf_model = hf_llama
    model = AutoModel.from_pretrained(directory)
    assert isinstance(model, LlamaForCausalLM)
    ids = ids_for(1, 16, seed=6)
    assert max_diff(f'llama {kind} AutoModel', our_logits(model, ids), hf_logits(hf_model, ids)) < TOL


def test_tied_embeddings_fill_the_head(tmp_path):
    """A HF config with tie_word_embeddings stores no lm_head.weight; ours gets the embedding as its head."""
    torch.manual_seed(5)
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=FFN,
                                      num_hidden_layers=LAYERS, num_attention_heads=HEADS, num_key_value_heads=2,
                                      max_position_embeddings=SEQ, tie_word_embeddings=True)
    hf_model = perturb_(transformers.LlamaForCausalLM(config), seed=6)
    hf_model.save_pretrained(tmp_path)
    assert 'lm_head.weight' not in load_file(str(tmp_path / 'model.safetensors'))
    ids = ids_for(1, 16, seed=7)
    assert max_diff('llama tied', our_logits(AutoModel.from_pretrained(tmp_path), ids), hf_logits(hf_model, ids)) < TOL


def test_reversed_without_a_config_asks_for_one(llama_converted, tmp_path, capsys):
    assert cli('--model', 'llama', '--reversed', '--input_path', llama_converted[0], '--output_path',
               tmp_path / 'out') == 2
    assert 'give the model\'s config (convert_weight.py --config' in capsys.readouterr().err
    assert not os.path.exists(tmp_path / 'out')


def test_autotokenizer_reads_a_hf_directory_with_tokenizer_model(tmp_path):
    from mindformers.models.llama.llama_tokenizer import LlamaTokenizer
    added = lambda content: {'__type': 'AddedToken', 'content': content, 'lstrip': False, 'normalized': False,
                             'rstrip': False, 'single_word': False}
    directory = hf_tokenizer_dir(tmp_path / 'hf', 'llama', 'llama', {  # as in Llama-2-7b-hf
        'add_bos_token': True, 'add_eos_token': False, 'bos_token': added('<s>'), 'eos_token': added('</s>'),
        'unk_token': added('<unk>'), 'legacy': False, 'sp_model_kwargs': {}, 'tokenizer_class': 'LlamaTokenizer'})
    tokenizer = AutoTokenizer.from_pretrained(directory)
    assert isinstance(tokenizer, LlamaTokenizer) and tokenizer.bos_token == '<s>'
    reference = LlamaTokenizer(vocab_file=str(directory / 'tokenizer.model'))
    assert tokenizer.encode('Hello world') == reference.encode('Hello world')


# ---------------------------------------------------------------------------------------------------------------
# errors


def _our_config(kind='gqa'):
    return LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_layers=LAYERS, num_heads=HEADS,
                       n_kv_heads=None if kind == 'mha' else 2, intermediate_size=FFN, seq_length=SEQ)


@pytest.mark.parametrize('change, named', [
    (lambda sd: sd.pop('model.layers.1.mlp.up_proj.weight'), r"missing model\.layers\.1\.mlp\.up_proj\.weight"),
    (lambda sd: sd.update({'model.layers.0.self_attn.q_norm.weight': np.ones(16, np.float32)}),
     r"unexpected model\.layers\.0\.self_attn\.q_norm\.weight"),
    (lambda sd: sd.update({'model.layers.2.input_layernorm.weight': np.ones(HIDDEN, np.float32)}),
     r"unexpected model\.layers\.2\.input_layernorm\.weight"),
    (lambda sd: sd.update({'model.layers.0.self_attn.k_proj.weight': np.ones((64, HIDDEN), np.float32)}),
     r"wrong shape model\.layers\.0\.self_attn\.k_proj\.weight \(64, 64\) \(expected \(32, 64\)\)"),
])
def test_bad_hf_tensors_are_named(change, named):
    state_dict = state_dict_of(hf_llama_model('gqa'))
    change(state_dict)
    with pytest.raises(ConversionError, match=named):
        convert_hf_to_ms(state_dict, _our_config())


def test_bad_meta_tensors_are_named_in_meta_names():
    meta = _to_meta(hf_llama_model('gqa'))
    del meta['layers.1.feed_forward.w3.weight']
    meta['layers.0.attention.wk.weight'] = meta['layers.0.attention.wk.weight'][:8]
    with pytest.raises(ConversionError) as err:
        convert_hf_to_ms(meta, _our_config())
    message = str(err.value)
    assert 'missing layers.1.feed_forward.w3.weight' in message
    assert 'wrong shape layers.0.attention.wk.weight (8, 64)' in message
    assert 'rope.freqs' not in message


def test_cli_exit_1_with_one_line_naming_the_tensor(tmp_path):
    bad = tmp_path / 'bad'
    hf_llama_model('gqa').save_pretrained(bad)
    tensors = load_file(str(bad / 'model.safetensors'))
    del tensors['model.norm.weight']
    save_file(tensors, str(bad / 'model.safetensors'), metadata={'format': 'pt'})
    line = one_error_line(run('convert_weight.py', '--model', 'llama', '--input_path', bad, '--output_path',
                              tmp_path / 'out.ckpt'), code=1)
    assert 'LLaMA weights do not fit the model' in line and 'missing model.norm.weight' in line
    assert not os.path.exists(tmp_path / 'out.ckpt')


# ---------------------------------------------------------------------------------------------------------------
# configs


def test_rope_settings_old_and_new_spellings():
    base = dict(model_type='llama', vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS,
                num_attention_heads=HEADS, intermediate_size=FFN, max_position_embeddings=SEQ)
    config = config_from_hf(dict(base, rope_theta=500000.0, rope_scaling={'type': 'linear', 'factor': 4.0}))
    assert (config.theta, config.extend_method, config.scaling_factor) == (500000.0, 'PI', 4.0)
    config = config_from_hf(dict(base, rope_parameters={'rope_type': 'linear', 'rope_theta': 1e4, 'factor': 2.0}))
    assert (config.theta, config.extend_method, config.scaling_factor) == (1e4, 'PI', 2.0)
    hf = config_to_hf(config)
    assert hf['rope_parameters'] == {'rope_type': 'linear', 'rope_theta': 1e4, 'factor': 2.0}
    for kind in ('llama3', 'dynamic', 'yarn'):
        with pytest.raises(ConversionError, match=f"rope_type '{kind}' cannot be reproduced"):
            config_from_hf(dict(base, rope_parameters={'rope_type': kind, 'rope_theta': 1e4, 'factor': 8.0}))
    with pytest.raises(ConversionError, match='attention_bias'):
        config_from_hf(dict(base, attention_bias=True))
    ntk = config_to_hf(LlamaConfig(hidden_size=HIDDEN, num_heads=HEADS, extend_method='NTK', scaling_factor=4.0))
    assert ntk['rope_parameters'] == {'rope_type': 'default', 'rope_theta': 10000.0 * 4.0 ** (16 / 14)}


def test_load_config_reads_run_yaml_and_ours(tmp_path):
    config = load_config(os.path.join(REPO, 'configs', 'llama', 'run_llama_tiny.yaml'))
    assert isinstance(config, LlamaConfig)
    _our_config().save_pretrained(tmp_path)
    assert load_config(str(tmp_path / 'config.json')).kv_heads == 2
    (tmp_path / 'config.json').write_text(json.dumps({'model_type': 'gpt2'}))
    with pytest.raises(ConversionError, match="describes a 'gpt2' model, not LLaMA"):
        load_config(str(tmp_path / 'config.json'))
