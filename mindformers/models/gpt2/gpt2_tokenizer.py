"""GPT2Tokenizer: GPT-2's byte-level BPE, run by the `tokenizers` library from `vocab.json` + `merges.txt` (or the
BPE inside a HuggingFace `tokenizer.json`)."""
import json
import os
import shutil

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

from mindformers.models.base_tokenizer import BaseTokenizer
from mindformers.tools.register import MindFormerRegister, MindFormerModuleType
from mindformers.tools.utils import resolve_path

ENDOFTEXT = '<|endoftext|>'


@MindFormerRegister.register(MindFormerModuleType.TOKENIZER)
class GPT2Tokenizer(BaseTokenizer):
    """GPT-2 tokenizer: byte-level BPE, so any text (any language, emoji, whitespace runs) encodes losslessly.

    A word's first token differs with and without a leading space ('Hello' vs ' Hello'); `add_prefix_space=True`
    adds a space before the text. Special tokens (`<|endoftext|>` by default) are never split, also inside text.

    As in MindFormers, every text gets `<|endoftext|>` before and after it (`add_bos_token=True`,
    `add_eos_token=True`) and calls return `token_type_ids` (all 0): with GPT-2's files, `tokenizer("hello!")` is
    `{'input_ids': [50256, 31373, 0, 50256], 'token_type_ids': [0, 0, 0, 0], 'attention_mask': [1, 1, 1, 1]}`.
    With `add_bos_token=False, add_eos_token=False` the ids are those of HF `GPT2TokenizerFast(vocab_file,
    merges_file)`; a HuggingFace `tokenizer_config.json` that does not set the two flags loads with them False (HF's
    meaning), while a directory holding only vocab.json + merges.txt gets MindFormers' defaults. Generation prompts
    (`encode_prompt`) get the BOS but never the EOS; data preprocessing encodes with `add_special_tokens=False` and
    puts its own EOS between documents.

    Args:
        vocab_file, merges_file: GPT-2 `vocab.json` and `merges.txt`; paths may be relative to the working
            directory, the package (`assets/gpt2_tiny/vocab.json`) or the repository.
        tokenizer_file: instead of those two, a HuggingFace `tokenizer.json` holding a BPE model (what
            transformers writes for GPT-2); its vocabulary and merges are used.
        unk_token, bos_token, eos_token, pad_token: special tokens (all `<|endoftext|>` by default).
        add_prefix_space: add a space before the text, so its first word tokenizes like any other.
        add_bos_token / add_eos_token: put `bos_token` before / `eos_token` after every sequence when
            `add_special_tokens=True` (both True, as MindFormers; False and False give HF's ids).
        **kwargs: BaseTokenizer options (padding_side, truncation_side, model_max_length, ...).
    """
    vocab_files_names = {'vocab_file': 'vocab.json', 'merges_file': 'merges.txt', 'tokenizer_file': 'tokenizer.json'}
    model_input_names = ('input_ids', 'token_type_ids', 'attention_mask')
    foreign_config_defaults = {'add_bos_token': False, 'add_eos_token': False}  # HF's GPT-2 adds neither

    def __init__(self, vocab_file=None, merges_file=None, unk_token=ENDOFTEXT, bos_token=ENDOFTEXT,
                 eos_token=ENDOFTEXT, pad_token=ENDOFTEXT, add_prefix_space=False, add_bos_token=True,
                 add_eos_token=True, tokenizer_file=None, **kwargs):
        super().__init__(bos_token=bos_token, eos_token=eos_token, unk_token=unk_token, pad_token=pad_token,
                         add_bos_token=add_bos_token, add_eos_token=add_eos_token, **kwargs)
        if vocab_file is None and merges_file is None and tokenizer_file is not None:
            self.vocab_file = self.merges_file = None
            self.vocab, self.merges = _bpe_from_tokenizer_json(
                _existing_file(tokenizer_file, 'tokenizer_file', "a HuggingFace tokenizer.json"))
            bpe = models.BPE(self.vocab, self.merges)
        else:
            if vocab_file is None and merges_file is None:
                raise ValueError("GPT2Tokenizer needs vocab_file and merges_file (GPT-2's vocab.json and "
                                 "merges.txt) or tokenizer_file (a HuggingFace tokenizer.json)")
            self.vocab_file = _existing_file(vocab_file, 'vocab_file', "GPT-2's vocab.json")
            self.merges_file = _existing_file(merges_file, 'merges_file', "GPT-2's merges.txt")
            self.vocab = self.merges = None
            try:
                bpe = models.BPE.from_file(self.vocab_file, self.merges_file)
            except Exception as err:  # the Rust side raises a bare Exception for unreadable files
                raise ValueError(f"GPT2Tokenizer: cannot read the BPE files vocab_file={self.vocab_file!r} and "
                                 f"merges_file={self.merges_file!r}: {err}") from err
        self._tokenizer = Tokenizer(bpe)
        self._tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=add_prefix_space)
        self._tokenizer.decoder = decoders.ByteLevel()
        # special tokens already in vocab.json keep their ids; others are appended after the vocabulary
        self._tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                            for t in self.all_special_tokens])
        self.add_prefix_space = add_prefix_space
        self.init_kwargs.update(vocab_file=self.vocab_file, merges_file=self.merges_file,
                                add_prefix_space=add_prefix_space)

    def _tokenize_ids(self, text):
        return self._tokenizer.encode(text, add_special_tokens=False).ids

    def _tokenize_ids_batch(self, texts):
        return [enc.ids for enc in self._tokenizer.encode_batch(texts, add_special_tokens=False)]

    def _decode(self, ids):
        return self._tokenizer.decode(ids, skip_special_tokens=False)

    def get_vocab(self):
        return self._tokenizer.get_vocab(with_added_tokens=True)

    @property
    def vocab_size(self):
        return self._tokenizer.get_vocab_size(with_added_tokens=False)

    def __len__(self):
        return self._tokenizer.get_vocab_size(with_added_tokens=True)

    def _token_to_id(self, token):
        return self._tokenizer.token_to_id(token)

    def _id_to_token(self, index):
        return self._tokenizer.id_to_token(index)

    def save_vocabulary(self, save_directory):
        """Write vocab.json and merges.txt into `save_directory`; returns their paths."""
        vocab_path, merges_path = (os.path.join(save_directory, n) for n in ('vocab.json', 'merges.txt'))
        if self.vocab_file is None:
            with open(vocab_path, 'w', encoding='utf-8') as f:
                json.dump(self.vocab, f, ensure_ascii=False)
            with open(merges_path, 'w', encoding='utf-8') as f:
                f.write('#version: 0.2\n' + ''.join(f"{a} {b}\n" for a, b in self.merges))
            return vocab_path, merges_path
        for source, target in ((self.vocab_file, vocab_path), (self.merges_file, merges_path)):
            if not (os.path.exists(target) and os.path.samefile(source, target)):
                shutil.copyfile(source, target)
        return vocab_path, merges_path


GPT2TokenizerFast = GPT2Tokenizer
MindFormerRegister.register_cls(GPT2Tokenizer, MindFormerModuleType.TOKENIZER, alias='GPT2TokenizerFast')


def _bpe_from_tokenizer_json(path):
    """(vocab {token: id}, merges [(a, b)]) of the BPE model in a HuggingFace tokenizer.json."""
    with open(path, encoding='utf-8') as f:
        model = json.load(f).get('model') or {}
    if model.get('type') != 'BPE' or 'vocab' not in model or 'merges' not in model:
        raise ValueError(f"GPT2Tokenizer: {path} does not hold a BPE model with vocab and merges "
                         f"(model type {model.get('type')!r})")
    merges = [tuple(m.split(' ', 1)) if isinstance(m, str) else tuple(m) for m in model['merges']]
    return model['vocab'], merges


def _existing_file(path, arg, what):
    if not path:
        raise ValueError(f"GPT2Tokenizer needs {arg} (the path to {what}), got {path!r}")
    resolved = resolve_path(os.fspath(path))
    if not os.path.isfile(resolved):
        raise FileNotFoundError(f"GPT2Tokenizer: {arg} {os.fspath(path)!r} not found (looked in the working "
                                f"directory, the mindformers package and the repository root)")
    return os.path.abspath(resolved)
