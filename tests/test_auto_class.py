"""AutoClass round trips (save_pretrained -> from_pretrained gives identical logits and ids) and HuggingFace
directories loaded with conversion on the fly."""
import json

import numpy as np
import pytest
import mindspore as ms
import torch
from transformers import AutoTokenizer as HFAutoTokenizer, GPT2Config as HFConfig, GPT2LMHeadModel as HFModel
from transformers import GPT2TokenizerFast as HFTokenizer

from mindformers import (AutoConfig, AutoModel, AutoProcessor, AutoTokenizer, BaseProcessor, GPT2Config,
                         GPT2LMHeadModel, GPT2Processor, GPT2Tokenizer)
from mindformers.tools.model_book import find_config
from mindformers.tools.utils import resolve_path

VOCAB = resolve_path('assets/gpt2_tiny/vocab.json')
MERGES = resolve_path('assets/gpt2_tiny/merges.txt')
IDS = np.array([[5, 17, 300, 2, 9, 44]], np.int32)


def logits(model):
    model.set_train(False)
    return model(ms.Tensor(IDS)).asnumpy()


@pytest.fixture(scope='module')
def small():
    return GPT2LMHeadModel(GPT2Config(vocab_size=512, hidden_size=32, num_layers=2, num_heads=2, seq_length=32,
                                      top_k=3))


def test_config_save_then_load(small, tmp_path):
    path = small.config.save_pretrained(tmp_path)
    assert json.loads(open(path).read())['type'] == 'GPT2Config'
    loaded = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(loaded, GPT2Config) and loaded.to_dict() == small.config.to_dict()
    assert GPT2Config.from_pretrained(tmp_path, num_layers=1).num_layers == 1
    assert isinstance(AutoModel.from_config(loaded), GPT2LMHeadModel)
    assert AutoConfig.from_pretrained('gpt2_tiny', seq_length=64).seq_length == 64
    assert AutoConfig.from_pretrained(find_config('gpt2_tiny')).to_dict() == \
        AutoConfig.from_pretrained('gpt2_tiny').to_dict()


@pytest.mark.parametrize('checkpoint_format', ['safetensors', 'ckpt'])
def test_model_save_then_load_gives_identical_logits(small, tmp_path, checkpoint_format):
    small.save_pretrained(tmp_path, checkpoint_format=checkpoint_format)
    assert (tmp_path / f'model.{checkpoint_format}').is_file()
    saved = json.loads((tmp_path / 'config.json').read_text())
    assert saved['type'] == 'GPT2Config' and saved['checkpoint_name_or_path'] == ''
    loaded = AutoModel.from_pretrained(tmp_path)
    assert isinstance(loaded, GPT2LMHeadModel) and loaded.config.top_k == 3
    np.testing.assert_array_equal(logits(loaded), logits(small))
    assert AutoConfig.from_pretrained(tmp_path, top_k=1).top_k == 1
    np.testing.assert_array_equal(logits(GPT2LMHeadModel.from_pretrained(tmp_path)), logits(small))


def test_registered_name_and_yaml_build_the_same_model():
    small = dict(hidden_size=32, num_layers=1, num_heads=2, seq_length=16)
    model = AutoModel.from_config('gpt2_tiny', **small)
    assert isinstance(model, GPT2LMHeadModel) and model.config.seq_length == 16
    assert AutoModel.from_config(find_config('gpt2_tiny'), **small).config.to_dict() == model.config.to_dict()
    with pytest.raises(ValueError, match='no weights to load.*from_config'):  # never random weights unasked
        GPT2LMHeadModel.from_pretrained(find_config('gpt2_tiny'), **small)


def test_save_refuses_a_directory_with_other_weights(small, tmp_path):
    (tmp_path / 'other.ckpt').write_bytes(b'x')
    with pytest.raises(ValueError, match='other.ckpt'):
        small.save_pretrained(tmp_path)


def test_tokenizer_and_processor_round_trip(tmp_path):
    tokenizer = AutoTokenizer.from_pretrained('gpt2_tiny')
    processor = GPT2Processor(tokenizer=tokenizer, max_length=16)
    processor.save_pretrained(tmp_path)
    loaded = AutoProcessor.from_pretrained(tmp_path)
    assert isinstance(loaded, GPT2Processor) and loaded.max_length == 16
    text = ['To be, or not to be', 'ROMEO:']
    np.testing.assert_array_equal(loaded(text)['text'].asnumpy(), processor(text)['text'].asnumpy())
    assert AutoTokenizer.from_pretrained(tmp_path).encode(text[0]) == tokenizer.encode(text[0])


def test_processor_from_a_registered_name():
    processor = AutoProcessor.from_pretrained('gpt2_tiny')
    assert isinstance(processor, BaseProcessor)
    assert processor('ROMEO:')['text'].shape[0] == 1


@pytest.fixture(scope='module')
def hf_dir(tmp_path_factory):
    """A HuggingFace GPT-2 directory as transformers writes it: config.json, model.safetensors, tokenizer files."""
    directory = tmp_path_factory.mktemp('hf_gpt2')
    torch.manual_seed(0)
    hf = HFModel(HFConfig(vocab_size=512, n_embd=32, n_layer=2, n_head=2, n_positions=32)).eval()
    hf.save_pretrained(directory)
    HFTokenizer(VOCAB, MERGES).save_pretrained(directory)  # (keyword file arguments are ignored by transformers 5)
    return directory, hf


def test_huggingface_directory_loads_with_conversion(hf_dir):
    directory, hf = hf_dir
    model = AutoModel.from_pretrained(directory)
    with torch.no_grad():
        expected = hf(torch.tensor(IDS, dtype=torch.long)).logits.numpy()
    np.testing.assert_allclose(logits(model), expected, atol=1e-4)
    tokenizer = AutoTokenizer.from_pretrained(directory)
    reference = HFAutoTokenizer.from_pretrained(directory)
    text = 'First Citizen: we are accounted poor citizens'
    assert len(tokenizer.encode(text)) > 5 and tokenizer.encode(text) == reference.encode(text)
    assert isinstance(AutoProcessor.from_pretrained(directory).tokenizer, GPT2Tokenizer)
    assert AutoConfig.from_pretrained(directory).seq_length == 32
    np.testing.assert_allclose(logits(GPT2LMHeadModel.from_pretrained(directory)), expected, atol=1e-4)


def test_tokenizer_from_tokenizer_json_saves_plain_files(hf_dir, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(hf_dir[0])  # transformers 5 writes tokenizer.json only
    tokenizer.save_pretrained(tmp_path)
    assert (tmp_path / 'vocab.json').is_file() and (tmp_path / 'merges.txt').is_file()
    text = 'Speak, speak. You are all resolved rather to die than to famish?'
    assert AutoTokenizer.from_pretrained(tmp_path).encode(text) == tokenizer.encode(text)
    # transformers' tokenizer_config.json sets no add_bos_token / add_eos_token: HF's ids, no special tokens added
    assert GPT2Tokenizer(vocab_file=VOCAB, merges_file=MERGES, add_bos_token=False,
                         add_eos_token=False).encode(text) == tokenizer.encode(text)


def test_directory_with_only_vocabulary_files(tmp_path):
    (tmp_path / 'gpt2').mkdir()
    for name, path in (('vocab.json', VOCAB), ('merges.txt', MERGES)):
        (tmp_path / 'gpt2' / name).write_bytes(open(path, 'rb').read())
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / 'gpt2')
    assert type(tokenizer) is GPT2Tokenizer
    assert tokenizer('ROMEO:') == GPT2Tokenizer(VOCAB, MERGES)('ROMEO:')
    # a bare SentencePiece tokenizer.model is LLaMA's, ChatGLM2's or PengCheng.Mind's: refused, naming them
    (tmp_path / 'sp').mkdir()
    (tmp_path / 'sp' / 'tokenizer.model').write_bytes(open(resolve_path('assets/llama_tiny/tokenizer.model'),
                                                           'rb').read())
    with pytest.raises(ValueError, match=r"there is no tokenizer_config.json.*; tokenizer.model fits "
                                         r"ChatGLM2Tokenizer, LlamaTokenizer, PengChengMindTokenizer: load it with "
                                         r"the right class"):
        AutoTokenizer.from_pretrained(tmp_path / 'sp')


def test_huggingface_pytorch_bin_directory(hf_dir, tmp_path):
    _, hf = hf_dir
    hf.save_pretrained(tmp_path, safe_serialization=False) if _accepts_bin(hf) else _write_bin(hf, tmp_path)
    np.testing.assert_allclose(logits(AutoModel.from_pretrained(tmp_path)),
                               logits(AutoModel.from_pretrained(hf_dir[0])), atol=1e-6)


def _accepts_bin(hf):
    import inspect
    return 'safe_serialization' in inspect.signature(hf.save_pretrained).parameters


def _write_bin(hf, directory):
    hf.config.save_pretrained(directory)
    torch.save(hf.state_dict(), directory / 'pytorch_model.bin')


def test_bad_directories_are_named(tmp_path, hf_dir, small):
    with pytest.raises(ValueError, match='has no config.json'):
        AutoModel.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"the path does not exist"):
        AutoModel.from_pretrained(tmp_path / 'absent')
    (tmp_path / 'config.json').write_text('{"type": "GPT9Config"}')
    with pytest.raises(ValueError, match=r"unknown config type 'GPT9Config'.*config.json"):
        AutoConfig.from_pretrained(tmp_path)
    (tmp_path / 'config.json').write_text('{"n_layer": 2}')
    with pytest.raises(ValueError, match="neither 'type'.*nor 'model_type'"):
        AutoConfig.from_pretrained(tmp_path)
    small.config.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=f"{tmp_path} has config.json but no weights"):
        AutoModel.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match='there is no tokenizer_config.json'):
        AutoTokenizer.from_pretrained(tmp_path)
    (tmp_path / 'config.json').write_text((hf_dir[0] / 'config.json').read_text())
    with pytest.raises(ValueError, match=f"no HF weights in directory {tmp_path}"):
        AutoModel.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match=f"{tmp_path} has no GPT2Tokenizer files"):
        AutoTokenizer.from_pretrained(tmp_path)
    (tmp_path / 'config.json').write_text(json.dumps({'model_type': 'bert'}))
    with pytest.raises(ValueError, match="model_type 'bert'.*supported HuggingFace model types: gpt2"):
        AutoModel.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match='cannot tell which tokenizer'):
        AutoTokenizer.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match='unknown model name'):
        AutoModel.from_pretrained('gpt2_tiniest')
