"""GPT2Tokenizer / BaseTokenizer: ids identical to HF GPT2TokenizerFast, batching, padding, truncation, tensors,
save/load, error messages, and the deterministic tokenizer-training CLI that produced the bundled assets."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import transformers

import mindformers
from mindformers.models.base_tokenizer import BaseTokenizer, BatchEncoding
from mindformers.models.gpt2.gpt2_tokenizer import GPT2Tokenizer, GPT2TokenizerFast
from mindformers.tools import train_tokenizer
from mindformers.tools.register import MindFormerRegister, MindFormerModuleType
from mindformers.tools.utils import resolve_path

TINY_VOCAB = 'assets/gpt2_tiny/vocab.json'
TINY_MERGES = 'assets/gpt2_tiny/merges.txt'
CORPUS = resolve_path('assets/corpus/tiny_shakespeare.txt')
EOT = '<|endoftext|>'
HF_LIKE = dict(add_bos_token=False, add_eos_token=False)  # HF GPT2TokenizerFast's behaviour, one flag away

MIXED = [
    "First Citizen:\nBefore we proceed any further, hear me speak.",
    "Hello, world! It's 2024 -- isn't it? we'll see; they've gone.",
    "中文分词测试：你好，世界。",
    "emoji 😀👍🏽 flags 🇨🇳 and a ZWJ family 👨‍👩‍👧",
    "spaces:   three,     five, and trailing   ",
    "newlines\n\n\nand\r\nwindows\n",
    "\ttabs\t\tand\tmixed \t whitespace",
    f"end{EOT}start",
    f" {EOT} {EOT}{EOT}\n",
    "<|endoftext",
    "café naïve Ünïcödé",
    "",
    "   ",
]


@pytest.fixture(scope='module')
def trained_dir(tmp_path_factory):
    """A tokenizer trained in the test, by the CLI, on a slice of the corpus plus some non-ASCII text."""
    out = tmp_path_factory.mktemp('trained_bpe')
    with open(CORPUS, encoding='utf-8') as f:
        text = f.read()[:40000]
    (out / 'slice.txt').write_text(text + "\n你好，世界。 😀😀 café\n", encoding='utf-8')
    assert train_tokenizer.main(['--input', str(out / 'slice.txt'), '--vocab_size', '500',
                                 '--output_dir', str(out)]) == 0
    return out


@pytest.fixture(scope='module', params=['bundled', 'trained'])
def files(request, trained_dir):
    if request.param == 'bundled':
        return resolve_path(TINY_VOCAB), resolve_path(TINY_MERGES)
    return str(trained_dir / 'vocab.json'), str(trained_dir / 'merges.txt')


@pytest.fixture(scope='module')
def tiny():
    """The bundled tiny vocabulary without MindFormers' BOS/EOS (HF's ids)."""
    return GPT2Tokenizer(TINY_VOCAB, TINY_MERGES, **HF_LIKE)


@pytest.mark.parametrize('options', [{}, {'add_prefix_space': True}, {'add_bos_token': True}])
def test_ids_match_hf_gpt2_tokenizer_fast(files, options):
    ours = GPT2Tokenizer(*files, **{**HF_LIKE, **options})
    ref = transformers.GPT2TokenizerFast(*files, **options)
    for text in MIXED:
        assert ours.encode(text) == ref(text)['input_ids'], repr(text)
        assert ours(text)['input_ids'] == ref(text)['input_ids'], repr(text)
        assert ours.tokenize(text) == ref.tokenize(text), repr(text)
    assert ours(MIXED)['input_ids'] == ref(MIXED)['input_ids']
    assert ours.encode(MIXED[0], add_special_tokens=False) == ref(MIXED[0], add_special_tokens=False)['input_ids']
    assert ours.vocab_size == ref.vocab_size and len(ours) == len(ref)


def test_decode_round_trips_every_text(files):
    ours = GPT2Tokenizer(*files, **HF_LIKE)
    ref = transformers.GPT2TokenizerFast(*files)
    for text in MIXED:
        ids = ours.encode(text)
        assert ours.decode(ids) == text, repr(text)
        assert ours.decode(ids) == ref.decode(ids)
    ids = ours.encode(f"a{EOT}b")
    assert ours.decode(ids, skip_special_tokens=True) == 'ab'
    assert ours.decode(np.array(ids)) == f"a{EOT}b"
    batch = ours(["one two", "three"], padding=True, return_tensors='np')['input_ids']
    assert ours.batch_decode(batch, skip_special_tokens=True) == ["one two", "three"]


def test_endoftext_is_one_token_even_inside_text(tiny):
    assert tiny.eos_token_id == tiny.bos_token_id == tiny.pad_token_id == tiny.unk_token_id == 0
    ids = tiny.encode(f"word{EOT}word")
    assert ids.count(0) == 1 and ids[:ids.index(0)] == ids[ids.index(0) + 1:] == tiny.encode("word")
    assert 0 not in tiny.encode("<|endoftext")
    assert tiny.encode(EOT * 3) == [0, 0, 0]


def test_bundled_assets_resolve_from_any_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    tok = GPT2Tokenizer(TINY_VOCAB, TINY_MERGES)
    assert tok.vocab_size == len(tok) == 512
    assert tok.decode(tok.encode("O Romeo, Romeo!"), skip_special_tokens=True) == "O Romeo, Romeo!"


def test_batch_padding_right_and_left_matches_hf(tiny):
    texts = ["Hello world, how are you", "hi", ""]
    lengths = [len(tiny.encode(t)) for t in texts]
    ref = transformers.GPT2TokenizerFast(resolve_path(TINY_VOCAB), resolve_path(TINY_MERGES), pad_token=EOT)
    for side in ('right', 'left'):
        tok = GPT2Tokenizer(TINY_VOCAB, TINY_MERGES, padding_side=side, **HF_LIKE)
        ref.padding_side = side
        out = tok(texts, padding=True)
        assert isinstance(out, BatchEncoding) and out.input_ids is out['input_ids']
        assert out.pop('token_type_ids') == [[0] * max(lengths)] * len(texts)
        assert out == dict(ref(texts, padding=True))
        longest = max(lengths)
        for ids, mask, n in zip(out['input_ids'], out['attention_mask'], lengths):
            assert len(ids) == len(mask) == longest and sum(mask) == n
            real = ids[:n] if side == 'right' else ids[longest - n:]
            assert real == tiny.encode(texts[lengths.index(n)])
            assert mask == ([1] * n + [0] * (longest - n) if side == 'right' else [0] * (longest - n) + [1] * n)
    assert tiny("only one", padding=True)['input_ids'] == tiny.encode("only one")
    with pytest.raises(ValueError, match='has no pad_token'):
        GPT2Tokenizer(TINY_VOCAB, TINY_MERGES, pad_token=None, **HF_LIKE)(texts, padding=True)
    assert tiny(texts)['input_ids'] == [tiny.encode(t) for t in texts]


def test_truncation_and_max_length(tiny):
    text = "Now is the winter of our discontent made glorious summer by this sun of York"
    ids = tiny.encode(text)
    assert len(ids) > 8
    assert tiny(text, truncation=True, max_length=8)['input_ids'] == ids[:8]
    assert tiny.encode(text, truncation=True, max_length=8) == ids[:8]
    left = GPT2Tokenizer(TINY_VOCAB, TINY_MERGES, truncation_side='left', **HF_LIKE)
    assert left(text, truncation=True, max_length=8)['input_ids'] == ids[-8:]
    out = tiny([text, "short"], padding='max_length', truncation=True, max_length=8)
    assert out['input_ids'] == [ids[:8], tiny.encode("short") + [0] * (8 - len(tiny.encode("short")))]
    assert [sum(m) for m in out['attention_mask']] == [8, len(tiny.encode("short"))]
    with_bos = GPT2Tokenizer(TINY_VOCAB, TINY_MERGES, add_bos_token=True, add_eos_token=False)
    assert with_bos(text, truncation=True, max_length=5)['input_ids'] == [0] + ids[:4]
    assert tiny(text, max_length=8)['input_ids'] == ids  # max_length alone does not truncate
    with pytest.raises(ValueError, match='needs max_length'):
        tiny(text, truncation=True)
    both = GPT2Tokenizer(TINY_VOCAB, TINY_MERGES, add_bos_token=True, add_eos_token=True)
    assert both(text, truncation=True, max_length=5)['input_ids'] == [0] + ids[:3] + [0]
    with pytest.raises(ValueError, match='leaves no room'):
        both(text, truncation=True, max_length=1)
    with pytest.raises(ValueError, match='max_length must be a positive int'):
        tiny(text, truncation=True, max_length=-3)
    bounded = GPT2Tokenizer(TINY_VOCAB, TINY_MERGES, model_max_length=6, **HF_LIKE)
    assert bounded(text, truncation=True)['input_ids'] == ids[:6]
    assert bounded("a", padding='max_length')['input_ids'] == tiny.encode("a") + [0] * 5


def test_return_tensors_np_and_ms(tiny):
    import mindspore as ms
    texts = ["To be, or not to be", "that is the question"]
    lists = tiny(texts, padding=True)
    arrays = tiny(texts, padding=True, return_tensors='np')
    assert arrays['input_ids'].dtype == np.int32 and arrays['attention_mask'].dtype == np.int32
    assert arrays['input_ids'].shape == (2, max(len(tiny.encode(t)) for t in texts))
    assert arrays['input_ids'].tolist() == lists['input_ids']
    assert arrays['attention_mask'].tolist() == lists['attention_mask']
    single = tiny(texts[0], return_tensors='np')['input_ids']
    assert single.shape == (1, len(tiny.encode(texts[0])))
    tensors = tiny(texts, padding='max_length', max_length=12, return_tensors='ms')
    assert isinstance(tensors['input_ids'], ms.Tensor) and tensors['input_ids'].dtype == ms.int32
    assert tensors['input_ids'].shape == (2, 12) and tensors['attention_mask'].dtype == ms.int32
    assert tensors['input_ids'].asnumpy()[:, :5].tolist() == [ids[:5] for ids in lists['input_ids']]
    assert tiny.batch_decode(tensors['input_ids'], skip_special_tokens=True) == texts
    with pytest.raises(ValueError, match='sequences of lengths'):
        tiny(["a", "a much longer line of text"], return_tensors='np')
    with pytest.raises(ValueError, match="return_tensors must be None, 'np' or 'ms'"):
        tiny(texts, padding=True, return_tensors='pt')


def test_save_pretrained_from_pretrained_round_trip(files, tmp_path):
    tok = GPT2Tokenizer(*files, add_prefix_space=True, model_max_length=64)
    tok.padding_side = 'left'  # set after construction: still saved
    written = tok.save_pretrained(tmp_path / 'saved')
    names = sorted(os.path.basename(p) for p in written)
    assert names == ['merges.txt', 'tokenizer_config.json', 'vocab.json']
    with open(tmp_path / 'saved' / 'tokenizer_config.json', encoding='utf-8') as f:
        config = json.load(f)
    assert config['tokenizer_class'] == 'GPT2Tokenizer' and config['add_prefix_space'] is True
    assert 'vocab_file' not in config and config['padding_side'] == 'left'
    for loaded in (GPT2Tokenizer.from_pretrained(tmp_path / 'saved'),
                   BaseTokenizer.from_pretrained(str(tmp_path / 'saved'))):
        assert type(loaded) is GPT2Tokenizer
        assert loaded.padding_side == 'left' and loaded.add_prefix_space and loaded.model_max_length == 64
        for text in MIXED:
            assert loaded.encode(text) == tok.encode(text), repr(text)
        assert loaded(MIXED, padding=True) == tok(MIXED, padding=True)
    with open(files[0], 'rb') as a, open(tmp_path / 'saved' / 'vocab.json', 'rb') as b:
        assert a.read() == b.read()
    assert GPT2Tokenizer.from_pretrained(tmp_path / 'saved', padding_side='right').padding_side == 'right'
    loaded.save_pretrained(tmp_path / 'saved')  # saving over its own source files is fine
    assert GPT2Tokenizer.from_pretrained(tmp_path / 'saved').encode(MIXED[0]) == tok.encode(MIXED[0])


def test_missing_or_bad_files_give_clear_errors(tmp_path):
    missing = str(tmp_path / 'nope' / 'vocab.json')
    with pytest.raises(FileNotFoundError, match=r"vocab_file .*nope/vocab\.json"):
        GPT2Tokenizer(missing, TINY_MERGES)
    with pytest.raises(FileNotFoundError, match=r"merges_file .*missing_merges\.txt"):
        GPT2Tokenizer(TINY_VOCAB, str(tmp_path / 'missing_merges.txt'))
    with pytest.raises(ValueError, match="needs vocab_file"):
        GPT2Tokenizer('', TINY_MERGES)
    bad = tmp_path / 'bad_vocab.json'
    bad.write_text('{"not json', encoding='utf-8')
    with pytest.raises(ValueError, match='bad_vocab.json'):
        GPT2Tokenizer(str(bad), TINY_MERGES)
    with pytest.raises(ValueError, match='no such directory'):
        GPT2Tokenizer.from_pretrained(tmp_path / 'absent')
    with pytest.raises(ValueError, match='has no tokenizer_config.json'):
        BaseTokenizer.from_pretrained(tmp_path)
    with pytest.raises(TypeError, match='pad_tokn'):
        GPT2Tokenizer(TINY_VOCAB, TINY_MERGES, pad_tokn=EOT)
    with pytest.raises(ValueError, match="padding_side must be 'right' or 'left'"):
        GPT2Tokenizer(TINY_VOCAB, TINY_MERGES, padding_side='center')


def test_registry_build_and_alias():
    get = MindFormerRegister.get_cls
    assert get(MindFormerModuleType.TOKENIZER, 'GPT2Tokenizer') is GPT2Tokenizer
    assert get(MindFormerModuleType.TOKENIZER, 'GPT2TokenizerFast') is GPT2TokenizerFast is GPT2Tokenizer
    tok = MindFormerRegister.get_instance_from_cfg(
        {'type': 'GPT2Tokenizer', 'vocab_file': TINY_VOCAB, 'merges_file': TINY_MERGES},
        MindFormerModuleType.TOKENIZER)
    assert tok.encode("Hello") == GPT2Tokenizer(TINY_VOCAB, TINY_MERGES).encode("Hello")


def test_special_tokens_conversions_and_bad_ids(tiny):
    vocab = tiny.get_vocab()
    assert len(vocab) == len(tiny) == 512 and vocab[EOT] == 0
    assert tiny.all_special_tokens == [EOT] and tiny.all_special_ids == [0]
    tokens = tiny.tokenize("Hello there")
    ids = tiny.convert_tokens_to_ids(tokens)
    assert ids == tiny.encode("Hello there") and tiny.convert_ids_to_tokens(ids) == tokens
    assert tiny.convert_tokens_to_ids('no such token here') == tiny.unk_token_id == 0
    assert tiny.convert_ids_to_tokens(0) == EOT
    assert tiny.convert_ids_to_tokens([0] + ids, skip_special_tokens=True) == tokens
    with pytest.raises(ValueError, match=r'token id 512 is out of range \[0, 512\)'):
        tiny.decode([5, 512])
    with pytest.raises(ValueError, match='use batch_decode'):
        tiny.decode([[1, 2], [3, 4]])
    with pytest.raises(TypeError, match=r'text\[1\] must be a string'):
        tiny(["ok", 3])
    with pytest.raises(AttributeError, match=r"no 'labels' \(keys: input_ids, token_type_ids, attention_mask\)"):
        tiny("x").labels
    extra = GPT2Tokenizer(TINY_VOCAB, TINY_MERGES, pad_token='<pad>', **HF_LIKE)
    assert extra.pad_token_id == 512 and len(extra) == 513 and extra.vocab_size == 512
    assert extra(["a b c", "a"], padding=True)['input_ids'][1][-1] == 512
    assert extra.encode("x<pad>y")[1] == 512


def test_train_tokenizer_cli_is_deterministic_and_reproduces_bundled_assets(tmp_path):
    runs = []
    for name in ('run1', 'run2'):
        assert train_tokenizer.main(['--input', CORPUS, '--vocab_size', '512', '--output_dir',
                                     str(tmp_path / name)]) == 0
        runs.append({f: (tmp_path / name / f).read_bytes() for f in ('vocab.json', 'merges.txt')})
    assert runs[0] == runs[1]
    bundled = {f: open(resolve_path(f'assets/gpt2_tiny/{f}'), 'rb').read() for f in ('vocab.json', 'merges.txt')}
    assert runs[0] == bundled, "the bundled assets/gpt2_tiny files are not what the CLI produces from the corpus"
    merges = runs[0]['merges.txt'].decode('utf-8').splitlines()
    assert merges[0] == '#version: 0.2' and len(merges) - 1 == 512 - 1 - 256
    assert train_tokenizer.main(['--input', str(tmp_path / 'absent.txt'), '--vocab_size', '300',
                                 '--output_dir', str(tmp_path / 'x')]) == 2
    assert train_tokenizer.main(['--input', CORPUS, '--vocab_size', '100', '--output_dir', str(tmp_path / 'x')]) == 2


def test_train_tokenizer_runs_as_module(tmp_path):
    sample = tmp_path / 'sample.txt'
    with open(CORPUS, encoding='utf-8') as f:
        sample.write_text(f.read()[:20000], encoding='utf-8')
    root = os.path.dirname(os.path.dirname(os.path.abspath(mindformers.__file__)))
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get('PYTHONPATH', ''))
    cmd = [sys.executable, '-m', 'mindformers.tools.train_tokenizer', '--input', str(sample), '--vocab_size', '320',
           '--output_dir', str(tmp_path / 'out')]
    done = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    tok = GPT2Tokenizer(str(tmp_path / 'out' / 'vocab.json'), str(tmp_path / 'out' / 'merges.txt'), **HF_LIKE)
    assert len(tok) == 320 and tok.decode(tok.encode(MIXED[3])) == MIXED[3]


@pytest.fixture(scope='module')
def gpt2_ids_dir(tmp_path_factory):
    """vocab.json + merges.txt with GPT-2's ids for the tokens of "hello!" ('!' 0, 'hello' 31373,
    '<|endoftext|>' 50256), padded to GPT-2's 50257 entries."""
    directory = tmp_path_factory.mktemp('gpt2_ids')
    vocab = {'!': 0, 'e': 68, 'h': 71, 'l': 75, 'o': 78, 'he': 258, 'll': 297, 'hell': 12758, 'hello': 31373,
             EOT: 50256}
    used = set(vocab.values())
    vocab.update({f'<unused{i}>': i for i in range(50257) if i not in used})
    (directory / 'vocab.json').write_text(json.dumps(vocab), encoding='utf-8')
    (directory / 'merges.txt').write_text('#version: 0.2\nh e\nl l\nhe ll\nhell o\n', encoding='utf-8')
    return directory


def test_mindformers_defaults_bos_eos_and_token_type_ids(gpt2_ids_dir):
    import mindspore as ms
    from mindformers import AutoTokenizer, GPT2Processor
    documented = {'input_ids': [50256, 31373, 0, 50256], 'token_type_ids': [0, 0, 0, 0],
                  'attention_mask': [1, 1, 1, 1]}
    tok = GPT2Tokenizer.from_pretrained(gpt2_ids_dir)
    assert tok("hello!") == documented and list(tok("hello!")) == list(documented)
    auto = AutoTokenizer.from_pretrained(gpt2_ids_dir)  # only vocab.json + merges.txt there
    assert type(auto) is GPT2Tokenizer and auto("hello!") == documented
    batch = tok(["hello!", "hello"], padding=True, return_tensors='np')
    assert batch['input_ids'].tolist() == [[50256, 31373, 0, 50256], [50256, 31373, 50256, 50256]]
    assert batch['token_type_ids'].tolist() == [[0] * 4] * 2 and batch['attention_mask'].tolist()[1] == [1, 1, 1, 0]
    text = GPT2Processor(tok)("hello!")['text']
    assert isinstance(text, ms.Tensor) and text.shape == (1, 128)
    assert text.asnumpy()[0].tolist() == [50256, 31373, 0, 50256] + [50256] * 124
    # HF's ids one flag away; prompts for generation keep the BOS but never get the EOS
    hf = transformers.GPT2TokenizerFast(str(gpt2_ids_dir / 'vocab.json'), str(gpt2_ids_dir / 'merges.txt'))
    plain = GPT2Tokenizer.from_pretrained(gpt2_ids_dir, **HF_LIKE)
    assert plain("hello!")['input_ids'] == hf("hello!")['input_ids'] == [31373, 0]
    assert tok.encode_prompt("hello!") == [50256, 31373, 0] and plain.encode_prompt("hello!") == [31373, 0]
    assert tok.encode("hello!", add_special_tokens=False) == [31373, 0]


def test_huggingface_tokenizer_config_keeps_hf_ids(gpt2_ids_dir, tmp_path):
    from mindformers import AutoTokenizer
    hf = transformers.GPT2TokenizerFast(str(gpt2_ids_dir / 'vocab.json'), str(gpt2_ids_dir / 'merges.txt'))
    hf.save_pretrained(tmp_path)  # transformers' tokenizer_config.json sets neither add_bos_token nor add_eos_token
    for loaded in (GPT2Tokenizer.from_pretrained(tmp_path), AutoTokenizer.from_pretrained(tmp_path)):
        assert loaded("hello!")['input_ids'] == hf("hello!")['input_ids'] == [31373, 0]
    GPT2Tokenizer.from_pretrained(gpt2_ids_dir).save_pretrained(tmp_path / 'ours')  # ours records both flags
    assert AutoTokenizer.from_pretrained(tmp_path / 'ours')("hello!")['input_ids'] == [50256, 31373, 0, 50256]


def test_lone_surrogates_are_refused_by_name(tiny):
    for call in (tiny, tiny.encode, tiny.tokenize, tiny.encode_prompt):
        with pytest.raises(ValueError, match=r"GPT2Tokenizer: text 'ab\\udcff' is not valid text: character 2 is "
                                             r"the lone surrogate '\\udcff'"):
            call('ab\udcff')
    with pytest.raises(ValueError, match=r"text\[1\] '\\ud800' is not valid text"):
        tiny(['fine', '\ud800'])
