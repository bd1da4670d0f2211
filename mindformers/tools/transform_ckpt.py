#!/usr/bin/env python
"""Reshard checkpoints between parallel layouts with strategy files, on MindSpore's `transform_checkpoints`.

    python mindformers/tools/transform_ckpt.py --src_ckpt_strategy <file|dir|None> --dst_ckpt_strategy <file|dir|None>
        --src_ckpt_dir <dir with rank_N/ | checkpoint file> --dst_ckpt_dir <new or empty dir> [--prefix checkpoint_]

A strategy is a MindSpore strategy file (JSON or protobuf `.ckpt`, as `export_strategy` or a compiled
semi-auto-parallel run writes them) or a directory with one such file per pipeline stage (merged first with
`merge_pipeline_strategys`); None or an empty value means a complete, unsliced checkpoint.

The source is checked before anything is written: every rank the source strategy describes has exactly one
checkpoint (the newest step listed in every rank's `meta.json` when several are kept), parameter names agree with
both strategies, and shapes split as the strategies say. The destination appears complete or not at all:
`<dst>/rank_<k>/<prefix><k>.ckpt` (or `.safetensors`, the source's format), CRC-checked, with a `meta.json` when the
source was a training checkpoint (so a run can resume from it in the new layout).
An existing non-empty destination is replaced only with --overwrite (whole, once the new one is complete).
Exit codes (one line on stderr for errors): 0 done; 2 the command line is wrong (a bad flag, a path that does not
exist or cannot be used, a non-empty destination without --overwrite); 1 the content of a checkpoint or strategy
file is wrong (corrupt, or not resharded as asked) or the run failed.
The library is `mindformers.parallel.reshard`."""
import argparse
import dataclasses
import json
import os
import sys

if __name__ == '__main__':
    os.environ.setdefault('GLOG_v', '3')  # before MindSpore loads (when run by path): keep its warnings quiet
    if os.path.dirname(os.path.abspath(__file__)) == os.path.abspath(sys.path[0]):
        # run by path: import the package, not the sibling modules of this directory as top-level ones
        sys.path[0] = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mindformers.parallel.reshard import (TransformError, TransformUsageError, transform_checkpoint,  # noqa: E402,F401
                                          transform_for_run)
from mindformers.tools.checkpoint import CheckpointError  # noqa: E402
from mindformers.tools.file_io import first_line  # noqa: E402
from mindformers.tools.utils import OneLineArgumentParser, UsageError, cli_error  # noqa: E402

PROG = 'transform_ckpt.py'


def build_parser():
    parser = OneLineArgumentParser(prog=PROG, description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--src_ckpt_strategy', default=None,
                        help='strategy of the source: a file, a directory of per-stage files, or None (complete)')
    parser.add_argument('--dst_ckpt_strategy', default=None,
                        help='strategy to reshard into: a file, a directory of per-stage files, or None (complete)')
    parser.add_argument('--src_ckpt_dir', required=True,
                        help='source: a directory of rank_<N>/ directories, or one complete checkpoint file')
    parser.add_argument('--dst_ckpt_dir', required=True, help='destination: a new or empty directory')
    parser.add_argument('--prefix', default='checkpoint_', help='destination file prefix (default checkpoint_)')
    parser.add_argument('--overwrite', action='store_true', help='replace a non-empty --dst_ckpt_dir')
    return parser


def main(argv=None):
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as stop:  # a bad flag (its line is written) or --help
        return stop.code
    try:
        summary = transform_checkpoint(args.src_ckpt_dir, args.dst_ckpt_dir, args.src_ckpt_strategy,
                                       args.dst_ckpt_strategy, args.prefix, overwrite=args.overwrite)
    except UsageError as err:
        return cli_error(PROG, first_line(err), 2)
    except (CheckpointError, OSError) as err:  # the checkpoints' or strategies' content, or the disk
        return cli_error(PROG, first_line(err), 1)
    except Exception as err:  # pylint: disable=broad-except
        return cli_error(PROG, f"{type(err).__name__}: {first_line(err)}", 1)
    print(summary)
    print(json.dumps(dataclasses.asdict(summary)))  # the same, one JSON line for scripts
    return 0


if __name__ == '__main__':
    sys.exit(main())
