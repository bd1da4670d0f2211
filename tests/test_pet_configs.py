"""The shipped LoRA configs as MindFormers users write them: MindFormers r1.0's hyper-parameters on our module names
(each config's target_modules shown on a tiny model of its family), and a tiny LoRA config per family that resolves
in AutoConfig, AutoModel, pipeline and Trainer."""
import pytest

from mindformers import AutoConfig, AutoModel, Trainer, pipeline
from mindformers.pet import LoraConfig, LoRALinear
from helpers.tiny import FAMILIES

QKVO = ('self_attn.q_proj', 'self_attn.k_proj', 'self_attn.v_proj', 'self_attn.o_proj')
# name: (tiny stand-in, (lora_rank, lora_alpha, lora_dropout) of MindFormers r1.0, what each layer adapts)
SHIPPED = {
    'gpt2_lora': ('gpt2_tiny', (64, 128, 0.1), ('backbone', ('attention.qkv_proj',))),
    'llama_7b_lora': ('llama_tiny', (16, 16, 0.05), ('model', QKVO)),
    'llama2_7b_lora': ('llama_tiny', (16, 16, 0.05), ('model', QKVO)),
    'llama2_13b_lora': ('llama_tiny', (16, 16, 0.05), ('model', QKVO)),
    'glm_6b_lora': ('glm_tiny', (8, 32, 0.1), ('transformer', ('attention.query_key_value',))),
    'glm2_6b_lora': ('glm2_tiny', (8, 32, 0.1), ('model', QKVO[:3])),
}


def adapted(model):
    return [path for path, cell in model.cells_and_names() if isinstance(cell, LoRALinear)]


@pytest.mark.parametrize('name', sorted(SHIPPED))
def test_shipped_lora_config_targets_on_a_tiny_model_of_its_family(name):
    tiny, hyper, (root, per_layer) = SHIPPED[name]
    config = AutoConfig.from_pretrained(name)
    pet = config.pet_config
    assert isinstance(pet, LoraConfig) and (pet.lora_rank, pet.lora_alpha, pet.lora_dropout) == hyper
    assert Trainer(model=name).config.trainer.model_name == name
    model = AutoModel.from_config(AutoConfig.from_pretrained(tiny, pet_config=pet))
    layers = model.config.num_layers
    assert adapted(model) == [f'{root}.layers.{i}.{leaf}' for i in range(layers) for leaf in per_layer]


@pytest.mark.parametrize('family', FAMILIES)
def test_tiny_lora_config_resolves_everywhere(family):
    name = f'{family}_tiny_lora'
    config = AutoConfig.from_pretrained(name)
    assert isinstance(config.pet_config, LoraConfig) and config.pet_config.lora_rank == 8
    model = AutoModel.from_config(name)
    cells = dict(model.cells_and_names())
    targets = set(config.pet_config.target_modules)
    assert adapted(model) and all(path.rsplit('.', 1)[-1] in targets for path in adapted(model))
    # only the LoRA matrices train: rank x (in + out) for each adapted Linear
    assert sorted(p.name for p in model.trainable_params()) == sorted(model.pet_parameter_names)
    assert model.num_parameters(trainable_only=True) == sum(
        8 * (cells[path].in_features + cells[path].out_features) for path in adapted(model))
    assert set(Trainer(model=name).config.model.model_config.pet_config.target_modules) == targets
    generator = pipeline('text_generation', model=model, tokenizer=name)  # the name's tokenizer
    assert isinstance(generator.model.pet_config, LoraConfig) and generator.tokenizer is not None


def test_ptuning2_config_has_mindformers_keys():
    """configs/glm2/run_glm2_6b_ptuning2.yaml with MindFormers' Ptuning2Config keys and r1.0's values. Its pet_type
    builds once Ptuning2Config is registered (mindformers.pet's P-Tuning v2, merged separately); this checks the
    keys as written."""
    from mindformers import MindFormerConfig
    from mindformers.models.model_book import find_config
    config = MindFormerConfig(find_config('glm2_6b_ptuning2'))
    assert config.model.model_config.pet_config.to_dict() == {
        'pet_type': 'ptuning2', 'pre_seq_len': 128, 'prefix_projection': False, 'projection_dim': 128,
        'dropout_prob': 0.0}
    assert config.model.model_config.seq_length == 193 and config.lr_schedule.learning_rate == 5e-3
    assert config.train_dataset_task.type == 'KeyWordGenDataset' and config.train_dataset.data_loader.version == 2
