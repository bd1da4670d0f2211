"""PengCheng.Mind (research/pengcheng_mind) against its transformers oracle (spec §8.3): `LlamaForCausalLM` with
attention_bias, mlp_bias, tie_word_embeddings and its RMSNorm class replaced by a LayerNorm with bias before
construction. Random weights are written in PengCheng's MindSpore naming, converted with `convert_weight.py --model
pengcheng_mind`, and give HF's logits and greedy continuation (KV cache); the tokenizer, converter errors, registry
and the tiny / 7B run configs are checked too. fp32 on CPU."""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import mindspore as ms
import sentencepiece as spm
import transformers
from transformers.models.llama import modeling_llama as hf_llama

from mindformers.models.auto import AutoConfig, AutoModel, AutoTokenizer
from mindformers.models.convert_utils import ConversionError
from mindformers.tools.build import build_model_config
from research.pengcheng_mind import PengChengMindConfig, PengChengMindForCausalLM, PengChengMindTokenizer
from research.pengcheng_mind import convert_pengcheng_mind as convert

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOKENIZER = os.path.join(REPO, 'mindformers', 'assets', 'llama_tiny', 'tokenizer.model')
VOCAB, HIDDEN, FFN, LAYERS, HEADS, SEQ = 128, 64, 96, 2, 4, 64
TOL = 1e-4


class _LayerNormWithBias(torch.nn.LayerNorm):
    """Stands in for LlamaRMSNorm: PengCheng's LayerNorm (γ, β)."""

    def __init__(self, hidden_size, eps=1e-5):
        super().__init__(hidden_size, eps=eps)


def _hf_reference():
    """A random PengCheng-topology LlamaForCausalLM (every weight, norm and bias random)."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=FFN,
                                      num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                                      num_key_value_heads=HEADS, max_position_embeddings=SEQ, rms_norm_eps=1e-5,
                                      attention_bias=True, mlp_bias=True, tie_word_embeddings=True,
                                      pad_token_id=0, bos_token_id=1, eos_token_id=2,
                                      rope_parameters={'rope_type': 'default', 'rope_theta': 10000.0})
    original = hf_llama.LlamaRMSNorm
    hf_llama.LlamaRMSNorm = _LayerNormWithBias
    try:
        model = transformers.LlamaForCausalLM(config)
    finally:
        hf_llama.LlamaRMSNorm = original
    assert isinstance(model.model.norm, torch.nn.LayerNorm)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    with torch.no_grad():
        for name, param in model.named_parameters():
            if 'layernorm' in name or name.startswith('model.norm'):
                param.copy_(1.0 + 0.2 * torch.randn_like(param) if name.endswith('weight')
                            else 0.1 * torch.randn_like(param))
            elif name.endswith('bias'):
                param.normal_(0, 0.1)
            else:
                param.normal_(0, 0.08)
    return model.eval()


def _to_pengcheng(hf_model):
    """HF tensors -> PengCheng's MindSpore release naming (mapping [h, 2f] = [gate; up] transposed, [in, out] for
    the two projections, gamma / beta for the norms)."""
    state = {name: value.detach().numpy().copy() for name, value in hf_model.state_dict().items()}
    out = {'backbone.embedding.word_embedding.embedding_table': state['model.embed_tokens.weight'],
           'backbone.layernorm.gamma': state['model.norm.weight'], 'backbone.layernorm.beta': state['model.norm.bias']}
    for i in range(LAYERS):
        hf, pcm = f'model.layers.{i}.', f'backbone.blocks.{i}.'
        for ours, theirs in (('input_layernorm', 'layernorm1'), ('post_attention_layernorm', 'layernorm2')):
            out[pcm + theirs + '.gamma'], out[pcm + theirs + '.beta'] = state[hf + ours + '.weight'], \
                state[hf + ours + '.bias']
        for proj, dense in (('q_proj', 'dense1'), ('k_proj', 'dense2'), ('v_proj', 'dense3')):
            out[pcm + f'attention.{dense}.weight'] = state[hf + f'self_attn.{proj}.weight']
            out[pcm + f'attention.{dense}.bias'] = state[hf + f'self_attn.{proj}.bias']
        out[pcm + 'attention.projection.weight'] = state[hf + 'self_attn.o_proj.weight'].T.copy()
        out[pcm + 'attention.projection.bias'] = state[hf + 'self_attn.o_proj.bias']
        out[pcm + 'output.mapping.weight'] = np.concatenate([state[hf + 'mlp.gate_proj.weight'],
                                                             state[hf + 'mlp.up_proj.weight']]).T.copy()
        out[pcm + 'output.mapping.bias'] = np.concatenate([state[hf + 'mlp.gate_proj.bias'],
                                                           state[hf + 'mlp.up_proj.bias']])
        out[pcm + 'output.projection.weight'] = state[hf + 'mlp.down_proj.weight'].T.copy()
        out[pcm + 'output.projection.bias'] = state[hf + 'mlp.down_proj.bias']
    return out


def _save(tensors, path):
    ms.save_checkpoint([{'name': name, 'data': ms.Tensor(value)} for name, value in tensors.items()], str(path))
    return path


def _config():
    return PengChengMindConfig(vocab_size=VOCAB, hidden_size=HIDDEN, ffn_hidden_size=FFN, num_layers=LAYERS,
                               num_heads=HEADS, seq_length=SEQ)


def _run(script, *args):
    proc = subprocess.run([sys.executable, os.path.join(REPO, script), *map(str, args)], cwd=REPO,
                          capture_output=True, text=True, timeout=600)
    return proc


@pytest.fixture(scope='module')
def converted(tmp_path_factory):
    """(HF reference, PengCheng tensors, our model loaded from the CLI-converted checkpoint, work directory)."""
    work = tmp_path_factory.mktemp('pcm')
    hf_model = _hf_reference()
    release = _to_pengcheng(hf_model)
    _save(release, work / 'release.ckpt')
    _config().save_pretrained(work / 'cfg')
    proc = _run('convert_weight.py', '--model', 'pengcheng_mind', '--input_path', work / 'release.ckpt',
                '--output_path', work / 'ours.ckpt', '--config', work / 'cfg' / 'config.json')
    assert proc.returncode == 0, proc.stderr
    config = _config()
    config.checkpoint_name_or_path = str(work / 'ours.ckpt')
    model = PengChengMindForCausalLM(config)
    model.set_train(False)
    return hf_model, release, model, work


def test_parameters_are_llama_names_with_biases_layernorm_and_no_head(converted):
    _, _, model, _ = converted
    names = {p.name for p in model.get_parameters()}
    assert 'lm_head.weight' not in names
    assert {'model.norm.bias', 'model.layers.0.input_layernorm.bias', 'model.layers.0.self_attn.o_proj.bias',
            'model.layers.0.mlp.gate_proj.bias', 'model.layers.0.mlp.up_proj.bias',
            'model.layers.0.mlp.down_proj.bias'} <= names
    assert len(names) == 3 + LAYERS * 18  # per layer: 2 norms, 7 projections, each weight + bias


def test_logits_match_the_huggingface_oracle(converted):
    hf_model, _, model, _ = converted
    ids = np.random.RandomState(0).randint(3, VOCAB, (2, 24))
    with torch.no_grad():
        reference = hf_model(torch.tensor(ids)).logits.numpy()
    got = model(ms.Tensor(ids, ms.int32)).asnumpy()
    delta = np.abs(got - reference).max()
    print(f"PengCheng.Mind max |dlogits| = {delta:.3e}")
    assert delta < TOL
    assert np.abs(reference).max() > 0.5  # the weights really move the logits


def test_greedy_with_kv_cache_matches_huggingface(converted):
    hf_model, _, model, _ = converted
    prompt = np.random.RandomState(5).randint(3, VOCAB, (1, 9))
    expected = hf_model.generate(torch.tensor(prompt), max_new_tokens=16, do_sample=False, pad_token_id=0,
                                 eos_token_id=None).numpy()[0, 9:].tolist()
    output = model.generate([prompt[0].tolist()], max_new_tokens=16, use_past=True, do_sample=False,
                            eos_token_id=[], pad_token_id=0)[0]
    assert list(output[9:]) == expected


def test_conversion_back_gives_the_release_tensors(converted):
    _, release, _, work = converted
    written = convert.convert_ms_to_pt(str(work / 'ours.ckpt'), str(work / 'back.ckpt'),
                                       config=str(work / 'cfg' / 'config.json'))
    assert set(written) == set(release)
    back = {name: param.asnumpy() for name, param in ms.load_checkpoint(str(work / 'back.ckpt')).items()}
    for name, value in release.items():
        np.testing.assert_array_equal(back[name], value, err_msg=name)


def test_converter_errors_name_the_tensors(converted):
    _, release, _, _ = converted
    broken = dict(release)
    del broken['backbone.blocks.1.attention.dense2.bias']
    broken['backbone.blocks.0.output.mapping.weight'] = release['backbone.blocks.0.output.mapping.weight'][:, :-2]
    broken['backbone.embedding.position_embedding.embedding_table'] = np.zeros((SEQ, HIDDEN), np.float32)
    broken['adam_m.backbone.layernorm.gamma'] = np.zeros(HIDDEN, np.float32)  # optimizer state is skipped
    with pytest.raises(ConversionError) as err:
        convert.convert_hf_to_ms(broken, _config())
    message = str(err.value)
    assert 'missing backbone.blocks.1.attention.dense2.bias' in message
    assert 'backbone.embedding.position_embedding.embedding_table' in message
    assert f'backbone.blocks.0.output.mapping.weight ({HIDDEN}, {2 * FFN - 2}) (expected ({HIDDEN}, {2 * FFN}))' \
        in message
    assert 'adam_m' not in message
    wrong = PengChengMindConfig(vocab_size=VOCAB, hidden_size=HIDDEN, ffn_hidden_size=FFN + 32, num_layers=LAYERS,
                                num_heads=HEADS, seq_length=SEQ)
    with pytest.raises(ConversionError, match='output.projection.weight'):
        convert.convert_hf_to_ms(release, wrong)


def test_cli_refuses_a_release_without_config(converted):
    _, _, _, work = converted
    proc = _run('convert_weight.py', '--model', 'pengcheng_mind', '--input_path', work / 'release.ckpt',
                '--output_path', work / 'x.ckpt')
    assert proc.returncode == 2 and '--config' in proc.stderr and not os.path.exists(work / 'x.ckpt')


def test_tokenizer_adds_no_bos_and_drops_padding_ids():
    tokenizer = PengChengMindTokenizer(vocab_file=TOKENIZER)
    sp = spm.SentencePieceProcessor(model_file=TOKENIZER)
    text = 'ROMEO: But soft, what light'
    ids = tokenizer(text)['input_ids']
    assert ids == sp.encode(text)
    assert (tokenizer.pad_token_id, tokenizer.unk_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id) == \
        (0, 0, 1, 2)
    assert tokenizer.decode(ids) == text
    padded = PengChengMindTokenizer(vocab_file=TOKENIZER, padded_vocab_size=sp.get_piece_size() + 256)
    assert padded.decode(ids + [sp.get_piece_size() + 7]) == text
    with pytest.raises(ValueError, match='out of range'):
        tokenizer.decode(ids + [sp.get_piece_size() + 7])
    with pytest.raises(ValueError, match='padded_vocab_size'):
        PengChengMindTokenizer(vocab_file=TOKENIZER, padded_vocab_size=10)


@pytest.mark.parametrize('text', ['ROMEO: 你好，世界！ mixed\ttabs\nand  two   spaces', '  leading and trailing  ',
                                  'emoji 😀 and full-width ，！', 'a\r\nb', 'text with </s> inside'])
def test_tokenizer_round_trips_mixed_text(text):
    """SentencePiece with byte fallback and the identity normalizer: decode(encode(x)) == x for any text. The one
    documented exception: a special token's text inside the input is encoded as that token, so it round-trips
    only while special tokens are kept."""
    tokenizer = PengChengMindTokenizer(vocab_file=TOKENIZER)
    ids = tokenizer.encode(text)
    assert tokenizer.decode(ids) == text
    if '</s>' in text:
        assert tokenizer.eos_token_id in ids
        assert tokenizer.decode(ids, skip_special_tokens=True) != text


def test_registered_names_and_configs():
    tiny = AutoConfig.from_pretrained('pengcheng_mind_tiny')
    assert isinstance(tiny, PengChengMindConfig)
    assert (tiny.vocab_size, tiny.hidden_size, tiny.num_layers, tiny.num_heads, tiny.seq_length) == \
        (512, 192, 4, 4, 128)
    assert type(AutoModel.from_config(tiny)) is PengChengMindForCausalLM
    assert type(AutoTokenizer.from_pretrained('pengcheng_mind_tiny')).__name__ == 'PengChengMindTokenizer'
    sys.path.insert(0, REPO)
    from run_mindformer import build_config, parse_args  # pylint: disable=import-outside-toplevel
    config = build_config(*parse_args(['--config', 'research/pengcheng_mind/run_pengcheng_mind_7b.yaml']))
    big = build_model_config(config.model.model_config)
    assert isinstance(big, PengChengMindConfig)
    assert (big.vocab_size, big.hidden_size, big.ffn_size, big.num_layers, big.num_heads, big.head_size,
            big.seq_length) == (125952, 4096, 10880, 32, 32, 128, 4096)
    assert PengChengMindConfig().ffn_size == 10880
    with pytest.raises(ValueError, match='use_rope'):
        PengChengMindConfig(use_rope=False)
