"""BitFit: only the biases train (MindPet's `freeze_delta(model, 'bitfit')`: the parameters whose names end in
`bias`, those of the Linears and of the LayerNorms); nothing is added to the model."""
import dataclasses
from typing import ClassVar

from mindformers.pet.config import PetConfig, register_pet_config
from mindformers.pet.model import register_pet_method


@dataclasses.dataclass
class BitFitConfig(PetConfig):
    """BitFit: train the biases only (no other keys than freeze_include / freeze_exclude)."""

    pet_type: ClassVar[str] = 'bitfit'


def apply_bitfit(model, config):
    """Check that `model` has biases to train; adds nothing (returns no names)."""
    if not any(param.name.endswith('bias') for param in model.get_parameters()):
        raise ValueError(f"pet_type bitfit trains only biases, and {type(model).__name__} has none (no bias in any "
                         f"Linear or norm): choose another pet_type, e.g. lora or adapter")
    return []


register_pet_config(BitFitConfig)
register_pet_method(BitFitConfig, apply_bitfit, freeze_mode='bitfit')
