"""ChatGLMTokenizer: ChatGLM-6B's SentencePiece `ice_text.model` with its whitespace pieces and GLM special tokens.

Before SentencePiece sees a stretch of text (the text between special tokens), ChatGLM-6B rewrites its whitespace
into pieces of the model: '\\n' -> `<n>`, '\\t' -> `<|tab|>`, and every run of 2..80 spaces -> `<|blank_N|>` (a run
longer than 80 becomes `<|blank_80|>` pieces from the left, then the rest: 81 spaces are `<|blank_80|>` and one
space). SentencePiece then adds its '▁' dummy prefix and applies the model file's own normalizer. Decoding reverses
the rewriting, so `decode(encode(x)) == x` for text the model's normalizer leaves alone (the bundled tiny model's
is the identity), with these exceptions:
  - the literal strings `<n>`, `<|tab|>` and `<|blank_N|>` (2 <= N <= 80) in the input are those pieces, and decode
    as a newline, a tab and N spaces;
  - `<pad>` is dropped when decoding, as ChatGLM-6B's tokenizer does (also with skip_special_tokens=False).

Every input ends with `[gMASK] <sop>` (`build_inputs_with_special_tokens`); the model generates after `<sop>` and
stops at `<eop>`. Special token ids are read from the model file: 130000.. for the released ice_text.model,
1000.. for the bundled tiny one (`assets/glm_tiny/ice_text.model`, see the README there).
"""
import re

from mindformers.models.base_processor import BaseProcessor
from mindformers.dataset.chat_templates import glm_chat_prompt
from mindformers.models.sentencepiece_tokenizer import SentencePieceTokenizer
from mindformers.tools.register import MindFormerRegister, MindFormerModuleType

# in the order of ice_text.model (ids 130000..130007)
GLM_SPECIAL_TOKENS = ('[MASK]', '[gMASK]', '[sMASK]', '<unused_0>', '<sop>', '<eop>', '<ENC>', '<dBLOCK>')
LINEBREAK_TOKEN = '<n>'
TAB_TOKEN = '<|tab|>'
MAX_BLANK_LENGTH = 80
_SPACE_RUN = re.compile(' {2,}')
_WHITESPACE_PIECE = re.compile(r'<n>|<\|tab\|>|<\|blank_(\d+)\|>')


def blank_token(length):
    """The piece standing for `length` (2..80) spaces."""
    return f'<|blank_{length}|>'


def whitespace_tokens(max_blank_length=MAX_BLANK_LENGTH):
    """`<n>`, `<|tab|>`, `<|blank_2|>` .. `<|blank_{max}|>`: the pieces a ChatGLM-6B model file must hold."""
    return [LINEBREAK_TOKEN, TAB_TOKEN] + [blank_token(n) for n in range(2, max_blank_length + 1)]


def encode_whitespace(text, max_blank_length=MAX_BLANK_LENGTH):
    """ChatGLM-6B's rewriting of '\\n', '\\t' and runs of spaces into their pieces (the inverse of
    `decode_whitespace` on text without those piece strings)."""
    text = text.replace('\n', LINEBREAK_TOKEN).replace('\t', TAB_TOKEN)

    def blanks(match):
        full, rest = divmod(len(match.group()), max_blank_length)
        tail = blank_token(rest) if rest > 1 else ' ' * rest
        return blank_token(max_blank_length) * full + tail
    return _SPACE_RUN.sub(blanks, text)


def decode_whitespace(text, max_blank_length=MAX_BLANK_LENGTH):
    """`<n>`, `<|tab|>` and `<|blank_N|>` (2 <= N <= max) back to the whitespace they stand for."""
    def whitespace(match):
        if match.group(1) is None:
            return '\n' if match.group() == LINEBREAK_TOKEN else '\t'
        length = int(match.group(1))
        return ' ' * length if 2 <= length <= max_blank_length else match.group()
    return _WHITESPACE_PIECE.sub(whitespace, text)


@MindFormerRegister.register(MindFormerModuleType.TOKENIZER)
class ChatGLMTokenizer(SentencePieceTokenizer):
    """ChatGLM-6B tokenizer (see the module docstring for the text conventions).

    Ids are the model file's piece ids; `vocab_size` is its piece count (1008 for the tiny file; ChatGLM-6B's model
    pads its embedding to 130528 rows, more than its file has pieces). "你好" is
    `[5 ('▁'), 74874 ('你好'), 130001 ([gMASK]), 130004 (<sop>)]` with ChatGLM-6B's file.

    Args:
        vocab_file: the SentencePiece model (`ice_text.model`).
        bos_token, eos_token, unk_token, pad_token: `<sop>`, `<eop>`, `<unk>`, `<pad>`.
        mask_token, gmask_token: `[MASK]` and `[gMASK]` (`mask_token_id`, `gmask_token_id`).
        do_lower_case: lower-case the text before encoding (default False).
        remove_space: strip the text and collapse its whitespace runs to one space first (default False).
        num_image_tokens: must be 0: ice_text.model versions with 20000 image ids in front are not supported.
        padding_side: 'left' (the model expects left padding).
        **kwargs: BaseTokenizer options (truncation_side, model_max_length).

    All of `[MASK] [gMASK] [sMASK] <unused_0> <sop> <eop> <ENC> <dBLOCK>` are special: kept whole in the text and
    dropped by `skip_special_tokens`.
    """
    vocab_files_names = {'vocab_file': 'ice_text.model'}

    def __init__(self, vocab_file=None, bos_token='<sop>', eos_token='<eop>', unk_token='<unk>', pad_token='<pad>',
                 mask_token='[MASK]', gmask_token='[gMASK]', do_lower_case=False, remove_space=False,
                 num_image_tokens=0, padding_side='left', **kwargs):
        if num_image_tokens:
            raise ValueError(f"ChatGLMTokenizer: num_image_tokens={num_image_tokens} is not supported (only the "
                             f"ice_text.model without image tokens, ids [gMASK]=130001 <sop>=130004, is)")
        if list(kwargs.pop('additional_special_tokens', None) or GLM_SPECIAL_TOKENS) != list(GLM_SPECIAL_TOKENS):
            raise ValueError(f"ChatGLMTokenizer: additional_special_tokens are always {list(GLM_SPECIAL_TOKENS)}")
        for key in ('add_bos_token', 'add_eos_token'):
            if kwargs.pop(key, False):
                raise ValueError(f"ChatGLMTokenizer: {key} must be False (inputs end with [gMASK] <sop>; the "
                                 f"answer's <eop> is added by the dataset)")
        self.mask_token, self.gmask_token = mask_token, gmask_token
        self.do_lower_case, self.remove_space = bool(do_lower_case), bool(remove_space)
        super().__init__(vocab_file, mode='sentencepiece', unk_token=unk_token, bos_token=bos_token,
                         eos_token=eos_token, pad_token=pad_token, additional_special_tokens=list(GLM_SPECIAL_TOKENS),
                         padding_side=padding_side, **kwargs)
        for key in ('mask_token', 'gmask_token'):
            if self._token_to_id(getattr(self, key)) is None:
                raise ValueError(f"ChatGLMTokenizer: {key} {getattr(self, key)!r} is not a piece of {self.vocab_file}")
        self.init_kwargs.update(mask_token=mask_token, gmask_token=gmask_token, do_lower_case=self.do_lower_case,
                                remove_space=self.remove_space)

    @property
    def mask_token_id(self):
        return self.convert_tokens_to_ids(self.mask_token)

    @property
    def gmask_token_id(self):
        return self.convert_tokens_to_ids(self.gmask_token)

    def _piece_text(self, chunk, at_start):
        if self.remove_space:
            chunk = ' '.join(chunk.split())
        if self.do_lower_case:
            chunk = chunk.lower()
        return encode_whitespace(chunk)

    def _decode_runs(self, ids, keep_special):
        pad = self.pad_token_id
        return decode_whitespace(super()._decode_runs([i for i in ids if i != pad], keep_special))

    def build_inputs_with_special_tokens(self, ids):
        """`ids + [gMASK] <sop>`: the model reads everything up to `<sop>` bidirectionally and generates after it."""
        return list(ids) + [self.gmask_token_id, self.bos_token_id]

    def build_prompt(self, query, history=()):
        """ChatGLM-6B's chat prompt text for `query` after `history` = [(question, answer), ...]: the query itself
        without history, else `[Round 0]\\n问：...\\n答：...\\n` blocks; encode it to get the `[gMASK] <sop>` end."""
        return glm_chat_prompt(query, history or ())


@MindFormerRegister.register(MindFormerModuleType.PROCESSOR)
class GLMProcessor(BaseProcessor):
    """Tokenizes text for ChatGLM-6B (defaults: pad to `max_length` 128, on the tokenizer's side, MindSpore
    tensors)."""

    def __init__(self, tokenizer=None, max_length=128, padding='max_length', return_tensors='ms'):
        super().__init__(tokenizer, max_length, padding, return_tensors)
