"""Decoding sessions (KV cache with slots): equal to full recomputation and to HuggingFace on left-padded batches,
compiled once; requests started in free slots at different steps decode exactly as they do alone."""
import numpy as np
import pytest
import mindspore as ms
import torch
from transformers import GPT2Config as HFConfig, GPT2LMHeadModel as HFModel

from mindformers import GPT2LMHeadModel
from mindformers.models.gpt2.convert_gpt2 import config_from_hf, convert_hf_to_ms
from mindformers.generation.session import DecodingSession, SlotTable, prefill_bucket

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
    session = DecodingSession(ours, 4)
    logits = session.prefill(range(4), ids, mask)
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
    session = DecodingSession(ours, 2)
    ids, mask = left_padded([4, 6], seed=2)
    token = session.prefill([0, 1], ids, mask).argmax(-1)
    token = session.decode(token).argmax(-1)
    compiled = len(session._decode.compile_cache)
    for _ in range(99):
        token = session.decode(token).argmax(-1)
    assert compiled == 1 and len(session._decode.compile_cache) == 1
    assert len(session._prefill.compile_cache) == 1  # one bucket used
    session.prefill([0, 1], *left_padded([3, 5], seed=3))  # same bucket (16): no new prefill graph
    assert len(session._prefill.compile_cache) == 1


def test_beam_reorder_moves_cache_rows(models):
    _, ours = models
    ids, mask = left_padded([6, 6], seed=4)
    session = DecodingSession(ours, 2)
    session.prefill([0, 1], ids, mask)
    session.reorder([1, 1])  # both rows now continue the second prompt
    logits = session.decode(np.array([7, 7]))
    single = DecodingSession(ours, 2)
    single.prefill([0, 1], ids[[1, 1]], mask[[1, 1]])
    np.testing.assert_allclose(logits, single.decode(np.array([7, 7])), atol=1e-6)


def test_slot_table_bookkeeping():
    table = SlotTable(slots=3, kv_heads=2, max_length=8)
    positions, mask, extra = table.start(np.array([0, 2]), np.array([[0, 1, 1], [1, 1, 1]]), bucket=4)
    assert extra == 1 and positions.tolist() == [[0, 0, 0, 1], [0, 0, 1, 2]]
    assert mask.shape == (2, 1, 4, 4) and mask[0, 0, 3].tolist() == [-1e9, -1e9, 0, 0]
    assert table.free_slots() == [1]
    positions, mask, indices = table.step()
    assert positions.tolist() == [[2], [0], [3]] and indices.shape == (3, 2, 1, 3)
    assert indices[..., 2].reshape(3, 2).tolist() == [[4, 4], [0, 0], [4, 4]]  # the free slot writes its own row
    assert mask[0, 0, 0].tolist() == [-1e9, -1e9, 0, 0, 0, -1e9, -1e9, -1e9]
    table.start(np.array([1]), np.array([[1, 1]]), bucket=2)  # a new request joins while the others decode
    positions, mask, indices = table.step()
    assert positions.tolist() == [[3], [2], [4]] and indices[:, 0, 0, 2].tolist() == [5, 2, 5]
    assert mask[1, 0, 0].tolist() == [0, 0, 0, -1e9, -1e9, -1e9, -1e9, -1e9]
    table.free([0])
    assert table.free_slots() == [0] and table.step()[2][0, 0, 0, 2] == 0
    assert prefill_bucket(5, 128) == 16 and prefill_bucket(100, 64) == 64 and prefill_bucket(17, 2048) == 32
    table.step()  # slot 2 writes its last position (7)
    with pytest.raises(ValueError, match='slot 2 is full'):
        table.step()


def _alone(session, prompt, steps):
    """Greedy tokens of `prompt` decoded by itself, in `session` of one slot (its prefill starts the slot afresh)."""
    tokens = [int(session.prefill([0], [prompt]).argmax(-1)[0])]
    while len(tokens) < steps:
        tokens.append(int(session.decode([tokens[-1]]).argmax(-1)[0]))
    return tokens


def test_requests_joining_a_running_session_decode_as_they_do_alone(models):
    """Three prompts started at different steps in one 3-slot session (the second into a slot freed by a finished
    request) give exactly the tokens each gives alone, with no new compilation after the first of each shape."""
    _, ours = models
    rng = np.random.default_rng(7)
    prompts = [rng.integers(1, VOCAB, n).tolist() for n in (5, 12, 3, 9)]
    steps = {0: 30, 1: 20, 2: 25, 3: 8}
    single = DecodingSession(ours, 1)  # one for all four: a session compiles its own graphs
    expected = {r: _alone(single, prompts[r], steps[r]) for r in steps}
    session = DecodingSession(ours, 3)
    start = {0: 0, 3: 0, 1: 10, 2: 17}  # request -> the step at which it arrives
    slot_of, got, running = {}, {r: [] for r in steps}, []
    for step in range(60):
        for request in [r for r, at in start.items() if at == step]:
            slot = session.free_slots()[0]
            slot_of[request] = slot
            got[request].append(int(session.prefill([slot], [prompts[request]]).argmax(-1)[0]))
            running.append(request)
        if not running:
            break
        tokens = np.zeros(3, np.int32)
        for request in running:
            tokens[slot_of[request]] = got[request][-1]
        logits = session.decode(tokens)
        for request in list(running):
            if len(got[request]) == steps[request]:
                session.free([slot_of[request]])  # finished: its slot is free for the next request
                running.remove(request)
            else:
                got[request].append(int(logits[slot_of[request]].argmax()))
    assert got == expected
    assert slot_of[1] == slot_of[3]  # request 1 reused the slot request 3 left
    assert len(session._decode.compile_cache) == 1  # pylint: disable=protected-access
    assert len(session._prefill.compile_cache) == 1  # one graph for a single-slot prefill of bucket 16


def test_sessions_of_one_model_are_independent(models):
    """Two sessions over one model keep separate caches: interleaving their steps changes neither."""
    _, ours = models
    ids, mask = left_padded([6, 4], seed=8)
    first, second = DecodingSession(ours, 2), DecodingSession(ours, 1)
    a = [first.prefill([0, 1], ids, mask)]
    b = [second.prefill([0], ids[:1])]
    for token in (3, 9, 27):
        a.append(first.decode([token, token]))
        b.append(second.decode([token]))
    fresh = DecodingSession(ours, 2)
    expected = [fresh.prefill([0, 1], ids, mask)] + [fresh.decode([t, t]) for t in (3, 9, 27)]
    np.testing.assert_array_equal(np.stack(a), np.stack(expected))
    np.testing.assert_allclose(np.stack(b)[:, 0], np.stack(a)[:, 0], atol=1e-5)


def test_feed_reads_prompts_in_chunks_beside_decoding_slots_with_the_same_bits(models):
    """`feed`: a prompt read in chunks of any size, in steps shared with other slots' tokens and padded to any row
    count, gives the same bits as reading it whole alone, and matches HuggingFace; a prompt's chunks and decode
    steps continue it exactly; and the table refuses what it cannot do."""
    hf, ours = models
    rng = np.random.default_rng(9)
    prompt, other = rng.integers(1, VOCAB, 23).tolist(), rng.integers(1, VOCAB, 40).tolist()
    session = DecodingSession(ours, 3)
    assert session.feed_rows == 64
    session.open([1])
    whole = session.feed([1] * 23, prompt, 32)
    with torch.no_grad():
        expected = hf(torch.tensor([prompt])).logits[0].numpy()
    np.testing.assert_allclose(whole, expected, rtol=1e-4, atol=1e-4)
    session.open([0, 2])
    session.feed([2] * 6, other[:6], 16)  # slot 2 is somewhere else in its prompt
    first = session.feed([2] + [0] * 9, other[6:7] + prompt[:9], 16)
    second = session.feed([0] * 14 + [2] * 3, prompt[9:] + other[7:10], 64)
    np.testing.assert_array_equal(np.concatenate([first[1:], second[:14]]), whole)
    token = int(whole[-1].argmax())
    alone = session.feed([1], [token], 3)  # slot 1 continues its prompt (one decode row, padded)
    beside = session.feed([2, 0], [other[10], token], 3)
    np.testing.assert_array_equal(alone[0], beside[1])
    assert sorted(session._feed) == [3, 16, 32, 64]  # pylint: disable=protected-access
    session.feed([1] * 64, [1] * 64, 64)  # 88 of its 128 positions written
    with pytest.raises(ValueError, match='slot 1 is full'):
        session.feed([1] * 41, [1] * 41, 64)
    assert session.table.length[1] == 88  # a refused step changes nothing
    with pytest.raises(ValueError, match='at least one'):
        session.feed([1], [1], 65)
    session.free([1])
    with pytest.raises(ValueError, match='slot 1 is not open'):
        session.feed([1], [1])


def test_feed_rows_follow_the_kernels_and_the_family():
    """64 rows with the fp32 few-rows kernels, 16 with int8 weights (their kernel's few-rows limit; a row then
    keeps its bits beside any others), none for GLM (per-slot 2-D positions) or without the kernels."""
    from mindformers import AutoConfig, AutoModel
    from mindformers.generation.session import feed_rows
    from mindformers.quantization import quantize_model

    def tiny(name, **overrides):
        return AutoModel.from_config(AutoConfig.from_pretrained(name, num_layers=1, seq_length=32, **overrides))

    assert feed_rows(tiny('gpt2_tiny')) == 64
    int8 = quantize_model(tiny('llama_tiny'))
    assert feed_rows(int8) == 16
    session, rng = DecodingSession(int8, 2), np.random.default_rng(3)
    prompt = rng.integers(2, 300, 15).tolist()
    session.open([0, 1])
    alone = session.feed([0] * 15, prompt, 16)
    beside = session.feed([1] + [1] * 14 + [0], prompt + [7], 16)
    np.testing.assert_array_equal(alone, beside[:15])
    with pytest.raises(ValueError, match=r'rows in \[that count, 16\]'):
        session.feed([0], [1], 32)
    assert feed_rows(tiny('glm_tiny')) == 0
    assert feed_rows(tiny('gpt2_tiny', compute_dtype='float16')) == 0
    with pytest.raises(ValueError, match='cannot feed several tokens'):
        DecodingSession(tiny('glm_tiny'), 1).feed([0], [1])
