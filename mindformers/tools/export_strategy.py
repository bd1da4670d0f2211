"""Write the parallel strategy files of a model under a (data, model, pipeline) parallel layout, on any machine.

    python -m mindformers.tools.export_strategy --config configs/llama/run_llama_7b.yaml \\
        --data_parallel 2 --model_parallel 2 --pipeline_stage 2 --output_dir strategy/

writes one MindSpore JSON strategy file per pipeline stage, `strategy/ckpt_strategy_rank_{r}.json` (r = the stage's
first rank), for the model's parameters and their optimizer state, and prints a summary per stage. The layout comes
from the shard strategies the model's layers declare (`mindformers.parallel.layout`); nothing is compiled and
no weight is allocated. Unset flags keep the YAML's `parallel_config` (micro_batch_num at least pipeline_stage).
`--options model.model_config.offset=[1,-1]` sets any dotted key of the YAML first. `.json` files already in
--output_dir are replaced only with --overwrite (each file atomically; files of the old layout that the new one does
not write are removed).
Exit codes (one line on stderr for errors): 0 written; 2 the command line is wrong (a bad flag or --options, a
--config or --output_dir that cannot be used, .json files there without --overwrite, a layout that does not fit the
model); 1 the YAML's content is wrong or writing failed.
"""
import argparse
import glob
import os
import sys

from mindformers.tools.utils import OneLineArgumentParser, UsageError, check_output_path

_BYTES = {'float32': 4, 'float16': 2, 'bfloat16': 2, 'float64': 8, 'int32': 4, 'int64': 8}


def _positive(text):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def build_parser():
    parser = OneLineArgumentParser(prog='python -m mindformers.tools.export_strategy', name='export_strategy',
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--config', required=True, help='run YAML (or a registered model name)')
    parser.add_argument('--output_dir', required=True, help='directory for the strategy files (no other .json)')
    parser.add_argument('--data_parallel', type=_positive)
    parser.add_argument('--model_parallel', type=_positive)
    parser.add_argument('--pipeline_stage', type=_positive)
    parser.add_argument('--micro_batch_num', type=_positive)
    parser.add_argument('--optimizer_shard', action=argparse.BooleanOptionalAction,
                        help='the parallel optimizer splits parameters and their state over data-parallel copies')
    parser.add_argument('--vocab_emb_dp', action=argparse.BooleanOptionalAction,
                        help='replicate the embedding and head (--no-vocab_emb_dp: split their vocabulary; always '
                             'split under pipeline parallel)')
    parser.add_argument('--only_trainable_params', action=argparse.BooleanOptionalAction,
                        help="lay out the trainable parameters only, e.g. a LoRA delta (default: the YAML's "
                             "parallel.strategy_ckpt_config.only_trainable_params, else every parameter)")
    parser.add_argument('--options', nargs='+', default=[], metavar='KEY=VALUE', help='dotted YAML overrides')
    parser.add_argument('--overwrite', action='store_true', help='replace the .json files already in --output_dir')
    return parser


def _config_path(args):
    from mindformers.models.model_book import find_config, list_models
    if os.path.isfile(args.config):
        return args.config
    if args.config not in list_models():
        raise UsageError(f"--config {args.config}: no such file, and not a registered model name")
    return find_config(args.config)


def _apply_options(config, args):
    from mindformers.tools.register import parse_value
    for item in args.options:
        if '=' not in item:
            raise ValueError(f"--options expects KEY=VALUE, got {item!r}")
        key, value = item.split('=', 1)
        config.merge_from_dict({key: parse_value(value)}, strict=True)
    return config


def _parallel_config(config, args):
    from mindformers.parallel.config import build_parallel_config
    mapping = dict(config.get('parallel_config') or {})
    for key in ('data_parallel', 'model_parallel', 'pipeline_stage', 'micro_batch_num', 'optimizer_shard',
                'vocab_emb_dp'):
        if getattr(args, key) is not None:
            mapping[key] = getattr(args, key)
    if args.micro_batch_num is None:
        mapping['micro_batch_num'] = max(int(mapping.get('micro_batch_num', 1)), int(mapping.get('pipeline_stage', 1)))
    return build_parallel_config(mapping)


def _check_output_dir(directory, overwrite):
    """The .json files already in `directory` (the old output, replaced with `overwrite`; else UsageError)."""
    check_output_path(directory, '--output_dir', overwrite=True, directory=True)
    others = sorted(glob.glob(os.path.join(directory, '*.json')))
    if others and not overwrite:
        names = ', '.join(os.path.basename(p) for p in others[:5])
        raise UsageError(f"--output_dir {directory} already holds .json files ({names}); MindSpore merges every "
                         f".json of a strategy directory, so give an empty or new directory, or pass --overwrite to "
                         f"replace them")
    return others


def summarize(layouts, parallel, paths):
    """One line per pipeline stage: ranks, parameter and optimizer-state counts, full and per-rank sizes."""
    stage_devices = parallel.data_parallel * parallel.model_parallel
    lines = []
    for stage, path in enumerate(paths):
        held = [layout for layout in layouts.values() if stage in layout.stages]
        states = sum(1 for layout in held if layout.state_of)
        full = sum(_nbytes(layout.shape, layout.dtype) for layout in held)
        per_rank = sum(_nbytes(layout.slice_shape(), layout.dtype) for layout in held)
        first = stage * stage_devices
        lines.append(f"stage {stage} (ranks {first}-{first + stage_devices - 1}): {len(held) - states} parameters "
                     f"+ {states} optimizer states, {full / 2 ** 20:.2f} MiB in full, {per_rank / 2 ** 20:.2f} MiB "
                     f"per rank -> {path}")
    return lines


def _nbytes(shape, dtype):
    count = 1
    for size in shape:
        count *= size
    return count * _BYTES.get(dtype, 4)


def _fail(err, code):
    sys.stderr.write(f"export_strategy: error: {err}\n")
    return code


def main(argv=None):
    args = build_parser().parse_args(argv)
    from mindformers.tools.register import MindFormerConfig
    try:
        path = _config_path(args)
        old = _check_output_dir(args.output_dir, args.overwrite)
    except UsageError as err:
        return _fail(err, 2)
    try:
        config = MindFormerConfig(path)
        model = config.get('model') or {}
        if 'model_config' not in model or 'arch' not in model:
            raise ValueError(f"{args.config}: no model.model_config and model.arch sections")
    except (ValueError, KeyError, TypeError, OSError) as err:  # the YAML's content
        return _fail(err, 1)
    try:
        _apply_options(config, args)
        if args.only_trainable_params is not None:
            config.merge_from_dict({'parallel.strategy_ckpt_config.only_trainable_params': args.only_trainable_params})
        parallel = _parallel_config(config, args)
        from mindformers.trainer.build import build_network
        network = build_network(config, parallel, allocate=False)  # the model the Trainer would build, no weights
        devices = parallel.data_parallel * parallel.model_parallel * parallel.pipeline_stage
    except (ValueError, KeyError, TypeError) as err:
        return _fail(err, 2)
    try:
        from mindformers.parallel.layout import run_layouts
        from mindformers.parallel.strategy import write_strategy_files
        layouts = run_layouts(config, network, None, parallel)
        paths = write_strategy_files(layouts, args.output_dir)
        for stale in set(old) - set(paths):
            os.remove(stale)
    except (ValueError, OSError) as err:
        return _fail(err, 1)
    print(f"{type(network).__name__}: data_parallel {parallel.data_parallel} x model_parallel "
          f"{parallel.model_parallel} x pipeline_stage {parallel.pipeline_stage} = {devices} devices"
          f"{', optimizer shard' if parallel.optimizer_shard else ''}")
    for line in summarize(layouts, parallel, paths):
        print(line)
    return 0


if __name__ == '__main__':
    sys.exit(main())
