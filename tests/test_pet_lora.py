"""LoRA core (mindformers/pet): a no-op at init, the trainable count, how target_modules matches, clear refusals,
training that leaves the base untouched, merging, base checkpoints loading under a pet_config, and cached
generation with a non-zero delta for every family."""
import numpy as np
import pytest
import mindspore as ms
from mindspore import nn, Tensor

from mindformers import AutoConfig, AutoModel, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM
from mindformers.modules.layers import LayerNorm
from mindformers.modules.mlp import MLP
from mindformers.modules.norm import RMSNorm
from mindformers.pet import LoRALinear, apply_pet, freeze_delta, pet_config_from_dict, select_linears
from mindformers.tools.checkpoint import CheckpointError, save_checkpoint_atomic

VOCAB = 64
TINY = dict(vocab_size=VOCAB, hidden_size=32, num_layers=2, num_heads=4, seq_length=32)
NO_DROPOUT = dict(embedding_dropout_prob=0.0, hidden_dropout_rate=0.0, attention_dropout_rate=0.0)


def _gpt2(**kwargs):
    return GPT2LMHeadModel(GPT2Config(bos_token_id=1, eos_token_id=2, pad_token_id=0, **NO_DROPOUT, **TINY, **kwargs))


def _llama(**kwargs):
    return LlamaForCausalLM(LlamaConfig(n_kv_heads=2, intermediate_size=48, bos_token_id=1, eos_token_id=2,
                                        pad_token_id=0, **TINY, **kwargs))


def _ids(rows=2, cols=12, seed=0):
    return Tensor(np.random.default_rng(seed).integers(3, VOCAB, (rows, cols)).astype(np.int32))


def _randomize_b(model, seed=1, scale=0.3):
    rng = np.random.default_rng(seed)
    for param in model.trainable_params():
        if param.name.endswith('lora_b'):
            param.set_data(Tensor(rng.normal(0, scale, param.shape).astype(np.float32)))


def _logits(model, ids):
    model.set_train(False)
    return model(ids).asnumpy()


@pytest.mark.parametrize('build, targets, expected', [
    (_gpt2, None, ['qkv_proj']),
    (_llama, None, ['q_proj', 'v_proj']),
    (_llama, ['q_proj', 'k_proj', 'v_proj', 'o_proj', 'gate_proj', 'up_proj', 'down_proj'], None),
])
def test_lora_is_a_no_op_at_init_and_trains_only_r_times_in_plus_out(build, targets, expected):
    model = build()
    ids = _ids()
    before = _logits(model, ids)
    names = {p.name for p in model.get_parameters()}
    config = {'pet_type': 'lora', 'lora_rank': 4, 'lora_alpha': 8}
    if targets:
        config['target_modules'] = targets
    apply_pet(model, config)
    assert np.abs(_logits(model, ids) - before).max() == 0
    adapted = [(path, cell) for path, cell in model.cells_and_names() if isinstance(cell, LoRALinear)]
    assert sorted({path.rsplit('.', 1)[-1] for path, _ in adapted}) == sorted(expected or targets)
    assert model.num_parameters(trainable_only=True) == sum(4 * (c.in_features + c.out_features) for _, c in adapted)
    trainable = {p.name for p in model.trainable_params()}
    assert trainable == {f"{path}.mindpet_delta_lora_{x}" for path, _ in adapted for x in 'ab'}
    assert names < {p.name for p in model.get_parameters()}  # base names unchanged, deltas added


def test_target_modules_matching_rules_and_refusals():
    model = _llama()
    paths = lambda chosen: sorted(p for p, _ in chosen)  # noqa: E731
    # a string is a regex over the whole dotted path
    assert paths(select_linears(model, r'.*\.(q|v)_proj')) == [f'model.layers.{i}.self_attn.{n}_proj'
                                                               for i in range(2) for n in 'qv']
    with pytest.raises(ValueError, match=r"'q_proj' matches no Linear .*whole dotted path.*q_proj, up_proj, v_proj"):
        select_linears(model, 'q_proj')  # a bare string is not a suffix match
    # list entries: exact path, path suffix, or a full-match regex
    assert len(select_linears(model, ['q_proj'])) == 2
    assert paths(select_linears(model, ['model.layers.1.mlp.down_proj', r'.*0\.self_attn\.o_proj'])) == \
        ['model.layers.0.self_attn.o_proj', 'model.layers.1.mlp.down_proj']
    with pytest.raises(ValueError, match=r"'wq' matches no Linear"):
        select_linears(model, ['q_proj', 'wq'])  # MindFormers r1.0's name: every entry must match
    assert paths(select_linears(model, ['q_proj'], exclude_layers=[r'.*layers\.1\..*'])) == \
        ['model.layers.0.self_attn.q_proj']
    with pytest.raises(ValueError, match='exclude_layers'):
        select_linears(model, ['q_proj'], exclude_layers=['down_proj'])
    with pytest.raises(ValueError, match='not a valid regex'):
        select_linears(model, '(q_proj')


@pytest.mark.parametrize('mapping, message', [
    ({'pet_type': 'loraa'}, "unknown pet_type 'loraa'"),
    ({'lora_rank': 8}, 'lacks pet_type'),
    ({'pet_type': 'lora', 'lora_rank': 0}, r'LlamaConfig\.pet_config\.lora_rank must be a positive integer'),
    ({'pet_type': 'lora', 'lora_alpha': -1}, 'lora_alpha must be a positive number'),
    ({'pet_type': 'lora', 'lora_dropout': 1.5}, r'lora_dropout must be in \[0, 1\)'),
    ({'pet_type': 'lora', 'lora_ranks': 8}, r"unknown key 'LlamaConfig.pet_config.lora_ranks' \(did you mean "
                                            r"lora_rank"),
    ({'pet_type': 'lora', 'target_modules': []}, 'target_modules must be'),
])
def test_bad_pet_config_is_refused_when_the_config_is_built(mapping, message):
    with pytest.raises(ValueError, match=message):
        LlamaConfig(pet_config=mapping)


def test_a_target_that_matches_nothing_is_refused_when_the_model_is_built():
    with pytest.raises(ValueError, match=r"'\.\*wq' matches no Linear of LlamaForCausalLM .*\(MindFormers r1\.0 "
                                         r"names: use wq -> q_proj\)"):
        _llama(pet_config={'pet_type': 'lora', 'target_modules': '.*wq|.*wv'.split('|')})


def test_freeze_include_and_exclude_follow_mindpet():
    model = _llama()
    apply_pet(model, {'pet_type': 'lora', 'freeze_exclude': ['*embed_tokens*'],
                      'freeze_include': ['*layers.1.*']})
    trainable = sorted(p.name for p in model.trainable_params())
    assert 'model.embed_tokens.weight' in trainable
    assert not any('layers.1.' in name for name in trainable)
    assert 'model.layers.0.self_attn.q_proj.mindpet_delta_lora_a' in trainable
    assert freeze_delta(model, 'lora') == [n for n in trainable if 'lora' in n] + \
        ['model.layers.1.self_attn.q_proj.mindpet_delta_lora_a', 'model.layers.1.self_attn.q_proj.mindpet_delta_lora_b',
         'model.layers.1.self_attn.v_proj.mindpet_delta_lora_a', 'model.layers.1.self_attn.v_proj.mindpet_delta_lora_b']


def _train(model, steps=8, lr=1e-2):
    batch = _ids(4, 17, seed=3)
    optimizer = nn.AdamWeightDecay(model.trainable_params(), learning_rate=lr)
    step = nn.TrainOneStepCell(model, optimizer)
    step.set_train(True)
    return [float(step(batch).asnumpy()) for _ in range(steps)]


@pytest.mark.slow
def test_training_moves_only_the_delta_and_merging_keeps_the_function():
    model = _gpt2(pet_config={'pet_type': 'lora', 'lora_rank': 4, 'lora_alpha': 8,
                              'target_modules': ['qkv_proj', 'fc_out']})
    base = {p.name: p.asnumpy().copy() for p in model.get_parameters() if 'lora' not in p.name}
    losses = _train(model)
    assert losses[-1] < losses[0] - 0.05
    for param in model.get_parameters():
        if 'lora' in param.name:
            continue
        assert np.array_equal(param.asnumpy(), base[param.name]), f"{param.name} changed"
    assert all(np.abs(p.asnumpy()).max() > 0 for p in model.trainable_params() if p.name.endswith('lora_b'))

    ids = _ids(2, 16, seed=5)
    unmerged = _logits(model, ids)
    expected = {}
    for path, cell in model.cells_and_names():
        if isinstance(cell, LoRALinear):
            a, b = (getattr(cell, f'mindpet_delta_lora_{x}').asnumpy() for x in 'ab')
            expected[cell.weight.name] = base[cell.weight.name] + (8 / 4) * (b @ a)
    model.merge_pet()
    assert model.pet_config is None and model.config.pet_config is None
    assert not any(isinstance(cell, LoRALinear) for _, cell in model.cells_and_names())
    assert not any('lora' in p.name for p in model.get_parameters())
    for name, weight in expected.items():
        got = next(p for p in model.get_parameters() if p.name == name).asnumpy()
        np.testing.assert_allclose(got, weight, rtol=0, atol=1e-6)
    np.testing.assert_allclose(_logits(model, ids), unmerged, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match='no PET delta to merge'):
        model.merge_pet()


def test_base_and_full_checkpoints_load_under_a_pet_config(tmp_path):
    base = _llama()
    base_path = str(tmp_path / 'base.ckpt')
    save_checkpoint_atomic(base, base_path)
    pet = {'pet_type': 'lora', 'lora_rank': 2}
    tuned = _llama(pet_config=pet, checkpoint_name_or_path=base_path)
    ids = _ids()
    np.testing.assert_array_equal(_logits(tuned, ids), _logits(base, ids))  # base weights, no-op delta

    _randomize_b(tuned)
    full_path = str(tmp_path / 'full.ckpt')
    save_checkpoint_atomic(tuned, full_path)
    again = _llama(pet_config=pet, checkpoint_name_or_path=full_path)
    for a, b in zip(again.get_parameters(), tuned.get_parameters()):
        assert a.name == b.name and np.array_equal(a.asnumpy(), b.asnumpy())
    np.testing.assert_array_equal(_logits(again, ids), _logits(tuned, ids))

    tuned.save_pretrained(str(tmp_path / 'saved'))  # config.json carries the pet_config
    loaded = AutoModel.from_pretrained(str(tmp_path / 'saved'))
    assert loaded.pet_config == tuned.pet_config
    np.testing.assert_array_equal(_logits(loaded, ids), _logits(tuned, ids))

    with pytest.raises(CheckpointError, match=r'shape mismatch .*mindpet_delta_lora_a \(checkpoint \(2, 32\), '
                                              r'model \(4, 32\)\)'):
        _llama(pet_config=dict(pet, lora_rank=4), checkpoint_name_or_path=full_path)


FAMILY_NAMES = ['gpt2_tiny', 'llama_tiny', 'glm_tiny', 'glm2_tiny', 'pangualpha_tiny', 'pengcheng_mind_tiny']


@pytest.mark.slow
@pytest.mark.parametrize('name', FAMILY_NAMES)
def test_cached_greedy_generation_with_lora_equals_recomputation(name):
    config = AutoConfig.from_pretrained(name, num_layers=2)  # compile time grows with the layers: 2 are enough
    config.pet_config = pet_config_from_dict({'pet_type': 'lora', 'lora_rank': 4, 'lora_alpha': 8})
    model = AutoModel.from_config(config)
    assert model.pet_config.pet_type == 'lora'
    _randomize_b(model)
    model.set_train(False)
    prompts = [_ids(1, 9, seed=7).asnumpy()[0].tolist(), _ids(1, 5, seed=8).asnumpy()[0].tolist()]
    cached = model.generate(prompts, max_new_tokens=8, use_past=True, eos_token_id=[])
    assert cached == model.generate(prompts, max_new_tokens=8, use_past=False, eos_token_id=[])
    ms.set_seed(0)


@pytest.mark.usefixtures('cpu_kernels_on')
@pytest.mark.parametrize('build', [_gpt2, _llama])
def test_frozen_norms_and_biases_skip_their_gradients_and_the_delta_trains_alike(build, monkeypatch):
    """Under LoRA every norm's weight (and GPT-2's fc_in bias, added inside the GELU kernel) is frozen, so their
    backward kernels compute the input gradient only; the delta trains bit for bit as with the kernels that also sum
    the (unread) weight and bias gradients."""
    first = build(pet_config={'pet_type': 'lora', 'lora_rank': 4, 'lora_alpha': 8})
    _randomize_b(first)
    initial = {p.name: p.asnumpy().copy() for p in first.get_parameters()}
    runs = []
    for skip in (True, False):
        if not skip:
            for cls, name in ((RMSNorm, 'frozen'), (LayerNorm, 'frozen'), (MLP, 'frozen_bias')):
                monkeypatch.setattr(cls, name, property(lambda self: False))
        model = first if skip else build(pet_config={'pet_type': 'lora', 'lora_rank': 4, 'lora_alpha': 8})
        for param in model.get_parameters():
            param.set_data(Tensor(initial[param.name]))
        cells = [cell for _, cell in model.cells_and_names()]
        norms = [cell.frozen for cell in cells if isinstance(cell, (RMSNorm, LayerNorm))]
        assert norms and all(frozen == skip for frozen in norms)
        assert all(cell.frozen_bias == skip for cell in cells if isinstance(cell, MLP))
        losses = _train(model, steps=3)
        runs.append((losses, {p.name: p.asnumpy() for p in model.trainable_params()}))
    assert runs[0][0] == runs[1][0]
    assert runs[0][1].keys() == runs[1][1].keys()
    for name, value in runs[0][1].items():
        assert np.array_equal(value, runs[1][1][name]), name


class _FirstOutput(nn.Cell):
    def __init__(self, cell):
        super().__init__()
        self.cell = cell

    def construct(self, *inputs):
        return self.cell(*inputs)[0]


@pytest.mark.usefixtures('cpu_kernels_on')
@pytest.mark.parametrize('rows, rank', [(37, 8), (300, 3)])
def test_the_fused_lora_kernel_matches_numpy_both_ways(rows, rank):
    """On CPU in fp32 the update y + s (x A^T) B^T and its gradients are one kernel pass each way (FusedLoRA)."""
    from mindformers.kernels import FusedLoRA
    from helpers.kernel_checks import ProbeAll
    rng = np.random.default_rng(13)
    x, y = rng.standard_normal((rows, 24)), rng.standard_normal((rows, 40))
    a, b, probe = rng.standard_normal((rank, 24)), rng.standard_normal((40, rank)), rng.standard_normal((rows, 40))
    kernel = FusedLoRA(0.75)
    grads = ms.grad(ProbeAll(_FirstOutput(kernel), probe.astype(np.float32)), (0, 1, 2, 3))(
        *(Tensor(v.astype(np.float32)) for v in (x, y, a, b)))
    out = kernel(*(Tensor(v.astype(np.float32)) for v in (x, y, a, b)))[0].asnumpy()
    np.testing.assert_allclose(out, y + 0.75 * (x @ a.T) @ b.T, rtol=1e-5, atol=1e-5)
    g = 0.75 * probe @ b
    for got, expected in zip(grads, (g @ a, probe, g.T @ x, probe.T @ (0.75 * x @ a.T))):
        np.testing.assert_allclose(got.asnumpy(), expected, rtol=1e-5, atol=1e-4)
