"""Parallel layouts cover the LoRA delta: strategy files lay out the LoRA matrices (split like the Linear they adapt)
and their optimizer state, none for the frozen base; `only_trainable_params` lays out the delta alone; a delta
checkpoint reshards into a model-parallel layout and back bit-exactly with either strategy, keeps its meta.json
`delta` record and still loads over its base."""
import json

import numpy as np
import pytest
import mindspore as ms

from mindformers import AutoModel
from mindformers.parallel.reshard import transform_checkpoint
from mindformers.tools.checkpoint import load_checkpoint_file, meta_entry, record_checkpoint, save_checkpoint_atomic
from mindformers.tools.export_strategy import main as export_strategy
from mindformers.trainer.delta import delta_info, load_weights

LORA_A, LORA_B = 'mindpet_delta_lora_a', 'mindpet_delta_lora_b'


def tiny_lora(seed=0):
    ms.set_seed(seed)
    return AutoModel.from_config('llama_tiny_lora')


@pytest.fixture(scope='module')
def strategies(tmp_path_factory):
    """The model-parallel (mp 2) strategy files of llama_tiny_lora: every parameter, and the trainable ones only."""
    root = tmp_path_factory.mktemp('strategies')
    for name, extra in (('full', []), ('delta', ['--only_trainable_params'])):
        assert export_strategy(['--config', 'llama_tiny_lora', '--model_parallel', '2', '--output_dir',
                                str(root / name), *extra]) == 0
    return {name: json.loads((root / name / 'ckpt_strategy_rank_0.json').read_text())['parallel_layout_item']
            for name in ('full', 'delta')} | {'root': root}


def test_strategy_files_lay_out_the_delta_and_its_optimizer_state(strategies):
    model = tiny_lora()
    delta = set(model.pet_parameter_names)
    states = {f'{kind}.{name}' for kind in ('adam_m', 'adam_v') for name in delta}
    full = strategies['full']
    assert set(full) == {p.name for p in model.get_parameters()} | states  # no optimizer state for the base
    assert set(strategies['delta']) == delta | states
    # q_proj and v_proj are column-parallel ([out, in] split on out): A [r, in] is whole, B [out, r] split like W
    for layer in range(model.config.num_layers):
        for proj in ('q_proj', 'v_proj'):
            path = f'model.layers.{layer}.self_attn.{proj}'
            assert full[f'{path}.weight']['tensor_map'] == [0, -1]
            assert full[f'{path}.{LORA_A}']['tensor_map'] == [-1, -1]
            assert full[f'{path}.{LORA_B}']['tensor_map'] == full[f'adam_m.{path}.{LORA_B}']['tensor_map'] == [0, -1]


def test_a_row_parallel_target_splits_lora_a_like_its_weight(tmp_path):
    """o_proj is row-parallel ([out, in] split on in): A [r, in] is split on in too, B [out, r] is whole (LLaMA 7B's
    LoRA config targets it; its layout is derived without allocating the 7B weights)."""
    assert export_strategy(['--config', 'llama_7b_lora', '--model_parallel', '2', '--output_dir', str(tmp_path)]) == 0
    layouts = json.loads((tmp_path / 'ckpt_strategy_rank_0.json').read_text())['parallel_layout_item']
    path = 'model.layers.31.self_attn.o_proj'
    assert layouts[f'{path}.weight']['tensor_map'] == [-1, 0]
    assert layouts[f'{path}.{LORA_A}']['tensor_map'] == [-1, 0] and layouts[f'{path}.{LORA_A}']['tensor_shape'] == \
        [16, 4096]
    assert layouts[f'{path}.{LORA_B}']['tensor_map'] == [-1, -1]
    assert f'adam_m.{path}.weight' not in layouts and f'adam_m.{path}.{LORA_A}' in layouts


@pytest.mark.parametrize('strategy', ['full', 'delta'])
def test_a_delta_checkpoint_reshards_and_back_bit_exactly(strategies, strategy, tmp_path):
    model = tiny_lora()
    rng = np.random.default_rng(0)
    delta = {p.name: rng.standard_normal(p.shape).astype(np.float32) for p in model.trainable_params()}
    saved = {**delta, **{f'{k}.{n}': rng.random(v.shape).astype(np.float32) for k in ('adam_m', 'adam_v')
                         for n, v in delta.items()},
             'global_step': np.array([6], np.int32), 'epoch_num': np.array([1], np.int32),
             'step_num': np.array([6], np.int32)}
    source = tmp_path / 'src' / 'rank_0'
    save_checkpoint_atomic(saved, str(source / 'lora.ckpt'))
    record = delta_info(model)
    record_checkpoint(str(source), 'lora.ckpt', 1, 6, 6, keep_max=0, delta=record)
    strategy_dir = str(strategies['root'] / strategy)

    transform_checkpoint(tmp_path / 'src', tmp_path / 'mp2', None, strategy_dir)
    for rank in (0, 1):
        path = str(tmp_path / 'mp2' / f'rank_{rank}' / f'checkpoint_{rank}.ckpt')
        sliced = load_checkpoint_file(path)
        assert set(sliced) == set(saved) and meta_entry(path)['delta'] == record
        b = f'model.layers.0.self_attn.q_proj.{LORA_B}'
        half = delta[b].shape[0] // 2
        np.testing.assert_array_equal(sliced[b].asnumpy(), delta[b][rank * half:(rank + 1) * half])

    transform_checkpoint(tmp_path / 'mp2', tmp_path / 'back', strategy_dir, None)
    back = str(tmp_path / 'back' / 'rank_0' / 'checkpoint_0.ckpt')
    restored = load_checkpoint_file(back)
    for name, value in saved.items():
        np.testing.assert_array_equal(restored[name].asnumpy(), value, err_msg=name)
    fresh = tiny_lora()  # the same base weights
    assert load_weights(fresh, restored, back) == 'delta'
    for param in fresh.trainable_params():
        np.testing.assert_array_equal(param.asnumpy(), delta[param.name])
