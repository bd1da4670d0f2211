"""Unknown keys, unsupported MindFormers switches and bad runner counts are refused with the dotted key, the file and
the closest valid names (YAML, --options / --a.b overrides, model config classes, AutoConfig); every shipped YAML
still loads; run_mindformer.py exits 1 for a bad YAML file and 2 for a bad command line; the CLI sets max_new_tokens."""
import glob
import os
import textwrap

import pytest

import run_mindformer
from mindformers import AutoConfig, AutoModel, GenerationConfig, GPT2Config
from mindformers.core.parallel_config import build_parallel_config
from mindformers.tools.build import build_model_config
from mindformers.tools.register import (ConfigError, MindFormerConfig, MindFormerRegister, MindFormerModuleType,
                                        validate_run_config)
from mindformers.trainer import Trainer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, 'configs', 'gpt2', 'run_gpt2_tiny.yaml')
SHIPPED = sorted(glob.glob(os.path.join(REPO, 'configs', '**', '*.yaml'), recursive=True) +
                 glob.glob(os.path.join(REPO, 'research', '**', '*.yaml'), recursive=True))


def tiny_with(tmp_path, text):
    """A YAML file that inherits the tiny GPT-2 run and adds `text`."""
    path = tmp_path / 'run.yaml'
    path.write_text(f"base_config: {TINY}\n" + textwrap.dedent(text), encoding='utf-8')
    return str(path)


def run(argv, capsys):
    """run_mindformer.main in this process: (exit code, stderr lines that are not MindSpore warnings)."""
    try:
        code = run_mindformer.main(argv)
    except SystemExit as exit_:
        code = exit_.code
    err = capsys.readouterr().err
    return code, [line for line in err.splitlines() if line.startswith('run_mindformer.py:')]


@pytest.mark.parametrize('path', SHIPPED, ids=lambda p: os.path.relpath(p, REPO))
def test_every_shipped_yaml_loads_and_builds_its_model_config(path):
    config = validate_run_config(MindFormerConfig(path))
    parallel = build_parallel_config(config.get('parallel_config'), config.get('recompute_config'))
    model_config = build_model_config(config.model.model_config, {'parallel_config': parallel})
    assert type(model_config).__name__ == config.model.model_config.type
    assert model_config.num_layers >= 1


@pytest.mark.parametrize('text, dotted, closest', [
    ("runer_config: {epochs: 1}\n", 'runer_config', 'runner_config'),
    ("context: {mod: 0}\n", 'context.mod', 'mode'),
    ("parallel: {gradient_mean: True}\n", 'parallel.gradient_mean', 'gradients_mean'),
    ("parallel_config: {data_paralel: 1}\n", 'parallel_config.data_paralel', 'data_parallel'),
    ("recompute_config: {recomput: True}\n", 'recompute_config.recomput', 'recompute'),
    ("runner_config: {batchsize: 2}\n", 'runner_config.batchsize', 'batch_size'),
    ("trainer: {model_nam: x}\n", 'trainer.model_nam', 'model_name'),
    ("model: {model_config: {num_head: 8}}\n", 'model.model_config.num_head', 'num_heads'),
    ("generation: {max_new_token: 5}\n", 'generation.max_new_token', 'max_new_tokens'),
    ("optimizer: {betta1: 0.8}\n", 'optimizer.betta1', 'beta1'),
    ("lr_schedule: {warmup_ration: 0.1}\n", 'lr_schedule.warmup_ration', 'warmup_ratio'),
    ("runner_wrapper: {use_clip_gard: True}\n", 'runner_wrapper.use_clip_gard', 'use_clip_grad'),
    ("processor: {tokenizer: {unk_tokn: x}}\n", 'processor.tokenizer.unk_tokn', 'unk_token'),
    ("train_dataset_task: {dataset_config: {drop_remaindr: True}}\n",
     'train_dataset_task.dataset_config.drop_remaindr', 'drop_remainder'),
    ("train_dataset_task: {dataset_config: {data_loader: {shufle: True}}}\n",
     'train_dataset_task.dataset_config.data_loader.shufle', 'shuffle'),
    ("callbacks: [{type: MFLossMonitor, per_print_time: 1}]\n", 'callbacks[0].per_print_time', 'per_print_times'),
])
def test_unknown_key_names_dotted_key_file_and_closest(tmp_path, text, dotted, closest):
    path = tiny_with(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        validate_run_config(MindFormerConfig(path))
    message = str(err.value)
    assert message.startswith(f"{path}: ") and f"unknown key '{dotted}'" in message, message
    assert f"did you mean {closest}" in message, message


@pytest.mark.parametrize('text, needle', [
    ("parallel_config: {use_seq_parallel: True}\n", 'parallel_config.use_seq_parallel=True is not supported'),
    ("parallel_config: {expert_parallel: 2}\n", 'parallel_config.expert_parallel=2 is not supported'),
    ("parallel_config: {gradient_aggregation_group: 8}\n", 'parallel_config.gradient_aggregation_group=8'),
    ("parallel_config: {micro_batch_interleave_num: 2}\n", 'parallel_config.micro_batch_interleave_num=2'),
    ("recompute_config: {select_recompute: True}\n", 'recompute_config.select_recompute=True is not supported'),
    ("recompute_config: {mp_comm_recompute: False}\n", 'recompute_config.mp_comm_recompute=False'),
    ("recompute_config: {recompute_slice_activation: True}\n", 'recompute_config.recompute_slice_activation'),
    ("recompute_config: {parallel_optimizer_comm_recompute: True}\n", 'parallel_optimizer_comm_recompute=True'),
    ("runner_config: {sink_mode: True}\n", 'runner_config.sink_mode=True is not supported'),
    ("runner_config: {sink_size: 2}\n", 'runner_config.sink_size=2 is not supported'),
    ("trainer: {type: GeneralTaskTrainer}\n", "trainer.type 'GeneralTaskTrainer' is not supported"),
    ("profile: True\n", 'profile=True is not supported'),
    ("remote_save_url: obs://bucket/run\n", "remote_save_url='obs://bucket/run' is not supported"),
    ("moe_config: {expert_num: 8}\n", 'moe_config=', ),
    ("micro_batch_interleave_num: 2\n", 'micro_batch_interleave_num=2 is not supported'),
])
def test_unimplemented_switches_are_refused_unless_default(tmp_path, text, needle):
    with pytest.raises(ConfigError, match='not supported') as err:
        validate_run_config(MindFormerConfig(tiny_with(tmp_path, text)))
    assert needle in str(err.value)


def test_unimplemented_switches_at_their_defaults_are_accepted(tmp_path):
    path = tiny_with(tmp_path, """
        parallel_config: {use_seq_parallel: False, expert_parallel: 1, gradient_aggregation_group: 4,
                          micro_batch_interleave_num: 1}
        recompute_config: {recompute: False, select_recompute: False, parallel_optimizer_comm_recompute: False,
                           mp_comm_recompute: True, recompute_slice_activation: False}
        runner_config: {sink_mode: False, sink_size: -1}
        trainer: {type: CausalLanguageModelingTrainer, model_name: gpt2_tiny}
        profile: False
        profile_start_step: 1
        micro_batch_interleave_num: 1
        context: {enable_graph_kernel: False}
        parallel: {enable_alltoall: False}
    """)
    validate_run_config(MindFormerConfig(path))


def test_set_parallel_config_refuses_unimplemented_switches():
    with pytest.raises(ValueError, match='use_seq_parallel=True is not supported'):
        build_parallel_config({'use_seq_parallel': True})
    trainer = Trainer(args=TINY)
    trainer.set_parallel_config(expert_parallel=4)
    with pytest.raises(ValueError, match='expert_parallel=4 is not supported'):
        trainer._parallel_config()


@pytest.mark.parametrize('key, value', [('batch_size', 0), ('batch_size', -2), ('batch_size', 2.5),
                                        ('batch_size', True), ('epochs', 0), ('gradient_accumulation_steps', 0)])
def test_runner_counts_must_be_positive_integers(tmp_path, key, value):
    path = tiny_with(tmp_path, f"runner_config: {{{key}: {value}}}\n")
    with pytest.raises(ConfigError, match=rf"runner_config\.{key} must be a positive integer, got {value!r}"):
        validate_run_config(MindFormerConfig(path))
    with pytest.raises(ConfigError, match=rf"runner_config\.{key} must be a positive integer"):
        Trainer(args=path)  # the Trainer checks its config once, at construction


def test_sections_replaced_by_scalars_are_named(tmp_path):
    for text, needle in (("model: 3\n", "'model' must be a mapping"), ("runner_config: 5\n", "'runner_config' must be"),
                         ("callbacks: 3\n", 'callbacks must be a list'),
                         ("model: {model_config: 3}\n", 'model.model_config must be a mapping')):
        path = tmp_path / 'plain.yaml'
        path.write_text(text)
        with pytest.raises(ConfigError, match=needle):
            validate_run_config(MindFormerConfig(str(path)))


@pytest.mark.parametrize('name', MindFormerRegister.names(MindFormerModuleType.CONFIG))
def test_model_config_classes_refuse_unknown_fields(name):
    cls = MindFormerRegister.get_cls(MindFormerModuleType.CONFIG, name)
    with pytest.raises(TypeError, match=r"unknown field 'num_layer' \(did you mean num_layers"):
        cls(num_layer=2)


def test_generation_defaults_are_declared_fields():
    config = GPT2Config(top_k=3, top_p=0.9, do_sample=True, max_decode_length=64, repetition_penalty=1.1,
                        use_past=True, max_new_tokens=7)
    generation = GenerationConfig.from_model_config(config)
    assert (generation.top_k, generation.max_length, generation.max_new_tokens) == (3, 64, 7)
    assert GPT2Config.from_dict(config.to_dict()).max_new_tokens == 7


def test_auto_classes_refuse_unknown_overrides():
    with pytest.raises(TypeError, match=r"AutoConfig\.from_pretrained\('gpt2_tiny'\): unknown GPT2Config field "
                                        r"'num_head' \(did you mean num_heads"):
        AutoConfig.from_pretrained('gpt2_tiny', num_head=8)
    with pytest.raises(TypeError, match=r"AutoModel\.from_pretrained\('gpt2_tiny'\): unknown GPT2Config field"):
        AutoModel.from_pretrained('gpt2_tiny', num_head=8)
    assert AutoConfig.from_pretrained('gpt2_tiny', num_heads=2).num_heads == 2


def test_explicit_max_length_wins_over_a_model_default_max_new_tokens():
    generation = GenerationConfig.from_model_config(GPT2Config(max_new_tokens=7))
    assert generation.update(max_length=30).max_new_tokens is None and generation.max_length == 30
    generation = GenerationConfig.from_model_config(GPT2Config(max_new_tokens=7))
    assert generation.update(max_length=30, max_new_tokens=4).max_new_tokens == 4
    with pytest.raises(TypeError, match=r"unknown generation option 'max_new_token' \(did you mean max_new_tokens"):
        GenerationConfig(max_new_token=3)


# ----------------------------------------------------------------- run_mindformer.py exit codes
@pytest.mark.parametrize('text, needle', [
    ("runer_config: {epochs: 1}\n", "unknown key 'runer_config' (did you mean runner_config"),
    ("runner_config: {batch_size: 0}\n", 'runner_config.batch_size must be a positive integer, got 0'),
    ("model: {model_config: {num_head: 8}}\n", "unknown key 'model.model_config.num_head'"),
    ("a: [1\n", 'YAML syntax error'),
])
def test_cli_bad_yaml_file_exits_1_naming_the_file(tmp_path, capsys, text, needle):
    path = tmp_path / 'run.yaml'
    path.write_text(text if text.startswith('a:') else f"base_config: {TINY}\n{text}")
    code, lines = run(['--config', str(path), '--output_dir', str(tmp_path / 'out')], capsys)
    assert code == 1
    assert len(lines) == 1 and str(path) in lines[0] and needle in lines[0], lines


@pytest.mark.parametrize('args, needle', [
    (['--options', 'model=3'], "'model' must be a mapping with model_config and arch, got 3"),
    (['--options', 'runner_config.batch_size=0'], 'runner_config.batch_size must be a positive integer, got 0'),
    (['--runner_config.batch_size', '0'], 'runner_config.batch_size must be a positive integer, got 0'),
    (['--options', 'runner_config.batchsize=2'], "unknown key 'runner_config.batchsize' (did you mean batch_size"),
    (['--model.model_config.num_head', '8'], "unknown key 'model.model_config.num_head' (did you mean num_heads"),
    (['--options', 'runer_config.epochs=2'], "no section 'runer_config'"),
    (['--generation.max_new_token', '5'], "unknown key 'generation.max_new_token' (did you mean max_new_tokens"),
    (['--runner_config.sink_mode', 'True'], 'runner_config.sink_mode=True is not supported'),
    (['--options', 'optimizer.betta1=0.5'], "unknown key 'optimizer.betta1' (did you mean beta1"),
])
def test_cli_bad_override_exits_2_with_one_line(tmp_path, capsys, args, needle):
    code, lines = run(['--config', TINY, '--output_dir', str(tmp_path), *args], capsys)
    assert code == 2
    assert len(lines) == 1 and needle in lines[0], lines
    assert not os.path.exists(tmp_path / 'checkpoint')


@pytest.mark.slow
def test_cli_sets_max_new_tokens_from_generation_and_model_config(tmp_path, capsys, monkeypatch):
    """`--generation.max_new_tokens` (passed to predict) and `model.model_config.max_new_tokens` (the model's
    default) both work; the generation section wins when both are set. min_new_tokens keeps EOS out of the count."""
    from mindformers.models.gpt2 import GPT2LMHeadModel
    new_tokens = []
    generate = GPT2LMHeadModel.generate

    def counting_generate(self, input_ids, *args, **kwargs):
        outputs = generate(self, input_ids, *args, **kwargs)
        new_tokens.extend(len(out) - len(ids) for ids, out in zip(input_ids, outputs))
        return outputs

    monkeypatch.setattr(GPT2LMHeadModel, 'generate', counting_generate)
    base = ['--config', TINY, '--run_mode', 'predict', '--predict_data', 'ROMEO:', '--output_dir', str(tmp_path),
            '--model.model_config.num_layers', '1', '--generation.min_new_tokens', '3']
    for extra, expected in ((['--generation.max_new_tokens', '5'], 5),
                            (['--model.model_config.max_new_tokens', '3'], 3),
                            (['--model.model_config.max_new_tokens', '3', '--generation.max_new_tokens', '6'], 6)):
        new_tokens.clear()
        code, lines = run(base + extra, capsys)
        assert code == 0, lines
        assert new_tokens == [expected], (extra, new_tokens)
