"""GPT-2: config, model, tokenizer, processor (weight conversion: `mindformers.models.gpt2.convert_gpt2`)."""
from .gpt2_config import GPT2Config
from .modeling_gpt2 import GPT2Model, GPT2LMHeadModel
from .gpt2_tokenizer import GPT2Tokenizer, GPT2TokenizerFast
from .gpt2_processor import GPT2Processor

__all__ = ['GPT2Config', 'GPT2Model', 'GPT2LMHeadModel', 'GPT2Tokenizer', 'GPT2TokenizerFast', 'GPT2Processor']
