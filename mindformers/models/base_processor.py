"""BaseProcessor: turns raw inputs into model inputs (for text models: a tokenizer with fixed padding)."""
import json
import os

from mindformers.tools.build import build_tokenizer
from mindformers.tools.register import MindFormerRegister, MindFormerModuleType

PROCESSOR_CONFIG_FILE = 'processor_config.json'


@MindFormerRegister.register(MindFormerModuleType.PROCESSOR)
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
        """Save the tokenizer files and `processor_config.json` (class name and settings, written atomically);
        returns `save_directory`."""
        from mindformers.tools.checkpoint import write_json_atomic
        if self.tokenizer is None:
            raise ValueError(f"{type(self).__name__} has no tokenizer to save")
        os.makedirs(save_directory, exist_ok=True)
        self.tokenizer.save_pretrained(save_directory)
        write_json_atomic(os.path.join(save_directory, PROCESSOR_CONFIG_FILE),
                          {'type': type(self).__name__, 'max_length': self.max_length, 'padding': self.padding,
                           'return_tensors': self.return_tensors})
        return save_directory

    @classmethod
    def from_pretrained(cls, name_or_path, **kwargs):
        """Load what `save_pretrained` wrote (a directory), or the processor of a registered name or run YAML;
        `kwargs` override the saved settings."""
        from mindformers.models.auto import AutoProcessor, AutoTokenizer
        if not os.path.isdir(str(name_or_path)):
            return AutoProcessor.from_pretrained(name_or_path, **kwargs)
        path = os.path.join(name_or_path, PROCESSOR_CONFIG_FILE)
        if not os.path.isfile(path):
            raise ValueError(f"{name_or_path} has no {PROCESSOR_CONFIG_FILE} (expected a processor save_pretrained "
                             f"directory)")
        with open(path, encoding='utf-8') as f:
            settings = {k: v for k, v in json.load(f).items() if k != 'type'}
        settings.update(kwargs)
        return cls(tokenizer=AutoTokenizer.from_pretrained(name_or_path), **settings)
