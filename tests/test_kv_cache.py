"""KV-cache decoding: equal to full recomputation and to HuggingFace on left-padded batches, compiled once."""
import numpy as np
import pytest
import mindspore as ms
import torch
from transformers import GPT2Config as HFConfig, GPT2LMHeadModel as HFModel

from mindformers import GPT2LMHeadModel
from mindformers.models.gpt2.convert_gpt2 import config_from_hf, convert_hf_to_ms
from mindformers.modules.kv_cache import CacheState, prefill_bucket

VOCAB, SEQ = 96, 128


@pytest.fixture(scope='module')
def models():
    torch.manual_seed(0)
    hf = HFModel(HFConfig(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=SEQ, resid_pdrop=0,
                          embd_pdrop=0, attn_pdrop=0, initializer_range=0.2)).eval()
    config = config_from_hf(hf.config.to_dict())
    ours = GPT2LMHeadModel(config)
    weights = convert_hf_to_ms({k: v.numpy() for k, v in hf.state_dict().items()}, config)
    ms.load_param_into_net(ours, {k: ms.Parameter(ms.Tensor(v), name=k) for k, v in weights.items()})
    ours.set_train(False)
    return hf, ours


def left_padded(lengths, seed=0):
    rng = np.random.default_rng(seed)
    width = max(lengths)
    ids = np.zeros((len(lengths), width), np.int32)
    mask = np.zeros_like(ids)
    for row, length in enumerate(lengths):
        ids[row, width - length:] = rng.integers(1, VOCAB, length)
        mask[row, width - length:] = 1
    return ids, mask


def test_padded_forward_matches_huggingface(models):
    hf, ours = models
    ids, mask = left_padded([3, 11, 7])
    logits = ours(ms.Tensor(ids), ms.Tensor(mask)).asnumpy()
    with torch.no_grad():
        reference = hf(input_ids=torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask),
                       position_ids=torch.tensor(np.maximum(mask.cumsum(1) - 1, 0), dtype=torch.long)).logits
    np.testing.assert_allclose(logits[mask == 1], reference.numpy()[mask == 1], atol=1e-4)


def test_cached_greedy_equals_full_recompute_and_huggingface(models):
    hf, ours = models
    ids, mask = left_padded([5, 12, 9, 1], seed=1)
    session = ours.incremental_session(4)
    logits = session.prefill(ids, mask)
    tokens, sequence, full_mask = [], ids, mask
    for step in range(40):
        if step in (0, 1, 17, 39):  # each new length compiles the full model once: check a few
            full = ours(ms.Tensor(sequence), ms.Tensor(full_mask)).asnumpy()[:, -1]
            np.testing.assert_allclose(logits, full, atol=1e-4, err_msg=f"step {step}")
        token = logits.argmax(-1).astype(np.int32)
        tokens.append(token)
        sequence = np.concatenate([sequence, token[:, None]], axis=1)
        full_mask = np.concatenate([full_mask, np.ones((4, 1), np.int32)], axis=1)
        logits = session.decode(token)
    with torch.no_grad():
        reference = hf.generate(torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask),
                                max_new_tokens=40, do_sample=False, pad_token_id=0)
    assert np.stack(tokens, 1).tolist() == reference[:, ids.shape[1]:].tolist()


def test_decode_compiles_once_over_100_tokens(models):
    _, ours = models
    session = ours.incremental_session(2)
    ids, mask = left_padded([4, 6], seed=2)
    token = session.prefill(ids, mask).argmax(-1)
    token = session.decode(token).argmax(-1)
    compiled = len(session._decode.compile_cache)
    for _ in range(99):
        token = session.decode(token).argmax(-1)
    assert compiled == 1 and len(session._decode.compile_cache) == 1
    assert len(session._prefill.compile_cache) == 1  # one bucket used
    session.prefill(*left_padded([3, 5], seed=3))  # same bucket (16): no new prefill graph
    assert len(session._prefill.compile_cache) == 1


def test_beam_reorder_moves_cache_rows(models):
    _, ours = models
    ids, mask = left_padded([6, 6], seed=4)
    session = ours.incremental_session(2)
    session.prefill(ids, mask)
    session.reorder([1, 1])  # both rows now continue the second prompt
    logits = session.decode(np.array([7, 7]))
    single = ours.incremental_session(2)
    single.prefill(ids[[1, 1]], mask[[1, 1]])
    np.testing.assert_allclose(logits, single.decode(np.array([7, 7])), atol=1e-6)


def test_cache_state_bookkeeping():
    state = CacheState(batch=2, kv_heads=3, max_length=8)
    positions, mask, extra = state.start(np.array([[0, 1, 1], [1, 1, 1]]), bucket=4)
    assert extra == 1 and positions.tolist() == [[0, 0, 0, 1], [0, 0, 1, 2]]
    assert mask.shape == (2, 1, 4, 4) and mask[0, 0, 3].tolist() == [-1e9, -1e9, 0, 0]
    positions, mask, indices = state.step()
    assert positions.tolist() == [[2], [3]] and indices.shape == (2, 3, 1, 3) and (indices[..., 2] == 4).all()
    assert mask[0, 0, 0].tolist() == [-1e9, -1e9, 0, 0, 0, -1e9, -1e9, -1e9]
    assert prefill_bucket(5, 128) == 16 and prefill_bucket(100, 64) == 64 and prefill_bucket(17, 2048) == 32
    for _ in range(3):
        state.step()
    with pytest.raises(ValueError, match='cache of 8 positions is full'):
        state.step()
