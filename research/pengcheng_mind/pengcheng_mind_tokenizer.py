"""PengChengMindTokenizer: the SentencePiece BPE PengCheng.Mind predicts with (Baichuan2's `tokenizer.model`,
125696 pieces), no BOS added."""
import numpy as np

from mindformers.models.base_processor import BaseProcessor
from mindformers.models.sentencepiece_tokenizer import SentencePieceTokenizer
from mindformers.tools.register import MindFormerRegister, MindFormerModuleType


@MindFormerRegister.register(MindFormerModuleType.TOKENIZER)
class PengChengMindTokenizer(SentencePieceTokenizer):
    """PengCheng.Mind tokenizer: SentencePiece ids as the model was trained (`sp.encode(text)`, the model's own
    normalizer), `<unk>` 0 (also the pad), `<s>` 1, `</s>` 2 (eos / eod). No BOS or EOS is added by default, as
    PengCheng's predict script encodes prompts (`add_special_tokens=False`). `<s>`, `</s>` and `<unk>` in the text
    are never split.

    The model's embedding has more rows than the tokenizer has pieces (125952 for 125696): `padded_vocab_size`
    (None = no padding) lets `decode` accept the padding ids, which stand for no text.

    Args:
        vocab_file: the SentencePiece `tokenizer.model`.
        unk_token, bos_token, eos_token, pad_token: `<unk>`, `<s>`, `</s>`, `<unk>`.
        add_bos_token / add_eos_token: False / False.
        padded_vocab_size: the model's vocabulary size when it exceeds the number of pieces.
        padding_side: 'left' (batched generation).
        **kwargs: BaseTokenizer options (truncation_side, model_max_length, additional_special_tokens).
    """

    def __init__(self, vocab_file=None, unk_token='<unk>', bos_token='<s>', eos_token='</s>', pad_token='<unk>',
                 add_bos_token=False, add_eos_token=False, padded_vocab_size=None, padding_side='left', **kwargs):
        super().__init__(vocab_file, mode='sentencepiece', unk_token=unk_token, bos_token=bos_token,
                         eos_token=eos_token, pad_token=pad_token, add_bos_token=add_bos_token,
                         add_eos_token=add_eos_token, padding_side=padding_side, **kwargs)
        if padded_vocab_size is not None and (isinstance(padded_vocab_size, bool) or
                                              not isinstance(padded_vocab_size, int) or
                                              padded_vocab_size < self.sp_size):
            raise ValueError(f"PengChengMindTokenizer: padded_vocab_size must be an integer of at least the "
                             f"{self.sp_size} pieces of {self.vocab_file}, got {padded_vocab_size!r}")
        self.padded_vocab_size = padded_vocab_size
        self.init_kwargs.update(padded_vocab_size=padded_vocab_size)

    def decode(self, token_ids, skip_special_tokens=False, clean_up_tokenization_spaces=False):
        """Text of one sequence of ids; padding ids (`padded_vocab_size`) are dropped."""
        if self.padded_vocab_size:
            array = np.asarray(token_ids.asnumpy() if hasattr(token_ids, 'asnumpy') else token_ids)
            if array.ndim == 1 and np.issubdtype(array.dtype, np.integer):
                token_ids = array[(array < self.sp_size) | (array >= self.padded_vocab_size)]
        return super().decode(token_ids, skip_special_tokens, clean_up_tokenization_spaces)


@MindFormerRegister.register(MindFormerModuleType.PROCESSOR)
class PengChengMindProcessor(BaseProcessor):
    """Tokenizes text for PengCheng.Mind (defaults: pad to `max_length` 128, on the tokenizer's side, MindSpore
    tensors)."""

    def __init__(self, tokenizer=None, max_length=128, padding='max_length', return_tensors='ms'):
        super().__init__(tokenizer, max_length, padding, return_tensors)
