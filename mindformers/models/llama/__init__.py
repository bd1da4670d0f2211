"""LLaMA / LLaMA-2: config, model, tokenizer, processor (weight conversion: `mindformers.models.llama.convert_llama`)."""
from .llama_config import LlamaConfig
from .modeling_llama import LlamaModel, LlamaForCausalLM

__all__ = ['LlamaConfig', 'LlamaModel', 'LlamaForCausalLM']
