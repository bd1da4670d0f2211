"""Prefix-Tuning and P-Tuning v2 (mindformers/pet/prefix.py) on every family: a hidden prefix gives the base model,
the prefix layout is THUDM's (so ChatGLM2's published prefix_encoder loads), cached greedy generation equals
recomputation, a short finetune on the bundled instruction data trains only the prefix, bad input is refused."""
import json
import os

import numpy as np
import pytest
import mindspore as ms
from mindspore import nn, Parameter, Tensor

from mindformers import (ChatGLM2Config, ChatGLM2ForConditionalGeneration, GLMConfig, GLMForPreTraining,
                         GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, PanguAlphaConfig,
                         PanguAlphaHeadModel)
from mindformers.dataset.preprocess import iter_records
from mindformers.dataset.sft_preprocess import iter_sft_samples
from mindformers.generation.session import DecodingSession, SlotTable
from mindformers.models.base_model import CausalLMModel
from mindformers.models.convert_utils import load_ms_weights
from mindformers.models.glm2.convert_glm2 import CHATGLM_TABLE, convert_hf_to_ms
from mindformers.models.gpt2.gpt2_tokenizer import GPT2Tokenizer
from mindformers.modules.attention import prefix_length
from mindformers.pet import PrefixTuningConfig, Ptuning2Config, apply_pet, pet_config_from_dict, set_prefix_visible
from mindformers.pet.prefix import attention_cores
from research.pengcheng_mind import PengChengMindConfig, PengChengMindForCausalLM
from helpers.cli import convert_weight_main
from helpers.tiny import INSTRUCTIONS, spread, tiny_asset

VOCAB, SEQ = 64, 48
FAMILIES = ('gpt2', 'llama', 'glm', 'glm2', 'pangualpha', 'pengcheng_mind')
ALGORITHMS = {'ptuning2': {'pet_type': 'ptuning2', 'pre_seq_len': 3, 'dropout_prob': 0.0},
              'prefixtuning': {'pet_type': 'prefixtuning', 'prefix_token_num': 4, 'mid_dim': 16,
                               'dropout_rate': 0.0}}


def build(family, pet_config=None, vocab=VOCAB, **sizes):
    """A tiny model of `family` (dropout off) with `pet_config` applied at build."""
    tiny = dict(vocab_size=vocab, hidden_size=32, num_layers=2, seq_length=SEQ, initializer_range=0.2,
                pet_config=pet_config)
    tiny.update(sizes)
    no_dropout = dict(embedding_dropout_prob=0.0, hidden_dropout_rate=0.0, attention_dropout_rate=0.0)
    if family == 'gpt2':
        return GPT2LMHeadModel(GPT2Config(num_heads=4, bos_token_id=1, eos_token_id=2, pad_token_id=0, **no_dropout,
                                          **tiny))
    if family == 'pangualpha':
        return PanguAlphaHeadModel(PanguAlphaConfig(num_heads=4, eos_token_id=2, pad_token_id=0, **no_dropout,
                                                    **tiny))
    if family == 'glm':  # ids 3-6 are its special tokens; the test's tokens are plain text ids above them
        return GLMForPreTraining(GLMConfig(num_heads=4, bos_token_id=3, eos_token_id=2, pad_token_id=0,
                                           gmask_token_id=4, mask_token_id=5, inner_hidden_size=64, **tiny))
    if family == 'glm2':
        tiny['padded_vocab_size'] = tiny.pop('vocab_size')
        return ChatGLM2ForConditionalGeneration(ChatGLM2Config(num_attention_heads=4, multi_query_group_num=2,
                                                               kv_channels=8, ffn_hidden_size=48, **tiny))
    if family == 'pengcheng_mind':
        return PengChengMindForCausalLM(PengChengMindConfig(num_heads=4, ffn_hidden_size=48, **tiny))
    return LlamaForCausalLM(LlamaConfig(num_heads=4, n_kv_heads=2, intermediate_size=48, bos_token_id=1,
                                        eos_token_id=2, pad_token_id=0, **tiny))


def with_base_weights(model, base):
    """`model` with `base`'s parameters copied in (its own delta keeps its initial values)."""
    ms.load_param_into_net(model, {p.name: Parameter(p.data.copy(), p.name) for p in base.get_parameters()})
    return model


def padded_batch(seed=0):
    """Two left-padded rows of plain-text ids (7 and up, clear of GLM's special tokens)."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(7, VOCAB, (2, 11)).astype(np.int32)
    mask = np.ones_like(ids)
    ids[0, :4], mask[0, :4] = 0, 0
    return ids, mask


def logits(model, ids, mask):
    """The logits of the real (unpadded) tokens, [tokens, vocab]."""
    model.set_train(False)
    return model(Tensor(ids), Tensor(mask)).asnumpy()[mask == 1]


@pytest.fixture(scope='module', params=FAMILIES)
def family_models(request):
    """(family, base model, {pet_type: the base with that prefix algorithm})."""
    ms.set_seed(0)
    base = build(request.param)
    tuned = {name: with_base_weights(build(request.param, config), base) for name, config in ALGORITHMS.items()}
    return request.param, base, tuned


# ----------------------------------------------------------------------------- the attention seam
@pytest.mark.slow
def test_hidden_prefix_gives_the_base_model(family_models):
    """The prefix changes the logits; hidden (its mask columns at -1e9), the model computes the base model's."""
    _, base, tuned = family_models
    ids, mask = padded_batch()
    expected = logits(base, ids, mask)
    model = tuned['ptuning2']
    assert np.abs(logits(model, ids, mask) - expected).max() > 1e-2
    set_prefix_visible(model, False)
    try:
        np.testing.assert_allclose(logits(model, ids, mask), expected, atol=1e-5)
    finally:
        set_prefix_visible(model, True)
    assert prefix_length(base) == 0 and prefix_length(model) == 3


@pytest.mark.slow
def test_cached_greedy_generation_equals_recomputation(family_models):
    """generate() with the KV cache (the prefix stored in it at prefill) gives the tokens of full recomputation on
    padded prompts; decode compiles once. Each family with one algorithm, GPT-2 (its packed decode kernel reads the
    prefix) with both (`spread`): a family's attention reads the prefix of either alike, and the prefix encoder is
    family-blind."""
    family, _, tuned = family_models
    ids, _ = padded_batch(seed=1)
    prompts = [ids[0, 4:].tolist(), ids[1].tolist()]
    if family == 'glm':  # GLM generates after [gMASK] <sop>: a generated <sop> then changes nothing
        prompts = [prompt + [4, 3] for prompt in prompts]
    for algorithm in spread(ALGORITHMS)[family]:
        model = tuned[algorithm]
        cached = model.generate(prompts, max_new_tokens=10, use_past=True, eos_token_id=[])
        assert cached == model.generate(prompts, max_new_tokens=10, use_past=False, eos_token_id=[]), algorithm
        session = model._generate_sessions[2]  # pylint: disable=protected-access
        assert len(session._decode.compile_cache) == 1  # pylint: disable=protected-access
        assert session.cache.keys[0].data.shape[2] == SEQ + prefix_length(model)  # the prefix's columns first


@pytest.mark.slow
def test_slots_with_a_prefix_decode_as_they_do_alone():
    """In a 2-slot session the second request starts while the first decodes: each gives the tokens it gives
    alone (the prefix stored at prefill belongs to its slot)."""
    ms.set_seed(1)
    model = build('gpt2', ALGORITHMS['prefixtuning'])  # GPT-2: the packed decode kernel reads the prefix too
    model.set_train(False)
    rng = np.random.default_rng(3)
    prompts = [rng.integers(7, VOCAB, n).tolist() for n in (5, 9)]

    single = DecodingSession(model, 1)

    def alone(prompt, steps):
        tokens = [int(single.prefill([0], [prompt]).argmax())]
        for _ in range(steps - 1):
            tokens.append(int(single.decode([tokens[-1]]).argmax()))
        return tokens

    expected = [alone(prompts[0], 8), alone(prompts[1], 5)]
    session = DecodingSession(model, 2)
    got = [[int(session.prefill([0], [prompts[0]]).argmax())], []]
    for step in range(7):
        if step == 3:  # the second request joins while the first decodes
            got[1].append(int(session.prefill([1], [prompts[1]]).argmax()))
        out = session.decode([got[0][-1], got[1][-1] if got[1] else 0])
        got[0].append(int(out[0].argmax()))
        if got[1] and len(got[1]) < 5:
            got[1].append(int(out[1].argmax()))
    assert got == expected


def test_slot_table_reserves_the_prefix_columns():
    table = SlotTable(slots=2, kv_heads=1, max_length=6, prefix=3)
    positions, mask, extra = table.start(np.array([1]), np.array([[0, 1, 1]]), bucket=4)
    assert extra == 1 and positions.tolist() == [[0, 0, 0, 1]] and mask.shape == (1, 1, 4, 4)
    positions, mask, indices = table.step()
    assert positions[1, 0] == 2 and indices[1, 0, 0, 2] == 3 + 4  # after the prefix and the bucket
    assert mask[1, 0, 0].tolist() == [0, 0, 0, -1e9, -1e9, 0, 0, 0, -1e9]  # prefix, pad, 2 tokens, new
    table.step()  # the last position
    with pytest.raises(ValueError, match='slot 1 is full'):
        table.step()


# ----------------------------------------------------------------------------- P-Tuning v2 layout and THUDM's
LAYERS, GROUPS, KV_CHANNELS, PRE_SEQ_LEN = 3, 2, 8, 4


def thudm_prompt(embedding, batch):
    """THUDM ChatGLM2's `get_prompt` (next_wave.md 1b) in NumPy: the prefix_encoder output [B, P, L*D*G*2] viewed
    as [B, P, 2L, G, D], permuted (2, 1, 0, 3, 4) and split in groups of 2 -> per layer (key, value), each
    [P, B, G, D] (ChatGLM2 is sequence-first)."""
    past = np.broadcast_to(embedding, (batch,) + embedding.shape)
    past = past.reshape(batch, PRE_SEQ_LEN, 2 * LAYERS, GROUPS, KV_CHANNELS).transpose(2, 1, 0, 3, 4)
    return [(past[2 * i], past[2 * i + 1]) for i in range(LAYERS)]


def glm2_config(**extra):
    return ChatGLM2Config(num_layers=LAYERS, padded_vocab_size=VOCAB, hidden_size=32, num_attention_heads=4,
                          multi_query_group_num=GROUPS, kv_channels=KV_CHANNELS, ffn_hidden_size=48,
                          seq_length=SEQ, **extra)


def test_ptuning2_shapes_and_thudm_prefix_encoder_layout(tmp_path):
    """THUDM's ptuning output directory (config.json with pre_seq_len, pytorch_model.bin with the prefix encoder
    alone) converts with convert_weight.py; each layer's keys and values are the slices THUDM's get_prompt takes."""
    import torch
    width = LAYERS * KV_CHANNELS * GROUPS * 2  # THUDM's num_layers * kv_channels * multi_query_group_num * 2
    rng = np.random.default_rng(0)
    theirs = rng.standard_normal((PRE_SEQ_LEN, width)).astype(np.float32)
    source = tmp_path / 'ptuning'
    source.mkdir()
    torch.save({'transformer.prefix_encoder.embedding.weight': torch.from_numpy(theirs)}, source / 'pytorch_model.bin')
    (source / 'config.json').write_text(json.dumps({
        'model_type': 'chatglm', 'padded_vocab_size': VOCAB, 'hidden_size': 32, 'ffn_hidden_size': 48,
        'kv_channels': KV_CHANNELS, 'num_attention_heads': 4, 'num_layers': LAYERS, 'seq_length': SEQ,
        'multi_query_attention': True, 'multi_query_group_num': GROUPS, 'pre_seq_len': PRE_SEQ_LEN,
        'prefix_projection': False}))
    assert convert_weight_main('--model', 'glm2', '--input_path', source, '--output_path', tmp_path / 'p.ckpt') == 0
    converted = load_ms_weights(str(tmp_path / 'p.ckpt'))
    assert list(converted) == ['prefix_encoder.mindpet_delta_ptuning2_embedding.weight']
    config = glm2_config(pet_config={'pet_type': 'ptuning2', 'pre_seq_len': PRE_SEQ_LEN})
    model = ChatGLM2ForConditionalGeneration(config)
    assert model.pet_parameter_names == tuple(converted)
    ms.load_param_into_net(model, {k: Parameter(Tensor(v), k) for k, v in converted.items()})
    model.set_train(False)
    cores = attention_cores(model)
    assert len(cores) == LAYERS
    for index, (key, value) in enumerate(thudm_prompt(theirs, batch=2)):
        ours = [t.asnumpy() for t in cores[index].prefix(2)]
        assert ours[0].shape == ours[1].shape == (2, PRE_SEQ_LEN, GROUPS, KV_CHANNELS)
        np.testing.assert_array_equal(ours[0], key.transpose(1, 0, 2, 3))
        np.testing.assert_array_equal(ours[1], value.transpose(1, 0, 2, 3))
        assert not np.array_equal(ours[0], ours[1])  # keys and values are distinct slices


def test_ptuning2_for_glm2_6b_is_14336_wide():
    """The published size: 28 layers * 128 kv_channels * 2 groups * 2 = 14336 columns (built without weights)."""
    from mindspore.nn.utils import no_init_parameters
    with no_init_parameters():
        model = ChatGLM2ForConditionalGeneration(ChatGLM2Config(num_layers=28, pet_config={'pet_type': 'ptuning2'}))
    shapes = {p.name: tuple(p.shape) for p in model.trainable_params()}
    assert shapes == {'prefix_encoder.mindpet_delta_ptuning2_embedding.weight': (128, 14336)}


def test_thudm_checkpoint_with_base_and_projection_converts_with_its_config():
    """A THUDM ChatGLM2 P-Tuning v2 state dict with prefix_projection (trans.0 / trans.2, hidden_size wide) and the
    base weights converts in one go; pre_seq_len in its config.json gives the pet_config; base weights alone still
    convert without the delta."""
    from mindformers.models.glm2.convert_glm2 import config_from_hf
    hf_config = {'model_type': 'chatglm', 'padded_vocab_size': VOCAB, 'hidden_size': 32, 'ffn_hidden_size': 48,
                 'kv_channels': KV_CHANNELS, 'num_attention_heads': 4, 'num_layers': LAYERS, 'seq_length': SEQ,
                 'multi_query_attention': True, 'multi_query_group_num': GROUPS, 'pre_seq_len': PRE_SEQ_LEN,
                 'prefix_projection': True}
    config = config_from_hf(hf_config)
    assert config.pet_config.to_dict()['projection_dim'] == 32 and config.pet_config.prefix_projection
    model = ChatGLM2ForConditionalGeneration(config)
    ours = {p.name: p.asnumpy() for p in model.get_parameters()}
    theirs = CHATGLM_TABLE.to_theirs(ours, config)
    assert sorted(n for n in theirs if 'prefix_encoder' in n) == [
        'transformer.prefix_encoder.embedding.weight', 'transformer.prefix_encoder.trans.0.bias',
        'transformer.prefix_encoder.trans.0.weight', 'transformer.prefix_encoder.trans.2.bias',
        'transformer.prefix_encoder.trans.2.weight']
    assert theirs['transformer.prefix_encoder.trans.0.weight'].shape == (32, LAYERS * KV_CHANNELS * GROUPS * 2)
    back = convert_hf_to_ms(theirs, config)
    assert sorted(back) == sorted(ours) and all(np.array_equal(back[n], ours[n]) for n in ours)
    base_only = convert_hf_to_ms({n: v for n, v in theirs.items() if 'prefix_encoder' not in n}, config)
    assert sorted(base_only) == sorted(n for n in ours if not n.startswith('prefix_encoder.'))


# ----------------------------------------------------------------------------- training
def instruction_batches(seq=240):
    """The bundled alpaca sample's 12 records, prompt-masked, as (input_ids, labels) [12, seq + 1] (GPT-2 tiny
    tokenizer; the longest record has 234 tokens)."""
    tokenizer = GPT2Tokenizer(vocab_file=tiny_asset('gpt2', 'vocab.json'), merges_file=tiny_asset('gpt2', 'merges.txt'))
    records = iter_records([os.path.join(INSTRUCTIONS, 'alpaca_sample.json')])
    block = next(iter_sft_samples(records, 'alpaca', tokenizer, seq))
    assert block['input_ids'].shape == (12, seq + 1)
    return block['input_ids'], block['labels']


@pytest.mark.slow
@pytest.mark.parametrize('algorithm, lr', [('ptuning2', 0.3), ('prefixtuning', 0.03)])
def test_short_finetune_trains_only_the_prefix(algorithm, lr):
    """Ten Adam steps on the bundled alpaca sample (a tiny random GLM2, published dropout defaults): the loss falls,
    only the prefix encoder trains, the base weights stay bit for bit."""
    input_ids, labels = instruction_batches()
    pet = {'pet_type': algorithm, 'pre_seq_len' if algorithm == 'ptuning2' else 'prefix_token_num': 16}
    if algorithm == 'prefixtuning':
        pet['mid_dim'] = 32
    ms.set_seed(0)
    model = build('glm2', pet, vocab=512, seq_length=240)
    trainable = [p.name for p in model.trainable_params()]
    assert trainable == list(model.pet_parameter_names)
    assert all(name.startswith(f'prefix_encoder.mindpet_delta_{algorithm}_') for name in trainable)
    assert len(trainable) == (1 if algorithm == 'ptuning2' else 5)  # embedding (+ trans.0/2 weight and bias)
    base = {p.name: p.asnumpy().copy() for p in model.get_parameters() if p.name not in trainable}
    optimizer = nn.Adam(model.trainable_params(), learning_rate=lr)
    step = nn.TrainOneStepCell(model, optimizer)
    step.set_train(True)
    batches = [tuple(Tensor(a[rows]) for a in (input_ids, np.ones_like(input_ids), labels))
               for rows in (slice(0, 6), slice(6, 12))]
    losses = [float(step(*batch).asnumpy()) for _ in range(5) for batch in batches]
    assert np.isfinite(losses).all() and np.mean(losses[-2:]) < np.mean(losses[:2]) - 0.25, losses
    after = {p.name: p.asnumpy() for p in model.get_parameters()}
    assert all(np.array_equal(after[name], value) for name, value in base.items())  # the base, bit for bit


# ----------------------------------------------------------------------------- bad input
class NoAttention(CausalLMModel):
    """A causal LM without the suite's attention layers."""

    def __init__(self, config):
        super().__init__(config)
        self.proj = nn.Dense(4, 4)


@pytest.mark.parametrize('mapping, message', [
    ({'pet_type': 'ptuning2', 'pre_seq_len': 0}, r'pet_config\.pre_seq_len must be a positive integer, got 0'),
    ({'pet_type': 'ptuning2', 'pre_seq_len': -3}, r'pet_config\.pre_seq_len must be a positive integer'),
    ({'pet_type': 'prefixtuning', 'mid_dim': 0}, r'pet_config\.mid_dim must be a positive integer'),
    ({'pet_type': 'prefixtuning', 'dropout_rate': 1.0}, r'pet_config\.dropout_rate must be in \[0, 1\)'),
    ({'pet_type': 'ptuning2', 'prefix_projection': 'yes'}, r'pet_config\.prefix_projection must be true or false'),
    ({'pet_type': 'ptuning2', 'pre_seq_lenght': 8}, r"pet_config\.pre_seq_lenght.*pre_seq_len"),
])
def test_bad_config_values_are_refused_by_key(mapping, message):
    with pytest.raises(ValueError, match=message):
        pet_config_from_dict(mapping)
    with pytest.raises(ValueError, match=message.replace(r'pet_config\.', r'LlamaConfig\.pet_config\.')):
        LlamaConfig(pet_config=mapping)


def test_config_defaults_are_mindformers():
    assert pet_config_from_dict({'pet_type': 'ptuning2'}).to_dict() == {
        'pet_type': 'ptuning2', 'freeze_include': None, 'freeze_exclude': None, 'pre_seq_len': 128,
        'prefix_projection': False, 'projection_dim': 128, 'dropout_prob': 0.01}
    assert (PrefixTuningConfig().prefix_token_num, PrefixTuningConfig().mid_dim,
            PrefixTuningConfig().dropout_rate) == (128, 512, 0.1)
    assert isinstance(pet_config_from_dict({'pet_type': 'ptuning2'}), Ptuning2Config)


def test_a_model_without_the_prefix_seam_is_refused_by_name():
    model = NoAttention(LlamaConfig(num_layers=2, hidden_size=32, num_heads=4, vocab_size=VOCAB))
    for pet_type, name in (('ptuning2', 'P-Tuning v2'), ('prefixtuning', 'Prefix-Tuning')):
        with pytest.raises(ValueError, match=f'{name} is not supported for NoAttention'):
            apply_pet(model, {'pet_type': pet_type})
    assert model.pet_config is None and not hasattr(model, 'prefix_encoder')


def test_pipeline_stages_are_refused():
    with pytest.raises(ValueError, match='P-Tuning v2 for LlamaForCausalLM: pipeline_stage 2 > 1 is not supported'):
        LlamaForCausalLM(LlamaConfig(num_layers=2, hidden_size=32, num_heads=4, vocab_size=VOCAB,
                                     parallel_config={'pipeline_stage': 2, 'micro_batch_num': 2},
                                     pet_config={'pet_type': 'ptuning2', 'pre_seq_len': 2}))


def test_prefix_parameters_have_parallel_layouts():
    """Under dp=2 x mp=2 the prefix encoder is replicated (every rank computes the whole prefix) and has layouts
    for its optimizer states, so strategy files cover it."""
    from mindformers.parallel.layout import parameter_layouts
    parallel = {'data_parallel': 2, 'model_parallel': 2}
    for pet in ALGORITHMS.values():
        config = LlamaConfig(num_layers=2, hidden_size=32, num_heads=4, n_kv_heads=2, vocab_size=VOCAB,
                             seq_length=SEQ, pet_config=pet, parallel_config=parallel)
        layouts = parameter_layouts(config, parallel, model_class=LlamaForCausalLM)
        delta = {name: layout for name, layout in layouts.items() if 'prefix_encoder' in name}
        assert len(delta) == 3 * (1 if pet['pet_type'] == 'ptuning2' else 5)  # with adam_m, adam_v
        assert all(set(layout.tensor_map) == {-1} for layout in delta.values())
