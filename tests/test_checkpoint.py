"""Checkpoint files: atomic writes, meta.json, pruning, resolution of a directory, clear errors."""
import json
import os

import numpy as np
import pytest
import mindspore as ms

from mindformers.tools.checkpoint import (CheckpointError, file_sha256, load_checkpoint_file, record_checkpoint,
                                          resolve_checkpoint, save_checkpoint_atomic)


def weights(value=1.0):
    return {'w': np.full((4, 3), value, np.float32), 'b': np.arange(3, dtype=np.float32)}


@pytest.mark.parametrize('ext', ['ckpt', 'safetensors'])
def test_save_and_load_round_trip(tmp_path, ext):
    path = save_checkpoint_atomic(weights(2.0), str(tmp_path / f'a.{ext}'))
    loaded = load_checkpoint_file(path)
    np.testing.assert_array_equal(loaded['w'].asnumpy(), weights(2.0)['w'])
    assert sorted(os.listdir(tmp_path)) == [f'a.{ext}']


def test_failed_save_leaves_no_file_and_keeps_the_old_one(tmp_path, monkeypatch):
    path = str(tmp_path / 'a.ckpt')
    save_checkpoint_atomic(weights(1.0), path)
    real_save = ms.save_checkpoint

    def crash_midway(save_obj, ckpt_file_name, **kwargs):
        real_save(save_obj, ckpt_file_name, **kwargs)  # the temporary file is complete on disk ...
        raise KeyboardInterrupt  # ... and the process is interrupted before the rename

    monkeypatch.setattr(ms, 'save_checkpoint', crash_midway)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint_atomic(weights(5.0), path)
    assert os.listdir(tmp_path) == ['a.ckpt']  # no temporary leftovers
    np.testing.assert_array_equal(load_checkpoint_file(path)['w'].asnumpy(), weights(1.0)['w'])


def test_truncated_and_garbage_files_are_reported_by_name(tmp_path):
    path = save_checkpoint_atomic(weights(), str(tmp_path / 'good.ckpt'))
    data = open(path, 'rb').read()
    (tmp_path / 'cut.ckpt').write_bytes(data[:len(data) // 2])
    (tmp_path / 'junk.safetensors').write_bytes(b'not a checkpoint at all')
    for name in ('cut.ckpt', 'junk.safetensors'):
        with pytest.raises(CheckpointError, match=name):
            load_checkpoint_file(str(tmp_path / name))
    with pytest.raises(CheckpointError, match='not found'):
        load_checkpoint_file(str(tmp_path / 'absent.ckpt'))


def test_meta_json_and_keep_max(tmp_path):
    directory = str(tmp_path)
    for step in (10, 20, 30, 40):
        name = f'net_rank_0-1_{step}.ckpt'
        save_checkpoint_atomic(weights(step), os.path.join(directory, name))
        record_checkpoint(directory, name, epoch=1, step=step, global_step=step, keep_max=2)
    meta = json.loads((tmp_path / 'meta.json').read_text())
    assert meta['last_ckpt_file'] == 'net_rank_0-1_40.ckpt' and meta['global_step'] == 40
    kept = [e['file'] for e in meta['checkpoints']]
    assert kept == ['net_rank_0-1_30.ckpt', 'net_rank_0-1_40.ckpt']
    assert sorted(f for f in os.listdir(directory) if f.endswith('.ckpt')) == kept
    assert meta['checkpoints'][-1]['sha256'] == file_sha256(os.path.join(directory, kept[-1]))
    assert [e['global_step'] for e in meta['checkpoints']] == [30, 40]


def test_corrupt_newest_falls_back_to_previous_and_says_so(tmp_path, capsys):
    rank_dir = tmp_path / 'rank_0'
    rank_dir.mkdir()
    for step in (1, 2, 3):
        name = f'net_rank_0-1_{step}.ckpt'
        save_checkpoint_atomic(weights(step), str(rank_dir / name))
        record_checkpoint(str(rank_dir), name, 1, step, step, keep_max=5)
    newest = rank_dir / 'net_rank_0-1_3.ckpt'
    data = bytearray(newest.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte: same size, same name, still the newest
    newest.write_bytes(bytes(data))
    (rank_dir / 'net_rank_0-1_2.ckpt').unlink()  # and the one before it vanished
    assert resolve_checkpoint(str(tmp_path)).endswith('net_rank_0-1_1.ckpt')
    warnings = capsys.readouterr().err
    assert 'net_rank_0-1_3.ckpt is corrupt' in warnings and 'net_rank_0-1_2.ckpt' in warnings
    with pytest.raises(CheckpointError, match='net_rank_0-1_3.ckpt is corrupt'):
        resolve_checkpoint(str(newest))  # asked for by name: an error, never a silent substitute


def test_resolve_prefers_meta_over_names_and_times(tmp_path):
    rank_dir = tmp_path / 'rank_0'
    rank_dir.mkdir()
    for name in ('net_rank_0-2_5.ckpt', 'net_rank_0-1_9.ckpt'):
        save_checkpoint_atomic(weights(), str(rank_dir / name))
    # without meta.json: the highest (epoch, step) in the name, never a hidden temporary file
    (rank_dir / '.net_rank_0-3_1.ckpt.partial.123.ckpt').write_bytes(b'partial')
    assert resolve_checkpoint(str(tmp_path)).endswith('net_rank_0-2_5.ckpt')
    # with meta.json: its last complete file wins, even if another file is newer by name or time
    record_checkpoint(str(rank_dir), 'net_rank_0-1_9.ckpt', 1, 9, 9, keep_max=5)
    os.utime(rank_dir / 'net_rank_0-2_5.ckpt')
    assert resolve_checkpoint(str(tmp_path)).endswith('net_rank_0-1_9.ckpt')
    assert resolve_checkpoint(str(rank_dir / 'net_rank_0-2_5.ckpt')).endswith('net_rank_0-2_5.ckpt')
    (tmp_path / 'empty').mkdir()
    with pytest.raises(CheckpointError, match='no checkpoint file'):
        resolve_checkpoint(str(tmp_path / 'empty'))
    with pytest.raises(CheckpointError, match='neither a file nor a directory'):
        resolve_checkpoint(str(tmp_path / 'nowhere'))
