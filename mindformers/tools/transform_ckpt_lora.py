#!/usr/bin/env python
"""Merge a LoRA finetune into its base model: W' = W + (lora_alpha / lora_rank) * B @ A, summed in fp32 and cast back
to W's dtype, for every adapted layer; the result is the plain model (no PET), as a checkpoint and optionally a
HuggingFace model directory.

    python mindformers/tools/transform_ckpt_lora.py --config <run YAML | registered name>
        --src_ckpt_path_or_dir <LoRA checkpoint (delta only, or base + delta) | PEFT adapter directory>
        [--base_checkpoint <base weights>] [--src_ckpt_strategy <strategy file or dir>]
        --dst_ckpt_dir <new or empty dir> [--hf_dir <new or empty dir>]

The model is the config's, with its `model_config.pet_config` (LoRA): the rank and alpha, hence the scale, come from
there, or, for a PEFT adapter directory, from its adapter_config.json. There is no scale flag (`--lora_scaling` is
refused): a hand-typed scale that disagrees with the adapter's alpha / r silently gives another model. Base weights
come from --base_checkpoint, else the config's checkpoint_name_or_path, else the source itself when it holds every
parameter. A source sliced for parallel training is first merged into one piece with --src_ckpt_strategy (as
transform_ckpt.py does).

Output: --dst_ckpt_dir gets `model.ckpt` and `config.json` (the config without pet_config), which
`AutoModel.from_pretrained(dst)` and `--load_checkpoint dst/model.ckpt` load as the plain model; --hf_dir gets the
family's HuggingFace export (`config.json` + `model.safetensors`, as `convert_weight.py --reversed`). Outputs are
written beside their place and renamed into it once complete; an existing non-empty output is refused, never
replaced. stdout ends with one JSON summary line.
Exit codes (one line on stderr for errors): 0 done; 2 the command line is wrong (a bad or refused flag, a path that
does not exist, an existing output, no base weights); 1 a file's content is wrong (no LoRA in the config, a
checkpoint without the delta or of another rank or model, an adapter that does not fit) or the run failed."""
import argparse
import json
import os
import shutil
import sys
import tempfile

if __name__ == '__main__':
    os.environ.setdefault('GLOG_v', '3')  # before MindSpore loads (when run by path): keep its warnings quiet
    os.environ.setdefault('MINDFORMERS_LOG_LEVEL', 'WARNING')  # errors stay one line on stderr
    if os.path.dirname(os.path.abspath(__file__)) == os.path.abspath(sys.path[0]):
        # run by path: import the package, not the sibling modules of this directory as top-level ones
        sys.path[0] = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mindformers.tools.utils import (OneLineArgumentParser, UsageError, check_output_path, run_cli,  # noqa: E402
                                     staging_path)

PROG = 'transform_ckpt_lora.py'


def build_parser():
    parser = OneLineArgumentParser(prog=PROG, description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--config', required=True, help='run YAML or registered model name with a LoRA pet_config')
    parser.add_argument('--src_ckpt_path_or_dir', required=True,
                        help='the LoRA: a checkpoint (delta only, or base + delta; a directory: its newest) or a '
                             'PEFT adapter directory (adapter_config.json)')
    parser.add_argument('--base_checkpoint', help="base weights (default: the config's checkpoint_name_or_path)")
    parser.add_argument('--src_ckpt_strategy', help='strategy of a source sliced for parallel training (a file, or a '
                                                    'directory of per-stage files)')
    parser.add_argument('--dst_ckpt_dir', required=True, help='new or empty directory for model.ckpt + config.json')
    parser.add_argument('--hf_dir', help='also write a HuggingFace model directory here (new or empty)')
    parser.add_argument('--lora_scaling', help=argparse.SUPPRESS)  # refused with its reason, not "unknown flag"
    return parser


def check_command_line(args):
    """UsageError for a command line that cannot work, before anything is loaded."""
    if args.lora_scaling is not None:
        raise UsageError("--lora_scaling is not accepted: the scale is lora_alpha / lora_rank of the LoRA config "
                         "(the run config's pet_config, or the adapter's adapter_config.json)")
    for flag in ('src_ckpt_path_or_dir', 'base_checkpoint', 'src_ckpt_strategy'):
        value = getattr(args, flag)
        if value is not None and not os.path.exists(value):
            raise UsageError(f"--{flag} {value} does not exist")
    if args.src_ckpt_strategy and is_peft_adapter(args.src_ckpt_path_or_dir):
        raise UsageError("--src_ckpt_strategy is for checkpoints sliced for parallel training, not PEFT adapters")
    outputs = [('--dst_ckpt_dir', args.dst_ckpt_dir)] + ([('--hf_dir', args.hf_dir)] if args.hf_dir else [])
    for flag, path in outputs:
        check_output_path(path, flag, overwrite=False, directory=True)
    if args.hf_dir and os.path.abspath(args.hf_dir) == os.path.abspath(args.dst_ckpt_dir):
        raise UsageError("--hf_dir and --dst_ckpt_dir must differ")


def is_peft_adapter(path):
    from mindformers.models.peft_adapter import CONFIG_FILE
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, CONFIG_FILE))


def load_lora_checkpoint(model, path):
    """Load a LoRA checkpoint into `model` (which has LoRA): every delta parameter, plus any of the model's other
    parameters it holds (a full checkpoint, or a trainable-only one with unfrozen base parameters); entries outside
    the model's top-level names (optimizer states, counters) are ignored. Returns 'full' when it held every
    parameter, else 'delta'. CheckpointError names missing delta parameters, unknown and mis-shaped entries."""
    from mindformers.tools.checkpoint import CheckpointError, load_checkpoint_file, load_into_network
    own = {p.name: p for p in model.get_parameters()}
    roots = {name.split('.', 1)[0] for name in own}
    held = {n: v for n, v in load_checkpoint_file(path).items() if n.split('.', 1)[0] in roots}
    delta = [n for n in model.pet_parameter_names if n not in held]
    problems = []
    if len(delta) == len(model.pet_parameter_names):
        problems.append(f"it holds no LoRA delta (no {model.pet_parameter_names[0].rsplit('.', 1)[-1]} ... entries): "
                        f"give the checkpoint the LoRA finetune saved")
    elif delta:
        problems.append(f"missing {', '.join(delta[:6])}{' ...' if len(delta) > 6 else ''}")
    unknown = sorted(n for n in held if n not in own)
    if unknown:
        problems.append(f"unexpected {', '.join(unknown[:6])}{' ...' if len(unknown) > 6 else ''}")
    mismatched = [f"{n} (checkpoint {tuple(v.shape)}, model {tuple(own[n].shape)})" for n, v in held.items()
                  if n in own and tuple(v.shape) != tuple(own[n].shape)]
    if mismatched:
        problems.append(f"wrong shape {', '.join(mismatched[:6])} (the model's LoRA has lora_rank "
                        f"{model.pet_config.lora_rank})")
    if problems:
        raise CheckpointError(f"checkpoint {path} does not fit {type(model).__name__} with its LoRA: "
                              f"{'; '.join(problems)}")
    load_into_network(model, held, path, strict=False)
    return 'full' if len(held) == len(own) else 'delta'


def _single_piece(source, strategy, work):
    """The checkpoint file of `source`: merged into one piece first when it is sliced by `strategy`."""
    from mindformers.parallel.reshard import transform_checkpoint
    from mindformers.tools.checkpoint import resolve_checkpoint
    if not strategy:
        return resolve_checkpoint(source)
    merged = os.path.join(work, 'merged')
    transform_checkpoint(source, merged, strategy, None)
    return resolve_checkpoint(os.path.join(merged, 'rank_0'))


def merge(args, work):
    """Build, load and merge the model; returns (model, summary fields)."""
    from mindformers.models.auto import AutoModel
    from mindformers.models.peft_adapter import load_peft_adapter
    overrides = {'checkpoint_name_or_path': args.base_checkpoint} if args.base_checkpoint else {}
    model = AutoModel.from_config(args.config, **overrides)  # loads checkpoint_name_or_path when set
    has_base = bool(getattr(model.config, 'checkpoint_name_or_path', ''))
    if is_peft_adapter(args.src_ckpt_path_or_dir):
        if not has_base:
            raise UsageError(f"no base weights: a PEFT adapter holds only the LoRA; give --base_checkpoint (or "
                             f"checkpoint_name_or_path in {args.config})")
        load_peft_adapter(model, args.src_ckpt_path_or_dir)
        kind = 'peft'
    else:
        config = model.pet_config
        if config is None or config.pet_type != 'lora':
            raise ValueError(f"{args.config}: model.model_config.pet_config is "
                             f"{'not set' if config is None else config.pet_type}; the LoRA (its rank and alpha, "
                             f"hence the merge scale) comes from a pet_config with pet_type lora")
        path = _single_piece(args.src_ckpt_path_or_dir, args.src_ckpt_strategy, work)
        kind = load_lora_checkpoint(model, path)
        if kind == 'delta' and not has_base:
            raise UsageError(f"no base weights: {args.src_ckpt_path_or_dir} holds only part of the model; give "
                             f"--base_checkpoint (or checkpoint_name_or_path in {args.config})")
    config = model.pet_config
    layers = sum(1 for name in model.pet_parameter_names if name.endswith('lora_a'))
    summary = {'source_kind': kind, 'merged_layers': layers, 'lora_rank': config.lora_rank,
               'lora_alpha': config.lora_alpha, 'scaling': config.scaling}
    model.merge_pet()
    return model, summary


def write_outputs(model, dst, hf_dir):
    """Write the merged model to `dst` (and its HF export to `hf_dir`), each complete before it appears."""
    from mindformers.tools.register.family import family_of_config
    staged = [staging_path(dst)] + ([staging_path(hf_dir)] if hf_dir else [])
    try:
        model.save_pretrained(staged[0], checkpoint_format='ckpt')
        if hf_dir:
            converter = family_of_config(type(model.config)).load_converter()
            converter.convert_ms_to_pt(os.path.join(staged[0], 'model.ckpt'), staged[1], config=model.config)
        for path, final in zip(staged, [dst, hf_dir]):
            os.replace(path, final)  # an empty directory there is replaced; a filled one meanwhile fails
    finally:
        for path in staged:
            shutil.rmtree(path, ignore_errors=True)
    return os.path.join(dst, 'model.ckpt')


def run(args):
    """The tool, on parsed arguments: merge, write, print the summary."""
    check_command_line(args)
    parent = os.path.dirname(os.path.abspath(args.dst_ckpt_dir))
    os.makedirs(parent, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix='.merge_lora.', dir=parent) as work:
        model, summary = merge(args, work)
        checkpoint = write_outputs(model, args.dst_ckpt_dir, args.hf_dir)
    summary = {'config': args.config, 'source': args.src_ckpt_path_or_dir, **summary,
               'dst_ckpt_dir': args.dst_ckpt_dir, 'checkpoint': checkpoint, 'hf_dir': args.hf_dir}
    print(f"merged {summary['merged_layers']} LoRA layers (scale {summary['lora_alpha']}/{summary['lora_rank']}) "
          f"into {checkpoint}{' and ' + args.hf_dir if args.hf_dir else ''}")
    print(json.dumps(summary))


def main(argv=None):
    return run_cli(PROG, build_parser(), argv, run)


if __name__ == '__main__':
    sys.exit(main())
