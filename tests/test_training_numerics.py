"""Eval while training leaves the loss curve untouched; metrics.jsonl and the loss curve; dynamic loss scaling."""
import json
import os

import numpy as np
import pytest
from mindspore import nn, Parameter, Tensor

from mindformers import MindFormerConfig, Trainer
from mindformers.core.optim import AdamWeightDecay
from mindformers.tools.build import build_wrapper
from mindformers.trainer.evaluation import eval_cell
from mindformers.wrapper import MFTrainOneStepCell

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_YAML = os.path.join(REPO, 'configs', 'gpt2', 'run_gpt2_tiny.yaml')


def tiny_config(tmp_path, **overrides):
    config = MindFormerConfig(TINY_YAML)
    config.merge_from_dict({
        'output_dir': str(tmp_path), 'runner_config.epochs': 2, 'runner_config.batch_size': 4,
        'model.model_config.num_layers': 1, 'model.model_config.hidden_size': 32, 'model.model_config.num_heads': 2,
        'model.model_config.seq_length': 32, 'train_dataset.data_loader.max_samples': 24,
        'eval_dataset.data_loader.max_samples': 8, 'eval_dataset.batch_size': 4,
        'callbacks': [{'type': 'MFLossMonitor', 'per_print_times': 2}], **overrides})
    return config


def test_eval_while_training_does_not_change_the_loss_curve(tmp_path):
    plain = Trainer(args=tiny_config(tmp_path / 'plain')).train().losses
    config = tiny_config(tmp_path / 'eval', do_eval=True, eval_step_interval=4, eval_epoch_interval=1)
    trainer = Trainer(args=config)
    state = trainer.train()
    assert state.losses == plain  # bit for bit
    assert len(eval_cell(trainer.model, 'loss').compile_cache) == 1  # the five evaluations ran one compiled graph
    records = [json.loads(line) for line in
               open(tmp_path / 'eval' / 'log' / 'rank_0' / 'metrics.jsonl', encoding='utf-8')]
    evals = [r for r in records if 'eval_loss' in r]
    assert [r['step'] for r in evals] == [4, 6, 8, 12, 12]  # every 4 steps and after each 6-step epoch
    assert all(np.isclose(r['eval_PPL'], np.exp(r['eval_loss'])) for r in evals)
    logged = [r for r in records if 'loss' in r]
    assert [r['step'] for r in logged] == [2, 4, 6, 8, 10, 12]
    for record in logged:
        assert set(record) >= {'step', 'epoch', 'loss', 'lr', 'grad_norm', 'tokens_per_s'}
        assert record['loss'] == plain[record['step'] - 1] and record['tokens_per_s'] > 0
    png = tmp_path / 'eval' / 'log' / 'rank_0' / 'loss_curve.png'
    assert png.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'


class _ToyLoss(nn.Cell):
    """loss = sum(w * x); `x` containing inf gives an inf gradient for w."""

    def __init__(self):
        super().__init__()
        self.w = Parameter(Tensor(np.ones(4, np.float32)), name='w')

    def construct(self, x):
        return (self.w * x).sum()


def toy_step(scale_sense, accumulation=1):
    net = _ToyLoss()
    optimizer = AdamWeightDecay(net.trainable_params(), learning_rate=0.1)
    return net, MFTrainOneStepCell(net, optimizer, use_clip_grad=False, scale_sense=scale_sense,
                                   gradient_accumulation_steps=accumulation)


def test_dynamic_loss_scale_skips_overflow_and_grows_after_window():
    manager = build_wrapper({'type': 'DynamicLossScaleUpdateCell', 'loss_scale_value': 1024.0, 'scale_factor': 2,
                             'scale_window': 3})
    net, step = toy_step(manager)
    clean = Tensor(np.array([1., 2., 3., 4.], np.float32))
    poisoned = Tensor(np.array([1., np.inf, 3., 4.], np.float32))

    loss, _ = step(clean)
    assert np.isclose(float(loss.asnumpy()), 10.0)  # reported unscaled
    after_clean = net.w.asnumpy().copy()
    assert not np.allclose(after_clean, 1.0) and not bool(step.overflow.asnumpy())
    assert float(step.scale_sense.asnumpy()) == 1024.0

    step(poisoned)
    assert bool(step.overflow.asnumpy())
    np.testing.assert_array_equal(net.w.asnumpy(), after_clean)  # update skipped
    assert float(step.scale_sense.asnumpy()) == 512.0  # lowered
    assert int(step.optimizer.global_step.asnumpy()[0]) == 1  # the skipped step did not count

    scales = []
    for _ in range(4):
        step(clean)
        scales.append(float(step.scale_sense.asnumpy()))
    assert scales == [512.0, 512.0, 1024.0, 1024.0]  # grows after scale_window (3) clean steps


def test_loss_scaled_update_equals_unscaled_update():
    """A fixed scale of 2**12 changes nothing about the update (fp32: up to rounding)."""
    batch = Tensor(np.array([0.5, -1., 2., 0.25], np.float32))
    results = []
    for scale in (None, 4096.0):
        net, step = toy_step(scale, accumulation=2)
        step.accumulate(batch)
        loss, norm = step(batch)
        results.append((float(loss.asnumpy()), float(norm.asnumpy()), net.w.asnumpy().copy()))
    assert np.isclose(results[0][0], results[1][0]) and np.isclose(results[0][1], results[1][1])
    np.testing.assert_allclose(results[0][2], results[1][2], rtol=1e-6)


def test_bad_scale_sense_is_refused():
    with pytest.raises(ValueError, match='scale_sense must be a positive number'):
        toy_step(-1.0)


def test_trainer_builds_loss_scale_from_yaml(tmp_path):
    config = tiny_config(tmp_path, runner_wrapper={
        'type': 'MFTrainOneStepCell', 'use_clip_grad': True,
        'scale_sense': {'type': 'DynamicLossScaleUpdateCell', 'loss_scale_value': 65536, 'scale_factor': 2,
                        'scale_window': 1000}}, **{'runner_config.epochs': 1})
    state = Trainer(args=config).train()
    assert len(state.losses) == 6 and all(np.isfinite(state.losses))
    assert float(state.train_network.scale_sense.asnumpy()) == 65536.0
