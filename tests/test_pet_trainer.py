"""PET in the Trainer: `pet_method` picks the config or applies the defaults, only the delta trains (no optimizer
state for the frozen base) and is saved, base + delta loads back bit-exactly, resume continues exactly, and a delta
that does not fit the model (rank, targets, alpha, base weights, no PET) is refused naming what differs."""
import json
import os

import numpy as np
import pytest
import mindspore as ms

from helpers.registry import register_bias_only_pet
from helpers.tiny import counting_dataset, tiny_gpt2
from helpers.training import StopAt
from mindformers import Trainer, TrainingArguments
from mindformers.core.callback import CheckpointMonitor
from mindformers.pet import LoraConfig
from mindformers.tools.checkpoint import CheckpointError, load_checkpoint_file, save_checkpoint_atomic
from mindformers.trainer.delta import load_weights

EPOCHS, STEPS_PER_EPOCH = 2, 8  # 32 samples in batches of 4
LORA_A, LORA_B = 'mindpet_delta_lora_a', 'mindpet_delta_lora_b'


def lora_args(output_dir, **kwargs):
    return TrainingArguments(output_dir=str(output_dir), batch_size=4, num_train_epochs=EPOCHS, learning_rate=2e-2,
                             save_steps=3, save_total_limit=10, logging_steps=100, **kwargs)


def lora_train(output_dir, seed=0, callbacks=None, resume=None):
    model = tiny_gpt2(seed)
    trainer = Trainer(model=model, pet_method='lora', args=lora_args(output_dir), train_dataset=counting_dataset(4, 32),
                      callbacks=callbacks)
    return model, trainer.train(resume_training=resume)


@pytest.fixture(scope='module')
def lora_run(tmp_path_factory):
    """A LoRA finetune of the tiny GPT-2 (the default targets) saving delta checkpoints, and whole ones beside them
    through a second CheckpointMonitor with save_trainable_params=False."""
    root = tmp_path_factory.mktemp('lora')
    base = {p.name: p.asnumpy().copy() for p in tiny_gpt2(0).get_parameters()}
    whole = CheckpointMonitor(prefix='whole', directory=str(root / 'whole'), save_checkpoint_steps=100,
                              save_trainable_params=False)
    model, state = lora_train(root / 'run', callbacks=[whole])
    rank_dir = root / 'run' / 'checkpoint' / 'rank_0'
    delta = str(rank_dir / json.loads((rank_dir / 'meta.json').read_text())['last_ckpt_file'])
    return {'root': root, 'model': model, 'state': state, 'base': base, 'delta': delta, 'whole': whole.last_path}


def lora_model(seed=0, **pet):
    """The tiny GPT-2 with LoRA (defaults: rank 8, alpha 16 on qkv_proj), its base drawn under `seed`."""
    return tiny_gpt2(seed, pet_config=LoraConfig(**pet))


# ------------------------------------------------------------------------------------------------ pet_method
def test_pet_method_with_a_model_name_picks_its_lora_config(capsys):
    assert Trainer(model='gpt2', pet_method='lora').config.trainer.model_name == 'gpt2_lora'
    config = Trainer(model='gpt2_tiny', pet_method='lora').config
    assert config.trainer.model_name == 'gpt2_tiny_lora'
    assert config.model.model_config.pet_config.to_dict() == {
        'pet_type': 'lora', 'lora_rank': 8, 'lora_alpha': 16, 'lora_dropout': 0.0, 'target_modules': ['qkv_proj']}
    # no llama_13b_lora config: the base config with LoRA's defaults, logged with the targets they mean
    config = Trainer(model='llama_13b', pet_method='lora').config
    assert config.trainer.model_name == 'llama_13b' and config.model.model_config.pet_config == {'pet_type': 'lora'}
    err = capsys.readouterr().err
    assert "has no model.model_config.pet_config; using pet_config {pet_type: lora}" in err
    assert "targets: LlamaForCausalLM's defaults ['q_proj', 'v_proj']" in err


def test_pet_method_on_a_model_instance_applies_the_family_defaults(capsys):
    model = tiny_gpt2(0)
    Trainer(model=model, pet_method='lora', args=TrainingArguments(output_dir='unused'))
    err = capsys.readouterr().err
    assert "the given GPT2LMHeadModel had no PET; applied LoraConfig defaults" in err
    assert "targets: GPT2LMHeadModel's defaults ['qkv_proj']" in err
    assert isinstance(model.pet_config, LoraConfig) and model.pet_config.lora_rank == 8
    trainable = sorted(p.name for p in model.trainable_params())
    assert trainable == sorted(model.pet_parameter_names) == [
        f'backbone.layers.{i}.attention.qkv_proj.{n}' for i in (0, 1) for n in (LORA_A, LORA_B)]
    # rank x (in + out) per adapted Linear: 8 x (32 + 96) for each of the 2 fused attention projections
    assert model.num_parameters(trainable_only=True) == 2 * 8 * (32 + 96)


@pytest.fixture
def bias_only_type(clean_registry):
    return register_bias_only_pet()


def test_other_registered_pet_types_are_taken_by_name(bias_only_type):
    model = tiny_gpt2(0)
    Trainer(model=model, pet_method=bias_only_type, args=TrainingArguments(output_dir='unused'))
    assert model.pet_config.pet_type == bias_only_type
    assert {p.name for p in model.trainable_params()} == {p.name for p in model.get_parameters()
                                                         if p.name.endswith('bias')}


def test_a_pet_method_that_is_unknown_or_disagrees_is_refused(bias_only_type):
    with pytest.raises(ValueError, match=r"pet_method: unknown pet_type 'lorra'; supported: .*lora"):
        Trainer(model='gpt2_tiny', pet_method='lorra')
    with pytest.raises(ValueError, match=rf"pet_method '{bias_only_type}' disagrees with model.model_config."
                                         rf"pet_config of .*run_gpt2_tiny_lora.yaml \(pet_type 'lora'\)"):
        Trainer(model='gpt2_tiny_lora', pet_method=bias_only_type)
    with pytest.raises(ValueError, match=r"disagrees with the given GPT2LMHeadModel's PET \(pet_type 'lora'\)"):
        Trainer(model=lora_model(), pet_method=bias_only_type, args=TrainingArguments(output_dir='unused'))


# ------------------------------------------------------------------------------------------------ only the delta
def test_only_the_delta_trains(lora_run):
    model, state, base = lora_run['model'], lora_run['state'], lora_run['base']
    delta = sorted(model.pet_parameter_names)
    assert sorted(p.name for p in state.optimizer.parameters) == delta
    moments = sorted(p.name for p in state.train_network.get_parameters() if p.name.startswith(('adam_m.', 'adam_v.')))
    assert moments == sorted(f'{kind}.{name}' for kind in ('adam_m', 'adam_v') for name in delta)
    for param in model.get_parameters():
        if param.name not in delta:
            np.testing.assert_array_equal(param.asnumpy(), base[param.name], err_msg=param.name)
    assert len(state.losses) == EPOCHS * STEPS_PER_EPOCH
    assert np.mean(state.losses[-4:]) < state.losses[0] - 0.05


def test_checkpoints_hold_the_delta_and_meta_json_says_so(lora_run):
    model, path = lora_run['model'], lora_run['delta']
    delta = set(model.pet_parameter_names)
    saved = load_checkpoint_file(path)
    assert set(saved) == delta | {f'{k}.{n}' for k in ('adam_m', 'adam_v') for n in delta} | \
        {'epoch_num', 'step_num', 'global_step', 'overflow'}
    meta = json.loads((lora_run['root'] / 'run' / 'checkpoint' / 'rank_0' / 'meta.json').read_text())
    entry = meta['checkpoints'][-1]
    assert entry['global_step'] == EPOCHS * STEPS_PER_EPOCH and os.path.basename(path) == entry['file']
    assert entry['delta']['pet_config'] == model.pet_config.to_dict()
    base = entry['delta']['base']
    assert base['checkpoint'] == '' and base['parameters'] == len(base_names(model))
    matrices = [p.name for p in model.get_parameters() if not p.requires_grad and len(p.shape) == 2]
    assert sorted(base['sample']) == sorted(matrices) and all(len(v) == 8 for v in base['sample'].values())
    # save_trainable_params=False: a whole checkpoint, every parameter
    whole = load_checkpoint_file(lora_run['whole'])
    assert {p.name for p in model.get_parameters()} <= set(whole)


def base_names(model):
    return [p.name for p in model.get_parameters() if not p.requires_grad]


def test_base_plus_delta_loads_back_bit_exactly(lora_run, tmp_path):
    """The base from checkpoint_name_or_path (another seed would draw other weights), the delta loaded over it."""
    trained = lora_run['model']
    base_file = str(tmp_path / 'base.ckpt')
    save_checkpoint_atomic({n: lora_run['base'][n] for n in base_names(trained)}, base_file)
    model = tiny_gpt2(7, pet_config={'pet_type': 'lora'}, checkpoint_name_or_path=base_file)
    assert load_weights(model, load_checkpoint_file(lora_run['delta']), lora_run['delta']) == 'delta'
    for param, reference in zip(model.get_parameters(), trained.get_parameters()):
        assert param.name == reference.name
        np.testing.assert_array_equal(param.asnumpy(), reference.asnumpy(), err_msg=param.name)
    probe = ms.Tensor(np.arange(2, 18, dtype=np.int32)[None])
    model.set_train(False)
    trained.set_train(False)
    np.testing.assert_array_equal(model(probe).asnumpy(), trained(probe).asnumpy())


@pytest.mark.slow
def test_resume_of_a_delta_run_gives_the_uninterrupted_losses(lora_run, tmp_path):
    reference = lora_run['state'].losses
    _, first = lora_train(tmp_path, callbacks=[StopAt(7)])
    np.testing.assert_array_equal(first.losses, reference[:7])
    _, resumed = lora_train(tmp_path, resume=True)  # the newest checkpoint is step 7's, a delta
    assert resumed.initial_step == 7
    np.testing.assert_allclose(resumed.losses, reference[7:], rtol=0, atol=1e-6)


# ------------------------------------------------------------------------------------------------ refusals
@pytest.mark.parametrize('model_args, needle', [
    ({'lora_rank': 4}, r"shape mismatch backbone\.layers\.0\.attention\.qkv_proj\.mindpet_delta_lora_a "
                       r"\(checkpoint \(8, 32\), model \(4, 32\)\)"),
    ({'target_modules': ['o_proj']}, r"missing backbone\.layers\.0\.attention\.o_proj\.mindpet_delta_lora_a.*; "
                                     r"not in this model backbone\.layers\.0\.attention\.qkv_proj\."),
    ({'lora_alpha': 32}, r"pet_config\.lora_alpha is 16 in the checkpoint, 32 here"),
])
def test_a_delta_for_another_rank_target_or_alpha_is_refused(lora_run, model_args, needle):
    path = lora_run['delta']
    with pytest.raises(CheckpointError, match=rf"delta checkpoint {path} does not fit GPT2LMHeadModel with lora "
                                              rf"\(.*\): .*{needle}.*; it was saved by a lora \(lora_rank 8, "):
        load_weights(lora_model(**model_args), load_checkpoint_file(path), path)


def test_a_delta_for_other_base_weights_is_refused(lora_run, tmp_path):
    path = lora_run['delta']
    with pytest.raises(CheckpointError, match=r"was trained on other base weights than this model holds: "
                                              r"backbone\.\S+ differs \(trained on \[.*\], here \[.*\]\) \(\+\d+ "
                                              r"more\); it was trained on a fresh model's initial weights"):
        load_weights(lora_model(seed=1), load_checkpoint_file(path), path)
    # resuming over other base weights is refused before anything trains
    rank_dir = lora_run['root'] / 'run' / 'checkpoint' / 'rank_0'
    step15 = next(e['file'] for e in json.loads((rank_dir / 'meta.json').read_text())['checkpoints']
                  if e['global_step'] == 15)
    with pytest.raises(CheckpointError, match='was trained on other base weights'):
        lora_train(tmp_path, seed=1, resume=str(rank_dir / step15))


def test_a_delta_into_a_model_without_pet_is_refused(lora_run):
    path = lora_run['delta']
    with pytest.raises(CheckpointError, match=r"is a delta checkpoint of a lora \(lora_rank 8, .*\) run \(its "
                                              r"trainable parameters only\), but GPT2LMHeadModel has no PET delta: "
                                              r"build the model with that pet_config"):
        load_weights(tiny_gpt2(0), load_checkpoint_file(path), path)
    with pytest.raises(CheckpointError, match=r"it holds only a PET delta: checkpoint_name_or_path takes the base "
                                              r"weights, and the delta loads over them as load_checkpoint"):
        tiny_gpt2(0, pet_config={'pet_type': 'lora'}, checkpoint_name_or_path=path)


def test_an_optimizer_holding_frozen_parameters_is_refused(tmp_path):
    from mindformers.core.optim import AdamWeightDecay
    model = lora_model()
    optimizer = AdamWeightDecay(model.get_parameters(), learning_rate=1e-3)
    trainer = Trainer(model=model, args=lora_args(tmp_path), train_dataset=counting_dataset(4, 8), optimizers=optimizer)
    with pytest.raises(ValueError, match=r"optimizers: the optimizer updates 28 frozen parameter\(s\) \(e\.g\. "
                                         r"backbone\..*\); build it over model\.trainable_params\(\)"):
        trainer.train()
