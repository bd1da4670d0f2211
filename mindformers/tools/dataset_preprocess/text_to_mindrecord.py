"""Raw text -> fixed-length token samples -> MindRecord, for causal language model pretraining.

    python -m mindformers.tools.dataset_preprocess.text_to_mindrecord --input corpus/ extra/*.jsonl \
        --tokenizer GPT2Tokenizer --vocab_file vocab.json --merges_file merges.txt \
        --seq_length 1024 --output_file data/train.mindrecord

Each document is tokenized without special tokens and followed by EOS; the documents are concatenated and cut into
samples of `seq_length + 1` tokens (the model reads tokens [:-1] and predicts [1:]); a tail shorter than one sample is
dropped. Inputs: `.txt` files (one document per file, or per non-blank line with `--split_lines`) and `.jsonl`/`.json`
files (one JSON object per line, text under `--text_key`). Output: int32 column `input_ids` of shape
[seq_length + 1], written atomically. `build_lm_samples` is the same pipeline in memory.
"""
import argparse
import glob
import json
import os
import shutil
import sys
import tempfile
import time

import numpy as np

from mindformers.tools.utils import resolve_path

PROG = 'text_to_mindrecord'
JSONL_SUFFIXES = ('.jsonl', '.json')
SCANNED_SUFFIXES = ('.txt',) + JSONL_SUFFIXES
COLUMN = 'input_ids'
MAX_SPLITS = 1000  # MindRecord's limit on files per dataset


class PreprocessError(ValueError):
    """Bad preprocessing input; the message names the file (and line) at fault."""


# ----------------------------------------------------------------------------- reading
def expand_inputs(inputs):
    """Expand files, directories (searched recursively for .txt/.jsonl/.json) and glob patterns into a list of
    files, in the order given, without duplicates. A path or pattern matching nothing raises PreprocessError."""
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
                raise PreprocessError(f"no .txt, .jsonl or .json files in directory {path}")
        elif any(c in path for c in '*?['):
            found = sorted(p for p in glob.glob(path, recursive=True) if os.path.isfile(p))
            if not found:
                raise PreprocessError(f"no files match {path!r}")
        else:
            raise PreprocessError(f"input not found: {path}")
        files.extend(found)
    return list(dict.fromkeys(files))


def _decode(raw, path, lineno=None):
    try:
        return raw.decode('utf-8-sig' if lineno in (None, 1) else 'utf-8')
    except UnicodeDecodeError as err:
        where = f"{path}:{lineno}" if lineno else path
        raise PreprocessError(f"{where}: not valid UTF-8 (byte offset {err.start})") from None


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


def iter_documents(files, text_key='text', split_lines=False, on_bytes=None):
    """Yield the documents of `files` as strings: a whole `.txt` file (with `split_lines`, each line), or the
    `text_key` field of each line of a `.jsonl`/`.json` file. Blank documents are skipped. `on_bytes(n)` is called
    with the number of bytes read, for progress reporting."""
    for path in files:
        jsonl = path.lower().endswith(JSONL_SUFFIXES)
        with open(path, 'rb') as f:
            if not jsonl and not split_lines:
                raw = f.read()
                if on_bytes:
                    on_bytes(len(raw))
                text = _decode(raw, path)
                if text.strip():
                    yield text
                continue
            for lineno, raw in enumerate(f, 1):
                if on_bytes:
                    on_bytes(len(raw))
                line = _decode(raw, path, lineno)
                if not line.strip():
                    continue
                text = _json_text(line, path, lineno, text_key) if jsonl else line.rstrip('\r\n')
                if text.strip():
                    yield text


# ----------------------------------------------------------------------------- tokenizing and chunking
def iter_lm_samples(texts, tokenizer, seq_length, stats=None, block_tokens=1 << 20):
    """Tokenize `texts` (`tokenizer.encode(text, add_special_tokens=False)`, blank texts skipped), append
    `tokenizer.eos_token_id` to each, concatenate, and yield int32 arrays [n, seq_length + 1] of consecutive
    samples (about `block_tokens` tokens each). `stats` (a dict, if given) is kept up to date: documents, tokens
    (EOS included), samples, dropped_tokens (the tail shorter than one sample), seq_length. Raises PreprocessError
    when the text does not fill a single sample."""
    seq_length = int(seq_length)
    if seq_length < 1:
        raise PreprocessError(f"seq_length must be >= 1, got {seq_length}")
    eos = getattr(tokenizer, 'eos_token_id', None)
    if eos is None:
        raise PreprocessError(f"{type(tokenizer).__name__} has no eos_token_id: documents need an EOS separator")
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

    for text in texts:
        if not text.strip():
            continue
        ids = tokenizer.encode(text, add_special_tokens=False)
        doc = np.empty(len(ids) + 1, dtype=np.int32)
        doc[:-1] = ids
        doc[-1] = eos
        pending.append(doc)
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


# ----------------------------------------------------------------------------- writing
def mindrecord_files(output_file, num_splits=1):
    """Data file names MindRecord uses for `output_file` split `num_splits` ways (each has a `.db` index too)."""
    return [output_file] if num_splits == 1 else [f"{output_file}{i}" for i in range(num_splits)]


def existing_outputs(output_file, num_splits=1):
    """Files (data or index) that writing `output_file` would replace."""
    return [p for f in mindrecord_files(output_file, num_splits) for p in (f, f + '.db') if os.path.exists(p)]


def write_mindrecord(output_file, blocks, seq_length, num_splits=1, overwrite=False):
    """Write int32 blocks [n, seq_length + 1] to MindRecord column `input_ids`; returns the data file paths.

    Atomic: the files are written into a hidden temporary directory beside `output_file` and renamed into place
    only after a successful commit (`.db` index files first, data files last). On any error nothing new is left
    behind. Existing outputs raise FileExistsError unless `overwrite`."""
    from mindspore.mindrecord import FileWriter
    output_file = os.path.abspath(output_file)
    existing = existing_outputs(output_file, num_splits)
    if existing and not overwrite:
        raise FileExistsError(f"{existing[0]} already exists")
    parent, name = os.path.split(output_file)
    os.makedirs(parent, exist_ok=True)
    width = int(seq_length) + 1
    tmp_dir = tempfile.mkdtemp(prefix=f'.{name}.tmp-', dir=parent)
    try:
        writer = FileWriter(os.path.join(tmp_dir, name), shard_num=num_splits, overwrite=False)
        writer.add_schema({COLUMN: {'type': 'int32', 'shape': [width]}}, 'causal language model samples')
        for block in blocks:
            block = np.asarray(block, dtype=np.int32)
            if block.ndim != 2 or block.shape[1] != width:
                raise ValueError(f"sample block of shape {block.shape} does not match [n, {width}]")
            writer.write_raw_data([{COLUMN: row} for row in block])
        writer.commit()
        names = [os.path.basename(f) for f in mindrecord_files(output_file, num_splits)]
        for moved in [n + '.db' for n in names] + names:
            os.replace(os.path.join(tmp_dir, moved), os.path.join(parent, moved))
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    return mindrecord_files(output_file, num_splits)


# ----------------------------------------------------------------------------- CLI
class _Progress:
    """Bytes-read progress on stderr: a tqdm bar when tqdm is installed, else one rewritten line with an ETA."""

    def __init__(self, total, enabled=True):
        self.total, self.done, self.enabled = total, 0, enabled
        self.start = self.shown = time.monotonic()
        self.bar = None
        if enabled:
            try:
                from tqdm import tqdm
                self.bar = tqdm(total=total, unit='B', unit_scale=True, desc='tokenizing', file=sys.stderr)
            except ImportError:
                pass

    def update(self, n):
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
        elif self.enabled and time.monotonic() - self.shown >= 0.5:
            self._show()

    def _show(self):
        self.shown = time.monotonic()
        elapsed = self.shown - self.start
        frac = self.done / self.total if self.total else 1.0
        eta = elapsed * (1 - frac) / frac if frac > 0 else 0.0
        sys.stderr.write(f"\rtokenizing: {frac:6.1%}  {self.done / 1e6:.1f}/{self.total / 1e6:.1f} MB  "
                         f"elapsed {_clock(elapsed)}  ETA {_clock(eta)}")
        sys.stderr.flush()

    def close(self):
        if self.bar is not None:
            self.bar.close()
        elif self.enabled:
            self._show()
            sys.stderr.write('\n')


def _clock(seconds):
    minutes, sec = divmod(int(seconds), 60)
    return f"{minutes // 60}:{minutes % 60:02d}:{sec:02d}"


def load_tokenizer(name, vocab_file=None, merges_file=None, tokenizer_dir=None):
    """Build the registered tokenizer `name` from its vocabulary files or with `from_pretrained(tokenizer_dir)`."""
    import mindformers  # noqa: F401  pylint: disable=unused-import  (registers the tokenizers)
    from mindformers.tools.register import MindFormerRegister, MindFormerModuleType
    try:
        cls = MindFormerRegister.get_cls(MindFormerModuleType.TOKENIZER, name, where='--tokenizer')
    except ValueError as err:
        raise PreprocessError(str(err)) from None
    if tokenizer_dir:
        tokenizer_dir = resolve_path(tokenizer_dir)
        if not os.path.isdir(tokenizer_dir):
            raise PreprocessError(f"--tokenizer_dir not found: {tokenizer_dir}")
        return cls.from_pretrained(tokenizer_dir)
    files = {key: resolve_path(value) for key, value in (('vocab_file', vocab_file), ('merges_file', merges_file))
             if value}
    if not files:
        raise PreprocessError(f"--tokenizer {name} needs --vocab_file (and --merges_file for BPE) or --tokenizer_dir")
    for key, path in files.items():
        if not os.path.isfile(path):
            raise PreprocessError(f"--{key} not found: {path}")
    try:
        return cls(**files)
    except (TypeError, ValueError) as err:
        raise PreprocessError(f"cannot build {name} from {', '.join(files.values())}: {err}") from None


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        prog=f'python -m mindformers.tools.dataset_preprocess.{PROG}',
        description='Tokenize raw text into samples of seq_length + 1 tokens and write them to MindRecord '
                    '(int32 column input_ids).')
    parser.add_argument('--input', nargs='+', required=True,
                        help='files, directories or glob patterns: .txt (one document per file) and .jsonl/.json '
                             '(one JSON object per line)')
    parser.add_argument('--text_key', default='text', help='JSON field holding the text (default: text)')
    parser.add_argument('--split_lines', action='store_true',
                        help='.txt files hold one document per non-blank line')
    parser.add_argument('--tokenizer', required=True, help='registered tokenizer type, e.g. GPT2Tokenizer')
    parser.add_argument('--vocab_file', help='tokenizer vocabulary (vocab.json, tokenizer.model, ...)')
    parser.add_argument('--merges_file', help='BPE merges (merges.txt)')
    parser.add_argument('--tokenizer_dir', help='directory for the tokenizer\'s from_pretrained')
    parser.add_argument('--seq_length', type=int, required=True, help="the model's seq_length; samples hold "
                                                                      "seq_length + 1 tokens")
    parser.add_argument('--output_file', required=True, help='output path ending in .mindrecord')
    parser.add_argument('--num_splits', type=int, default=1, help='number of MindRecord files (default 1)')
    parser.add_argument('--overwrite', action='store_true', help='replace existing output files')
    parser.add_argument('--quiet', action='store_true', help='no progress bar')
    return parser.parse_args(argv)


def run(args):
    """Run the conversion described by parsed `args`; returns (data files, stats)."""
    if args.seq_length < 1:
        raise PreprocessError(f"--seq_length must be >= 1, got {args.seq_length}")
    if not 1 <= args.num_splits <= MAX_SPLITS:
        raise PreprocessError(f"--num_splits must be in [1, {MAX_SPLITS}], got {args.num_splits}")
    if not args.output_file.endswith('.mindrecord'):
        raise PreprocessError(f"--output_file must end with .mindrecord, got {args.output_file}")
    existing = existing_outputs(os.path.abspath(args.output_file), args.num_splits)
    if existing and not args.overwrite:
        raise PreprocessError(f"output already exists: {existing[0]} (pass --overwrite to replace it)")
    files = expand_inputs(args.input)
    tokenizer = load_tokenizer(args.tokenizer, args.vocab_file, args.merges_file, args.tokenizer_dir)
    progress = _Progress(sum(os.path.getsize(f) for f in files), enabled=not args.quiet)
    stats = {}
    try:
        documents = iter_documents(files, args.text_key, args.split_lines, on_bytes=progress.update)
        samples = iter_lm_samples(documents, tokenizer, args.seq_length, stats)
        outputs = write_mindrecord(args.output_file, samples, args.seq_length, args.num_splits, args.overwrite)
    finally:
        progress.close()
    return outputs, stats


def main(argv=None):
    """CLI entry point; returns the exit code (2 for bad input, with one `error:` line on stderr)."""
    args = parse_args(argv)
    start = time.monotonic()
    try:
        outputs, stats = run(args)
    except (PreprocessError, OSError) as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 2
    seconds = time.monotonic() - start
    shown = outputs[0] if len(outputs) == 1 else f"{outputs[0]} ... ({len(outputs)} files)"
    seq = stats['seq_length']
    print(f"{PROG}: wrote {shown} in {seconds:.1f} s\n"
          f"  documents  {stats['documents']}\n"
          f"  tokens     {stats['tokens']} (including {stats['documents']} EOS)\n"
          f"  samples    {stats['samples']} of {seq + 1} tokens (seq_length {seq} + 1)\n"
          f"  dropped    {stats['dropped_tokens']} tail tokens")
    return 0


if __name__ == '__main__':
    sys.exit(main())
