"""PengChengMindTokenizer: the SentencePiece BPE PengCheng.Mind predicts with (Baichuan2's `tokenizer.model`,
125696 pieces), no BOS added."""
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
                         add_eos_token=add_eos_token, padded_vocab_size=padded_vocab_size,
                         padding_side=padding_side, **kwargs)


@MindFormerRegister.register(MindFormerModuleType.PROCESSOR)
class PengChengMindProcessor(BaseProcessor):
    """Tokenizes text for PengCheng.Mind (defaults: pad to `max_length` 128, on the tokenizer's side, MindSpore
    tensors)."""

    def __init__(self, tokenizer=None, max_length=128, padding='max_length', return_tensors='ms'):
        super().__init__(tokenizer, max_length, padding, return_tensors)
