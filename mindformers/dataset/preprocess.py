"""Raw text and JSON records -> token samples: the library under the dataset_preprocess CLIs and the in-memory
loaders (`TextCorpusDataset`, `ADGenDataLoader`).

Inputs are `.txt` files (one document per file, or per non-blank line) and `.jsonl`/`.json` files (one JSON object
per line, or one JSON array of records). Every error names the file and line (and record) at fault.
"""
import glob
import json
import os

import numpy as np

from mindformers.tools.utils import resolve_path

JSONL_SUFFIXES = ('.jsonl', '.json')
SCANNED_SUFFIXES = ('.txt',) + JSONL_SUFFIXES
IGNORE_INDEX = -100
_WHITESPACE = ' \t\r\n'


class PreprocessError(ValueError):
    """Bad preprocessing input; the message names the file (and line) at fault."""


class UsageError(PreprocessError):
    """A path or option the caller gave cannot be used (the CLIs exit 2 for it, 1 for other PreprocessErrors)."""


# ----------------------------------------------------------------------------- finding and decoding files
def expand_inputs(inputs):
    """Expand files, directories (searched recursively for .txt/.jsonl/.json) and glob patterns into a list of
    files, in the order given, without duplicates. A path or pattern matching nothing raises UsageError."""
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    files = []
    for item in inputs:
        path = resolve_path(os.fspath(item))
        if os.path.isfile(path):
            found = [path]
        elif os.path.isdir(path):
            found = sorted(os.path.join(root, name) for root, _, names in os.walk(path) for name in names
                           if name.lower().endswith(SCANNED_SUFFIXES) and not name.startswith('.'))
            if not found:
                raise UsageError(f"no .txt, .jsonl or .json files in directory {path}")
        elif any(c in path for c in '*?['):
            found = sorted(p for p in glob.glob(path, recursive=True) if os.path.isfile(p))
            if not found:
                raise UsageError(f"no files match {path!r}")
        else:
            raise UsageError(f"input not found: {path}")
        files.extend(found)
    return list(dict.fromkeys(files))


def _decode(raw, path, lineno=None):
    try:
        return raw.decode('utf-8-sig' if lineno in (None, 1) else 'utf-8')
    except UnicodeDecodeError as err:
        where = f"{path}:{lineno}" if lineno else path
        raise PreprocessError(f"{where}: not valid UTF-8 (byte offset {err.start})") from None


# ----------------------------------------------------------------------------- raw text documents
def _json_text(line, path, lineno, text_key):
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        raise PreprocessError(f"{path}:{lineno}: bad JSON line: {err.msg} (column {err.colno})") from None
    if not isinstance(record, dict):
        raise PreprocessError(f"{path}:{lineno}: expected a JSON object per line, got {type(record).__name__}")
    if text_key not in record:
        fields = ', '.join(map(repr, record)) or 'none'
        raise PreprocessError(f"{path}:{lineno}: no field {text_key!r} (fields: {fields}); choose the text field "
                              f"with text_key / --text_key")
    text = record[text_key]
    if not isinstance(text, str):
        raise PreprocessError(f"{path}:{lineno}: field {text_key!r} is {type(text).__name__}, expected a string")
    return text


def iter_documents(files, text_key='text', split_lines=False, on_bytes=None, with_where=False):
    """Yield the documents of `files` as strings: a whole `.txt` file (with `split_lines`, each line), or the
    `text_key` field of each line of a `.jsonl`/`.json` file. Blank documents are skipped. `on_bytes(n)` is called
    with the number of bytes read, for progress reporting. `with_where`: yield (where, text), where = "file" or
    "file:line", for messages about a document."""
    for path in files:
        jsonl = path.lower().endswith(JSONL_SUFFIXES)
        with open(path, 'rb') as f:
            if not jsonl and not split_lines:
                raw = f.read()
                if on_bytes:
                    on_bytes(len(raw))
                text = _decode(raw, path)
                if text.strip():
                    yield (path, text) if with_where else text
                continue
            for lineno, raw in enumerate(f, 1):
                if on_bytes:
                    on_bytes(len(raw))
                line = _decode(raw, path, lineno)
                if not line.strip():
                    continue
                text = _json_text(line, path, lineno, text_key) if jsonl else line.rstrip('\r\n')
                if text.strip():
                    yield (f"{path}:{lineno}", text) if with_where else text


# ----------------------------------------------------------------------------- JSON records
def _first_char(path):
    with open(path, 'rb') as f:
        head = f.read(1 << 16)
    head = head[3:] if head.startswith(b'\xef\xbb\xbf') else head
    head = head.lstrip(_WHITESPACE.encode())
    return head[:1].decode('latin-1')


def _array_records(path, on_bytes=None):
    """(index, line, record) of a file holding one JSON array, parsed record by record to know each one's line."""
    with open(path, 'rb') as f:
        raw = f.read()
    text = _decode(raw, path)
    ratio, reported = len(raw) / max(len(text), 1), 0
    decoder = json.JSONDecoder()

    def skip(pos):
        while pos < len(text) and text[pos] in _WHITESPACE:
            pos += 1
        return pos

    def fail(pos, what):
        line = text.count('\n', 0, pos) + 1
        raise PreprocessError(f"{path}:{line}: {what} (column {pos - text.rfind(chr(10), 0, pos)})")

    pos, line, last, index = skip(skip(0) + 1), 1, 0, 0  # just past the opening '['
    closed = pos < len(text) and text[pos] == ']'
    while not closed:
        line += text.count('\n', last, pos)
        last = pos
        try:
            record, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as err:
            raise PreprocessError(f"{path}:{err.lineno}: record {index}: bad JSON: {err.msg} "
                                  f"(column {err.colno})") from None
        if on_bytes:
            on_bytes(int((end - pos) * ratio))
            reported += int((end - pos) * ratio)
        yield index, line, record
        pos = skip(end)
        closed = pos < len(text) and text[pos] == ']'
        if not closed:
            if pos >= len(text) or text[pos] != ',':
                fail(pos, f"expected ',' or ']' after record {index}")
            pos, index = skip(pos + 1), index + 1
    if skip(pos + 1) < len(text):
        fail(skip(pos + 1), "unexpected text after the JSON array")
    if on_bytes:
        on_bytes(max(len(raw) - reported, 0))


def _json_line(line, where):
    try:
        return json.loads(line)
    except json.JSONDecodeError as err:
        raise PreprocessError(f"{where}: bad JSON line: {err.msg} (column {err.colno}; expected a JSON array of "
                              f"records, or one JSON object per line)") from None


def _line_records(path, on_bytes=None):
    """(index, line, record) of a JSON-lines file; blank lines are skipped."""
    index = 0
    with open(path, 'rb') as f:
        for lineno, raw in enumerate(f, 1):
            if on_bytes:
                on_bytes(len(raw))
            line = _decode(raw, path, lineno)
            if line.strip():
                yield index, lineno, _json_line(line, f"{path}:{lineno}: record {index}")
                index += 1


def iter_records(files, on_bytes=None):
    """Yield (where, record) for every record of `files`: each file is one JSON array of records, or one JSON
    object per line. `where` ("file:line: record i") names the record in error messages."""
    for path in files:
        first = _first_char(path)
        if not first:
            raise PreprocessError(f"{path}: empty file (expected a JSON array of records, or one JSON object per "
                                  f"line)")
        records = _array_records(path, on_bytes) if first == '[' else _line_records(path, on_bytes)
        for index, line, record in records:
            yield f"{path}:{line}: record {index}", record


def _text(value, where, key, what=None):
    if not isinstance(value, str):
        raise PreprocessError(f"{where}: {key!r} is {type(value).__name__}, expected a string")
    if what and not value.strip():
        raise PreprocessError(f"{where}: {what} ({key!r} is blank)")
    return value


def _require(record, key, where, hint=''):
    if not isinstance(record, dict):
        raise PreprocessError(f"{where}: expected a JSON object, got {type(record).__name__}")
    if key not in record:
        fields = ', '.join(map(repr, record)) or 'none'
        raise PreprocessError(f"{where}: missing key {key!r} (keys: {fields}){hint}")
    return record[key]


# ----------------------------------------------------------------------------- token ids
def tokenizer_vocab_size(tokenizer):
    """Number of ids `tokenizer` can produce (`len(tokenizer)`, else its `vocab_size`); None if it does not say."""
    for size in (lambda: len(tokenizer), lambda: tokenizer.vocab_size):
        try:
            return int(size())
        except (TypeError, AttributeError, NotImplementedError):
            continue
    return None


def check_token_ids(ids, vocab_size, where, what='the tokenizer'):
    """Raise PreprocessError naming `where` when an id of `ids` is negative or >= `vocab_size` (None: not checked)."""
    ids = np.asarray(ids)
    if not ids.size:
        return
    low, high = int(ids.min()), int(ids.max())
    if low < 0:
        raise PreprocessError(f"{where}: token id {low} from {what} is negative")
    if vocab_size is not None and high >= vocab_size:
        raise PreprocessError(f"{where}: token id {high} from {what} is outside the tokenizer's vocabulary of "
                              f"{vocab_size} ids")


# ----------------------------------------------------------------------------- causal LM samples
def iter_lm_samples(texts, tokenizer, seq_length, stats=None, block_tokens=1 << 20):
    """Tokenize `texts` (`tokenizer.encode(text, add_special_tokens=False)`, blank texts skipped), append
    `tokenizer.eos_token_id` to each, concatenate, and yield int32 arrays [n, seq_length + 1] of consecutive
    samples (about `block_tokens` tokens each). `texts` may also be (where, text) pairs (see `iter_documents`),
    named in errors. `stats` (a dict, if given) is kept up to date: documents, tokens (EOS included), samples,
    dropped_tokens (the tail shorter than one sample), seq_length. Raises PreprocessError when the text does not
    fill a single sample, or when the tokenizer gives an id outside its vocabulary."""
    seq_length = int(seq_length)
    if seq_length < 1:
        raise PreprocessError(f"seq_length must be >= 1, got {seq_length}")
    eos = getattr(tokenizer, 'eos_token_id', None)
    if eos is None:
        raise PreprocessError(f"{type(tokenizer).__name__} has no eos_token_id: documents need an EOS separator")
    vocab_size = tokenizer_vocab_size(tokenizer)
    if isinstance(texts, str):
        texts = [texts]
    width = seq_length + 1
    stats = {} if stats is None else stats
    stats.update(documents=0, tokens=0, samples=0, dropped_tokens=0, seq_length=seq_length)
    pending, pending_len = [], 0

    def cut(final):
        nonlocal pending, pending_len
        flat = np.concatenate(pending) if len(pending) > 1 else pending[0]
        rows = len(flat) // width
        tail = flat[rows * width:]
        pending, pending_len = ([tail] if len(tail) else []), len(tail)
        stats['samples'] += rows
        if final:
            stats['dropped_tokens'] = len(tail)
        return flat[:rows * width].reshape(rows, width)

    for item in texts:
        where, text = item if isinstance(item, tuple) else (f"document {stats['documents'] + 1}", item)
        if not text.strip():
            continue
        ids = tokenizer.encode(text, add_special_tokens=False)
        doc = np.empty(len(ids) + 1, dtype=np.int64)
        doc[:-1] = ids
        doc[-1] = eos
        check_token_ids(doc, vocab_size, where, f"{type(tokenizer).__name__} (EOS included)")
        pending.append(doc.astype(np.int32))
        pending_len += len(doc)
        stats['documents'] += 1
        stats['tokens'] += len(doc)
        if pending_len >= max(block_tokens, width):
            yield cut(final=False)
    if pending:
        block = cut(final=True)
        if len(block):
            yield block
    if stats['samples'] == 0:
        raise PreprocessError(f"too little text: {stats['tokens']} token(s) from {stats['documents']} document(s), "
                              f"but one sample needs seq_length + 1 = {width} tokens")


def build_lm_samples(texts, tokenizer, seq_length):
    """In-memory `iter_lm_samples`: returns (int32 array [N, seq_length + 1], stats dict)."""
    stats = {}
    blocks = list(iter_lm_samples(texts, tokenizer, seq_length, stats))
    return np.concatenate(blocks), stats


# ----------------------------------------------------------------------------- prompt-masked samples
def pack_sample(ids, trained, seq_length, pad_id, drop_long=False):
    """(status, input_ids, labels) for one encoded sample: int32 arrays of seq_length + 1, labels -100 where not
    trained and on padding. status: 'ok', 'truncated' (cut at the end), 'too_long' (dropped by `drop_long`) or
    'answer_cut' (no trained token left after cutting); the arrays are None for the dropped ones."""
    width = int(seq_length) + 1
    status = 'ok'
    if len(ids) > width:
        if drop_long:
            return 'too_long', None, None
        ids, trained, status = ids[:width], trained[:width], 'truncated'
    if not any(trained[1:]):  # labels[0] is never a target
        return 'answer_cut', None, None
    input_ids = np.full(width, pad_id, dtype=np.int32)
    labels = np.full(width, IGNORE_INDEX, dtype=np.int32)
    input_ids[:len(ids)] = ids
    labels[:len(ids)] = np.where(trained, input_ids[:len(ids)], IGNORE_INDEX)
    return status, input_ids, labels
