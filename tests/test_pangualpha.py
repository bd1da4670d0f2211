"""PanGu-alpha against a PyTorch reference (transformers has no PanGu): `GPT2Model` with quick_gelu for the
num_layers - 1 blocks and the final LayerNorm, plus a hand-written query layer and tied head (specs/models.md
7.4). Random weights are written in the HF-port naming, converted, and compared: logits, padded batches, greedy
decoding with the KV cache; MindSpore naming conversion; the jieba tokenizer; the tiny YAML from the CLI."""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import transformers
import mindspore as ms

from mindformers.generation.session import DecodingSession
from mindformers.models.convert_utils import load_hf_weights, load_ms_weights, save_hf_weights, save_ms_weights
from mindformers.models.pangualpha import PanguAlphaConfig, PanguAlphaHeadModel, PanguAlphaTokenizer
from mindformers.models.pangualpha.convert_pangualpha import (ConversionError, convert_hf_to_ms, convert_ms_to_pt,
                                                              convert_pt_to_ms)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VOCAB, HIDDEN, LAYERS, HEADS, SEQ = 96, 64, 3, 4, 32  # LAYERS counts the query layer


class TorchPangu(torch.nn.Module):
    """The reference: GPT2Model (blocks + ln_f, quick_gelu) then PanGu's query layer, tied head."""

    def __init__(self):
        super().__init__()
        config = transformers.GPT2Config(vocab_size=VOCAB, n_embd=HIDDEN, n_layer=LAYERS - 1, n_head=HEADS,
                                         n_positions=SEQ, activation_function='quick_gelu', resid_pdrop=0.0,
                                         embd_pdrop=0.0, attn_pdrop=0.0)
        self.gpt2 = transformers.GPT2Model(config)
        self.wqe = torch.nn.Embedding(SEQ, HIDDEN)
        self.ln_1, self.ln_2 = torch.nn.LayerNorm(HIDDEN), torch.nn.LayerNorm(HIDDEN)
        self.q_proj, self.k_proj, self.v_proj, self.c_proj = (torch.nn.Linear(HIDDEN, HIDDEN) for _ in range(4))
        self.c_fc, self.mlp_proj = torch.nn.Linear(HIDDEN, 4 * HIDDEN), torch.nn.Linear(4 * HIDDEN, HIDDEN)

    def forward(self, ids, attention_mask=None):
        batch, seq = ids.shape
        if attention_mask is None:
            attention_mask = torch.ones_like(ids)
        positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        x = self.gpt2(ids, attention_mask=attention_mask, position_ids=positions).last_hidden_state  # after ln_f
        heads = lambda t: t.reshape(batch, seq, HEADS, -1).transpose(1, 2)
        normed = self.ln_1(x)
        q, k, v = heads(self.q_proj(self.wqe(positions))), heads(self.k_proj(normed)), heads(self.v_proj(normed))
        scores = q @ k.transpose(-1, -2) / np.sqrt(HIDDEN // HEADS)
        allowed = torch.tril(torch.ones(seq, seq, dtype=torch.bool)) & attention_mask.bool()[:, None, None, :]
        probs = scores.masked_fill(~allowed, -1e9).softmax(-1)
        x = x + self.c_proj((probs @ v).transpose(1, 2).reshape(batch, seq, HIDDEN))
        fc = self.c_fc(self.ln_2(x))
        x = x + self.mlp_proj(fc * torch.sigmoid(1.702 * fc))  # quick_gelu = MindSpore fast_gelu
        return x @ self.gpt2.wte.weight.T

    def hf_port_state_dict(self):
        """The weights in the HF port's naming: transformer.h.{LAYERS - 1} is the query layer, nn.Linear [out, in]."""
        out = {'transformer.wte.weight': self.gpt2.wte.weight, 'transformer.wpe.weight': self.gpt2.wpe.weight,
               'transformer.wqe.weight': self.wqe.weight, 'transformer.ln_f.weight': self.gpt2.ln_f.weight,
               'transformer.ln_f.bias': self.gpt2.ln_f.bias, 'lm_head.weight': self.gpt2.wte.weight}
        for i, block in enumerate(self.gpt2.h):
            prefix = f'transformer.h.{i}.'
            qkv = zip('qkv', block.attn.c_attn.weight.split(HIDDEN, 1), block.attn.c_attn.bias.split(HIDDEN))
            for name, w, b in qkv:
                out[f'{prefix}attn.{name}_proj.weight'], out[f'{prefix}attn.{name}_proj.bias'] = w.T, b
            for ours, conv in (('attn.c_proj', block.attn.c_proj), ('mlp.c_fc', block.mlp.c_fc),
                               ('mlp.c_proj', block.mlp.c_proj)):  # Conv1D [in, out] -> Linear [out, in]
                out[prefix + ours + '.weight'], out[prefix + ours + '.bias'] = conv.weight.T, conv.bias
            for ln in ('ln_1', 'ln_2'):
                norm = getattr(block, ln)
                out[f'{prefix}{ln}.weight'], out[f'{prefix}{ln}.bias'] = norm.weight, norm.bias
        prefix = f'transformer.h.{LAYERS - 1}.'
        for ours, module in (('ln_1', self.ln_1), ('ln_2', self.ln_2), ('attn.q_proj', self.q_proj),
                             ('attn.k_proj', self.k_proj), ('attn.v_proj', self.v_proj), ('attn.c_proj', self.c_proj),
                             ('mlp.c_fc', self.c_fc), ('mlp.c_proj', self.mlp_proj)):
            out[prefix + ours + '.weight'], out[prefix + ours + '.bias'] = module.weight, module.bias
        return {name: t.detach().numpy().copy() for name, t in out.items()}


def our_config(checkpoint='', **overrides):
    args = dict(vocab_size=VOCAB, hidden_size=HIDDEN, num_layers=LAYERS, num_heads=HEADS, seq_length=SEQ,
                embedding_dropout_prob=0.0, hidden_dropout_rate=0.0, attention_dropout_rate=0.0,
                checkpoint_name_or_path=str(checkpoint))
    args.update(overrides)
    return PanguAlphaConfig(**args)


def random_ids(rows, cols, seed):
    return np.random.default_rng(seed).integers(10, VOCAB, (rows, cols)).astype(np.int32)  # 6 (<eod>), 9 left out


@pytest.fixture(scope='module')
def reference():
    torch.manual_seed(0)
    model = TorchPangu().eval()
    with torch.no_grad():  # LayerNorms start at 1/0 and biases at 0: move them so a dropped or swapped one shows
        for param in model.parameters():
            if param.dim() == 1:
                param.add_(0.2 * torch.randn_like(param))
    return model


def ref_logits(reference, ids, attention_mask=None):
    with torch.no_grad():
        mask = None if attention_mask is None else torch.tensor(attention_mask, dtype=torch.long)
        return reference(torch.tensor(ids, dtype=torch.long), mask).numpy()


@pytest.fixture(scope='module')
def checkpoint(reference, tmp_path_factory):
    directory = tmp_path_factory.mktemp('hf_pangu')
    save_hf_weights(reference.hf_port_state_dict(), str(directory / 'model.safetensors'))
    path = directory / 'pangu.ckpt'
    convert_pt_to_ms(str(directory), str(path), config=our_config())
    return path


@pytest.fixture(scope='module')
def model(checkpoint):
    net = PanguAlphaHeadModel(our_config(checkpoint))
    net.set_train(False)
    return net


def test_logits_match_reference(reference, model):
    worst = 0.0
    for seq in (SEQ, 11):
        ids = random_ids(2, seq, seed=seq)
        logits = model(ms.Tensor(ids)).asnumpy()
        assert logits.shape == (2, seq, VOCAB)
        worst = max(worst, np.abs(logits - ref_logits(reference, ids)).max())
    print(f"max |dlogits| {worst:.2e}")
    assert worst < 1e-4


def test_left_padded_batch_matches_reference(reference, model):
    ids = random_ids(2, 12, seed=3)
    mask = np.ones_like(ids)
    mask[0, :5] = 0
    ids[0, :5] = 6
    logits = model(ms.Tensor(ids), ms.Tensor(mask)).asnumpy()
    expected = ref_logits(reference, ids, mask)
    assert np.abs(logits - expected)[mask.astype(bool)].max() < 1e-4
    # the padded row equals the same prompt alone
    alone = model(ms.Tensor(ids[:1, 5:])).asnumpy()
    assert np.abs(logits[0, 5:] - alone[0]).max() < 1e-4


def test_training_loss_matches_reference(reference, model):
    ids = random_ids(2, SEQ + 1, seed=4)
    model.set_train(True)
    try:
        loss = float(model(ms.Tensor(ids)).asnumpy())
    finally:
        model.set_train(False)
    logits = torch.tensor(ref_logits(reference, ids[:, :-1])).reshape(-1, VOCAB)
    expected = torch.nn.functional.cross_entropy(logits, torch.tensor(ids[:, 1:], dtype=torch.long).reshape(-1))
    assert abs(loss - expected.item()) < 1e-5


def _greedy_reference(reference, prompt, steps):
    ids = list(prompt)
    for _ in range(steps):
        ids.append(int(ref_logits(reference, np.array([ids]))[0, -1].argmax()))
    return ids


def test_greedy_kv_cache_matches_recomputation_and_reference(reference, model):
    prompt, steps = [13, 27, 42, 18, 11, 60], 16
    expected = _greedy_reference(reference, prompt, steps)
    model.__dict__.pop('_generate_sessions', None)
    cached = model.generate([prompt], max_new_tokens=steps, use_past=True, do_sample=False, eos_token_id=-1)[0]
    assert model.__dict__.get('_generate_sessions')  # the KV cache was used
    full = model.generate([prompt], max_new_tokens=steps, use_past=False, do_sample=False, eos_token_id=-1)[0]
    assert list(cached) == list(full) == expected


def test_kv_cache_logits_match_full_forward(model):
    ids = random_ids(2, 9, seed=5)
    mask = np.ones_like(ids)
    mask[1, :3] = 0
    session = DecodingSession(model, 2)
    logits = [session.prefill([0, 1], ids[:, :6], mask[:, :6])]
    for column in range(6, 9):
        logits.append(session.decode(ids[:, column]))
    full = model(ms.Tensor(ids), ms.Tensor(mask)).asnumpy()
    for step, got in enumerate(logits):
        assert np.abs(got - full[:, 5 + step]).max() < 1e-4, step


def test_mindspore_naming_converts_like_hf(reference, checkpoint, tmp_path):
    """MindFormers / original PanGu names (blocks, top_query_layer, [in, out] projections, gamma/beta) and the
    release's separate embedding .npy files give the same weights."""
    hf = reference.hf_port_state_dict()
    ms_names = {}
    parts = {'ln_1.weight': 'layernorm1.gamma', 'ln_1.bias': 'layernorm1.beta', 'ln_2.weight': 'layernorm2.gamma',
             'ln_2.bias': 'layernorm2.beta', 'attn.q_proj': 'attention.dense1', 'attn.k_proj': 'attention.dense2',
             'attn.v_proj': 'attention.dense3', 'attn.c_proj': 'attention.projection', 'mlp.c_fc': 'output.mapping',
             'mlp.c_proj': 'output.projection'}
    for name, value in hf.items():
        if not name.startswith('transformer.h.'):
            continue
        index, rest = name[len('transformer.h.'):].split('.', 1)
        layer = 'backbone.top_query_layer' if int(index) == LAYERS - 1 else f'backbone.blocks.{index}'
        key = next(k for k in parts if rest.startswith(k))
        transposed = key in ('attn.c_proj', 'mlp.c_fc', 'mlp.c_proj') and rest.endswith('weight')
        ms_names[f'{layer}.{parts[key]}{rest[len(key):]}'] = value.T if transposed else value
    ms_names['backbone.layernorm.gamma'] = hf['transformer.ln_f.weight']
    ms_names['backbone.layernorm.beta'] = hf['transformer.ln_f.bias']
    ms_names['backbone.embedding.position_embedding.embedding_table'] = hf['transformer.wpe.weight']
    ms_names['adam_m.backbone.layernorm.gamma'] = hf['transformer.ln_f.weight']  # optimizer state: skipped
    ms_names['global_step'] = np.array([3], np.int32)
    release = tmp_path / 'release'
    release.mkdir()
    save_ms_weights(ms_names, str(release / 'merged.ckpt'))
    np.save(release / 'word_embedding.npy', hf['transformer.wte.weight'])
    np.save(release / 'top_query_embedding.npy', hf['transformer.wqe.weight'])
    our_config().save_pretrained(tmp_path / 'config')  # MindSpore checkpoints carry no config
    out = tmp_path / 'pangu.ckpt'
    proc = subprocess.run([sys.executable, os.path.join(REPO, 'convert_weight.py'), '--model', 'pangualpha',
                           '--input_path', str(release), '--output_path', str(out), '--config',
                           str(tmp_path / 'config' / 'config.json')], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    converted, expected = load_ms_weights(str(out)), load_ms_weights(str(checkpoint))
    assert set(converted) == set(expected)
    for name, value in expected.items():
        np.testing.assert_array_equal(converted[name], value, err_msg=name)


def test_conversion_errors_name_the_tensor(reference):
    state_dict = reference.hf_port_state_dict()
    state_dict.pop(f'transformer.h.{LAYERS - 1}.attn.q_proj.bias')
    with pytest.raises(ConversionError, match=rf"missing transformer\.h\.{LAYERS - 1}\.attn\.q_proj\.bias"):
        convert_hf_to_ms(state_dict, our_config())
    state_dict = reference.hf_port_state_dict()
    state_dict['lm_head.weight'] = state_dict['lm_head.weight'] + 1
    with pytest.raises(ConversionError, match='lm_head.weight'):
        convert_hf_to_ms(state_dict, our_config())


def test_reverse_conversion_round_trips(checkpoint, reference, tmp_path):
    convert_ms_to_pt(str(checkpoint), str(tmp_path / 'hf'), config=our_config())
    back = load_hf_weights(str(tmp_path / 'hf'))
    expected = reference.hf_port_state_dict()
    expected.pop('lm_head.weight')
    assert set(back) == set(expected)
    for name, value in expected.items():
        np.testing.assert_array_equal(back[name], value, err_msg=name)


# ------------------------------------------------------------------ tokenizer

@pytest.fixture(scope='module')
def tokenizer():
    return PanguAlphaTokenizer('assets/pangualpha_tiny/vocab.model')


def test_tokenizer_round_trip_mixed_text(tokenizer):
    assert (len(tokenizer), tokenizer.pad_token_id, tokenizer.eos_token_id) == (512, 510, 511)
    texts = ["ROMEO: Hello  world!\n你好，今天的天气很好。", "  leading spaces\n\nand blank lines \t tab 123",
             "机器先把文字切成小块, then numbers.\n"]
    for text in texts:
        ids = tokenizer.encode(text)
        assert 0 not in ids  # no <unk>: byte fallback spells everything
        assert tokenizer.decode(ids) == text
    pieces = tokenizer.convert_ids_to_tokens(tokenizer.encode("a b\nc"))
    assert '\u2582' in ''.join(pieces) and '\u2583' in ''.join(pieces)  # ' ' -> ▂, newline -> ▃
    ids = tokenizer.encode("你好<eot>")
    assert ids[-1] == 511 and tokenizer.decode(ids, skip_special_tokens=True) == "你好"


def test_tokenizer_saves_and_loads(tokenizer, tmp_path):
    from mindformers import AutoTokenizer
    tokenizer.save_pretrained(tmp_path)
    assert (tmp_path / 'vocab.model').is_file()
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert type(loaded) is PanguAlphaTokenizer and len(loaded) == 512
    text = "你好 world\n"
    assert loaded.encode(text) == tokenizer.encode(text)


def test_tokenizer_segments_with_jieba(tokenizer):
    from mindformers.models.pangualpha.pangualpha_tokenizer import segment
    assert segment("我们一起去河边散步 ok\n") == "我们 一起 去 河边 散步 \u2582 ok \u2583"
    assert tokenizer.encode("我们一起") == tokenizer.sp_model.encode("我们 一起")


def test_tiny_vocab_reproducible(tmp_path):
    corpus = [os.path.join(REPO, 'mindformers', 'assets', 'corpus', f) for f in ('tiny_shakespeare.txt',
                                                                                 'tiny_chinese.txt')]
    text = tmp_path / 'corpus.txt'
    run = lambda *args: subprocess.run([sys.executable, '-m', *map(str, args)], cwd=REPO, check=True,
                                       capture_output=True)
    run('mindformers.models.pangualpha.prepare_corpus', '--input', *corpus, '--output', text)
    run('mindformers.tools.train_sentencepiece', '--vocab_size', 510, '--character_coverage', 0.998, '--input',
        text, '--output_dir', tmp_path)
    with open(tmp_path / 'tokenizer.model', 'rb') as f, \
            open(os.path.join(REPO, 'mindformers', 'assets', 'pangualpha_tiny', 'vocab.model'), 'rb') as g:
        assert f.read() == g.read()


def test_half_precision_padded_batch_and_cache_stay_finite(model):
    """float16 compute and softmax (MindFormers' Ascend settings): padded rows and the cache give the float32
    answers to half precision (no -inf / NaN from the -1e9 masks)."""
    half = PanguAlphaHeadModel(our_config(compute_dtype='float16', softmax_compute_type='float16'))
    half.set_train(False)
    ms.load_param_into_net(half, {p.name: ms.Parameter(p.data.copy(), name=p.name) for p in model.get_parameters()})
    ids = random_ids(2, 9, seed=6)
    mask = np.ones_like(ids)
    mask[1, :3] = 0
    expected = model(ms.Tensor(ids), ms.Tensor(mask)).asnumpy()
    logits = half(ms.Tensor(ids), ms.Tensor(mask)).asnumpy()
    tolerance = 2e-2 * np.abs(expected).max()
    assert np.abs(logits - expected)[mask.astype(bool)].max() < tolerance
    session = DecodingSession(half, 2)
    steps = [session.prefill([0, 1], ids[:, :6], mask[:, :6])] + [session.decode(ids[:, c]) for c in range(6, 9)]
    for step, got in enumerate(steps):
        assert np.abs(got - expected[:, 5 + step]).max() < tolerance, step
