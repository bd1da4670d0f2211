"""PanGu-alpha: config, model, tokenizer (weight conversion: `mindformers.models.pangualpha.convert_pangualpha`)."""
from .pangualpha_config import PanguAlphaConfig
from .modeling_pangualpha import PanguAlphaModel, PanguAlphaHeadModel
from .pangualpha_tokenizer import PanguAlphaTokenizer, PanguAlphaProcessor

__all__ = ['PanguAlphaConfig', 'PanguAlphaModel', 'PanguAlphaHeadModel', 'PanguAlphaTokenizer',
           'PanguAlphaProcessor']
