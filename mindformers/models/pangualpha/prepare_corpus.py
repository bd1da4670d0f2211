"""PanGu-alpha SentencePiece training text: each paragraph (lines up to a blank line) of the input files on one line,
cut into jieba words with ' ' -> '▂' and newline -> '▃' (`pangualpha_tokenizer.segment`).

    python -m mindformers.models.pangualpha.prepare_corpus --input a.txt [b.txt ...] --output corpus.txt
"""
import argparse
import sys

from mindformers.models.pangualpha.pangualpha_tokenizer import segment
from mindformers.tools.file_io import write_atomic
from mindformers.tools.utils import cli_error


def preprocess_corpus(paths):
    """Lines of SentencePiece training text: each paragraph of each file (its lines up to a blank line, newlines
    kept) through `segment`."""
    for path in paths:
        with open(path, encoding='utf-8') as f:
            paragraphs = f.read().split('\n\n')
        for paragraph in paragraphs:
            paragraph = paragraph.strip('\n')
            if paragraph:
                yield segment(paragraph)


def main(argv=None):
    parser = argparse.ArgumentParser(prog='python -m mindformers.models.pangualpha.prepare_corpus',
                                     description="Write PanGu-alpha SentencePiece training text (jieba words, "
                                                 "' '->'▂', newline->'▃', one paragraph per line).")
    parser.add_argument('--input', nargs='+', required=True, help="UTF-8 text files")
    parser.add_argument('--output', required=True, help="the text file to write")
    args = parser.parse_args(argv)
    try:
        lines = list(preprocess_corpus(args.input))
        write_atomic(args.output, ''.join(line + '\n' for line in lines))
    except OSError as err:
        return cli_error('prepare_corpus', err, 2)
    print(f"wrote {args.output} ({len(lines)} lines)")
    return 0


if __name__ == '__main__':
    sys.exit(main())
