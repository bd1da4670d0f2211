"""GLM v1 (ChatGLM-6B) against an independent NumPy reference written from specs/models.md section 5 (there is no
transformers reference): the alpha-scaled LN-output residual, per-head interleaved query_key_value, 2-D RoPE with
float16-rounded frequencies, layer-scaled softmax with the -10000 mask, the prefix-LM mask and 2-D positions read
off `[gMASK]` / `[MASK]` / `<sop>`. Also: the KV cache against recomputation, left padding, float16, config
errors, save/load, chat with the tiny tokenizer, the shipped configs."""
import math
import os

import numpy as np
import pytest
import mindspore as ms

from mindformers.generation.session import session_for
from mindformers.models.auto import AutoConfig, AutoModel
from mindformers.models.glm import GLMChatModel, GLMConfig, GLMForPreTraining
from helpers.glm_reference import (BOS, EOS, GMASK, HEAD, LAYERS, MASK, PAD, SEQ, SQRT56, VOCAB, load_weights,
                                   our_logits, prompt_batch, random_weights, reference_layout, reference_logits,
                                   rotate_2d, tiny_config)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---------------------------------------------------------------------------------------------------------------
# fixtures


@pytest.fixture(scope='module')
def weights():
    return random_weights()


@pytest.fixture(scope='module')
def model(weights):
    return load_weights(GLMForPreTraining(tiny_config(alpha=SQRT56)), weights)


def max_diff(label, got, expected):
    diff = float(np.abs(got - expected).max())
    print(f"{label}: max |dlogits| {diff:.2e}")
    return diff


# ---------------------------------------------------------------------------------------------------------------
# the forward pass


@pytest.mark.parametrize('alpha', [SQRT56, None], ids=['alpha_sqrt56', 'alpha_default'])
def test_logits_match_the_numpy_reference(weights, model, alpha):
    net = model if alpha is not None else load_weights(GLMForPreTraining(tiny_config()), weights)
    expected_alpha = SQRT56 if alpha is not None else math.sqrt(2 * LAYERS)
    assert net.config.residual_alpha == pytest.approx(expected_alpha)
    ids = prompt_batch()
    got = our_logits(net, ids)
    assert got.shape == (3, 14, VOCAB)
    assert max_diff(f'alpha {alpha}', got, reference_logits(weights, ids, alpha=expected_alpha)) < 1e-4


def test_prefix_mask_and_2d_positions_matter(weights, model):
    """The reference with a plain causal mask, 1-D positions or the default alpha is far from the model: each of
    these is really exercised (the plain-text row is unaffected by the first two)."""
    ids = prompt_batch()
    got = our_logits(model, ids)
    for label, variant in (('causal mask', dict(prefix=False)), ('1-D positions', dict(two_d=False)),
                           ('alpha sqrt(2L)', dict(alpha=math.sqrt(2 * LAYERS)))):
        wrong = reference_logits(weights, ids, **variant)
        assert max_diff(label, got[:2], wrong[:2]) > 1e-3, label
    # the plain-text row is causal with positions (0.., 0): a causal 1-D reference agrees there
    plain = reference_logits(weights, ids[2:], prefix=False, two_d=False)
    assert max_diff('plain row', got[2:], plain) < 1e-4


def test_2d_rotary_uses_float16_rounded_frequencies():
    """The shared 2-D RoPE block against the reference rotation, at positions where rounding the frequencies to
    float16 (as the published model stores them) moves the result."""
    from mindformers.modules.rotary import Rotary2DEmbedding
    rotary = Rotary2DEmbedding(HEAD, SEQ + 1)
    positions = np.array([[[3, 40, 64, 64], [0, 1, 17, 64]]], np.int32)  # [1, 2, 4]
    x = np.random.default_rng(5).standard_normal((1, 4, 2, HEAD)).astype(np.float32)
    cos, sin = rotary.tables(ms.Tensor(positions))
    got = rotary.apply(ms.Tensor(x), cos, sin).asnumpy()[0]
    assert max_diff('2-D RoPE', got, rotate_2d(x[0].astype(np.float64), positions[0])) < 1e-5
    assert max_diff('unrounded', got, rotate_2d(x[0].astype(np.float64), positions[0], False)) > 1e-4


def test_left_padding_and_explicit_position_ids(weights, model):
    ids = prompt_batch()[:2]
    padded = np.full((2, 18), PAD, np.int32)
    mask = np.zeros_like(padded)
    padded[0, 4:], mask[0, 4:] = ids[0], 1
    padded[1, 7:], mask[1, 7:] = ids[1, :11], 1
    got = our_logits(model, padded, mask)
    expected = reference_logits(weights, padded, mask)
    assert max_diff('left padded', got[mask.astype(bool)], expected[mask.astype(bool)]) < 1e-4
    alone = our_logits(model, ids[1:, :11])
    assert max_diff('padded row alone', got[1, 7:], alone[0]) < 1e-4
    # explicit position_ids replace the derived ones: the derived ones give the same logits, others differ
    positions = np.stack([reference_layout(row, np.ones(len(row), bool))[0] for row in ids])
    assert max_diff('explicit positions', our_logits(model, ids, position_ids=positions), our_logits(model, ids)) \
        < 1e-5
    shifted = positions.copy()
    shifted[:, 1] = 0
    assert max_diff('other positions', our_logits(model, ids, position_ids=shifted), our_logits(model, ids)) > 1e-3


def test_training_loss_is_the_masked_next_token_cross_entropy(weights, model):
    ids = np.concatenate([prompt_batch()[:2], np.full((2, 1), EOS, np.int32)], axis=1)  # [2, 15]
    labels = ids.copy()
    labels[:, :9] = -100  # the context is not trained (ADGEN style)
    labels[1, 13:] = PAD  # pad targets are left out too
    model.set_train(True)
    try:
        loss = float(model(ms.Tensor(ids), None, ms.Tensor(labels)).asnumpy())
    finally:
        model.set_train(False)
    logits = reference_logits(weights, ids[:, :-1]).reshape(-1, VOCAB)
    targets = labels[:, 1:].reshape(-1)
    keep = (targets != -100) & (targets != PAD)
    logp = logits - logits.max(-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    expected = -logp[np.arange(len(targets))[keep], targets[keep]].mean()
    assert abs(loss - expected) < 1e-4, (loss, expected)


# ---------------------------------------------------------------------------------------------------------------
# generation


def test_kv_cache_logits_follow_the_full_forward(model):
    """Prefill + single-token decode steps give the logits of the full forward at each step: the 2-D positions
    continue (row 0 at the blank, row 1 counting) and the prefix stays visible."""
    ids = prompt_batch()[:2]
    mask = np.ones_like(ids)
    mask[1, :2] = 0  # a left-padded row whose <sop> sits further left
    ids[1, :2] = PAD
    session = session_for(model, 2)  # generate()'s own: the greedy test below reuses its compiled graphs
    steps = [session.prefill([0, 1], ids[:, :10], mask[:, :10])]
    for column in range(10, 14):
        steps.append(session.decode(ids[:, column]))
    full = our_logits(model, ids, mask)
    for step, got in enumerate(steps):
        assert max_diff(f'cache step {step}', got, full[:, 9 + step]) < 1e-4


def test_greedy_with_cache_equals_recomputation_and_padded_rows_equal_rows_alone(model):
    rng = np.random.default_rng(3)
    prompts = [rng.integers(5, 1000, 9).tolist() + [GMASK, BOS], rng.integers(5, 1000, 4).tolist() + [GMASK, BOS]]
    kwargs = dict(max_new_tokens=10, do_sample=False, eos_token_id=[])
    cached = model.generate(prompts, use_past=True, **kwargs)
    full = model.generate(prompts, use_past=False, **kwargs)
    alone = [model.generate([p], use_past=True, **kwargs)[0] for p in prompts]
    assert cached == full == alone
    assert len({tuple(row[-10:]) for row in cached}) == 2  # not a degenerate constant continuation


def test_float16_forward_stays_finite_and_cache_matches_recomputation(weights):
    half = load_weights(GLMForPreTraining(tiny_config(alpha=SQRT56, compute_dtype='float16',
                                                      softmax_compute_type='float16', rotary_dtype='float16')),
                        weights)
    ids = prompt_batch()[:2]
    mask = np.ones_like(ids)
    mask[1, :3], ids[1, :3] = 0, PAD
    got = our_logits(half, ids, mask)
    assert np.isfinite(got[mask.astype(bool)]).all()
    expected = reference_logits(weights, ids, mask)
    assert max_diff('float16', got[mask.astype(bool)], expected[mask.astype(bool)]) < 2e-2  # close, not equal
    prompts = [ids[0, :10].tolist(), ids[1, 3:10].tolist()]
    kwargs = dict(max_new_tokens=6, do_sample=False, eos_token_id=[])
    assert half.generate(prompts, use_past=True, **kwargs) == half.generate(prompts, use_past=False, **kwargs)


# ---------------------------------------------------------------------------------------------------------------
# config, registration, save / load


@pytest.mark.parametrize('kwargs, message', [
    (dict(hidden_size=66), r'GLMConfig\.hidden_size \(66\) must be divisible by num_heads'),
    (dict(hidden_size_per_attention_head=18), r'head size \(18\) must be divisible by 4'),
    (dict(alpha=0), r'GLMConfig\.alpha must be a positive number'),
    (dict(alpha='7'), r'GLMConfig\.alpha must be a positive number'),
    (dict(position_encoding_2d=False), r'GLMConfig\.position_encoding_2d=False is not supported'),
    (dict(layernorm_order='pre'), r"GLMConfig\.layernorm_order='pre' is not supported"),
    (dict(activation_func='swish'), r'GLMConfig\.activation_func: unsupported activation'),
    (dict(gmask_token_id=130001), r'GLMConfig\.gmask_token_id must be a token id in \[0, vocab_size=1024\)'),
    (dict(num_layers=0), r'GLMConfig\.num_layers must be a positive integer'),
    (dict(hidden_dropout_rate=1.0), r'GLMConfig\.hidden_dropout_rate must be in \[0, 1\)'),
    (dict(compute_dtype='float64'), r'GLMConfig\.compute_dtype: unsupported dtype'),
    (dict(parallel_config={'model_parallel': 3}), r'GLMConfig\.num_heads \(4\) must be divisible by'),
])
def test_config_errors_name_the_field(kwargs, message):
    with pytest.raises(ValueError, match=message):
        tiny_config(**kwargs)


def test_shipped_configs_resolve():
    big = AutoConfig.from_pretrained('glm_6b')
    assert isinstance(big, GLMConfig)
    assert (big.vocab_size, big.hidden_size, big.num_layers, big.num_heads, big.inner_hidden_size, big.head_size,
            big.seq_length, big.bos_token_id, big.eos_token_id, big.mask_token_id, big.gmask_token_id,
            big.pad_token_id) == (130528, 4096, 28, 32, 16384, 128, 512, 130004, 130005, 130000, 130001, 3)
    assert big.residual_alpha == pytest.approx(SQRT56)
    chat = AutoConfig.from_pretrained('glm_6b_chat')
    assert chat.residual_alpha == pytest.approx(SQRT56) and chat.use_past
    small = dict(num_layers=1, hidden_size=64, num_heads=4, inner_hidden_size=128, vocab_size=1024,
                 bos_token_id=BOS, eos_token_id=EOS, mask_token_id=MASK, gmask_token_id=GMASK)
    assert type(AutoModel.from_config('glm_6b_chat', **small)) is GLMChatModel
    assert type(AutoModel.from_config('glm_6b', **small)) is GLMForPreTraining
    tiny = AutoConfig.from_pretrained('glm_tiny')
    assert (tiny.vocab_size, tiny.bos_token_id, tiny.eos_token_id, tiny.mask_token_id, tiny.gmask_token_id,
            tiny.pad_token_id) == (1024, BOS, EOS, MASK, GMASK, PAD)
    assert tiny.residual_alpha == pytest.approx(math.sqrt(2 * tiny.num_layers))


def test_save_pretrained_round_trip(model, tmp_path):
    model.save_pretrained(tmp_path)
    loaded = AutoModel.from_pretrained(str(tmp_path))
    assert type(loaded) is GLMForPreTraining and loaded.config.residual_alpha == pytest.approx(SQRT56)
    loaded.set_train(False)
    ids = prompt_batch()
    assert max_diff('reloaded', our_logits(loaded, ids), our_logits(model, ids)) == 0.0


def test_chat_with_the_tiny_tokenizer(weights):
    from mindformers.models.glm import ChatGLMTokenizer
    tokenizer = ChatGLMTokenizer(os.path.join(REPO, 'mindformers', 'assets', 'glm_tiny', 'ice_text.model'))
    assert (tokenizer.gmask_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id) == (GMASK, BOS, EOS)
    chat = load_weights(GLMChatModel(tiny_config(alpha=SQRT56, use_past=True)), weights)
    history = [('你好', '你好！')]
    kwargs = dict(max_new_tokens=6, do_sample=False, eos_token_id=[])
    response, new_history = chat.chat(tokenizer, 'What news?', history, **kwargs)
    assert new_history == history + [('What news?', response)]
    prompt = tokenizer.encode(tokenizer.build_prompt('What news?', history))
    assert prompt[-2:] == [GMASK, BOS]
    expected = chat.generate([prompt], **kwargs)[0][len(prompt):]
    assert response == tokenizer.decode(expected, skip_special_tokens=True).strip()
    streamed = list(chat.stream_chat(tokenizer, 'What news?', history, **kwargs))
    assert streamed[-1] == (response, new_history)
    assert all(response.startswith(partial) for partial, _ in streamed)
