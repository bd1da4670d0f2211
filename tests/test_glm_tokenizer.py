"""ChatGLMTokenizer on the bundled tiny ice_text.model: the file is reproducible, special ids come from the file,
ChatGLM-6B's whitespace pieces and `[gMASK] <sop>` suffix, round trips and their documented exceptions, left
padding, build_prompt, save/load (also of a HuggingFace chatglm-6b style directory) and errors."""
import json
import os

import numpy as np
import pytest
import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2

from mindformers import AutoTokenizer
from mindformers.models.base_tokenizer import BaseTokenizer
from mindformers.models.chat_templates import glm_chat_prompt
from mindformers.models.glm.chatglm_6b_tokenizer import (ChatGLMTokenizer, GLMProcessor, GLM_SPECIAL_TOKENS,
                                                         encode_whitespace)
from mindformers.tools import train_sentencepiece
from mindformers.tools.build import build_tokenizer
from mindformers.tools.utils import resolve_path
from helpers.tokenizer_checks import assert_left_padded

CORPUS = [resolve_path('assets/corpus/tiny_shakespeare.txt'), resolve_path('assets/corpus/tiny_chinese.txt')]
BUNDLED = resolve_path('assets/glm_tiny/ice_text.model')
MASK, GMASK, SMASK, UNUSED, SOP, EOP, ENC, DBLOCK = range(1000, 1008)
UNK, PAD, NEWLINE, TAB, BLANK2, BLANK80 = 0, 3, 4, 5, 6, 84

MIXED = [
    "你好",
    "晚上睡不着应该怎么办",
    "你好，世界。今天的天气很好，我们一起去河边散步吧。",
    "mixed 中文 and English 混合文本 in one line",
    "First Citizen:\nBefore we proceed any further, hear me speak.",
    " leading space, trailing space ",
    "  two leading spaces and three trailing   ",
    "newlines\n\n\nand\ttabs\t\t and\r\ncarriage returns",
    "code:\n    if x:\n\t\treturn  y  # two spaces",
    "a" + " " * 80 + "b" + " " * 81 + "c" + " " * 82 + "d" + " " * 160 + "e" + " " * 243 + "f",
    "digits 0123456789, byte fallback 鑫龘 😀 café",
    "special tokens in text: [gMASK] <sop> [MASK] <eop> stay whole",
    "\n\nstarts and ends with newlines\n",
    "\tstarts with a tab",
    "",
]


@pytest.fixture(scope='module')
def tok():
    return ChatGLMTokenizer(BUNDLED)


@pytest.fixture(scope='module')
def sp():
    return spm.SentencePieceProcessor(model_file=BUNDLED)


def test_bundled_model_is_reproducible(tmp_path):
    """The command in assets/glm_tiny/README.md rebuilds the bundled file byte for byte."""
    code = train_sentencepiece.main(['--layout', 'chatglm', '--vocab_size', '1000', '--character_coverage', '0.9995',
                                     '--input', *CORPUS, '--output_dir', str(tmp_path)])
    assert code == 0
    assert (tmp_path / 'ice_text.model').read_bytes() == open(BUNDLED, 'rb').read()


def test_special_token_ids(tok, sp):
    assert tok.vocab_size == len(tok) == sp.get_piece_size() == 1008
    assert tok.convert_tokens_to_ids(list(GLM_SPECIAL_TOKENS)) == [MASK, GMASK, SMASK, UNUSED, SOP, EOP, ENC, DBLOCK]
    assert tok.convert_ids_to_tokens(list(range(1000, 1008))) == list(GLM_SPECIAL_TOKENS)
    assert (tok.mask_token_id, tok.gmask_token_id, tok.bos_token_id, tok.eos_token_id) == (MASK, GMASK, SOP, EOP)
    assert (tok.pad_token_id, tok.unk_token_id) == (PAD, UNK)
    assert tok.convert_tokens_to_ids(['<n>', '<|tab|>', '<|blank_2|>', '<|blank_80|>']) == [NEWLINE, TAB, BLANK2,
                                                                                           BLANK80]
    assert set(tok.all_special_ids) == {UNK, PAD, *range(1000, 1008)}


def test_ids_are_read_from_the_model_file(tmp_path):
    """A file with the specials elsewhere (here at 500..507, the whitespace pieces after them, as in the released
    ice_text.model where they are 130000.. and 130008..) works unchanged."""
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(open(BUNDLED, 'rb').read())
    pieces = list(proto.pieces)
    specials, whitespace = pieces[1000:], pieces[NEWLINE + 1:BLANK80 + 1]  # keep <n> at 4, as ice_text.model does
    rest = pieces[:NEWLINE + 1] + pieces[BLANK80 + 1:1000]
    del proto.pieces[:]
    proto.pieces.extend(rest[:500] + specials + whitespace + rest[500:])
    path = tmp_path / 'ice_text.model'
    path.write_bytes(proto.SerializeToString())
    other = ChatGLMTokenizer(str(path))
    assert (other.gmask_token_id, other.bos_token_id, other.eos_token_id, other.mask_token_id) == (501, 504, 505, 500)
    assert other.convert_tokens_to_ids('<|tab|>') == 508 and other.pad_token_id == PAD
    ids = other.encode("hello\t  world")
    assert ids[-2:] == [501, 504] and 508 in ids and other.convert_tokens_to_ids('<|blank_2|>') in ids
    assert other.decode(ids, skip_special_tokens=True) == "hello\t  world"


def test_encode_rewrites_whitespace_then_runs_sentencepiece(tok, sp):
    for text in MIXED:
        plain = [] if not text else sp.encode(encode_whitespace(text))
        if '[' not in text and '<' not in text:  # texts without special tokens are one SentencePiece call
            assert tok.encode(text, add_special_tokens=False) == plain, text
        assert tok.encode(text) == tok.encode(text, add_special_tokens=False) + [GMASK, SOP], text
    # the conventions piece by piece (ChatGLM-6B's file gives [5, 130008, 130010, 130008, 130012, 4, 5, 4] here)
    assert tok.tokenize("\t   \t     \n \n") == ['▁', '<|tab|>', '<|blank_3|>', '<|tab|>', '<|blank_5|>', '<n>', '▁',
                                                 '<n>']
    blanks = lambda n: [p for p in tok.tokenize('x' + ' ' * n + 'y') if 'blank' in p]  # noqa: E731
    assert blanks(2) == ['<|blank_2|>'] and blanks(80) == ['<|blank_80|>'] and blanks(1) == []
    assert blanks(81) == ['<|blank_80|>'] and tok.tokenize('x' + ' ' * 81 + 'y')[-1].startswith('▁')
    assert blanks(82) == ['<|blank_80|>', '<|blank_2|>'] and blanks(243) == ['<|blank_80|>'] * 3 + ['<|blank_3|>']
    # '你好' is '▁' (the dummy prefix on its own), then the text, like [5, 74874, 130001, 130004] in ChatGLM-6B
    assert tok.convert_ids_to_tokens(tok.encode("你好")) == ['▁', '你', '好', '[gMASK]', '<sop>']
    assert tok.encode("问[gMASK]答", add_special_tokens=False) == sp.encode('问') + [GMASK] + sp.encode('答')


def test_round_trips(tok):
    for text in MIXED:
        ids = tok.encode(text)
        assert tok.decode(ids, skip_special_tokens=True) == text.replace('[gMASK]', '').replace('<sop>', '') \
            .replace('[MASK]', '').replace('<eop>', ''), text
        assert tok.decode(ids) == text + '[gMASK]<sop>', text
        assert tok.decode(tok.encode(text, add_special_tokens=False)) == text, text
    assert tok.batch_decode(tok(MIXED[:4], padding=True, return_tensors='np')['input_ids'],
                            skip_special_tokens=True) == MIXED[:4]


def test_documented_exceptions(tok):
    # whitespace piece strings in the input are those pieces: they come back as whitespace
    ids = tok.encode("a<n>b<|tab|>c<|blank_3|>d", add_special_tokens=False)
    assert [NEWLINE, TAB, 7] == [i for i in ids if NEWLINE <= i <= BLANK80]
    assert tok.decode(ids) == "a\nb\tc   d"
    # ... but only those that exist: <|blank_81|> and <|blank_1|> are plain text
    assert tok.decode(tok.encode("<|blank_81|><|blank_1|>", add_special_tokens=False)) == "<|blank_81|><|blank_1|>"
    # <pad> is dropped when decoding, also without skip_special_tokens
    assert tok.decode([PAD, PAD] + tok.encode("hi") + [PAD]) == 'hi[gMASK]<sop>'
    assert tok.decode([PAD]) == '' and tok.decode([]) == ''


def test_left_padding_and_truncation(tok):
    assert tok.padding_side == 'left'
    texts = ["a", "你好，世界", "mixed 中文\n"]
    assert_left_padded(tok, texts, PAD)
    out = tok(texts, padding='max_length', truncation=True, max_length=5, return_tensors='np')['input_ids']
    assert out.shape == (3, 5)
    assert out[0].tolist() == [PAD] * (5 - len(tok.encode("a"))) + tok.encode("a")
    assert out[1].tolist() == tok.encode("你好，世界", add_special_tokens=False)[:3] + [GMASK, SOP]


def test_build_prompt(tok):
    assert tok.build_prompt("你好") == "你好" and tok.build_prompt("你好", []) == "你好"
    history = [("你好", "你好👋!我是人工智能助手 ChatGLM-6B"), ("晚上睡不着应该怎么办", "试试早点起床。")]
    prompt = tok.build_prompt("谢谢", history)
    assert prompt == ("[Round 0]\n问：你好\n答：你好👋!我是人工智能助手 ChatGLM-6B\n"
                      "[Round 1]\n问：晚上睡不着应该怎么办\n答：试试早点起床。\n"
                      "[Round 2]\n问：谢谢\n答：")
    assert prompt == glm_chat_prompt("谢谢", history)
    ids = tok.encode(prompt)
    assert ids[-2:] == [GMASK, SOP] and ids.count(NEWLINE) == prompt.count("\n") == 8
    assert tok.decode(ids, skip_special_tokens=True) == prompt


def test_options_and_errors(tmp_path):
    lower = ChatGLMTokenizer(BUNDLED, do_lower_case=True, remove_space=True)
    assert lower.decode(lower.encode("  Hello\n  WORLD  "), skip_special_tokens=True) == "hello world"
    with pytest.raises(ValueError, match='num_image_tokens=20000 is not supported'):
        ChatGLMTokenizer(BUNDLED, num_image_tokens=20000)
    with pytest.raises(ValueError, match='add_bos_token must be False'):
        ChatGLMTokenizer(BUNDLED, add_bos_token=True)
    with pytest.raises(ValueError, match='additional_special_tokens are always'):
        ChatGLMTokenizer(BUNDLED, additional_special_tokens=['[gMASK]'])
    with pytest.raises(ValueError, match=r"bos_token '<sop>' is not a piece of .*glm2_tiny/tokenizer.model"):
        ChatGLMTokenizer(resolve_path('assets/glm2_tiny/tokenizer.model'))
    with pytest.raises(FileNotFoundError, match='absent/ice_text.model'):
        ChatGLMTokenizer(str(tmp_path / 'absent' / 'ice_text.model'))


def test_save_load_and_huggingface_directory(tok, tmp_path):
    paths = tok.save_pretrained(str(tmp_path / 'ours'))
    assert sorted(os.path.basename(p) for p in paths) == ['ice_text.model', 'tokenizer_config.json']
    for loaded in (BaseTokenizer.from_pretrained(str(tmp_path / 'ours')),
                   AutoTokenizer.from_pretrained(str(tmp_path / 'ours'))):
        assert type(loaded) is ChatGLMTokenizer and loaded.padding_side == 'left'
        assert [loaded.encode(t) for t in MIXED] == [tok.encode(t) for t in MIXED]
    # a chatglm-6b HuggingFace directory: its tokenizer_config.json keys, ice_text.model beside it
    hf_dir = tmp_path / 'hf'
    hf_dir.mkdir()
    (hf_dir / 'ice_text.model').write_bytes(open(BUNDLED, 'rb').read())
    (hf_dir / 'tokenizer_config.json').write_text(json.dumps({
        'name_or_path': 'THUDM/chatglm-6b', 'bos_token': '<sop>', 'eos_token': '<eop>', 'end_token': '</s>',
        'gmask_token': '[gMASK]', 'mask_token': '[MASK]', 'pad_token': '<pad>', 'unk_token': '<unk>',
        'remove_space': False, 'do_lower_case': False, 'num_image_tokens': 0, 'max_length': 2048,
        'padding_side': 'left', 'tokenizer_class': 'ChatGLMTokenizer',
        'auto_map': {'AutoTokenizer': ['tokenization_chatglm.ChatGLMTokenizer', None]}}))
    hf = AutoTokenizer.from_pretrained(str(hf_dir))
    assert type(hf) is ChatGLMTokenizer and hf.encode(MIXED[3]) == tok.encode(MIXED[3])


def test_registry_yaml_and_processor(tok):
    built = build_tokenizer({'type': 'ChatGLMTokenizer', 'vocab_file': 'assets/glm_tiny/ice_text.model'})
    assert type(built) is ChatGLMTokenizer and built.encode("你好") == tok.encode("你好")
    named = AutoTokenizer.from_pretrained('glm_tiny')  # processor.tokenizer of configs/glm/run_glm_tiny.yaml
    assert type(named) is ChatGLMTokenizer and named.vocab_file == BUNDLED and named.encode(MIXED[2]) == tok.encode(
        MIXED[2])
    processor = GLMProcessor(tokenizer={'type': 'ChatGLMTokenizer', 'vocab_file': 'assets/glm_tiny/ice_text.model'},
                             max_length=10)
    out = processor(["你好", "hello world"])['text'].asnumpy()
    ids = tok.encode("你好")
    assert out.shape == (2, 10)
    np.testing.assert_array_equal(out[0], [PAD] * (10 - len(ids)) + ids)


def test_the_tiny_config_decodes_the_embedding_padding_rows_to_nothing(tok):
    """The tiny model has 1024 embedding rows for 1008 ids: a (barely trained) model may emit 1008..1023."""
    named = AutoTokenizer.from_pretrained('glm_tiny')
    ids = tok.encode("你好", add_special_tokens=False)
    assert named.padded_vocab_size == 1024
    assert named.decode(ids + [1008, 1023]) == named.decode(ids) == tok.decode(ids)
    with pytest.raises(ValueError):
        tok.decode(ids + [1020])  # without padded_vocab_size an id past the file is an error
    with pytest.raises(ValueError, match='padded_vocab_size'):
        ChatGLMTokenizer(vocab_file=BUNDLED, padded_vocab_size=1000)
