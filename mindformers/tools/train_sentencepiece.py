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
import io
import os
import sys

import sentencepiece as spm

MODEL_FILE = 'tokenizer.model'
NUM_META_PIECES = 3  # <unk>, <s>, </s>
NUM_BYTE_PIECES = 256
MODEL_TYPES = ('bpe', 'unigram')
LAYOUTS = ('llama', 'chatglm')


def layout_options(layout):
    """train_sentencepiece keyword arguments and the file name of a `--layout`."""
    if layout == 'llama':
        return {}, MODEL_FILE
    if layout == 'chatglm':
        from mindformers.models.glm.chatglm_6b_tokenizer import GLM_SPECIAL_TOKENS, whitespace_tokens
        return dict(pad_id=3, user_defined_symbols=whitespace_tokens(),
                    control_pieces=GLM_SPECIAL_TOKENS), 'ice_text.model'
    raise ValueError(f"layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")


def train_sentencepiece(files, vocab_size, model_type='bpe', character_coverage=0.9995, pad_id=-1,
                        user_defined_symbols=(), control_pieces=()):
    """Train on the UTF-8 text `files` (one sentence per line, blank lines skipped); returns the serialized model
    (the bytes of a `tokenizer.model`).

    `pad_id` (-1: none) places a `<pad>` piece; `user_defined_symbols` are pieces matched whole in any text,
    placed right after the special pieces; `control_pieces` are appended after the `vocab_size` trained pieces
    (ids vocab_size, vocab_size + 1, ...) as control pieces, which SentencePiece never produces from text."""
    files = [os.fspath(f) for f in files]
    if not files:
        raise ValueError("train_sentencepiece needs at least one input file")
    for path in files:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"SentencePiece training input {path!r} does not exist")
    if model_type not in MODEL_TYPES:
        raise ValueError(f"model_type must be one of {', '.join(MODEL_TYPES)}, got {model_type!r}")
    reserved = NUM_META_PIECES + (pad_id >= 0) + len(user_defined_symbols)
    smallest = reserved + NUM_BYTE_PIECES + 1
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < smallest:
        raise ValueError(f"vocab_size must be an int >= {smallest} ({reserved} special pieces + "
                         f"{NUM_BYTE_PIECES} byte pieces + at least one more), got {vocab_size!r}")
    if not 0.98 <= character_coverage <= 1:  # SentencePiece's own limits
        raise ValueError(f"character_coverage must be in [0.98, 1], got {character_coverage!r}")
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=_lines(files), model_writer=model, vocab_size=vocab_size, model_type=model_type,
            character_coverage=character_coverage, byte_fallback=True, split_digits=True,
            allow_whitespace_only_pieces=True, normalization_rule_name='identity', remove_extra_whitespaces=False,
            add_dummy_prefix=True, unk_id=0, bos_id=1, eos_id=2, pad_id=pad_id,
            user_defined_symbols=list(user_defined_symbols), num_threads=1, max_sentence_length=1 << 16,
            minloglevel=2)
    except RuntimeError as err:
        raise ValueError(f"SentencePiece training on {', '.join(files)} failed (vocab_size={vocab_size}, "
                         f"character_coverage={character_coverage}): {err}") from None
    if not control_pieces:
        return model.getvalue()
    from sentencepiece import sentencepiece_model_pb2
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(model.getvalue())
    known = {piece.piece for piece in proto.pieces}
    for piece in control_pieces:
        if piece in known:
            raise ValueError(f"control piece {piece!r} is already a piece of the trained model")
        proto.pieces.append(sentencepiece_model_pb2.ModelProto.SentencePiece(
            piece=piece, score=0.0, type=sentencepiece_model_pb2.ModelProto.SentencePiece.CONTROL))
        known.add(piece)
    return proto.SerializeToString()


def save_model(model, output_dir, name=MODEL_FILE):
    """Write the serialized model to `output_dir/name` (atomically); returns the path."""
    os.makedirs(output_dir, exist_ok=True)
    path = os.path.join(output_dir, name)
    with open(path + '.tmp', 'wb') as f:
        f.write(model)
    os.replace(path + '.tmp', path)
    return path


def _lines(files):
    for path in files:
        with open(path, encoding='utf-8') as f:
            for line in f:
                line = line.rstrip('\r\n')
                if line:
                    yield line


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
        print(f"train_sentencepiece: error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {path} ({args.vocab_size + len(options.get('control_pieces', ()))} pieces)")
    return 0


if __name__ == '__main__':
    sys.exit(main())
