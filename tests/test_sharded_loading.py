"""Loading that fits the machine (mindformers/tools/weights.py): sharded safetensors sets (ours from
save_pretrained(max_shard_size=...), HuggingFace's with their index) load shard by shard to the same logits as one
file, on every family; weights stored in fp16/bf16 compute in fp32 close to fp32 storage; strict errors name every
missing, unexpected and mis-shaped tensor; loading a ~300 MB model in a fresh process stays within its size plus
its largest tensor plus a margin, where reading the whole checkpoint first does not."""
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
from mindspore import Tensor

from mindformers import AutoConfig, AutoModel
from mindformers.models.base_model import parameter_array
from mindformers.tools.checkpoint import CheckpointError
from mindformers.tools.weights import (init_remaining, load_weights, no_weight_init, open_weights, parameter_specs,
                                       save_sharded, source_items)
from helpers import REPO
from helpers.tiny import FAMILIES, tiny_yaml

SMALL = dict(num_layers=2, seq_length=16, initializer_range=0.2)
PROMPT = np.random.default_rng(0).integers(5, 400, (2, 8)).astype(np.int32)  # below every family's special ids


def _logits(model):
    model.set_train(False)
    return model(Tensor(PROMPT)).asnumpy()


def _arrays(model):
    return {p.name: parameter_array(p) for p in model.get_parameters()}


@pytest.fixture(scope='module')
def saved(tmp_path_factory):
    """saved(family) -> (the tiny random model, its single-file directory, its sharded directory)."""
    built = {}

    def get(family):
        if family not in built:
            model = AutoModel.from_config(AutoConfig.from_pretrained(tiny_yaml(family), **SMALL))
            root = tmp_path_factory.mktemp(family)
            largest = max(p.size * 4 for p in model.get_parameters())
            model.save_pretrained(root / 'single')
            model.save_pretrained(root / 'sharded', max_shard_size=largest + 1)
            built[family] = (model, root / 'single', root / 'sharded')
        return built[family]
    return get


@pytest.fixture(scope='module')
def expected_logits(saved):
    """expected_logits(family): the logits of saved(family)'s model, computed once."""
    computed = {}

    def get(family):
        if family not in computed:
            computed[family] = _logits(saved(family)[0])
        return computed[family]
    return get


@pytest.mark.parametrize('family', FAMILIES)
def test_a_sharded_set_loads_like_one_file(saved, expected_logits, family):
    """Every family: the sharded set (HF's index format) and the single file load the same weights bit for bit;
    GPT-2 and LLaMA also compute the same logits."""
    model, single, sharded = saved(family)
    index = json.loads((sharded / 'model.safetensors.index.json').read_text())
    shards = sorted(f for f in os.listdir(sharded) if f.endswith('.safetensors'))
    assert len(shards) > 2 and set(index['weight_map'].values()) == set(shards)
    source = open_weights(sharded)
    assert index['metadata']['total_size'] == sum(source.nbytes(n) for n in source.names())
    assert not os.path.exists(single / 'model.safetensors.index.json')
    from_shards = AutoModel.from_pretrained(sharded)
    for loaded in (AutoModel.from_pretrained(single), from_shards):
        _assert_same_weights(loaded, _arrays(model))
    if family in ('gpt2', 'llama'):
        np.testing.assert_array_equal(_logits(from_shards), expected_logits(family))


def _assert_same_weights(model, expected):
    got = _arrays(model)
    assert sorted(got) == sorted(expected)
    for name, value in expected.items():
        np.testing.assert_array_equal(got[name], value, err_msg=name)


def test_a_checkpoint_path_may_name_a_sharded_set(saved):
    model, _, sharded = saved('gpt2')
    config = AutoConfig.from_pretrained(sharded)
    for given in (sharded / 'model.safetensors.index.json', sharded):  # the index, or the directory holding it
        config.checkpoint_name_or_path = str(given)
        _assert_same_weights(AutoModel.from_config(config), _arrays(model))


@pytest.mark.parametrize('family', ['gpt2', 'llama'])
def test_a_sharded_huggingface_directory_converts_per_tensor(family, tmp_path):
    """transformers' own sharded save (its index format, Conv1D transposes for GPT-2) loads like its single file."""
    import torch
    from transformers import (GPT2Config as HFGPT2Config, GPT2LMHeadModel as HFGPT2, LlamaConfig as HFLlamaConfig,
                              LlamaForCausalLM as HFLlama)
    torch.manual_seed(0)
    if family == 'gpt2':
        hf = HFGPT2(HFGPT2Config(vocab_size=512, n_embd=32, n_layer=2, n_head=2, n_positions=32))
    else:
        hf = HFLlama(HFLlamaConfig(vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32))
    hf.eval()
    hf.save_pretrained(tmp_path / 'one', safe_serialization=True)
    hf.save_pretrained(tmp_path / 'shards', safe_serialization=True, max_shard_size='20KB')
    assert (tmp_path / 'shards' / 'model.safetensors.index.json').is_file()
    with torch.no_grad():
        reference = hf(torch.from_numpy(PROMPT).long()).logits.numpy()
    from_shards = AutoModel.from_pretrained(tmp_path / 'shards')
    _assert_same_weights(from_shards, _arrays(AutoModel.from_pretrained(tmp_path / 'one')))
    np.testing.assert_allclose(_logits(from_shards), reference, atol=1e-4)


@pytest.mark.parametrize('dtype, tolerance', [('float16', 5e-3), ('bfloat16', 4e-2)])
def test_fp16_and_bf16_storage_compute_in_fp32_close_to_fp32(saved, expected_logits, dtype, tolerance):
    """Weights stored in half precision, the model computing in fp32 (CPU kernels included): logits within
    `tolerance` x the logits' range of fp32 storage (fp16 keeps 11 significant bits, bf16 8; measured on these
    tiny models with weights of std 0.2: fp16 0.8e-3 (GPT-2) and 1.4e-3 (LLaMA), bf16 1.3e-2 (LLaMA), so the
    bounds are about 3x that)."""
    for family in ('gpt2', 'llama'):
        _, _, sharded = saved(family)
        expected = expected_logits(family)
        model = AutoModel.from_pretrained(sharded, param_init_type=dtype)
        assert {str(p.dtype).lower() for p in model.get_parameters()} == {dtype}
        got = _logits(model)
        assert got.dtype == np.float32
        span = float(expected.max() - expected.min())
        assert np.abs(got - expected).max() < tolerance * span, family


def test_fp16_storage_generates_with_the_kv_cache(saved):
    """Cached greedy decoding with fp16 weights equals decoding without the cache (bf16 with the cache does not run
    on CPU: MindSpore's CPU TensorMove has no bfloat16 kernel)."""
    _, _, sharded = saved('llama')
    outputs = [np.asarray(AutoModel.from_pretrained(sharded, param_init_type='float16', use_past=use_past)
                          .generate(PROMPT[:1, :6], max_new_tokens=4, do_sample=False)) for use_past in (True, False)]
    np.testing.assert_array_equal(outputs[0], outputs[1])


def test_half_precision_sets_round_trip(saved, tmp_path):
    """A model stored in bf16 saves bf16 shards (half the bytes) that load back bit for bit."""
    _, _, sharded = saved('llama')
    model = AutoModel.from_pretrained(sharded, param_init_type='bfloat16')
    model.save_pretrained(tmp_path, max_shard_size='20KB')
    source = open_weights(tmp_path)
    assert {source.dtype(n) for n in source.names()} == {'bfloat16'}
    back = AutoModel.from_pretrained(tmp_path)
    assert {str(p.dtype).lower() for p in back.get_parameters()} == {'bfloat16'}
    _assert_same_weights(back, _arrays(model))
    import torch
    from safetensors.torch import load_file  # the files are HuggingFace's format: its reader agrees
    index = json.loads((tmp_path / 'model.safetensors.index.json').read_text())
    name, file = next(iter(index['weight_map'].items()))
    tensor = load_file(str(tmp_path / file))[name]
    assert tensor.dtype == torch.bfloat16
    np.testing.assert_array_equal(tensor.float().numpy(), _arrays(model)[name])


def test_load_weights_runs_the_transform_on_each_tensor(saved):
    """The `transform` hook (quantize-on-load uses it): what it yields is loaded, and a name it invents that the
    model lacks is named in the error."""
    model, _, sharded = saved('gpt2')
    config = AutoConfig.from_pretrained(sharded)
    with no_weight_init():
        target = AutoModel.from_config(config)
    seen = []

    def doubled(name, array):
        seen.append(name)
        yield name, array * 2
    source = open_weights(sharded)
    load_weights(target, source_items(source), source.path, transform=doubled)
    assert sorted(seen) == sorted(source.names())
    original = _arrays(model)
    for name, value in _arrays(target).items():
        np.testing.assert_array_equal(value, original[name] * 2, err_msg=name)
    config.checkpoint_name_or_path = str(sharded)

    def with_scale(name, array):
        return [(name, array), (name + '_scale', array)] if name == 'backbone.final_layernorm.weight' else \
            [(name, array)]
    with pytest.raises(CheckpointError, match=r'unexpected backbone\.final_layernorm\.weight_scale'):
        target.load_checkpoint(config, transform=with_scale)


def test_strict_errors_name_every_problem(saved, tmp_path):
    """A set missing one tensor, holding a foreign one and a mis-shaped one: one error naming the three; nothing
    read before the check."""
    _, _, sharded = saved('gpt2')
    source = open_weights(sharded)
    names = source.names()
    dropped = names[0]
    reshaped = next(n for n in names[1:] if len(set(source.shape(n))) == 2)  # a non-square matrix
    specs = [(n, source.dtype(n), source.shape(n)[::-1] if n == reshaped else source.shape(n))
             for n in names if n != dropped] + [('backbone.extra.weight', 'float32', (3,))]
    arrays = {n: source.read(n) for n in names}
    arrays[reshaped] = arrays[reshaped].T
    arrays['backbone.extra.weight'] = np.zeros(3, np.float32)
    save_sharded(str(tmp_path), specs, arrays.__getitem__, max_shard_size='20KB')
    (tmp_path / 'config.json').write_text((sharded / 'config.json').read_text())
    with pytest.raises(CheckpointError) as err:
        AutoModel.from_pretrained(tmp_path)
    message = str(err.value)
    for name in (dropped, reshaped, 'backbone.extra.weight'):
        assert name in message
    assert 'missing' in message and 'shape mismatch' in message


def test_a_missing_or_truncated_shard_is_named(saved, tmp_path):
    _, _, sharded = saved('gpt2')
    for file in os.listdir(sharded):
        (tmp_path / file).write_bytes((sharded / file).read_bytes())
    last = sorted(f for f in os.listdir(tmp_path) if f.endswith('.safetensors'))[-1]
    data = (tmp_path / last).read_bytes()
    (tmp_path / last).write_bytes(data[:len(data) // 2])
    with pytest.raises(CheckpointError, match=f'{last}.*truncated or corrupt'):
        AutoModel.from_pretrained(tmp_path)
    (tmp_path / last).unlink()
    with pytest.raises(CheckpointError, match=f'lacks shard file.*{last}'):
        AutoModel.from_pretrained(tmp_path)


def test_a_model_built_for_a_checkpoint_holds_no_weights_until_loaded(saved):
    config = AutoConfig.from_pretrained(tiny_yaml('llama'), **SMALL)
    with no_weight_init():
        model = AutoModel.from_config(config)
    assert all(p.has_init for p in model.get_parameters())
    init_remaining(model)
    assert not any(p.has_init for p in model.get_parameters())
    assert np.isfinite(_logits(model)).all()


# ----------------------------------------------------------------------------------------------------------------
# peak memory

MIB = 1 << 20
# a LLaMA of ~285 MB in fp32: 71M parameters, the largest tensors the two 16000 x 1024 embeddings (65.5 MB each)
BIG = dict(vocab_size=16000, hidden_size=1024, num_layers=3, num_heads=8, intermediate_size=2816, seq_length=64)
# what loading may add besides the parameters and the one tensor in flight (read from the file, then copied into
# its Parameter): the allocator's slack and Python objects. Measured from the RSS before the load: parameters +
# largest tensor + 15 MB; reading the whole dict first: about twice the parameters + 65 MB.
MARGIN = 64 * MIB


@pytest.fixture(scope='module')
def big_checkpoint(tmp_path_factory):
    """A ~285 MB LLaMA saved as a sharded set (100 MB shards), written tensor by tensor from random values; (its
    directory, parameter bytes, largest tensor bytes)."""
    from mindformers import LlamaConfig, LlamaForCausalLM
    directory = tmp_path_factory.mktemp('big')
    config = LlamaConfig(**BIG)
    with no_weight_init():
        specs = parameter_specs(LlamaForCausalLM(config).get_parameters())
    rng = np.random.default_rng(0)
    shapes = {name: shape for name, _, shape in specs}
    save_sharded(str(directory), specs, lambda name: rng.standard_normal(shapes[name], np.float32) * 0.02,
                 max_shard_size='100MB')
    config.save_pretrained(str(directory))
    sizes = [math.prod(shape) * 4 for shape in shapes.values()]
    return directory, sum(sizes), max(sizes)


def _peak(directory, mode):
    out = subprocess.run([sys.executable, os.path.join(REPO, 'tests', 'helpers', 'load_memory.py'), str(directory),
                          mode], capture_output=True, text=True, timeout=300, check=True,
                         env=dict(os.environ, GLOG_v='3'))
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_loading_a_sharded_model_holds_one_tensor_beside_its_parameters(big_checkpoint):
    directory, model_bytes, largest = big_checkpoint
    assert len([f for f in os.listdir(directory) if f.endswith('.safetensors')]) >= 3
    bound = model_bytes + largest + MARGIN
    streamed = _peak(directory, 'stream')
    whole = _peak(directory, 'whole')
    grown = streamed['peak'] - streamed['before']
    assert grown < bound, (grown / MIB, bound / MIB)
    assert whole['peak'] - whole['before'] > bound  # the whole-dict path: parameters and the dict side by side
