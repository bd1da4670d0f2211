"""Train a GPT-2-style byte-level BPE tokenizer and write it as GPT-2 `vocab.json` + `merges.txt`; the command line
is `python -m mindformers.tools.train_tokenizer`. Deterministic: the same inputs and options give byte-identical
files."""
import json
import os

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from mindformers.tools.file_io import write_atomic

ENDOFTEXT = '<|endoftext|>'
BYTE_ALPHABET_SIZE = 256


def train_byte_level_bpe(files, vocab_size, min_frequency=2, special_tokens=(ENDOFTEXT,)):
    """Train a byte-level BPE on text `files`; returns a `tokenizers.Tokenizer`.

    Special tokens take the first ids (`<|endoftext|>` is 0), then the 256 byte symbols, then one id per merge."""
    files = [str(f) for f in files]
    if not files:
        raise ValueError("train_byte_level_bpe needs at least one input file")
    for path in files:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"tokenizer training input {path!r} does not exist")
    smallest = len(special_tokens) + BYTE_ALPHABET_SIZE
    if vocab_size < smallest:
        raise ValueError(f"vocab_size must be >= {smallest} ({len(special_tokens)} special tokens + "
                         f"{BYTE_ALPHABET_SIZE} byte symbols), got {vocab_size}")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                  special_tokens=list(special_tokens),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train(files, trainer)
    return tokenizer


def save_gpt2_files(tokenizer, output_dir):
    """Write `vocab.json` (token -> id, one per line in id order) and `merges.txt` (`#version: 0.2` header, then
    one `left right` pair per line in merge order) for a trained BPE `tokenizer`. Returns the two paths."""
    model = json.loads(tokenizer.to_str())['model']
    vocab = dict(sorted(model['vocab'].items(), key=lambda item: item[1]))
    # tokenizers >= 0.20 serializes merges as [left, right] pairs, older versions as "left right" strings
    merges = [' '.join(pair) if isinstance(pair, list) else pair for pair in model['merges']]
    os.makedirs(output_dir, exist_ok=True)
    vocab_path = os.path.join(output_dir, 'vocab.json')
    merges_path = os.path.join(output_dir, 'merges.txt')
    write_atomic(vocab_path, json.dumps(vocab, ensure_ascii=False, indent=0) + '\n')
    write_atomic(merges_path, '#version: 0.2\n' + ''.join(m + '\n' for m in merges))
    return vocab_path, merges_path

