"""Parallel configuration: validation against the job and the model (one message naming the numbers), and the
assignment of layers to pipeline stages (even split, `offset`)."""
import os
import subprocess
import sys

import pytest

from mindformers.core.parallel_config import ParallelConfig, RecomputeConfig, layer_stages, stage_layer_counts
from mindformers.models.gpt2.gpt2_config import GPT2Config
from mindformers.models.gpt2.modeling_gpt2 import GPT2LMHeadModel
from mindformers.models.llama.llama_config import LlamaConfig

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, 'configs', 'gpt2', 'run_gpt2_tiny.yaml')


def llama(**overrides):
    sizes = dict(seq_length=16, vocab_size=64, hidden_size=64, num_layers=4, num_heads=4, n_kv_heads=2,
                 intermediate_size=64)
    return LlamaConfig(**{**sizes, **overrides})


@pytest.mark.parametrize('parallel, devices, needle', [
    (dict(data_parallel=2, model_parallel=2, pipeline_stage=2, micro_batch_num=2), 4,
     r'data_parallel \(2\) x model_parallel \(2\) x pipeline_stage \(2\) = 8 devices, but the job has 4'),
    (dict(model_parallel=2), 1, r'= 2 devices, but the job has 1'),
    (dict(data_parallel=0), 1, r'parallel_config\.data_parallel must be a positive integer, got 0'),
    (dict(pipeline_stage=2, micro_batch_num=1), 2,
     r'micro_batch_num \(1\) must be at least parallel_config\.pipeline_stage \(2\)'),
])
def test_layout_errors_name_the_numbers(parallel, devices, needle):
    with pytest.raises(ValueError, match=needle):
        ParallelConfig(**parallel).validate(devices)


@pytest.mark.parametrize('model, parallel, needle', [
    (dict(num_heads=8, n_kv_heads=8), dict(model_parallel=3),
     r'LlamaConfig\.num_heads \(8\) must be divisible by parallel_config\.model_parallel \(3\)'),
    (dict(), dict(model_parallel=4), r'LlamaConfig\.n_kv_heads \(2\) must be divisible by parallel_config'),
    (dict(vocab_size=65), dict(model_parallel=2, vocab_emb_dp=False),
     r'LlamaConfig\.vocab_size \(65\) must be divisible by parallel_config\.model_parallel \(2\) unless'),
    (dict(num_layers=2), dict(pipeline_stage=4, micro_batch_num=4),
     r'num_layers \(2\) must be at least parallel_config\.pipeline_stage \(4\)'),
    (dict(offset=[1, 0]), dict(pipeline_stage=2, micro_batch_num=2), r'offset \[1, 0\] must sum to 0'),
])
def test_model_errors_name_the_key_and_numbers(model, parallel, needle):
    config = llama(**model)
    layout = ParallelConfig(**parallel)
    devices = layout.data_parallel * layout.model_parallel * layout.pipeline_stage
    with pytest.raises(ValueError, match=needle):
        layout.validate(devices, config)
    assert config.parallel_config.model_parallel == 1  # the model config itself is left as it was


def test_vocabulary_need_not_divide_when_replicated_and_family_checks_run():
    ParallelConfig(model_parallel=2, vocab_emb_dp=True).validate(2, llama(vocab_size=65))
    gpt2 = GPT2Config(seq_length=16, vocab_size=64, hidden_size=48, num_layers=2, num_heads=6)
    with pytest.raises(ValueError, match=r'GPT2Config\.num_heads \(6\) must be divisible by parallel_config\.'
                                         r'model_parallel \(4\)'):
        ParallelConfig(model_parallel=4).validate(4, gpt2)


def test_global_batch_must_split_over_data_parallel_and_micro_batches():
    with pytest.raises(ValueError, match=r'global batch \(6 samples\) must be divisible by parallel_config\.'
                                         r'data_parallel \(4\)'):
        ParallelConfig(data_parallel=4).validate(4, global_batch_size=6)
    pipelined = ParallelConfig(data_parallel=2, pipeline_stage=2, micro_batch_num=4)
    with pytest.raises(ValueError, match=r'data_parallel \(2\) x micro_batch_num \(4\) = 8'):
        pipelined.validate(4, global_batch_size=12)
    assert pipelined.validate(4, llama(), global_batch_size=16) is pipelined


def test_even_split_and_offsets():
    assert stage_layer_counts(8, 4) == [2, 2, 2, 2]
    assert stage_layer_counts(5, 2) == [3, 2]  # earlier stages take the remainder
    assert stage_layer_counts(8, 2, 1) == [3, 5]  # an int moves layers from the first stage to the last
    assert stage_layer_counts(8, 2, -1) == [5, 3]
    assert stage_layer_counts(8, 4, [1, 0, 0, -1]) == [3, 2, 2, 1]
    assert stage_layer_counts(6, 1, 3) == [6]
    assert layer_stages(6, 3, [1, -1, 0]) == [0, 0, 0, 1, 2, 2]


@pytest.mark.parametrize('layers, stages, offset, needle', [
    (8, 2, [1, 1], r'offset \[1, 1\] must sum to 0 \(it moves layers between stages\), but sums to 2'),
    (8, 2, [1, 0, -1], r'must hold one int per pipeline stage \(parallel_config\.pipeline_stage is 2\)'),
    (4, 2, 2, r'leaves pipeline stage 0 with 0 layers \(the even split of 4 layers over 2 stages is \[2, 2\]\)'),
    (4, 2, [-3, 3], r'leaves pipeline stage 0 with -1 layers'),
    (4, 2, 'x', r'offset must be an int or a list of ints'),
    (1, 2, 0, r'num_layers \(1\) must be at least parallel_config\.pipeline_stage \(2\)'),
])
def test_offset_errors(layers, stages, offset, needle):
    with pytest.raises(ValueError, match=needle):
        stage_layer_counts(layers, stages, offset)


def test_models_place_layers_heads_and_recompute_by_stage():
    parallel = ParallelConfig(pipeline_stage=2, micro_batch_num=2, recompute=RecomputeConfig(recompute=[2, 1]))
    config = GPT2Config(seq_length=16, vocab_size=64, hidden_size=32, num_layers=6, num_heads=2, offset=[1, -1],
                        parallel_config=parallel)
    model = GPT2LMHeadModel(config)
    assert [layer.pipeline_stage for layer in model.backbone.layers] == [0, 0, 0, 0, 1, 1]
    recomputed = [layer._has_config_recompute for layer in model.backbone.layers]  # pylint: disable=protected-access
    assert recomputed == [True, True, False, False, True, False]  # per stage: its first 2, its first 1
    assert model.backbone.final_layernorm.pipeline_stage == 1
    assert model.lm_head.pipeline_stage == model.loss.pipeline_stage == 1


def run_cli(*args):
    proc = subprocess.run([sys.executable, os.path.join(REPO, 'run_mindformer.py'), *args], cwd=REPO,
                          capture_output=True, text=True, timeout=600)
    return proc.returncode, proc.stderr


def test_cli_refuses_a_layout_that_does_not_fit_before_building(tmp_path):
    code, stderr = run_cli('--config', TINY, '--run_mode', 'train', '--output_dir', str(tmp_path),
                           '--parallel_config.model_parallel', '2')
    assert code == 1
    lines = [line for line in stderr.splitlines() if line.startswith('run_mindformer.py: error')]
    assert len(lines) == 1 and 'model_parallel (2) x pipeline_stage (1) = 2 devices, but the job has 1' in lines[0]
    assert 'built GPT2LMHeadModel' not in stderr


def test_trainer_validates_before_the_model_is_built(tmp_path):
    from mindformers.tools.register import MindFormerConfig
    from mindformers.trainer import Trainer
    config = MindFormerConfig(TINY)
    config.output_dir = str(tmp_path)
    trainer = Trainer(args=config)
    trainer.set_parallel_config(data_parallel=1, model_parallel=4)
    with pytest.raises(ValueError, match=r'= 4 devices, but the job has 1'):
        trainer.evaluate()
    assert trainer.model is None
