"""Parameter layouts under (dp, mp, pp) for every family, derived from the layers' shard declarations, and the
strategy files: read by MindSpore's `transform_checkpoints` (full -> sliced per rank -> full, bit-exact), written by
`export_strategy` and by `only_save_strategy` on CPU."""
import glob
import json
import os
import re
import subprocess
import sys
import time

import numpy as np
import pytest
import mindspore as ms
from mindspore import nn, ops, Parameter
from mindspore.common.initializer import initializer
from mindspore.nn.utils import no_init_parameters

from mindformers.core.parallel_config import ParallelConfig, build_parallel_config, layer_stages
from mindformers.core.parallel_layout import parameter_layouts, write_strategy_files
from mindformers.modules.layers import Linear
from mindformers.tools import export_strategy
from mindformers.tools.build import build_model_config
from mindformers.tools.model_book import list_models
from mindformers.tools.register import MindFormerConfig, MindFormerRegister, MindFormerModuleType

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# every family's tiny config: {'gpt2': '.../run_gpt2_tiny.yaml', ...}
FAMILIES = {name[:-len('_tiny')]: path for name, path in list_models().items() if name.endswith('_tiny')}
TIED = {'gpt2', 'pangualpha', 'pengcheng_mind'}  # output head = the token embedding table
# (dp, mp, pp) drawn from 1, 2, 4; the tiny configs have 4 layers, 4 heads and (llama, glm2) 2 key/value heads
COMBOS = [(1, 1, 1), (2, 1, 1), (1, 2, 1), (2, 2, 1), (1, 4, 1), (4, 1, 1), (1, 1, 2), (2, 2, 2), (1, 2, 4),
          (4, 1, 2)]
COLUMN = ('q_proj', 'k_proj', 'v_proj', 'qkv_proj', 'gate_proj', 'up_proj', 'fc_in', 'query_key_value',
          'dense_h_to_4h')
ROW = ('o_proj', 'down_proj', 'fc_out', 'dense', 'dense_4h_to_h')
_CACHE = {}


def family(name):
    """(model config, model class, {parameter name: (shape, trainable)} of the model built as is)."""
    if name not in _CACHE:
        run = MindFormerConfig(FAMILIES[name])
        config = build_model_config(run.model.model_config)
        model_class = MindFormerRegister.get_cls(MindFormerModuleType.MODELS, run.model.arch.type)
        with no_init_parameters():
            model = model_class(config)
        params = {p.name: (tuple(p.shape), p.requires_grad) for p in model.get_parameters()}
        _CACHE[name] = config, model_class, params
    return _CACHE[name]


def expected_split(name, shape, mp, vocab_emb_dp):
    """MindFormers' placement: column-parallel q/k/v and up/gate, row-parallel output/down, the vocabulary split
    unless vocab_emb_dp, position tables and norms replicated."""
    if mp == 1:
        return (1,) * len(shape)
    module, kind = name.split('.')[-2:]
    if module in COLUMN:
        return (mp, 1) if kind == 'weight' else (mp,)
    if module in ROW:
        return (1, mp) if kind == 'weight' else (1,)
    if module in ('embed_tokens', 'word_embeddings', 'lm_head'):
        return (1, 1) if vocab_emb_dp else (mp, 1)
    return (1,) * len(shape)  # norms, position and top-query tables


def expected_stages(name, config, pp, tied):
    found = re.search(r'\.layers\.(\d+)\.', name)
    if found:
        return (layer_stages(config.num_layers, pp, getattr(config, 'offset', 0))[int(found.group(1))],)
    if 'top_query_layer' in name or 'lm_head' in name or re.search(r'(final_layernorm|model\.norm)\.', name):
        return (pp - 1,)
    if 'embed_tokens' in name and tied:
        return tuple(sorted({0, pp - 1}))
    return (0,)


def _cases():
    for name in FAMILIES:
        for dp, mp, pp in COMBOS:
            for vocab_emb_dp in ((True, False) if pp == 1 else (False,)):
                yield pytest.param(name, dp, mp, pp, vocab_emb_dp, id=f'{name}-dp{dp}-mp{mp}-pp{pp}-'
                                   f'{"vocab_dp" if vocab_emb_dp else "vocab_mp"}')


@pytest.mark.parametrize('name, dp, mp, pp, vocab_emb_dp', list(_cases()))
def test_layouts_of_every_family(name, dp, mp, pp, vocab_emb_dp):
    config, model_class, params = family(name)
    parallel = build_parallel_config(dict(data_parallel=dp, model_parallel=mp, pipeline_stage=pp, micro_batch_num=pp,
                                          vocab_emb_dp=vocab_emb_dp, optimizer_shard=dp > 1))
    if name in ('llama', 'glm2') and mp == 4:  # 2 key/value heads cannot be split 4 ways
        with pytest.raises(ValueError, match=r'\((2)\) must be divisible by parallel_config\.model_parallel \(4\)'):
            parallel.validate(dp * mp * pp, config)
        return
    if pp > config.num_layers:  # the tiny GLM has 2 layers
        with pytest.raises(ValueError, match=rf'num_layers \({config.num_layers}\) must be at least'):
            parallel.validate(dp * mp * pp, config)
        return
    parallel.validate(dp * mp * pp, config)
    layouts = parameter_layouts(config, parallel, model_class=model_class, opt_shard_threshold_kb=0)
    states = {n: l for n, l in layouts.items() if l.state_of}
    assert {n: l.shape for n, l in layouts.items() if not l.state_of} == {n: s for n, (s, _) in params.items()}
    for param, (shape, trainable) in params.items():
        layout = layouts[param]
        assert layout.dev_matrix == (dp, mp)
        assert layout.split == expected_split(param, shape, mp, vocab_emb_dp), param
        assert layout.stages == expected_stages(param, config, pp, name in TIED), param
        sliced = layout.slice_shape()
        opt = max(layout.opt_shard_size, 1)
        assert all(s * k == full for s, k, full in zip(sliced[1:], layout.split[1:], shape[1:])), param
        assert sliced[0] * layout.split[0] * opt == shape[0], param
        # with the parallel optimizer every copy of a parameter holds its own part: dp copies of a split one,
        # dp x mp of a replicated one (when its first axis divides)
        copies = dp if mp in layout.split and mp > 1 else dp * mp
        assert opt == (copies if dp > 1 and copies > 1 and (shape[0] // layout.split[0]) % copies == 0 else 1)
        for prefix in ('adam_m', 'adam_v'):
            state = states.pop(f'{prefix}.{param}') if trainable else None
            assert state is None or (state.state_of == param and state.dtype == 'float32' and
                                     (state.shape, state.tensor_map, state.opt_shard_size, state.stages) ==
                                     (shape, layout.tensor_map, layout.opt_shard_size, layout.stages))
    assert not states  # no optimizer state without its parameter


def _toy(parallel, extra=None):
    """A cell with one Linear (declared) and, optionally, more parts; parameter_layouts reads `config`."""
    class Toy(nn.Cell):
        def __init__(self):
            super().__init__()
            self.config = type('Config', (), {'parallel_config': parallel})()
            self.proj = Linear(8, 8, split='column', parallel_config=parallel)
            for key, value in (extra or {}).items():
                setattr(self, key, value)
    with no_init_parameters():
        return Toy()


def test_layouts_follow_the_declared_strategies():
    parallel = ParallelConfig(model_parallel=2)
    toy = _toy(parallel)
    assert parameter_layouts(toy)['proj.weight'].tensor_map == (0, -1)
    toy.proj.matmul = ops.MatMul(transpose_b=True).shard(((1, 2), (1, 2)))  # now a row split of the weight
    layouts = parameter_layouts(toy)
    assert layouts['proj.weight'].tensor_map == (-1, 0) and layouts['proj.weight'].slice_shape() == (8, 4)
    assert layouts['proj.weight'].consumers == (('proj.matmul', 1, ((1, 2), (1, 2)), 0),)


def test_undeclared_and_inconsistent_parameters_are_errors():
    parallel = ParallelConfig(model_parallel=2)
    loose = _toy(parallel, {'scale': Parameter(initializer('ones', [8]), name='scale')})
    with pytest.raises(ValueError, match=r'no layer declares how parameter scale is used: add it to '
                                         r'`parameter_inputs` of Toy'):
        parameter_layouts(loose)
    clash = _toy(parallel, {'reuse': ops.MatMul(transpose_b=True).shard(((1, 1), (1, 1))),
                            'parameter_inputs': {'proj.weight': ('reuse', 1)}})
    with pytest.raises(ValueError, match=r'parameter proj\.weight: its uses disagree on its layout \(proj\.matmul '
                                         r'input 1 splits it \(2, 1\); reuse input 1 splits it \(1, 1\)\)'):
        parameter_layouts(clash)
    with pytest.raises(ValueError, match='built for another parallel_config'):
        parameter_layouts(_toy(parallel), ParallelConfig(model_parallel=4))


def test_a_7b_model_costs_no_weights():
    run = MindFormerConfig(os.path.join(REPO, 'configs/llama/run_llama_7b.yaml'))
    config = build_model_config(run.model.model_config)
    parallel = ParallelConfig(data_parallel=2, model_parallel=4, pipeline_stage=4, micro_batch_num=4,
                              optimizer_shard=True, vocab_emb_dp=False)
    start = time.time()
    layouts = parameter_layouts(config, parallel, model_class=MindFormerRegister.get_cls('models', 'LlamaForCausalLM'))
    assert time.time() - start < 20
    weights = sum(int(np.prod(l.shape)) for l in layouts.values() if not l.state_of)
    assert 6.7e9 < weights < 6.8e9
    assert len({l.stage for l in layouts.values()}) == 4


# ------------------------------------------------------------------------------------------ MindSpore reads them
def _full_checkpoint(layouts, directory):
    rng = np.random.default_rng(0)
    full = {n: rng.standard_normal(l.shape).astype(np.float32) for n, l in layouts.items()}
    full['global_step'] = np.array([7], np.int32)  # saved beside the parameters, not laid out
    os.makedirs(os.path.join(directory, 'rank_0'))
    ms.save_checkpoint([{'name': n, 'data': ms.Tensor(v)} for n, v in full.items()],
                       os.path.join(directory, 'rank_0', 'full.ckpt'))
    return full


@pytest.mark.parametrize('name, layout', [('gpt2', dict(data_parallel=2, model_parallel=2, optimizer_shard=True)),
                                          ('llama', dict(model_parallel=2, pipeline_stage=2, micro_batch_num=2))])
def test_transform_checkpoints_slices_by_our_files_and_back_bit_exact(tmp_path, name, layout):
    config, model_class, _ = family(name)
    parallel = build_parallel_config(layout)
    layouts = parameter_layouts(config, parallel, model_class=model_class, opt_shard_threshold_kb=0)
    full = _full_checkpoint(layouts, str(tmp_path / 'full'))
    per_stage = write_strategy_files(layouts, str(tmp_path / 'stages'))
    stage_devices = parallel.data_parallel * parallel.model_parallel
    assert [os.path.basename(p) for p in per_stage] == [f'ckpt_strategy_rank_{s * stage_devices}.json'
                                                        for s in range(parallel.pipeline_stage)]
    with open(per_stage[0], encoding='utf-8') as f:
        document = json.load(f)
    assert document['current_stage'] == 0 and document['parallel_strategy_item']
    item = document['parallel_layout_item'][next(iter(layouts))]
    assert set(item) == {'dev_matrix', 'tensor_map', 'tensor_shape', 'field', 'opt_weight_shard_step',
                         'opt_weight_shard_size'}
    # one pipeline stage: its file as is; several: merged by MindSpore, or by write_strategy_files(per_stage=False)
    strategy = per_stage[0] if len(per_stage) == 1 else \
        write_strategy_files(layouts, str(tmp_path / 'merged'), per_stage=False)[0]
    ms.transform_checkpoints(str(tmp_path / 'full'), str(tmp_path / 'sliced'), 'checkpoint_', None, strategy)
    for rank in range(stage_devices * parallel.pipeline_stage):
        (path,) = glob.glob(str(tmp_path / 'sliced' / f'rank_{rank}' / '*.ckpt'))
        sliced = {k: v.asnumpy() for k, v in ms.load_checkpoint(path).items()}
        assert sliced.pop('global_step') == 7
        held = {n for n, l in layouts.items() if rank // stage_devices in l.stages}
        assert set(sliced) == held
        for key in held:
            assert np.array_equal(sliced[key], layouts[key].slice_of(full[key], rank)), (rank, key)
    ms.transform_checkpoints(str(tmp_path / 'sliced'), str(tmp_path / 'back'), 'checkpoint_', strategy, None)
    (path,) = glob.glob(str(tmp_path / 'back' / 'rank_0' / '*.ckpt'))
    back = ms.load_checkpoint(path)
    assert set(back) == set(full)
    for key, value in full.items():
        assert np.array_equal(back[key].asnumpy(), value), key


# ------------------------------------------------------------------------------------------ command lines
def test_export_strategy_writes_per_stage_files_and_a_summary(tmp_path, capsys):
    out = tmp_path / 'strategy'
    code = export_strategy.main(['--config', FAMILIES['pangualpha'], '--data_parallel', '2',
                                 '--model_parallel', '2', '--pipeline_stage', '2', '--optimizer_shard',
                                 '--output_dir', str(out)])
    assert code == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[0] == ('PanguAlphaHeadModel: data_parallel 2 x model_parallel 2 x pipeline_stage 2 = 8 devices, '
                          'optimizer shard')
    assert printed[1].startswith('stage 0 (ranks 0-3): ') and printed[2].startswith('stage 1 (ranks 4-7): ')
    assert sorted(os.listdir(out)) == ['ckpt_strategy_rank_0.json', 'ckpt_strategy_rank_4.json']
    stage1 = json.load(open(out / 'ckpt_strategy_rank_4.json', encoding='utf-8'))['parallel_layout_item']
    assert 'backbone.top_query_layer.attention.q_proj.weight' in stage1  # the query layer is on the last stage
    assert 'backbone.embed_tokens.weight' in stage1 and 'adam_m.backbone.embed_tokens.weight' in stage1  # tied
    code = export_strategy.main(['--config', FAMILIES['pangualpha'], '--output_dir', str(out)])
    assert code == 2 and 'already holds .json files' in capsys.readouterr().err
    assert sorted(os.listdir(out)) == ['ckpt_strategy_rank_0.json', 'ckpt_strategy_rank_4.json']
    # --overwrite: the one-stage layout replaces both files; stage 1's file of the old layout does not stay behind
    code = export_strategy.main(['--config', FAMILIES['pangualpha'], '--output_dir', str(out), '--overwrite'])
    assert code == 0 and sorted(os.listdir(out)) == ['ckpt_strategy_rank_0.json']
    capsys.readouterr()
    (tmp_path / 'broken.yaml').write_text('model: [unclosed\n')
    assert export_strategy.main(['--config', str(tmp_path / 'broken.yaml'), '--output_dir', str(tmp_path / 'x')]) == 1
    assert 'broken.yaml' in capsys.readouterr().err
    assert export_strategy.main(['--config', FAMILIES['gpt2'], '--output_dir', str(tmp_path / 'broken.yaml' / 'x')]) \
        == 2
    assert capsys.readouterr().err == (f"export_strategy: error: --output_dir {tmp_path / 'broken.yaml' / 'x'}: "
                                       f"{tmp_path / 'broken.yaml'} is a file, not a directory\n")


def test_export_strategy_exits_2_on_a_bad_combination(tmp_path):
    proc = subprocess.run([sys.executable, '-m', 'mindformers.tools.export_strategy', '--config', FAMILIES['gpt2'],
                           '--model_parallel', '8', '--output_dir', str(tmp_path / 'out')], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert 'export_strategy: error: GPT2Config.num_heads (4) must be divisible by parallel_config.model_parallel (8)' \
        in proc.stderr
    assert not (tmp_path / 'out').exists()


def test_only_save_strategy_and_export_strategy_write_the_same_files(tmp_path):
    """Both honour parallel.parallel_optimizer_threshold (only_save_strategy ignored it: at 0 every LayerNorm is
    sharded too, at the default 64 KB none of GPT-2 tiny's is)."""
    config = tmp_path / 'run.yaml'
    config.write_text(f"base_config: {FAMILIES['gpt2']}\n"
                      f"parallel:\n  parallel_optimizer_config:\n    parallel_optimizer_threshold: 0\n")
    assert export_strategy.main(['--config', str(config), '--data_parallel', '2', '--optimizer_shard',
                                 '--output_dir', str(tmp_path / 'exported')]) == 0
    proc = subprocess.run([sys.executable, 'run_mindformer.py', '--config', str(config), '--only_save_strategy',
                           'True', '--parallel_config.data_parallel', '2', '--parallel_config.optimizer_shard', 'True',
                           '--output_dir', str(tmp_path / 'run')], cwd=REPO, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr
    exported = json.loads((tmp_path / 'exported' / 'ckpt_strategy_rank_0.json').read_text())
    saved = json.loads((tmp_path / 'run' / 'strategy' / 'ckpt_strategy_rank_0.json').read_text())
    assert saved == exported
    assert exported['parallel_layout_item']['backbone.final_layernorm.weight']['opt_weight_shard_size'] == 2


def test_only_save_strategy_on_cpu_writes_files_transform_checkpoints_takes(tmp_path):
    """MindSpore cannot compile semi-auto-parallel on CPU (also not with MS_SIMULATION_LEVEL), so the run writes the
    derived files; a real tiny GPT-2 checkpoint is sliced by them into parts of the model's own names and shapes."""
    out = tmp_path / 'out'
    proc = subprocess.run([sys.executable, 'run_mindformer.py', '--config', FAMILIES['gpt2'], '--only_save_strategy',
                           'True', '--parallel_config.data_parallel', '2', '--parallel_config.model_parallel', '2',
                           '--output_dir', str(out)], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert "MindSpore cannot compile semi-auto-parallel on CPU; wrote the strategy files derived from the layers' " \
           "shard declarations instead" in proc.stderr
    assert os.listdir(out / 'strategy') == ['ckpt_strategy_rank_0.json']
    assert not (out / 'checkpoint').exists()
    config, model_class, params = family('gpt2')
    model = model_class(config)
    os.makedirs(tmp_path / 'full' / 'rank_0')
    ms.save_checkpoint(model, str(tmp_path / 'full' / 'rank_0' / 'model.ckpt'))
    ms.transform_checkpoints(str(tmp_path / 'full'), str(tmp_path / 'sliced'), 'checkpoint_', None,
                             str(out / 'strategy' / 'ckpt_strategy_rank_0.json'))
    for rank in range(4):
        (path,) = glob.glob(str(tmp_path / 'sliced' / f'rank_{rank}' / '*.ckpt'))
        sliced = ms.load_checkpoint(path)
        assert set(sliced) == set(params)
        for key, (shape, _) in params.items():
            part = sliced[key].shape
            assert all(full % size == 0 for full, size in zip(shape, part)), key
        assert sliced['backbone.layers.0.attention.qkv_proj.weight'].shape == (288, 192)  # column split
        assert sliced['backbone.layers.0.mlp.fc_out.weight'].shape == (192, 384)  # row split


@pytest.mark.parametrize('name, dp, mp, pp, shard', [('llama', 2, 2, 2, True), ('gpt2', 1, 4, 1, False)])
def test_strategy_files_read_back_as_the_layouts_written(tmp_path, name, dp, mp, pp, shard):
    """One layout type: what `parameter_layouts` derives, `write_strategy_files` writes and `load_strategy` reads
    back (per-stage directory merged by MindSpore) is the same TensorLayout, field for field."""
    from mindformers.parallel.layout import TensorLayout
    from mindformers.parallel.strategy import load_strategy
    config, model_class, _ = family(name)
    parallel = build_parallel_config(dict(data_parallel=dp, model_parallel=mp, pipeline_stage=pp, micro_batch_num=pp,
                                          optimizer_shard=shard))
    written = parameter_layouts(config, parallel, model_class=model_class, opt_shard_threshold_kb=0)
    write_strategy_files(written, tmp_path / 'stages')
    strategy = load_strategy(tmp_path / 'stages', str(tmp_path), '--strategy')
    assert (strategy.stage_num, strategy.stage_devices) == (pp, dp * mp)
    assert set(strategy.layouts) == set(written)
    fields = ('dev_matrix', 'tensor_map', 'shape', 'opt_shard_size', 'opt_shard_step', 'stages', 'name')
    for key, layout in written.items():
        read = strategy.layouts[key]
        assert isinstance(read, TensorLayout)
        assert {f: getattr(read, f) for f in fields} == {f: getattr(layout, f) for f in fields}, key
        assert read.slice_shape() == layout.slice_shape() and read.full_shape(read.slice_shape()) == layout.shape
    assert any(layout.opt_shard_size > 1 for layout in written.values()) == shard
