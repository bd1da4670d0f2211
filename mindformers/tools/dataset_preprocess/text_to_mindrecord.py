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
import json
import os
import sys
import time

from mindformers.dataset.mindrecord_io import (MAX_SPLITS, existing_outputs, mindrecord_files,  # noqa: F401
                                               recover_writes, write_mindrecord)
from mindformers.dataset.preprocess import (PreprocessError, UsageError, build_lm_samples,  # noqa: F401
                                            expand_inputs, iter_documents, iter_lm_samples)
from mindformers.tools.utils import OneLineArgumentParser, cli_error, resolve_path

PROG = 'text_to_mindrecord'


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
    from mindformers.tools.register import MindFormerRegister, MindFormerModuleType
    try:
        cls = MindFormerRegister.get_cls(MindFormerModuleType.TOKENIZER, name, where='--tokenizer')
    except ValueError as err:
        raise UsageError(str(err)) from None
    if tokenizer_dir:
        tokenizer_dir = resolve_path(tokenizer_dir)
        if not os.path.isdir(tokenizer_dir):
            raise UsageError(f"--tokenizer_dir not found: {tokenizer_dir}")
        try:
            return cls.from_pretrained(tokenizer_dir)
        except OSError as err:  # files missing: the directory cannot be used
            raise UsageError(f"--tokenizer_dir {tokenizer_dir}: cannot load {name}: {err}") from None
        except (TypeError, ValueError) as err:
            raise PreprocessError(f"--tokenizer_dir {tokenizer_dir}: cannot load {name}: {err}") from None
    files = {key: resolve_path(value) for key, value in (('vocab_file', vocab_file), ('merges_file', merges_file))
             if value}
    if not files:
        raise UsageError(f"--tokenizer {name} needs --vocab_file (and --merges_file for BPE) or --tokenizer_dir")
    for key, path in files.items():
        if not os.path.isfile(path):
            raise UsageError(f"--{key} not found: {path}")
    try:
        return cls(**files)
    except (TypeError, ValueError) as err:
        raise PreprocessError(f"cannot build {name} from {', '.join(files.values())}: {err}") from None


def check_output_args(args):
    """Raise UsageError for a bad --seq_length, --num_splits or --output_file, or an existing output without
    --overwrite (any split count: --overwrite replaces the whole set). Leftovers of killed writers of the output
    are finished or removed first."""
    if args.seq_length < 1:
        raise UsageError(f"--seq_length must be >= 1, got {args.seq_length}")
    if not 1 <= args.num_splits <= MAX_SPLITS:
        raise UsageError(f"--num_splits must be in [1, {MAX_SPLITS}], got {args.num_splits}")
    if not args.output_file.endswith('.mindrecord'):
        raise UsageError(f"--output_file must end with .mindrecord, got {args.output_file}")
    ancestor = os.path.dirname(os.path.abspath(args.output_file))
    while not os.path.exists(ancestor):
        ancestor = os.path.dirname(ancestor)
    if not os.path.isdir(ancestor) or not os.access(ancestor, os.W_OK | os.X_OK):
        raise UsageError(f"--output_file {args.output_file}: {ancestor} is not a writable directory")
    recover_writes(args.output_file)
    existing = existing_outputs(args.output_file)
    if existing and not args.overwrite:
        raise UsageError(f"output already exists: {existing[0]} (pass --overwrite to replace it)")


def cli_main(run, args, report):
    """Run `run(args)` -> (outputs, stats) and print `report(outputs, stats, seconds)`, then the same as one JSON line
    for scripts (`outputs`, `seconds` and every statistic); returns the exit code: 0, 2 for a wrong command line
    (UsageError), 1 for bad data or a failed write, 130 when interrupted. Errors are one `<prog>: error:` line on
    stderr."""
    started = time.monotonic()
    try:
        outputs, stats = run(args)
    except KeyboardInterrupt:
        print(f"{args.prog}: interrupted", file=sys.stderr)
        return 130
    except (UsageError, FileExistsError) as err:
        return cli_error(args.prog, err, 2)
    except (PreprocessError, OSError) as err:
        return cli_error(args.prog, err, 1)
    seconds = time.monotonic() - started
    print(report(outputs, stats, seconds))
    print(json.dumps({'outputs': list(outputs), 'seconds': round(seconds, 3), **stats}))
    return 0


def parse_args(argv=None):
    parser = OneLineArgumentParser(
        prog=f'python -m mindformers.tools.dataset_preprocess.{PROG}', name=PROG,
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
    parser.add_argument('--overwrite', action='store_true',
                        help='replace the existing output (all its files, whatever their number)')
    parser.add_argument('--quiet', action='store_true', help='no progress bar')
    args = parser.parse_args(argv)
    args.prog = PROG
    return args


def run(args):
    """Run the conversion described by parsed `args`; returns (data files, stats)."""
    check_output_args(args)
    files = expand_inputs(args.input)
    tokenizer = load_tokenizer(args.tokenizer, args.vocab_file, args.merges_file, args.tokenizer_dir)
    progress = _Progress(sum(os.path.getsize(f) for f in files), enabled=not args.quiet)
    stats = {}
    try:
        documents = iter_documents(files, args.text_key, args.split_lines, on_bytes=progress.update,
                                   with_where=True)
        samples = iter_lm_samples(documents, tokenizer, args.seq_length, stats)
        outputs = write_mindrecord(args.output_file, samples, args.seq_length, args.num_splits, args.overwrite)
    finally:
        progress.close()
    return outputs, stats


def _report(outputs, stats, seconds):
    shown = outputs[0] if len(outputs) == 1 else f"{outputs[0]} ... ({len(outputs)} files)"
    seq = stats['seq_length']
    return (f"{PROG}: wrote {shown} in {seconds:.1f} s\n"
            f"  documents  {stats['documents']}\n"
            f"  tokens     {stats['tokens']} (including {stats['documents']} EOS)\n"
            f"  samples    {stats['samples']} of {seq + 1} tokens (seq_length {seq} + 1)\n"
            f"  dropped    {stats['dropped_tokens']} tail tokens")


def main(argv=None):
    """CLI entry point; returns the exit code (see `cli_main`)."""
    return cli_main(run, parse_args(argv), _report)


if __name__ == '__main__':
    sys.exit(main())
