"""GPT-2 against HuggingFace transformers + PyTorch: logits, loss, gradients, greedy generation, weight conversion
both ways, checkpoint errors, shard strategies and recompute. Tiny random models, GRAPH_MODE (see conftest)."""
import json
import os

import numpy as np
import pytest
import torch
import transformers
import mindspore as ms

import convert_weight
from mindformers.core.parallel_config import ParallelConfig, RecomputeConfig
from mindformers.models.gpt2.convert_gpt2 import (ConversionError, convert_hf_to_ms, convert_pt_to_ms,
                                                  load_hf_weights, load_ms_weights, save_ms_weights)
from mindformers.models.gpt2.gpt2_config import GPT2Config
from mindformers.models.gpt2.modeling_gpt2 import GPT2LMHeadModel
from mindformers.tools.checkpoint import CheckpointError

VOCAB, HIDDEN, LAYERS, HEADS, SEQ = 96, 64, 2, 4, 32
EOS = 95  # also the pad id; kept out of the random inputs unless a test puts it there


def our_config(checkpoint='', **overrides):
    args = dict(vocab_size=VOCAB, hidden_size=HIDDEN, num_layers=LAYERS, num_heads=HEADS, seq_length=SEQ,
                embedding_dropout_prob=0.0, hidden_dropout_rate=0.0, attention_dropout_rate=0.0, eos_token_id=EOS,
                pad_token_id=EOS, bos_token_id=EOS, checkpoint_name_or_path=str(checkpoint))
    args.update(overrides)
    return GPT2Config(**args)


def random_ids(rows, cols, seed):
    return np.random.default_rng(seed).integers(0, EOS, (rows, cols)).astype(np.int32)


def hf_loss(hf_model, ids, labels=None):
    ids = torch.tensor(ids, dtype=torch.long)
    labels = ids if labels is None else torch.tensor(labels, dtype=torch.long)
    with torch.no_grad():
        return hf_model(ids, labels=labels).loss.item()


def hf_logits(hf_model, ids):
    with torch.no_grad():
        return hf_model(torch.tensor(ids, dtype=torch.long)).logits.numpy()


def ours(model, *inputs, train):
    model.set_train(train)
    return model(*(None if x is None else ms.Tensor(x) for x in inputs)).asnumpy()


@pytest.fixture(scope='module')
def hf(tmp_path_factory):
    """(HF directory with config.json + model.safetensors, the HF model) of a tiny random GPT-2."""
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=VOCAB, n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS, n_positions=SEQ,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=EOS,
                                     eos_token_id=EOS)
    model = transformers.GPT2LMHeadModel(config).eval()
    with torch.no_grad():  # LayerNorms start at 1/0 and biases at 0: move them so a dropped or swapped one shows
        for param in model.parameters():
            if param.dim() == 1:
                param.add_(0.2 * torch.randn_like(param))
    directory = tmp_path_factory.mktemp('hf_gpt2')
    model.save_pretrained(directory)
    assert os.path.isfile(directory / 'model.safetensors')
    return directory, model


@pytest.fixture(scope='module')
def checkpoint(hf, tmp_path_factory):
    path = tmp_path_factory.mktemp('ms_gpt2') / 'gpt2.ckpt'
    convert_pt_to_ms(str(hf[0]), str(path))
    return path


@pytest.fixture(scope='module')
def model(checkpoint):
    return GPT2LMHeadModel(our_config(checkpoint))


def test_eval_logits_match_hf(hf, model):
    for seq in (SEQ, 11):
        ids = random_ids(2, seq, seed=seq)
        logits = ours(model, ids, train=False)
        assert logits.shape == (2, seq, VOCAB) and logits.dtype == np.float32
        error = np.abs(logits - hf_logits(hf[1], ids)).max()
        assert error < 1e-4, f"seq {seq}"


def test_training_loss_matches_hf(hf, model):
    ids = random_ids(2, SEQ, seed=1)  # S + 1 = SEQ tokens: HF sees the same SEQ tokens and shifts its labels
    loss, expected = ours(model, ids, train=True), hf_loss(hf[1], ids)
    assert abs(loss - expected) < 1e-5
    full = random_ids(2, SEQ + 1, seed=2)  # S = SEQ, one token more than HF's n_positions: score HF's logits
    logits = torch.tensor(hf_logits(hf[1], full[:, :-1])).reshape(-1, VOCAB)
    targets = torch.tensor(full[:, 1:], dtype=torch.long).reshape(-1)
    loss, expected = ours(model, full, train=True), torch.nn.functional.cross_entropy(logits, targets).item()
    assert abs(loss - expected) < 1e-5


def test_loss_ignores_labels_and_masked_tail(hf, model):
    ids = random_ids(2, SEQ, seed=3)
    labels = ids.copy()
    labels[0, 4:9] = -100
    labels[1, 20] = -100
    loss, expected = ours(model, ids, None, labels, train=True), hf_loss(hf[1], ids, labels)
    assert abs(loss - expected) < 1e-5
    assert abs(loss - hf_loss(hf[1], ids)) > 1e-4  # the ignored labels did change something

    attention_mask = np.ones_like(ids)
    attention_mask[1, 23:] = 0
    masked = ids.copy()
    masked[attention_mask == 0] = -100
    loss, expected = ours(model, ids, attention_mask, train=True), hf_loss(hf[1], ids, masked)
    assert abs(loss - expected) < 1e-5


def test_pad_targets_count_only_when_pad_is_eos(hf, model, checkpoint):
    pad = 7
    ids = random_ids(2, SEQ, seed=4)
    ids[:, -6:] = pad
    ids[0, 10] = EOS
    # pad == eos: GPT-style padding with EOS; every target counts, EOS included
    with_eos_pad = ids.copy()
    with_eos_pad[:, -6:] = EOS
    loss, expected = ours(model, with_eos_pad, train=True), hf_loss(hf[1], with_eos_pad)
    assert abs(loss - expected) < 1e-5
    # pad != eos: targets equal to pad are left out, EOS still counts
    padded_model = GPT2LMHeadModel(our_config(checkpoint, pad_token_id=pad))
    labels = ids.copy()
    labels[ids == pad] = -100
    loss, expected = ours(padded_model, ids, train=True), hf_loss(hf[1], ids, labels)
    assert abs(loss - expected) < 1e-5


def _our_grads(model, ids, names):
    params = {p.name: p for p in model.trainable_params()}
    model.set_train(True)
    grad_fn = ms.value_and_grad(model, None, [params[n] for n in names])
    loss, grads = grad_fn(ms.Tensor(ids))
    return float(loss.asnumpy()), {n: g.asnumpy() for n, g in zip(names, grads)}


# our parameter -> (HF parameter, transposed)
GRAD_CHECKS = {'backbone.layers.0.attention.qkv_proj.weight': ('transformer.h.0.attn.c_attn.weight', True),
               'backbone.layers.0.attention.qkv_proj.bias': ('transformer.h.0.attn.c_attn.bias', False),
               'backbone.layers.0.attention.o_proj.bias': ('transformer.h.0.attn.c_proj.bias', False),
               'backbone.layers.1.mlp.fc_in.bias': ('transformer.h.1.mlp.c_fc.bias', False),
               'backbone.layers.1.mlp.fc_out.weight': ('transformer.h.1.mlp.c_proj.weight', True),
               'backbone.layers.1.mlp.fc_out.bias': ('transformer.h.1.mlp.c_proj.bias', False),
               'backbone.embed_tokens.weight': ('transformer.wte.weight', False),  # tied: embedding + head
               'backbone.embed_positions.weight': ('transformer.wpe.weight', False),
               'backbone.final_layernorm.weight': ('transformer.ln_f.weight', False)}


def test_gradients_match_torch(hf, model):
    ids = random_ids(2, SEQ, seed=5)
    hf_model = hf[1]
    hf_model.zero_grad()
    hf_model(torch.tensor(ids, dtype=torch.long), labels=torch.tensor(ids, dtype=torch.long)).loss.backward()
    hf_params = dict(hf_model.named_parameters())
    loss, grads = _our_grads(model, ids, list(GRAD_CHECKS))
    assert abs(loss - hf_loss(hf_model, ids)) < 1e-5
    for name, (hf_name, transposed) in GRAD_CHECKS.items():
        expected = hf_params[hf_name].grad.numpy()
        expected = expected.T if transposed else expected
        assert grads[name].shape == expected.shape, name
        assert np.abs(grads[name] - expected).max() <= 1e-4 * np.abs(expected).max(), name
    hf_model.zero_grad()


def test_greedy_generate_matches_hf(hf, model):
    prompt = [3, 17, 42, 8, 11, 60]
    new_tokens = 8
    produced = model.generate([prompt], max_new_tokens=new_tokens)[0]
    with torch.no_grad():
        expected = hf[1].generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                                  do_sample=False, max_new_tokens=new_tokens, eos_token_id=EOS,
                                  pad_token_id=EOS)[0].tolist()
    assert EOS not in expected[len(prompt):]  # so both ran the full 8 steps
    assert len(produced) == len(prompt) + new_tokens
    assert produced == expected


def test_bin_input_converts_like_safetensors(hf, checkpoint, tmp_path):
    state_dict = dict(hf[1].state_dict())
    state_dict['transformer.h.0.attn.bias'] = torch.tril(torch.ones(1, 1, SEQ, SEQ))  # older files' mask buffer
    torch.save(state_dict, tmp_path / 'pytorch_model.bin')
    from_bin = load_hf_weights(str(tmp_path))  # the directory resolves to pytorch_model.bin
    from_safetensors = load_hf_weights(str(hf[0]))
    assert set(from_bin) - {'lm_head.weight', 'transformer.h.0.attn.bias'} == set(from_safetensors) - {'lm_head.weight'}
    convert_pt_to_ms(str(tmp_path / 'pytorch_model.bin'), str(tmp_path / 'from_bin.ckpt'))
    expected = load_ms_weights(str(checkpoint))
    converted = load_ms_weights(str(tmp_path / 'from_bin.ckpt'))
    assert set(converted) == set(expected)
    for name, value in expected.items():
        np.testing.assert_array_equal(converted[name], value, err_msg=name)


def test_reverse_conversion_loads_in_transformers(hf, model, checkpoint, tmp_path):
    our_config().save_pretrained(tmp_path / 'config')  # num_heads is not in the weights: give it
    out = tmp_path / 'hf_back'
    assert convert_weight.main(['--model', 'gpt2', '--reversed', '--input_path', str(checkpoint), '--output_path',
                                str(out), '--config', str(tmp_path / 'config' / 'config.json')]) == 0
    assert sorted(os.listdir(out)) == ['config.json', 'model.safetensors']
    with open(out / 'config.json', encoding='utf-8') as f:
        written = json.load(f)
    assert written['model_type'] == 'gpt2' and written['architectures'] == ['GPT2LMHeadModel']
    assert (written['n_head'], written['n_layer'], written['n_embd']) == (HEADS, LAYERS, HIDDEN)
    back = transformers.GPT2LMHeadModel.from_pretrained(out).eval()
    ids = random_ids(2, SEQ, seed=6)
    logits = hf_logits(back, ids)
    assert np.abs(logits - ours(model, ids, train=False)).max() < 1e-5
    np.testing.assert_array_equal(logits, hf_logits(hf[1], ids))


@pytest.fixture(scope='module')
def hf_numpy(hf):
    return {name: t.numpy().copy() for name, t in hf[1].state_dict().items()}


@pytest.mark.parametrize('change, named', [
    (lambda sd: sd.pop('transformer.h.1.mlp.c_fc.bias'), r"missing transformer\.h\.1\.mlp\.c_fc\.bias"),
    (lambda sd: sd.update({'transformer.h.0.attn.q_norm.weight': np.ones(HIDDEN, np.float32)}),
     r"unexpected transformer\.h\.0\.attn\.q_norm\.weight"),
    (lambda sd: sd.update({'transformer.h.2.ln_1.weight': np.ones(HIDDEN, np.float32)}),
     r"unexpected transformer\.h\.2\.ln_1\.weight"),
    (lambda sd: sd.update({'transformer.h.0.attn.c_attn.weight': np.ones((HIDDEN, 2 * HIDDEN), np.float32)}),
     r"wrong shape transformer\.h\.0\.attn\.c_attn\.weight \(64, 128\) \(expected \(64, 192\)\)"),
])
def test_conversion_errors_name_the_tensor(hf_numpy, change, named):
    state_dict = dict(hf_numpy)
    change(state_dict)
    with pytest.raises(ConversionError, match=named):
        convert_hf_to_ms(state_dict, our_config())


def test_untied_head_is_refused(hf_numpy):
    state_dict = dict(hf_numpy, **{'lm_head.weight': hf_numpy['transformer.wte.weight'] + 1})
    with pytest.raises(ConversionError, match='lm_head.weight'):
        convert_hf_to_ms(state_dict, our_config())


def test_load_checkpoint_names_missing_parameter(checkpoint, tmp_path):
    weights = load_ms_weights(str(checkpoint))
    del weights['backbone.layers.1.attention.o_proj.bias']
    save_ms_weights(weights, str(tmp_path / 'partial.ckpt'))
    with pytest.raises(CheckpointError, match=r"missing backbone\.layers\.1\.attention\.o_proj\.bias"):
        GPT2LMHeadModel(our_config(tmp_path / 'partial.ckpt'))


def _strategy(prim):
    return prim.attrs.get('in_strategy')


@pytest.mark.parametrize('vocab_emb_dp', [True, False])
def test_shard_strategies(vocab_emb_dp):
    dp, mp = 2, 2
    net = GPT2LMHeadModel(our_config(parallel_config=ParallelConfig(data_parallel=dp, model_parallel=mp,
                                                                    vocab_emb_dp=vocab_emb_dp)))
    block = net.backbone.layers[0]
    attention, mlp = block.attention, block.mlp
    column, row = ((dp, 1), (mp, 1)), ((dp, mp), (1, mp))
    assert _strategy(attention.qkv_proj.matmul) == column  # q | k | v heads split mp ways
    assert _strategy(attention.o_proj.matmul) == row
    assert _strategy(mlp.fc_in.matmul) == column
    assert _strategy(mlp.fc_out.matmul) == row
    assert _strategy(attention.qkv_proj.bias_add.bias_add) == ((dp, mp), (mp,))
    assert _strategy(attention.o_proj.bias_add.bias_add) == ((dp, 1), (1,))
    assert _strategy(attention.core.scores_matmul) == ((dp, mp, 1, 1), (dp, mp, 1, 1))
    assert _strategy(attention.core.softmax) == ((dp, mp, 1, 1),)
    assert _strategy(block.input_layernorm.norm) == ((dp, 1, 1), (1,), (1,))
    embedding = ((1, 1), (dp, 1)) if vocab_emb_dp else ((mp, 1), (1, 1))  # (table, ids)
    assert _strategy(net.backbone.embed_tokens.gather) == embedding
    assert _strategy(net.lm_head.matmul) == (((dp, 1), (1, 1)) if vocab_emb_dp else ((dp, 1), (mp, 1)))


def test_recompute_marks_blocks_and_keeps_loss_and_gradients(model, checkpoint):
    recomputed = GPT2LMHeadModel(our_config(checkpoint, parallel_config=ParallelConfig(
        recompute=RecomputeConfig(recompute=True))))
    # what MindSpore's Cell.recompute() leaves on a cell
    for block in recomputed.backbone.layers:
        assert block._has_config_recompute and block._scope.startswith('recompute_')  # pylint: disable=protected-access
    for block in model.backbone.layers:
        assert not block._has_config_recompute  # pylint: disable=protected-access
    ids = random_ids(2, SEQ, seed=7)
    names = list(GRAD_CHECKS)
    loss, grads = _our_grads(model, ids, names)
    loss_rc, grads_rc = _our_grads(recomputed, ids, names)
    assert abs(loss - loss_rc) < 1e-6
    for name in names:
        assert np.abs(grads[name] - grads_rc[name]).max() <= 1e-6 * max(np.abs(grads[name]).max(), 1e-12), name
