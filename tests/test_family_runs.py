"""LLaMA, ChatGLM2 and GLM (ChatGLM-6B) tiny configs end to end, from the CLI and through Trainer: a HuggingFace
checkpoint is converted, finetuned on instruction data (GLM: the bundled ADGEN sample), evaluated (perplexity) and
continued with the KV cache; the tiny configs also train from scratch. GLM has no transformers model: its random
weights are written in the HF release's layout and its greedy continuation is checked against the NumPy reference
of tests/helpers/glm_reference.py."""
import os

import numpy as np
import pytest
import torch

from mindformers import Trainer
from mindformers.tools.register import MindFormerConfig
from helpers.cli import convert_weight_main, json_result, run_ok
from helpers.glm_reference import LAYERS, RELEASE_CONFIG, random_weights, reference_logits, write_release
from helpers.hf_reference import hf_tiny_model
from helpers.tiny import ASSETS, tiny_sft_data, tiny_yaml

pytestmark = pytest.mark.slow  # end-to-end runs of the tiny configs: 10-50 s each
FAMILIES = {
    'llama': dict(template='alpaca', format='alpaca', data='alpaca_sample.json'),
    'glm2': dict(template='glm2', format='conversation', data='conversation_sample.json'),
    'glm': dict(data=os.path.join(ASSETS, 'adgen', 'train.json')),  # ADGEN JSON, read by the finetune YAML as is
}


def _glm_weights():
    """Random GLM weights of the tiny config's sizes, HF release names; the padding rows of the output head
    (ids 1008..1023, beyond the tiny tokenizer) are zero, as a trained model never predicts them."""
    weights = random_weights(seed=2)
    weights['lm_head.weight'][1008:] = 0.0
    return weights


def _glm_checkpoint(work):
    """The GLM weights written as the HF release lays them out, converted by convert_weight.py."""
    write_release(work / 'hf', _glm_weights(), dict(RELEASE_CONFIG, max_sequence_length=128))
    checkpoint = work / 'glm.ckpt'
    assert convert_weight_main('--model', 'glm', '--input_path', work / 'hf', '--output_path', checkpoint) == 0
    return checkpoint


def _greedy(family, reference, ids, steps):
    """The reference's greedy continuation of `ids`: the HF model's, or for GLM the NumPy reference's (alpha
    sqrt(2 * num_layers) as in the tiny YAML)."""
    if family != 'glm':
        return reference.generate(torch.tensor([ids]), max_new_tokens=steps, do_sample=False, pad_token_id=0,
                                  eos_token_id=None)[0].tolist()
    ids = list(ids)
    for _ in range(steps):
        ids.append(int(reference_logits(reference, np.array([ids]), alpha=np.sqrt(2 * LAYERS))[0, -1].argmax()))
    return ids


def _run(tool, *args):
    return run_ok(tool, *args, timeout=900).stdout


@pytest.fixture(scope='module', params=sorted(FAMILIES))
def prepared(request, tmp_path_factory):
    """(family, converted checkpoint, instruction data (MindRecord directory; GLM: ADGEN JSON), reference (HF model;
    GLM: its weights for the NumPy reference), work directory). The converter runs in this process: the tests are
    about run_mindformer.py (convert_weight.py's command line is tested in test_convert_weight.py)."""
    family, spec = request.param, FAMILIES[request.param]
    work = tmp_path_factory.mktemp(family)
    if family == 'glm':
        return family, _glm_checkpoint(work), spec['data'], _glm_weights(), work
    hf_model = hf_tiny_model(family).eval()
    hf_model.save_pretrained(work / 'hf')
    checkpoint = work / f'{family}.ckpt'
    assert convert_weight_main('--model', family, '--input_path', work / 'hf', '--output_path', checkpoint) == 0
    tiny_sft_data(family, spec['data'], spec['format'], spec['template'], work / 'sft')
    return family, checkpoint, work / 'sft', hf_model, work


def _log(out):
    return (out / 'log' / 'rank_0' / 'mindformer.log').read_text()


def test_cli_finetune_eval_predict_from_a_converted_checkpoint(prepared):
    family, checkpoint, data, _, work = prepared
    config = tiny_yaml(family)
    out = work / 'cli'
    summary = json_result(_run('run_mindformer.py', '--config', tiny_yaml(family, 'finetune'), '--load_checkpoint',
                               checkpoint, '--train_dataset_dir', data, '--output_dir', out, '--epochs', 2))
    assert summary['run_mode'] == 'finetune' and summary['steps'] == summary['total_steps'] >= 2
    assert f'loaded weights from {checkpoint}' in _log(out)  # only the log says which weights were loaded
    assert os.path.isfile(summary['last_checkpoint']) and (out / 'checkpoint' / 'rank_0' / 'meta.json').is_file()
    scores = json_result(_run('run_mindformer.py', '--config', config, '--run_mode', 'eval', '--load_checkpoint',
                              out / 'checkpoint', '--output_dir', out, '--eval_dataset.data_loader.max_samples', 16))
    assert np.isfinite(scores['PPL']) and scores['PPL'] > 1
    stdout = _run('run_mindformer.py', '--config', config, '--run_mode', 'predict', '--load_checkpoint',
                  out / 'checkpoint', '--output_dir', out, '--predict_data', 'ROMEO:', 'Hello',
                  '--predict_batch_size', 2)
    texts = stdout.split('\n' + '-' * 40 + '\n')
    assert len(texts) == 3 and texts[0].startswith('ROMEO:') and texts[1].startswith('Hello'), stdout


def test_cli_trains_the_tiny_config_from_scratch(prepared):
    family, _, _, _, work = prepared
    out = work / 'scratch'
    summary = json_result(_run('run_mindformer.py', '--config', tiny_yaml(family), '--run_mode', 'train',
                               '--epochs', 1, '--output_dir', out, '--train_dataset.data_loader.max_samples', 48))
    assert summary['steps'] > 0 and summary['loss_drop_percent'] >= 0  # the loss fell


def test_trainer_finetunes_evaluates_and_predicts_like_the_hf_model(prepared):
    family, checkpoint, data, hf_model, work = prepared
    config = MindFormerConfig(tiny_yaml(family, 'finetune'))
    config.merge_from_dict({'output_dir': str(work / 'trainer'), 'runner_config.epochs': 2,
                            'train_dataset.data_loader.dataset_dir': str(data),
                            'eval_dataset.data_loader.max_samples': 16, 'callbacks': []})
    trainer = Trainer(args=config)
    # before finetuning: the converted weights continue a prompt exactly as the HF model does (greedy, cached)
    prompt = 'ROMEO:'
    tokenizer = trainer._get_tokenizer()  # pylint: disable=protected-access
    ids = tokenizer.encode_prompt(prompt)  # what predict continues: BOS as the tokenizer adds it, no EOS
    expected = _greedy(family, hf_model, ids, 12)
    result = trainer.predict(predict_checkpoint=str(checkpoint), input_data=prompt, max_new_tokens=12,
                             eos_token_id=[], do_sample=False)
    assert result[0]['text_generation_text'][0] == tokenizer.decode(expected, skip_special_tokens=True)
    before = trainer.evaluate(eval_checkpoint=str(checkpoint))
    state = trainer.finetune(finetune_checkpoint=str(checkpoint))
    assert np.isfinite(state.losses).all() and len(state.losses) >= 2
    after = trainer.evaluate()  # the finetuned weights in memory
    assert np.isfinite(before['PPL']) and np.isfinite(after['PPL']) and after['PPL'] != before['PPL']
