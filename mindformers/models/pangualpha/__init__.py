"""PanGu-alpha: config, model, tokenizer (weight conversion: `mindformers.models.pangualpha.convert_pangualpha`)."""
from mindformers.tools.register import FamilySpec, register_family

from .pangualpha_config import PanguAlphaConfig
from .modeling_pangualpha import PanguAlphaModel, PanguAlphaHeadModel
from .pangualpha_tokenizer import PanguAlphaTokenizer, PanguAlphaProcessor

register_family(FamilySpec(
    name='pangualpha', config=PanguAlphaConfig, model=PanguAlphaHeadModel, tokenizer=PanguAlphaTokenizer,
    processor=PanguAlphaProcessor, converter='mindformers.models.pangualpha.convert_pangualpha',
    hf_model_types=('gpt_pangu',), yaml_dirs=('configs/pangualpha',)))

__all__ = ['PanguAlphaConfig', 'PanguAlphaModel', 'PanguAlphaHeadModel', 'PanguAlphaTokenizer',
           'PanguAlphaProcessor']
