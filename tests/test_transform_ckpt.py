"""Checkpoint resharding with strategy files: transform_ckpt.py (offline) and auto_trans_ckpt (Trainer).

Round trips full -> layout A -> layout B -> full must be bit-identical, optimizer state included; every bad input
fails before anything is written, with a message naming what is wrong."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import mindspore as ms

from mindformers import Trainer
from helpers.cli import json_result
from mindformers.parallel.config import build_parallel_config
from mindformers.parallel.layout import parameter_layouts
from mindformers.parallel.strategy import write_strategy_files
from mindformers.parallel import reshard
from mindformers.tools import transform_ckpt as tc
from mindformers.tools.checkpoint import (CheckpointError, load_checkpoint_file, record_checkpoint, resolve_checkpoint,
                                          save_checkpoint_atomic)
from mindformers.models.model_book import list_models
from mindformers.tools.register import MindFormerConfig
from mindformers.tools.transform_ckpt import TransformError, transform_checkpoint, transform_for_run
from mindformers.trainer.train_loop import build_train_cell

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# every family's tiny config: {'gpt2': '.../run_gpt2_tiny.yaml', ...}
FAMILY_YAMLS = {name[:-len('_tiny')]: path for name, path in list_models().items() if name.endswith('_tiny')}
# (data_parallel, model_parallel, pipeline_stage, optimizer_shard)
LAYOUTS = {'dp2_mp2': (2, 2, 1, False), 'mp4': (1, 4, 1, False), 'mp2_pp2': (1, 2, 2, False),
           'dp2_pp2': (2, 1, 2, False), 'dp2_mp2_optshard': (2, 2, 1, True)}


# ----------------------------------------------------------------------------------------------- strategy files
def layout_item(dev_matrix, tensor_map):
    return {'dev_matrix': list(dev_matrix), 'tensor_map': list(tensor_map), 'param_split_shape': [],
            'indices_offset': [], 'field': 0, 'opt_weight_shard_step': 0, 'opt_weight_shard_size': 0}


def write_strategy(path, stages):
    """Write `{stage: {name: layout item}}` as MindSpore JSON strategy files: one file for one stage, else a
    directory with a file per stage. Returns the path."""
    def document(stage, items):
        return {'current_stage': stage, 'parallel_strategy_item': {f'stage{stage}_op': {'stage': stage}},
                'parallel_layout_item': items}
    path = str(path)
    if len(stages) == 1:
        path = path if path.endswith('.json') else path + '.json'
        with open(path, 'w', encoding='utf-8') as f:
            json.dump(document(0, stages[0]), f)
        return path
    os.makedirs(path, exist_ok=True)
    for stage, items in stages.items():
        with open(os.path.join(path, f'strategy_stage{stage}.json'), 'w', encoding='utf-8') as f:
            json.dump(document(stage, items), f)
    return path


def model_strategy(model, layout, directory):
    """Strategy files of `model` under a layout of LAYOUTS, from mindformers.core.parallel_layout (what
    export_strategy writes): the file for one stage, else the directory of per-stage files. Returns (path,
    {name: ParamLayout})."""
    dp, mp, pp, optimizer_shard = LAYOUTS[layout]
    parallel = build_parallel_config({'data_parallel': dp, 'model_parallel': mp, 'pipeline_stage': pp,
                                      'micro_batch_num': pp, 'optimizer_shard': optimizer_shard})
    layouts = parameter_layouts(model.config, parallel, model_class=type(model))
    paths = write_strategy_files(layouts, str(directory))
    return (paths[0] if pp == 1 else str(directory)), layouts


def expected_slice(full, layout, rank):
    """The block of `full` that `rank` holds under `layout` (no optimizer shard), from MindSpore's device-matrix
    convention, computed independently of MindSpore and of parallel_layout."""
    dev = layout.dev_matrix
    coords = np.unravel_index(rank % int(np.prod(dev)), dev)
    index = []
    for dim, axis_from_right in enumerate(layout.tensor_map):
        if axis_from_right == -1:
            index.append(slice(None))
            continue
        axis = len(dev) - 1 - axis_from_right
        size = full.shape[dim] // dev[axis]
        index.append(slice(coords[axis] * size, (coords[axis] + 1) * size))
    return full[tuple(index)]


# ----------------------------------------------------------------------------------------------- checkpoints
def arrays(path):
    return {name: p.asnumpy() for name, p in load_checkpoint_file(path).items()}


def assert_identical(got, want):
    assert sorted(got) == sorted(want)
    for name, value in want.items():
        assert got[name].dtype == value.dtype and got[name].shape == value.shape, name
        assert got[name].tobytes() == value.tobytes(), name


def train_cell_checkpoint(yaml, path, seed=0):
    """Save a family's tiny model with its optimizer the way CheckpointMonitor does (train cell + counters), the
    Adam moments filled with random values so a misplaced slice shows. Returns (arrays, model)."""
    trainer = Trainer(args=os.path.join(REPO, yaml))
    network = trainer._get_network()  # pylint: disable=protected-access
    cell, _ = build_train_cell(trainer.config, network, 10, 1)
    rng = np.random.default_rng(seed)
    for param in cell.get_parameters():
        if param.name.startswith(('adam_m.', 'adam_v.')):
            param.set_data(ms.Tensor(rng.standard_normal(param.shape).astype(np.float32)))
    save_checkpoint_atomic(cell, str(path), append_dict={'epoch_num': 1, 'step_num': 3})
    return arrays(str(path)), network


def small_checkpoint(directory, names=('a.weight', 'b.weight', 'b.bias', 'adam_m.a.weight'), extra=None):
    """A full checkpoint of a few 8x4 / 8 tensors (plus a counter) at `directory/rank_0/full.ckpt`."""
    rng = np.random.default_rng(1)
    data = {n: rng.standard_normal((8,) if n.endswith('bias') else (8, 4)).astype(np.float32) for n in names}
    data['global_step'] = np.array([5], np.int32)
    data.update(extra or {})
    save_checkpoint_atomic(data, os.path.join(str(directory), 'rank_0', 'full.ckpt'))
    return data


def small_strategy(path, dp=1, mp=2, names=('a.weight', 'b.weight', 'b.bias', 'adam_m.a.weight')):
    return write_strategy(path, {0: {n: layout_item([dp, mp], [0] + [-1] * (0 if n.endswith('bias') else 1))
                                     for n in names}})


@pytest.fixture()
def sliced(tmp_path):
    """A small checkpoint sliced four ways (dp2, mp2): (source data, strategy path, sliced dir)."""
    data = small_checkpoint(tmp_path / 'full')
    strategy = small_strategy(tmp_path / 'dp2mp2.json', dp=2, mp=2)
    transform_checkpoint(tmp_path / 'full', tmp_path / 'sliced', None, strategy)
    return data, strategy, tmp_path / 'sliced'


# ----------------------------------------------------------------------------------------------- round trips
def _round_trip(model, full_dir, work, data, chain):
    """full -> chain[0] -> ... -> chain[-1] -> full; returns the final arrays and {layout: ParamLayouts}."""
    previous, previous_dir, layouts = None, full_dir, {}
    for name in chain:
        strategy, layouts[name] = model_strategy(model, name, work / f'strategy_{name}')
        out = work / f'ckpt_{name}'
        summary = transform_checkpoint(previous_dir, out, previous, strategy)
        dp, mp, pp, _ = LAYOUTS[name]
        assert summary.dst_ranks == dp * mp * pp and summary.parameters == len(data)
        previous, previous_dir = strategy, out
    transform_checkpoint(previous_dir, work / 'back', previous, None)
    return arrays(str(work / 'back' / 'rank_0' / 'checkpoint_0.ckpt')), layouts


def test_gpt2_round_trip_through_every_layout_is_bit_identical(tmp_path):
    data, model = train_cell_checkpoint(FAMILY_YAMLS['gpt2'], tmp_path / 'full' / 'rank_0' / 'gpt2.ckpt')
    assert any(n.startswith('adam_m.') for n in data) and 'epoch_num' in data
    back, layouts = _round_trip(model, tmp_path / 'full', tmp_path, data, list(LAYOUTS))
    assert_identical(back, data)

    # each rank of an intermediate layout holds exactly its block, in a file our loader and MindSpore's read
    name = 'backbone.layers.3.mlp.fc_out.weight'
    for layout_name in ('mp4', 'mp2_pp2'):
        layout = layouts[layout_name][name]
        dp, mp, pp, _ = LAYOUTS[layout_name]
        assert layout.tensor_map == (-1, 0) and layout.stages == (pp - 1,)
        for rank in range((pp - 1) * dp * mp, pp * dp * mp):
            held = ms.load_checkpoint(resolve_checkpoint(str(tmp_path / f'ckpt_{layout_name}' / f'rank_{rank}')))
            for key in (name, 'adam_v.' + name):
                np.testing.assert_array_equal(held[key].asnumpy(), expected_slice(data[key], layout, rank))
    first_stage = arrays(resolve_checkpoint(str(tmp_path / 'ckpt_mp2_pp2' / 'rank_0')))
    assert name not in first_stage and 'backbone.embed_tokens.weight' in first_stage
    # the merged form of the per-stage files (as merge_pipeline_strategys writes it) reads the same
    merged = write_strategy_files(layouts['mp2_pp2'], str(tmp_path / 'merged'), per_stage=False)[0]
    transform_checkpoint(tmp_path / 'ckpt_mp2_pp2', tmp_path / 'back_merged', merged, None)
    assert_identical(arrays(str(tmp_path / 'back_merged' / 'rank_0' / 'checkpoint_0.ckpt')), data)
    # with the optimizer shard, MindSpore's slices are the ones parallel_layout says each rank stores
    sharded = layouts['dp2_mp2_optshard']
    embed = 'adam_m.backbone.embed_tokens.weight'
    assert sharded[embed].opt_shard_size > 1
    for rank in range(4):
        held = arrays(resolve_checkpoint(str(tmp_path / 'ckpt_dp2_mp2_optshard' / f'rank_{rank}')))
        assert held[embed].shape == sharded[embed].slice_shape()
        np.testing.assert_array_equal(held[embed], sharded[embed].slice_of(data[embed], rank))


@pytest.mark.parametrize('family, chain', [('llama', ('mp2_pp2', 'dp2_mp2')), ('glm2', ('dp2_pp2', 'mp2_pp2')),
                                           ('pangualpha', ('mp4', 'dp2_pp2')),
                                           ('pengcheng_mind', ('dp2_mp2', 'mp4')), ('glm', ('mp2_pp2', 'mp4'))])
def test_every_family_round_trips_bit_identically(tmp_path, family, chain):
    data, model = train_cell_checkpoint(FAMILY_YAMLS[family], tmp_path / 'full' / 'rank_0' / 'model.ckpt')
    back, _ = _round_trip(model, tmp_path / 'full', tmp_path, data, chain)
    assert_identical(back, data)


def test_output_is_our_format_with_meta_for_training_checkpoints(tmp_path, sliced):
    data, _, sliced_dir = sliced
    assert sorted(os.listdir(sliced_dir)) == ['rank_0', 'rank_1', 'rank_2', 'rank_3']
    assert os.listdir(sliced_dir / 'rank_2') == ['checkpoint_2.ckpt']  # no counters: no meta.json
    held = ms.load_checkpoint(str(sliced_dir / 'rank_2' / 'checkpoint_2.ckpt'), crc_check=True)
    assert held['a.weight'].shape == (4, 4) and held['b.bias'].shape == (4,) and int(held['global_step'][0]) == 5
    assert not [f for f in os.listdir(tmp_path) if f.startswith('.')]  # no staging leftovers

    counters = {'epoch_num': np.array(2, np.int32), 'step_num': np.array(7, np.int32)}
    data = small_checkpoint(tmp_path / 'train', extra=counters)
    strategy = small_strategy(tmp_path / 'mp2.json')
    transform_checkpoint(tmp_path / 'train' / 'rank_0' / 'full.ckpt', tmp_path / 'out', None, strategy,
                         prefix='ckpt_')
    meta = json.loads((tmp_path / 'out' / 'rank_1' / 'meta.json').read_text())
    assert meta['last_ckpt_file'] == 'ckpt_1.ckpt' and meta['global_step'] == 5
    assert (meta['last_epoch'], meta['last_step']) == (2, 7) and len(meta['checkpoints'][0]['sha256']) == 64
    np.testing.assert_array_equal(arrays(str(tmp_path / 'out' / 'rank_1' / 'ckpt_1.ckpt'))['a.weight'],
                                  data['a.weight'][4:])


def test_safetensors_source_stays_safetensors(tmp_path):
    data = {'w': np.arange(32, dtype=np.float32).reshape(8, 4)}
    save_checkpoint_atomic(data, str(tmp_path / 'src' / 'rank_0' / 'w.safetensors'))
    strategy = write_strategy(tmp_path / 's.json', {0: {'w': layout_item([2], [0, -1])}})
    transform_checkpoint(tmp_path / 'src', tmp_path / 'sliced', None, strategy)
    assert os.listdir(tmp_path / 'sliced' / 'rank_1') == ['checkpoint_1.safetensors']
    transform_checkpoint(tmp_path / 'sliced', tmp_path / 'back', strategy, 'None')
    assert_identical(arrays(str(tmp_path / 'back' / 'rank_0' / 'checkpoint_0.safetensors')), data)


def write_protobuf_strategy(path, items, stage):
    """One stage's layout items as a protobuf strategy file, the format compiled semi-auto-parallel runs save."""
    proto = ms.train.node_strategy_pb2.ParallelStrategyMap()
    proto.current_stage = stage
    op = proto.parallel_strategy_item.add()
    op.node_name, op.parallel_strategys.stage = f'stage{stage}_op', stage
    for name, item in items.items():
        entry = proto.parallel_layout_item.add()
        entry.param_name = name
        layout = entry.parallel_layouts
        layout.dev_matrix.add().dim.extend(item['dev_matrix'])
        layout.tensor_map.add().dim.extend(item['tensor_map'])
        layout.param_split_shape.add()
        layout.indices_offset.add()
        layout.field, layout.opt_weight_shard_step, layout.opt_weight_shard_size = 0, 0, 0
    with open(path, 'wb') as f:
        f.write(proto.SerializeToString())


def test_protobuf_strategies_per_stage(tmp_path):
    """Strategy files in MindSpore's protobuf format (one per pipeline stage, as compiled runs save them)."""
    data = small_checkpoint(tmp_path / 'full', names=('layers.0.w', 'layers.1.w', 'adam_m.layers.1.w'))
    (tmp_path / 'pb').mkdir()
    for stage, names in ((0, ('layers.0.w',)), (1, ('layers.1.w', 'adam_m.layers.1.w'))):
        write_protobuf_strategy(tmp_path / 'pb' / f'ckpt_strategy_rank_{2 * stage}.ckpt',
                                {n: layout_item([1, 2], [0, -1]) for n in names}, stage)
    transform_checkpoint(tmp_path / 'full', tmp_path / 'mp2pp2', None, tmp_path / 'pb')
    stage1 = arrays(str(tmp_path / 'mp2pp2' / 'rank_3' / 'checkpoint_3.ckpt'))
    assert sorted(stage1) == ['adam_m.layers.1.w', 'global_step', 'layers.1.w']
    np.testing.assert_array_equal(stage1['layers.1.w'], data['layers.1.w'][4:])
    transform_checkpoint(tmp_path / 'mp2pp2', tmp_path / 'back', tmp_path / 'pb', None)
    assert_identical(arrays(str(tmp_path / 'back' / 'rank_0' / 'checkpoint_0.ckpt')), data)
    os.remove(tmp_path / 'pb' / 'ckpt_strategy_rank_0.ckpt')
    _refused(r"--src_ckpt_strategy .*pb covers pipeline stages \[1\] but not \[0\]", tmp_path / 'mp2pp2',
             tmp_path / 'out', tmp_path / 'pb', None)


def test_rank_directories_with_several_checkpoints_use_the_newest_common_step(tmp_path):
    """A training output keeps several checkpoints per rank: meta.json picks the newest step every rank has."""
    strategy = small_strategy(tmp_path / 'mp2.json', names=('w',))
    for rank in (0, 1):
        directory = tmp_path / 'run' / f'rank_{rank}'
        for step in (1, 2, 3):
            if rank == 1 and step == 3:
                continue  # rank 1 died before saving step 3
            name = f'net_rank_{rank}-1_{step}.ckpt'
            save_checkpoint_atomic({'w': np.full((4, 4), 10 * step + rank, np.float32)}, str(directory / name))
            record_checkpoint(str(directory), name, 1, step, step, keep_max=5)
    transform_checkpoint(tmp_path / 'run', tmp_path / 'full', strategy, None)
    whole = arrays(str(tmp_path / 'full' / 'rank_0' / 'checkpoint_0.ckpt'))['w']
    np.testing.assert_array_equal(whole[:4], 20)  # step 2: rank 0's rows, then rank 1's
    np.testing.assert_array_equal(whole[4:], 21)


# ----------------------------------------------------------------------------------------------- bad input
def _refused(match, *args, **kwargs):
    with pytest.raises(TransformError, match=match):
        transform_checkpoint(*args, **kwargs)


def test_missing_and_extra_rank_directories(tmp_path, sliced):
    _, strategy, sliced_dir = sliced
    os.rename(sliced_dir / 'rank_3', tmp_path / 'rank_3_moved')
    _refused(r"describes 4 ranks \(rank_0, rank_1, rank_2, rank_3\) but the source lacks rank_3 \(found rank_0, "
             r"rank_1, rank_2\)", sliced_dir, tmp_path / 'out', strategy, None)
    os.rename(tmp_path / 'rank_3_moved', sliced_dir / 'rank_3')
    _refused(r"rank_2, rank_3 beyond the 2 ranks .*pipeline parallel", sliced_dir, tmp_path / 'out',
             small_strategy(tmp_path / 'mp2.json'), None)
    _refused(r"is None \(a complete checkpoint\) but the source has 4 rank directories", sliced_dir,
             tmp_path / 'out', None, strategy)
    assert not (tmp_path / 'out').exists()


def test_rank_directory_without_or_with_several_checkpoints(tmp_path, sliced):
    _, strategy, sliced_dir = sliced
    extra = sliced_dir / 'rank_1' / 'other.ckpt'
    extra.write_bytes((sliced_dir / 'rank_1' / 'checkpoint_1.ckpt').read_bytes())
    _refused(r"rank_1 holds 2 checkpoints \(checkpoint_1.ckpt, other.ckpt\).*exactly one checkpoint", sliced_dir,
             tmp_path / 'out', strategy, None)
    os.remove(extra)
    os.remove(sliced_dir / 'rank_1' / 'checkpoint_1.ckpt')
    _refused(r"rank_1 holds no checkpoint", sliced_dir, tmp_path / 'out', strategy, None)


def test_parameter_names_that_do_not_match_the_strategy(tmp_path):
    small_checkpoint(tmp_path / 'ckpt', extra={'c.weight': np.ones((8, 4), np.float32)})
    strategy = small_strategy(tmp_path / 'mp2.json')
    _refused(r"has no layout for c.weight", tmp_path / 'ckpt', tmp_path / 'out', None, strategy)
    transform_checkpoint(tmp_path / 'ckpt', tmp_path / 'sliced', None,
                         small_strategy(tmp_path / 'with_c.json', names=('a.weight', 'b.weight', 'b.bias',
                                                                           'adam_m.a.weight', 'c.weight')))
    _refused(r"rank_0 checkpoint .* has parameters the source strategy .*mp2.json does not lay out: c.weight",
             tmp_path / 'sliced', tmp_path / 'out', strategy, None)

    with_d = small_strategy(tmp_path / 'with_d.json', names=('a.weight', 'b.weight', 'b.bias', 'adam_m.a.weight',
                                                             'c.weight', 'd.weight'))
    _refused(r"lacks parameters the source strategy .*with_d.json expects on stage 0: d.weight", tmp_path / 'sliced',
             tmp_path / 'out', with_d, None)
    _refused(r"lays out parameters the source checkpoint does not have: d.weight", tmp_path / 'ckpt',
             tmp_path / 'out', None, with_d)
    assert not (tmp_path / 'out').exists()


def test_weights_only_checkpoint_with_a_training_strategy(tmp_path):
    """A strategy lists optimizer moments too; a checkpoint without any of them is still transformed."""
    small_checkpoint(tmp_path / 'weights', names=('a.weight', 'b.weight', 'b.bias'))
    strategy = small_strategy(tmp_path / 'mp2.json')  # includes adam_m.a.weight
    transform_checkpoint(tmp_path / 'weights', tmp_path / 'out', None, strategy)
    assert 'adam_m.a.weight' not in arrays(str(tmp_path / 'out' / 'rank_0' / 'checkpoint_0.ckpt'))
    # but a partial group of moments is an incomplete checkpoint
    small_checkpoint(tmp_path / 'partial', names=('a.weight', 'b.weight', 'b.bias', 'adam_m.b.weight'))
    with_b = small_strategy(tmp_path / 'b.json', names=('a.weight', 'b.weight', 'b.bias', 'adam_m.a.weight',
                                                        'adam_m.b.weight'))
    _refused(r"does not have: adam_m.a.weight", tmp_path / 'partial', tmp_path / 'out2', None, with_b)


def test_shapes_that_do_not_match_the_strategy(tmp_path, sliced):
    _, strategy, sliced_dir = sliced
    small_checkpoint(tmp_path / 'ckpt')
    _refused(r"dim 0 of size 8 into 16 slices", tmp_path / 'ckpt', tmp_path / 'out', None,
             small_strategy(tmp_path / 'dp1mp16.json', mp=16))
    wrong_rank = {'a.weight': np.ones((3, 4), np.float32)}
    os.remove(sliced_dir / 'rank_2' / 'checkpoint_2.ckpt')
    replaced = arrays(str(sliced_dir / 'rank_0' / 'checkpoint_0.ckpt')) | wrong_rank
    save_checkpoint_atomic(replaced, str(sliced_dir / 'rank_2' / 'checkpoint_2.ckpt'))
    _refused(r"a.weight has shape \[3, 4\] in rank_2 checkpoint .* but \[4, 4\] on rank_0", sliced_dir,
             tmp_path / 'out', strategy, None)
    small_checkpoint(tmp_path / 'one', names=('a.weight',))
    flat = write_strategy(tmp_path / 'flat.json', {0: {'a.weight': layout_item([2], [0])}})
    _refused(r"shapes do not fit the destination strategy .*flat.json: a.weight \[8, 4\] \(the strategy maps 1 "
             r"dims\)", tmp_path / 'one', tmp_path / 'out', None, flat)
    # full shapes recorded in the strategy (mindformers' `tensor_shape`) and those of a model are checked too
    declared = write_strategy(tmp_path / 'declared.json', {0: {'a.weight': layout_item([2], [0, -1]) | {
        'tensor_shape': [16, 4]}}})
    _refused(r"a.weight \[8, 4\] \(the strategy declares \[16, 4\]\)", tmp_path / 'one', tmp_path / 'out', None,
             declared)
    transform_checkpoint(tmp_path / 'one', tmp_path / 'sliced_one', None,
                         write_strategy(tmp_path / 'rows.json', {0: {'a.weight': layout_item([2], [0, -1])}}))
    _refused(r"a.weight of shape \[4, 4\] is a slice of \[8, 4\] under the source strategy .*declared.json, which "
             r"declares \[16, 4\]", tmp_path / 'sliced_one', tmp_path / 'out', declared, None)
    _refused(r"does not fit the model: a.weight: checkpoint \[8, 4\] vs model \[4, 4\]; set "
             r"src_strategy_path_or_dir", tmp_path / 'sliced_one', tmp_path / 'out',
             tmp_path / 'rows.json', None, expected_shapes={'a.weight': (4, 4)})
    _refused(r"a.weight has 2 dims but the source strategy maps 1", tmp_path / 'sliced_one', tmp_path / 'out', flat,
             None)


def test_destination_must_be_new_or_empty_and_apart_from_the_source(tmp_path, sliced):
    _, strategy, sliced_dir = sliced
    (tmp_path / 'busy').mkdir()
    (tmp_path / 'busy' / 'keep.txt').write_text('precious')
    _refused(r"busy is not empty; pass a new or empty directory", sliced_dir, tmp_path / 'busy', strategy, None)
    assert (tmp_path / 'busy' / 'keep.txt').read_text() == 'precious'
    _refused(r"are the same directory", sliced_dir, sliced_dir, strategy, None)
    _refused(r"lie inside one another", sliced_dir, sliced_dir / 'rank_0' / 'new', strategy, None)
    (tmp_path / 'empty').mkdir()
    transform_checkpoint(sliced_dir, tmp_path / 'empty', strategy, None)  # an empty directory is fine
    assert os.listdir(tmp_path / 'empty') == ['rank_0']


def test_a_failed_transform_leaves_no_destination(tmp_path, sliced, monkeypatch):
    _, strategy, sliced_dir = sliced
    real = reshard._finalize  # pylint: disable=protected-access

    def finalize_then_fail(raw, out, *args):
        real(raw, out, *args)
        raise OSError("disk full")
    monkeypatch.setattr(reshard, '_finalize', finalize_then_fail)
    with pytest.raises(OSError, match='disk full'):
        transform_checkpoint(sliced_dir, tmp_path / 'dst', strategy, None)
    assert sorted(os.listdir(tmp_path)) == ['dp2mp2.json', 'full', 'sliced']

    def mindspore_fails(src, dst, *args, **kwargs):
        os.makedirs(os.path.join(dst, 'rank_0'))
        raise ValueError("The checkpoint file of rank3 is needed for converting rank0's checkpoint\nC++ trace")
    monkeypatch.setattr(reshard.ms, 'transform_checkpoints', mindspore_fails)
    with pytest.raises(TransformError, match=r"MindSpore could not transform .*sliced: The checkpoint file of "
                                             r"rank3 is needed for converting rank0's checkpoint$"):
        transform_checkpoint(sliced_dir, tmp_path / 'dst', strategy, None)
    assert sorted(os.listdir(tmp_path)) == ['dp2mp2.json', 'full', 'sliced']


def test_corrupt_source_is_named(tmp_path):
    directory = tmp_path / 'run' / 'rank_0'
    save_checkpoint_atomic({'w': np.ones((4, 4), np.float32)}, str(directory / 'net-1_1.ckpt'))
    record_checkpoint(str(directory), 'net-1_1.ckpt', 1, 1, 1, keep_max=5)
    os.chmod(directory / 'net-1_1.ckpt', 0o600)
    with open(directory / 'net-1_1.ckpt', 'r+b') as f:
        f.seek(40)
        f.write(b'\xff\xff')
    with pytest.raises(CheckpointError, match=r"net-1_1.ckpt is corrupt: its SHA-256 differs"):
        transform_checkpoint(tmp_path / 'run', tmp_path / 'out', None, None)


def test_strategy_problems(tmp_path, sliced):
    _, strategy, sliced_dir = sliced
    _refused(r"--src_ckpt_strategy .*nowhere.json: no such file or directory", sliced_dir, tmp_path / 'out',
             tmp_path / 'nowhere.json', None)
    (tmp_path / 'junk.ckpt').write_bytes(b'\x00not a protobuf strategy')
    _refused(r"junk.ckpt is not a MindSpore strategy file", sliced_dir, tmp_path / 'out', tmp_path / 'junk.ckpt',
             None)
    lone = write_strategy(tmp_path / 'stage1.json', {0: {'layers.1.w': layout_item([1, 2], [0, -1])}})
    with open(lone, encoding='utf-8') as f:
        document = json.load(f)
    document['parallel_strategy_item'] = {'op': {'stage': 1}}
    with open(lone, 'w', encoding='utf-8') as f:
        json.dump(document, f)
    _refused(r"stage1.json is the strategy of pipeline stage 1 alone; pass the directory", sliced_dir,
             tmp_path / 'out', lone, None)
    (tmp_path / 'stages').mkdir()
    os.rename(lone, tmp_path / 'stages' / 'stage1.json')
    _refused(r"covers pipeline stages \[1\] but not \[0\]", sliced_dir, tmp_path / 'out', tmp_path / 'stages', None)
    (tmp_path / 'nothing').mkdir()
    _refused(r"nothing holds no strategy file", sliced_dir, tmp_path / 'out', tmp_path / 'nothing', None)
    mixed = write_strategy(tmp_path / 'mixed.json', {0: {'a.weight': layout_item([2, 2], [0, -1]),
                                                         'b.weight': layout_item([2], [0, -1])}})
    _refused(r"mixes device matrices of \[2, 4\] devices", sliced_dir, tmp_path / 'out', mixed, None)
    assert not (tmp_path / 'out').exists()


# ----------------------------------------------------------------------------------------------- CLI
def _cli(*args, module=False):
    script = ['-m', 'mindformers.tools.transform_ckpt'] if module else [
        os.path.join(REPO, 'mindformers', 'tools', 'transform_ckpt.py')]
    return subprocess.run([sys.executable, *script, *map(str, args)], cwd=REPO, capture_output=True, text=True,
                          timeout=300)


def test_cli_by_path_and_as_module(tmp_path):
    data = small_checkpoint(tmp_path / 'full')
    strategy = small_strategy(tmp_path / 'mp2.json')
    done = _cli('--src_ckpt_strategy', 'None', '--dst_ckpt_strategy', strategy,
                '--src_ckpt_dir', tmp_path / 'full' / 'rank_0' / 'full.ckpt', '--dst_ckpt_dir', tmp_path / 'mp2')
    assert done.returncode == 0, done.stderr
    summary = json_result(done.stdout)
    assert (summary['src_ranks'], summary['dst_ranks'], summary['parameters']) == (1, 2, 5)
    assert summary['dst_dir'] == str(tmp_path / 'mp2') and summary['bytes_written'] > 0
    assert done.stdout.startswith('transformed 1 source rank(s) into 2 destination rank(s)')
    assert 'checked rank_0 (1/1)' in done.stderr and 'wrote rank_1 (2/2)' in done.stderr

    refused = _cli('--src_ckpt_strategy', strategy, '--src_ckpt_dir', tmp_path / 'mp2', '--dst_ckpt_dir',
                   tmp_path / 'mp2', module=True)
    assert refused.returncode == 2
    assert refused.stderr.strip().splitlines()[-1].startswith('transform_ckpt.py: error: --src_ckpt_dir and '
                                                              '--dst_ckpt_dir are the same directory')
    np.testing.assert_array_equal(arrays(str(tmp_path / 'mp2' / 'rank_1' / 'checkpoint_1.ckpt'))['b.weight'],
                                  data['b.weight'][4:])


def test_cli_main_in_process(tmp_path, capsys):
    small_checkpoint(tmp_path / 'full')
    assert tc.main(['--src_ckpt_dir', str(tmp_path / 'full'), '--dst_ckpt_dir', str(tmp_path / 'out'),
                    '--dst_ckpt_strategy', str(tmp_path / 'missing')]) == 2
    err = capsys.readouterr().err
    assert err.count('\n') == 1 and 'missing: no such file or directory' in err
    assert not (tmp_path / 'out').exists()
    assert tc.main(['--src_ckpt_dir', str(tmp_path / 'full')]) == 2  # --dst_ckpt_dir missing
    assert capsys.readouterr().err == ('transform_ckpt.py: error: the following arguments are required: '
                                       '--dst_ckpt_dir\n')


def test_run_mindformer_flags_reach_the_config():
    import run_mindformer
    args, overrides = run_mindformer.parse_args(['--config', 'configs/gpt2/run_gpt2_tiny.yaml',
                                                 '--auto_trans_ckpt', 'True', '--src_strategy_path_or_dir',
                                                 'strategy/', '--load_checkpoint', 'ckpt/'])
    config = run_mindformer.build_config(args, overrides)
    assert config.auto_trans_ckpt is True and config.src_strategy_path_or_dir == 'strategy/'


# ----------------------------------------------------------------------------------------------- auto_trans_ckpt
def test_other_ranks_wait_for_rank0(tmp_path, sliced):
    _, strategy, sliced_dir = sliced
    out = tmp_path / 'out'
    with pytest.raises(TransformError, match=r"rank 1 waited 0 s for rank 0 to transform the checkpoint into "
                                             r".*transformed_checkpoint/sliced .*shares"):
        transform_for_run(sliced_dir, strategy, out, rank_id=1, device_num=2, timeout=0.2, poll=0.05)
    path = transform_for_run(sliced_dir, strategy, out, rank_id=0, device_num=2)
    assert path == str(out / 'transformed_checkpoint' / 'sliced' / 'rank_0')
    stamp = os.path.getmtime(os.path.join(path, 'checkpoint_0.ckpt'))
    # rank 1 finds rank 0's flag and loads the same complete checkpoint; a second call reuses the result
    assert transform_for_run(sliced_dir, strategy, out, rank_id=1, device_num=2, timeout=5, poll=0.05) == path
    assert transform_for_run(sliced_dir, strategy, out, rank_id=0, device_num=2) == path
    assert os.path.getmtime(os.path.join(path, 'checkpoint_0.ckpt')) == stamp

    with pytest.raises(TransformError, match='does not lay out'):
        transform_for_run(sliced_dir, small_strategy(tmp_path / 'other.json', dp=2, names=('a.weight',)), out)
    with pytest.raises(TransformError, match='rank 0 failed to transform the checkpoint: .*does not lay out'):
        transform_for_run(sliced_dir, small_strategy(tmp_path / 'other.json', dp=2, names=('a.weight',)), out,
                          rank_id=1, device_num=2, timeout=5, poll=0.05)
    with pytest.raises(TransformError, match=r"holds per-rank checkpoints \(rank_0, rank_1, rank_2, rank_3\) but "
                                             r"src_strategy_path_or_dir is not set"):
        transform_for_run(sliced_dir, None, out)
    with pytest.raises(TransformError, match=r"lies in .*transformed_checkpoint, where resharded checkpoints are "
                                             r"written"):
        transform_for_run(out / 'transformed_checkpoint' / 'sliced', strategy, out)


@pytest.fixture(scope='module')
def trained_gpt2(tmp_path_factory):
    """A small GPT-2 trained for two steps with the Trainer: (config, checkpoint directory) of a real training
    checkpoint (weights, Adam moments, counters, meta.json)."""
    work = tmp_path_factory.mktemp('gpt2')
    overrides = {'runner_config.epochs': 1, 'runner_config.batch_size': 4, 'model.model_config.num_layers': 2,
                 'model.model_config.hidden_size': 64, 'model.model_config.seq_length': 32,
                 'train_dataset.data_loader.max_samples': 8, 'eval_dataset.data_loader.max_samples': 8,
                 'eval_dataset.batch_size': 4,
                 'callbacks': [{'type': 'CheckpointMonitor', 'prefix': 'tiny', 'save_checkpoint_steps': 1}]}
    state = Trainer(args=gpt2_config(overrides, output_dir=str(work / 'train'))).train()
    assert len(state.losses) == 2
    return overrides, work / 'train' / 'checkpoint'


def gpt2_config(overrides, **more):
    config = MindFormerConfig(FAMILY_YAMLS['gpt2'])
    config.merge_from_dict({**overrides, **more})
    return config


def test_auto_trans_ckpt_evaluates_and_predicts_from_sliced_checkpoints(tmp_path, trained_gpt2):
    overrides, checkpoint = trained_gpt2
    full = resolve_checkpoint(str(checkpoint))
    data = arrays(full)
    assert any(n.startswith('adam_v.') for n in data)
    model = Trainer(args=gpt2_config(overrides))._get_network()  # pylint: disable=protected-access
    dp2mp2, _ = model_strategy(model, 'dp2_mp2', tmp_path / 'strategy_dp2mp2')
    mp2pp2, _ = model_strategy(model, 'mp2_pp2', tmp_path / 'strategy_mp2pp2')
    assert tc.main(['--src_ckpt_dir', str(checkpoint), '--dst_ckpt_strategy', dp2mp2, '--dst_ckpt_dir',
                    str(tmp_path / 'dp2mp2')]) == 0
    assert tc.main(['--src_ckpt_dir', str(tmp_path / 'dp2mp2'), '--src_ckpt_strategy', dp2mp2,
                    '--dst_ckpt_strategy', mp2pp2, '--dst_ckpt_dir', str(tmp_path / 'mp2pp2')]) == 0

    trainer = Trainer(args=gpt2_config(overrides, output_dir=str(tmp_path / 'run'), src_strategy_path_or_dir=dp2mp2))
    reference = trainer.evaluate(eval_checkpoint=full)
    resharded = trainer.evaluate(eval_checkpoint=str(tmp_path / 'dp2mp2'), auto_trans_ckpt=True)
    assert resharded == reference
    transformed = tmp_path / 'run' / 'transformed_checkpoint' / 'dp2mp2' / 'rank_0'
    assert_identical(arrays(resolve_checkpoint(str(transformed))), data)

    prompts = ['ROMEO:', 'To be']
    trainer.config['auto_trans_ckpt'] = False
    expected = trainer.predict(predict_checkpoint=full, input_data=prompts, max_new_tokens=6)
    trainer.config['src_strategy_path_or_dir'] = mp2pp2
    got = trainer.predict(predict_checkpoint=str(tmp_path / 'mp2pp2'), auto_trans_ckpt=True, input_data=prompts,
                          max_new_tokens=6)
    assert got == expected

    # the wrong source strategy (mp4 for a dp2 x mp2 checkpoint: also 4 ranks) is caught before loading
    trainer.config['src_strategy_path_or_dir'] = model_strategy(model, 'mp4', tmp_path / 'strategy_mp4')[0]
    with pytest.raises(TransformError, match=r"of shape \[\d+, 64\] is a slice of \[\d+, 64\] under the source "
                                             r"strategy .*strategy_mp4.*, which declares"):
        trainer.evaluate(eval_checkpoint=str(tmp_path / 'dp2mp2'))


def test_a_resharded_training_checkpoint_resumes_like_the_original(tmp_path, trained_gpt2):
    """Weights, Adam moments and counters survive full -> (dp2, mp2) -> full: resuming from the round-tripped
    checkpoint (its meta.json written by the transform) continues with exactly the original's losses."""
    overrides, checkpoint = trained_gpt2
    model = Trainer(args=gpt2_config(overrides))._get_network()  # pylint: disable=protected-access
    dp2mp2, _ = model_strategy(model, 'dp2_mp2_optshard', tmp_path / 'strategy')
    transform_checkpoint(checkpoint, tmp_path / 'sliced', None, dp2mp2)
    transform_checkpoint(tmp_path / 'sliced', tmp_path / 'back', dp2mp2, None)
    losses = {}
    for name, source in (('original', checkpoint), ('resharded', tmp_path / 'back')):
        config = gpt2_config(overrides, output_dir=str(tmp_path / name), **{'runner_config.epochs': 2})
        losses[name] = Trainer(args=config).train(resume_training=str(source)).losses
    assert len(losses['original']) == 2 and losses['resharded'] == losses['original']


def test_semi_auto_parallel_loads_the_complete_layout_for_mindspore_to_slice(tmp_path, trained_gpt2, monkeypatch):
    """Under semi-auto-parallel (not compilable on CPU, so the parallel mode is faked here) every rank loads the
    complete weights before compiling, which MindSpore then cuts to the rank's slice; ranks other than 0 wait for
    rank 0's transform."""
    overrides, checkpoint = trained_gpt2
    model = Trainer(args=gpt2_config(overrides))._get_network()  # pylint: disable=protected-access
    dp2mp2, _ = model_strategy(model, 'dp2_mp2', tmp_path / 'strategy')
    transform_checkpoint(checkpoint, tmp_path / 'sliced', None, dp2mp2)
    trainer = Trainer(args=gpt2_config(overrides, output_dir=str(tmp_path / 'run'), src_strategy_path_or_dir=dp2mp2))
    trainer.set_parallel_config(data_parallel=2, model_parallel=2)
    trainer.rank_id, trainer.device_num = 0, 4
    network = trainer._get_network()  # pylint: disable=protected-access
    monkeypatch.setattr(ms, 'get_auto_parallel_context', lambda key: 'semi_auto_parallel')
    with pytest.raises(TransformError, match='rank 3 waited 0 s for rank 0'):
        tc.transform_for_run(tmp_path / 'sliced', dp2mp2, tmp_path / 'run', 3, 4, timeout=0.1, poll=0.05)
    loaded = trainer._reshard_checkpoint(network, str(tmp_path / 'sliced'))  # pylint: disable=protected-access
    assert loaded == str(tmp_path / 'run' / 'transformed_checkpoint' / 'sliced' / 'rank_0')
    assert os.listdir(os.path.dirname(loaded)) == ['rank_0']
    assert_identical(arrays(resolve_checkpoint(loaded)), arrays(resolve_checkpoint(str(checkpoint))))

def test_cli_overwrite_and_exit_codes(tmp_path, capsys):
    data = small_checkpoint(tmp_path / 'full')
    strategy = small_strategy(tmp_path / 'mp2.json')
    (tmp_path / 'dst' / 'rank_7').mkdir(parents=True)
    (tmp_path / 'dst' / 'rank_7' / 'old.ckpt').write_bytes(b'an older transform')
    args = ['--src_ckpt_dir', str(tmp_path / 'full'), '--dst_ckpt_dir', str(tmp_path / 'dst'),
            '--dst_ckpt_strategy', str(strategy)]
    assert tc.main(args) == 2
    assert capsys.readouterr().err == (f"transform_ckpt.py: error: --dst_ckpt_dir {tmp_path / 'dst'} is not empty; "
                                       f"pass a new or empty directory (nothing there is overwritten), or "
                                       f"--overwrite to replace it\n")
    assert os.listdir(tmp_path / 'dst') == ['rank_7']
    assert tc.main(args + ['--overwrite']) == 0
    assert sorted(os.listdir(tmp_path / 'dst')) == ['rank_0', 'rank_1']  # nothing of the old output is left
    assert sorted(os.listdir(tmp_path)) == ['dst', 'full', 'mp2.json']
    np.testing.assert_array_equal(arrays(str(tmp_path / 'dst' / 'rank_1' / 'checkpoint_1.ckpt'))['b.weight'],
                                  data['b.weight'][4:])
    capsys.readouterr()
    with open(tmp_path / 'full' / 'rank_0' / 'full.ckpt', 'r+b') as f:  # a corrupt source: its content, exit 1
        f.seek(40)
        f.write(b'\xff\xff\xff\xff')
    assert tc.main(['--src_ckpt_dir', str(tmp_path / 'full'), '--dst_ckpt_dir', str(tmp_path / 'new')]) == 1
    err = capsys.readouterr().err
    assert err.count('\n') == 1 and 'full.ckpt' in err and 'corrupt' in err
    assert not (tmp_path / 'new').exists()
