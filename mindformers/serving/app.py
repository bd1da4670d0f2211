"""The OpenAI-compatible HTTP server: a FastAPI app over a serving `Engine` (continuous batching).

Endpoints: GET /health, GET /v1/models, POST /v1/completions, POST /v1/chat/completions, GET /metrics (Prometheus
text), GET / (the chat page, `static/index.html`) and the files beside it under /static/. The app can serve before
its model is loaded: until `app.state.serving.load(engine, tokenizer, chat_format)` is called (from any thread),
/health and the API answer 503.

The engine calls back on its own thread; an engine step's events are handed to the requests' asyncio queues with
one `loop.call_soon_threadsafe` (`dispatch`). A client that goes away cancels its engine requests (`Handle.cancel`)."""
import asyncio
import os
import time

try:
    from fastapi import FastAPI, Request
    from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, StreamingResponse
    from fastapi.staticfiles import StaticFiles
    from starlette.exceptions import HTTPException
except ImportError as _err:  # the server is an extra: the library imports without it
    raise ImportError(f"the server needs FastAPI and uvicorn ({_err}): pip install -e \".[serve]\"") from None

from mindformers.generation.text_generator import encode_prompt
from mindformers.serving.chat import chat_prompt_ids
from mindformers.serving.engine import Overloaded, RequestError, SamplingParams
from mindformers.serving.protocol import APIError, ChunkWriter, completion_response, new_id, parse_request
from mindformers.tools.logger import logger

STATIC_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'static')
DISCONNECT_POLL = 0.5  # seconds between checks that a non-streaming client is still there
METRICS_PREFIX = 'mindformers_'
METRIC_LABELS = {'requests_total': 'finish_reason'}  # the label of a stats() entry that maps names to counts


class ServingState:
    """What the app serves: nothing while loading; `load(engine, tokenizer, chat_format)` once the model is ready;
    `fail(message)` if loading failed."""

    def __init__(self, model_id):
        self.model_id, self.created = model_id, int(time.time())
        self.engine = self.tokenizer = self.chat_format = None
        self.error = None

    def load(self, engine, tokenizer, chat_format):
        engine.dispatch = dispatch
        self.tokenizer, self.chat_format = tokenizer, chat_format
        self.engine = engine  # last: a request that sees the engine sees the rest

    def fail(self, message):
        self.error = message

    def ready_engine(self):
        """The engine, or APIError 503 while the model loads (or failed to)."""
        if self.error:
            raise APIError(503, f"the model failed to load: {self.error}", None, 'model_load_failed')
        if self.engine is None or not self.engine.ready:
            raise APIError(503, "the model is loading; retry when GET /health answers 200", None, 'model_loading')
        return self.engine


class _Choice:
    """The on_event of one choice of a `_Requests`: its events go to that request's asyncio queue."""

    def __init__(self, requests, index):
        self.requests, self.index = requests, index

    def __call__(self, event):  # on the engine thread, when the engine delivers events one by one
        dispatch([(self, event)])


def dispatch(batch):
    """`Engine.dispatch` of the app (engine thread): an engine step's [(on_event, Event)] cross to each event loop
    with one `call_soon_threadsafe` (each wakes the loop and hands it the GIL, so one per step rather than one per
    event)."""
    by_loop = {}
    for on_event, event in batch:
        if isinstance(on_event, _Choice):
            by_loop.setdefault(on_event.requests.loop, []).append((on_event, event))
        else:
            on_event(event)
    for loop, items in by_loop.items():
        try:
            loop.call_soon_threadsafe(_enqueue, items)
        except RuntimeError:  # the event loop is closed: the server is stopping
            pass


def _enqueue(items):  # on the event loop
    for choice, event in items:
        choice.requests.queue.put_nowait((choice.index, event))


class _Requests:
    """The engine requests of one HTTP request (one per choice) and their events, as (choice, Event), on an asyncio
    queue."""

    def __init__(self, engine, ids, params):
        self.loop, self.queue = asyncio.get_running_loop(), asyncio.Queue()
        self.handles, self.pending = [], set(range(len(params)))
        try:
            for index, choice_params in enumerate(params):
                self.handles.append(engine.submit(ids, choice_params, _Choice(self, index)))
        except BaseException:
            self.cancel()
            raise

    def cancel(self):
        """Cancel the choices that have not finished."""
        for index, handle in enumerate(self.handles):
            if index in self.pending:
                handle.cancel()
        self.pending.clear()

    async def events(self, disconnected=None):
        """(choice, Event) until every choice has finished; `disconnected` (an async check) is polled while waiting
        and ends the iteration when it returns True."""
        while self.pending:
            try:
                index, event = await asyncio.wait_for(self.queue.get(), DISCONNECT_POLL) if disconnected \
                    else await self.queue.get()
            except asyncio.TimeoutError:
                if await disconnected():
                    return
                continue
            if event.finish_reason is not None:
                self.pending.discard(index)
            yield index, event


class _EventStream(StreamingResponse):
    """Server-sent events that call `on_close` however the response ends (done, client gone, server stopping)."""

    def __init__(self, content, on_close):
        super().__init__(content, media_type='text/event-stream',
                         headers={'Cache-Control': 'no-cache', 'X-Accel-Buffering': 'no'})
        self.on_close = on_close

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.on_close()


def _failure(event):
    """The APIError of a request's last event when it did not complete."""
    if event.finish_reason == 'timeout':
        return APIError(504, event.message or "the request ran past the server's time limit (--timeout)", None,
                        'timeout')
    return APIError(500, f"generation failed: {event.message or 'unknown error'}", None, 'generation_error')


def _engine_error(err, request):
    if isinstance(err, Overloaded):
        return APIError(503, f"the server is overloaded: {err}; retry later", None, 'overloaded')
    param = request.prompt_field if err.param in ('prompt', 'messages') else err.param
    return APIError(400, str(err), param, getattr(err, 'code', None) or 'invalid_value')


def prompt_ids(state, request):
    """The prompt token ids of a checked request (chat: in the served chat format)."""
    tokenizer = state.tokenizer
    try:
        ids = chat_prompt_ids(state.chat_format, tokenizer, request.messages) if request.chat \
            else encode_prompt(tokenizer, request.prompt, state.engine.vocab_size)
    except ValueError as err:
        if isinstance(err, APIError):
            raise
        raise APIError(400, str(err), request.prompt_field, 'invalid_value') from None
    if not ids:
        raise APIError(400, f"`{request.prompt_field}` encodes to no tokens", request.prompt_field, 'invalid_value')
    return ids


def sampling_params(request, max_tokens):
    """One SamplingParams per choice: choice i samples with seed + i."""
    params = []
    for index in range(request.n):
        seed = None if request.seed is None else request.seed + index
        params.append(SamplingParams(max_tokens=max_tokens, seed=seed, **request.sampling))
    return params


async def _answer(requests, request, model, prompt_tokens, disconnected):
    """The non-streamed response once every choice has finished."""
    texts, reasons, counts = [''] * request.n, [None] * request.n, [0] * request.n
    try:
        async for index, event in requests.events(disconnected):
            if event.finish_reason in ('timeout', 'error'):
                raise _failure(event)
            texts[index] += event.text
            reasons[index], counts[index] = event.finish_reason, event.completion_tokens
            prompt_tokens = event.prompt_tokens
    finally:
        requests.cancel()
    return completion_response(request, new_id(request.chat), int(time.time()), model, texts, reasons,
                               prompt_tokens, sum(counts))


async def _stream(requests, request, model, prompt_tokens):
    """The server-sent events of a streamed response."""
    writer, counts = ChunkWriter(request, model), [0] * request.n
    for index in range(request.n):
        opening = writer.start(index)
        if opening:
            yield opening
    async for index, event in requests.events():
        if event.finish_reason in ('timeout', 'error'):
            requests.cancel()
            yield writer.error(_failure(event))
            break
        prompt_tokens, counts[index] = event.prompt_tokens, event.completion_tokens
        if event.text:
            yield writer.text(index, event.text)
        if event.finish_reason is not None:
            yield writer.finish(index, event.finish_reason)
    else:
        if request.include_usage:
            yield writer.usage(prompt_tokens, sum(counts))
    yield writer.done()


def prometheus_text(stats, prefix=METRICS_PREFIX):
    """`engine.stats()` in Prometheus' text format: `X_sum` with `X_count` as the summary X; other numbers as
    counters when named `*_total` or `*_sum`, else gauges; {name: number} as one series per name, labelled by
    METRIC_LABELS (else `key`)."""
    lines = []
    for key, value in stats.items():
        name, base = prefix + key, key[:-len('_sum')]
        if key.endswith('_count') and f"{key[:-len('_count')]}_sum" in stats:
            continue  # written with its _sum
        if key.endswith('_sum') and f"{base}_count" in stats:
            lines += [f"# TYPE {prefix}{base} summary", f"{name} {float(value)}",
                      f"{prefix}{base}_count {float(stats[base + '_count'])}"]
            continue
        lines.append(f"# TYPE {name} {'counter' if key.endswith(('_total', '_sum')) else 'gauge'}")
        if isinstance(value, dict):
            label = METRIC_LABELS.get(key, 'key')
            lines += [f'{name}{{{label}="{item}"}} {float(count)}' for item, count in value.items()]
        else:
            lines.append(f"{name} {float(value)}")
    return '\n'.join(lines) + '\n'


def _error_response(err):
    return JSONResponse(err.body(), err.status)


def create_app(engine=None, tokenizer=None, model_id='model', chat_format='plain'):
    """The FastAPI app serving `engine` (a started `mindformers.serving.engine.Engine`) with `tokenizer` under the
    model id `model_id`, chat requests in `chat_format` (see `mindformers.serving.chat`). Without an engine the app
    answers 503 until `app.state.serving.load(engine, tokenizer, chat_format)`."""
    state = ServingState(model_id)
    if engine is not None:
        state.load(engine, tokenizer, chat_format)
    app = FastAPI(title='mindformers', docs_url=None, redoc_url=None, openapi_url=None)
    app.state.serving = state

    @app.exception_handler(HTTPException)
    async def http_error(_, err):  # unknown path, wrong method: our error JSON, not FastAPI's {"detail"}
        return JSONResponse(APIError(err.status_code, str(err.detail), None, 'not_found' if err.status_code == 404
                                     else 'method_not_allowed' if err.status_code == 405 else None).body(),
                            err.status_code)

    @app.exception_handler(Exception)
    async def server_error(_, err):
        logger.exception("request failed")
        return _error_response(APIError(500, f"internal error: {type(err).__name__}: {err}", None, 'server_error'))

    @app.get('/health')
    async def health():
        try:
            state.ready_engine()
        except APIError as err:
            return _error_response(err)
        return {'status': 'ok'}

    @app.get('/v1/models')
    async def models():
        try:
            engine = state.ready_engine()
        except APIError as err:
            return _error_response(err)
        return {'object': 'list', 'data': [{'id': state.model_id, 'object': 'model', 'created': state.created,
                                            'owned_by': 'mindformers', 'max_model_len': engine.context_length}]}

    @app.get('/metrics')
    async def metrics():
        if state.engine is None:
            return PlainTextResponse(prometheus_text({'ready': 0}))
        return PlainTextResponse(prometheus_text({'ready': int(bool(state.engine.ready)), **state.engine.stats()}),
                                 media_type='text/plain; version=0.0.4')

    if os.path.isdir(STATIC_DIR):  # the chat page's files
        app.mount('/static', StaticFiles(directory=STATIC_DIR), name='static')

    @app.get('/')
    async def index():
        page = os.path.join(STATIC_DIR, 'index.html')
        if not os.path.isfile(page):
            return _error_response(APIError(404, "this install has no chat page (mindformers/serving/static/"
                                                 "index.html)", None, 'not_found'))
        return FileResponse(page, media_type='text/html')

    async def complete(http_request, chat):
        try:
            engine = state.ready_engine()
            request = parse_request(await http_request.body(), chat)
            if request.model is not None and request.model != state.model_id:
                raise APIError(404, f"model {request.model!r} is not served here; this server serves "
                                    f"{state.model_id!r}", 'model', 'model_not_found')
            ids = prompt_ids(state, request)
            max_tokens = request.max_tokens or max(engine.context_length - len(ids), 1)  # chat: the rest
            try:
                params = sampling_params(request, max_tokens)
                for choice_params in params:
                    choice_params.validate()
                requests = _Requests(engine, ids, params)
            except (RequestError, Overloaded) as err:
                raise _engine_error(err, request) from None
            if request.stream:
                return _EventStream(_stream(requests, request, state.model_id, len(ids)), requests.cancel)
            return await _answer(requests, request, state.model_id, len(ids), http_request.is_disconnected)
        except APIError as err:
            return _error_response(err)

    @app.post('/v1/completions')
    async def completions(http_request: Request):
        return await complete(http_request, chat=False)

    @app.post('/v1/chat/completions')
    async def chat_completions(http_request: Request):
        return await complete(http_request, chat=True)

    return app
