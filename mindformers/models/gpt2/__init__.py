"""GPT-2: config, model, tokenizer, processor (weight conversion: `mindformers.models.gpt2.convert_gpt2`)."""
from mindformers.tools.register import FamilySpec, register_family

from .gpt2_config import GPT2Config
from .modeling_gpt2 import GPT2Model, GPT2LMHeadModel
from .gpt2_tokenizer import GPT2Tokenizer, GPT2TokenizerFast
from .gpt2_processor import GPT2Processor

register_family(FamilySpec(
    name='gpt2', config=GPT2Config, model=GPT2LMHeadModel, tokenizer=GPT2Tokenizer, processor=GPT2Processor,
    converter='mindformers.models.gpt2.convert_gpt2', hf_model_types=('gpt2',), yaml_dirs=('configs/gpt2',)))

__all__ = ['GPT2Config', 'GPT2Model', 'GPT2LMHeadModel', 'GPT2Tokenizer', 'GPT2TokenizerFast', 'GPT2Processor']
