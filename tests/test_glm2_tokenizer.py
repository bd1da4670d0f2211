"""ChatGLM2Tokenizer: SentencePiece ids as ChatGLM2's own tokenizer (sp.encode) gives them, the five special tokens
after the SentencePiece vocabulary, the `[gMASK] sop` prefix, specials kept whole in text, left padding,
decoding, save/load, errors and build_prompt, on a model trained here (the same as the bundled tiny one)."""
import json
import os

import numpy as np
import pytest
import sentencepiece as spm
import transformers

from mindformers.models.base_tokenizer import BaseTokenizer
from mindformers.models.chat_templates import glm2_chat_prompt
from mindformers.models.glm2.glm2_tokenizer import ChatGLM2Processor, ChatGLM2Tokenizer
from mindformers.tools import train_sentencepiece
from mindformers.tools.register import MindFormerRegister, MindFormerModuleType
from mindformers.tools.utils import resolve_path
from helpers.tokenizer_checks import assert_left_padded

CORPUS = [resolve_path('assets/corpus/tiny_shakespeare.txt'), resolve_path('assets/corpus/tiny_chinese.txt')]
BUNDLED = resolve_path('assets/glm2_tiny/tokenizer.model')
SP_SIZE = 507
MASK, GMASK, SMASK, SOP, EOP = range(SP_SIZE, SP_SIZE + 5)

MIXED = [
    "你好",
    "晚上睡不着应该怎么办",
    "你好，世界。今天的天气很好，我们一起去河边散步吧。",
    "mixed 中文 and English 混合文本 in one line",
    "First Citizen:\nBefore we proceed any further, hear me speak.",
    " leading space and trailing   ",
    "newlines\n\n\nand\ttabs",
    "digits 0123456789, byte fallback 鑫龘 😀 café",
    "people and philosophers sop eop",
    "",
]


@pytest.fixture(scope='module')
def model_file(tmp_path_factory):
    directory = tmp_path_factory.mktemp('glm2_sp')
    model = train_sentencepiece.train_sentencepiece(CORPUS, SP_SIZE, character_coverage=0.998)
    return train_sentencepiece.save_model(model, str(directory))


@pytest.fixture(scope='module')
def tok(model_file):
    return ChatGLM2Tokenizer(model_file)


@pytest.fixture(scope='module')
def sp(model_file):
    return spm.SentencePieceProcessor(model_file=model_file)


def test_trained_model_is_the_bundled_one(model_file):
    with open(model_file, 'rb') as trained, open(BUNDLED, 'rb') as bundled:
        assert trained.read() == bundled.read()


def test_special_token_ids(tok):
    assert tok.vocab_size == len(tok) == 512  # 507 SentencePiece pieces + 5 specials
    assert tok.convert_tokens_to_ids(['[MASK]', '[gMASK]', '[sMASK]', 'sop', 'eop']) == [MASK, GMASK, SMASK, SOP, EOP]
    assert tok.convert_ids_to_tokens([MASK, GMASK, SMASK, SOP, EOP]) == ['[MASK]', '[gMASK]', '[sMASK]', 'sop', 'eop']
    assert (tok.unk_token_id, tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (0, 1, 2, 0)
    assert tok.get_command('[gMASK]') == GMASK and tok.get_command('</s>') == 2
    assert tok.get_prefix_tokens() == [GMASK, SOP]
    assert tok.get_vocab()['eop'] == EOP and tok.convert_tokens_to_ids('no-such-piece') == 0
    with pytest.raises(ValueError, match="'<pad>' is not a special token"):
        tok.get_command('<pad>')


def test_ids_are_gmask_sop_then_sentencepiece(tok, sp):
    for text in MIXED:
        assert tok.encode(text) == [GMASK, SOP] + sp.encode(text), text
        assert tok.encode(text, add_special_tokens=False) == sp.encode(text), text
        assert tok.tokenize(text) == sp.encode(text, out_type=str), text
    # like ChatGLM2-6B's "你好" -> [64790, 64792, 36474 ('▁你'), 54591 ('好')]: dummy-prefix space, no BOS
    ids = tok("你好")['input_ids']
    assert ids[:2] == [GMASK, SOP] and tok.convert_ids_to_tokens(ids[2]).startswith('\u2581')
    assert tok(MIXED)['input_ids'] == [[GMASK, SOP] + sp.encode(t) for t in MIXED]
    assert ChatGLM2Tokenizer(BUNDLED, add_eos_token=True).encode("hi") == [GMASK, SOP] + sp.encode("hi") + [2]


def test_special_tokens_in_text_stay_whole(tok, sp):
    assert tok.encode("问[gMASK]答[MASK]x[sMASK]</s>", add_special_tokens=False) == (
        sp.encode("问") + [GMASK] + sp.encode("答") + [MASK] + sp.encode("x") + [SMASK, 2])
    # 'sop' / 'eop' are ordinary text inside words
    ids = tok.encode("people philosopher sop eop", add_special_tokens=False)
    assert SOP not in ids and EOP not in ids


def test_decode(tok):
    for text in MIXED:
        ids = tok.encode(text)
        assert tok.decode(ids, skip_special_tokens=True) == text, text
        assert tok.decode(ids) == '[gMASK]sop' + text, text
    ids = tok.encode("前[gMASK]后")
    assert tok.decode(ids) == "[gMASK]sop前[gMASK]后" and tok.decode(ids, skip_special_tokens=True) == "前后"
    assert tok.batch_decode(tok(MIXED[:3], padding=True, return_tensors='np')['input_ids'],
                            skip_special_tokens=True) == MIXED[:3]


def test_left_padding_truncation_tensors(tok):
    assert tok.padding_side == 'left'
    texts = ["a", "你好，世界", "mixed 中文"]
    assert_left_padded(tok, texts, 0)
    out = tok(texts, padding='max_length', truncation=True, max_length=6, return_tensors='ms')
    assert out['input_ids'].shape == (3, 6) and str(out['input_ids'].dtype) == 'Int32'
    ids = out['input_ids'].asnumpy()
    for row, text in zip(ids, texts):
        real = tok.encode(text)[:6]  # truncation keeps the [gMASK] sop prefix
        np.testing.assert_array_equal(row, [0] * (6 - len(real)) + real)
        assert list(row[6 - len(real):6 - len(real) + 2]) == [GMASK, SOP]
    with pytest.raises(ValueError, match='max_length=1 leaves no room for the 2 special tokens'):
        tok("hello", truncation=True, max_length=1)


def test_build_prompt(tok):
    history = [("你好", "你好！有什么可以帮你？"), ("今天天气怎么样", "很好。")]
    prompt = tok.build_prompt("谢谢", history)
    assert prompt == ("[Round 1]\n\n问：你好\n\n答：你好！有什么可以帮你？\n\n"
                      "[Round 2]\n\n问：今天天气怎么样\n\n答：很好。\n\n"
                      "[Round 3]\n\n问：谢谢\n\n答：")
    assert prompt == glm2_chat_prompt("谢谢", history)
    assert tok.build_prompt("hi") == "[Round 1]\n\n问：hi\n\n答："
    ids = tok.encode(prompt)
    assert ids[:2] == [GMASK, SOP] and tok.decode(ids, skip_special_tokens=True) == prompt


def test_save_and_load(tok, tmp_path):
    paths = tok.save_pretrained(str(tmp_path))
    assert sorted(os.path.basename(p) for p in paths) == ['tokenizer.model', 'tokenizer_config.json']
    config = json.loads((tmp_path / 'tokenizer_config.json').read_text())
    assert config['tokenizer_class'] == 'ChatGLM2Tokenizer' and config['padding_side'] == 'left'
    for loaded in (ChatGLM2Tokenizer.from_pretrained(str(tmp_path)), BaseTokenizer.from_pretrained(str(tmp_path))):
        assert type(loaded) is ChatGLM2Tokenizer
        assert [loaded.encode(t) for t in MIXED] == [tok.encode(t) for t in MIXED]
        assert loaded.all_special_tokens == tok.all_special_tokens


def test_bad_vocab_file_errors(tmp_path):
    missing = str(tmp_path / 'absent' / 'tokenizer.model')
    with pytest.raises(FileNotFoundError, match='absent/tokenizer.model'):
        ChatGLM2Tokenizer(missing)
    garbage = tmp_path / 'tokenizer.model'
    garbage.write_text('hello')
    with pytest.raises(ValueError, match=f"{garbage}.*not a SentencePiece model"):
        ChatGLM2Tokenizer(str(garbage))
    with pytest.raises(ValueError, match='add_bos_token must be False'):
        ChatGLM2Tokenizer(BUNDLED, add_bos_token=True)
    with pytest.raises(ValueError, match='additional_special_tokens are always'):
        ChatGLM2Tokenizer(BUNDLED, additional_special_tokens=['[MASK]'])


def test_registry_and_processor(tok):
    assert MindFormerRegister.get_cls(MindFormerModuleType.TOKENIZER, 'ChatGLM2Tokenizer') is ChatGLM2Tokenizer
    assert MindFormerRegister.get_cls(MindFormerModuleType.PROCESSOR, 'ChatGLM2Processor') is ChatGLM2Processor
    processor = ChatGLM2Processor(tokenizer={'type': 'ChatGLM2Tokenizer',
                                             'vocab_file': 'assets/glm2_tiny/tokenizer.model'}, max_length=12)
    out = processor(["你好", "hello"])['text'].asnumpy()
    assert out.shape == (2, 12)
    ids = tok.encode("你好")
    np.testing.assert_array_equal(out[0], [0] * (12 - len(ids)) + ids)


def test_same_pieces_as_transformers_llama_reader(model_file):
    """The model file is a standard SentencePiece model: transformers reads the same pieces from it."""
    directory = os.path.dirname(model_file)
    theirs = transformers.LlamaTokenizer.from_pretrained(directory)
    assert len(theirs) == SP_SIZE
    sp = spm.SentencePieceProcessor(model_file=model_file)
    assert theirs.convert_ids_to_tokens(list(range(SP_SIZE))) == [sp.id_to_piece(i) for i in range(SP_SIZE)]
