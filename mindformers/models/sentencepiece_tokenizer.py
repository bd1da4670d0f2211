"""SentencePieceTokenizer: the shared base of tokenizers that run a SentencePiece `tokenizer.model` (LLaMA, ChatGLM2).

Text becomes pieces in one of two ways (`mode`):
    'sentencepiece'  SentencePiece as the model was trained: its own normalizer, and the '▁' dummy prefix in front
                     of every chunk of text between special tokens (Meta's LLaMA code, ChatGLM2's tokenizer).
    'metaspace'      what transformers 5.x `LlamaTokenizer` does with the same model: no normalization, spaces
                     become '▁', and one '▁' goes before the text (`add_prefix_space`) unless the text already
                     starts with a space or with a special token; decoding drops one leading space.
The two differ only for text that starts with a space (' Hi' is '▁', '▁Hi' in 'sentencepiece' mode and '▁Hi' in
'metaspace' mode) or follows a special token, and for models whose normalizer is not the identity.
"""
import functools
import os
import re
import shutil

import numpy as np
import sentencepiece as spm

from mindformers.models.base_tokenizer import BaseTokenizer, clean_up_tokenization
from mindformers.tools.utils import resolve_path

SPIECE_UNDERLINE = '\u2581'
MODES = ('sentencepiece', 'metaspace')
_BYTE_PIECE = re.compile(r'<0x([0-9A-Fa-f]{2})>')


class SentencePieceTokenizer(BaseTokenizer):
    """Runs a SentencePiece model with the `sentencepiece` library; ids are SentencePiece's piece ids, then
    `extra_tokens` (ids `sp_size`, `sp_size + 1`, ...).

    Args:
        vocab_file: the SentencePiece model (`tokenizer.model`); the path may be relative to the working
            directory, the package (`assets/llama_tiny/tokenizer.model`) or the repository.
        mode: 'sentencepiece' or 'metaspace' (see the module docstring).
        add_prefix_space: in 'metaspace' mode, put '▁' before the text (and strip one space when decoding).
        extra_tokens: tokens the model has after the SentencePiece pieces, part of `vocab_size`.
        padded_vocab_size: the model's vocabulary size when its embedding has more rows than this tokenizer has
            ids (None = no padding); `decode` drops the padding ids, which stand for no text.
        **kwargs: BaseTokenizer options (special tokens, add_bos_token, padding_side, ...).

    Special tokens in the text (those of `split_tokens()`, by default all special tokens) are never split: the
    text between them is encoded chunk by chunk.
    """
    vocab_files_names = {'vocab_file': 'tokenizer.model'}

    def __init__(self, vocab_file=None, mode='sentencepiece', add_prefix_space=True, extra_tokens=(),
                 padded_vocab_size=None, **kwargs):
        name = type(self).__name__
        if mode not in MODES:
            raise ValueError(f"{name}: mode must be one of {', '.join(MODES)}, got {mode!r}")
        self.vocab_file, self.sp_model = _load_model(vocab_file, name, raw=mode == 'metaspace')
        self.sp_size = self.sp_model.get_piece_size()
        self.mode, self.add_prefix_space = mode, bool(add_prefix_space)
        self.extra_tokens = {token: self.sp_size + i for i, token in enumerate(extra_tokens)}
        self._extra_ids = {i: token for token, i in self.extra_tokens.items()}
        self._vocab = None
        super().__init__(**kwargs)
        named = [(key, getattr(self, key)) for key in ('bos_token', 'eos_token', 'unk_token', 'pad_token')]
        for key, token in named + [('additional special token', t) for t in self.additional_special_tokens]:
            if token is not None and self._token_to_id(token) is None:  # this tokenizer cannot add tokens
                raise ValueError(f"{name}: {key} {token!r} is not a piece of {self.vocab_file}")
        size = self.sp_size + len(self.extra_tokens)
        if padded_vocab_size is not None and (isinstance(padded_vocab_size, bool) or
                                              not isinstance(padded_vocab_size, int) or padded_vocab_size < size):
            raise ValueError(f"{name}: padded_vocab_size must be an integer of at least the {size} ids of "
                             f"{self.vocab_file}, got {padded_vocab_size!r}")
        self.padded_vocab_size = padded_vocab_size
        self.init_kwargs.update(vocab_file=self.vocab_file, padded_vocab_size=padded_vocab_size)

    # ------------------------------------------------------------------ encode
    def split_tokens(self):
        """Tokens matched whole in the text before it is encoded."""
        return self.all_special_tokens

    def _chunks(self, text):
        """(is_special, string, starts_the_text) pieces of `text`, split around `split_tokens()`."""
        pattern = _split_pattern(tuple(self.split_tokens()))
        parts = pattern.split(text) if pattern else [text]
        out, offset = [], 0
        for index, part in enumerate(parts):
            if part:
                out.append((index % 2 == 1, part, offset == 0))
            offset += len(part)
        return out

    def _piece_text(self, chunk, at_start):
        """The string SentencePiece encodes for one chunk of plain text."""
        if self.mode == 'sentencepiece':
            return chunk
        chunk = chunk.replace(' ', SPIECE_UNDERLINE)
        if at_start and self.add_prefix_space and not chunk.startswith(SPIECE_UNDERLINE):
            chunk = SPIECE_UNDERLINE + chunk
        return chunk

    def _tokenize_ids(self, text):
        return self._tokenize_ids_batch([text])[0]

    def _tokenize_ids_batch(self, texts):
        chunked = [self._chunks(text) for text in texts]
        plain = [self._piece_text(part, at_start) for chunks in chunked for special, part, at_start in chunks
                 if not special]
        encoded = iter(self.sp_model.encode(plain) if plain else [])
        out = []
        for chunks in chunked:
            ids = []
            for special, part, _ in chunks:
                ids.extend([self._token_to_id(part)] if special else next(encoded))
            out.append(ids)
        return out

    # ------------------------------------------------------------------ decode
    def decode(self, token_ids, skip_special_tokens=False, clean_up_tokenization_spaces=False):
        """Text of one sequence of ids. In 'sentencepiece' mode the text between special tokens is decoded run by
        run, also when they are skipped, so each run loses its own dummy-prefix space as it was encoded."""
        if self.padded_vocab_size:
            array = np.asarray(token_ids.asnumpy() if hasattr(token_ids, 'asnumpy') else token_ids)
            if array.ndim == 1 and np.issubdtype(array.dtype, np.integer):
                size = self.sp_size + len(self.extra_tokens)
                token_ids = array[(array < size) | (array >= self.padded_vocab_size)]
        if self.mode == 'metaspace' or not skip_special_tokens:
            return super().decode(token_ids, skip_special_tokens, clean_up_tokenization_spaces)
        text = self._decode_runs(self._check_ids(token_ids), keep_special=False)
        return clean_up_tokenization(text) if clean_up_tokenization_spaces else text

    def _decode(self, ids):
        if self.mode == 'metaspace':
            return self._decode_metaspace(ids)
        return self._decode_runs(ids, keep_special=True)

    def _decode_runs(self, ids, keep_special):
        """SentencePiece's decoding of each run of ordinary pieces; special tokens as their text (or dropped)."""
        special = set(self.all_special_ids)
        text, run = [], []
        for index in ids + [None]:
            if index is not None and index < self.sp_size and index not in special:
                run.append(index)
                continue
            if run:
                text.append(self.sp_model.decode(run))
                run = []
            if index is not None and (keep_special or index not in special):
                text.append(self._id_to_token(index))
        return ''.join(text)

    def _decode_metaspace(self, ids):
        """transformers' Metaspace decoding: '▁' -> ' ', runs of byte pieces as UTF-8 (a run that is not valid
        UTF-8 becomes one U+FFFD per byte), then one leading space removed if `add_prefix_space`."""
        text, run = [], bytearray()
        for index in ids + [None]:
            piece = None if index is None else self._id_to_token(index).replace(SPIECE_UNDERLINE, ' ')
            match = None if piece is None else _BYTE_PIECE.fullmatch(piece)
            if match:
                run.append(int(match.group(1), 16))
                continue
            if run:
                try:
                    text.append(run.decode('utf-8'))
                except UnicodeDecodeError:
                    text.append('\ufffd' * len(run))
                run = bytearray()
            if piece is not None:
                text.append(piece)
        text = ''.join(text)
        return text[1:] if self.add_prefix_space and text.startswith(' ') else text

    # ------------------------------------------------------------------ vocabulary
    def get_vocab(self):
        if self._vocab is None:
            self._vocab = {self.sp_model.id_to_piece(i): i for i in range(self.sp_size)}
            self._vocab.update(self.extra_tokens)
        return dict(self._vocab)

    @property
    def vocab_size(self):
        """SentencePiece pieces plus `extra_tokens`: every id the model knows."""
        return self.sp_size + len(self.extra_tokens)

    def __len__(self):
        return self.vocab_size

    def _token_to_id(self, token):
        if token in self.extra_tokens:
            return self.extra_tokens[token]
        index = self.sp_model.piece_to_id(token)
        # piece_to_id answers unk_id for pieces it does not know
        return index if self.sp_model.id_to_piece(index) == token else None

    def _id_to_token(self, index):
        if 0 <= index < self.sp_size:
            return self.sp_model.id_to_piece(index)
        return self._extra_ids.get(index)

    def save_vocabulary(self, save_directory):
        """Copy the SentencePiece model to `save_directory/tokenizer.model`; returns its path."""
        target = os.path.join(save_directory, self.vocab_files_names['vocab_file'])
        if not (os.path.exists(target) and os.path.samefile(self.vocab_file, target)):
            shutil.copyfile(self.vocab_file, target)
        return (target,)


@functools.lru_cache(maxsize=64)
def _split_pattern(tokens):
    """A regex whose split() keeps `tokens` as separators (longest first, so a token that contains another wins)."""
    tokens = sorted(set(tokens), key=len, reverse=True)
    return re.compile('(' + '|'.join(map(re.escape, tokens)) + ')') if tokens else None


def _load_model(vocab_file, owner, raw):
    """(absolute path, SentencePieceProcessor) of the model at `vocab_file`; `raw=True` turns off its normalizer
    and dummy prefix (the 'metaspace' mode does those steps itself, as transformers does)."""
    if not vocab_file:
        raise ValueError(f"{owner} needs vocab_file (the path to a SentencePiece tokenizer.model), got {vocab_file!r}")
    path = os.path.abspath(resolve_path(os.fspath(vocab_file)))
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{owner}: vocab_file {os.fspath(vocab_file)!r} not found (looked in the working "
                                f"directory, the mindformers package and the repository root)")
    with open(path, 'rb') as f:
        data = f.read()
    try:
        if raw:
            from sentencepiece import sentencepiece_model_pb2
            proto = sentencepiece_model_pb2.ModelProto()
            proto.ParseFromString(data)
            proto.normalizer_spec.name = 'identity'
            proto.normalizer_spec.precompiled_charsmap = b''
            proto.normalizer_spec.add_dummy_prefix = False
            proto.normalizer_spec.remove_extra_whitespaces = False
            data = proto.SerializeToString()
        return path, spm.SentencePieceProcessor(model_proto=data)
    except Exception as err:  # protobuf's DecodeError and sentencepiece's RuntimeError share no base class
        raise ValueError(f"{owner}: vocab_file {path!r} is not a SentencePiece model: {err}") from None
