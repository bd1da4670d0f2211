"""GPT2Processor."""
from mindformers.models.base_processor import BaseProcessor
from mindformers.tools.register import MindFormerRegister, MindFormerModuleType


@MindFormerRegister.register(MindFormerModuleType.PROCESSOR)
class GPT2Processor(BaseProcessor):
    """Tokenizes text for GPT-2 (defaults: pad to `max_length` 128, MindSpore tensors): `processor("hello!")['text']`
    is a [1, 128] tensor starting `50256 31373 0 50256` with GPT-2's files (the tokenizer's BOS/EOS, then padding)."""

    def __init__(self, tokenizer=None, max_length=128, padding='max_length', return_tensors='ms'):
        super().__init__(tokenizer, max_length, padding, return_tensors)
