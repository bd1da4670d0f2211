"""LlamaProcessor."""
from mindformers.models.base_processor import BaseProcessor
from mindformers.tools.register import MindFormerRegister, MindFormerModuleType


@MindFormerRegister.register(MindFormerModuleType.PROCESSOR)
class LlamaProcessor(BaseProcessor):
    """Tokenizes text for LLaMA (defaults: pad to `max_length` 128, on the tokenizer's side, MindSpore tensors)."""

    def __init__(self, tokenizer=None, max_length=128, padding='max_length', return_tensors='ms'):
        super().__init__(tokenizer, max_length, padding, return_tensors)
