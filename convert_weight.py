#!/usr/bin/env python
"""Convert model weights between HuggingFace checkpoints and mindformers checkpoints.

    python convert_weight.py --model gpt2 --input_path <HF dir or file> --output_path gpt2.ckpt [--dtype fp16]
    python convert_weight.py --model gpt2 --reversed --input_path gpt2.ckpt --output_path <HF dir | x.safetensors>
    python convert_weight.py --model llama --input_path <HF dir | Meta dir> --output_path llama.ckpt
    python convert_weight.py --model glm2 --input_path <HF glm or chatglm dir> --output_path glm2.ckpt
    python convert_weight.py --model glm --input_path <HF chatglm-6b dir | MindFormers glm .ckpt> --output_path glm.ckpt
    python convert_weight.py --model pangualpha --input_path <HF gpt_pangu dir or MindSpore release> --output_path p.ckpt
    python convert_weight.py --model llama --reversed --input_path llama.ckpt --output_path <HF dir> [--config C]

A Meta dir holds params.json and consolidated.NN.pth shards; glm2 reads HF GlmForCausalLM and original ChatGLM2
directories and writes GlmForCausalLM ones. --config (config.json or run YAML) is needed with --reversed when no
config.json lies beside the checkpoint. An existing --output_path (a file, or a non-empty HF directory) is replaced
only with --overwrite: the new output is written beside it and then renamed over it, so a failed conversion leaves
the old one untouched and no file of the old output remains. On success stdout has the output path, a summary line,
and the same as one JSON line for scripts (model, reversed, output_path, tensors, parameters, dtype).

Memory: HF -> mindformers reads the input one tensor at a time (safetensors and sharded sets memory-mapped, .bin
through torch.load(mmap=True)), converts it and, for a .safetensors output, writes it at once, so a conversion holds
about one tensor; a .ckpt output is assembled in memory (the whole converted model), and so is --reversed output.

A family joins through its `register_family(FamilySpec(..., converter=...))`; its converter (a module) provides
`convert_pt_to_ms(input_path, output_path, dtype=None, config=None)` (HF -> ours) and
`convert_ms_to_pt(input_path, output_path, dtype=None, config=None)` (ours -> HF), each returning
{tensor name: shape} of what it wrote, writing atomically, and raising ValueError (ConversionError,
CheckpointError) or OSError for bad input.
Exit codes (one line on stderr for errors): 0 success; 2 the command line is wrong (an unknown flag or --model, a
path that does not exist or cannot be used, an existing output without --overwrite); 1 the content of a file is
wrong (weights that do not fit the model, a truncated or corrupt checkpoint, a bad config file) or the run failed
(e.g. disk full)."""
import argparse
import json
import math
import os
import shutil
import sys

os.environ.setdefault('GLOG_v', '3')  # before MindSpore loads: its warnings would break the one-line error contract
from mindformers.tools.register.family import families  # noqa: E402
from mindformers.tools.utils import (OneLineArgumentParser, UsageError, check_output_path, cli_error,  # noqa: E402
                                     replace_output, staging_path)

DTYPES = ('fp32', 'fp16', 'bf16')


def converter_names():
    """The registered families with a weight converter: the values of --model."""
    return sorted(name for name, spec in families().items() if spec.converter is not None)


def build_parser():
    parser = OneLineArgumentParser(prog='convert_weight.py', description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--model', required=True, help=f"model family ({', '.join(converter_names())})")
    parser.add_argument('--input_path', required=True,
                        help='HF directory or weight file; with --reversed a mindformers checkpoint')
    parser.add_argument('--output_path', required=True,
                        help='mindformers .ckpt/.safetensors; with --reversed a HF directory or .safetensors file')
    parser.add_argument('--dtype', choices=DTYPES, help='cast floating-point tensors (default: keep)')
    parser.add_argument('--reversed', action='store_true', help='convert mindformers -> HuggingFace')
    parser.add_argument('--config', help='model config (run YAML or config.json) when the weights alone do not '
                                         'settle the architecture, e.g. num_heads for --reversed')
    parser.add_argument('--overwrite', action='store_true', help='replace an existing --output_path')
    return parser


def convert(model, input_path, output_path, dtype=None, reversed_=False, config=None, overwrite=False):
    """Run the family converter; returns {tensor name: shape} of what was written. A command line that cannot work
    raises UsageError before anything is read."""
    if model not in converter_names():
        raise UsageError(f"unknown --model {model!r} (known: {', '.join(converter_names())})")
    if not os.path.exists(input_path):
        raise UsageError(f"--input_path {input_path} does not exist")
    if config and not os.path.isfile(config):
        raise UsageError(f"--config {config} is not a file")
    # --reversed writes a HF directory unless the path names a checkpoint file
    check_output_path(output_path, '--output_path', overwrite,
                      directory=reversed_ and not output_path.endswith(('.safetensors', '.ckpt')))
    converter = families()[model].load_converter()
    function = converter.convert_ms_to_pt if reversed_ else converter.convert_pt_to_ms
    kwargs = {'config': config} if config else {}
    replacing = os.path.exists(output_path) and not (os.path.isdir(output_path) and not os.listdir(output_path))
    if not replacing:
        return function(input_path, output_path, dtype=dtype, **kwargs)
    staged = staging_path(output_path)
    try:
        written = function(input_path, staged, dtype=dtype, **kwargs)
        replace_output(staged, output_path)
    finally:
        if os.path.isdir(staged):
            shutil.rmtree(staged, ignore_errors=True)
        elif os.path.exists(staged):
            os.remove(staged)
    return written


def _one_line(err):
    return ' '.join(str(err).split()) or type(err).__name__


def main(argv=None):
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as stop:  # a bad flag (its line is written) or --help
        return stop.code
    try:
        written = convert(args.model, args.input_path, args.output_path, args.dtype, args.reversed, args.config,
                          args.overwrite)
    except UsageError as err:
        return cli_error('convert_weight.py', _one_line(err), 2)
    except (ValueError, OSError) as err:  # ConversionError, CheckpointError: the files' content; OSError: disk
        return cli_error('convert_weight.py', _one_line(err), 1)
    except Exception as err:  # pylint: disable=broad-except
        return cli_error('convert_weight.py', f"{type(err).__name__}: {_one_line(err)}", 1)
    direction = 'mindformers -> HuggingFace' if args.reversed else 'HuggingFace -> mindformers'
    parameters = sum(math.prod(shape) for shape in written.values())
    print(args.output_path)
    print(f"{args.model} {direction}: {len(written)} tensors, {parameters:,} parameters"
          f"{', ' + args.dtype if args.dtype else ''}")
    print(json.dumps({'model': args.model, 'reversed': args.reversed, 'output_path': args.output_path,
                      'tensors': len(written), 'parameters': parameters, 'dtype': args.dtype}))
    return 0


if __name__ == '__main__':
    sys.exit(main())
