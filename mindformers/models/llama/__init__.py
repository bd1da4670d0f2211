"""LLaMA / LLaMA-2: config, model, tokenizer, processor (weight conversion: `mindformers.models.llama.convert_llama`)."""
from .llama_config import LlamaConfig
from .modeling_llama import LlamaModel, LlamaForCausalLM
from .llama_tokenizer import LlamaTokenizer, LlamaTokenizerFast
from .llama_processor import LlamaProcessor

__all__ = ['LlamaConfig', 'LlamaModel', 'LlamaForCausalLM', 'LlamaTokenizer', 'LlamaTokenizerFast', 'LlamaProcessor']
