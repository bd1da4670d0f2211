"""Adapter, LowRankAdapter, BitFit and R-Drop (mindformers/pet/adapter.py, bitfit.py, rdrop.py): the adapters are a
no-op at init and train only their own parameters, counted by formula; each algorithm's loss falls in a short
finetune on the bundled instruction data (LoRA too); R-Drop's loss is its formula; cached greedy generation equals
recomputation with non-zero adapters on every family; bad input gets one clear error."""
import os

import numpy as np
import pytest
import mindspore as ms
import mindspore.dataset as ds
from mindspore import Tensor

from mindformers import AutoModel, Trainer, TrainingArguments
from mindformers.dataset.preprocess import iter_records
from mindformers.dataset.sft_preprocess import iter_sft_samples
from mindformers.models.gpt2.gpt2_tokenizer import GPT2Tokenizer
from mindformers.modules.layers import Dropout
from mindformers.pet import (AdapterLinear, LowRankAdapterLinear, RDropLoss, apply_pet, pet_config_from_dict)
from helpers.tiny import INSTRUCTIONS, spread, tiny_asset

SMALL = dict(num_layers=2, seq_length=32, initializer_range=0.2)
ADAPTERS = {'adapter': {'pet_type': 'adapter', 'bottleneck_size': 8},
            'low_rank_adapter': {'pet_type': 'low_rank_adapter', 'reduction_factor': 4, 'low_rank_size': 2}}
NO_OP_FAMILIES = ('gpt2', 'llama')  # where the no-op at init is checked
PROMPT = np.random.default_rng(0).integers(5, 400, (2, 12)).astype(np.int32)  # below every family's special ids


def _tiny(family, **overrides):
    return AutoModel.from_config(f'{family}_tiny', **dict(SMALL, **overrides))


def _eval_logits(model, ids=PROMPT):
    model.set_train(False)
    return model(Tensor(ids)).asnumpy()


@pytest.fixture(scope='module')
def adapted():
    """adapted(family, pet_type) -> (model, and for NO_OP_FAMILIES the logits before and right after the PET was
    applied), each model built once."""
    built = {}

    def get(family, pet_type):
        if (family, pet_type) not in built:
            ms.set_seed(0)
            model = _tiny(family)
            logits = (_eval_logits(model),) if family in NO_OP_FAMILIES else ()
            apply_pet(model, ADAPTERS[pet_type])
            built[family, pet_type] = (model,) + ((logits[0], _eval_logits(model)) if logits else (None, None))
        return built[family, pet_type]
    return get


# ----------------------------------------------------------------------------- the adapters
@pytest.mark.parametrize('pet_type', sorted(ADAPTERS))
@pytest.mark.parametrize('family', NO_OP_FAMILIES)
def test_adapters_are_a_no_op_at_init_and_train_only_their_formula_count(adapted, family, pet_type):
    model, base, at_init = adapted(family, pet_type)
    assert np.abs(at_init - base).max() <= 1e-6

    d, layers = model.config.hidden_size, model.config.num_layers
    if pet_type == 'adapter':
        k = ADAPTERS[pet_type]['bottleneck_size']
        per_target = 2 * k * d + k + d  # W_down [k, d], b_down, W_up [d, k], b_up
        suffixes = ('down_weight', 'down_bias', 'up_weight', 'up_bias')
    else:
        k, r = d // ADAPTERS[pet_type]['reduction_factor'], ADAPTERS[pet_type]['low_rank_size']
        per_target = r * (d + k) + k + r * (k + d) + d  # two rank-r products and the biases
        suffixes = ('down_left', 'down_right', 'down_bias', 'up_left', 'up_right', 'up_bias')
    assert model.num_parameters(trainable_only=True) == 2 * layers * per_target  # attention out + MLP out
    names = [p.name for p in model.trainable_params()]
    assert names == list(model.pet_parameter_names)
    out = {'gpt2': ('backbone', 'attention.o_proj', 'mlp.fc_out'),
           'llama': ('model', 'self_attn.o_proj', 'mlp.down_proj')}[family]
    assert names[:2 * len(suffixes)] == [f"{out[0]}.layers.0.{linear}.mindpet_delta_{pet_type}_{suffix}"
                                         for linear in out[1:] for suffix in suffixes]
    kind = AdapterLinear if pet_type == 'adapter' else LowRankAdapterLinear
    adapted_linears = [cell for _, cell in model.cells_and_names() if isinstance(cell, kind)]
    assert len(adapted_linears) == 2 * layers
    assert not any(cell.bias_fusable for cell in adapted_linears)


def _randomize_delta(model, seed=1, scale=0.5):
    rng = np.random.default_rng(seed)
    for param in model.trainable_params():
        param.set_data(Tensor((scale * rng.standard_normal(param.shape)).astype(np.float32)))


# how a family calls its Linears is the same for both adapters (LowRankAdapterLinear is an AdapterLinear with other
# delta matmuls), and a delta is family-blind: each family with one adapter, GPT-2 with both
GENERATION_CASES = [(family, pet_type) for family, pet_types in spread(ADAPTERS).items() for pet_type in pet_types]


@pytest.mark.slow
@pytest.mark.parametrize('family, pet_type', GENERATION_CASES)
def test_cached_greedy_generation_equals_recomputation_with_adapters(adapted, family, pet_type):
    model, _, _ = adapted(family, pet_type)
    prompts = [PROMPT[0, 4:].tolist(), PROMPT[1].tolist()]  # ragged: left-padded in the batch
    options = dict(max_new_tokens=6, eos_token_id=[])
    unchanged = model.generate(prompts, use_past=False, **options)  # adapters at their (no-op) init
    _randomize_delta(model)
    cached = model.generate(prompts, use_past=True, **options)
    assert cached == model.generate(prompts, use_past=False, **options)
    assert [len(row) for row in cached] == [14, 18] and cached != unchanged  # the adapters now change the model


def test_a_base_checkpoint_loads_into_an_adapted_model(tmp_path):
    ms.set_seed(0)
    base = _tiny('gpt2')
    ms.save_checkpoint(base, str(tmp_path / 'base.ckpt'))
    ms.set_seed(1)
    model = _tiny('gpt2', pet_config=ADAPTERS['low_rank_adapter'], checkpoint_name_or_path=str(tmp_path / 'base.ckpt'))
    params = model.parameters_dict()
    for param in base.get_parameters():
        np.testing.assert_array_equal(params[param.name].asnumpy(), param.asnumpy())
    assert all(not params[name].asnumpy().any() for name in model.pet_parameter_names if 'up_right' in name)


def test_an_adapted_linear_refuses_to_leave_its_bias_out(adapted):
    model, _, _ = adapted('gpt2', 'adapter')
    o_proj = model.backbone.layers[0].attention.o_proj
    with pytest.raises(ValueError, match='adds its own bias'):
        o_proj(Tensor(np.ones((2, o_proj.in_features), np.float32)), False)


def test_adapter_parameters_have_layouts_under_model_parallel():
    """The output projections are row-split, so their outputs (what the adapters read) are whole on every device:
    the adapters are replicated, and every one of their parameters has a declared layout."""
    from mindformers import AutoConfig
    from mindformers.parallel.layout import parameter_layouts
    for pet_config in ADAPTERS.values():
        config = AutoConfig.from_pretrained('llama_tiny', num_layers=1, pet_config=pet_config)
        layouts = parameter_layouts(config, {'data_parallel': 1, 'model_parallel': 2})
        delta = {name: layout for name, layout in layouts.items() if 'mindpet_delta_' in name and
                 not name.startswith('adam_')}
        assert len(delta) == 2 * (4 if pet_config['pet_type'] == 'adapter' else 6)
        assert all(set(layout.tensor_map) == {-1} for layout in delta.values())
        assert layouts['model.layers.0.self_attn.o_proj.weight'].tensor_map == (-1, 0)  # the base keeps its split


# ----------------------------------------------------------------------------- R-Drop's loss
def _log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def test_rdrop_loss_equals_its_formula_in_numpy():
    rng = np.random.default_rng(3)
    rows, seq, vocab, alpha = 6, 5, 11, 4.0  # 3 pairs of twins
    logits = rng.standard_normal((rows, seq, vocab)).astype(np.float32) * 2
    targets = rng.integers(0, vocab, (rows, seq)).astype(np.int32)
    targets[0:2, :2] = -100  # ignored targets, the same in both twins
    targets[4:6, 3] = -100
    mask = (targets != -100).astype(np.float32)
    loss = RDropLoss(alpha)(Tensor(logits), Tensor(targets.reshape(-1)), Tensor(mask.reshape(-1))).asnumpy()

    logp = _log_softmax(logits.astype(np.float64))
    picked = np.take_along_axis(logp, np.maximum(targets, 0)[..., None], -1)[..., 0]
    ce = -(picked * mask).sum() / mask.sum()
    p1, p2 = logp[0::2], logp[1::2]
    kl = (np.exp(p1) * (p1 - p2)).sum(-1) + (np.exp(p2) * (p2 - p1)).sum(-1)  # KL(p1||p2) + KL(p2||p1)
    pairs = mask[0::2]
    np.testing.assert_allclose(loss, ce + alpha / 4 * (kl * pairs).sum() / pairs.sum(), rtol=1e-5)
    assert (kl * pairs).sum() > 0


@pytest.mark.parametrize('family', ['gpt2', pytest.param('glm', marks=pytest.mark.slow)])  # GLM: its own loss
def test_rdrop_trains_on_twin_rows_and_leaves_evaluation_alone(family):
    """With the dropout switched off after R-Drop was applied, the twins agree, the KL term is 0 and the training
    loss is the base loss of the batch (ignored targets included); evaluation logits are the base model's."""
    ms.set_seed(0)
    model = _tiny(family, hidden_dropout_rate=0.1, attention_dropout_rate=0.1, pet_config={'pet_type': 'rdrop'})
    assert isinstance(model.pet_loss, RDropLoss) and model.num_parameters(True) == model.num_parameters()
    for _, cell in model.cells_and_names():
        if isinstance(cell, Dropout):
            cell.p = 0.0
    ms.set_seed(0)
    plain = _tiny(family)
    ids = np.random.default_rng(4).integers(5, 400, (3, 17)).astype(np.int32)
    labels = ids.copy()
    labels[0, :9] = labels[2, 5:] = -100
    losses = []
    for net in (model, plain):
        net.set_train(True)
        losses.append(float(net(Tensor(ids), None, Tensor(labels)).asnumpy()))
    np.testing.assert_allclose(losses[0], losses[1], rtol=1e-5)
    if family == 'gpt2':  # (the same code path for every family: `not self.training`)
        np.testing.assert_array_equal(_eval_logits(model, ids), _eval_logits(plain, ids))


# ----------------------------------------------------------------------------- short finetunes
@pytest.fixture(scope='module')
def instruction_batches():
    """The bundled Alpaca sample in the llama2_chat template, tokenized with the tiny GPT-2 tokenizer:
    {'input_ids', 'labels'} [12, 129] (prompts masked)."""
    tokenizer = GPT2Tokenizer(vocab_file=tiny_asset('gpt2', 'vocab.json'), merges_file=tiny_asset('gpt2', 'merges.txt'))
    records = iter_records([os.path.join(INSTRUCTIONS, 'alpaca_sample.json')])
    (block,) = iter_sft_samples(records, 'llama2_chat', tokenizer, seq_length=128)
    return block


FINETUNES = {  # pet_config, learning rate, extra model config
    'lora': ({'pet_type': 'lora', 'lora_rank': 8, 'lora_alpha': 16}, 1e-2, {}),
    'adapter': (ADAPTERS['adapter'], 1e-2, {}),
    'low_rank_adapter': (ADAPTERS['low_rank_adapter'], 1e-2, {}),
    'bitfit': ({'pet_type': 'bitfit'}, 1e-2, {}),
    'rdrop': ({'pet_type': 'rdrop'}, 2e-3, dict(hidden_dropout_rate=0.1, attention_dropout_rate=0.1)),
}


@pytest.mark.slow
@pytest.mark.parametrize('pet_type', sorted(FINETUNES))
def test_finetune_lowers_the_loss_and_trains_only_the_delta(tmp_path, instruction_batches, pet_type):
    pet_config, learning_rate, extra = FINETUNES[pet_type]
    ms.set_seed(0)
    model = _tiny('gpt2', seq_length=128, initializer_range=0.02, pet_config=pet_config, **extra)
    before = {p.name: p.asnumpy().copy() for p in model.get_parameters()}
    data = ds.NumpySlicesDataset(dict(instruction_batches), shuffle=False).batch(4, drop_remainder=True)
    args = TrainingArguments(output_dir=str(tmp_path), num_train_epochs=4, learning_rate=learning_rate,
                             warmup_steps=0, save_strategy='no')
    losses = Trainer(model=model, args=args, train_dataset=data).train().losses
    assert len(losses) == 12 and np.isfinite(losses).all()
    assert np.mean(losses[-3:]) < np.mean(losses[:3]) - 0.1, losses  # the same 3 batches, first and last epoch

    after = {p.name: p.asnumpy() for p in model.get_parameters()}
    changed = {name for name in before if not np.array_equal(before[name], after[name])}
    if pet_type in ADAPTERS or pet_type == 'lora':  # only the delta moved: the base is bit-identical
        assert changed == set(model.pet_parameter_names)
    elif pet_type == 'bitfit':
        biases = {name for name in before if name.endswith('bias')}
        assert changed and changed <= biases and {p.name for p in model.trainable_params()} == biases
    else:  # R-Drop trains the whole model
        assert len(changed) > 0.9 * len(before)


# ----------------------------------------------------------------------------- bad input
@pytest.mark.parametrize('mapping, message', [
    ({'pet_type': 'adapter', 'bottleneck_size': 0}, r"pet_config\.bottleneck_size must be a positive integer"),
    ({'pet_type': 'adapter', 'bottleneck_size': 8.5}, r"pet_config\.bottleneck_size must be a positive integer"),
    ({'pet_type': 'adapter', 'non_linearity': 'swish'}, r"pet_config\.non_linearity: unsupported activation 'swish'"),
    ({'pet_type': 'adapter', 'bottleneck': 8}, r"pet_config\.bottleneck"),
    ({'pet_type': 'low_rank_adapter', 'reduction_factor': 0}, r"pet_config\.reduction_factor must be a positive"),
    ({'pet_type': 'low_rank_adapter', 'low_rank_size': -1}, r"pet_config\.low_rank_size must be a positive"),
    ({'pet_type': 'low_rank_adapter', 'low_rank_w_init': 'bogus'}, r"pet_config\.low_rank_w_init must name"),
    ({'pet_type': 'low_rank_adapter', 'low_rank_w_init': 'zeros'}, r"pet_config\.low_rank_w_init must name"),
    ({'pet_type': 'rdrop', 'alpha': 0}, r"pet_config\.alpha must be a positive number"),
    ({'pet_type': 'rdrop', 'alpha': 4, 'lora_rank': 8}, r"pet_config\.lora_rank"),
    ({'pet_type': 'bitfit', 'bias': True}, r"pet_config\.bias"),
])
def test_bad_config_values_name_the_key(mapping, message):
    with pytest.raises(ValueError, match=message):
        pet_config_from_dict(mapping)


def test_bad_config_in_a_model_config_names_the_key():
    with pytest.raises(ValueError, match=r"pet_config\.bottleneck_size must be a positive integer, got -1"):
        _tiny('gpt2', pet_config={'pet_type': 'adapter', 'bottleneck_size': -1})


@pytest.mark.parametrize('family, pet_config, message', [
    ('llama', {'pet_type': 'bitfit'}, r"bitfit trains only biases, and LlamaForCausalLM has none"),
    ('gpt2', {'pet_type': 'rdrop'}, r"rdrop compares two dropout passes, but GPT2LMHeadModel has no dropout .*"
                                    r"set one of attention_dropout_rate, embedding_dropout_prob, hidden_dropout_rate"),
    ('llama', {'pet_type': 'rdrop', 'alpha': 2}, r"LlamaForCausalLM has no dropout .*no dropout setting"),
    ('gpt2', {'pet_type': 'low_rank_adapter', 'reduction_factor': 1000},
     r"reduction_factor \(1000\) exceeds the output width of backbone\.layers\.0\.attention\.o_proj \(192\)"),
])
def test_a_pet_that_cannot_work_on_the_model_is_refused(family, pet_config, message):
    with pytest.raises(ValueError, match=message):
        _tiny(family, pet_config=pet_config)
