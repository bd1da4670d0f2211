"""LLaMA / LLaMA-2: config, model, tokenizer, processor (weight conversion: `mindformers.models.llama.convert_llama`)."""
from mindformers.tools.register import FamilySpec, register_family

from .llama_config import LlamaConfig
from .modeling_llama import LlamaModel, LlamaForCausalLM
from .llama_tokenizer import LlamaTokenizer, LlamaTokenizerFast
from .llama_processor import LlamaProcessor

register_family(FamilySpec(
    name='llama', config=LlamaConfig, model=LlamaForCausalLM, tokenizer=LlamaTokenizer, processor=LlamaProcessor,
    converter='mindformers.models.llama.convert_llama', hf_model_types=('llama',),
    yaml_dirs=('configs/llama', 'configs/llama2')))

__all__ = ['LlamaConfig', 'LlamaModel', 'LlamaForCausalLM', 'LlamaTokenizer', 'LlamaTokenizerFast', 'LlamaProcessor']
