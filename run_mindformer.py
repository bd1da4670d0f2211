#!/usr/bin/env python
"""Run a YAML config: `python run_mindformer.py --config configs/gpt2/run_gpt2_tiny.yaml --run_mode train`.

`--run_mode serve` starts the OpenAI-compatible server on the config's model (as `python -m mindformers.serve`, with
its flags: --host, --port, --slots, --max_waiting, --timeout, --pet_checkpoint, --served_model_name, --chat_format).

Flags override the YAML; `--options a.b=1 c=[1,2]` and free `--a.b.c value` set any dotted key that the config
knows (`--generation.max_new_tokens 5` also creates a missing generation section).
Exit codes: 0 success; 2 the command line is wrong (a flag, an override naming an unknown key or giving a bad value, a
--config path that does not exist); 1 the YAML file is wrong (syntax, unknown key, bad value) or the run fails;
130 interrupted. Errors are one line on stderr."""
import _thread
import argparse
import json
import os
import signal
import sys
import threading

from mindformers.serving.cli import (KV_CACHE_DTYPE_CHOICES, QUANTIZATION_CHOICES, SERVE_DEFAULTS,
                                    add_serving_arguments)
from mindformers.tools.utils import OneLineArgumentParser, cli_error  # no MindSpore: flags are checked before it loads

RUN_MODES = ('train', 'finetune', 'eval', 'predict', 'serve')
SERVE_FLAGS = ('pet_checkpoint', 'served_model_name', *SERVE_DEFAULTS)


def _bool(text):
    value = str(text).strip().lower()
    if value in ('true', '1', 'yes'):
        return True
    if value in ('false', '0', 'no'):
        return False
    raise argparse.ArgumentTypeError(f"expected True or False, got {text!r}")


def build_parser():
    parser = OneLineArgumentParser(prog='run_mindformer.py', description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--config', required=True, help='YAML run config (path, or a registered model name)')
    parser.add_argument('--run_mode', choices=RUN_MODES, help='what to run (default: run_mode of the YAML)')
    parser.add_argument('--train_dataset_dir', help='training data: MindRecord directory or file')
    parser.add_argument('--eval_dataset_dir', help='evaluation data: MindRecord directory or file')
    parser.add_argument('--predict_data', nargs='+', help='prompt(s) for predict; "\\n" is unescaped')
    parser.add_argument('--predict_batch_size', type=int, help='prompts per generate call')
    parser.add_argument('--load_checkpoint',
                        help='weights to load: a .safetensors or .ckpt file, a sharded set (its *.index.json or '
                             'directory), a HuggingFace model directory (converted per tensor), a model name with '
                             'published weights, or a training checkpoint directory (its newest; rank_N/ per rank). '
                             'All but .ckpt files are read tensor by tensor into a model built without initial '
                             'weights (a training .ckpt is read whole). predict/eval without any weights (this, '
                             'or model.model_config.checkpoint_name_or_path) warn and run on random weights')
    parser.add_argument('--auto_trans_ckpt', type=_bool,
                        help='reshard --load_checkpoint (rank_N/ directories) into this run\'s layout before loading')
    parser.add_argument('--src_strategy_path_or_dir',
                        help='strategy file (or directory of per-stage files) --load_checkpoint was saved with')
    parser.add_argument('--only_save_strategy', type=_bool,
                        help="write this run's parallel strategy files under <output_dir>/strategy/ and exit")
    parser.add_argument('--output_dir', help='where logs and checkpoints go (default ./output)')
    parser.add_argument('--overwrite_output_dir', type=_bool,
                        help="train anew into an output_dir holding an earlier run's checkpoints and metrics, "
                             "deleting them (without it such a run is refused)")
    parser.add_argument('--seed', type=int)
    parser.add_argument('--use_parallel', type=_bool, help='True under msrun for data parallel')
    parser.add_argument('--device_target', choices=('CPU', 'GPU', 'Ascend'))
    parser.add_argument('--device_id', type=int)
    parser.add_argument('--mode', type=int, choices=(0, 1), help='0 GRAPH_MODE (default), 1 PYNATIVE_MODE')
    parser.add_argument('--epochs', type=int)
    parser.add_argument('--batch_size', type=int)
    parser.add_argument('--gradient_accumulation_steps', type=int)
    parser.add_argument('--do_eval', type=_bool, help='evaluate while training')
    parser.add_argument('--pet_method', metavar='PET_TYPE',
                        help="parameter-efficient tuning, e.g. lora: the config's model.model_config.pet_config must "
                             "be of that type; a config without one gets the algorithm's defaults (LoRA on the "
                             "family's default layers)")
    parser.add_argument('--quantization', choices=QUANTIZATION_CHOICES,
                        help='weight-only int8 inference (predict, eval, serve): the weights are quantized as they '
                             'load (model.model_config.quantization; quantization_config sets the scheme)')
    parser.add_argument('--kv_cache_dtype', choices=KV_CACHE_DTYPE_CHOICES,
                        help='dtype of the KV cache in predict/serve (model.model_config.kv_cache_dtype; default '
                             'the compute_dtype): float16 halves its memory under fp32 computation')
    parser.add_argument('--resume_training', nargs='?', const='True', metavar='True|PATH',
                        help='continue an interrupted run: alone or True = the newest complete checkpoint under '
                             '--load_checkpoint (a directory) or <output_dir>/checkpoint; or a checkpoint file or '
                             'directory')
    parser.add_argument('--options', nargs='+', default=[], metavar='KEY=VALUE',
                        help='dotted overrides, e.g. --options runner_config.epochs=2 optimizer.learning_rate=1e-4')
    add_serving_arguments(parser.add_argument_group('serve (--run_mode serve)'), defaults=False)
    return parser


def parse_args(argv=None):
    """Parse flags; returns (args, overrides) where overrides maps dotted keys to parsed values."""
    from mindformers.tools.register import parse_value
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    overrides = {}
    for item in args.options:
        if '=' not in item:
            parser.error(f"--options expects KEY=VALUE, got {item!r}")
        key, value = item.split('=', 1)
        overrides[key] = parse_value(value)
    i = 0
    while i < len(rest):
        flag = rest[i]
        if flag == '--merge':
            parser.error("--merge: a LoRA delta is merged into the base weights by "
                         "`python mindformers/tools/transform_ckpt_lora.py --config <lora yaml> --src_ckpt_path_or_dir "
                         "<delta> --base_checkpoint <base> --dst_ckpt_dir <new dir>` (or model.merge_pet() in Python)")
        if not flag.startswith('--') or '.' not in flag:
            parser.error(f"unrecognized argument {flag!r} (free overrides must look like --section.key value)")
        if '=' in flag:
            key, value = flag[2:].split('=', 1)
            i += 1
        else:
            if i + 1 >= len(rest):
                parser.error(f"{flag} needs a value")
            key, value = flag[2:], rest[i + 1]
            i += 2
        overrides[key] = parse_value(value)
    for name in ('epochs', 'batch_size', 'gradient_accumulation_steps', 'predict_batch_size'):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name} must be >= 1, got {value}")
    return args, overrides


class FileConfigError(Exception):
    """The YAML file named by --config is wrong (exit 1, not 2: the command line itself is fine)."""


def build_config(args, overrides):
    """The run config: the YAML (checked: FileConfigError), then `--options`/free overrides, then the named flags
    (checked again: any new problem comes from the command line)."""
    from mindformers.models.model_book import find_config, list_models
    from mindformers.tools.register import ConfigError, MindFormerConfig
    from mindformers.trainer.run_config import CREATABLE_SECTIONS, validate_run_config
    path = args.config
    if not os.path.isfile(path):
        if path in list_models():
            path = find_config(path)
        else:
            known = ', '.join(sorted(list_models()))
            raise FileNotFoundError(f"--config {args.config}: no such file, and not a registered model name "
                                    f"(known: {known})")
    try:
        config = validate_run_config(MindFormerConfig(path))
    except ConfigError as err:
        raise FileConfigError(str(err)) from None
    try:
        config.merge_from_dict(overrides, strict=True, sections=CREATABLE_SECTIONS)
    except KeyError as err:
        raise KeyError(f"override {err.args[0]}") from None
    flag_map = {'output_dir': 'output_dir', 'overwrite_output_dir': 'overwrite_output_dir', 'seed': 'seed',
                'use_parallel': 'use_parallel',
                'load_checkpoint': 'load_checkpoint', 'run_mode': 'run_mode', 'do_eval': 'do_eval',
                'resume_training': 'resume_training', 'auto_trans_ckpt': 'auto_trans_ckpt',
                'src_strategy_path_or_dir': 'src_strategy_path_or_dir', 'only_save_strategy': 'only_save_strategy',
                'device_target': 'context.device_target', 'device_id': 'context.device_id', 'mode': 'context.mode',
                'epochs': 'runner_config.epochs', 'gradient_accumulation_steps':
                'runner_config.gradient_accumulation_steps', 'quantization': 'model.model_config.quantization',
                'kv_cache_dtype': 'model.model_config.kv_cache_dtype'}
    for flag, key in flag_map.items():
        value = getattr(args, flag)
        if value is not None:
            config.merge_from_dict({key: value})
    if args.batch_size is not None:
        config.merge_from_dict({'runner_config.batch_size': args.batch_size,
                                'train_dataset.batch_size': args.batch_size})
    for key in ('train_dataset', 'eval_dataset'):
        if getattr(args, f'{key}_dir') is not None:
            from mindformers.trainer.trainer import use_dataset_dir
            try:
                use_dataset_dir(config, key, getattr(args, f'{key}_dir'))
            except FileNotFoundError as err:
                raise FileNotFoundError(f"--{key}_dir: {err}") from None
    if args.pet_method:
        from mindformers.trainer.pet_method import apply_to_config, check_pet_method
        apply_to_config(config, check_pet_method(args.pet_method, '--pet_method'), f"--config {args.config}")
    if args.predict_data is not None:
        from mindformers.tools.utils import check_unicode
        config['input_data'] = [check_unicode(p.replace('\\n', '\n'), f"--predict_data prompt {i}")
                                for i, p in enumerate(args.predict_data)]
    config.setdefault('run_mode', 'train')
    model = config.get('model')
    model_config = model.get('model_config') if isinstance(model, dict) else None
    if config.run_mode in ('train', 'finetune') and isinstance(model_config, dict) and model_config.get('quantization'):
        raise ValueError(f"model.model_config.quantization ({'--quantization' if args.quantization else 'the YAML'})"
                         f" is for inference: run_mode {config.run_mode} trains float weights")
    return validate_run_config(config, source='command line')


def _fail(err, code):
    message = err.args[0] if isinstance(err, KeyError) and err.args else err
    return cli_error('run_mindformer.py', message, code)


_ERRORS = (ValueError, KeyError, TypeError, FileNotFoundError, NotImplementedError, RuntimeError, OSError)


def _route_ctrl_c():
    """Deliver Ctrl-C as KeyboardInterrupt in the main thread. MindSpore's graph executor installs a C-level SIGINT
    handler on every graph run that turns SIGINT into SIGTERM (the process dies with status 143, skipping every
    cleanup). Blocking SIGINT before MindSpore starts its threads (they inherit the mask) and waiting for it in one
    thread keeps that handler from ever running; a second Ctrl-C ends the process at once."""
    if threading.current_thread() is not threading.main_thread():
        return
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})

    def wait():
        signal.sigwait({signal.SIGINT})
        _thread.interrupt_main()  # raised when the main thread next runs Python code, e.g. after the current step
        signal.sigwait({signal.SIGINT})
        sys.stderr.write("run_mindformer.py: interrupted\n")
        os._exit(130)

    threading.Thread(target=wait, name='ctrl-c', daemon=True).start()


def _print_summary(mode, state):
    """The end of a train/finetune run as one JSON line on stdout, for scripts: run_mode, steps (run by this
    process), seconds, first_loss, final_loss (mean of the last steps), loss_drop_percent, initial_step (> 0 when
    resumed), total_steps and last_checkpoint (None when nothing was saved). Nothing for only_save_strategy."""
    if state is None:
        return
    print(json.dumps({'run_mode': mode, **(state.get('summary') or {'steps': 0}),
                      'initial_step': state.get('initial_step', 0), 'total_steps': state.get('total_steps'),
                      'last_checkpoint': state.get('last_checkpoint')}))


def _serve(args, config):
    """--run_mode serve: the server of `mindformers.serving.cli` on the run config's model."""
    from mindformers.serving.cli import serve
    for flag, value in SERVE_DEFAULTS.items():
        if getattr(args, flag) is None:
            setattr(args, flag, value)
    args.load_checkpoint = config.get('load_checkpoint') or None
    return serve(config, args, model_id=args.config)


def main(argv=None):
    args, overrides = parse_args(argv)
    try:
        config = build_config(args, overrides)
    except FileConfigError as err:
        return _fail(err, 1)
    except _ERRORS as err:  # a flag, an override or the --config path is wrong: a usage error
        return _fail(err, 2)
    if config.run_mode == 'serve':
        return _serve(args, config)
    given = [flag for flag in SERVE_FLAGS if getattr(args, flag) is not None]
    if given:
        return _fail(f"--{given[0]} is a flag of --run_mode serve (this run_mode is {config.run_mode})", 2)
    try:
        from mindformers.trainer import Trainer
        from mindformers.tools.logger import logger
        trainer = Trainer(args=config)
        mode = config.run_mode
        if mode not in RUN_MODES:
            raise ValueError(f"run_mode {mode!r} is not one of {', '.join(RUN_MODES)}")
        if mode == 'train':
            state = trainer.train()
            if getattr(state, 'last_checkpoint', None):
                logger.info("checkpoint: %s", state.last_checkpoint)
                logger.info("continue a prompt with: python run_mindformer.py --config %s --run_mode predict "
                            "--load_checkpoint %s --predict_data \"...\"", args.config,
                            os.path.join(config.output_dir, 'checkpoint'))
            _print_summary(mode, state)
        elif mode == 'finetune':
            _print_summary(mode, trainer.finetune())
        elif mode == 'eval':
            result = trainer.evaluate()
            if result is not None:  # None: only_save_strategy
                print(json.dumps(result, ensure_ascii=False))
        else:
            results = trainer.predict(batch_size=args.predict_batch_size,
                                      **dict(config.get('generation') or {}))
            for result in results or []:  # None: only_save_strategy
                print(result['text_generation_text'][0])
                print('-' * 40)
    except KeyboardInterrupt:
        sys.stderr.write("run_mindformer.py: interrupted (a training run continues from its newest checkpoint with "
                         "--resume_training)\n")
        return 130
    except _ERRORS as err:
        return _fail(err, 1)
    return 0


if __name__ == '__main__':
    _route_ctrl_c()
    sys.exit(main())
