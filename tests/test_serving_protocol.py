"""The server's HTTP layer without a model: request checks (`serving.protocol`), chat formats (`serving.chat`) with
each family's tiny tokenizer, and the app's answers over a scripted engine (errors, timeouts, n choices, loading,
/metrics). The server on a real model is tests/test_serving_api.py."""
import json
import threading

import pytest

from mindformers.serving.chat import chat_prompt_ids, resolve_chat_format, split_conversation
from mindformers.serving.protocol import APIError, ChunkWriter, COMPLETION_MAX_TOKENS, parse_request

USER = {'role': 'user', 'content': 'hi'}


def parse(chat=False, **body):
    if 'prompt' not in body and 'messages' not in body:
        body['messages' if chat else 'prompt'] = [USER] if chat else 'hi'
    return parse_request(json.dumps(body).encode(), chat)


def refused(chat=False, raw=None, **body):
    with pytest.raises(APIError) as info:
        parse_request(raw, chat) if raw is not None else parse(chat, **body)
    assert info.value.status == 400
    return info.value


# ------------------------------------------------------------------ request checks
def test_defaults_follow_openai():
    completion, chat = parse(), parse(chat=True)
    assert completion.max_tokens == COMPLETION_MAX_TOKENS == 16 and chat.max_tokens is None  # chat: the context
    assert completion.sampling == {} and completion.n == 1 and not completion.stream and completion.seed is None
    full = parse(chat=True, max_completion_tokens=5, min_tokens=2, temperature=0, top_p=0.5, top_k=-1,
                 repetition_penalty=1.1, stop='\n', seed=3, stream=True, stream_options={'include_usage': True}, n=2,
                 user='me', presence_penalty=0, logprobs=False, model=None)
    assert full.max_tokens == 5 and full.seed == 3 and full.n == 2 and full.stream and full.include_usage
    assert full.sampling == {'temperature': 0.0, 'top_p': 0.5, 'top_k': 0, 'min_tokens': 2,
                             'repetition_penalty': 1.1, 'stop': ('\n',)}


@pytest.mark.parametrize('body,param', [
    ({'max_tokens': 0}, 'max_tokens'), ({'max_tokens': -1}, 'max_tokens'), ({'max_tokens': 2.5}, 'max_tokens'),
    ({'temperature': 3}, 'temperature'), ({'temperature': 'hot'}, 'temperature'), ({'top_p': 0}, 'top_p'),
    ({'top_k': -2}, 'top_k'), ({'min_tokens': -1}, 'min_tokens'), ({'repetition_penalty': 0}, 'repetition_penalty'),
    ({'stop': ['a'] * 5}, 'stop'), ({'stop': ''}, 'stop'), ({'stop': [1]}, 'stop'), ({'seed': 1.5}, 'seed'),
    ({'seed': -1}, 'seed'), ({'n': 0}, 'n'), ({'n': 99}, 'n'),
    ({'stream': 'yes'}, 'stream'), ({'stream_options': {'include_usage': True}}, 'stream_options'),
    ({'stream': True, 'stream_options': {'x': 1}}, 'stream_options.x'), ({'model': 3}, 'model'),
    ({'presence_penalty': 0.5}, 'presence_penalty'), ({'frequency_penalty': 1}, 'frequency_penalty'),
    ({'logprobs': 1}, 'logprobs'), ({'echo': True}, 'echo'), ({'best_of': 2}, 'best_of'), ({'suffix': 'x'}, 'suffix'),
    ({'logit_bias': {'1': 5}}, 'logit_bias'), ({'foo': 1}, 'foo'), ({'prompt': [1, 2]}, 'prompt'),
    ({'prompt': ['a', 'b']}, 'prompt'), ({'prompt': {}}, 'prompt')])
def test_bad_completion_fields_are_named(body, param):
    err = refused(**body)
    assert err.param == param and param.split('.')[0] in err.message
    assert set(err.body()['error']) == {'message', 'type', 'param', 'code'}


@pytest.mark.parametrize('body,param', [({'logprobs': True}, 'logprobs'), ({'tools': [{'type': 'function'}]}, 'tools'),
                                        ({'response_format': {'type': 'json_object'}}, 'response_format'),
                                        ({'max_tokens': 3, 'max_completion_tokens': 4}, 'max_completion_tokens'),
                                        ({'prompt': 'x'}, 'prompt'), ({'echo': False}, 'echo')])
def test_bad_chat_fields_are_named(body, param):
    assert refused(chat=True, **body).param == param


def test_body_errors():
    assert refused(raw=b'{"prompt": ').code == 'invalid_json'
    assert refused(raw=b'[1, 2]').code == 'invalid_json'
    assert refused(raw=b'\xff\xfe').code == 'invalid_json'
    assert refused(raw=b'{"prompt": "\\ud800"}').code == 'invalid_json'  # a lone surrogate is no text
    assert refused(raw=b'{"max_tokens": 3}').param == 'prompt'
    assert refused(chat=True, raw=b'{"messages": null}').param == 'messages'


# ------------------------------------------------------------------ chat formats
@pytest.mark.parametrize('messages,needle', [
    ([], 'non-empty'), ('hi', 'non-empty'), ([{'role': 'assistant', 'content': 'a'}], 'expected the user'),
    ([USER, {'role': 'assistant', 'content': 'a'}], 'last message'), ([USER, USER], 'alternate'),
    ([{'role': 'robot', 'content': 'x'}], "'robot'"), ([{'role': 'user'}], 'content must be a string'),
    ([USER, {'role': 'assistant', 'content': 'a'}, {'role': 'system', 'content': 's'}, USER], 'before'),
    ([{'role': 'user', 'content': 'x', 'name': 'bob'}], 'name'), ([{'role': 'system', 'content': 's'}], 'no user'),
    ([{'role': 'user', 'content': [{'type': 'image_url'}]}], 'text parts')])
def test_malformed_conversations_are_refused_naming_messages(messages, needle):
    with pytest.raises(APIError) as info:
        split_conversation(messages)
    assert info.value.status == 400 and info.value.param == 'messages' and needle in info.value.message


def test_conversation_split():
    messages = [{'role': 'system', 'content': 'be brief'}, USER, {'role': 'assistant', 'content': 'hello'},
                {'role': 'user', 'content': [{'type': 'text', 'text': 'how'}, {'type': 'text', 'text': 'are you'}]}]
    assert split_conversation(messages) == ('be brief', [('hi', 'hello')], 'how\nare you')


@pytest.fixture(scope='module')
def tokenizers():
    from mindformers.models.auto import AutoTokenizer
    return {name: AutoTokenizer.from_pretrained(f'{name}_tiny') for name in ('gpt2', 'llama', 'glm', 'glm2')}


def test_auto_chat_format_per_family(tokenizers):
    assert resolve_chat_format('auto', tokenizers['glm'])[0] == 'chatglm'
    assert resolve_chat_format('auto', tokenizers['glm2'])[0] == 'chatglm'
    assert resolve_chat_format('auto', tokenizers['llama'], 'llama_tiny')[0] == 'plain'
    assert resolve_chat_format('auto', tokenizers['llama'], '/models/Llama-2-7b-chat-hf')[0] == 'llama2'
    assert resolve_chat_format('auto', tokenizers['gpt2'], 'gpt2_chat')[0] == 'plain'
    with pytest.raises(ValueError, match='encode_chat'):
        resolve_chat_format('llama2', tokenizers['gpt2'])


CONVERSATION = [{'role': 'system', 'content': 'Be kind.'}, {'role': 'user', 'content': 'Good day'},
                {'role': 'assistant', 'content': 'Hail'}, {'role': 'user', 'content': 'Who art thou'}]


def test_chatglm_format_is_the_tokenizers_build_prompt(tokenizers):
    from mindformers.dataset.chat_templates import glm2_chat_prompt, glm_chat_prompt
    for name, template in (('glm', glm_chat_prompt), ('glm2', glm2_chat_prompt)):
        tok = tokenizers[name]
        text = template('Who art thou', [('Be kind.\n\nGood day', 'Hail')])
        assert '[Round' in text and text.endswith('答：')
        assert chat_prompt_ids('chatglm', tok, CONVERSATION) == tok.encode_prompt(text)
        ids = chat_prompt_ids('chatglm', tok, [{'role': 'system', 'content': 'S'}, USER])
        assert ids == tok.encode_prompt(template('S\n\nhi'))  # the system message opens the first user turn


def test_llama2_format_puts_the_system_message_in_the_first_turn(tokenizers):
    tok = tokenizers['llama']
    ids = chat_prompt_ids('llama2', tok, CONVERSATION)
    first = [tok.bos_token_id] + tok.encode('[INST] <<SYS>>\nBe kind.\n<</SYS>>\n\nGood day [/INST] Hail ',
                                            add_special_tokens=False) + [tok.eos_token_id]
    assert ids[:len(first)] == first
    assert ids[len(first):] == [tok.bos_token_id] + tok.encode('[INST] Who art thou [/INST]', add_special_tokens=False)


def test_plain_format_for_base_models(tokenizers):
    tok = tokenizers['gpt2']
    text = 'Be kind.\n\nUser: Good day\nAssistant: Hail\nUser: Who art thou\nAssistant:'
    assert chat_prompt_ids('plain', tok, CONVERSATION) == tok.encode_prompt(text)


# ------------------------------------------------------------------ the app over a scripted engine
class ScriptedEngine:
    """The engine contract, answering each request from its own thread with `script(params)` -> [Event]; `overload`
    makes submit refuse."""
    context_length, slots, vocab_size = 64, 2, 512

    def __init__(self, script):
        from mindformers.serving import engine
        self.engine, self.script, self.ready, self.overload = engine, script, True, False
        self.submitted, self.cancelled = [], []

    def submit(self, prompt_ids, params, on_event):
        if self.overload:
            raise self.engine.Overloaded('1 request waits for a slot')
        if len(prompt_ids) >= self.context_length:
            raise self.engine.RequestError(f"the prompt has {len(prompt_ids)} tokens", 'prompt',
                                           'context_length_exceeded')
        self.submitted.append((list(prompt_ids), params))
        handle = type('Handle', (), {'cancel': lambda _: self.cancelled.append(params)})()
        events = self.script(params)
        threading.Thread(target=lambda: [on_event(e) for e in events]).start()
        return handle

    def stats(self):
        return {'running': 1, 'waiting': 0, 'requests_total': {'stop': 2, 'length': 1}, 'prompt_tokens_total': 30,
                'time_to_first_token_seconds_sum': 0.25, 'time_to_first_token_seconds_count': 3,
                'request_seconds_sum': 1.5}


def event(text, finish_reason=None, completion_tokens=1, message=''):
    from mindformers.serving.engine import Event
    return Event(text=text, finish_reason=finish_reason, prompt_tokens=3, completion_tokens=completion_tokens,
                 message=message)


def echo_seed(params):
    """Two events: the seed, then 'end' with finish_reason length."""
    return [event(f"s{params.seed}"), event('|end', 'length', 2)]


@pytest.fixture
def client(tokenizers):
    from starlette.testclient import TestClient
    from mindformers.serving.app import create_app
    engine = ScriptedEngine(echo_seed)
    with TestClient(create_app(engine, tokenizers['gpt2'], 'tiny', 'plain')) as test_client:
        test_client.engine = engine
        yield test_client


def sse_events(response):
    return [line[len('data: '):] for line in response.iter_lines() if line.startswith('data: ')]


def test_n_choices_use_consecutive_seeds_and_sum_usage(client):
    body = client.post('/v1/completions', json={'prompt': 'hi', 'n': 3, 'seed': 7, 'model': 'tiny'}).json()
    assert [c['text'] for c in body['choices']] == ['s7|end', 's8|end', 's9|end']
    assert [c['index'] for c in body['choices']] == [0, 1, 2] and body['id'].startswith('cmpl-')
    assert body['usage'] == {'prompt_tokens': 3, 'completion_tokens': 6, 'total_tokens': 9}
    assert [p.max_tokens for _, p in client.engine.submitted] == [16] * 3


def test_chat_max_tokens_defaults_to_the_rest_of_the_context(client, tokenizers):
    body = client.post('/v1/chat/completions', json={'messages': [USER]}).json()
    assert body['choices'][0]['message'] == {'role': 'assistant', 'content': 'sNone|end'}
    ids, params = client.engine.submitted[-1]
    assert ids == tokenizers['gpt2'].encode_prompt('User: hi\nAssistant:')
    assert params.max_tokens == ScriptedEngine.context_length - len(ids)


def test_streamed_chat_chunks(client):
    with client.stream('POST', '/v1/chat/completions',
                       json={'messages': [USER], 'stream': True, 'n': 2, 'seed': 0,
                             'stream_options': {'include_usage': True}}) as response:
        assert response.headers['content-type'].startswith('text/event-stream')
        events = sse_events(response)
    assert events[-1] == '[DONE]'
    chunks = [json.loads(e) for e in events[:-1]]
    assert len({c['id'] for c in chunks}) == 1 and chunks[0]['id'].startswith('chatcmpl-')
    assert all(c['object'] == 'chat.completion.chunk' for c in chunks)
    assert chunks[-1]['choices'] == [] and chunks[-1]['usage']['completion_tokens'] == 4
    assert all(c['usage'] is None for c in chunks[:-1])
    for index in (0, 1):
        mine = [c['choices'][0] for c in chunks[:-1] if c['choices'][0]['index'] == index]
        assert mine[0]['delta'] == {'role': 'assistant', 'content': ''}
        assert ''.join(c['delta'].get('content', '') for c in mine) == f's{index}|end'
        assert mine[-1]['delta'] == {} and mine[-1]['finish_reason'] == 'length'
        assert all(c['finish_reason'] is None for c in mine[:-1])


@pytest.mark.parametrize('reason,status', [('timeout', 504), ('error', 500)])
def test_a_request_that_fails_answers_an_error(client, reason, status):
    client.engine.script = lambda params: [event('so far'), event('', reason, message=f'it {reason}')]
    response = client.post('/v1/completions', json={'prompt': 'hi'})
    assert response.status_code == status and f'it {reason}' in response.json()['error']['message']
    with client.stream('POST', '/v1/completions', json={'prompt': 'hi', 'stream': True}) as response:
        assert response.status_code == 200
        events = sse_events(response)
    assert events[-1] == '[DONE]' and json.loads(events[-2])['error']['code'] == \
        {'timeout': 'timeout', 'error': 'generation_error'}[reason]


def test_engine_refusals(client):
    client.engine.overload = True
    response = client.post('/v1/completions', json={'prompt': 'hi', 'stream': True})
    assert response.status_code == 503 and response.json()['error']['code'] == 'overloaded'
    client.engine.overload = False
    response = client.post('/v1/chat/completions', json={'messages': [{'role': 'user', 'content': 'hi ' * 80}]})
    assert response.status_code == 400 and response.json()['error']['param'] == 'messages'  # the prompt's field
    assert client.post('/v1/completions', json={'prompt': 'hi'}).status_code == 200


def test_http_errors_are_openai_json(client):
    assert client.post('/v1/completions', json={'prompt': 'hi', 'model': 'gpt-4'}).json()['error']['param'] == 'model'
    for response in (client.get('/v1/nothing'), client.get('/v1/completions')):
        assert response.status_code in (404, 405) and set(response.json()['error']) == {'message', 'type', 'param',
                                                                                         'code'}


def test_loading_answers_503_until_the_engine_is_there(tokenizers):
    from starlette.testclient import TestClient
    from mindformers.serving.app import create_app
    app = create_app(model_id='tiny')
    with TestClient(app) as test_client:
        for response in (test_client.get('/health'), test_client.get('/v1/models'),
                         test_client.post('/v1/completions', json={'prompt': 'hi'})):
            assert response.status_code == 503 and response.json()['error']['code'] == 'model_loading'
        app.state.serving.load(ScriptedEngine(echo_seed), tokenizers['gpt2'], 'plain')
        assert test_client.get('/health').json() == {'status': 'ok'}
        assert test_client.get('/v1/models').json()['data'][0]['id'] == 'tiny'


def test_metrics_are_prometheus_text(client):
    from prometheus_client.parser import text_string_to_metric_families
    families = {f.name: f for f in text_string_to_metric_families(client.get('/metrics').text)}
    assert families['mindformers_running'].samples[0].value == 1
    assert {s.labels['finish_reason']: s.value for s in families['mindformers_requests'].samples} == \
        {'stop': 2, 'length': 1}
    ttft = families['mindformers_time_to_first_token_seconds']
    assert ttft.type == 'summary' and {s.name: s.value for s in ttft.samples} == {
        'mindformers_time_to_first_token_seconds_sum': 0.25, 'mindformers_time_to_first_token_seconds_count': 3}
    assert families['mindformers_request_seconds_sum'].type == 'counter'


def test_the_library_imports_without_fastapi():
    """FastAPI and uvicorn are the `serve` extra: without them the library and the request checks import, and the
    server refuses to start with the install command."""
    import subprocess
    import sys
    from helpers.cli import tool_env
    code = ("import sys; sys.modules['fastapi'] = sys.modules['uvicorn'] = None\n"
            "import mindformers, mindformers.serving.protocol, mindformers.serving.chat\n"
            "from mindformers.serving.cli import main\n"
            "try:\n    import mindformers.serving.app\nexcept ImportError as err:\n    print(err)\n"
            "sys.exit(main(['--model', 'gpt2_tiny', '--port', '0']))")
    proc = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, env=tool_env(), timeout=300,
                          check=False)
    assert 'pip install -e ".[serve]"' in proc.stdout
    assert proc.returncode == 1 and proc.stderr.startswith('mindformers.serve: error: ') and \
        'pip install -e ".[serve]"' in proc.stderr


def test_the_chat_page_is_served_when_installed(tmp_path, monkeypatch):
    from starlette.testclient import TestClient
    from mindformers.serving import app as app_module
    (tmp_path / 'index.html').write_text('<title>chat</title>', encoding='utf-8')
    (tmp_path / 'page.js').write_text('let x = 1;', encoding='utf-8')
    monkeypatch.setattr(app_module, 'STATIC_DIR', str(tmp_path))
    page = TestClient(app_module.create_app(model_id='tiny'))
    assert page.get('/').text == '<title>chat</title>' and page.get('/').headers['content-type'].startswith('text/html')
    assert page.get('/static/page.js').text == 'let x = 1;'
    monkeypatch.setattr(app_module, 'STATIC_DIR', str(tmp_path / 'absent'))
    response = TestClient(app_module.create_app(model_id='tiny')).get('/')
    assert response.status_code == 404 and response.json()['error']['code'] == 'not_found'


def test_an_engine_steps_events_cross_to_the_event_loop_in_one_call():
    """`dispatch` (the app's Engine.dispatch) hands a step's events for two HTTP requests on one loop over with one
    call_soon_threadsafe, each to its own queue in order; other on_event callables are called directly."""
    import asyncio
    import types
    from mindformers.serving.app import _Choice, dispatch
    calls, direct = [], []
    loop = type('Loop', (), {'call_soon_threadsafe': lambda _, fn, *args: calls.append((fn, args))})()
    first, second = (types.SimpleNamespace(loop=loop, queue=asyncio.Queue()) for _ in range(2))
    dispatch([(_Choice(first, 0), event('a')), (_Choice(second, 1), event('b')), (direct.append, event('c')),
              (_Choice(first, 0), event('d', 'stop'))])
    assert len(calls) == 1 and [e.text for e in direct] == ['c']
    fn, args = calls[0]
    fn(*args)
    assert [(i, e.text) for i, e in (first.queue.get_nowait(), first.queue.get_nowait())] == [(0, 'a'), (0, 'd')]
    assert second.queue.get_nowait()[0] == 1 and second.queue.empty()


def test_streamed_text_chunks_are_the_json_of_the_chunk():
    """The cached frame of a choice's text chunks gives exactly the JSON encoding of the whole chunk."""
    for chat, body in ((False, {'prompt': 'x'}), (True, {'messages': [{'role': 'user', 'content': 'x'}]})):
        writer = ChunkWriter(parse_request(json.dumps(body), chat), '\x00')
        for index in (0, 2):
            for text in ('hi', 'a"b\\c\n\x00é🙂', '\x00'):
                choice = {'index': index, **({'delta': {'content': text}} if chat else {'text': text}),
                          'logprobs': None, 'finish_reason': None}
                chunk = {'id': writer.id, 'object': 'chat.completion.chunk' if chat else 'text_completion',
                         'created': writer.created, 'model': '\x00', 'choices': [choice], 'usage': None}
                assert writer.text(index, text) == f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n"
