"""Instruction and conversation data -> prompt-masked samples -> MindRecord, for supervised finetuning.

    python -m mindformers.tools.dataset_preprocess.instruction_to_mindrecord --input alpaca_data.json \
        --format alpaca --template alpaca --tokenizer GPT2Tokenizer --vocab_file vocab.json \
        --merges_file merges.txt --seq_length 1024 --output_file data/sft.mindrecord

Inputs (`--input`: files, directories or globs of .json/.jsonl): a JSON array of records, or one JSON object per
line. `--format alpaca`: records `{"instruction", "input" (optional), "output"}`. `--format conversation`:
records `{"conversations": [{"from": "human"|"gpt"|"system", "value": ...}, ...]}` (FastChat / MindFormers
alpaca_converter) or `{"messages" | "conversations": [{"role": "user"|"assistant"|"system", "content": ...}]}`;
user and assistant messages alternate, starting with the user and ending with the assistant.

A template (`TEMPLATES`, add one with `register_template`) turns a conversation into prompt and answer parts; the
parts are tokenized (consecutive texts together, as the model will see them) and every answer token, with the EOS
the template puts after it, is trained while prompts and padding get the label -100. Output: int32 columns
`input_ids` and `labels`, each of shape [seq_length + 1] (the model reads tokens [:-1] and, like input_ids,
shifts labels itself to predict [1:]), written atomically. Read it with `InstructionDataset`
(`train_dataset_task.type: InstructionDataset` in a run YAML). Longer samples are cut at the end (`--truncate`,
default; a sample left without any trained token is dropped) or dropped (`--drop_long`).
"""
import os
import sys

from mindformers.dataset.mindrecord_io import write_sft_mindrecord  # noqa: F401
from mindformers.dataset.preprocess import (PreprocessError, UsageError, expand_inputs,  # noqa: F401
                                            iter_records)
from mindformers.dataset.sft_preprocess import (FORMATS, TEMPLATES, Conversation, encode_conversation,  # noqa: F401
                                                encode_parts, iter_sft_samples, parse_alpaca, parse_conversation,
                                                register_template, tokenizer_specials, user_text)
from mindformers.tools.dataset_preprocess.text_to_mindrecord import (_Progress, check_output_args, cli_main,
                                                                     load_tokenizer)
from mindformers.tools.utils import OneLineArgumentParser, resolve_path

PROG = 'instruction_to_mindrecord'


# ----------------------------------------------------------------------------- CLI
def build_tokenizer_arg(name, vocab_file=None, merges_file=None, tokenizer_dir=None):
    """A registered tokenizer class (built from its files or `tokenizer_dir`, as in text_to_mindrecord) or a
    model name (`gpt2_tiny`, `llama2_7b`, ...: the tokenizer of its YAML, with `vocab_file`/`merges_file`
    overriding the files named there)."""
    from mindformers.models.model_book import list_models
    from mindformers.tools.register import MindFormerRegister, MindFormerModuleType
    if MindFormerRegister.is_exist(MindFormerModuleType.TOKENIZER, name) or name not in list_models():
        return load_tokenizer(name, vocab_file, merges_file, tokenizer_dir)
    from mindformers.models.auto.auto_class import AutoTokenizer
    files = {key: value for key, value in (('vocab_file', vocab_file), ('merges_file', merges_file)) if value}
    for key, path in files.items():
        if not os.path.isfile(resolve_path(path)):
            raise UsageError(f"--{key} not found: {resolve_path(path)}")
    try:
        return AutoTokenizer.from_pretrained(tokenizer_dir or name, **files)
    except (TypeError, ValueError, OSError) as err:
        raise PreprocessError(f"--tokenizer {name}: cannot build the tokenizer of this model: {err} (give its "
                              f"files with --vocab_file / --merges_file or --tokenizer_dir)") from None


ARGUMENTS = (  # (flags, argparse options) of the CLI
    ('--input', dict(nargs='+', required=True, help='.json/.jsonl files, directories or glob patterns: a JSON '
                                                    'array of records or one JSON object per line')),
    ('--format', dict(required=True, choices=FORMATS, help='alpaca: {instruction, input, output}; conversation: '
                      '{conversations: [{from, value}]} or {messages: [{role, content}]}')),
    ('--template', dict(required=True, choices=sorted(TEMPLATES), help='prompt format of the model')),
    ('--tokenizer', dict(required=True, help='registered tokenizer type (GPT2Tokenizer, ...) or model name '
                                             '(gpt2_tiny, ...)')),
    ('--vocab_file', dict(help='tokenizer vocabulary (vocab.json, tokenizer.model, ...)')),
    ('--merges_file', dict(help='BPE merges (merges.txt)')),
    ('--tokenizer_dir', dict(help="directory for the tokenizer's from_pretrained")),
    ('--seq_length', dict(type=int, required=True, help="the model's seq_length; samples hold seq_length + 1")),
    ('--output_file', dict(required=True, help='output path ending in .mindrecord')),
    ('--pad_id', dict(type=int, help="input_ids padding (default: the tokenizer's pad, else EOS); label -100")),
    ('--num_splits', dict(type=int, default=1, help='number of MindRecord files (default 1)')),
    ('--overwrite', dict(action='store_true',
                         help='replace the existing output (all its files, whatever their number)')),
    ('--quiet', dict(action='store_true', help='no progress bar')),
)


def parse_args(argv=None):
    parser = OneLineArgumentParser(
        prog=f'python -m mindformers.tools.dataset_preprocess.{PROG}', name=PROG,
        description='Tokenize instruction or conversation data with a prompt template and write MindRecord '
                    'samples of seq_length + 1 tokens (int32 columns input_ids and labels; prompts and padding '
                    'have label -100).')
    for flag, options in ARGUMENTS:
        parser.add_argument(flag, **options)
    long_samples = parser.add_mutually_exclusive_group()
    long_samples.add_argument('--truncate', dest='drop_long', action='store_false',
                              help='cut long samples at the end (default); one left without answer tokens is '
                                   'dropped')
    long_samples.add_argument('--drop_long', dest='drop_long', action='store_true',
                              help='drop samples longer than seq_length + 1 tokens')
    parser.set_defaults(drop_long=False, prog=PROG)
    return parser.parse_args(argv)


def run(args):
    """Run the conversion described by parsed `args`; returns (data files, stats)."""
    check_output_args(args)
    files = expand_inputs(args.input)
    for path in files:
        if not path.lower().endswith(('.json', '.jsonl')):
            raise UsageError(f"{path}: expected a .json or .jsonl file")
    tokenizer = build_tokenizer_arg(args.tokenizer, args.vocab_file, args.merges_file, args.tokenizer_dir)
    stats, progress = {}, _Progress(sum(map(os.path.getsize, files)), enabled=not args.quiet)
    try:
        blocks = iter_sft_samples(iter_records(files, progress.update), args.template, tokenizer, args.seq_length,
                                  args.format, args.pad_id, args.drop_long, stats)
        return write_sft_mindrecord(args.output_file, blocks, args.seq_length, args.num_splits,
                                    args.overwrite), stats
    finally:
        progress.close()


def summary(stats):
    """The statistics of a conversion as indented lines."""
    seq, samples = stats['seq_length'], stats['samples']
    dropped = stats['too_long'] + stats['answer_cut']
    share = stats['trained_tokens'] / stats['tokens'] if stats['tokens'] else 0.0
    return (f"  records    {stats['records']}\n"
            f"  samples    {samples} of {seq + 1} tokens (seq_length {seq} + 1)\n"
            f"  dropped    {dropped} ({stats['too_long']} too long with --drop_long, {stats['answer_cut']} with no "
            f"answer token left after truncation)\n"
            f"  truncated  {stats['truncated']}\n"
            f"  tokens     {stats['tokens']} (+ {samples * (seq + 1) - stats['tokens']} padding), longest sample "
            f"{stats['longest']}\n"
            f"  trained    {stats['trained_tokens']} tokens = {share:.1%} of the tokens (answers and their EOS)")


def main(argv=None):
    """Command line entry point; returns the exit code (see `text_to_mindrecord.cli_main`)."""
    args = parse_args(argv)

    def report(outputs, stats, seconds):
        files = outputs[0] + (f" ... ({len(outputs)} files)" if len(outputs) > 1 else '')
        return f"{PROG}: wrote {files} in {seconds:.1f} s (template {args.template})\n{summary(stats)}"
    return cli_main(run, args, report)


if __name__ == '__main__':
    sys.exit(main())
