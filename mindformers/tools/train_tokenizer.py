"""Train a GPT-2-style byte-level BPE tokenizer and write it as GPT-2 `vocab.json` + `merges.txt`.

    python -m mindformers.tools.train_tokenizer --input corpus.txt [more.txt ...] --vocab_size 2048 --output_dir out/

The result loads with `GPT2Tokenizer(vocab_file, merges_file)` here and with HF `GPT2TokenizerFast`. Training is
deterministic: the same inputs and options give byte-identical files.
"""
import argparse
import sys

from mindformers.tools.utils import cli_error
from mindformers.models.bpe_training import ENDOFTEXT, save_gpt2_files, train_byte_level_bpe  # noqa: F401


def main(argv=None):
    parser = argparse.ArgumentParser(description="Train a GPT-2-style byte-level BPE tokenizer "
                                                 "(writes vocab.json and merges.txt).")
    parser.add_argument('--input', nargs='+', required=True, help="one or more UTF-8 text files")
    parser.add_argument('--vocab_size', type=int, required=True, help="total vocabulary size, special tokens included")
    parser.add_argument('--output_dir', required=True, help="directory for vocab.json and merges.txt")
    parser.add_argument('--min_frequency', type=int, default=2, help="minimum pair count for a merge (default 2)")
    args = parser.parse_args(argv)
    try:
        tokenizer = train_byte_level_bpe(args.input, args.vocab_size, args.min_frequency)
        paths = save_gpt2_files(tokenizer, args.output_dir)
    except (OSError, ValueError) as err:
        return cli_error('train_tokenizer', err, 2)
    size = tokenizer.get_vocab_size()
    if size < args.vocab_size:
        print(f"train_tokenizer: note: the corpus only supports {size} tokens (asked for {args.vocab_size})",
              file=sys.stderr)
    print(f"wrote {paths[0]} and {paths[1]} ({size} tokens)")
    return 0


if __name__ == '__main__':
    sys.exit(main())
