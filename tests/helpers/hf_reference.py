"""transformers + PyTorch references (fp32, CPU) and the comparisons the model and conversion tests make against
them. The tiny conversion models share VOCAB; TOL is the largest |logits difference| accepted against the
reference."""
import json
import os
import shutil

import numpy as np
import torch
import transformers
import mindspore as ms

from helpers import REPO
from helpers.cli import convert_weight_main

VOCAB = 128
TOL = 1e-4
OBSERVED = {}  # max |logits difference| per check (test_convert_llama.py prints it at the end of the session)


def hf_tiny_model(family):
    """A randomly initialised HF model with the shapes of configs/<family>/run_<family>_tiny.yaml: 'llama' ->
    LlamaForCausalLM, 'glm2' -> GlmForCausalLM configured as ChatGLM2."""
    torch.manual_seed(0)
    common = dict(vocab_size=512, hidden_size=192, intermediate_size=512, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-5,
                  pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    if family == 'llama':
        return transformers.LlamaForCausalLM(transformers.LlamaConfig(**common))
    return transformers.GlmForCausalLM(transformers.GlmConfig(
        head_dim=48, attention_bias=True, **common,
        rope_parameters={'rope_type': 'default', 'rope_theta': 10000.0, 'partial_rotary_factor': 0.5}))


def perturb_(model, seed):
    """RMSNorm weights start at 1 and biases at 0: move them so a dropped or swapped one shows."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 1:
                param.add_(0.2 * torch.randn(param.shape, generator=generator))
    return model.eval()


def ids_for(rows, cols, seed):
    return np.random.RandomState(seed).randint(3, VOCAB, (rows, cols))


def hf_logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor(ids)).logits.numpy()


def our_logits(model, ids):
    model.set_train(False)
    return model(ms.Tensor(ids, ms.int32)).asnumpy()


def max_diff(label, got, expected):
    diff = float(np.abs(np.asarray(got) - np.asarray(expected)).max())
    OBSERVED[label] = max(diff, OBSERVED.get(label, 0.0))
    return diff


def assert_same_greedy(hf_model, ours, prompt, new_tokens=32):
    expected = hf_model.generate(torch.tensor([prompt]), max_new_tokens=new_tokens, do_sample=False,
                                 eos_token_id=None, pad_token_id=0).numpy()[0].tolist()
    produced = ours.generate([prompt], max_new_tokens=new_tokens, use_past=True, do_sample=False, eos_token_id=[],
                             pad_token_id=0)[0]
    assert len(expected) == len(prompt) + new_tokens
    assert list(produced) == expected


def state_dict_of(model):
    return {name: value.numpy().copy() for name, value in model.state_dict().items()}


def assert_same_tensors(got, expected):
    assert sorted(got) == sorted(expected)
    for name, value in expected.items():
        np.testing.assert_array_equal(got[name], value, err_msg=name)


def converted_by_cli(family, source, tmp_path_factory):
    """Our checkpoint converted from `source` by `convert_weight.py --model family`."""
    path = tmp_path_factory.mktemp(f'ms_{family}') / f'{family}.ckpt'
    assert convert_weight_main('--model', family, '--input_path', source, '--output_path', path) == 0
    return path


def model_from(config_from_hf_, model_class, hf_directory, checkpoint):
    """Our model of a HF directory's config.json, loading `checkpoint`."""
    with open(hf_directory / 'config.json', encoding='utf-8') as f:
        config = config_from_hf_(json.load(f))
    config.checkpoint_name_or_path = str(checkpoint)
    return model_class(config)


def hf_tokenizer_dir(directory, family, model_type, tokenizer_config):
    """A HF model directory's tokenizer side: the family's tiny `tokenizer.model`, config.json naming `model_type`
    and the given tokenizer_config.json."""
    os.makedirs(directory)
    shutil.copy(os.path.join(REPO, 'mindformers', 'assets', f'{family}_tiny', 'tokenizer.model'), directory)
    (directory / 'config.json').write_text(json.dumps({'model_type': model_type}))
    (directory / 'tokenizer_config.json').write_text(json.dumps(tokenizer_config))
    return directory
