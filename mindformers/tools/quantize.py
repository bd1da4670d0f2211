#!/usr/bin/env python
"""Quantize a model's weights to int8 ahead of time: a directory that loads back weight-only int8 without a float copy.

    python -m mindformers.tools.quantize --model <registered name | run YAML | directory>
        [--load_checkpoint <weights>] [--pet_checkpoint <LoRA delta checkpoint | PEFT adapter directory>]
        [--scheme block32 | channel] [--embeddings] --output_dir <new or empty directory>

The weights are --load_checkpoint's, else the source's own (a YAML's checkpoint_name_or_path, a name's published
weights, a directory's). They are quantized as they load (block32: an fp16 scale per 32 weights, llama.cpp's Q8_0;
channel: an fp32 scale per output row), every Linear and the output head (a tied head's int8 copy is made again from
the table when the directory loads), the embedding tables too with --embeddings. A --pet_checkpoint LoRA is merged
into the float weights first. The output directory gets `config.json` (with `quantization: int8` and its
`quantization_config`), `model.safetensors` (int8 weights, their scales, the float rest) and the tokenizer's files
when the source has a tokenizer: `AutoModel.from_pretrained(dir)`, `pipeline(model=dir)` and `python -m
mindformers.serve --model dir` load it int8. It is written beside its place and renamed into it once complete; an
existing non-empty output is refused. stdout ends with one JSON summary line (`bytes`, `float32_bytes`: the same
parameters in fp32, `ratio`).
Exit codes (one line on stderr for errors): 0 done; 2 the command line is wrong (a flag, a path that does not exist,
an existing output, a source without weights); 1 a file's content is wrong or the run failed."""
import argparse
import json
import os
import shutil
import sys

if __name__ == '__main__':
    os.environ.setdefault('GLOG_v', '3')  # before MindSpore loads: keep its warnings quiet
    os.environ.setdefault('MINDFORMERS_LOG_LEVEL', 'WARNING')  # errors stay one line on stderr

from mindformers.tools.utils import (OneLineArgumentParser, UsageError, check_output_path, run_cli,  # noqa: E402
                                     staging_path)

PROG = 'mindformers.tools.quantize'
CHECKPOINT_FILE = 'model.safetensors'


def build_parser():
    parser = OneLineArgumentParser(prog=PROG, description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--model', required=True,
                        help='registered model name, run YAML, or a save_pretrained / HuggingFace directory')
    parser.add_argument('--load_checkpoint', help="weights to quantize (default: the source's own)")
    parser.add_argument('--pet_checkpoint', help='a LoRA merged into the weights before quantizing: a PEFT adapter '
                                                 'directory or a delta checkpoint saved by finetuning')
    parser.add_argument('--scheme', choices=('block32', 'channel'), default='block32',
                        help='block32 (default): an fp16 scale per 32 weights; channel: an fp32 scale per output row')
    parser.add_argument('--embeddings', action='store_true', help='quantize the embedding tables too')
    parser.add_argument('--output_dir', required=True, help='new or empty directory for the int8 model')
    return parser


def _is_hf_dir(path):
    try:
        with open(os.path.join(path, 'config.json'), encoding='utf-8') as f:
            return 'type' not in json.load(f)
    except (OSError, ValueError):
        return False


def check_command_line(args):
    """UsageError for a command line that cannot work, before anything is loaded."""
    from mindformers.serving.cli import check_model
    check_model(args.model)
    for flag in ('load_checkpoint', 'pet_checkpoint'):
        value = getattr(args, flag)
        if value is not None and not os.path.exists(value):
            raise UsageError(f"--{flag} {value} does not exist")
    if os.path.isdir(args.model):
        if args.load_checkpoint and _is_hf_dir(args.model):
            raise UsageError(f"--load_checkpoint: {args.model} is a HuggingFace directory, whose weights are its own")
    elif not args.load_checkpoint:
        from mindformers.models.auto import AutoConfig
        from mindformers.models.model_book import has_weights
        if not AutoConfig.from_pretrained(args.model).checkpoint_name_or_path and not has_weights(args.model):
            raise UsageError(f"--model {args.model} names no weights (no checkpoint_name_or_path, no published "
                             f"weights); give --load_checkpoint")
    check_output_path(args.output_dir, '--output_dir', overwrite=False, directory=True)


def quantized_model(args):
    """The model of `args`, weight-only int8: quantized as its weights load, or after a LoRA is merged."""
    from mindformers.core.context import init_context
    from mindformers.models.auto import AutoModel
    from mindformers.quantization import quantize_model
    init_context()
    settings = {'scheme': args.scheme, 'embeddings': args.embeddings}
    overrides = {'checkpoint_name_or_path': args.load_checkpoint} if args.load_checkpoint else {}
    if not args.pet_checkpoint:
        return AutoModel.from_pretrained(args.model, quantization='int8', quantization_config=settings, **overrides)
    from mindformers.serving.cli import load_weights
    model = AutoModel.from_pretrained(args.model, **overrides)
    load_weights(model, None, args.pet_checkpoint)
    return quantize_model(model, **settings)


def write_output(model, args):
    """Write the int8 model (and the source's tokenizer, if any) into --output_dir, complete before it appears;
    returns the summary fields."""
    from mindformers.models.auto import AutoTokenizer
    from mindformers.quantization import quantized_state
    from mindformers.tools.checkpoint import save_checkpoint_atomic
    from mindformers.tools.logger import logger
    state = quantized_state(model)
    staged = staging_path(args.output_dir)
    try:
        os.makedirs(staged)
        save_checkpoint_atomic(state, os.path.join(staged, CHECKPOINT_FILE))
        config = model.config
        source, config.checkpoint_name_or_path = config.checkpoint_name_or_path, ''
        try:
            config.save_pretrained(staged)
        finally:
            config.checkpoint_name_or_path = source
        try:
            AutoTokenizer.from_pretrained(args.model).save_pretrained(staged)
            tokenizer = True
        except (ValueError, OSError, TypeError) as err:
            logger.warning("no tokenizer written: %s", err)
            tokenizer = False
        os.replace(staged, args.output_dir)  # an empty directory there is replaced; a filled one meanwhile fails
    finally:
        shutil.rmtree(staged, ignore_errors=True)
    checkpoint = os.path.join(args.output_dir, CHECKPOINT_FILE)
    floats = sum(int(p.size) for name, p in state.items() if not name.endswith('weight_scale'))
    size = os.path.getsize(checkpoint)
    return {'checkpoint': checkpoint, 'bytes': size, 'float32_bytes': 4 * floats,
            'ratio': round(4 * floats / size, 3), 'tokenizer': tokenizer}


def run(args):
    """The tool, on parsed arguments: quantize, write, print the summary."""
    check_command_line(args)
    model = quantized_model(args)
    summary = {'model': args.model, 'output_dir': args.output_dir, 'scheme': args.scheme,
               'embeddings': args.embeddings, **write_output(model, args)}
    print(f"wrote {summary['checkpoint']}: {summary['bytes'] / 2 ** 20:.1f} MiB, {summary['ratio']}x smaller than "
          f"fp32 ({args.scheme}{', embeddings too' if args.embeddings else ''})")
    print(json.dumps(summary))


def main(argv=None):
    return run_cli(PROG, build_parser(), argv, run)


if __name__ == '__main__':
    sys.exit(main())
