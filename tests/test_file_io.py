"""tools.file_io: the standard-library atomic writes every CLI and the checkpoint code share."""
import json
import os

import pytest

from mindformers.tools.file_io import first_line, write_atomic, write_json_atomic


def test_write_atomic_writes_text_and_bytes_exactly(tmp_path):
    text = tmp_path / 'a.txt'
    assert write_atomic(str(text), 'héllo\nwörld\n') == str(text)
    assert text.read_bytes() == 'héllo\nwörld\n'.encode('utf-8')
    write_atomic(str(text), b'\x00\xff')
    assert text.read_bytes() == b'\x00\xff'
    assert os.listdir(tmp_path) == ['a.txt']


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path, monkeypatch):
    target = tmp_path / 'table.json'
    write_json_atomic(str(target), {'a': 1}, indent=4)
    assert target.read_text(encoding='utf-8') == '{\n    "a": 1\n}\n'
    with pytest.raises(TypeError):
        write_json_atomic(str(target), {'a': object()})  # not JSON: fails before any file is opened

    def disk_full(fd):
        raise OSError('disk full')
    monkeypatch.setattr(os, 'fsync', disk_full)  # the temporary file is written, then the write fails
    with pytest.raises(OSError, match='disk full'):
        write_json_atomic(str(target), {'a': 2})
    assert json.loads(target.read_text(encoding='utf-8')) == {'a': 1}
    assert os.listdir(tmp_path) == ['table.json']


def test_json_keeps_non_ascii_when_asked(tmp_path):
    path = tmp_path / 'c.json'
    write_json_atomic(str(path), {'k': '中文'}, ensure_ascii=False)
    assert path.read_text(encoding='utf-8') == '{\n  "k": "中文"\n}\n'


def test_first_line():
    assert first_line(ValueError('one\ntwo')) == 'one'
    assert first_line(KeyError()) == 'KeyError'
