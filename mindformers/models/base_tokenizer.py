"""BaseTokenizer: special tokens, batching, padding, truncation, tensors and save/load shared by all tokenizers.

A subclass wraps one tokenization backend (the `tokenizers` library, SentencePiece, ...) and implements:
    `_tokenize_ids(text) -> list[int]`   text to ids, adding no special tokens (those in the text stay whole)
    `_decode(ids) -> str`                ids to text
    `get_vocab() -> dict[str, int]`      the full vocabulary, added tokens included
    `vocab_size` (property)              size of the base vocabulary
    `save_vocabulary(directory)`         write the files named in `vocab_files_names`; returns their paths
and may override `_tokenize_ids_batch`, `_token_to_id`, `_id_to_token` (faster lookups) and
`build_inputs_with_special_tokens` (model-specific layouts such as GLM's).
"""
import json
import os

import numpy as np

from mindformers.tools.file_io import write_json_atomic
from mindformers.tools.logger import logger
from mindformers.tools.utils import check_unicode, resolve_path

TOKENIZER_CONFIG_FILE = 'tokenizer_config.json'
SPECIAL_TOKEN_NAMES = ('bos_token', 'eos_token', 'unk_token', 'pad_token')


class BatchEncoding(dict):
    """The output of a tokenizer call: a dict (`input_ids`, `attention_mask`) whose keys also read as attributes."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(f"BatchEncoding has no {name!r} (keys: {', '.join(self)})") from None


class BaseTokenizer:
    """Base class of all tokenizers.

    Args:
        bos_token, eos_token, unk_token, pad_token: special token strings (or None); their ids are `<name>_id`.
        additional_special_tokens: further tokens that are never split and are dropped by `skip_special_tokens`.
        add_bos_token / add_eos_token: with `add_special_tokens=True`, put BOS before / EOS after every sequence.
        padding_side / truncation_side: 'right' (default) or 'left'.
        model_max_length: default `max_length` for truncation and `padding='max_length'`.
    """
    vocab_files_names = {}  # constructor argument -> file name written by save_vocabulary, e.g. {'vocab_file': ...}
    model_input_names = ('input_ids', 'attention_mask')  # what __call__ returns, in this order
    # what a key left out of a tokenizer_config.json means (save_pretrained writes every key, so this applies to
    # files written elsewhere, e.g. by HuggingFace, whose defaults may differ from ours)
    foreign_config_defaults = {}

    def __init__(self, bos_token=None, eos_token=None, unk_token=None, pad_token=None, additional_special_tokens=None,
                 add_bos_token=False, add_eos_token=False, padding_side='right', truncation_side='right',
                 model_max_length=None):
        name = type(self).__name__
        for key, value in (('bos_token', bos_token), ('eos_token', eos_token), ('unk_token', unk_token),
                           ('pad_token', pad_token)):
            if value is not None and not isinstance(value, str):
                raise TypeError(f"{name}: {key} must be a string or None, got {type(value).__name__} {value!r}")
        additional_special_tokens = list(additional_special_tokens or [])
        for i, token in enumerate(additional_special_tokens):
            if not isinstance(token, str) or not token:
                raise TypeError(f"{name}: additional_special_tokens[{i}] must be a non-empty string, got {token!r}")
        if add_bos_token and bos_token is None:
            raise ValueError(f"{name}: add_bos_token=True needs a bos_token")
        if add_eos_token and eos_token is None:
            raise ValueError(f"{name}: add_eos_token=True needs an eos_token")
        if model_max_length is not None and (isinstance(model_max_length, bool) or
                                             not isinstance(model_max_length, int) or model_max_length < 1):
            raise ValueError(f"{name}: model_max_length must be a positive int or None, got {model_max_length!r}")
        self.bos_token, self.eos_token, self.unk_token, self.pad_token = bos_token, eos_token, unk_token, pad_token
        self.additional_special_tokens = additional_special_tokens
        self.add_bos_token, self.add_eos_token = bool(add_bos_token), bool(add_eos_token)
        self.padding_side = _check_side(padding_side, 'padding_side', name)
        self.truncation_side = _check_side(truncation_side, 'truncation_side', name)
        self.model_max_length = model_max_length
        # everything save_pretrained writes to tokenizer_config.json; subclasses add their own arguments
        self.init_kwargs = dict(bos_token=bos_token, eos_token=eos_token, unk_token=unk_token, pad_token=pad_token,
                                additional_special_tokens=additional_special_tokens, add_bos_token=self.add_bos_token,
                                add_eos_token=self.add_eos_token, padding_side=padding_side,
                                truncation_side=truncation_side, model_max_length=model_max_length)

    # ------------------------------------------------------------------ subclass interface
    def _tokenize_ids(self, text):
        raise NotImplementedError(f"{type(self).__name__} must implement _tokenize_ids(text)")

    def _tokenize_ids_batch(self, texts):
        return [self._tokenize_ids(text) for text in texts]

    def _decode(self, ids):
        raise NotImplementedError(f"{type(self).__name__} must implement _decode(ids)")

    def get_vocab(self):
        raise NotImplementedError(f"{type(self).__name__} must implement get_vocab()")

    @property
    def vocab_size(self):
        raise NotImplementedError(f"{type(self).__name__} must implement the vocab_size property")

    def save_vocabulary(self, save_directory):
        raise NotImplementedError(f"{type(self).__name__} must implement save_vocabulary(save_directory)")

    def _token_to_id(self, token):
        return self.get_vocab().get(token)

    def _id_to_token(self, index):
        if getattr(self, '_id_to_token_cache', None) is None:
            self._id_to_token_cache = {i: t for t, i in self.get_vocab().items()}
        return self._id_to_token_cache.get(index)

    def __len__(self):
        """Vocabulary size with added tokens: every valid id is in `range(len(tokenizer))`."""
        return len(self.get_vocab())

    # ------------------------------------------------------------------ special tokens
    @property
    def bos_token_id(self):
        return self._special_id(self.bos_token)

    @property
    def eos_token_id(self):
        return self._special_id(self.eos_token)

    @property
    def unk_token_id(self):
        return self._special_id(self.unk_token)

    @property
    def pad_token_id(self):
        return self._special_id(self.pad_token)

    def _special_id(self, token):
        return None if token is None else self.convert_tokens_to_ids(token)

    @property
    def all_special_tokens(self):
        """Distinct special tokens: bos, eos, unk, pad, then the additional ones."""
        tokens = [getattr(self, name) for name in SPECIAL_TOKEN_NAMES] + self.additional_special_tokens
        return list(dict.fromkeys(t for t in tokens if t is not None))

    @property
    def all_special_ids(self):
        return [i for i in self.convert_tokens_to_ids(self.all_special_tokens) if i is not None]

    def build_inputs_with_special_tokens(self, ids):
        """Add the model's special tokens around one sequence of ids (BOS / EOS per add_bos_token / add_eos_token)."""
        bos = [self.bos_token_id] if self.add_bos_token else []
        eos = [self.eos_token_id] if self.add_eos_token else []
        return bos + list(ids) + eos

    def num_special_tokens_to_add(self):
        return len(self.build_inputs_with_special_tokens([]))

    def build_prompt_inputs(self, ids):
        """`build_inputs_with_special_tokens(ids)` without the EOS that `add_eos_token` appends: the layout of a prompt
        that generation continues (a closing EOS would tell the model the text has ended)."""
        ids = self.build_inputs_with_special_tokens(ids)
        return ids[:-1] if self.add_eos_token and ids and ids[-1] == self.eos_token_id else ids

    def encode_prompt(self, text):
        """Token ids of a generation prompt: `text`'s tokens in `build_prompt_inputs` (BOS as `add_bos_token` says,
        no closing EOS)."""
        return self.build_prompt_inputs(self.encode(text, add_special_tokens=False))

    # ------------------------------------------------------------------ tokens <-> ids
    def tokenize(self, text):
        """Split `text` into vocabulary tokens (no special tokens added)."""
        return self.convert_ids_to_tokens(self._tokenize_ids(_check_text(text, type(self).__name__)))

    def convert_tokens_to_ids(self, tokens):
        """A token or list of tokens to id(s); unknown tokens map to `unk_token_id` (None without an unk_token)."""
        if isinstance(tokens, str):
            index = self._token_to_id(tokens)
            if index is None and self.unk_token is not None and tokens != self.unk_token:
                index = self._token_to_id(self.unk_token)
            return index
        return [self.convert_tokens_to_ids(token) for token in tokens]

    def convert_ids_to_tokens(self, ids, skip_special_tokens=False):
        """An id or sequence of ids to token(s)."""
        if isinstance(ids, (int, np.integer)):
            return self._id_to_token(self._check_ids([ids])[0])
        ids = self._check_ids(ids)
        if skip_special_tokens:
            special = set(self.all_special_ids)
            ids = [i for i in ids if i not in special]
        return [self._id_to_token(i) for i in ids]

    # ------------------------------------------------------------------ encode / decode
    def encode(self, text, add_special_tokens=True, truncation=False, max_length=None):
        """Token ids (list of int) of one text."""
        max_length = self._max_length_for(truncation, 'do_not_pad', max_length)
        return self._encode_batch([_check_text(text, type(self).__name__)], add_special_tokens,
                                  max_length if truncation else None)[0]

    def __call__(self, text, padding=False, truncation=False, max_length=None, return_tensors=None,
                 add_special_tokens=True):
        """Tokenize a text or a list of texts.

        padding: False / 'do_not_pad'; True / 'longest' (to the longest in the batch); 'max_length'.
        truncation: True cuts every sequence (special tokens included) to `max_length` on `truncation_side`.
        max_length: length for truncation and padding='max_length' (default `model_max_length`).
        return_tensors: None gives Python lists, unbatched for a single text; 'np' gives int32 numpy arrays and 'ms'
            int32 MindSpore tensors, always batched: [batch, seq] (batch 1 for a single text).
        Returns a BatchEncoding with the tokenizer's `model_input_names`: `input_ids`, `attention_mask` (1 for tokens,
        0 for padding) and, for tokenizers that list it (GPT-2, as MindFormers), `token_type_ids` (all 0: one segment).
        """
        name = type(self).__name__
        batched = isinstance(text, (list, tuple))
        texts = list(text) if batched else [text]
        for i, item in enumerate(texts):
            _check_text(item, name, f"text[{i}]" if batched else 'text')
        padding = _padding_strategy(padding, name)
        if return_tensors not in (None, 'np', 'ms'):
            raise ValueError(f"{name}: return_tensors must be None, 'np' or 'ms', got {return_tensors!r}")
        max_length = self._max_length_for(truncation, padding, max_length)
        input_ids = self._encode_batch(texts, add_special_tokens, max_length if truncation else None)
        attention_mask = [[1] * len(ids) for ids in input_ids]
        if padding != 'do_not_pad' and input_ids:
            target = max_length if padding == 'max_length' else max(len(ids) for ids in input_ids)
            input_ids, attention_mask = self._pad(input_ids, attention_mask, target)
        columns = {'input_ids': input_ids, 'token_type_ids': [[0] * len(ids) for ids in input_ids],
                   'attention_mask': attention_mask}
        columns = {key: columns[key] for key in self.model_input_names}
        if return_tensors is not None:
            columns = {key: _to_tensor(seqs, return_tensors, name) for key, seqs in columns.items()}
        elif not batched:
            columns = {key: seqs[0] for key, seqs in columns.items()}
        return BatchEncoding(columns)

    def _encode_batch(self, texts, add_special_tokens, max_length):
        """Ids of each text with special tokens added; cut to `max_length` (if not None) on `truncation_side`."""
        n_special = self.num_special_tokens_to_add() if add_special_tokens else 0
        if max_length is not None and max_length < n_special:
            raise ValueError(f"{type(self).__name__}: max_length={max_length} leaves no room for the {n_special} "
                             f"special tokens added to every sequence")
        out = []
        for ids in self._tokenize_ids_batch(texts):
            if max_length is not None and len(ids) + n_special > max_length:
                keep = max_length - n_special
                ids = ids[:keep] if _side(self.truncation_side, 'truncation_side') == 'right' else ids[len(ids) - keep:]
            out.append(self.build_inputs_with_special_tokens(ids) if add_special_tokens else list(ids))
        return out

    def _max_length_for(self, truncation, padding, max_length):
        """The max_length to use (None if neither truncation nor padding='max_length' needs one)."""
        if not isinstance(truncation, bool):
            raise TypeError(f"{type(self).__name__}: truncation must be True or False, got {truncation!r}")
        if not truncation and padding != 'max_length':
            return max_length
        max_length = self.model_max_length if max_length is None else max_length
        if max_length is None:
            need = 'truncation=True' if truncation else "padding='max_length'"
            raise ValueError(f"{type(self).__name__}: {need} needs max_length (or the tokenizer's model_max_length)")
        if isinstance(max_length, bool) or not isinstance(max_length, (int, np.integer)) or max_length < 1:
            raise ValueError(f"{type(self).__name__}: max_length must be a positive int, got {max_length!r}")
        return int(max_length)

    def _pad(self, input_ids, attention_mask, target):
        if self.pad_token is None:
            raise ValueError(f"{type(self).__name__} has no pad_token, so it cannot pad; set pad_token "
                             f"(e.g. pad_token=tokenizer.eos_token) or call with padding=False")
        pad_id = self.pad_token_id
        if pad_id is None:
            raise ValueError(f"{type(self).__name__}: pad_token {self.pad_token!r} is not in the vocabulary")
        left = _side(self.padding_side, 'padding_side') == 'left'
        padded_ids, padded_mask = [], []
        for ids, mask in zip(input_ids, attention_mask):
            n = max(target - len(ids), 0)
            padded_ids.append([pad_id] * n + ids if left else ids + [pad_id] * n)
            padded_mask.append([0] * n + mask if left else mask + [0] * n)
        return padded_ids, padded_mask

    def decode(self, token_ids, skip_special_tokens=False, clean_up_tokenization_spaces=False):
        """Text of one sequence of ids (list, 1-D numpy array or MindSpore tensor)."""
        ids = self._check_ids(token_ids)
        if skip_special_tokens:
            special = set(self.all_special_ids)
            ids = [i for i in ids if i not in special]
        text = self._decode(ids)
        return clean_up_tokenization(text) if clean_up_tokenization_spaces else text

    def batch_decode(self, sequences, skip_special_tokens=False, clean_up_tokenization_spaces=False):
        """Texts of a batch of id sequences (list of lists, or a 2-D array / tensor)."""
        if hasattr(sequences, 'asnumpy'):
            sequences = sequences.asnumpy()
        return [self.decode(seq, skip_special_tokens, clean_up_tokenization_spaces) for seq in sequences]

    def _check_ids(self, token_ids):
        """Ids as a list of Python ints, each in range(len(self))."""
        if isinstance(token_ids, list) and all(type(i) is int for i in token_ids):  # the common case, without NumPy
            size = len(self)
            for i in token_ids:
                if not 0 <= i < size:
                    raise ValueError(f"{type(self).__name__}: token id {i} is out of range [0, {size})")
            return list(token_ids)
        if hasattr(token_ids, 'asnumpy'):
            token_ids = token_ids.asnumpy()
        array = np.asarray(token_ids)
        if array.ndim > 1:
            raise ValueError(f"{type(self).__name__}.decode takes one sequence of ids, got shape {array.shape}; "
                             f"use batch_decode for a batch")
        array = array.reshape(-1)
        if array.size and not np.issubdtype(array.dtype, np.integer):
            raise TypeError(f"{type(self).__name__}: token ids must be integers, got dtype {array.dtype}")
        size = len(self)
        bad = array[(array < 0) | (array >= size)]
        if bad.size:
            raise ValueError(f"{type(self).__name__}: token id {int(bad[0])} is out of range [0, {size})")
        return array.tolist()

    # ------------------------------------------------------------------ save / load
    def save_pretrained(self, save_directory):
        """Write the vocabulary files and `tokenizer_config.json` (class name + constructor arguments) to
        `save_directory`; `from_pretrained(save_directory)` rebuilds an identical tokenizer. Returns the paths."""
        os.makedirs(save_directory, exist_ok=True)
        files = tuple(self.save_vocabulary(save_directory))
        config = {'tokenizer_class': type(self).__name__}
        # current attribute values win, so e.g. `tokenizer.padding_side = 'left'` before saving is kept
        config.update((k, getattr(self, k, v)) for k, v in self.init_kwargs.items() if k not in self.vocab_files_names)
        config_path = os.path.join(save_directory, TOKENIZER_CONFIG_FILE)
        write_json_atomic(config_path, config, indent=2, ensure_ascii=False)
        return files + (config_path,)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        """Load a tokenizer saved by `save_pretrained` (or a directory holding the class's vocabulary files).

        `kwargs` override the saved configuration. Called on BaseTokenizer, the class named in
        tokenizer_config.json is looked up in the TOKENIZER registry."""
        path = resolve_path(str(pretrained_model_name_or_path))
        if not os.path.isdir(path):
            raise ValueError(f"{cls.__name__}.from_pretrained expects a directory with tokenizer files, got "
                             f"{pretrained_model_name_or_path!r} (no such directory)")
        config = {}
        config_path = os.path.join(path, TOKENIZER_CONFIG_FILE)
        if os.path.isfile(config_path):
            with open(config_path, encoding='utf-8') as f:
                config = json.load(f)
            if not isinstance(config, dict):
                raise ValueError(f"{config_path} must hold a JSON object, got {type(config).__name__}")
            config = {**cls.foreign_config_defaults, **config}
        class_name = config.pop('tokenizer_class', None) or config.pop('type', None)
        if cls is BaseTokenizer:
            if class_name is None:
                raise ValueError(f"{path} has no {TOKENIZER_CONFIG_FILE} naming the tokenizer class; load it with "
                                 f"the tokenizer's own class, e.g. GPT2Tokenizer.from_pretrained(...)")
            from mindformers.tools.register import MindFormerRegister, MindFormerModuleType
            tok_cls = MindFormerRegister.get_cls(MindFormerModuleType.TOKENIZER, class_name, where=config_path)
            return tok_cls.from_pretrained(path, **kwargs)
        if class_name is not None and class_name != cls.__name__:
            logger.warning("%s names tokenizer class %s; loading it as %s", config_path, class_name, cls.__name__)
        for arg, file_name in cls.vocab_files_names.items():
            if os.path.isfile(os.path.join(path, file_name)):
                config[arg] = os.path.join(path, file_name)
        from mindformers.tools.register.check import keyword_names
        accepted = keyword_names(cls) or set()
        ignored = sorted(k for k in config if k not in accepted)
        if ignored:
            logger.info("%s: ignoring keys of %s that %s does not take: %s", cls.__name__, config_path,
                        cls.__name__, ', '.join(ignored))
        config = {k: v for k, v in config.items() if k in accepted}
        config.update(kwargs)
        return cls(**config)

    def __repr__(self):
        return (f"{type(self).__name__}(vocab_size={self.vocab_size}, len={len(self)}, "
                f"special_tokens={self.all_special_tokens}, padding_side={self.padding_side!r})")


def clean_up_tokenization(text):
    """Undo the spaces English word-level tokenizers put before punctuation and contractions."""
    for spaced, joined in ((' .', '.'), (' ?', '?'), (' !', '!'), (' ,', ','), (" ' ", "'"), (" n't", "n't"),
                           (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
        text = text.replace(spaced, joined)
    return text


def _check_text(text, owner, what='text'):
    if not isinstance(text, str):
        raise TypeError(f"{owner}: {what} must be a string (or a list of strings), got {type(text).__name__}")
    return check_unicode(text, f"{owner}: {what}")


def _check_side(side, what, owner):
    if side not in ('right', 'left'):
        raise ValueError(f"{owner}: {what} must be 'right' or 'left', got {side!r}")
    return side


def _side(side, what):
    """Re-check a side attribute at use time (callers may have assigned it after construction)."""
    return _check_side(side, what, 'tokenizer')


def _padding_strategy(padding, owner):
    strategies = {False: 'do_not_pad', None: 'do_not_pad', 'do_not_pad': 'do_not_pad', True: 'longest',
                  'longest': 'longest', 'max_length': 'max_length'}
    if isinstance(padding, (bool, str, type(None))) and padding in strategies:
        return strategies[padding]
    raise ValueError(f"{owner}: padding must be False, True, 'longest', 'max_length' or 'do_not_pad', got {padding!r}")


def _to_tensor(sequences, return_tensors, owner):
    lengths = sorted({len(seq) for seq in sequences})
    if len(lengths) > 1:
        raise ValueError(f"{owner}: cannot make one tensor from sequences of lengths {lengths}; "
                         f"use padding=True or padding='max_length' (with truncation to bound the length)")
    array = np.array(sequences, dtype=np.int32).reshape(len(sequences), lengths[0] if lengths else 0)
    if return_tensors == 'ms':
        import mindspore as ms
        return ms.Tensor(array, dtype=ms.int32)
    return array

