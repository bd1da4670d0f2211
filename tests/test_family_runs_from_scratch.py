"""PanGu-alpha and PengCheng.Mind tiny configs end to end, from the CLI and through Trainer: train from scratch,
finetune that checkpoint on instruction data, evaluate (perplexity) and predict with the KV cache. (These families
have no HuggingFace model to convert from; LLaMA and GLM2 start from converted weights in test_family_runs.py.)"""
import os

import numpy as np
import pytest

from mindformers import Trainer
from mindformers.tools.register import MindFormerConfig
from helpers.cli import json_result, run_ok
from helpers.tiny import tiny_sft_data, tiny_yaml

pytestmark = pytest.mark.slow  # end-to-end runs of the tiny configs: 10-50 s each
FAMILIES = {
    # family: (instruction data, its format, template)
    'pangualpha': ('conversation_sample.json', 'conversation', 'glm2'),
    'pengcheng_mind': ('alpaca_sample.json', 'alpaca', 'alpaca'),
}
PROMPTS = ['ROMEO:', '你好']


def _run(tool, *args):
    return run_ok(tool, *args, timeout=900).stdout


def _log(out):
    return (out / 'log' / 'rank_0' / 'mindformer.log').read_text()


@pytest.fixture(scope='module', params=sorted(FAMILIES))
def scratch(request, tmp_path_factory):
    """(family, checkpoint directory of a CLI run that trained the tiny config from scratch, instruction MindRecord
    directory, work directory)."""
    family = request.param
    data, fmt, template = FAMILIES[family]
    work = tmp_path_factory.mktemp(family)
    summary = json_result(_run('run_mindformer.py', '--config', tiny_yaml(family), '--run_mode', 'train', '--epochs',
                               1, '--output_dir', work / 'scratch', '--train_dataset.data_loader.max_samples', 32))
    assert summary['steps'] == summary['total_steps'] > 0 and os.path.isfile(summary['last_checkpoint'])
    tiny_sft_data(family, data, fmt, template, work / 'sft')
    return family, work / 'scratch' / 'checkpoint', work / 'sft', work


def test_cli_finetunes_evaluates_and_predicts_with_the_cache(scratch):
    family, checkpoint, data, work = scratch
    out = work / 'cli'
    summary = json_result(_run('run_mindformer.py', '--config', tiny_yaml(family, 'finetune'), '--load_checkpoint',
                               checkpoint, '--train_dataset_dir', data, '--output_dir', out, '--epochs', 1))
    assert summary['run_mode'] == 'finetune' and summary['steps'] == summary['total_steps'] > 0
    assert f'loaded weights from {checkpoint}' in _log(out)  # only the log says which weights were loaded
    assert os.path.isfile(summary['last_checkpoint']) and (out / 'checkpoint' / 'rank_0' / 'meta.json').is_file()
    run = ('run_mindformer.py', '--config', tiny_yaml(family), '--load_checkpoint',
           out / 'checkpoint', '--output_dir', out)
    scores = json_result(_run(*run, '--run_mode', 'eval', '--eval_dataset.data_loader.max_samples', 16))
    assert np.isfinite(scores['PPL']) and scores['PPL'] > 1
    stdout = _run(*run, '--run_mode', 'predict', '--predict_data', *PROMPTS, '--predict_batch_size', 2,
                  '--model.model_config.max_decode_length', 24)
    texts = stdout.split('\n' + '-' * 40 + '\n')
    assert len(texts) == 3 and texts[0].startswith(PROMPTS[0]) and texts[1].startswith(PROMPTS[1]), stdout


def test_trainer_finetunes_evaluates_and_predicts(scratch):
    family, checkpoint, data, work = scratch
    config = MindFormerConfig(tiny_yaml(family, 'finetune'))
    config.merge_from_dict({'output_dir': str(work / 'trainer'), 'runner_config.epochs': 2,
                            'train_dataset.data_loader.dataset_dir': str(data),
                            'eval_dataset.data_loader.max_samples': 16, 'callbacks': []})
    trainer = Trainer(args=config)
    before = trainer.evaluate(eval_checkpoint=str(checkpoint))
    state = trainer.finetune(finetune_checkpoint=str(checkpoint))
    assert np.isfinite(state.losses).all() and len(state.losses) >= 2
    after = trainer.evaluate()  # the finetuned weights in memory
    assert np.isfinite(before['PPL']) and np.isfinite(after['PPL']) and after['PPL'] != before['PPL']
    # greedy continuation with the KV cache equals recomputing the whole sequence at every step
    cached, recomputed = (trainer.predict(input_data=PROMPTS, max_new_tokens=12, do_sample=False, use_past=use_past)
                          for use_past in (True, False))
    assert cached == recomputed
    assert [r['text_generation_text'][0][:len(p)] for r, p in zip(cached, PROMPTS)] == PROMPTS
