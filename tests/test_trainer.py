"""Trainer end to end on CPU: the MindFormers tutorial usage, train -> evaluate -> predict, finetune, accumulation."""
import json
import os

import numpy as np
import pytest
import mindspore as ms

from helpers.tiny import counting_dataset, tiny_gpt2
from mindformers.generation import TextIteratorStreamer
from mindformers import (Trainer, TrainingArguments, AutoConfig, AutoModel, GPT2Config, GPT2LMHeadModel,
                         MindFormerConfig, MindFormerModuleType)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_YAML = os.path.join(REPO, 'configs', 'gpt2', 'run_gpt2_tiny.yaml')
SEQ = 16


def tiny_model(seed=0, **kwargs):
    return tiny_gpt2(seed, SEQ, **kwargs)


def pattern_dataset(batch_size, num_samples=64, seed=0):
    return counting_dataset(batch_size, num_samples, SEQ, seed)


def test_tutorial_usage_trains_with_instance_and_generator_dataset(tmp_path):
    model = tiny_model()
    args = TrainingArguments(output_dir=str(tmp_path), batch_size=4, num_train_epochs=2, learning_rate=1e-2,
                             warmup_steps=2, save_steps=8, save_total_limit=2, logging_steps=4)
    trainer = Trainer(task='text_generation', model=model, args=args, train_dataset=pattern_dataset(4))
    state = trainer.train()
    assert len(state.losses) == 32 and all(np.isfinite(state.losses))
    assert np.mean(state.losses[-4:]) < 0.5 * state.losses[0]
    ckpt_dir = tmp_path / 'checkpoint' / 'rank_0'
    meta = json.loads((ckpt_dir / 'meta.json').read_text())
    kept = sorted(p.name for p in ckpt_dir.glob('*.ckpt'))
    assert len(kept) == 2 and meta['last_ckpt_file'] in kept and meta['global_step'] == 32
    assert not [p for p in ckpt_dir.iterdir() if p.name.startswith('.')]  # no temporary leftovers
    assert (tmp_path / 'log' / 'rank_0' / 'mindformer.log').is_file()

    # the saved weights reproduce the trained model's logits
    fresh = tiny_model(seed=1)
    Trainer(task='text_generation', model=fresh, args=TrainingArguments(output_dir=str(tmp_path)))._load_weights(
        fresh, str(tmp_path / 'checkpoint'))
    probe = ms.Tensor(np.arange(2, 2 + SEQ, dtype=np.int32)[None])
    model.set_train(False)
    fresh.set_train(False)
    np.testing.assert_allclose(model(probe).asnumpy(), fresh(probe).asnumpy(), atol=1e-6)


def test_gradient_accumulation_matches_larger_batch(tmp_path):
    losses = {}
    weights = {}
    for name, batch, accumulate in (('big', 8, 1), ('accumulated', 2, 4)):
        model = tiny_model(seed=3)
        args = TrainingArguments(output_dir=str(tmp_path / name), batch_size=batch,
                                 gradient_accumulation_steps=accumulate, num_train_epochs=1, learning_rate=1e-2,
                                 save_strategy='no', max_grad_norm=1e9)
        trainer = Trainer(task='text_generation', model=model, args=args,
                          train_dataset=pattern_dataset(batch, num_samples=32))
        state = trainer.train()
        losses[name] = state.losses
        weights[name] = {p.name: p.asnumpy() for p in model.trainable_params()}
    assert len(losses['big']) == len(losses['accumulated']) == 4
    # the logged loss of an accumulated step is the mean over its micro batches: the big batch's loss
    np.testing.assert_allclose(losses['accumulated'], losses['big'], rtol=1e-5)
    for key, value in weights['big'].items():
        np.testing.assert_allclose(weights['accumulated'][key], value, atol=2e-5, rtol=1e-4)


def test_yaml_train_evaluate_predict_and_finetune(tmp_path):
    config = MindFormerConfig(TINY_YAML)
    config.merge_from_dict({'output_dir': str(tmp_path), 'runner_config.epochs': 1,
                            'model.model_config.num_layers': 1, 'model.model_config.hidden_size': 64,
                            'model.model_config.seq_length': 64, 'train_dataset.data_loader.max_samples': 64,
                            'eval_dataset.data_loader.max_samples': 32, 'callbacks': [
                                {'type': 'MFLossMonitor', 'per_print_times': 2},
                                {'type': 'CheckpointMonitor', 'prefix': 'tiny', 'save_checkpoint_steps': 100}]})
    trainer = Trainer(args=config)
    state = trainer.train()
    assert len(state.losses) == 4 and state.losses[-1] < state.losses[0]
    result = trainer.evaluate()
    assert set(result) >= {'loss', 'PPL'} and np.isclose(result['PPL'], np.exp(result['loss']))
    assert result["PPL"] < 512  # better than uniform over the vocabulary
    outputs = trainer.predict(input_data=['ROMEO:', 'To be'], max_new_tokens=8)
    assert len(outputs) == 2 and outputs[0]['text_generation_text'][0].startswith('ROMEO:')
    # one left-padded batch gives what each prompt gives alone (greedy), and a streamer sees the same text
    assert outputs == [trainer.predict(input_data=p, max_new_tokens=8)[0] for p in ['ROMEO:', 'To be']]
    streamer = TextIteratorStreamer(trainer._get_tokenizer(), skip_special_tokens=True)
    trainer.predict(input_data='ROMEO:', max_new_tokens=8, streamer=streamer)
    assert ''.join(streamer) == outputs[0]['text_generation_text'][0]

    # finetune from the saved checkpoint in a new Trainer: the first loss equals the trained model's eval-ish level
    config.output_dir = str(tmp_path / 'tuned')  # a new run: its own output_dir (the first one holds a run)
    tuned = Trainer(args=config)
    state2 = tuned.finetune(finetune_checkpoint=str(tmp_path / 'checkpoint'))
    assert state2.losses[0] < state.losses[0]


def test_auto_classes_from_registered_name():
    config = AutoConfig.from_pretrained('gpt2_tiny')
    assert isinstance(config, GPT2Config) and config.seq_length == 128 and config.vocab_size == 512
    model = AutoModel.from_config('gpt2_tiny', num_layers=1)
    assert isinstance(model, GPT2LMHeadModel) and model.config.num_layers == 1
    small = AutoModel.from_config(AutoConfig.from_pretrained('gpt2', num_layers=1, hidden_size=64, num_heads=2,
                                                             vocab_size=100, seq_length=32))
    assert isinstance(small, GPT2LMHeadModel)


def test_bad_trainer_arguments():
    with pytest.raises(ValueError, match='supported tasks'):
        Trainer(task='image_classification')
    with pytest.raises(ValueError, match='unknown model name'):
        Trainer(model='gpt5')
    with pytest.raises(ValueError, match='lr_scheduler_type'):
        TrainingArguments(lr_scheduler_type='exotic')


def test_evaluate_uses_the_metric_given_and_refuses_one_it_cannot_compute(tmp_path, clean_registry):
    """compute_metrics was accepted and ignored, and a configured metric that is neither perplexity nor
    generation-based was silently replaced by perplexity."""
    from mindformers import PerplexityMetric
    args = TrainingArguments(output_dir=str(tmp_path))
    given = PerplexityMetric()
    result = Trainer(model=tiny_model(), args=args, eval_dataset=pattern_dataset(4, 8),
                     compute_metrics={'ppl': given}).evaluate()
    assert result['tokens'] == 8 * SEQ and given.total_tokens == 8 * SEQ  # the given metric did the counting
    with pytest.raises(ValueError, match=r"compute_metrics: Accuracy cannot be computed by evaluation"):
        Trainer(model=tiny_model(), args=args, eval_dataset=pattern_dataset(4, 8),
                compute_metrics=ms.train.Accuracy()).evaluate()
    config = MindFormerConfig(TINY_YAML)
    config.merge_from_dict({'output_dir': str(tmp_path), 'metric': {'type': 'Accuracy'}})
    clean_registry.register_cls(ms.train.Accuracy, MindFormerModuleType.METRIC)
    with pytest.raises(ValueError, match=r"metric.type Accuracy: Accuracy cannot be computed by evaluation"):
        Trainer(model=tiny_model(), args=config, eval_dataset=pattern_dataset(4, 8)).evaluate()


def test_predict_names_a_prompt_that_is_not_text_or_not_the_models(tmp_path):
    from mindformers import AutoTokenizer
    config = MindFormerConfig(TINY_YAML)
    config.merge_from_dict({'output_dir': str(tmp_path), 'model.model_config.num_layers': 1,
                            'model.model_config.hidden_size': 64, 'model.model_config.seq_length': 64})
    with pytest.raises(ValueError, match=r"prompt 1 'ab\\udcff' is not valid text: character 2 is the lone "
                                         r"surrogate '\\udcff'"):
        Trainer(args=config).predict(input_data=['ROMEO:', 'ab\udcff'])
    trainer = Trainer(model=tiny_model(), args=TrainingArguments(output_dir=str(tmp_path / 'small')),
                      tokenizer=AutoTokenizer.from_pretrained('gpt2_tiny'))  # 512 tokens for a 64-token model
    with pytest.raises(ValueError, match=r"prompt 1 'the king' \(tokenizer GPT2Tokenizer\) has token id 84 at "
                                         r"position 1, outside the model's vocabulary \[0, 64\)"):
        trainer.predict(input_data=['ROMEO:', 'the king'])
