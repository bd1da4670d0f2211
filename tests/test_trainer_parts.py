"""The Trainer's parts: metrics fed what they declare (loss sums, logits, generated text) and merged over ranks by
their declared sums, one model builder for the Trainer and both strategy writers, predict through the pipeline."""
import json
import os

import numpy as np
import pytest
import mindspore as ms
import mindspore.dataset as ds
from mindspore.train import Metric

from mindformers import (AutoTokenizer, GPT2Config, GPT2LMHeadModel, MindFormerConfig,
                         MindFormerModuleType, PerplexityMetric, Trainer, TrainingArguments, pipeline)
from mindformers.core.metric import ADGENMetric, merge_rank_sums, metric_inputs
from mindformers.tools import export_strategy
from mindformers.trainer.build import build_network

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_YAML = os.path.join(REPO, 'configs', 'gpt2', 'run_gpt2_tiny.yaml')
SEQ = 16


def tiny_model(seed=0):
    ms.set_seed(seed)
    return GPT2LMHeadModel(GPT2Config(seq_length=SEQ, vocab_size=64, hidden_size=32, num_layers=2, num_heads=2,
                                      hidden_dropout_rate=0.0, attention_dropout_rate=0.0, embedding_dropout_prob=0.0,
                                      eos_token_id=1, pad_token_id=0, bos_token_id=1))


def token_rows(num_samples=8, seed=0):
    """[num_samples, SEQ + 1] int32 ids in 2..63."""
    return np.random.default_rng(seed).integers(2, 64, size=(num_samples, SEQ + 1)).astype(np.int32)


def eval_data(rows, batch_size=4):
    return ds.NumpySlicesDataset({'input_ids': rows}, shuffle=False).batch(batch_size)


class _Cleared(Metric):
    def __init__(self):
        super().__init__()
        self.clear()


class TokenAccuracy(_Cleared):
    """Share of next tokens whose logit is the largest: a user metric that consumes logits."""
    consumes = 'logits'
    rank_sums = ('correct', 'total')

    def clear(self):
        self.correct, self.total = 0.0, 0.0

    def update(self, logits, labels, mask):
        self.correct += float(((logits.argmax(-1) == labels) * mask).sum())
        self.total += float(mask.sum())

    def eval(self):
        return {'accuracy': self.correct / self.total}


class LogitPerplexity(PerplexityMetric):
    """PerplexityMetric fed logits instead of loss sums (its update takes both forms)."""
    consumes = 'logits'


class MeanLoss(_Cleared):
    """Mean token loss from loss sums."""
    consumes = 'loss'
    rank_sums = ('total', 'count')

    def clear(self):
        self.total, self.count = 0.0, 0

    def update(self, loss_sum, token_count):
        self.total += loss_sum
        self.count += int(token_count)

    def eval(self):
        return {'mean_loss': self.total / self.count}


class ExactMatch(_Cleared):
    """Share of generated continuations equal to their reference: a user metric that consumes text."""
    consumes = 'text'
    rank_sums = ('matches', 'count')
    seen = []

    def clear(self):
        self.matches, self.count = 0, 0

    def update(self, predictions, references):
        ExactMatch.seen.append((list(predictions), list(references)))
        self.matches += sum(p == r for p, r in zip(predictions, references))
        self.count += len(predictions)

    def eval(self):
        return {'exact_match': self.matches / self.count}


class Undeclared(Metric):
    """A metric that says nothing about its inputs."""

    def clear(self):
        pass

    def update(self, *inputs):
        pass

    def eval(self):
        return {}


@pytest.fixture
def registered(clean_registry):
    """Registers the test metrics under new names; the registry is restored afterwards."""
    for cls in (TokenAccuracy, LogitPerplexity, MeanLoss, ExactMatch, Undeclared):
        clean_registry.register_cls(cls, MindFormerModuleType.METRIC)
    yield


def yaml_trainer(tmp_path, metric, model):
    config = MindFormerConfig(TINY_YAML)
    config.merge_from_dict({'output_dir': str(tmp_path), 'metric': {'type': metric}})
    return Trainer(model=model, args=config, eval_dataset=eval_data(token_rows()))


def test_user_metrics_declared_in_yaml_get_logits_and_loss_sums(tmp_path, registered):
    model = tiny_model()
    perplexity = yaml_trainer(tmp_path, 'PerplexityMetric', model).evaluate()
    from_logits = yaml_trainer(tmp_path, 'LogitPerplexity', model).evaluate()
    # the logits, labels and mask fed to a 'logits' metric are exactly those the loss is computed from
    assert from_logits['tokens'] == perplexity['tokens'] == 8 * SEQ
    assert from_logits['loss'] == pytest.approx(perplexity['loss'], rel=1e-5)

    rows = token_rows()
    model.set_train(False)
    for position in range(0, SEQ, 2):  # every even position's next token becomes the model's top choice
        logits = model(ms.Tensor(rows[:, :-1])).asnumpy()
        rows[:, position + 1] = logits[:, position].argmax(-1)
    logits = model(ms.Tensor(rows[:, :-1])).asnumpy()
    counted = rows[:, 1:] != 0  # the pad id is not counted
    expected = float(((logits.argmax(-1) == rows[:, 1:]) & counted).sum() / counted.sum())
    config = MindFormerConfig(TINY_YAML)
    config.merge_from_dict({'output_dir': str(tmp_path), 'metric': {'type': 'TokenAccuracy'}})
    accuracy = Trainer(model=model, args=config, eval_dataset=eval_data(rows)).evaluate()
    assert accuracy == {'accuracy': pytest.approx(expected, abs=1e-9)} and 0.5 <= expected < 1

    given = MeanLoss()
    result = Trainer(model=model, args=TrainingArguments(output_dir=str(tmp_path)), compute_metrics=given,
                     eval_dataset=eval_data(token_rows())).evaluate()
    assert result == {'mean_loss': pytest.approx(perplexity['loss'], rel=1e-6)} and given.count == 8 * SEQ


def test_a_user_text_metric_scores_generated_continuations(tmp_path, registered):
    tokenizer = AutoTokenizer.from_pretrained('gpt2_tiny')
    pad = tokenizer.eos_token_id if tokenizer.pad_token_id is None else tokenizer.pad_token_id
    prompts = [[5, 6, 7], [9, 10, 11, 12, 13], [20, 21]]
    width = 6
    input_ids = np.array([[pad] * (width - len(p)) + p for p in prompts], np.int32)
    labels = np.full((3, 4), -100, np.int32)
    labels[:, :2] = [[30, 31], [32, 33], [34, 35]]
    data = ds.NumpySlicesDataset({'input_ids': input_ids, 'labels': labels}, shuffle=False).batch(2)
    model = tiny_model(seed=2)
    config = MindFormerConfig(TINY_YAML)
    config.merge_from_dict({'output_dir': str(tmp_path), 'metric': {'type': 'ExactMatch'}})
    trainer = Trainer(model=model, args=config, tokenizer=tokenizer, eval_dataset=data)
    ExactMatch.seen.clear()
    result = trainer.evaluate(max_new_tokens=3)

    outputs = [model.generate([p], max_new_tokens=3, do_sample=False)[0] for p in prompts]
    expected = [tokenizer.decode(out[len(p):], skip_special_tokens=True) for p, out in zip(prompts, outputs)]
    assert [p for preds, _ in ExactMatch.seen for p in preds] == expected
    references = [tokenizer.decode(r, skip_special_tokens=True) for r in ([30, 31], [32, 33], [34, 35])]
    assert [r for _, refs in ExactMatch.seen for r in refs] == references
    assert result == {'exact_match': sum(p == r for p, r in zip(expected, references)) / 3, 'samples': 3}


def test_a_metric_that_declares_nothing_is_refused_saying_what_to_declare(tmp_path, registered):
    class OldStyle(Undeclared):  # the previous session's flag alone is not a declaration
        generation_based = True

    for metric, where in ((Undeclared(), 'compute_metrics'), (OldStyle(), 'compute_metrics')):
        trainer = Trainer(model=tiny_model(), args=TrainingArguments(output_dir=str(tmp_path)),
                          compute_metrics=metric, eval_dataset=eval_data(token_rows()))
        with pytest.raises(ValueError) as err:
            trainer.evaluate()
        message = str(err.value)
        assert message.startswith(f"{where}: {type(metric).__name__} cannot be computed by evaluation: it declares "
                                  f"no `consumes` and it declares no `rank_sums`")
        assert "consumes = 'loss', 'logits' or 'text'" in message and "'logits' -> update(logits [B, S, V]" in message
    with pytest.raises(ValueError, match=r"metric.type Undeclared: Undeclared cannot be computed by evaluation"):
        yaml_trainer(tmp_path, 'Undeclared', tiny_model()).evaluate()

    class Misdeclared(MeanLoss):
        consumes = 'probabilities'
        rank_sums = 'total'

    with pytest.raises(ValueError, match=r"consumes = 'probabilities' is not one of 'loss', 'logits', 'text' and "
                                         r"rank_sums = 'total' is not a tuple of attribute names"):
        metric_inputs(Misdeclared(), 'compute_metrics')

    class Misnamed(MeanLoss):
        rank_sums = ('total', 'counts')

    with pytest.raises(ValueError, match=r"metric: Misnamed cannot be computed by evaluation: rank_sums names "
                                         r"\['counts'\], which it does not have"):
        metric_inputs(Misnamed())


def test_rank_sums_merge_two_ranks_into_the_single_process_result():
    """Each rank's declared sums are added (`core.context.sum_over_ranks` under data parallel; here two metrics
    stand for two ranks and `add` adds the other's values)."""
    first, second, whole = PerplexityMetric(), PerplexityMetric(), PerplexityMetric()
    for metric, batches in ((first, [(2.0, 4), (3.5, 5)]), (second, [(7.25, 9)]), (whole, [(2.0, 4), (3.5, 5),
                                                                                            (7.25, 9)])):
        for loss_sum, count in batches:
            metric.update(loss_sum, count)
    other = [second.total_loss, second.total_tokens]
    merge_rank_sums(first, lambda values: np.add(values, other))
    assert first.eval() == whole.eval() and first.total_tokens == 18

    texts = ADGENMetric(), ADGENMetric(), ADGENMetric()
    pairs = [('我爱北京', '我爱北京天安门'), ('the cat', 'the cat sat'), ('abc', 'abd')]
    texts[0].update(*zip(*pairs[:2]))
    texts[1].update(*zip(*pairs[2:]))
    texts[2].update(*zip(*pairs))
    other = [*texts[1].totals.values(), texts[1].count]
    merge_rank_sums(texts[0], lambda values: np.add(values, other))
    assert texts[0].count == 3 and isinstance(texts[0].count, int)
    assert texts[0].eval() == pytest.approx(texts[2].eval(), rel=1e-12)


class RecordingGPT2(GPT2LMHeadModel):
    """GPT2LMHeadModel that records how each instance was built."""
    built = []

    def __init__(self, config, **kwargs):
        super().__init__(config, **kwargs)
        pc = config.parallel_config
        RecordingGPT2.built.append({'data_parallel': pc.data_parallel, 'model_parallel': pc.model_parallel,
                                    'num_layers': config.num_layers,
                                    'allocated': not any(p.has_init for p in self.get_parameters())})


@pytest.fixture
def recording_model(clean_registry):
    clean_registry.register_cls(RecordingGPT2, MindFormerModuleType.MODELS)
    RecordingGPT2.built.clear()
    yield


def test_one_builder_makes_the_model_of_the_trainer_and_both_strategy_writers(tmp_path, recording_model):
    """The arch, model config and parallel_config of the run config give the Trainer's network, the model whose
    layout only_save_strategy writes and the one the export_strategy CLI writes; the writers allocate no weights."""
    yaml = tmp_path / 'run.yaml'
    yaml.write_text(f"base_config: {TINY_YAML}\nmodel:\n  arch:\n    type: RecordingGPT2\n  model_config:\n"
                    f"    num_layers: 1\n", encoding='utf-8')
    network = build_network(MindFormerConfig(str(yaml)))
    assert isinstance(network, RecordingGPT2)
    trainer = Trainer(args=str(yaml))
    assert isinstance(trainer._get_network(), RecordingGPT2)  # pylint: disable=protected-access

    assert export_strategy.main(['--config', str(yaml), '--data_parallel', '2', '--model_parallel', '2',
                                 '--output_dir', str(tmp_path / 'exported')]) == 0
    config = MindFormerConfig(str(yaml))
    config.merge_from_dict({'output_dir': str(tmp_path / 'run'), 'only_save_strategy': True,
                            'parallel_config': {'data_parallel': 2, 'model_parallel': 2}})
    assert Trainer(args=config).train() is None
    full = {'data_parallel': 1, 'model_parallel': 1, 'num_layers': 1, 'allocated': True}
    layout = {'data_parallel': 2, 'model_parallel': 2, 'num_layers': 1, 'allocated': False}
    assert RecordingGPT2.built == [full, full, layout, layout]
    exported = json.loads((tmp_path / 'exported' / 'ckpt_strategy_rank_0.json').read_text())
    saved = json.loads((tmp_path / 'run' / 'strategy' / 'ckpt_strategy_rank_0.json').read_text())
    assert saved == exported and len(exported['parallel_layout_item']) == 16 + 32  # parameters + Adam moments


def test_predict_is_the_text_generation_pipeline(tmp_path):
    tokenizer = AutoTokenizer.from_pretrained('gpt2_tiny')
    model = GPT2LMHeadModel(GPT2Config(vocab_size=512, seq_length=32, hidden_size=32, num_layers=1, num_heads=2,
                                       eos_token_id=0, pad_token_id=0, bos_token_id=0))
    trainer = Trainer(model=model, tokenizer=tokenizer, args=TrainingArguments(output_dir=str(tmp_path)))
    prompts = ['ROMEO:', 'To be or', 'the king']
    expected = pipeline('text_generation', model=model, tokenizer=tokenizer)(prompts, batch_size=3, max_new_tokens=5)
    assert trainer.predict(input_data=prompts, max_new_tokens=5) == expected
    assert trainer.predict(input_data=prompts, batch_size=2, max_new_tokens=5) == expected
    assert trainer.predict(input_data=[]) == []

    calls = []
    generate = model.generate
    model.generate = lambda *args, **kwargs: calls.append(args) or generate(*args, **kwargs)
    try:
        with pytest.raises(ValueError, match=r"prompt 2 'ab\\udcff' is not valid text"):
            trainer.predict(input_data=['ROMEO:', 'To be', 'ab\udcff'], batch_size=1, max_new_tokens=2)
    finally:
        del model.generate
    assert not calls  # every prompt is checked before any is generated
