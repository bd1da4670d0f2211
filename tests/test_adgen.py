"""ADGEN: ADGENMetric against hand-computed ROUGE and BLEU-4, KeyWordGenDataset / ADGenDataLoader samples (train and
eval layouts, errors), and generation-based evaluation with random weights: through the Trainer (also during
finetuning) on the tiny ChatGLM2 config, and from the CLI on the tiny ChatGLM-6B (GLM) config."""
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

from mindformers import Trainer
from mindformers.core.metric import ADGENMetric, PerplexityMetric
from mindformers.core.metric.adgen import rouge_scores, sentence_bleu4
from mindformers.dataset import KeyWordGenDataset
from mindformers.models.glm2 import ChatGLM2Tokenizer
from mindformers.models.glm.chatglm_6b_tokenizer import ChatGLMTokenizer
from mindformers.tools.build import build_metric
from mindformers.tools.register import MindFormerConfig, MindFormerRegister, MindFormerModuleType
from mindformers.tools.utils import resolve_path

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN, DEV = resolve_path('assets/adgen/train.json'), resolve_path('assets/adgen/dev.json')
GLM2_TINY = os.path.join(REPO, 'configs', 'glm2', 'run_glm2_tiny.yaml')
GLM_TINY = os.path.join(REPO, 'configs', 'glm', 'run_glm_tiny.yaml')
PAD, GMASK, SOP, EOP = 3, 1001, 1004, 1005  # the bundled tiny ice_text.model


def _f(precision, recall):
    """The F-score as rouge_chinese computes it."""
    return 2 * precision * recall / (precision + recall + 1e-8)


def _records(path):
    with open(path, encoding='utf-8') as f:
        return [json.loads(line) for line in f if line.strip()]


# ----------------------------------------------------------------------------- metric
def test_bleu4_hand_computed():
    assert sentence_bleu4('abcd', 'abcd') == pytest.approx(1.0)
    # 1-grams 3/4, 2-grams 2/3, 3-grams 1/2, 4-grams 0/1 -> 1/(2*1); equal lengths: no brevity penalty
    assert sentence_bleu4('abce', 'abcd') == pytest.approx((3 / 4 * 2 / 3 * 1 / 2 * 1 / 2) ** 0.25)
    # no 3-/4-grams in a 2-character prediction: 0/1 -> 1/2 and 1/4; brevity penalty exp(1 - 4/2)
    assert sentence_bleu4('ab', 'abcd') == pytest.approx(math.exp(-1) * (1 * 1 * 1 / 2 * 1 / 4) ** 0.25)
    # clipping: 'a' counts at most twice, 'aa' once; 3-grams 0/2 -> 1/(2*2), 4-grams 0/1 -> 1/(4*1)
    assert sentence_bleu4('aaaa', 'aa') == pytest.approx((2 / 4 * 1 / 3 * 1 / 4 * 1 / 4) ** 0.25)
    # characters: every n-gram of '我爱北京' is in the reference; brevity penalty exp(1 - 7/4)
    assert sentence_bleu4('我爱北京', '我爱北京天安门') == pytest.approx(math.exp(1 - 7 / 4))
    assert sentence_bleu4('xyz', 'abc') == 0.0 and sentence_bleu4('', 'abc') == 0.0


def test_rouge_hand_computed():
    # words the cat sat on the mat / the cat is on the mat: 5 distinct words each, 4 shared; distinct bigrams
    # 5 each, 3 shared (the cat, on the, the mat); longest common subsequence 'the cat on the mat' of 6 words
    scores = rouge_scores('the cat sat on the mat', 'the cat is on the mat')
    assert scores['rouge-1'] == pytest.approx(_f(4 / 5, 4 / 5), abs=1e-12)
    assert scores['rouge-2'] == pytest.approx(_f(3 / 5, 3 / 5), abs=1e-12)
    assert scores['rouge-l'] == pytest.approx(_f(5 / 6, 5 / 6), abs=1e-12)
    # n-grams count once ('exclusive'), the LCS counts every word
    scores = rouge_scores('the the the cat', 'the cat')
    assert scores['rouge-1'] == pytest.approx(_f(1, 1), abs=1e-12)
    assert scores['rouge-2'] == pytest.approx(_f(1 / 2, 1), abs=1e-12)
    assert scores['rouge-l'] == pytest.approx(_f(2 / 4, 2 / 2), abs=1e-12)
    # jieba words: 我 爱 北京 / 我 爱 北京 天安门
    scores = rouge_scores('我爱北京', '我爱北京天安门')
    assert scores == pytest.approx({'rouge-1': _f(1, 3 / 4), 'rouge-2': _f(1, 2 / 3), 'rouge-l': _f(1, 3 / 4)},
                                   abs=1e-12)
    assert rouge_scores('', '我爱北京') == rouge_scores(' \n', '我爱北京') == rouge_scores('我爱北京', '') == {
        'rouge-1': 0.0, 'rouge-2': 0.0, 'rouge-l': 0.0}


def test_metric_averages_rounded_scores():
    metric = build_metric({'type': 'ADGENMetric'})
    assert isinstance(metric, ADGENMetric) and metric.consumes == 'text' and PerplexityMetric.consumes == 'loss'
    metric.update(['我爱北京', 'the cat sat on the mat'], ['我爱北京天安门', 'the cat is on the mat'])
    metric.update('abce', 'abcd')
    per_sample = [
        {'rouge-1': _f(1, 3 / 4), 'rouge-2': _f(1, 2 / 3), 'rouge-l': _f(1, 3 / 4), 'bleu-4': math.exp(1 - 7 / 4)},
        {'rouge-1': _f(4 / 5, 4 / 5), 'rouge-2': _f(3 / 5, 3 / 5), 'rouge-l': _f(5 / 6, 5 / 6),
         'bleu-4': sentence_bleu4('the cat sat on the mat', 'the cat is on the mat')},
        {'rouge-1': 0.0, 'rouge-2': 0.0, 'rouge-l': 0.0, 'bleu-4': (1 / 8) ** 0.25},  # 'abce' is one word
    ]
    expected = {key: sum(round(s[key] * 100, 4) for s in per_sample) / 3 for key in ADGENMetric.KEYS}
    assert metric.eval() == pytest.approx(expected, abs=1e-9) and metric.count == 3
    assert metric.eval()['rouge-2'] == pytest.approx((80.0 + 60.0 + 0.0) / 3, abs=1e-9)
    metric.clear()
    with pytest.raises(RuntimeError, match='no samples'):
        metric.eval()
    with pytest.raises(ValueError, match='2 predictions but 1 references'):
        metric.update(['a', 'b'], ['a'])
    with pytest.raises(TypeError, match='sample 0 is \\(list, str\\); decode'):
        metric.update([[1, 2]], ['a'])
    with pytest.raises(ValueError, match='takes \\(preds, labels\\)'):
        metric.update(['a'])


# ----------------------------------------------------------------------------- dataset
@pytest.fixture(scope='module')
def glm_tok():
    return ChatGLMTokenizer(resolve_path('assets/glm_tiny/ice_text.model'))


def _dataset(tokenizer, path, phase, seq_length=40, **extra):
    config = {'data_loader': {'type': 'ADGenDataLoader', 'dataset_dir': str(path), 'phase': phase,
                              'shuffle': False, **extra.pop('loader', {})},
              'tokenizer': tokenizer, 'max_source_length': 8, 'max_target_length': 12, 'seq_length': seq_length,
              'batch_size': 3, **extra}
    dataset = KeyWordGenDataset(config)
    rows = list(dataset.create_dict_iterator(num_epochs=1, output_numpy=True))
    return np.concatenate([r['input_ids'] for r in rows]), np.concatenate([r['labels'] for r in rows])


def _write(path, records):
    path.write_text(''.join(json.dumps(r, ensure_ascii=False) + '\n' for r in records), encoding='utf-8')
    return path


SAMPLES = [{'content': '类型#裙*颜色#蓝色*风格#清新*图案#条纹*裙长#长裙', 'summary': '蓝白条纹的长裙清爽又干净，夏天穿着很舒服。'},
           {'content': '类型#上衣', 'summary': ''},
           {'content': 'hello\tworld', 'summary': 'short\nanswer'}]


def test_train_layout(tmp_path, glm_tok):
    input_ids, labels = _dataset(glm_tok, _write(tmp_path / 'train.json', SAMPLES), 'train')
    assert input_ids.shape == labels.shape == (3, 41) and input_ids.dtype == labels.dtype == np.int32
    for record, ids, label in zip(SAMPLES, input_ids, labels):
        prompt = glm_tok.encode(record['content'], add_special_tokens=False)[:8] + [GMASK, SOP]
        answer = glm_tok.encode(record['summary'], add_special_tokens=False)[:12] + [EOP]
        pad = 41 - len(prompt) - len(answer)
        assert ids.tolist() == prompt + answer + [PAD] * pad
        assert label.tolist() == [-100] * len(prompt) + answer + [-100] * pad
    assert len(glm_tok.encode(SAMPLES[0]['content'], add_special_tokens=False)) > 8  # it was cut


def test_eval_layout_and_version_2(tmp_path, glm_tok):
    path = _write(tmp_path / 'dev.json', SAMPLES)
    input_ids, labels = _dataset(glm_tok, path, 'eval')
    for record, ids, label in zip(SAMPLES, input_ids, labels):
        prompt = glm_tok.encode(record['content'], add_special_tokens=False)[:8] + [GMASK, SOP]
        answer = glm_tok.encode(record['summary'], add_special_tokens=False)[:12]
        assert ids.tolist() == [PAD] * (41 - len(prompt)) + prompt
        assert label.tolist() == answer + [-100] * (41 - len(answer))
    # ChatGLM2 (prefix [gMASK] sop) with MindFormers' version 2: the content inside build_prompt
    glm2 = ChatGLM2Tokenizer(resolve_path('assets/glm2_tiny/tokenizer.model'))
    input_ids, _ = _dataset(glm2, path, 'eval', loader={'version': 2})
    prompt = glm2.encode(glm2.build_prompt(SAMPLES[2]['content']), add_special_tokens=False)[:8]
    assert input_ids[2].tolist() == [0] * (41 - 10) + glm2.get_prefix_tokens() + prompt


def test_data_errors_name_the_file_and_line(tmp_path, glm_tok):
    bad_json = tmp_path / 'bad.json'
    bad_json.write_text('{"content": "a", "summary": "b"}\n{"content": "a", "summary": \n', encoding='utf-8')
    with pytest.raises(ValueError, match=f"{bad_json}:2: record 1: bad JSON line"):
        _dataset(glm_tok, bad_json, 'train')
    missing = _write(tmp_path / 'missing.json', [{'content': 'a', 'summary': 'b'}, {'content': 'a', 'text': 'b'}])
    with pytest.raises(ValueError, match=f"{missing}:2: record 1: missing key 'summary' \\(keys: 'content', 'text'\\)"):
        _dataset(glm_tok, missing, 'train')
    # origin_columns names other keys
    other_keys = _write(tmp_path / 'keys.json', [{'kw': 'a', 'text': 'b'}] * 4)
    input_ids, labels = _dataset(glm_tok, other_keys, 'eval', loader={'origin_columns': ['kw', 'text'],
                                                                      'max_samples': 3})
    assert len(input_ids) == 3 and labels[0, 0] == glm_tok.encode('b', add_special_tokens=False)[0]
    not_text = _write(tmp_path / 'number.json', [{'content': 7, 'summary': 'b'}])
    with pytest.raises(ValueError, match=f"{not_text}:1: record 0: 'content' is int, expected a string"):
        _dataset(glm_tok, not_text, 'eval')
    good = _write(tmp_path / 'good.json', SAMPLES)
    with pytest.raises(ValueError, match=r"2 special tokens \+ max_source_length 8 \+ max_target_length 12 \+ 1 EOS = "
                                         r"23 tokens do not fit the model's seq_length \+ 1 = 21"):
        _dataset(glm_tok, good, 'train', seq_length=20)
    with pytest.raises(ValueError, match="phase must be 'train' or 'eval'"):
        _dataset(glm_tok, good, 'test')
    with pytest.raises(ValueError, match='ignore_pad_token_for_loss must be True'):
        _dataset(glm_tok, good, 'train', ignore_pad_token_for_loss=False)
    with pytest.raises(ValueError, match="unknown dataset_config key 'max_source_len'"):
        _dataset(glm_tok, good, 'train', max_source_len=3)
    with pytest.raises(ValueError, match='ADGenDataLoader needs a tokenizer'):
        _dataset(None, good, 'train')


# ----------------------------------------------------------------------------- generation-based evaluation
@MindFormerRegister.register(MindFormerModuleType.METRIC)
class RecordingADGENMetric(ADGENMetric):
    """ADGENMetric that keeps what it was given (any metric with consumes = 'text' gets the same treatment)."""
    seen = []

    def update(self, *inputs):
        RecordingADGENMetric.seen.append(tuple(list(x) for x in inputs))
        super().update(*inputs)


def _adgen_config(tmp_path, metric='RecordingADGENMetric'):
    config = MindFormerConfig(GLM2_TINY)
    config.merge_from_dict({'output_dir': str(tmp_path / 'out'), 'callbacks': [], 'metric.type': metric})
    config['eval_dataset'] = {'data_loader': {'type': 'ADGenDataLoader', 'dataset_dir': 'assets/adgen/dev.json',
                                              'phase': 'eval', 'shuffle': False},
                              'max_source_length': 24, 'max_target_length': 20, 'batch_size': 5,
                              'drop_remainder': False}
    config['eval_dataset_task'] = {'type': 'KeyWordGenDataset'}
    return config


@pytest.mark.slow
def test_trainer_generation_eval_matches_direct_generation(tmp_path):
    trainer = Trainer(args=_adgen_config(tmp_path))
    RecordingADGENMetric.seen.clear()
    result = trainer.evaluate()
    network, tokenizer = trainer.model, trainer._get_tokenizer()  # pylint: disable=protected-access
    records = _records(DEV)
    prompts = [tokenizer.build_inputs_with_special_tokens(tokenizer.encode(r['content'], add_special_tokens=False)[:24])
               for r in records]
    refs = [tokenizer.decode(tokenizer.encode(r['summary'], add_special_tokens=False)[:20], skip_special_tokens=True)
            for r in records]

    def expected_preds(max_new_tokens):
        preds = []
        for start in range(0, len(prompts), 5):  # the eval batches: 5, 5, 2 (drop_remainder False)
            batch = prompts[start:start + 5]
            outputs = network.generate(batch, max_new_tokens=max_new_tokens, do_sample=False)
            preds += [tokenizer.decode(out[len(p):], skip_special_tokens=True) for p, out in zip(batch, outputs)]
        return preds

    seen_preds = [p for preds, _ in RecordingADGENMetric.seen for p in preds]
    seen_refs = [r for _, refs in RecordingADGENMetric.seen for r in refs]
    assert [len(preds) for preds, _ in RecordingADGENMetric.seen] == [5, 5, 2]
    assert seen_refs == refs and seen_preds == expected_preds(20)  # max_new_tokens: the max_target_length
    direct = ADGENMetric()
    direct.update(seen_preds, refs)
    assert result == {**direct.eval(), 'samples': 12}

    RecordingADGENMetric.seen.clear()
    result = trainer.evaluate(max_new_tokens=3)
    short = [p for preds, _ in RecordingADGENMetric.seen for p in preds]
    assert short == expected_preds(3) and short != seen_preds and result['samples'] == 12

    with pytest.raises(TypeError, match='generation options only apply to a generation-based metric'):
        Trainer(args=_adgen_config(tmp_path, metric='PerplexityMetric')).evaluate(max_new_tokens=3)


def test_generation_metric_needs_labels(tmp_path):
    config = _adgen_config(tmp_path, metric='ADGENMetric')
    config['eval_dataset'] = {'data_loader': {'type': 'TextCorpusDataset', 'files': ['assets/corpus/tiny_chinese.txt'],
                                              'split': 'eval', 'shuffle': False}, 'batch_size': 1}
    config['eval_dataset_task'] = {'type': 'CausalLanguageModelDataset'}
    with pytest.raises(ValueError, match=r"ADGENMetric generates from the eval data's input_ids and scores against "
                                         r"its labels, but the eval dataset has no \['labels'\]"):
        Trainer(args=config).evaluate()


def test_finetune_on_adgen_evaluates_by_generation_during_training(tmp_path):
    config = _adgen_config(tmp_path, metric='ADGENMetric')
    config.merge_from_dict({'runner_config.epochs': 1, 'runner_config.batch_size': 4, 'do_eval': True,
                            'eval_dataset.data_loader.max_samples': 4, 'eval_dataset.max_target_length': 8})
    config['train_dataset'] = {'data_loader': {'type': 'ADGenDataLoader', 'dataset_dir': 'assets/adgen/train.json',
                                               'phase': 'train', 'shuffle': True, 'max_samples': 8},
                               'max_source_length': 24, 'max_target_length': 48, 'batch_size': 4}
    config['train_dataset_task'] = {'type': 'KeyWordGenDataset'}
    state = Trainer(args=config).train()
    assert len(state.losses) == 2 and np.isfinite(state.losses).all()
    assert set(state.eval_results) == {'rouge-1', 'rouge-2', 'rouge-l', 'bleu-4', 'samples'}
    assert state.eval_results['samples'] == 4
    with open(tmp_path / 'out' / 'log' / 'rank_0' / 'metrics.jsonl', encoding='utf-8') as f:
        evals = [r for r in map(json.loads, f) if 'eval_bleu-4' in r]
    assert len(evals) == 1 and evals[0]['step'] == 2 and evals[0]['eval_rouge-l'] == state.eval_results['rouge-l']


@pytest.mark.slow
def test_cli_eval_of_the_tiny_glm_prints_the_adgen_scores(tmp_path):
    config = tmp_path / 'adgen_eval.yaml'
    config.write_text(f"""base_config: {GLM_TINY}
eval_dataset:
  data_loader:
    type: ADGenDataLoader
    dataset_dir: assets/adgen/train.json
    phase: eval
    shuffle: False
  max_source_length: 24
  max_target_length: 6
  input_columns: [input_ids, labels]
  batch_size: 4
  drop_remainder: False
eval_dataset_task:
  type: KeyWordGenDataset
""", encoding='utf-8')
    command = [sys.executable, os.path.join(REPO, 'run_mindformer.py'), '--config', str(config), '--run_mode', 'eval',
               '--output_dir', str(tmp_path / 'out'), '--eval_dataset_dir', DEV, '--options', 'metric.type=ADGENMetric',
               'eval_dataset.data_loader.max_samples=5']
    proc = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(result) == {'rouge-1', 'rouge-2', 'rouge-l', 'bleu-4', 'samples'} and result['samples'] == 5
    assert all(0 <= result[key] <= 100 for key in ADGENMetric.KEYS)
    assert 'dev.json' in (tmp_path / 'out' / 'log' / 'rank_0' / 'mindformer.log').read_text()
