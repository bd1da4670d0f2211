"""Merging a LoRA finetune into its base (tiny GQA LLaMA, fp32, a few real training steps): the merged model computes
what the unmerged one does, the base weights never moved during training, and `transform_ckpt_lora.py` turns a run
config + base + delta (or a full, a sliced or a PEFT source) into a plain checkpoint and a HuggingFace directory that
load with the same logits; bad command lines and files are refused by name with nothing written."""
import json
import os

import numpy as np
import pytest
import torch
import transformers
import mindspore as ms
from mindspore import nn

from mindformers import AutoModel
from mindformers.parallel.config import build_parallel_config
from mindformers.parallel.layout import parameter_layouts
from mindformers.parallel.reshard import transform_checkpoint
from mindformers.parallel.strategy import write_strategy_files
from mindformers.pet import LoRALinear
from mindformers.tools import transform_ckpt_lora
from mindformers.tools.checkpoint import load_checkpoint_file, save_checkpoint_atomic
from helpers import REPO
from helpers.cli import error_line, json_result, run

TOL = 1e-5
RANK, ALPHA = 4, 8
SIZES = {'vocab_size': 128, 'hidden_size': 64, 'num_layers': 2, 'num_heads': 4, 'n_kv_heads': 2,
         'intermediate_size': 96, 'seq_length': 32}
IDS = np.random.RandomState(0).randint(3, 128, (4, 17))


def run_yaml(path, pet_config=None):
    """A run YAML: the tiny LLaMA's, at SIZES, with `pet_config`."""
    lines = [f"base_config: {os.path.join(REPO, 'configs', 'llama', 'run_llama_tiny.yaml')}", 'model:',
             '  model_config:'] + [f'    {key}: {value}' for key, value in SIZES.items()]
    if pet_config:
        lines.append(f'    pet_config: {json.dumps(pet_config)}')
    path.write_text('\n'.join(lines) + '\n')
    return str(path)


def logits(model):
    model.set_train(False)
    return model(ms.Tensor(IDS[:, :16], ms.int32)).asnumpy()


def arrays(path):
    return {name: value.asnumpy() for name, value in load_checkpoint_file(str(path)).items()}


@pytest.fixture(scope='module')
def finetune(tmp_path_factory):
    """A LoRA finetune (q/v/o, 3 Adam steps) of a random base: the files and the unmerged model's logits."""
    root = tmp_path_factory.mktemp('merge')
    lora = {'pet_type': 'lora', 'lora_rank': RANK, 'lora_alpha': ALPHA, 'target_modules': ['q_proj', 'v_proj', 'o_proj']}
    files = {'root': root, 'base_yaml': run_yaml(root / 'base.yaml'), 'lora_yaml': run_yaml(root / 'lora.yaml', lora),
             'base': str(root / 'base.ckpt'), 'delta': str(root / 'delta.ckpt'), 'full': str(root / 'full.ckpt')}
    save_checkpoint_atomic(AutoModel.from_config(files['base_yaml']), files['base'])
    model = AutoModel.from_pretrained(files['lora_yaml'], checkpoint_name_or_path=files['base'])
    step = nn.TrainOneStepCell(model, nn.Adam(model.trainable_params(), learning_rate=1e-2))
    model.set_train(True)
    files['losses'] = [float(step(ms.Tensor(IDS, ms.int32)).asnumpy()) for _ in range(3)]
    save_checkpoint_atomic([{'name': p.name, 'data': p} for p in model.trainable_params()], files['delta'])
    save_checkpoint_atomic(model, files['full'])
    files['logits'], files['model'] = logits(model), model
    return files


def test_training_moved_only_the_delta(finetune):
    assert finetune['losses'][-1] < finetune['losses'][0]
    base, full = arrays(finetune['base']), arrays(finetune['full'])
    for name, value in base.items():
        assert full[name].tobytes() == value.tobytes(), name  # bit-identical
    delta = arrays(finetune['delta'])
    assert sorted(delta) == sorted(finetune['model'].pet_parameter_names)
    assert all(np.abs(value).max() > 0 for name, value in delta.items() if name.endswith('lora_b'))


def test_merge_pet_folds_the_scaled_product_and_keeps_the_function(finetune):
    model = AutoModel.from_pretrained(finetune['lora_yaml'], checkpoint_name_or_path=finetune['full'])
    full = arrays(finetune['full'])
    merged = model.merge_pet()
    assert merged is model and model.pet_config is None and model.config.pet_config is None
    assert not any(isinstance(cell, LoRALinear) for _, cell in model.cells_and_names())
    weights = {p.name: p.asnumpy() for p in model.get_parameters()}
    assert sorted(weights) == sorted(n for n in full if 'mindpet_delta' not in n)
    assert all(p.requires_grad for p in model.get_parameters())
    for layer in range(SIZES['num_layers']):
        for proj in ('q_proj', 'v_proj', 'o_proj', 'k_proj'):
            path = f'model.layers.{layer}.self_attn.{proj}.'
            expected = full[path + 'weight'].astype(np.float64)
            if proj != 'k_proj':
                expected += ALPHA / RANK * (full[path + 'mindpet_delta_lora_b'].astype(np.float64)
                                            @ full[path + 'mindpet_delta_lora_a'].astype(np.float64))
            np.testing.assert_allclose(weights[path + 'weight'], expected, rtol=0, atol=1e-6, err_msg=path)
    assert np.abs(logits(model) - finetune['logits']).max() < TOL


def test_cli_writes_a_plain_checkpoint_and_a_hf_directory(finetune):
    root = finetune['root']
    proc = run('mindformers/tools/transform_ckpt_lora.py', '--config', finetune['lora_yaml'], '--base_checkpoint',
               finetune['base'], '--src_ckpt_path_or_dir', finetune['delta'], '--dst_ckpt_dir', root / 'out',
               '--hf_dir', root / 'hf')
    assert proc.returncode == 0, proc.stderr
    summary = json_result(proc.stdout)
    assert summary == {'config': finetune['lora_yaml'], 'source': finetune['delta'], 'source_kind': 'delta',
                       'merged_layers': 3 * SIZES['num_layers'], 'lora_rank': RANK, 'lora_alpha': ALPHA,
                       'scaling': ALPHA / RANK, 'dst_ckpt_dir': str(root / 'out'),
                       'checkpoint': str(root / 'out' / 'model.ckpt'), 'hf_dir': str(root / 'hf')}
    assert sorted(os.listdir(root / 'out')) == ['config.json', 'model.ckpt']
    plain = AutoModel.from_pretrained(root / 'out')
    assert plain.pet_config is None and not any('mindpet' in p.name for p in plain.get_parameters())
    assert np.abs(logits(plain) - finetune['logits']).max() < TOL
    hf = transformers.AutoModelForCausalLM.from_pretrained(root / 'hf').eval()
    with torch.no_grad():
        hf_logits = hf(torch.tensor(IDS[:, :16])).logits.numpy()
    assert np.abs(hf_logits - finetune['logits']).max() < TOL


def merged_in_process(finetune, out, *args):
    """transform_ckpt_lora.main with `args` writing to `out`; returns the merged model's logits."""
    assert transform_ckpt_lora.main([str(a) for a in args] + ['--dst_ckpt_dir', str(out)]) == 0
    return logits(AutoModel.from_pretrained(out))


def test_full_sliced_and_peft_sources(finetune, tmp_path):
    # a full checkpoint needs no base
    got = merged_in_process(finetune, tmp_path / 'from_full', '--config', finetune['lora_yaml'],
                            '--src_ckpt_path_or_dir', finetune['full'])
    assert np.abs(got - finetune['logits']).max() < TOL
    # sliced for model parallel 2 (MindSpore's transform_checkpoints), merged into one piece first
    parallel = build_parallel_config({'data_parallel': 1, 'model_parallel': 2})
    model = finetune['model']
    strategy = write_strategy_files(parameter_layouts(model.config, parallel, model_class=type(model)),
                                    str(tmp_path / 'strategy'))[0]
    save_checkpoint_atomic(model, str(tmp_path / 'complete' / 'rank_0' / 'full.ckpt'))
    transform_checkpoint(tmp_path / 'complete', tmp_path / 'sliced', None, strategy)
    got = merged_in_process(finetune, tmp_path / 'from_sliced', '--config', finetune['lora_yaml'],
                            '--src_ckpt_strategy', strategy, '--src_ckpt_path_or_dir', tmp_path / 'sliced')
    assert np.abs(got - finetune['logits']).max() < TOL
    # a PEFT adapter: rank and alpha from its adapter_config.json, on a config without pet_config
    model.save_peft_adapter(tmp_path / 'adapter')
    got = merged_in_process(finetune, tmp_path / 'from_peft', '--config', finetune['base_yaml'], '--base_checkpoint',
                            finetune['base'], '--src_ckpt_path_or_dir', tmp_path / 'adapter')
    assert np.abs(got - finetune['logits']).max() < TOL


def _flags(finetune, tmp_path, case):
    lora, base, delta = finetune['lora_yaml'], finetune['base'], finetune['delta']
    other_rank = run_yaml(tmp_path / 'rank2.yaml', {'pet_type': 'lora', 'lora_rank': 2, 'lora_alpha': ALPHA,
                                                    'target_modules': ['q_proj', 'v_proj', 'o_proj']})
    taken = tmp_path / 'taken'
    os.makedirs(taken)
    (taken / 'keep.txt').write_text('keep')
    common = ['--dst_ckpt_dir', tmp_path / 'out']
    return {
        'scale': ['--config', lora, '--base_checkpoint', base, '--src_ckpt_path_or_dir', delta, '--lora_scaling', '2',
                  *common],
        'taken': ['--config', lora, '--base_checkpoint', base, '--src_ckpt_path_or_dir', delta, '--dst_ckpt_dir',
                  taken],
        'same_outputs': ['--config', lora, '--src_ckpt_path_or_dir', delta, *common, '--hf_dir', tmp_path / 'out'],
        'no_source': ['--config', lora, '--src_ckpt_path_or_dir', tmp_path / 'nowhere.ckpt', *common],
        'no_base': ['--config', lora, '--src_ckpt_path_or_dir', delta, *common],
        'no_pet_config': ['--config', finetune['base_yaml'], '--base_checkpoint', base, '--src_ckpt_path_or_dir',
                          delta, *common],
        'no_delta': ['--config', lora, '--base_checkpoint', base, '--src_ckpt_path_or_dir', base, *common],
        'other_rank': ['--config', other_rank, '--base_checkpoint', base, '--src_ckpt_path_or_dir', delta, *common],
    }[case]


@pytest.mark.parametrize('case, code, named', [
    ('scale', 2, '--lora_scaling is not accepted: the scale is lora_alpha / lora_rank of the LoRA config'),
    ('taken', 2, 'already exists'),
    ('same_outputs', 2, '--hf_dir and --dst_ckpt_dir must differ'),
    ('no_source', 2, 'nowhere.ckpt does not exist'),
    ('no_base', 2, 'no base weights'),
    ('no_pet_config', 1, 'model.model_config.pet_config is not set'),
    ('no_delta', 1, 'it holds no LoRA delta'),
    ('other_rank', 1, 'model.layers.0.self_attn.q_proj.mindpet_delta_lora_a (checkpoint (4, 64), model (2, 64))'),
])
def test_cli_refusals_name_the_problem_and_write_nothing(case, code, named, finetune, tmp_path, capsys):
    args = _flags(finetune, tmp_path, case)
    before = sorted(os.listdir(tmp_path))
    assert transform_ckpt_lora.main([str(a) for a in args]) == code
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith('transform_ckpt_lora.py: error: ') and named in last, last
    assert sorted(os.listdir(tmp_path)) == before
    assert os.listdir(tmp_path / 'taken') == ['keep.txt']


def test_cli_errors_are_one_line_on_stderr(finetune, tmp_path):
    scale = run('mindformers/tools/transform_ckpt_lora.py', '--config', finetune['lora_yaml'], '--src_ckpt_path_or_dir',
                finetune['delta'], '--dst_ckpt_dir', tmp_path / 'out', '--lora_scaling', '1')
    assert 'the scale is lora_alpha / lora_rank' in error_line(scale, 2)
    no_delta = run('mindformers/tools/transform_ckpt_lora.py', '--config', finetune['lora_yaml'], '--base_checkpoint',
                   finetune['base'], '--src_ckpt_path_or_dir', finetune['base'], '--dst_ckpt_dir', tmp_path / 'out')
    assert 'holds no LoRA delta' in error_line(no_delta, 1)
    assert not os.path.exists(tmp_path / 'out')
