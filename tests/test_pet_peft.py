"""LoRA adapters in HuggingFace PEFT's format, against the real `peft` on transformers models (tiny, random, fp32):
our adapter loaded by `PeftModel.from_pretrained` on the HF model gives our logits, and an adapter PEFT made (B
random, non-zero) loaded by us gives PEFT's, for GPT-2 (fused `c_attn`, Conv1D), LLaMA (MHA and GQA) and GLM2 as
`GlmForCausalLM` (fused `gate_up_proj`); what cannot be loaded is refused by name, leaving the model as it was."""
import json
import os
import shutil
import warnings

import numpy as np
import pytest
import torch
import transformers
import peft
import mindspore as ms
from safetensors.numpy import load_file, save_file

from mindformers import AutoModel, load_peft_adapter, save_peft_adapter
from mindformers.models.convert_utils import ConversionError
from mindformers.models.peft_adapter import PeftAdapterError
from mindformers.pet import LoRALinear
from mindformers.pet.lora import LORA_B
from helpers.hf_reference import perturb_

VOCAB, HIDDEN, LAYERS, HEADS, FFN, SEQ, RANK = 128, 64, 2, 4, 96, 64, 4
TOL = 1e-5
IDS = np.random.RandomState(0).randint(3, VOCAB, (2, 16))


def hf_model(kind, layers=LAYERS, hidden=HIDDEN):
    """A tiny HF model: 'gpt2', 'llama_mha', 'llama_gqa' (2 KV heads of 4) or 'glm2' (GlmForCausalLM as ChatGLM2)."""
    torch.manual_seed(1)
    if kind == 'gpt2':
        model = transformers.GPT2LMHeadModel(transformers.GPT2Config(
            vocab_size=VOCAB, n_embd=hidden, n_layer=layers, n_head=HEADS, n_positions=SEQ, bos_token_id=1,
            eos_token_id=2))
    else:
        common = dict(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=FFN, num_hidden_layers=layers,
                      num_attention_heads=HEADS, max_position_embeddings=SEQ, rms_norm_eps=1e-5, pad_token_id=0,
                      bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
        if kind == 'glm2':
            model = transformers.GlmForCausalLM(transformers.GlmConfig(
                head_dim=hidden // HEADS, attention_bias=True, num_key_value_heads=2, **common,
                rope_parameters={'rope_type': 'default', 'rope_theta': 10000.0, 'partial_rotary_factor': 0.5}))
        else:
            model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
                num_key_value_heads=HEADS if kind == 'llama_mha' else 2, **common))
    return perturb_(model, seed=3)


@pytest.fixture(scope='module')
def hf_dirs(tmp_path_factory):
    """{kind: directory} of the HF models, written on first use."""
    made = {}

    def get(kind):
        if kind not in made:
            made[kind] = tmp_path_factory.mktemp(f'hf_{kind}')
            hf_model(kind).save_pretrained(made[kind])
        return made[kind]
    return get


def hf_logits(model):
    with torch.no_grad():
        return model(torch.tensor(IDS)).logits.numpy()


def our_logits(model):
    model.set_train(False)
    return model(ms.Tensor(IDS, ms.int32)).asnumpy()


def lora_factors(model):
    return {p.name: p.asnumpy() for p in model.get_parameters() if 'mindpet_delta_lora' in p.name}


def randomize_b(model, seed):
    rng = np.random.RandomState(seed)
    for _, cell in model.cells_and_names():
        if isinstance(cell, LoRALinear):
            param = getattr(cell, LORA_B)
            param.set_data(ms.Tensor(0.1 * rng.standard_normal(param.shape).astype(np.float32)))


# kind: (our target_modules, the HF target_modules written, rank_pattern written)
EXPORTS = {
    'gpt2': (['qkv_proj', 'o_proj', 'fc_in'], ['attn.c_proj', 'c_attn', 'c_fc'], {}),
    'llama_mha': (['q_proj', 'v_proj', 'down_proj'], ['down_proj', 'q_proj', 'v_proj'], {}),
    'llama_gqa': (['q_proj', 'k_proj', 'v_proj', 'o_proj', 'gate_proj', 'up_proj', 'down_proj'],
                  ['down_proj', 'gate_proj', 'k_proj', 'o_proj', 'q_proj', 'up_proj', 'v_proj'], {}),
    'glm2': (['q_proj', 'k_proj', 'gate_proj', 'up_proj'], ['gate_up_proj', 'k_proj', 'q_proj'],
             {'gate_up_proj': 2 * RANK}),  # gate and up share one HF module: a block-diagonal rank-2r LoRA
    'glm2_gate_only': (['gate_proj', 'v_proj'], ['gate_up_proj', 'v_proj'], {}),  # rank r, zero rows for up
}


@pytest.mark.parametrize('case', sorted(EXPORTS))
def test_our_adapter_loads_in_peft_with_the_same_logits(case, hf_dirs, tmp_path):
    kind = case.split('_gate')[0]
    ours_targets, hf_targets, rank_pattern = EXPORTS[case]
    lora = {'pet_type': 'lora', 'lora_rank': RANK, 'lora_alpha': 8, 'lora_dropout': 0.05,
            'target_modules': ours_targets}
    ours = AutoModel.from_pretrained(hf_dirs(kind), pet_config=lora)
    base = hf_logits(transformers.AutoModelForCausalLM.from_pretrained(hf_dirs(kind)).eval())
    assert np.abs(our_logits(ours) - base).max() < TOL  # B = 0: the HF model's function
    randomize_b(ours, seed=5)
    expected = our_logits(ours)
    assert np.abs(expected - base).max() > 1e-2  # the adapter matters
    save_peft_adapter(ours, tmp_path / 'adapter', base_model_name_or_path='tiny/base')

    written = json.loads((tmp_path / 'adapter' / 'adapter_config.json').read_text())
    assert (written['peft_type'], written['task_type'], written['r'], written['lora_alpha']) == \
        ('LORA', 'CAUSAL_LM', RANK, 8)
    assert written['target_modules'] == hf_targets and written['rank_pattern'] == rank_pattern
    assert written['lora_dropout'] == 0.05 and written['base_model_name_or_path'] == 'tiny/base'
    assert written['fan_in_fan_out'] is (kind == 'gpt2') and written['bias'] == 'none'
    tensors = load_file(tmp_path / 'adapter' / 'adapter_model.safetensors')
    assert all(k.startswith('base_model.model.') and k.endswith(('.lora_A.weight', '.lora_B.weight'))
               for k in tensors)

    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dirs(kind))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        with_adapter = peft.PeftModel.from_pretrained(hf, tmp_path / 'adapter').eval()
    assert not [w for w in caught if 'adapter keys' in str(w.message)]
    report = with_adapter.load_adapter(tmp_path / 'adapter', adapter_name='check')
    assert report.missing_keys == [] and report.unexpected_keys == []
    assert np.abs(hf_logits(with_adapter) - expected).max() < TOL

    back = AutoModel.from_pretrained(hf_dirs(kind))  # and back into ours: the same layers and factors
    back.load_peft_adapter(tmp_path / 'adapter')
    assert back.pet_config.target_modules == tuple(sorted(ours_targets))
    got, want = lora_factors(back), lora_factors(ours)
    assert sorted(got) == sorted(want)
    for name, value in want.items():
        np.testing.assert_array_equal(got[name], value, err_msg=name)


# kind: (PEFT target_modules, our target_modules the adapter gives)
IMPORTS = {'gpt2': (['c_attn', 'mlp.c_proj'], ('fc_out', 'qkv_proj')),
           'llama_mha': (['k_proj', 'o_proj', 'up_proj'], ('k_proj', 'o_proj', 'up_proj')),
           'llama_gqa': (['q_proj', 'v_proj'], ('q_proj', 'v_proj')),
           'glm2': (['q_proj', 'v_proj', 'gate_up_proj'], ('gate_proj', 'q_proj', 'up_proj', 'v_proj'))}


def peft_adapter(hf_dir, directory, targets, seed=7, **options):
    """An adapter PEFT makes on the HF model in `hf_dir` (B random), saved to `directory`; returns its logits."""
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir)
    model = peft.get_peft_model(hf, peft.LoraConfig(r=RANK, lora_alpha=12, lora_dropout=0.1, target_modules=targets,
                                                    task_type='CAUSAL_LM', **options)).eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if 'lora_B' in name:
                param.copy_(0.1 * torch.randn(param.shape, generator=generator))
    model.save_pretrained(directory)
    return hf_logits(model)


@pytest.mark.parametrize('kind', sorted(IMPORTS))
def test_peft_adapter_loads_in_ours_with_the_same_logits(kind, hf_dirs, tmp_path):
    targets, ours_targets = IMPORTS[kind]
    expected = peft_adapter(hf_dirs(kind), tmp_path / 'adapter', targets,
                            fan_in_fan_out=kind == 'gpt2')
    ours = AutoModel.from_pretrained(hf_dirs(kind))
    base = {p.name: p.asnumpy() for p in ours.get_parameters()}
    assert load_peft_adapter(ours, tmp_path / 'adapter') is ours
    config = ours.pet_config
    assert (config.lora_rank, config.lora_alpha, config.lora_dropout) == (RANK, 12, 0.1)
    assert config.target_modules == ours_targets
    assert np.abs(our_logits(ours) - expected).max() < TOL
    for name, value in base.items():  # only the delta was added
        np.testing.assert_array_equal(ours.parameters_dict()[name].asnumpy(), value, err_msg=name)
    assert sorted(p.name for p in ours.trainable_params()) == sorted(lora_factors(ours))


# --------------------------------------------------------------------------------------------- refused adapters
@pytest.fixture(scope='module')
def adapter(hf_dirs, tmp_path_factory):
    """A PEFT adapter on the GQA LLaMA: q_proj and o_proj square [64, 64], v_proj [32, 64]."""
    directory = tmp_path_factory.mktemp('peft') / 'adapter'
    peft_adapter(hf_dirs('llama_gqa'), directory, ['q_proj', 'v_proj', 'o_proj'])
    return directory


@pytest.fixture(scope='module')
def plain(hf_dirs):
    """Our GQA LLaMA without PET, shared by the refusals (each leaves it unchanged)."""
    return AutoModel.from_pretrained(hf_dirs('llama_gqa'))


def edited(adapter, directory, tensors=None, config=None):
    """A copy of `adapter` with its tensors passed through `tensors(dict)` and config through `config(dict)`."""
    shutil.copytree(adapter, directory)
    weights, settings = directory / 'adapter_model.safetensors', directory / 'adapter_config.json'
    if tensors:
        data = load_file(weights)
        tensors(data)
        save_file(data, weights)
    if config:
        data = json.loads(settings.read_text())
        config(data)
        settings.write_text(json.dumps(data))
    return directory


def refused(model, directory, *patterns):
    with pytest.raises(PeftAdapterError) as caught:
        load_peft_adapter(model, directory)
    for pattern in patterns:
        assert pattern in str(caught.value), str(caught.value)
    assert model.pet_config is None and not lora_factors(model)
    return str(caught.value)


KEY = 'base_model.model.model.layers.{}.self_attn.{}.lora_{}.weight'


def test_transposed_factor_of_a_square_layer_is_named(adapter, plain, tmp_path):
    def transpose(data):
        data[KEY.format(0, 'q_proj', 'A')] = np.ascontiguousarray(data[KEY.format(0, 'q_proj', 'A')].T)
    refused(plain, edited(adapter, tmp_path / 'a', transpose),
            f"{KEY.format(0, 'q_proj', 'A')} (64, {RANK}) (expected ({RANK}, 64)")


def test_swapped_factors_are_caught_although_both_would_fit_the_layer(adapter, plain, tmp_path):
    a, b = KEY.format(1, 'o_proj', 'A'), KEY.format(1, 'o_proj', 'B')

    def swap(data):
        data[a], data[b] = data[b], data[a]
    message = refused(plain, edited(adapter, tmp_path / 'a', swap), f"{a} (64, {RANK})", f"{b} ({RANK}, 64)")
    assert 'lora_A is [r, in_features]' in message and 'lora_B is [out_features, r]' in message


def test_missing_and_unexpected_keys_are_named(adapter, plain, tmp_path):
    def change(data):
        del data[KEY.format(1, 'v_proj', 'B')]
        data['base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector'] = np.ones(64, np.float32)
        data[KEY.format(0, 'k_proj', 'A')] = np.ones((RANK, 64), np.float32)  # k_proj is not a target
    refused(plain, edited(adapter, tmp_path / 'a', change), f"missing {KEY.format(1, 'v_proj', 'B')}",
            'unexpected base_model.model.model.layers.0.self_attn.k_proj.lora_A.weight',
            'base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector')


@pytest.mark.parametrize('base, named', [
    ({'layers': 3}, f"unexpected {KEY.format(2, 'o_proj', 'A')}"),  # a deeper base
    ({'layers': 1}, f"missing {KEY.format(1, 'o_proj', 'A')}"),  # a shallower one
    ({'hidden': 48}, f"{KEY.format(0, 'q_proj', 'A')} ({RANK}, 48) (expected ({RANK}, 64)"),
])
def test_adapter_of_another_base_is_refused(base, named, plain, tmp_path):
    hf = hf_model('llama_gqa', **base)
    hf.save_pretrained(tmp_path / 'hf')
    peft_adapter(tmp_path / 'hf', tmp_path / 'adapter', ['q_proj', 'v_proj', 'o_proj'])
    refused(plain, tmp_path / 'adapter', named)


@pytest.mark.parametrize('key, value, named', [
    ('use_rslora', True, 'rsLoRA scales by lora_alpha / sqrt(r)'),
    ('use_dora', True, 'DoRA'),
    ('bias', 'lora_only', "only bias 'none'"),
    ('modules_to_save', ['lm_head'], 'replace whole modules'),
    ('layers_to_transform', [0], 'a target_modules list of full module paths selects layers'),
    ('peft_type', 'IA3', 'only LORA adapters'),
    ('task_type', 'SEQ_CLS', 'only CAUSAL_LM'),
    ('init_lora_weights', 'pissa', 'changes the base weights'),
    ('use_bdlora', {'blocks': 2}, 'not supported here'),  # an option this code does not know
    ('r', 0, 'positive'),
    ('alpha_pattern', {'q_proj': 99}, 'one scale for every layer'),
    ('target_modules', ['c_attn'], 'selects no module'),
])
def test_unsupported_options_are_refused_by_name(key, value, named, adapter, plain, tmp_path):
    message = refused(plain, edited(adapter, tmp_path / 'a', config=lambda data: data.update({key: value})), named)
    assert key in message


def test_model_with_other_lora_and_other_families_are_refused(adapter, hf_dirs, tmp_path):
    other = AutoModel.from_pretrained(hf_dirs('llama_gqa'), pet_config={
        'pet_type': 'lora', 'lora_rank': 2, 'lora_alpha': 12, 'target_modules': ['q_proj', 'v_proj', 'o_proj']})
    with pytest.raises(PeftAdapterError, match=f"has r {RANK}, lora_alpha 12; the model's LoRA has lora_rank 2"):
        load_peft_adapter(other, adapter)
    fewer = AutoModel.from_pretrained(hf_dirs('llama_gqa'), pet_config={
        'pet_type': 'lora', 'lora_rank': RANK, 'lora_alpha': 12, 'target_modules': ['q_proj', 'v_proj']})
    with pytest.raises(PeftAdapterError, match=r'only in the adapter model\.layers\.0\.self_attn\.o_proj'):
        load_peft_adapter(fewer, adapter)
    glm = AutoModel.from_config('glm_tiny', pet_config={'pet_type': 'lora'})
    with pytest.raises(PeftAdapterError, match='families with a HuggingFace naming for them are gpt2, llama, glm2'):
        save_peft_adapter(glm, tmp_path / 'glm')


def test_saving_needs_lora_and_a_new_directory(hf_dirs, tmp_path):
    with pytest.raises(PeftAdapterError, match='has no PET; only a LoRA adapter can be saved'):
        save_peft_adapter(AutoModel.from_pretrained(hf_dirs('gpt2')), tmp_path / 'none')
    ours = AutoModel.from_pretrained(hf_dirs('gpt2'), pet_config={'pet_type': 'lora'})
    os.makedirs(tmp_path / 'taken')
    (tmp_path / 'taken' / 'notes.txt').write_text('keep')
    with pytest.raises(ConversionError, match='exists and is not empty'):
        ours.save_peft_adapter(tmp_path / 'taken')
    assert os.listdir(tmp_path / 'taken') == ['notes.txt']
    with pytest.raises(PeftAdapterError, match='has no adapter_config.json'):
        ours.load_peft_adapter(tmp_path / 'taken')


def test_adapter_in_the_original_chatglm2_naming(hf_dirs, tmp_path):
    """THUDM's ChatGLM2 names its fused q|k|v projection `transformer.encoder.layers.N.self_attention.query_key_value`
    (the target of ChatGLM2 LoRAs): PEFT's q/k/v LoRAs re-packed there as one rank-3r block-diagonal LoRA load as
    the three."""
    expected = peft_adapter(hf_dirs('glm2'), tmp_path / 'glm', ['q_proj', 'k_proj', 'v_proj'])
    glm = load_file(tmp_path / 'glm' / 'adapter_model.safetensors')
    fused = {}
    for layer in range(LAYERS):
        a = [glm[KEY.format(layer, f'{p}_proj', 'A')] for p in 'qkv']
        b = [glm[KEY.format(layer, f'{p}_proj', 'B')] for p in 'qkv']
        block_diagonal = np.zeros((sum(len(x) for x in b), 3 * RANK), np.float32)
        for j, rows in enumerate(b):
            start = sum(len(x) for x in b[:j])
            block_diagonal[start:start + len(rows), j * RANK:(j + 1) * RANK] = rows
        key = f'base_model.model.transformer.encoder.layers.{layer}.self_attention.query_key_value.lora_'
        fused[key + 'A.weight'], fused[key + 'B.weight'] = np.concatenate(a), block_diagonal
    os.makedirs(tmp_path / 'chatglm')
    save_file(fused, tmp_path / 'chatglm' / 'adapter_model.safetensors')
    config = json.loads((tmp_path / 'glm' / 'adapter_config.json').read_text())
    config.update(target_modules=['query_key_value'], rank_pattern={'query_key_value': 3 * RANK},
                  alpha_pattern={'query_key_value': 3 * 12})
    (tmp_path / 'chatglm' / 'adapter_config.json').write_text(json.dumps(config))
    ours = AutoModel.from_pretrained(hf_dirs('glm2')).load_peft_adapter(tmp_path / 'chatglm')
    assert ours.pet_config.target_modules == ('k_proj', 'q_proj', 'v_proj')
    assert np.abs(our_logits(ours) - expected).max() < TOL
