"""LLaMA and ChatGLM2 models against HuggingFace references built with the same random weights (fp32, CPU):
`LlamaForCausalLM` (MHA and GQA) and `GlmForCausalLM` configured as ChatGLM2 (the spec's exact oracle)."""
import numpy as np
import pytest
import torch
import mindspore as ms
import transformers

from mindformers.generation.session import session_for
from mindformers.models.auto import AutoConfig
from mindformers.models.glm2 import ChatGLM2Config, ChatGLM2ForConditionalGeneration
from mindformers.models.llama import LlamaConfig, LlamaForCausalLM
from mindformers.models.llama.llama_config import llama_ffn_size
from mindformers.modules.rotary import rope_frequencies

VOCAB, HIDDEN, FFN, LAYERS, SEQ = 128, 64, 96, 2, 64


def _hf_llama(kv_heads, **extra):
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=FFN,
                                      num_hidden_layers=LAYERS, num_attention_heads=4, num_key_value_heads=kv_heads,
                                      max_position_embeddings=SEQ, rms_norm_eps=1e-5, **extra)
    return transformers.LlamaForCausalLM(config).eval()


def _hf_glm2():
    config = transformers.GlmConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=FFN,
                                    num_hidden_layers=LAYERS, num_attention_heads=4, num_key_value_heads=2,
                                    head_dim=16, max_position_embeddings=SEQ, rms_norm_eps=1e-5, attention_bias=True,
                                    tie_word_embeddings=False, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                                    rope_parameters={'rope_type': 'default', 'rope_theta': 10000.0,
                                                     'partial_rotary_factor': 0.5})
    model = transformers.GlmForCausalLM(config).eval()
    with torch.no_grad():  # HF starts biases at zero: make them count
        for name, param in model.named_parameters():
            if name.endswith('bias'):
                param.normal_(0, 0.1)
    return model


def _ours_from(hf_model, ours):
    """Copy HF weights into our model: names are equal except GLM's fused gate_up_proj ([gate; up] rows)."""
    state = {}
    for name, value in hf_model.state_dict().items():
        value = value.numpy()
        if 'gate_up_proj' in name:
            gate, up = np.split(value, 2, axis=0)
            state[name.replace('gate_up_proj', 'gate_proj')], state[name.replace('gate_up_proj', 'up_proj')] = gate, up
        else:
            state[name] = value
    own = {p.name: p for p in ours.get_parameters()}
    assert set(own) == set(state), (sorted(set(own) ^ set(state)))
    for name, param in own.items():
        param.set_data(ms.Tensor(state[name]))
    ours.set_train(False)
    return ours


def _pair(kind):
    torch.manual_seed({'mha': 0, 'gqa': 1, 'glm2': 2}[kind])
    if kind == 'glm2':
        config = ChatGLM2Config(padded_vocab_size=VOCAB, hidden_size=HIDDEN, ffn_hidden_size=FFN, num_layers=LAYERS,
                                num_attention_heads=4, multi_query_group_num=2, kv_channels=16, seq_length=SEQ)
        hf_model = _hf_glm2()
        return hf_model, _ours_from(hf_model, ChatGLM2ForConditionalGeneration(config))
    kv_heads = 4 if kind == 'mha' else 2
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=FFN, num_layers=LAYERS, num_heads=4,
                         n_kv_heads=kv_heads, seq_length=SEQ)
    hf_model = _hf_llama(kv_heads)
    return hf_model, _ours_from(hf_model, LlamaForCausalLM(config))


@pytest.fixture(scope='module', params=['mha', 'gqa', 'glm2'])
def pair(request):
    return _pair(request.param)


def _ids(batch, length, seed=0):
    return np.random.RandomState(seed).randint(3, VOCAB, (batch, length))


def test_logits_match_huggingface_with_and_without_padding(pair):
    hf_model, ours = pair
    ids = _ids(2, 24)
    with torch.no_grad():
        reference = hf_model(torch.tensor(ids)).logits.numpy()
    assert np.abs(ours(ms.Tensor(ids, ms.int32)).asnumpy() - reference).max() < 1e-4
    mask = np.ones_like(ids)
    mask[1, :7] = 0  # left padding: positions count from the first real token, padded keys hidden
    with torch.no_grad():
        reference = hf_model(torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()
    got = ours(ms.Tensor(ids, ms.int32), ms.Tensor(mask, ms.int32)).asnumpy()
    assert np.abs(got - reference)[mask.astype(bool)].max() < 1e-4


def test_training_loss_and_gradients_match_huggingface(pair):
    hf_model, ours = pair
    ids = _ids(2, 17, seed=3)
    hf_model.zero_grad()
    loss = hf_model(torch.tensor(ids), labels=torch.tensor(ids)).loss
    loss.backward()
    reference = {n: p.grad.numpy() for n, p in hf_model.named_parameters()}
    ours.set_train(True)
    try:
        params = ours.trainable_params()
        grad_fn = ms.value_and_grad(ours, None, params)
        our_loss, grads = grad_fn(ms.Tensor(ids, ms.int32))
    finally:
        ours.set_train(False)
    assert abs(float(our_loss) - loss.item()) < 1e-5
    for param, grad in zip(params, grads):
        name = param.name
        if name in reference:
            expected = reference[name]
        else:  # GLM keeps gate_proj and up_proj fused as gate_up_proj = [gate; up]
            part = 'gate_proj' if name.endswith('gate_proj.weight') else 'up_proj'
            fused = reference[name.replace(part, 'gate_up_proj')]
            expected = np.split(fused, 2, axis=0)[0 if part == 'gate_proj' else 1]
        scale = max(np.abs(expected).max(), 1e-6)
        assert np.abs(grad.asnumpy() - expected).max() <= 1e-4 * scale, name


def test_greedy_with_and_without_cache_matches_huggingface_on_a_left_padded_batch(pair):
    hf_model, ours = pair
    prompts = [_ids(1, 9, seed=5)[0].tolist(), _ids(1, 4, seed=6)[0].tolist()]
    width = max(map(len, prompts))
    padded = np.array([[0] * (width - len(p)) + p for p in prompts])
    mask = np.array([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    expected = hf_model.generate(torch.tensor(padded), attention_mask=torch.tensor(mask), max_new_tokens=32,
                                 do_sample=False, pad_token_id=0, eos_token_id=None).numpy()[:, width:]
    outputs = ours.generate(prompts, max_new_tokens=32, use_past=True, do_sample=False, eos_token_id=[],
                            pad_token_id=0)
    for row, prompt in enumerate(prompts):
        assert list(outputs[row][:len(prompt)]) == prompt
        assert list(outputs[row][len(prompt):]) == expected[row].tolist()
    session = session_for(ours, 2)
    assert len(session._decode.compile_cache) == 1  # pylint: disable=protected-access
    recomputed = ours.generate(prompts, max_new_tokens=32, use_past=False, do_sample=False, eos_token_id=[],
                               pad_token_id=0)
    assert [list(row) for row in recomputed] == [list(row) for row in outputs]


def test_position_interpolation_matches_huggingface_linear_rope_scaling():
    torch.manual_seed(4)
    hf_model = _hf_llama(2, rope_parameters={'rope_type': 'linear', 'rope_theta': 10000.0, 'factor': 4.0})
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=FFN, num_layers=LAYERS, num_heads=4,
                         n_kv_heads=2, seq_length=SEQ, extend_method='PI', scaling_factor=4.0)
    ours = _ours_from(hf_model, LlamaForCausalLM(config))
    ids = _ids(1, 40, seed=8)
    with torch.no_grad():
        reference = hf_model(torch.tensor(ids)).logits.numpy()
    assert np.abs(ours(ms.Tensor(ids, ms.int32)).asnumpy() - reference).max() < 1e-4


def test_ntk_scaling_raises_the_rope_base():
    plain = rope_frequencies(128, 10000.0)
    ntk = rope_frequencies(128, 10000.0, 'NTK', 4.0)
    base = 10000.0 * 4.0 ** (128 / 126)
    np.testing.assert_allclose(ntk, 1.0 / base ** (np.arange(0, 128, 2) / 128), rtol=1e-5)
    assert ntk[0] == plain[0] and ntk[-1] < plain[-1]


def test_published_sizes_resolve_from_their_yaml():
    assert [llama_ffn_size(h, m, f) for h, m, f in ((4096, 256, None), (5120, 256, None), (8192, 256, None),
                                                     (8192, 4096, 1.3))] == [11008, 13824, 22016, 28672]
    expected = {'llama_7b': (4096, 32, 32, 11008, 2048, 1e-6), 'llama_13b': (5120, 40, 40, 13824, 2048, 1e-6),
                'llama_65b': (8192, 80, 64, 22016, 2048, 1e-6), 'llama2_7b': (4096, 32, 32, 11008, 4096, 1e-5),
                'llama2_13b': (5120, 40, 40, 13824, 4096, 1e-5), 'llama2_70b': (8192, 80, 8, 28672, 4096, 1e-5)}
    for name, (hidden, layers, kv_heads, ffn, seq, eps) in expected.items():
        config = AutoConfig.from_pretrained(name)
        assert (config.hidden_size, config.num_layers, config.kv_heads, config.ffn_size, config.seq_length,
                config.rms_norm_eps) == (hidden, layers, kv_heads, ffn, seq, eps), name
    glm2 = AutoConfig.from_pretrained('glm2_6b')
    assert isinstance(glm2, ChatGLM2Config)
    assert (glm2.vocab_size, glm2.num_heads, glm2.kv_heads, glm2.head_size, glm2.rotary_size, glm2.ffn_size) == \
        (65024, 32, 2, 128, 64, 13696)
    tiny = AutoConfig.from_pretrained('llama_tiny')
    assert tiny.kv_heads < tiny.num_heads  # the tiny config exercises grouped-query attention


@pytest.mark.parametrize('kwargs, message', [
    (dict(num_heads=4, n_kv_heads=3), 'multiple of n_kv_heads'),
    (dict(rotary_dim=7), 'rotary_dim'),
    (dict(extend_method='YaRN'), 'extend_method'),
    (dict(hidden_size=65, num_heads=4), 'divisible by num_heads'),
    (dict(use_flash_attention=True), 'use_flash_attention'),
    (dict(n_kv_heads=2, parallel_config={'model_parallel': 4}), r'n_kv_heads \(2\) must be divisible by parallel_config'),
    (dict(parallel_config={'model_parallel': 2, 'vocab_emb_dp': False}, vocab_size=127), 'vocab_size .127. must be'),
])
def test_llama_config_errors_name_the_field(kwargs, message):
    base = dict(vocab_size=VOCAB, hidden_size=HIDDEN, num_layers=1, num_heads=4)
    with pytest.raises(ValueError, match=message):
        LlamaConfig(**{**base, **kwargs})


@pytest.mark.parametrize('kwargs, message', [
    (dict(add_bias_linear=True), 'add_bias_linear'),
    (dict(num_attention_heads=4, multi_query_group_num=3), 'multiple of multi_query_group_num'),
    (dict(rmsnorm=False), 'rmsnorm'),
])
def test_glm2_config_errors_name_the_field(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ChatGLM2Config(**{**dict(num_layers=1, hidden_size=64, kv_channels=16, num_attention_heads=4), **kwargs})


def test_glm2_chat_and_stream_chat_agree():
    import os
    from mindformers.models.glm2 import ChatGLM2Tokenizer
    tokenizer = ChatGLM2Tokenizer(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                               'mindformers', 'assets', 'glm2_tiny', 'tokenizer.model'))
    ms.set_seed(0)
    model = ChatGLM2ForConditionalGeneration(ChatGLM2Config(
        padded_vocab_size=len(tokenizer), hidden_size=HIDDEN, ffn_hidden_size=FFN, num_layers=1,
        num_attention_heads=4, kv_channels=16, seq_length=128, use_past=True))
    model.set_train(False)
    history = [('你好', 'Good day.')]
    response, new_history = model.chat(tokenizer, 'What news?', history, max_new_tokens=8, eos_token_id=[])
    assert new_history == history + [('What news?', response)] and response
    streamed = list(model.stream_chat(tokenizer, 'What news?', history, max_new_tokens=8, eos_token_id=[]))
    assert streamed[-1] == (response, new_history)  # pieces arrive as words form; the last holds the answer
    assert all(response.startswith(partial) for partial, _ in streamed)
    prompt = tokenizer.build_prompt('What news?', history)
    assert prompt == '[Round 1]\n\n问：你好\n\n答：Good day.\n\n[Round 2]\n\n问：What news?\n\n答：'


@pytest.mark.parametrize('family', ['llama', 'gpt2'])
def test_float16_padded_forward_is_finite_and_cache_matches_recompute(family):
    """The Ascend precision on CPU: padded masks stay finite in float16 and KV-cache decoding keeps its dtypes."""
    from mindformers.models.gpt2 import GPT2Config, GPT2LMHeadModel
    ms.set_seed(0)
    half = dict(compute_dtype='float16', softmax_compute_type='float16')
    if family == 'llama':
        model = LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=FFN,
                                             num_layers=LAYERS, num_heads=4, n_kv_heads=2, seq_length=SEQ,
                                             rotary_dtype='float16', **half))
    else:
        model = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, hidden_size=HIDDEN, num_layers=LAYERS, num_heads=4,
                                           seq_length=SEQ, eos_token_id=0, pad_token_id=0, bos_token_id=0, **half))
    model.set_train(False)
    ids = _ids(2, 10, seed=9)
    mask = np.ones_like(ids)
    mask[1, :4] = 0
    logits = model(ms.Tensor(ids, ms.int32), ms.Tensor(mask, ms.int32)).asnumpy()
    assert np.isfinite(logits[mask.astype(bool)]).all()
    prompts = [ids[0].tolist(), ids[1, 4:].tolist()]
    cached = model.generate(prompts, max_new_tokens=6, use_past=True, eos_token_id=[], do_sample=False)
    full = model.generate(prompts, max_new_tokens=6, use_past=False, eos_token_id=[], do_sample=False)
    assert [list(r) for r in cached] == [list(r) for r in full]
