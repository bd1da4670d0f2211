"""generate(): token-identical to HuggingFace (greedy, padded batches, beam search, repetition penalty), with and
without the KV cache; sampling reproducible; every bad option refused with a clear message."""
import numpy as np
import pytest
import mindspore as ms
import torch
from transformers import GPT2Config as HFConfig, GPT2LMHeadModel as HFModel

from mindformers import GPT2LMHeadModel
from mindformers.generation import GenerationConfig
from mindformers.models.gpt2.convert_gpt2 import config_from_hf, convert_hf_to_ms

VOCAB, SEQ, EOS = 64, 128, 7


@pytest.fixture(scope='module')
def models():
    torch.manual_seed(0)
    hf = HFModel(HFConfig(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=SEQ, resid_pdrop=0,
                          embd_pdrop=0, attn_pdrop=0, initializer_range=0.3, eos_token_id=EOS, bos_token_id=EOS,
                          pad_token_id=0)).eval()
    config = config_from_hf(hf.config.to_dict())
    config.eos_token_id, config.pad_token_id = EOS, 0
    ours = GPT2LMHeadModel(config)
    weights = convert_hf_to_ms({k: v.numpy() for k, v in hf.state_dict().items()}, config)
    ms.load_param_into_net(ours, {k: ms.Parameter(ms.Tensor(v), name=k) for k, v in weights.items()})
    return hf, ours


def prompts(lengths, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(8, VOCAB, n).tolist() for n in lengths]


def hf_generate(hf, rows, eos=EOS, **kwargs):
    """HF generate on left-padded rows; each result stripped of padding and cut after the first new EOS."""
    width = max(map(len, rows))
    ids = torch.tensor([[0] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    with torch.no_grad():
        out = hf.generate(input_ids=ids, attention_mask=mask, pad_token_id=0, eos_token_id=eos, **kwargs).tolist()
    results = []
    for row, prompt in zip(out, rows):
        new = row[width:]
        if eos in new:
            new = new[:new.index(eos) + 1]
        results.append(prompt + new)
    return results


@pytest.mark.parametrize('use_past', [True, False])
@pytest.mark.parametrize('lengths', [[9], [5, 12, 1, 8]])
def test_greedy_matches_huggingface(models, use_past, lengths):
    hf, ours = models
    rows = prompts(lengths, seed=len(lengths))
    expected = hf_generate(hf, rows, max_new_tokens=64, do_sample=False)
    assert ours.generate(rows, max_new_tokens=64, do_sample=False, use_past=use_past) == expected


def test_rows_stop_at_their_own_eos_and_several_eos_ids(models):
    hf, ours = models
    rows = prompts([4, 10, 6], seed=3)
    free = ours.generate(rows, max_new_tokens=30, eos_token_id=[], use_past=True)
    stop_ids = [free[0][4 + 2], free[1][10 + 5]]  # tokens that rows 0 and 1 produce early
    stopped = ours.generate(rows, max_new_tokens=30, eos_token_id=stop_ids, use_past=True)
    for free_row, row, prompt in zip(free, stopped, rows):
        new = free_row[len(prompt):]
        first = min([new.index(t) for t in stop_ids if t in new], default=len(new) - 1)
        assert row == prompt + new[:first + 1]
    assert len(stopped[0]) <= 4 + 3 and len(stopped[1]) <= 10 + 6


@pytest.mark.parametrize('length_penalty, early_stopping', [(1.0, False), (0.5, True), (2.0, 'never'),
                                                            (-1.0, False), (1.0, True)])
def test_beam_search_matches_huggingface(models, length_penalty, early_stopping):
    hf, ours = models
    rows = prompts([6, 3], seed=5)
    # EOS = a token greedy decoding of row 0 produces a few steps in, so hypotheses finish at different lengths
    # and compete with running beams
    eos = ours.generate(rows[:1], max_new_tokens=5, eos_token_id=[], use_past=True)[0][-1]
    kwargs = dict(max_new_tokens=12, num_beams=4, length_penalty=length_penalty, early_stopping=early_stopping)
    expected = hf_generate(hf, rows, eos=eos, do_sample=False, **kwargs)
    if length_penalty <= 1.0:  # (a strong length penalty prefers the longer hypotheses that never ended)
        assert any(row[-1] == eos for row in expected)
    for use_past in (True, False):
        assert ours.generate(rows, use_past=use_past, eos_token_id=eos, **kwargs) == expected


def test_beam_search_without_eos_matches_huggingface(models):
    hf, ours = models
    rows = prompts([4, 9], seed=6)
    expected = hf_generate(hf, rows, eos=None, max_new_tokens=10, num_beams=3, do_sample=False)
    assert ours.generate(rows, max_new_tokens=10, num_beams=3, eos_token_id=[], use_past=True) == expected


def test_repetition_penalty_and_min_new_tokens_match_huggingface(models):
    hf, ours = models
    rows = prompts([7, 3], seed=11)
    for kwargs in (dict(repetition_penalty=1.7), dict(min_new_tokens=20, repetition_penalty=0.8)):
        expected = hf_generate(hf, rows, max_new_tokens=25, do_sample=False, **kwargs)
        assert ours.generate(rows, max_new_tokens=25, use_past=True, **kwargs) == expected


def test_min_new_tokens_suppresses_eos(models):
    _, ours = models
    rows = prompts([4], seed=3)
    eos = ours.generate(rows, max_new_tokens=1, eos_token_id=[], use_past=True)[0][-1]
    assert len(ours.generate(rows, max_new_tokens=10, eos_token_id=eos, use_past=True)[0]) == 5
    out = ours.generate(rows, max_new_tokens=10, min_new_tokens=6, eos_token_id=eos, use_past=True)[0]
    assert eos not in out[4:10] and len(out) >= 10


def test_sampling_is_reproducible_and_top_k_1_is_greedy(models):
    _, ours = models
    rows = prompts([5, 9], seed=2)
    kwargs = dict(max_new_tokens=20, do_sample=True, top_k=0, top_p=0.9, temperature=1.3, use_past=True)
    first = ours.generate(rows, seed=123, **kwargs)
    np.random.seed(0)  # global state must not matter
    assert ours.generate(rows, seed=123, **kwargs) == first
    assert ours.generate(rows, seed=124, **kwargs) != first
    greedy = ours.generate(rows, max_new_tokens=20, do_sample=False, use_past=True)
    assert ours.generate(rows, max_new_tokens=20, do_sample=True, top_k=1, seed=5, use_past=True) == greedy


def test_cached_and_recomputed_sampling_agree(models):
    _, ours = models
    rows = prompts([3, 6], seed=4)
    kwargs = dict(max_new_tokens=15, do_sample=True, top_k=10, seed=99)
    assert ours.generate(rows, use_past=True, **kwargs) == ours.generate(rows, use_past=False, **kwargs)


def test_generation_config_defaults_come_from_the_model_and_are_restored(models):
    _, ours = models
    config = GenerationConfig.from_model_config(ours.config)
    assert config.eos_token_id == EOS and config.top_k == ours.config.top_k
    ours.set_train(True)
    ours.generate(prompts([3]), max_new_tokens=2)
    assert ours.training
    ours.set_train(False)
    out = ours.generate(np.array(prompts([4])), generation_config=GenerationConfig(max_new_tokens=3, eos_token_id=[]))
    assert len(out[0]) == 7


def test_generation_config_round_trip(tmp_path):
    config = GenerationConfig(max_new_tokens=5, top_p=0.5, eos_token_id=[1, 2], early_stopping='never')
    config.save_pretrained(tmp_path)
    loaded = GenerationConfig.from_pretrained(tmp_path)
    assert loaded.to_dict() == config.to_dict()
    assert GenerationConfig(max_decode_length=33).max_length == 33


@pytest.mark.parametrize('kwargs, message', [
    (dict(top_p=0.0), 'top_p'), (dict(top_p=1.5), 'top_p'), (dict(temperature=0), 'temperature'),
    (dict(num_beams=0), 'num_beams'), (dict(top_k=-1), 'top_k'), (dict(repetition_penalty=0), 'repetition_penalty'),
    (dict(max_new_tokens=0), 'max_new_tokens'), (dict(early_stopping='soon'), 'early_stopping'),
    (dict(max_new_tokens=125), 'seq_length 128; use at most max_new_tokens=124'),
    (dict(max_length=500), 'exceeds the model'), (dict(num_beams=2, do_sample=True), 'beam search'),
])
def test_bad_options_are_refused(models, kwargs, message):
    _, ours = models
    with pytest.raises(ValueError, match=message):
        ours.generate(prompts([4]), **kwargs)


def test_bad_inputs_are_refused(models):
    _, ours = models
    with pytest.raises(TypeError, match='unknown generation option.*max_tokens'):
        ours.generate(prompts([4]), max_tokens=3)
    with pytest.raises(ValueError, match='prompt of 128 tokens leaves no room'):
        ours.generate([[9] * 128])
    with pytest.raises(ValueError, match='non-empty prompt'):
        ours.generate([[1, 2], []])
    with pytest.raises(ValueError, match='single prompt'):
        ours.generate(prompts([3, 4]), streamer=object(), max_new_tokens=2)


@pytest.mark.parametrize('rows, index, token, position', [
    ([[9, 10], [11, -1, 12]], 1, -1, 1),
    ([[9, VOCAB]], 0, VOCAB, 1),
    (np.array([[9, 10, 12], [13, 14, 70000]]), 1, 70000, 2),
])
def test_token_ids_outside_the_vocabulary_are_refused(models, rows, index, token, position):
    _, ours = models
    with pytest.raises(ValueError, match=rf"generate\(\): prompt {index} of input_ids has token id {token} at "
                                         rf"position {position}, outside the model's vocabulary \[0, {VOCAB}\)"):
        ours.generate(rows, max_new_tokens=2, use_past=True)
