"""The Trainer / run_mindformer.py path loads weights as `from_pretrained` does: a sharded safetensors set given as
--load_checkpoint is read tensor by tensor into a network built without initialising its weights (quantized as it
loads with --quantization int8), predicting what `AutoModel.from_pretrained(dir)` predicts; a 520 MB (fp32) model
loaded int8 from an fp16 set never holds its fp32 weights; predict/evaluate without any weights say so."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from mindformers import AutoConfig, AutoModel, AutoTokenizer
from helpers import REPO
from helpers.tiny import tiny_yaml

PROMPT = 'ROMEO:'
NEW_TOKENS = 6
SEPARATOR = '\n' + '-' * 40 + '\n'


@pytest.fixture(scope='module')
def sharded(tmp_path_factory):
    """The tiny GPT-2 of its run YAML with random weights (std 0.2, so that greedy decoding is not flat), saved as
    a sharded set of 4+ shards."""
    model = AutoModel.from_config(AutoConfig.from_pretrained(tiny_yaml('gpt2'), initializer_range=0.2))
    directory = tmp_path_factory.mktemp('sharded')
    largest = max(p.size * 4 for p in model.get_parameters())
    model.save_pretrained(directory, max_shard_size=largest + 1)
    assert len([f for f in os.listdir(directory) if f.endswith('.safetensors')]) > 3
    return directory


def _expected(directory, **overrides):
    """What `AutoModel.from_pretrained(directory)` continues PROMPT with, greedily, as predict prints it."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_yaml('gpt2'))
    model = AutoModel.from_pretrained(directory, **overrides)
    ids = tokenizer.encode_prompt(PROMPT)
    return tokenizer.decode(model.generate([ids], max_new_tokens=NEW_TOKENS, do_sample=False)[0],
                            skip_special_tokens=True)


@pytest.mark.parametrize('quantization', [None, 'int8'])
def test_run_mindformer_predicts_from_a_sharded_set_like_from_pretrained(sharded, quantization, tmp_path, capsys):
    import run_mindformer
    flags = ['--quantization', quantization] if quantization else []
    assert run_mindformer.main(['--config', tiny_yaml('gpt2'), '--run_mode', 'predict', '--load_checkpoint',
                                str(sharded), '--predict_data', PROMPT, '--generation.max_new_tokens',
                                str(NEW_TOKENS), '--output_dir', str(tmp_path), *flags]) == 0
    out, err = capsys.readouterr()
    overrides = {'quantization': quantization} if quantization else {}
    assert out.split(SEPARATOR)[0] == _expected(sharded, **overrides)
    assert f"loaded weights from {os.path.join(sharded, 'model.safetensors.index.json')}" in err
    assert 'randomly initialised' not in err


def test_a_huggingface_directory_loads_into_the_trainers_network_per_tensor(tmp_path, capsys):
    """--load_checkpoint / predict_checkpoint= naming a HuggingFace GPT-2 directory (sharded): converted as it
    loads, the network holds what `from_pretrained(dir)` holds."""
    import torch
    from transformers import GPT2Config as HFGPT2Config, GPT2LMHeadModel as HFGPT2
    from mindformers import Trainer
    from mindformers.models.base_model import parameter_array
    torch.manual_seed(0)
    hf = HFGPT2(HFGPT2Config(vocab_size=512, n_embd=192, n_layer=4, n_head=4, n_positions=128))
    hf.save_pretrained(tmp_path / 'hf', safe_serialization=True, max_shard_size='1MB')
    trainer = Trainer(args={**_run_config(), 'output_dir': str(tmp_path / 'out')})
    trainer.predict(predict_checkpoint=str(tmp_path / 'hf'), input_data=PROMPT, max_new_tokens=1)
    assert f"loaded weights from {tmp_path / 'hf'}" in capsys.readouterr().err
    expected = {p.name: parameter_array(p) for p in AutoModel.from_pretrained(tmp_path / 'hf').get_parameters()}
    got = {p.name: parameter_array(p) for p in trainer.model.get_parameters()}
    assert sorted(got) == sorted(expected)
    for name, value in expected.items():
        np.testing.assert_array_equal(got[name], value, err_msg=name)


def test_with_pet_base_weights_stream_and_a_delta_loads_over_the_base(sharded, tmp_path, capsys):
    """A LoRA run: a sharded set of base weights is streamed in (the delta keeps its initial values); a delta saved
    as safetensors without meta.json is told from its names and shapes and loads over the base, as before."""
    from mindformers import Trainer
    from mindformers.models.base_model import parameter_array
    from mindformers.tools.weights import parameter_specs, save_sharded
    trainer = Trainer(args={**_run_config(), 'output_dir': str(tmp_path / 'out')}, pet_method='lora')
    trainer.predict(predict_checkpoint=str(sharded), input_data=PROMPT, max_new_tokens=1)
    assert "loaded weights from" in capsys.readouterr().err
    base = AutoModel.from_pretrained(sharded)
    network = trainer.model
    delta = [p for p in network.get_parameters() if p.requires_grad]
    assert delta and all('lora' in p.name for p in delta)
    for param in base.get_parameters():
        np.testing.assert_array_equal(parameter_array(network.parameters_dict()[param.name]), parameter_array(param))
    rng = np.random.default_rng(1)
    values = {p.name: rng.standard_normal(p.shape).astype(np.float32) for p in delta}
    save_sharded(str(tmp_path), parameter_specs(delta), values.__getitem__)
    again = Trainer(args={**_run_config(), 'output_dir': str(tmp_path / 'out'),
                          'model': {**_run_config()['model'], 'model_config': {
                              **_run_config()['model']['model_config'], 'checkpoint_name_or_path': str(sharded)}}},
                    pet_method='lora')
    again.predict(predict_checkpoint=str(tmp_path / 'model.safetensors'), input_data=PROMPT, max_new_tokens=1)
    assert 'loaded the delta checkpoint' in capsys.readouterr().err
    held = again.model.parameters_dict()
    for name, value in values.items():
        np.testing.assert_array_equal(parameter_array(held[name]), value, err_msg=name)
    for param in base.get_parameters():
        np.testing.assert_array_equal(parameter_array(held[param.name]), parameter_array(param))


def test_predict_without_weights_warns_naming_how_to_load_them(tmp_path, capsys):
    from mindformers import Trainer
    config = {**_run_config(), 'output_dir': str(tmp_path)}
    Trainer(args=config).predict(input_data=PROMPT, max_new_tokens=2)
    err = capsys.readouterr().err
    assert 'predict runs on randomly initialised weights' in err
    assert '--load_checkpoint' in err and 'checkpoint_name_or_path' in err


def _run_config():
    from mindformers.tools.register import MindFormerConfig
    return dict(MindFormerConfig(tiny_yaml('gpt2')))


# ----------------------------------------------------------------------------------------------------------------
# peak memory

MIB = 1 << 20
# a LLaMA of 130M parameters: 520 MB in fp32, saved in fp16 (260 MB); int8 about 145 MB (its input table stays
# fp32); the largest tensors 2816 x 1024 (11.5 MB in fp32). Loading int8 peaks at the parameters plus the
# quantizer's NumPy temporaries for one tensor (~5x its fp32 size, measured 58 MB here): ~0.42x the fp32 size.
BIG = dict(vocab_size=2000, hidden_size=1024, num_layers=10, num_heads=8, n_kv_heads=8, intermediate_size=2816,
           seq_length=64)


@pytest.mark.slow
def test_the_trainer_loads_int8_from_an_fp16_set_without_holding_fp32_weights(tmp_path):
    """The Trainer builds the network for the checkpoint (no initial weights) and quantizes each fp16 tensor as it
    is read: the load grows the peak RSS by less than half the model's fp32 size (initialising the fp32 model
    first, as the Trainer did before, takes all of it)."""
    from mindformers import LlamaConfig, LlamaForCausalLM
    from mindformers.tools.weights import no_weight_init, parameter_specs, save_sharded
    with no_weight_init():
        specs = parameter_specs(LlamaForCausalLM(LlamaConfig(**BIG, param_init_type='float16')).get_parameters())
    rng = np.random.default_rng(0)
    shapes = {name: shape for name, _, shape in specs}
    save_sharded(str(tmp_path), specs, lambda name: rng.standard_normal(shapes[name], np.float32) * 0.02,
                 max_shard_size='60MB')
    assert len([f for f in os.listdir(tmp_path) if f.endswith('.safetensors')]) > 3
    fp32_bytes = sum(int(np.prod(shape)) * 4 for shape in shapes.values())
    out = subprocess.run([sys.executable, os.path.join(REPO, 'tests', 'helpers', 'load_memory.py'), str(tmp_path),
                          'trainer', json.dumps(BIG)], capture_output=True, text=True, timeout=300, check=True,
                         env=dict(os.environ, GLOG_v='3'))
    measured = json.loads(out.stdout.strip().splitlines()[-1])
    grown = measured['peak'] - measured['before']
    assert measured['int8_layers'] == 7 * BIG['num_layers'] + 1  # q k v o gate up down per layer, and the head
    assert measured['parameter_bytes'] < fp32_bytes / 3
    assert grown < fp32_bytes / 2, (grown / MIB, fp32_bytes / MIB)
