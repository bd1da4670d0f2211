"""Train a LLaMA-style SentencePiece model (`tokenizer.model`) deterministically; the command line is
`python -m mindformers.tools.train_sentencepiece` (its help describes the settings and the bundled models).

`train_sentencepiece(files, vocab_size, ...) -> bytes` (the serialized model), `layout_options(layout)` (the keyword
arguments and file name of `llama` or `chatglm`), `save_model(model, output_dir, name)`. The same text and options
give a byte-identical model wherever it runs."""
import io
import os

import sentencepiece as spm

from mindformers.tools.file_io import write_atomic

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
    return write_atomic(os.path.join(output_dir, name), model)


def _lines(files):
    for path in files:
        with open(path, encoding='utf-8') as f:
            for line in f:
                line = line.rstrip('\r\n')
                if line:
                    yield line
