"""BaseProcessor: turns raw inputs into model inputs (for text models: a tokenizer with fixed padding)."""
import json
import os

from mindformers.tools.build import build_tokenizer


class BaseProcessor:
    """Holds a tokenizer (an object, or a config mapping with `type`) and pads/truncates to `max_length`.

    `processor(text or list of text)` returns `{'text': input_ids}` (int32, [batch, max_length] when `max_length`
    is set) in the `return_tensors` format ('ms', 'np' or None for lists)."""

    def __init__(self, tokenizer=None, max_length=None, padding='max_length', return_tensors='ms'):
        if isinstance(tokenizer, dict):
            tokenizer = build_tokenizer(tokenizer, where='processor.tokenizer')
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.padding = padding if max_length else True
        self.return_tensors = return_tensors

    def __call__(self, text_input):
        if self.tokenizer is None:
            raise ValueError(f"{type(self).__name__} has no tokenizer")
        encoded = self.tokenizer(text_input, padding=self.padding, truncation=self.max_length is not None,
                                 max_length=self.max_length, return_tensors=self.return_tensors)
        return {'text': encoded['input_ids']}

    def save_pretrained(self, save_directory):
        """Save the tokenizer files and `processor_config.json`."""
        os.makedirs(save_directory, exist_ok=True)
        self.tokenizer.save_pretrained(save_directory)
        with open(os.path.join(save_directory, 'processor_config.json'), 'w', encoding='utf-8') as f:
            json.dump({'type': type(self).__name__, 'max_length': self.max_length, 'padding': self.padding,
                       'return_tensors': self.return_tensors}, f, indent=2)
