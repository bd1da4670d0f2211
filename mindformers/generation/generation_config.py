"""GenerationConfig: how `generate()` picks tokens and when it stops."""
import copy
import json
import os

GENERATION_CONFIG_FILE = 'generation_config.json'


class GenerationConfig:
    """Decoding settings. Field (default): meaning.

    max_length (20): total length (prompt, left-padded to the longest in the batch, plus new tokens);
        `max_decode_length` is accepted as its MindFormers alias. max_new_tokens (None): new tokens per row; wins over
        max_length set at the same time. An `update` that sets max_length alone drops a max_new_tokens that was not
        set explicitly (a model-config default), so an explicit length always wins over a default one.
        min_new_tokens (0): EOS is suppressed until this many new tokens exist.
    do_sample (False), temperature (1.0), top_k (50; 0 = off), top_p (1.0): sampling; without do_sample decoding is
        greedy (or beam search) and these three are ignored.
    repetition_penalty (1.0): logits of tokens already in the sequence are divided (positive) or multiplied
        (negative) by it, as in HuggingFace.
    num_beams (1), length_penalty (1.0), early_stopping (False | True | 'never'): beam search, HuggingFace semantics.
    eos_token_id (None; an int or a list), pad_token_id (None: the first EOS id), bos_token_id (None).
    use_past (False): incremental decoding with the model's KV cache."""

    _DEFAULTS = dict(max_length=20, max_new_tokens=None, min_new_tokens=0, do_sample=False, temperature=1.0,
                     top_k=50, top_p=1.0, repetition_penalty=1.0, num_beams=1, length_penalty=1.0,
                     early_stopping=False, eos_token_id=None, pad_token_id=None, bos_token_id=None, use_past=False)
    _ALIASES = {'max_decode_length': 'max_length'}

    def __init__(self, **kwargs):
        for name, value in self._DEFAULTS.items():
            setattr(self, name, copy.copy(value))
        self._explicit = set()
        self.update(**kwargs)

    def update(self, **kwargs):
        """Set fields by name (aliases allowed); an unknown name raises TypeError naming it. Returns self."""
        unknown = sorted(k for k in kwargs if self._ALIASES.get(k, k) not in self._DEFAULTS)
        if unknown:
            from mindformers.tools.register.config import unknown_key_message
            raise TypeError('; '.join(unknown_key_message(key, self.names(), 'generation option')
                                      for key in unknown))
        names = {self._ALIASES.get(k, k) for k in kwargs}
        if 'max_length' in names and 'max_new_tokens' not in names and not self.is_explicit('max_new_tokens'):
            self.max_new_tokens = None
        for key, value in kwargs.items():
            name = self._ALIASES.get(key, key)
            setattr(self, name, value)
            self._explicit.add(name)
        return self

    @classmethod
    def names(cls):
        """Every option name `update` accepts (aliases included)."""
        return set(cls._DEFAULTS) | set(cls._ALIASES)

    def is_explicit(self, name):
        """Whether `name` was set by the caller (not a class default)."""
        return name in self._explicit

    @property
    def eos_token_ids(self):
        """The EOS ids as a list (empty when there is none)."""
        eos = self.eos_token_id
        if eos is None:
            return []
        return [int(e) for e in eos] if isinstance(eos, (list, tuple)) else [int(eos)]

    def validate(self):
        """Raise ValueError naming the first bad value."""
        checks = [
            (self.max_new_tokens is None or int(self.max_new_tokens) >= 1, 'max_new_tokens', 'must be >= 1'),
            (int(self.min_new_tokens) >= 0, 'min_new_tokens', 'must be >= 0'),
            (int(self.max_length) >= 1, 'max_length', 'must be >= 1'),
            (float(self.temperature) > 0, 'temperature', 'must be > 0'),
            (int(self.top_k) >= 0, 'top_k', 'must be >= 0 (0 turns it off)'),
            (0 < float(self.top_p) <= 1, 'top_p', 'must be in (0, 1]'),
            (float(self.repetition_penalty) > 0, 'repetition_penalty', 'must be > 0'),
            (int(self.num_beams) >= 1, 'num_beams', 'must be >= 1'),
            (self.early_stopping in (True, False, 'never'), 'early_stopping', "must be True, False or 'never'"),
        ]
        for ok, name, rule in checks:
            if not ok:
                raise ValueError(f"generation option {name}={getattr(self, name)!r} {rule}")
        if self.num_beams > 1 and self.do_sample:
            raise ValueError("beam search with do_sample=True is not supported; use num_beams=1 to sample")
        return self

    @classmethod
    def from_model_config(cls, config):
        """Defaults from a model config: max_decode_length, max_new_tokens, top_k, top_p, do_sample,
        repetition_penalty, use_past and the token ids, where the config has them."""
        found = {}
        for name in ('top_k', 'top_p', 'do_sample', 'repetition_penalty', 'use_past', 'eos_token_id',
                     'pad_token_id', 'bos_token_id', 'num_beams', 'temperature', 'max_new_tokens'):
            value = getattr(config, name, None)
            if value is not None:
                found[name] = value
        if getattr(config, 'max_decode_length', None) is not None:
            found['max_length'] = config.max_decode_length
        generation_config = cls(**found)
        generation_config._explicit.clear()
        return generation_config

    def to_dict(self):
        return {name: getattr(self, name) for name in self._DEFAULTS}

    def save_pretrained(self, save_directory):
        os.makedirs(save_directory, exist_ok=True)
        with open(os.path.join(save_directory, GENERATION_CONFIG_FILE), 'w', encoding='utf-8') as f:
            json.dump(self.to_dict(), f, indent=2)

    @classmethod
    def from_pretrained(cls, directory):
        path = os.path.join(directory, GENERATION_CONFIG_FILE)
        if not os.path.isfile(path):
            raise ValueError(f"{directory} has no {GENERATION_CONFIG_FILE}")
        with open(path, encoding='utf-8') as f:
            return cls(**json.load(f))

    def __repr__(self):
        return f"GenerationConfig({json.dumps(self.to_dict())})"
