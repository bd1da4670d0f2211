"""PanguAlphaTokenizer: PanGu-alpha's jieba + SentencePiece tokenizer.

Encoding: the text is cut into words by jieba, in each word ' ' becomes '▂' (U+2582) and '\\n' becomes '▃'
(U+2583), the words are joined with spaces and the result is encoded by the SentencePiece `vocab.model`.
Decoding: SentencePiece decoding, then every space is removed and '▂' / '▃' turn back into space / newline.

Special tokens: `<eod>` (end of document; also the pad token) and `<eot>` (end of text: where generation stops).
In PanGu-alpha's own 40000-piece vocabulary they are pieces 6 and 9. A SentencePiece model without them (the tiny
one bundled in `assets/pangualpha_tiny/`, 510 pieces) gets them appended after its pieces, `<eod>` then `<eot>`
(ids 510 and 511 there, vocab_size 512).
`python -m mindformers.models.pangualpha.prepare_corpus` writes the training text of such a SentencePiece model
(see `mindformers/assets/corpus/README.md`)."""
import logging

from mindformers.models.base_processor import BaseProcessor
from mindformers.models.sentencepiece_tokenizer import SentencePieceTokenizer, _load_model
from mindformers.tools.register import MindFormerRegister, MindFormerModuleType

PANGU_SPECIAL_TOKENS = ('<eod>', '<eot>')
_TO_PIECES = str.maketrans({' ': '\u2582', '\n': '\u2583'})
_FROM_PIECES = str.maketrans({' ': None, '\u2582': ' ', '\u2583': '\n'})
_JIEBA = []


def _jieba():
    """The jieba module, imported (and its start-up log silenced) on first use."""
    if not _JIEBA:
        try:
            import jieba
        except ImportError:
            raise ImportError("PanguAlphaTokenizer needs the 'jieba' package for word segmentation: "
                              "pip install jieba") from None
        jieba.setLogLevel(logging.WARNING)
        _JIEBA.append(jieba)
    return _JIEBA[0]


def segment(text):
    """PanGu's pre-tokenization: jieba words with ' ' -> '▂' and '\\n' -> '▃', joined by spaces."""
    return ' '.join(word.translate(_TO_PIECES) for word in _jieba().cut(text, cut_all=False))


@MindFormerRegister.register(MindFormerModuleType.TOKENIZER)
class PanguAlphaTokenizer(SentencePieceTokenizer):
    """PanGu-alpha tokenizer (module docstring). `<eod>`, `<eot>`, `<unk>` in the text are never split.

    Args:
        vocab_file: the SentencePiece `vocab.model` (PanGu-alpha's, or the tiny one).
        eos_token ('<eot>'), pad_token ('<eod>'), unk_token ('<unk>'), bos_token (None): PanGu-alpha stops
            generating at `<eot>` (id 9) and pads with `<eod>` (id 6); no BOS is added.
        padding_side: 'left' (batched generation needs left padding).
        **kwargs: BaseTokenizer options (add_eos_token, truncation_side, model_max_length).
    """
    vocab_files_names = {'vocab_file': 'vocab.model'}

    def __init__(self, vocab_file=None, eos_token='<eot>', pad_token='<eod>', unk_token='<unk>', bos_token=None,
                 padding_side='left', **kwargs):
        kwargs.pop('additional_special_tokens', None)  # saved configs list them; they are always these two
        _, model = _load_model(vocab_file, type(self).__name__, raw=False)
        extra = [t for t in PANGU_SPECIAL_TOKENS if model.id_to_piece(model.piece_to_id(t)) != t]
        super().__init__(vocab_file, mode='sentencepiece', extra_tokens=extra, eos_token=eos_token,
                         pad_token=pad_token, unk_token=unk_token, bos_token=bos_token,
                         additional_special_tokens=list(PANGU_SPECIAL_TOKENS), padding_side=padding_side, **kwargs)

    def _piece_text(self, chunk, at_start):
        return segment(chunk)

    def _decode_runs(self, ids, keep_special):
        return super()._decode_runs(ids, keep_special).translate(_FROM_PIECES)


@MindFormerRegister.register(MindFormerModuleType.PROCESSOR)
class PanguAlphaProcessor(BaseProcessor):
    """Tokenizes text for PanGu-alpha (defaults: pad to `max_length` 128, on the tokenizer's side, MindSpore
    tensors)."""

    def __init__(self, tokenizer=None, max_length=128, padding='max_length', return_tensors='ms'):
        super().__init__(tokenizer, max_length, padding, return_tensors)
