"""ChatGLM2Tokenizer: ChatGLM2-6B's SentencePiece `tokenizer.model` plus its five special tokens, and the
`[Round N]` chat prompt."""
from mindformers.models.base_processor import BaseProcessor
from mindformers.dataset.chat_templates import glm2_chat_prompt
from mindformers.models.sentencepiece_tokenizer import SentencePieceTokenizer
from mindformers.tools.register import MindFormerRegister, MindFormerModuleType

GLM2_SPECIAL_TOKENS = ('[MASK]', '[gMASK]', '[sMASK]', 'sop', 'eop')
# 'sop' / 'eop' are also parts of ordinary words ("philosopher", "people"), so they are not looked for in text
GLM2_WORD_TOKENS = ('sop', 'eop')


@MindFormerRegister.register(MindFormerModuleType.TOKENIZER)
class ChatGLM2Tokenizer(SentencePieceTokenizer):
    """ChatGLM2 tokenizer: SentencePiece ids (`<unk>` 0 = pad, `<s>` 1, `</s>` 2 = eos), then `[MASK]`, `[gMASK]`,
    `[sMASK]`, `sop`, `eop` at ids `sp_size + 0..4` (64789..64793 for ChatGLM2-6B, so `vocab_size` is 64794).

    Text is encoded by SentencePiece as ChatGLM2's own tokenizer does ('你好' -> '▁你', '好'); with
    `add_special_tokens=True` every sequence starts with `[gMASK] sop` ("你好" -> [64790, 64792, 36474, 54591] on
    ChatGLM2-6B). `[MASK]`, `[gMASK]`, `[sMASK]`, `<s>`, `</s>` and `<unk>` in the text are never split; `sop` and
    `eop` are left to SentencePiece there, since they are also parts of words ("philosopher", "people"). Padding is
    on the left, as the model expects.

    Args:
        vocab_file: ChatGLM2's SentencePiece `tokenizer.model`.
        unk_token, bos_token, eos_token, pad_token: `<unk>`, `<s>`, `</s>`, `<unk>`.
        add_eos_token: put EOS after every sequence (default False).
        padding_side: 'left'.
        **kwargs: BaseTokenizer options (truncation_side, model_max_length).
    """

    def __init__(self, vocab_file=None, unk_token='<unk>', bos_token='<s>', eos_token='</s>', pad_token='<unk>',
                 add_eos_token=False, padding_side='left', **kwargs):
        # saved configs list these two; other values cannot work with ChatGLM2's fixed layout
        if list(kwargs.pop('additional_special_tokens', None) or GLM2_SPECIAL_TOKENS) != list(GLM2_SPECIAL_TOKENS):
            raise ValueError(f"ChatGLM2Tokenizer: additional_special_tokens are always {list(GLM2_SPECIAL_TOKENS)}")
        if kwargs.pop('add_bos_token', False):
            raise ValueError("ChatGLM2Tokenizer: add_bos_token must be False (sequences start with [gMASK] sop)")
        super().__init__(vocab_file, mode='sentencepiece', extra_tokens=GLM2_SPECIAL_TOKENS, unk_token=unk_token,
                         bos_token=bos_token, eos_token=eos_token, pad_token=pad_token,
                         additional_special_tokens=list(GLM2_SPECIAL_TOKENS), add_eos_token=add_eos_token,
                         padding_side=padding_side, **kwargs)

    def split_tokens(self):
        return [t for t in self.all_special_tokens if t not in GLM2_WORD_TOKENS]

    def get_command(self, token):
        """The id of a special token ('[gMASK]', 'sop', '</s>', ...), as ChatGLM2's tokenizer names it."""
        if token not in self.all_special_tokens:
            raise ValueError(f"ChatGLM2Tokenizer: {token!r} is not a special token (special tokens: "
                             f"{', '.join(self.all_special_tokens)})")
        return self.convert_tokens_to_ids(token)

    def get_prefix_tokens(self):
        """`[gMASK] sop`: the ids every ChatGLM2 input starts with."""
        return [self.get_command('[gMASK]'), self.get_command('sop')]

    def build_inputs_with_special_tokens(self, ids):
        eos = [self.eos_token_id] if self.add_eos_token else []
        return self.get_prefix_tokens() + list(ids) + eos

    def build_prompt(self, query, history=()):
        """ChatGLM2's chat prompt text (`[Round N]\\n\\n问：...\\n\\n答：`) for `query` after `history` =
        [(question, answer), ...]; encode it with `add_special_tokens=True` for the `[gMASK] sop` prefix."""
        return glm2_chat_prompt(query, history or ())


@MindFormerRegister.register(MindFormerModuleType.PROCESSOR)
class ChatGLM2Processor(BaseProcessor):
    """Tokenizes text for ChatGLM2 (defaults: pad to `max_length` 128, on the tokenizer's side, MindSpore tensors)."""

    def __init__(self, tokenizer=None, max_length=128, padding='max_length', return_tensors='ms'):
        super().__init__(tokenizer, max_length, padding, return_tensors)
