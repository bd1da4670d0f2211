"""Parameter-efficient tuning: MindPet's algorithms (LoRA, Prefix-Tuning, P-Tuning v2, Adapter, LowRankAdapter,
BitFit, R-Drop) applied to any model in place, with MindFormers' `pet_config` keys and parameter names
(`*.mindpet_delta_<algorithm>_*`)."""
from mindformers.pet.config import LoraConfig, PetConfig, pet_config_from_dict, pet_types, register_pet_config
from mindformers.pet.freeze import freeze_delta, freeze_modules
from mindformers.pet.lora import LoRALinear
from mindformers.pet.model import apply_pet, default_targets, forget_compiled, merge_pet, register_pet_method
from mindformers.pet.prefix import PrefixTuningConfig, Ptuning2Config, set_prefix_visible
from mindformers.pet.targets import select_linears
from mindformers.pet.adapter import AdapterConfig, AdapterLinear, LowRankAdapterConfig, LowRankAdapterLinear
from mindformers.pet.bitfit import BitFitConfig
from mindformers.pet.rdrop import RDropConfig, RDropLoss

__all__ = ['LoraConfig', 'PetConfig', 'pet_config_from_dict', 'pet_types', 'register_pet_config', 'freeze_delta',
           'freeze_modules', 'LoRALinear', 'apply_pet', 'default_targets', 'forget_compiled', 'merge_pet',
           'register_pet_method', 'select_linears', 'AdapterConfig', 'AdapterLinear', 'LowRankAdapterConfig',
           'LowRankAdapterLinear', 'BitFitConfig', 'RDropConfig', 'RDropLoss', 'PrefixTuningConfig', 'Ptuning2Config',
           'set_prefix_visible']
