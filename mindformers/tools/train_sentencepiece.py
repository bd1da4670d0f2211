"""Train a LLaMA-style SentencePiece model (`tokenizer.model`) deterministically.

    python -m mindformers.tools.train_sentencepiece --input corpus.txt [more.txt ...] --vocab_size 512 \\
        --output_dir out/ [--model_type bpe] [--character_coverage 0.998]

The settings are those of LLaMA's tokenizer: ids `<unk>` 0, `<s>` 1, `</s>` 2 (no pad piece), the 256 byte pieces
`<0x00>`..`<0xFF>` next (byte fallback, so any text encodes), digits split one by one, no normalization, runs of
spaces kept (whitespace-only pieces allowed) and a '▁' dummy prefix. The result loads with `LlamaTokenizer` /
`ChatGLM2Tokenizer` here and with HF `LlamaTokenizer.from_pretrained(<dir>)`.

Training is deterministic: one thread, the lines read in file order, and the model written without the input
paths or output prefix SentencePiece would otherwise record in it, so the same text and options give a
byte-identical file wherever it runs. The bundled tiny models were made with:

    python -m mindformers.tools.train_sentencepiece --vocab_size 512 --character_coverage 0.998 \\
        --input mindformers/assets/corpus/tiny_shakespeare.txt mindformers/assets/corpus/tiny_chinese.txt \\
        --output_dir mindformers/assets/llama_tiny
    (the same with --vocab_size 507 and --output_dir mindformers/assets/glm2_tiny)

`--character_coverage` is the share of the corpus' characters that get a piece of their own; the rarer ones are
spelled with byte pieces. A small vocabulary needs it below 1 (the tiny models: 0.998 gives the ~60 most common
Chinese characters).

`--layout chatglm` lays the model out as ChatGLM-6B's `ice_text.model`: `<pad>` at id 3, then `<n>`, `<|tab|>` and
`<|blank_2|>`..`<|blank_80|>` as user-defined pieces (4..84), the byte pieces, the trained pieces, and after the
`--vocab_size` pieces the eight GLM special tokens `[MASK] [gMASK] [sMASK] <unused_0> <sop> <eop> <ENC> <dBLOCK>`
as control pieces; the file is `ice_text.model`. The bundled `assets/glm_tiny/ice_text.model` (1000 + 8 pieces) is

    python -m mindformers.tools.train_sentencepiece --layout chatglm --vocab_size 1000 --character_coverage 0.9995 \\
        --input mindformers/assets/corpus/tiny_shakespeare.txt mindformers/assets/corpus/tiny_chinese.txt \\
        --output_dir mindformers/assets/glm_tiny
"""
import argparse
import sys

from mindformers.tools.utils import cli_error
from mindformers.models.sentencepiece_training import (LAYOUTS, MODEL_FILE, MODEL_TYPES, layout_options,  # noqa: F401
                                                       save_model, train_sentencepiece)


def main(argv=None):
    parser = argparse.ArgumentParser(prog='python -m mindformers.tools.train_sentencepiece',
                                     description="Train a LLaMA-style SentencePiece tokenizer.model (byte fallback, "
                                                 "<unk> 0, <s> 1, </s> 2), deterministically.")
    parser.add_argument('--input', nargs='+', required=True, help="one or more UTF-8 text files")
    parser.add_argument('--vocab_size', type=int, required=True, help="number of pieces, special and byte included")
    parser.add_argument('--output_dir', required=True, help=f"directory for {MODEL_FILE} (ice_text.model with "
                                                            f"--layout chatglm)")
    parser.add_argument('--layout', choices=LAYOUTS, default='llama',
                        help="llama (default) or chatglm: ChatGLM-6B's pad, whitespace and special pieces "
                             "(--vocab_size counts the trained pieces, the 8 specials come after)")
    parser.add_argument('--model_type', choices=MODEL_TYPES, default='bpe', help="default bpe (as LLaMA)")
    parser.add_argument('--character_coverage', type=float, default=0.9995,
                        help="share of characters given their own piece, 0.98 to 1 (default 0.9995)")
    args = parser.parse_args(argv)
    try:
        options, file_name = layout_options(args.layout)
        model = train_sentencepiece(args.input, args.vocab_size, args.model_type, args.character_coverage,
                                    **options)
        path = save_model(model, args.output_dir, file_name)
    except (OSError, ValueError) as err:
        return cli_error('train_sentencepiece', err, 2)
    print(f"wrote {path} ({args.vocab_size + len(options.get('control_pieces', ()))} pieces)")
    return 0


if __name__ == '__main__':
    sys.exit(main())
