"""`python -m mindformers.serve --model <name | YAML | directory>`: the OpenAI-compatible server (and
`run_mindformer.py --config <yaml> --run_mode serve`, which reaches `serve` with its run config).

The port is bound first and /health answers 503 while the model loads in the background; the log says
`listening on http://HOST:PORT` at once and `ready: http://HOST:PORT/v1 ...` once requests are served.
Exit codes: 0 stopped (Ctrl-C / SIGTERM); 2 the command line is wrong (a flag, a path that does not exist, a port
that cannot be bound); 1 loading failed (a checkpoint or adapter that does not fit names its flag and path)."""
import argparse
import importlib.util
import os
import signal
import socket
import sys
import threading

from mindformers.tools.file_io import first_line
from mindformers.tools.utils import OneLineArgumentParser, UsageError, cli_error

PROG = 'mindformers.serve'
CHAT_FORMAT_CHOICES = ('auto', 'chatglm', 'llama2', 'plain')
QUANTIZATION_CHOICES = ('int8',)
KV_CACHE_DTYPE_CHOICES = ('float32', 'float16')  # models.base_config.KV_CACHE_DTYPES, without importing MindSpore
SERVE_DEFAULTS = {'host': '127.0.0.1', 'port': 8000, 'slots': 8, 'max_waiting': 64, 'timeout': 600.0,
                  'batched_prefill': 0, 'prefill_chunk': 64, 'chat_format': 'auto'}


def add_serving_arguments(parser, defaults=True):
    """The server's flags (shared with run_mindformer.py, which passes `defaults=False` to tell given from not)."""
    default = SERVE_DEFAULTS if defaults else {}
    parser.add_argument('--pet_checkpoint', help='a PET delta to serve on the model: a PEFT LoRA adapter directory '
                                                 '(adapter_config.json) or a delta checkpoint saved by finetuning')
    parser.add_argument('--host', default=default.get('host'), help='address to listen on (default 127.0.0.1)')
    parser.add_argument('--port', type=int, default=default.get('port'), help='port (default 8000; 0 = any free)')
    parser.add_argument('--slots', type=int, default=default.get('slots'),
                        help='requests decoded together (KV-cache slots; default 8)')
    parser.add_argument('--max_waiting', type=int, default=default.get('max_waiting'),
                        help='requests queued behind the slots before new ones get 503 (default 64)')
    parser.add_argument('--prefill_chunk', type=int, default=default.get('prefill_chunk'),
                        help='the most rows of a step that reads new prompts beside the decoding requests (chunked '
                             'prompts, where the model allows; default 64; 0: a prefill per request)')
    parser.add_argument('--batched_prefill', type=int, default=default.get('batched_prefill'),
                        help='without chunked prompts: prompts up to this many tokens that wait together start in '
                             'one prefill (its shapes compile at startup; default 0: one prefill per request)')
    parser.add_argument('--timeout', type=float, default=default.get('timeout'),
                        help='time limit of one request in seconds (default 600)')
    parser.add_argument('--served_model_name', help='the model id clients send (default: the --model value)')
    parser.add_argument('--chat_format', choices=CHAT_FORMAT_CHOICES, default=default.get('chat_format'),
                        help='prompt format of /v1/chat/completions (default auto: chatglm for GLM/GLM2, llama2 for '
                             'a LLaMA whose name says chat, else plain)')


def build_parser():
    parser = OneLineArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--model', required=True,
                        help='registered model name (e.g. gpt2_tiny), run YAML, or a save_pretrained / HuggingFace '
                             'directory')
    parser.add_argument('--load_checkpoint', help='weights to load: a checkpoint file, or a directory (its newest)')
    parser.add_argument('--quantization', choices=QUANTIZATION_CHOICES,
                        help='weight-only int8: the weights are quantized as they load (a --pet_checkpoint LoRA is '
                             'merged into the float weights first)')
    parser.add_argument('--kv_cache_dtype', choices=KV_CACHE_DTYPE_CHOICES,
                        help="dtype of the slots' KV cache (default: the model's compute_dtype); float16 halves it "
                             "under fp32 computation")
    add_serving_arguments(parser)
    return parser


def check_model(model):
    """UsageError unless --model names an existing path or a registered model."""
    if os.path.exists(model):
        return
    if '/' in model or os.sep in model or model.endswith(('.yaml', '.yml')):
        raise UsageError(f"--model {model} does not exist")
    from mindformers.models.model_book import find_config
    try:
        find_config(model)
    except ValueError as err:
        raise UsageError(f"--model: {err}") from None


def check_serving_args(args):
    """UsageError for serving flags that cannot work (checked before anything loads)."""
    for name, low in (('slots', 1), ('max_waiting', 0), ('batched_prefill', 0), ('prefill_chunk', 0)):
        if getattr(args, name) < low:
            raise UsageError(f"--{name} must be >= {low}, got {getattr(args, name)}")
    if not 0 <= args.port <= 65535:
        raise UsageError(f"--port must be in [0, 65535], got {args.port}")
    if not args.timeout > 0:
        raise UsageError(f"--timeout must be > 0 seconds, got {args.timeout}")
    for name in ('load_checkpoint', 'pet_checkpoint'):
        value = getattr(args, name, None)
        if value and not os.path.exists(value):
            raise UsageError(f"--{name} {value} does not exist")


def load_model(source, checkpoint_given=False, quantization=None, kv_cache_dtype=None):
    """(model, tokenizer) from `source`: a registered name, YAML or directory (AutoModel / AutoTokenizer), or
    run_mindformer.py's run config (its model and processor sections, context and load_checkpoint). A name or YAML
    without weights is built with fresh ones: with a warning unless `checkpoint_given` (--load_checkpoint).
    `quantization`: 'int8' (--quantization), or False to build a run config's model float whatever it says.
    `kv_cache_dtype` (--kv_cache_dtype): the model config's, when given."""
    from mindformers.core.context import init_context
    from mindformers.models.auto import AutoModel, AutoTokenizer
    from mindformers.models.auto.auto_class import NoWeightsError
    if isinstance(source, str):
        init_context()
        overrides = {'quantization': quantization} if quantization else {}
        if kv_cache_dtype:
            overrides['kv_cache_dtype'] = kv_cache_dtype
        try:
            model = AutoModel.from_pretrained(source, **overrides)
        except NoWeightsError as err:
            if not checkpoint_given:
                from mindformers.tools.logger import logger
                logger.warning("%s. Serving randomly initialised weights: give --load_checkpoint for real ones", err)
            model = AutoModel.from_config(source, **overrides)
        return model, AutoTokenizer.from_pretrained(source)
    from mindformers.tools.build import build_tokenizer
    from mindformers.trainer.build import build_network
    init_context(False, dict(source.get('context') or {}, enable_compile_cache=False))
    tokenizer = build_tokenizer((source.get('processor') or {}).get('tokenizer'), where='processor.tokenizer')
    if quantization is False:
        source.model.model_config.quantization = source.model.model_config.quantization_config = None
    if kv_cache_dtype:
        source.model.model_config.kv_cache_dtype = kv_cache_dtype
    return build_network(source), tokenizer


def requested_quantization(source, args):
    """The int8 settings asked for by --quantization or a run config's model_config, else None."""
    from mindformers.quantization.config import quantization_settings
    if getattr(args, 'quantization', None):
        return quantization_settings(args.quantization, None, '--quantization')
    if isinstance(source, str):
        return None
    section = source.model.model_config
    return quantization_settings(section.get('quantization'), section.get('quantization_config'),
                                 'model.model_config')


def load_weights(model, load_checkpoint=None, pet_checkpoint=None):
    """Load --load_checkpoint (whole weights, or a delta over the model's) and --pet_checkpoint (a PEFT adapter
    directory, or a delta checkpoint: a model without PET gets the pet_config its meta.json records) into `model`.
    Errors name the flag and the path."""
    from mindformers.models.peft_adapter import CONFIG_FILE
    from mindformers.pet import apply_pet, pet_config_from_dict
    from mindformers.tools.checkpoint import load_checkpoint_file, meta_entry, resolve_checkpoint
    from mindformers.trainer.delta import load_weights as load_into
    for flag, value in (('--load_checkpoint', load_checkpoint), ('--pet_checkpoint', pet_checkpoint)):
        if not value:
            continue
        try:
            if flag == '--pet_checkpoint' and os.path.isfile(os.path.join(value, CONFIG_FILE)):
                model.load_peft_adapter(value)
                continue
            path = resolve_checkpoint(value)
            if flag == '--pet_checkpoint' and getattr(model, 'pet_config', None) is None:
                recorded = ((meta_entry(path) or {}).get('delta') or {}).get('pet_config')
                if not recorded:
                    raise ValueError("the model has no PET and no meta.json beside the checkpoint records its "
                                     "pet_config: serve a PET config (e.g. a *_lora name or YAML) as --model")
                apply_pet(model, pet_config_from_dict(recorded, 'meta.json delta.pet_config'))
            load_into(model, load_checkpoint_file(path), path)
        except (ValueError, OSError, RuntimeError, TypeError) as err:
            raise ValueError(f"{flag} {value}: {first_line(err)}") from None


def _bind(host, port):
    try:
        family = socket.AF_INET6 if ':' in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError as err:
        raise UsageError(f"--host {host} --port {port}: cannot listen there ({err.strerror or err})") from None
    sock.set_inheritable(True)
    return sock


def warm_up(engine, tokenizer):
    """Run one short request through `engine`, compiling the first prompt bucket and the decode step before
    clients come; RuntimeError if it fails."""
    from mindformers.serving.engine import SamplingParams
    done, events = threading.Event(), []

    def on_event(event):
        events.append(event)
        if event.finish_reason is not None:
            done.set()

    engine.submit(tokenizer.encode_prompt('Hello') or [0], SamplingParams(max_tokens=2, temperature=0), on_event)
    done.wait()
    if events[-1].finish_reason == 'error':
        raise RuntimeError(f"the model failed its first request: {events[-1].message}")


def start_engine(source, args, model_id):
    """(started and warmed-up Engine, tokenizer, chat format, why that format) for the flags in `args`."""
    from mindformers.serving.chat import resolve_chat_format
    from mindformers.serving.engine import Engine
    quantization = requested_quantization(source, args)
    merge_first = quantization is not None and bool(args.pet_checkpoint)  # PET needs the float weights
    model, tokenizer = load_model(source, bool(getattr(args, 'load_checkpoint', None)),
                                  False if merge_first else getattr(args, 'quantization', None),
                                  getattr(args, 'kv_cache_dtype', None))
    load_weights(model, getattr(args, 'load_checkpoint', None), args.pet_checkpoint)
    if merge_first:
        from mindformers.quantization import quantize_model
        quantize_model(model, **quantization)  # a LoRA is merged first
    chat_format, why = resolve_chat_format(args.chat_format, tokenizer, model_id)
    engine = Engine(model, tokenizer, slots=args.slots, max_waiting=args.max_waiting, timeout=args.timeout,
                    batched_prefill=args.batched_prefill, prefill_chunk=args.prefill_chunk).start()
    try:
        warm_up(engine, tokenizer)
    except BaseException:
        engine.shutdown()
        raise
    return engine, tokenizer, chat_format, why


def asgi_stack():
    """(event loop, HTTP parser) for uvicorn: uvloop and httptools when installed (the `serve` extra installs
    them; they parse and schedule in C), else asyncio and h11."""
    found = lambda name: importlib.util.find_spec(name) is not None  # noqa: E731
    return 'uvloop' if found('uvloop') else 'asyncio', 'httptools' if found('httptools') else 'h11'


def serve(source, args, model_id=None):
    """Serve `source` (see `load_model`) with the serving flags in `args` (and `args.load_checkpoint`) until
    stopped; returns the exit status."""
    from mindformers.tools.logger import logger
    try:
        if isinstance(source, str):
            check_model(source)
        check_serving_args(args)
        sock = _bind(args.host, args.port)
    except UsageError as err:
        return cli_error(PROG, err, 2)
    try:
        import uvicorn
        from mindformers.serving.app import create_app
    except ImportError as err:
        return cli_error(PROG, first_line(err) if 'serve' in str(err) else
                         f"the server needs FastAPI and uvicorn ({err}): pip install -e \".[serve]\"", 1)
    host, port = sock.getsockname()[:2]
    url = f"http://{'[' + host + ']' if ':' in host else host}:{port}"
    model_id = args.served_model_name or model_id or str(source)
    app = create_app(model_id=model_id)
    loop, http = asgi_stack()
    server = uvicorn.Server(uvicorn.Config(app, loop=loop, http=http, log_level='warning',
                                           timeout_graceful_shutdown=5, lifespan='off'))
    outcome = {'code': 0, 'engine': None}

    def load():
        try:
            engine, tokenizer, chat_format, why = start_engine(source, args, model_id)
            outcome['engine'] = engine
            app.state.serving.load(engine, tokenizer, chat_format)
            logger.info("ready: %s/v1 serves %r (%d slots, context %d tokens, chat format %s: %s); chat page %s/",
                        url, model_id, args.slots, engine.context_length, chat_format, why, url)
        except Exception as err:  # pylint: disable=broad-except
            app.state.serving.fail(first_line(err))
            outcome['code'] = cli_error(PROG, first_line(err), 1)
            server.should_exit = True

    logger.info("listening on %s (uvicorn, %s + %s); loading %s", url, loop, http,
                source if isinstance(source, str) else model_id)
    threading.Thread(target=load, name='load-model', daemon=True).start()
    # uvicorn stops gracefully on SIGINT/SIGTERM, then raises the signal again for the handler it replaced: make
    # that one a no-op, so a stop is a normal exit (status 0) after the engine has shut down
    main = threading.current_thread() is threading.main_thread()
    replaced = {sig: signal.signal(sig, lambda *_: None) for sig in (signal.SIGINT, signal.SIGTERM)} if main else {}
    try:
        server.run(sockets=[sock])
    finally:
        if outcome['engine'] is not None:
            outcome['engine'].shutdown()
        for sig, handler in replaced.items():
            signal.signal(sig, handler)
    if outcome['code'] == 0:
        logger.info("stopped")
    return outcome['code']


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    return serve(args.model, args)


if __name__ == '__main__':
    sys.exit(main())
