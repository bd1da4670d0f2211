"""The OpenAI wire format of /v1/completions and /v1/chat/completions: request parsing and validation, responses,
stream chunks (server-sent events) and errors. No web framework here: bytes and dicts in, dicts and strings out.

Errors are `APIError`s whose `body()` is OpenAI's `{"error": {"message", "type", "param", "code"}}`."""
import json
import math
import time
import uuid
from dataclasses import dataclass, field

MAX_STOP = 4  # stop sequences per request (OpenAI's and TGI's limit)
MAX_N = 16  # choices per request
COMPLETION_MAX_TOKENS = 16  # OpenAI's default for /v1/completions; chat defaults to the rest of the context

_TYPES = {400: 'invalid_request_error', 404: 'invalid_request_error', 500: 'server_error',
          503: 'unavailable_error', 504: 'timeout_error'}


class APIError(Exception):
    """An HTTP error answer: `status`, a message naming what is wrong, the request field at fault (`param`) and a
    short machine-readable `code`."""

    def __init__(self, status, message, param=None, code=None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self):
        return {'error': {'message': self.message, 'type': _TYPES.get(self.status, 'server_error'),
                          'param': self.param, 'code': self.code}}


def bad_request(message, param=None, code='invalid_value'):
    return APIError(400, message, param, code)


@dataclass
class CompletionRequest:
    """A checked request. `prompt` (completions) or `messages` (chat: checked by `serving.chat`); `max_tokens`
    None = the endpoint's default; `sampling` holds the other `SamplingParams` fields (seed is per choice)."""
    chat: bool
    model: str = None
    prompt: str = None
    messages: list = None
    max_tokens: int = None
    sampling: dict = field(default_factory=dict)
    seed: int = None
    n: int = 1
    stream: bool = False
    include_usage: bool = False

    @property
    def prompt_field(self):
        """The request field the prompt came from, for errors about it."""
        return 'messages' if self.chat else 'prompt'


# ------------------------------------------------------------------ field checks
def _is_int(value):
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value):
    return (_is_int(value) or isinstance(value, float)) and math.isfinite(value)


def _integer(name, value, low):
    if not _is_int(value) or value < low:
        raise bad_request(f"`{name}` must be an integer >= {low}, got {json.dumps(value)}", name)
    return value


def _number(name, value, low, high, low_open=False):
    if not _is_number(value) or value < low or value > high or (low_open and value == low):
        bounds = f"{'(' if low_open else '['}{low}, {high}]"
        raise bad_request(f"`{name}` must be a number in {bounds}, got {json.dumps(value)}", name)
    return float(value)


def _flag(name, value):
    if not isinstance(value, bool):
        raise bad_request(f"`{name}` must be true or false, got {json.dumps(value)}", name)
    return value


def _stop(value):
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
        raise bad_request(f"`stop` must be a non-empty string or a list of them, got {json.dumps(value)}", 'stop')
    if len(stops) > MAX_STOP:
        raise bad_request(f"`stop` holds {len(stops)} sequences; at most {MAX_STOP} are allowed", 'stop')
    return tuple(dict.fromkeys(stops))


def _prompt(value):
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], str):
        value = value[0]
    if isinstance(value, str):
        return value
    if isinstance(value, list) and value and all(_is_int(v) for v in value):
        raise bad_request("`prompt` as token ids is not supported: send the text", 'prompt', 'unsupported_value')
    if isinstance(value, list) and len(value) > 1:
        raise bad_request(f"`prompt` holds {len(value)} prompts; send one prompt per request (use `n` for several "
                          f"completions of one prompt)", 'prompt', 'unsupported_value')
    raise bad_request(f"`prompt` must be a string (or a list of one string), got {json.dumps(value)[:80]}", 'prompt')


def _stream_options(value):
    if not isinstance(value, dict):
        raise bad_request(f"`stream_options` must be an object, got {json.dumps(value)}", 'stream_options')
    unknown = sorted(set(value) - {'include_usage'})
    if unknown:
        raise bad_request(f"`stream_options.{unknown[0]}` is not supported (only include_usage)",
                          f'stream_options.{unknown[0]}', 'unknown_parameter')
    return _flag('stream_options.include_usage', value.get('include_usage', False))


# OpenAI fields this server cannot honour: accepted only at their no-op value(s)
_NOOP = {
    'presence_penalty': ('0', lambda v: _is_number(v) and v == 0),
    'frequency_penalty': ('0', lambda v: _is_number(v) and v == 0),
    'logit_bias': ('{}', lambda v: v == {}),
    'echo': ('false', lambda v: v is False),
    'best_of': ('1', lambda v: _is_int(v) and v == 1),
    'suffix': ('null', lambda v: False),
    'top_logprobs': ('0', lambda v: _is_int(v) and v == 0),
    'tools': ('[]', lambda v: v == []),
    'tool_choice': ('"none"', lambda v: v == 'none'),
    'response_format': ('{"type": "text"}', lambda v: v == {'type': 'text'}),
}
_LOGPROBS = {True: ('false', lambda v: v is False), False: ('null', lambda v: False)}  # by `chat`

_COMMON = ('model', 'max_tokens', 'min_tokens', 'temperature', 'top_p', 'top_k', 'repetition_penalty', 'stop', 'seed',
           'stream', 'stream_options', 'n', 'user', 'presence_penalty', 'frequency_penalty', 'logit_bias', 'logprobs')
FIELDS = {False: _COMMON + ('prompt', 'echo', 'best_of', 'suffix'),
          True: _COMMON + ('messages', 'max_completion_tokens', 'top_logprobs', 'tools', 'tool_choice',
                           'response_format')}


def parse_request(raw, chat):
    """A `CompletionRequest` from the raw body of a completions (`chat` False) or chat completions request; an
    APIError 400 naming the field for bad JSON, an unknown field, a wrong type or value. A field set to null means
    its default."""
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, ValueError) as err:
        raise bad_request(f"the request body is not valid JSON: {err}", None, 'invalid_json') from None
    if not isinstance(body, dict):
        raise bad_request(f"the request body must be a JSON object, got {type(body).__name__}", None, 'invalid_json')
    try:
        json.dumps(body, ensure_ascii=False).encode('utf-8')
    except UnicodeEncodeError:
        raise bad_request("the request body holds a lone surrogate escape (e.g. \\ud800): not valid text", None,
                          'invalid_json') from None
    unknown = [name for name in body if name not in FIELDS[chat]]
    if unknown:
        raise bad_request(f"unknown field `{unknown[0]}` (accepted: {', '.join(FIELDS[chat])})", unknown[0],
                          'unknown_parameter')
    given = {name: value for name, value in body.items() if value is not None}
    required = 'messages' if chat else 'prompt'
    if required not in given:
        raise bad_request(f"`{required}` is required", required, 'missing_required_parameter')
    noop = {**_NOOP, 'logprobs': _LOGPROBS[chat]}
    for name, value in given.items():
        if name in noop and not noop[name][1](value):
            raise bad_request(f"`{name}` is not supported by this server: leave it out (or {noop[name][0]}), got "
                              f"{json.dumps(value)[:80]}", name, 'unsupported_parameter')
    request = CompletionRequest(chat=chat)
    if 'model' in given and not isinstance(given['model'], str):
        raise bad_request(f"`model` must be a string, got {json.dumps(given['model'])}", 'model')
    if 'user' in given and not isinstance(given['user'], str):
        raise bad_request(f"`user` must be a string, got {json.dumps(given['user'])}", 'user')
    request.model = given.get('model')
    if chat:
        request.messages = given['messages']  # its shape is checked with the chat format (serving.chat)
    else:
        request.prompt = _prompt(given['prompt'])
    if 'max_tokens' in given and 'max_completion_tokens' in given and \
            given['max_tokens'] != given['max_completion_tokens']:
        raise bad_request("give `max_tokens` or `max_completion_tokens`, not both with different values",
                          'max_completion_tokens')
    for name in ('max_tokens', 'max_completion_tokens'):
        if name in given:
            request.max_tokens = _integer(name, given[name], 1)
    if not chat and request.max_tokens is None:
        request.max_tokens = COMPLETION_MAX_TOKENS
    sampling = request.sampling
    if 'temperature' in given:
        sampling['temperature'] = _number('temperature', given['temperature'], 0, 2)
    if 'top_p' in given:
        sampling['top_p'] = _number('top_p', given['top_p'], 0, 1, low_open=True)
    if 'top_k' in given:  # vLLM's -1 = off is ours 0
        sampling['top_k'] = max(_integer('top_k', given['top_k'], -1), 0)
    if 'min_tokens' in given:  # vLLM's extra: EOS is held off until this many new tokens
        sampling['min_tokens'] = _integer('min_tokens', given['min_tokens'], 0)
    if 'repetition_penalty' in given:
        sampling['repetition_penalty'] = _number('repetition_penalty', given['repetition_penalty'], 0, 100,
                                                 low_open=True)
    if 'stop' in given:
        sampling['stop'] = _stop(given['stop'])
    request.n = _integer('n', given.get('n', 1), 1)
    if request.n > MAX_N:
        raise bad_request(f"`n` must be at most {MAX_N}, got {request.n}", 'n')
    if 'seed' in given:  # choice i samples with seed + i
        if not _is_int(given['seed']) or not 0 <= given['seed'] <= 2 ** 63 - request.n:
            raise bad_request(f"`seed` must be an integer in [0, 2**63 - n], got {json.dumps(given['seed'])}",
                              'seed')
        request.seed = given['seed']
    request.stream = _flag('stream', given.get('stream', False))
    if 'stream_options' in given:
        if not request.stream:
            raise bad_request("`stream_options` is only allowed with `stream: true`", 'stream_options')
        request.include_usage = _stream_options(given['stream_options'])
    return request


# ------------------------------------------------------------------ responses
def new_id(chat):
    return f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"


def usage(prompt_tokens, completion_tokens):
    return {'prompt_tokens': prompt_tokens, 'completion_tokens': completion_tokens,
            'total_tokens': prompt_tokens + completion_tokens}


def _choice(chat, index, text, finish_reason, stream):
    if not chat:
        return {'index': index, 'text': text, 'logprobs': None, 'finish_reason': finish_reason}
    content = {'delta' if stream else 'message': text}
    return {'index': index, **content, 'logprobs': None, 'finish_reason': finish_reason}


def completion_response(request, response_id, created, model, texts, finish_reasons, prompt_tokens,
                        completion_tokens):
    """The JSON of a non-streamed answer: one choice per text."""
    choices = [_choice(request.chat, i, {'role': 'assistant', 'content': text} if request.chat else text, reason,
                       False) for i, (text, reason) in enumerate(zip(texts, finish_reasons))]
    return {'id': response_id, 'object': 'chat.completion' if request.chat else 'text_completion',
            'created': created, 'model': model, 'choices': choices, 'usage': usage(prompt_tokens, completion_tokens)}


class ChunkWriter:
    """Server-sent events of one streamed answer: every chunk has the same id, `created` and `model` and `usage`
    null; chat choices open with a role delta; a choice ends with an empty delta carrying its finish_reason; with
    include_usage, one chunk with `choices: []` and the usage comes last; `done()` is the `data: [DONE]` line."""

    def __init__(self, request, model):
        self.chat, self.model = request.chat, model
        self.id, self.created = new_id(request.chat), int(time.time())
        self._text_frames = {}  # choice index -> the text chunk's event around its JSON-encoded text

    def _event(self, choices, usage_=None):
        chunk = {'id': self.id, 'object': 'chat.completion.chunk' if self.chat else 'text_completion',
                 'created': self.created, 'model': self.model, 'choices': choices, 'usage': usage_}
        return sse(chunk)

    def start(self, index):
        """The opening chunk of choice `index` (chat: the role delta; completions: nothing)."""
        return self._event([_choice(True, index, {'role': 'assistant', 'content': ''}, None, True)]) \
            if self.chat else ''

    def text(self, index, text):
        if index not in self._text_frames:  # built once per choice: only the text differs between its chunks
            marker = '\x00'
            event = self._event([_choice(self.chat, index, {'content': marker} if self.chat else marker, None, True)])
            self._text_frames[index] = event.rsplit(json.dumps(marker), 1)  # the last string
        head, tail = self._text_frames[index]
        return f"{head}{json.dumps(text, ensure_ascii=False)}{tail}"

    def finish(self, index, finish_reason):
        return self._event([_choice(self.chat, index, {} if self.chat else '', finish_reason, True)])

    def usage(self, prompt_tokens, completion_tokens):
        return self._event([], usage(prompt_tokens, completion_tokens))

    @staticmethod
    def error(err):
        return sse(err.body())

    @staticmethod
    def done():
        return 'data: [DONE]\n\n'


def sse(data):
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"
