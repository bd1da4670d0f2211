"""LlamaTokenizer: LLaMA / LLaMA-2's SentencePiece BPE (`tokenizer.model`: `<unk>` 0, `<s>` 1, `</s>` 2, byte
fallback), with ids equal to transformers 5.x `LlamaTokenizer` for the same model, and LLaMA-2 chat encoding."""
from mindformers.dataset.chat_templates import llama2_chat_turns
from mindformers.models.sentencepiece_tokenizer import SentencePieceTokenizer
from mindformers.tools.register import MindFormerRegister, MindFormerModuleType


@MindFormerRegister.register(MindFormerModuleType.TOKENIZER)
class LlamaTokenizer(SentencePieceTokenizer):
    """LLaMA tokenizer: any text encodes (characters without a piece are spelled with byte pieces `<0xNN>`) and
    decodes back unchanged. `<s>`, `</s>` and `<unk>` in the text are never split.

    By default (`legacy=False`) ids equal those of transformers 5.x
    `LlamaTokenizer.from_pretrained(dir_with_tokenizer_model, add_bos_token=True)` with `pad_token='<unk>'`,
    including decoding. `legacy=True` gives SentencePiece's own ids (`sp.encode(text)`, as Meta's reference code,
    transformers 4.x's slow tokenizer and MindFormers r1.0 do); the two differ only for text that starts with a
    space (' Hi': legacy '▁', '▁Hi'; default '▁Hi') or follows a special token ('<s>Hi': legacy '▁Hi', default
    'Hi').

    Args:
        vocab_file: the SentencePiece `tokenizer.model`.
        unk_token, bos_token, eos_token: `<unk>` (0), `<s>` (1), `</s>` (2).
        pad_token: `<unk>` (id 0): LLaMA has no pad piece; MindFormers pads with 0, and transformers (whose
            LlamaTokenizer has no pad token) pads with 0 once `pad_token = unk_token` is set.
        add_bos_token / add_eos_token: put BOS before / EOS after every sequence (True / False, as transformers).
        padding_side: 'left' (as transformers' LlamaTokenizer; batched generation needs left padding).
        add_prefix_space: put '▁' before the text, so its first word tokenizes like any other (default True).
        legacy: SentencePiece's own ids instead of transformers 5.x's (see above).
        **kwargs: BaseTokenizer options (truncation_side, model_max_length, additional_special_tokens).
    """

    def __init__(self, vocab_file=None, unk_token='<unk>', bos_token='<s>', eos_token='</s>', pad_token='<unk>',
                 add_bos_token=True, add_eos_token=False, padding_side='left', add_prefix_space=True, legacy=False,
                 **kwargs):
        super().__init__(vocab_file, mode='sentencepiece' if legacy else 'metaspace',
                         add_prefix_space=add_prefix_space, unk_token=unk_token, bos_token=bos_token,
                         eos_token=eos_token, pad_token=pad_token, add_bos_token=add_bos_token,
                         add_eos_token=add_eos_token, padding_side=padding_side, **kwargs)
        self.legacy = bool(legacy)
        self.init_kwargs.update(legacy=self.legacy, add_prefix_space=self.add_prefix_space)

    def encode_chat(self, query, history=(), system=None):
        """Ids of a LLaMA-2-chat prompt, as Meta's reference `chat_completion` builds them: each
        `[INST] ... [/INST]` turn of `llama2_chat_turns(query, history, system)` tokenized on its own with BOS,
        past turns (`history` = [(user, assistant), ...]) ending with their answer and EOS; the last turn ends at
        `[/INST]` (the model continues with the answer)."""
        if not isinstance(query, str):
            raise TypeError(f"LlamaTokenizer.encode_chat: query must be a string, got {type(query).__name__}")
        history = list(history)
        for i, turn in enumerate(history):
            if not (isinstance(turn, (list, tuple)) and len(turn) == 2 and all(isinstance(t, str) for t in turn)):
                raise TypeError(f"LlamaTokenizer.encode_chat: history[{i}] must be a (user, assistant) pair of "
                                f"strings, got {turn!r}")
        texts = llama2_chat_turns(query, history, system)
        ids = []
        for index, turn_ids in enumerate(self._tokenize_ids_batch(texts)):
            eos = [self.eos_token_id] if index < len(history) else []
            ids += [self.bos_token_id] + turn_ids + eos
        return ids


LlamaTokenizerFast = LlamaTokenizer
MindFormerRegister.register_cls(LlamaTokenizer, MindFormerModuleType.TOKENIZER, alias='LlamaTokenizerFast')
