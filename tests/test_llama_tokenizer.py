"""LlamaTokenizer: ids and decoding identical to transformers' LlamaTokenizer on a SentencePiece model trained here,
padding / truncation / tensors, save/load, errors, LLaMA-2 chat encoding, the legacy (SentencePiece) mode, and the
deterministic SentencePiece training tool that produced the bundled tiny model."""
import json
import os
import random

import numpy as np
import pytest
import sentencepiece as spm
import transformers

from mindformers.models.base_tokenizer import BaseTokenizer
from mindformers.models.llama.llama_processor import LlamaProcessor
from mindformers.models.llama.llama_tokenizer import LlamaTokenizer, LlamaTokenizerFast
from mindformers.tools import train_sentencepiece
from mindformers.tools.register import MindFormerRegister, MindFormerModuleType
from mindformers.tools.utils import resolve_path

CORPUS = [resolve_path('assets/corpus/tiny_shakespeare.txt'), resolve_path('assets/corpus/tiny_chinese.txt')]
BUNDLED = resolve_path('assets/llama_tiny/tokenizer.model')

MIXED = [
    "First Citizen:\nBefore we proceed any further, hear me speak.",
    "Hello, world! It's 2024 -- isn't it? we'll see; they've gone.",
    "你好，世界。今天的天气很好，我们一起去河边散步吧。",
    "mixed 中文 and English 混合文本 in one line",
    " leading space",
    "   three leading spaces",
    "spaces:   three,     five, and trailing   ",
    "newlines\n\n\nand\r\nwindows\n",
    "\ttabs\t\tand\tmixed \t whitespace",
    "digits 0123456789 and 3.14159 and 2,048",
    "byte fallback: 鑫龘 emoji 😀👍🏽 accents café naïve Ünïcödé",
    "special<s>tokens</s>stay <unk> whole",
    "<s>starts with a special token",
    "a literal \u2581 underline",
    "[INST] hi [/INST]",
    "",
    " ",
    "   ",
    "\n",
]


@pytest.fixture(scope='module')
def model_dir(tmp_path_factory):
    """A 512-piece model trained here with the settings of the bundled one."""
    directory = tmp_path_factory.mktemp('llama_sp')
    model = train_sentencepiece.train_sentencepiece(CORPUS, 512, character_coverage=0.998)
    train_sentencepiece.save_model(model, str(directory))
    return str(directory)


@pytest.fixture(scope='module')
def tok(model_dir):
    return LlamaTokenizer(os.path.join(model_dir, 'tokenizer.model'))


@pytest.fixture(scope='module')
def hf(model_dir):
    # transformers 5.x: LlamaTokenizer(vocab_file=...) ignores the file, and from_pretrained adds no BOS unless
    # told (the hub's tokenizer_config.json says add_bos_token=true); it has no pad token
    tokenizer = transformers.LlamaTokenizer.from_pretrained(model_dir, add_bos_token=True)
    tokenizer.pad_token = tokenizer.unk_token
    return tokenizer


def test_trained_model_is_the_bundled_one(model_dir):
    with open(os.path.join(model_dir, 'tokenizer.model'), 'rb') as trained, open(BUNDLED, 'rb') as bundled:
        assert trained.read() == bundled.read()
    sp = spm.SentencePieceProcessor(model_file=BUNDLED)
    assert sp.get_piece_size() == 512
    assert [sp.id_to_piece(i) for i in range(4)] == ['<unk>', '<s>', '</s>', '<0x00>']
    assert (sp.unk_id(), sp.bos_id(), sp.eos_id(), sp.pad_id()) == (0, 1, 2, -1)
    assert sp.piece_to_id('的') != sp.unk_id()  # common Chinese characters have pieces


def test_ids_and_decoding_match_transformers(tok, hf):
    assert len(tok) == tok.vocab_size == len(hf) == 512
    assert (tok.unk_token_id, tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (0, 1, 2, 0)
    for text in MIXED:
        ids = tok.encode(text)
        assert ids == hf.encode(text), text
        assert tok.encode(text, add_special_tokens=False) == hf.encode(text, add_special_tokens=False), text
        assert tok.tokenize(text) == hf.tokenize(text), text
        assert tok.decode(ids) == hf.decode(ids), text
        assert tok.decode(ids, skip_special_tokens=True) == hf.decode(ids, skip_special_tokens=True), text
    # the text needs byte fallback and has a character with a piece of its own
    ids = tok.encode("鑫的", add_special_tokens=False)
    assert tok.convert_ids_to_tokens(ids) == ['\u2581', '<0xE9>', '<0x91>', '<0xAB>', '的']


def test_random_text_and_ids_match_transformers(tok, hf):
    rng = random.Random(0)
    alphabet = list("abcdeHI  \n\t你好的天😀é09<>s/\u2581") + ['<s>', '</s>', '<unk>']
    texts = [''.join(rng.choice(alphabet) for _ in range(rng.randint(0, 16))) for _ in range(400)]
    assert tok(texts)['input_ids'] == hf(texts)['input_ids']
    for _ in range(300):  # any ids, invalid UTF-8 byte runs included
        ids = [rng.randrange(len(tok)) for _ in range(rng.randint(0, 8))]
        assert tok.decode(ids) == hf.decode(ids), ids
        assert tok.decode(ids, skip_special_tokens=True) == hf.decode(ids, skip_special_tokens=True), ids


def test_decode_round_trip(tok, hf):
    for text in MIXED:
        plain = text.replace('<s>', '').replace('</s>', '').replace('<unk>', '').replace('\u2581', ' ')
        decoded = tok.decode(tok.encode(text), skip_special_tokens=True)
        assert decoded == hf.decode(hf.encode(text), skip_special_tokens=True), text
        # transformers 5.x loses one space at the start of the text ('▁' prefix not added, one space stripped)
        assert decoded == (plain[1:] if plain.startswith(' ') else plain), text
    assert tok.batch_decode(tok(MIXED[:4], padding=True, return_tensors='ms')['input_ids'],
                            skip_special_tokens=True) == MIXED[:4]


def test_batch_padding_truncation_tensors_match_transformers(tok, hf):
    texts = MIXED[:6]
    mine, theirs = tok(texts), hf(texts)
    assert mine['input_ids'] == theirs['input_ids'] and mine['attention_mask'] == theirs['attention_mask']
    assert tok.padding_side == hf.padding_side == 'left'
    mine, theirs = tok(texts, padding=True), hf(texts, padding=True)
    assert mine['input_ids'] == theirs['input_ids'] and mine['attention_mask'] == theirs['attention_mask']
    assert mine['input_ids'][4][0] == 0 and mine['attention_mask'][4][0] == 0  # left-padded with <unk> = 0
    mine = tok(texts, padding='max_length', truncation=True, max_length=9, return_tensors='np')
    theirs = hf(texts, padding='max_length', truncation=True, max_length=9, return_tensors='np')
    np.testing.assert_array_equal(mine['input_ids'], theirs['input_ids'])
    np.testing.assert_array_equal(mine['attention_mask'], theirs['attention_mask'])
    assert mine['input_ids'].shape == (6, 9) and mine['input_ids'].dtype == np.int32
    longest = max(len(ids) for ids in tok(texts)['input_ids'])
    tensors = tok(texts, padding=True, return_tensors='ms')
    assert tensors['input_ids'].shape == (6, longest) and str(tensors['input_ids'].dtype) == 'Int32'
    np.testing.assert_array_equal(tensors['input_ids'].asnumpy(), hf(texts, padding=True)['input_ids'])
    right = LlamaTokenizer(BUNDLED, padding_side='right', add_eos_token=True)
    hf_right = transformers.LlamaTokenizer.from_pretrained(os.path.dirname(BUNDLED), add_bos_token=True,
                                                           add_eos_token=True, padding_side='right')
    hf_right.pad_token = hf_right.unk_token
    assert right(texts, padding=True)['input_ids'] == hf_right(texts, padding=True)['input_ids']
    assert right.encode("Hello", truncation=True, max_length=3) == hf_right.encode("Hello", truncation=True,
                                                                                   max_length=3)


def test_save_and_load(tok, tmp_path):
    tok.padding_side = 'right'
    try:
        paths = tok.save_pretrained(str(tmp_path))
    finally:
        tok.padding_side = 'left'
    assert sorted(os.path.basename(p) for p in paths) == ['tokenizer.model', 'tokenizer_config.json']
    with open(tmp_path / 'tokenizer.model', 'rb') as copy, open(tok.vocab_file, 'rb') as original:
        assert copy.read() == original.read()
    config = json.loads((tmp_path / 'tokenizer_config.json').read_text())
    assert config['tokenizer_class'] == 'LlamaTokenizer' and config['add_bos_token'] is True
    assert 'vocab_file' not in config
    for loaded in (LlamaTokenizer.from_pretrained(str(tmp_path)), BaseTokenizer.from_pretrained(str(tmp_path))):
        assert type(loaded) is LlamaTokenizer and loaded.padding_side == 'right'
        assert [loaded.encode(t) for t in MIXED] == [tok.encode(t) for t in MIXED]
    # transformers reads the saved directory too (its tokenizer.model and our tokenizer_config.json)
    theirs = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    assert [theirs.encode(t) for t in MIXED] == [tok.encode(t) for t in MIXED]


def test_bad_vocab_file_errors(tmp_path):
    missing = str(tmp_path / 'nowhere' / 'tokenizer.model')
    with pytest.raises(FileNotFoundError, match='nowhere/tokenizer.model'):
        LlamaTokenizer(missing)
    garbage = tmp_path / 'garbage.model'
    garbage.write_bytes(b'not a sentencepiece model')
    with pytest.raises(ValueError, match='garbage.model.*not a SentencePiece model'):
        LlamaTokenizer(str(garbage))
    with pytest.raises(ValueError, match='needs vocab_file'):
        LlamaTokenizer()
    with pytest.raises(ValueError, match="pad_token '<pad>' is not a piece"):
        LlamaTokenizer(BUNDLED, pad_token='<pad>')
    with pytest.raises(ValueError, match="additional special token '<tool>' is not a piece"):
        LlamaTokenizer(BUNDLED, additional_special_tokens=['<tool>'])


def test_llama2_chat_encoding(tok, hf):
    history = [("Who are you?", "A small model. "), ("写一句诗", "春风又绿江南岸")]
    ids = tok.encode_chat("And now?", history, system="Answer briefly.")
    # Meta's chat_completion: every turn tokenized alone with BOS; past turns end with their answer and EOS
    turns = ["[INST] <<SYS>>\nAnswer briefly.\n<</SYS>>\n\nWho are you? [/INST] A small model. ",
             "[INST] 写一句诗 [/INST] 春风又绿江南岸 ", "[INST] And now? [/INST]"]
    expected = []
    for i, turn in enumerate(turns):
        expected += [1] + hf.encode(turn, add_special_tokens=False) + ([2] if i < len(history) else [])
    assert ids == expected
    assert ids.count(tok.bos_token_id) == 3 and ids.count(tok.eos_token_id) == 2
    assert ids[0] == 1 and ids[-1] != 2
    inst = tok.encode("[INST]", add_special_tokens=False)
    assert ids[1:1 + len(inst)] == inst
    text = tok.decode(ids)
    assert text.count('[INST]') == 3 and text.count('[/INST]') == 3 and text.endswith('And now? [/INST]')
    assert tok.encode_chat("hi") == [1] + tok.encode("[INST] hi [/INST]", add_special_tokens=False)
    with pytest.raises(TypeError, match=r'history\[0\]'):
        tok.encode_chat("hi", ["not a pair"])


def test_legacy_mode_is_sentencepiece(tok):
    legacy = LlamaTokenizer(tok.vocab_file, legacy=True)
    sp = spm.SentencePieceProcessor(model_file=tok.vocab_file)
    for text in MIXED:
        if '<' not in text:
            assert legacy.encode(text) == [1] + sp.encode(text), text
            assert legacy.decode(legacy.encode(text), skip_special_tokens=True) == text.replace('\u2581', ' ')
    # the two modes differ exactly where transformers 5.x differs from SentencePiece
    assert legacy.tokenize(" Hi") == ['\u2581', '\u2581H', 'i'] and tok.tokenize(" Hi") == ['\u2581H', 'i']
    assert legacy.tokenize("<s>Hi") == ['<s>', '\u2581H', 'i'] and tok.tokenize("<s>Hi") == ['<s>', 'H', 'i']
    assert legacy.encode("plain text here") == tok.encode("plain text here")


def test_registry_and_processor(tok):
    assert MindFormerRegister.get_cls(MindFormerModuleType.TOKENIZER, 'LlamaTokenizer') is LlamaTokenizer
    assert MindFormerRegister.get_cls(MindFormerModuleType.TOKENIZER, 'LlamaTokenizerFast') is LlamaTokenizerFast
    assert MindFormerRegister.get_cls(MindFormerModuleType.PROCESSOR, 'LlamaProcessor') is LlamaProcessor
    processor = LlamaProcessor(tokenizer={'type': 'LlamaTokenizer', 'vocab_file': 'assets/llama_tiny/tokenizer.model'},
                               max_length=16)
    out = processor(["Hello world", "你好"])['text']
    assert out.shape == (2, 16) and str(out.dtype) == 'Int32'
    ids = tok.encode("你好")
    np.testing.assert_array_equal(out.asnumpy()[1], [0] * (16 - len(ids)) + ids)


def test_train_sentencepiece_cli(tmp_path, capsys):
    assert train_sentencepiece.main(['--input', CORPUS[1], '--vocab_size', '700', '--output_dir', str(tmp_path),
                                     '--character_coverage', '0.98']) == 0
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / 'tokenizer.model'))
    assert sp.get_piece_size() == 700 and sp.id_to_piece(3) == '<0x00>'
    assert sp.encode('你好', out_type=str)[0].startswith('\u2581')
    assert train_sentencepiece.main(['--input', str(tmp_path / 'missing.txt'), '--vocab_size', '400',
                                     '--output_dir', str(tmp_path)]) == 2
    assert 'missing.txt' in capsys.readouterr().err
    assert train_sentencepiece.main(['--input', CORPUS[1], '--vocab_size', '300', '--output_dir', str(tmp_path)]) == 2
    assert 'character_coverage' in capsys.readouterr().err
    with pytest.raises(ValueError, match='vocab_size must be an int >= 260'):
        train_sentencepiece.train_sentencepiece(CORPUS, 100)
    with pytest.raises(ValueError, match='character_coverage must be in'):
        train_sentencepiece.train_sentencepiece(CORPUS, 512, character_coverage=0.5)
