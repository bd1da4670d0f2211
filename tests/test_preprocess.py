"""text_to_mindrecord: raw text -> samples of seq_length + 1 tokens -> MindRecord, and its failure modes."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import mindspore.dataset as ds

from mindformers.dataset import CausalLanguageModelDataset, find_mindrecord_files
from mindformers.tools.dataset_preprocess import text_to_mindrecord as t2m
from mindformers.tools.dataset_preprocess.text_to_mindrecord import build_lm_samples, main, write_mindrecord
from mindformers.models.gpt2.gpt2_tokenizer import GPT2Tokenizer
from helpers.cli import json_result, run

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CORPUS = os.path.join(REPO, 'mindformers', 'assets', 'corpus', 'tiny_shakespeare.txt')
VOCAB, MERGES = 'assets/gpt2_tiny/vocab.json', 'assets/gpt2_tiny/merges.txt'  # resolved against the package
TOKENIZER = GPT2Tokenizer(vocab_file=VOCAB, merges_file=MERGES)
TOKENIZER_ARGS = ['--tokenizer', 'GPT2Tokenizer', '--vocab_file', VOCAB, '--merges_file', MERGES]
EOS = TOKENIZER.eos_token_id


def shakespeare(n_chars=3000):
    with open(CORPUS, encoding='utf-8') as f:
        return f.read(n_chars)


def read_rows(files):
    data = ds.MindDataset(files, shuffle=False)
    return np.stack([row[0] for row in data.create_tuple_iterator(output_numpy=True)])


def run_main(args, capsys):
    code = main(args)
    out, err = capsys.readouterr()
    return code, out, err


def test_build_lm_samples_concatenates_documents_with_eos():
    docs = ['hello', 'to be or not', '', 'x' * 20]
    samples, stats = build_lm_samples(iter(docs), TOKENIZER, seq_length=7)
    stream = [t for d in docs if d for t in TOKENIZER.encode(d, add_special_tokens=False) + [EOS]]
    assert samples.dtype == np.int32 and samples.shape == (len(stream) // 8, 8)
    np.testing.assert_array_equal(samples.reshape(-1), stream[:samples.size])
    assert stats == {'documents': 3, 'tokens': len(stream), 'samples': len(stream) // 8,
                     'dropped_tokens': len(stream) % 8, 'seq_length': 7}


def test_build_lm_samples_streams_in_blocks_identically():
    docs = [shakespeare()[i:i + 97] for i in range(0, 3000, 97)]
    whole, stats = build_lm_samples(docs, TOKENIZER, 15)
    blocks = list(t2m.iter_lm_samples(docs, TOKENIZER, 15, block_tokens=50))
    assert len(blocks) > 5
    np.testing.assert_array_equal(np.concatenate(blocks), whole)
    assert stats['samples'] == len(whole)


def test_cli_txt_round_trip_and_summary(tmp_path, capsys):
    text = shakespeare()
    docs = [text[:1200], text[1200:]]
    for i, doc in enumerate(docs):
        (tmp_path / f'part{i}.txt').write_text(doc, encoding='utf-8')
    out_file = tmp_path / 'out' / 'train.mindrecord'
    code, out, _ = run_main(['--input', str(tmp_path / 'part*.txt'), *TOKENIZER_ARGS, '--seq_length', '63',
                             '--output_file', str(out_file), '--quiet'], capsys)
    assert code == 0
    expected, stats = build_lm_samples(docs, TOKENIZER, 63)
    tokens = sum(len(TOKENIZER.encode(d, add_special_tokens=False)) + 1 for d in docs)
    assert out.startswith(f'text_to_mindrecord: wrote {out_file} in ')  # the report for people, then for scripts
    summary = json_result(out)
    assert summary['outputs'] == [str(out_file)] and summary['seq_length'] == 63
    assert (summary['documents'], summary['tokens'], summary['samples'], summary['dropped_tokens']) == (
        2, tokens, tokens // 64, tokens % 64)
    assert sorted(os.listdir(out_file.parent)) == ['train.mindrecord', 'train.mindrecord.db']
    np.testing.assert_array_equal(read_rows(str(out_file)), expected)


def test_cli_split_lines_jsonl_text_key_and_splits(tmp_path, capsys):
    lines = [line for line in shakespeare().splitlines() if line.strip()]
    (tmp_path / 'a.txt').write_text('\n'.join(lines[:20]) + '\n\n', encoding='utf-8')
    with open(tmp_path / 'b.jsonl', 'w', encoding='utf-8') as f:
        for line in lines[20:]:
            f.write(json.dumps({'id': 1, 'body': line}) + '\n')
    out_file = tmp_path / 'out.mindrecord'
    code, out, _ = run_main(['--input', str(tmp_path / 'a.txt'), str(tmp_path / 'b.jsonl'), '--split_lines',
                             '--text_key', 'body', *TOKENIZER_ARGS, '--seq_length', '31',
                             '--output_file', str(out_file), '--num_splits', '2', '--quiet'], capsys)
    assert code == 0
    expected, stats = build_lm_samples(lines, TOKENIZER, 31)
    assert json_result(out)['documents'] == len(lines) == stats['documents']
    files = [str(out_file) + '0', str(out_file) + '1']
    assert all(os.path.isfile(f) and os.path.isfile(f + '.db') for f in files)
    got = read_rows(files)
    assert sorted(map(tuple, got)) == sorted(map(tuple, expected))


def test_refuses_to_overwrite_unless_asked(tmp_path, capsys):
    (tmp_path / 'in.txt').write_text(shakespeare(), encoding='utf-8')
    out_file = tmp_path / 'out.mindrecord'

    def args(seq_length, *extra):
        return ['--input', str(tmp_path / 'in.txt'), *TOKENIZER_ARGS, '--seq_length', str(seq_length),
                '--output_file', str(out_file), '--quiet', *extra]

    assert run_main(args(31), capsys)[0] == 0
    before = out_file.read_bytes()
    code, _, err = run_main(args(63), capsys)
    assert code == 2 and '--overwrite' in err and str(out_file) in err
    assert out_file.read_bytes() == before
    assert run_main(args(63, '--overwrite'), capsys)[0] == 0
    assert read_rows(str(out_file)).shape[1] == 64
    assert sorted(os.listdir(tmp_path)) == ['in.txt', 'out.mindrecord', 'out.mindrecord.db']


@pytest.mark.parametrize('case, needle, exit_code', [  # 2: the command line is wrong; 1: the data is
    ('missing', 'input not found', 2),
    ('bad_json', 'bad.jsonl:3: bad JSON line', 1),
    ('no_key', "bad.jsonl:1: no field 'text' (fields: 'body')", 1),
    ('too_little', 'too little text', 1),
    ('empty_dir', 'no .txt, .jsonl or .json files in directory', 2),
    ('bad_suffix', '--output_file must end with .mindrecord', 2),
    ('bad_tokenizer', "unknown tokenizer type 'NoSuchTokenizer'", 2),
    ('zero_seq', '--seq_length must be >= 1', 2),
    ('not_utf8', 'latin1.txt: not valid UTF-8 (byte offset 3)', 1),
    ('under_a_file', 'out/f is not a writable directory', 2),
])
def test_bad_input_is_one_line_with_its_exit_code_and_no_files(tmp_path, capsys, case, needle, exit_code):
    data = tmp_path / 'data'
    data.mkdir()
    good = data / 'good.txt'
    good.write_text(shakespeare(500), encoding='utf-8')
    inputs, extra, out_name = [str(good)], [], 'out.mindrecord'
    if case == 'missing':
        inputs = [str(data / 'nope.txt')]
    elif case in ('bad_json', 'no_key'):
        bad = data / 'bad.jsonl'
        rows = [json.dumps({'text': 'fine'}), json.dumps({'text': 'also fine'}), '{"text": broken']
        bad.write_text('\n'.join(rows if case == 'bad_json' else [json.dumps({'body': 'x'})]) + '\n')
        inputs = [str(bad)]
    elif case == 'too_little':
        extra = ['--seq_length', '4096']
    elif case == 'empty_dir':
        (tmp_path / 'empty').mkdir()
        inputs = [str(tmp_path / 'empty')]
    elif case == 'bad_suffix':
        out_name = 'out.bin'
    elif case == 'zero_seq':
        extra = ['--seq_length', '0']
    elif case == 'not_utf8':
        (data / 'latin1.txt').write_bytes('caf\u00e9 \u00e9t\u00e9'.encode('latin-1') * 50)
        inputs = [str(data)]
    tokenizer = list(TOKENIZER_ARGS)
    if case == 'bad_tokenizer':
        tokenizer[1] = 'NoSuchTokenizer'
    out_dir = tmp_path / 'out'
    if case == 'under_a_file':
        out_dir.mkdir()
        (out_dir / 'f').write_text('in the way')
        out_name = 'f/sub/out.mindrecord'
    args = ['--input', *inputs, *tokenizer, '--seq_length', '31', '--output_file', str(out_dir / out_name),
            '--quiet', *extra]
    code, out, err = run_main(args, capsys)
    assert code == exit_code, (out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith('text_to_mindrecord: error:') and needle in lines[0], err
    assert not out_dir.exists() or os.listdir(out_dir) == (['f'] if case == 'under_a_file' else [])


def test_tokenizer_dir_gives_the_same_samples(tmp_path, capsys):
    (tmp_path / 'in.txt').write_text(shakespeare(), encoding='utf-8')
    TOKENIZER.save_pretrained(str(tmp_path / 'tok'))
    outputs = []
    for name, tokenizer in (('a', TOKENIZER_ARGS), ('b', ['--tokenizer', 'GPT2Tokenizer',
                                                         '--tokenizer_dir', str(tmp_path / 'tok')])):
        out_file = str(tmp_path / f'{name}.mindrecord')
        assert run_main(['--input', str(tmp_path / 'in.txt'), *tokenizer, '--seq_length', '15',
                         '--output_file', out_file, '--quiet'], capsys)[0] == 0
        outputs.append(read_rows(out_file))
    np.testing.assert_array_equal(outputs[0], outputs[1])


def test_failure_while_writing_leaves_nothing(tmp_path):
    def blocks():
        yield np.zeros((3, 8), np.int32)
        raise RuntimeError('tokenizer crashed')

    with pytest.raises(RuntimeError, match='tokenizer crashed'):
        write_mindrecord(str(tmp_path / 'x.mindrecord'), blocks(), seq_length=7)
    assert os.listdir(tmp_path) == []
    with pytest.raises(ValueError, match=r'does not match \[n, 8\]'):
        write_mindrecord(str(tmp_path / 'x.mindrecord'), [np.zeros((3, 5), np.int32)], seq_length=7)
    assert os.listdir(tmp_path) == []


def test_progress_without_tqdm_prints_eta(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, 'tqdm', None)
    progress = t2m._Progress(total=1000)  # pylint: disable=protected-access
    assert progress.bar is None
    progress.update(400)
    progress.close()
    err = capsys.readouterr().err
    assert 'tokenizing:' in err and '40.0%' in err and 'ETA' in err and err.endswith('\n')


def run_module(*args):
    return run('mindformers.tools.dataset_preprocess.text_to_mindrecord', *args, timeout=300)


def test_module_entry_point_on_the_bundled_corpus(tmp_path):
    out_file = tmp_path / 'shakespeare.mindrecord'
    proc = run_module('--input', CORPUS, *TOKENIZER_ARGS, '--seq_length', '128', '--output_file', str(out_file))
    assert proc.returncode == 0, proc.stderr
    stats = json_result(proc.stdout)
    assert stats['documents'] == 1 and stats['samples'] == stats['tokens'] // 129 > 100
    assert 'tokenizing' in proc.stderr  # the progress bar
    assert 'Warning' not in proc.stderr  # e.g. runpy's "found in sys.modules after import of package"
    assert read_rows(str(out_file)).shape == (stats['samples'], 129)

    proc = run_module('--input', str(tmp_path / 'missing.txt'), *TOKENIZER_ARGS, '--seq_length', '8',
                      '--output_file', str(tmp_path / 'o.mindrecord'))
    assert proc.returncode == 2
    assert f"text_to_mindrecord: error: input not found: {tmp_path / 'missing.txt'}" in proc.stderr
    assert sorted(os.listdir(tmp_path)) == ['shakespeare.mindrecord', 'shakespeare.mindrecord.db']


# ----------------------------------------------------------------------------- replacing an output, crashes
def test_overwrite_replaces_every_file_of_the_old_output_whatever_its_split_count(tmp_path, capsys):
    (tmp_path / 'in.txt').write_text(shakespeare(), encoding='utf-8')
    out_file = tmp_path / 'out' / 'train.mindrecord'
    write_mindrecord(str(out_file) + '7', [np.zeros((2, 8), np.int32)], 7)  # an output of its own: kept

    def convert(seq_length, num_splits, *extra):
        return run_main(['--input', str(tmp_path / 'in.txt'), *TOKENIZER_ARGS, '--seq_length', str(seq_length),
                         '--output_file', str(out_file), '--num_splits', str(num_splits), '--quiet', *extra],
                        capsys)

    assert convert(15, 3)[0] == 0
    code, _, err = convert(31, 2)  # another split count is the same output: refused without --overwrite
    assert code == 2 and f"output already exists: {out_file}0 (pass --overwrite" in err
    for seq_length, num_splits, names in ((31, 2, ['train.mindrecord0', 'train.mindrecord1']),
                                          (63, 1, ['train.mindrecord'])):
        assert convert(seq_length, num_splits, '--overwrite')[0] == 0
        assert sorted(os.listdir(out_file.parent)) == sorted(names + [n + '.db' for n in names] +
                                                             ['train.mindrecord7', 'train.mindrecord7.db'])
        dataset = CausalLanguageModelDataset({'data_loader': {'type': 'MindDataset', 'dataset_files': [
            str(out_file.parent / n) for n in names]}, 'seq_length': seq_length})
        assert dataset.get_dataset_size() == len(build_lm_samples([shakespeare()], TOKENIZER, seq_length)[0])


class _Killed(BaseException):
    """Stands for a SIGKILL: nothing after it runs, not even `except Exception`."""


def test_a_crash_anywhere_in_the_swap_leaves_the_old_or_new_output_or_a_refused_one(tmp_path, monkeypatch):
    """Killed after each rename of --overwrite (2 old files out, 1 old index, 3 new files in, ...): a reader sees
    the complete old data, the complete new data, or an error naming the incomplete set, never a mix; the next
    writer finishes the swap."""
    from mindformers.dataset import mindrecord_io
    old, new = np.full((6, 8), 1, np.int32), np.full((5, 8), 2, np.int32)
    real_replace = os.replace
    renames = 0
    for kill_after in range(12):
        out_dir = tmp_path / f'k{kill_after}'
        out_file = str(out_dir / 'train.mindrecord')
        write_mindrecord(out_file, [old], 7, num_splits=2)
        calls = []

        def replace(src, dst, _calls=calls, _kill_after=kill_after):
            if len(_calls) == _kill_after:
                raise _Killed()
            _calls.append(dst)
            real_replace(src, dst)

        monkeypatch.setattr(mindrecord_io.os, 'replace', replace)
        try:
            write_mindrecord(out_file, [new], 7, num_splits=3, overwrite=True)
            renames = len(calls)
        except _Killed:
            pass
        monkeypatch.setattr(mindrecord_io.os, 'replace', real_replace)
        try:
            seen = read_rows(find_mindrecord_files(str(out_dir)))
            assert np.array_equal(seen, old) or np.array_equal(seen, new), kill_after
        except ValueError as err:  # an incomplete set or no data at all, named, with the swap that will finish
            assert str(out_dir) in str(err) and 'a write killed while replacing its output is pending' in str(err)
        monkeypatch.setattr(mindrecord_io, '_running', lambda pid: False)  # the killed writer is gone
        mindrecord_io.recover_writes(out_file)
        monkeypatch.undo()
        np.testing.assert_array_equal(read_rows(find_mindrecord_files(str(out_dir))), new)
        assert sorted(os.listdir(out_dir)) == sorted(f'train.mindrecord{i}{ext}' for i in range(3)
                                                     for ext in ('', '.db')), kill_after
    assert renames == 10  # 4 old files out, 6 new in: every crash point was tried


SLOW_WRITER = """
import sys, time
from mindformers.tools.dataset_preprocess import text_to_mindrecord as t2m
def stalled(*args, **kwargs):  # tokenizes, then stalls while the output is being written
    yield from real(*args, **kwargs)
    print('writing', flush=True)
    time.sleep(300)
real, t2m.iter_lm_samples = t2m.iter_lm_samples, stalled
sys.exit(t2m.main(sys.argv[1:]))
"""


def test_a_killed_run_leaves_a_temporary_directory_that_the_next_run_removes(tmp_path, capsys):
    from mindformers.dataset.mindrecord_io import recover_writes
    (tmp_path / 'in.txt').write_text(shakespeare(), encoding='utf-8')
    out_file = tmp_path / 'out' / 'train.mindrecord'
    args = ['--input', str(tmp_path / 'in.txt'), *TOKENIZER_ARGS, '--seq_length', '15', '--output_file',
            str(out_file), '--quiet']
    writer = subprocess.Popen([sys.executable, '-c', SLOW_WRITER, *args], cwd=REPO, stdout=subprocess.PIPE,
                              text=True)
    try:
        assert writer.stdout.readline() == 'writing\n'
        leftovers = os.listdir(out_file.parent)
        assert len(leftovers) == 1 and leftovers[0].startswith(f'.train.mindrecord.tmp-{writer.pid}-')
        recover_writes(str(out_file))  # the writer still runs: its directory is left alone
        assert os.listdir(out_file.parent) == leftovers
    finally:
        writer.kill()
        writer.wait()
        writer.stdout.close()
    assert os.listdir(out_file.parent) == leftovers  # kill -9: nothing cleaned up
    assert run_main(args, capsys)[0] == 0
    assert sorted(os.listdir(out_file.parent)) == ['train.mindrecord', 'train.mindrecord.db']


FULL_DISK_RUN = """
import resource, runpy, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead of killing us
resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))  # no file may grow past 1 MB: a full disk
sys.argv[0] = sys.argv[1]
runpy.run_module(sys.argv.pop(1), run_name='__main__', alter_sys=True)
"""


@pytest.mark.parametrize('module', ['text_to_mindrecord', 'instruction_to_mindrecord'])
def test_a_full_disk_is_one_line_exit_1_and_leaves_nothing(tmp_path, module):
    out_dir = tmp_path / 'out'
    out_dir.mkdir()
    (out_dir / 'keep.txt').write_text('unrelated')
    extra = ['--input', CORPUS] if module == 'text_to_mindrecord' else [
        '--input', os.path.join(REPO, 'mindformers', 'assets', 'instruction', 'alpaca_sample.json'),
        '--format', 'alpaca', '--template', 'alpaca']
    proc = subprocess.run([sys.executable, '-c', FULL_DISK_RUN, f'mindformers.tools.dataset_preprocess.{module}',
                           *extra, *TOKENIZER_ARGS, '--seq_length', '255', '--output_file',
                           str(out_dir / 'train.mindrecord'), '--quiet'],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{module}: error: writing {out_dir / 'train.mindrecord'} "
                                                   f"failed: ") and 'nothing was written' in lines[0], proc.stderr
    assert os.listdir(out_dir) == ['keep.txt']


class _OffVocabTokenizer(GPT2Tokenizer):
    """Gives an id past its vocabulary for text holding 'BAD', as a tokenizer with a broken added token would."""

    def encode(self, text, add_special_tokens=True, **kwargs):
        ids = super().encode(text, add_special_tokens=add_special_tokens, **kwargs)
        return ids + [len(self) + 5] if 'BAD' in text else ids


def test_token_ids_outside_the_tokenizers_vocabulary_are_refused_naming_the_document(tmp_path, capsys):
    data = tmp_path / 'docs.jsonl'
    data.write_text('\n'.join(json.dumps({'text': t}) for t in ('fine text', 'more text', 'BAD text')) + '\n')
    tokenizer = _OffVocabTokenizer(vocab_file=VOCAB, merges_file=MERGES)
    with pytest.raises(t2m.PreprocessError, match=rf"{data}:3: token id {len(tokenizer) + 5} from "
                                                  rf"_OffVocabTokenizer \(EOS included\) is outside the tokenizer's "
                                                  rf"vocabulary of {len(tokenizer)} ids"):
        build_lm_samples(t2m.iter_documents([str(data)], with_where=True), tokenizer, 3)
