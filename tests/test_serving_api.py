"""The server end to end: `python -m mindformers.serve --model gpt2_tiny` on loopback (one slot, so the slot tests
are exact), driven by the official `openai` client, unmodified, and by raw HTTP (httpx) where the wire format itself
is checked. The HTTP layer's details over a scripted engine are in tests/test_serving_protocol.py."""
import importlib.util
import json
import os
import re
import signal
import subprocess
import time

import httpx
import openai
import pytest

from helpers import REPO
from helpers.cli import command, run, tool_env
from helpers.tiny import tiny_yaml

MODEL, PROMPT = 'gpt2_tiny', 'ROMEO:'
CHAT = [{'role': 'user', 'content': 'Good morrow'}]
CONTEXT = 1024  # long enough that an abandoned request is still decoding when its client is seen gone
START_TIMEOUT = 300


class Server:
    """A server subprocess on a free loopback port (`--port 0`; the port is read from its log)."""

    def __init__(self, log, tool, *args):
        self.log = log
        with open(log, 'w', encoding='utf-8') as out:
            self.proc = subprocess.Popen(command(tool, *args, '--port', 0), cwd=REPO, env=tool_env(GLOG_v='3'),
                                         stdout=out, stderr=subprocess.STDOUT)
        self.url = 'http://127.0.0.1:' + self.wait_for(r'listening on http://127\.0\.0\.1:(\d+)').group(1)

    def text(self):
        with open(self.log, encoding='utf-8', errors='replace') as f:
            return f.read()

    def wait_for(self, pattern, timeout=START_TIMEOUT):
        deadline = time.time() + timeout
        while time.time() < deadline:
            found = re.search(pattern, self.text())
            if found:
                return found
            assert self.proc.poll() is None, f"the server exited ({self.proc.returncode}):\n{self.text()[-3000:]}"
            time.sleep(0.05)
        raise AssertionError(f"no {pattern!r} in the server log after {timeout} s:\n{self.text()[-3000:]}")

    def stop(self):
        """SIGTERM (a graceful stop); returns the exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


@pytest.fixture(scope='module')
def server(tmp_path_factory):
    """gpt2_tiny with a context of CONTEXT tokens (a run YAML over its own), served as MODEL with one slot."""
    folder = tmp_path_factory.mktemp('serve')
    (folder / 'model.yaml').write_text(f"base_config: {tiny_yaml('gpt2')}\nmodel:\n  model_config:\n"
                                       f"    seq_length: {CONTEXT}\n", encoding='utf-8')
    started = Server(folder / 'server.log', 'mindformers.serve', '--model', folder / 'model.yaml',
                     '--served_model_name', MODEL, '--slots', 1, '--max_waiting', 4)
    try:
        started.wait_for('ready: ')
        yield started
    finally:
        code = started.stop()
    assert code == 0, started.text()[-3000:]


@pytest.fixture(scope='module')
def client(server):
    return openai.OpenAI(base_url=server.url + '/v1', api_key='unused', max_retries=0, timeout=120)


@pytest.fixture(scope='module')
def tokenizer():
    from mindformers.models.auto import AutoTokenizer
    return AutoTokenizer.from_pretrained(MODEL)


def stream_text(stream):
    """(text, finish_reason, chunks) of a streamed openai completion or chat completion (one choice)."""
    chunks = list(stream)
    pieces = [c.choices[0].text if hasattr(c.choices[0], 'text') else (c.choices[0].delta.content or '')
              for c in chunks if c.choices]
    reasons = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(reasons) == 1, reasons
    return ''.join(pieces), reasons[0], chunks


def sse(response):
    """The `data:` payloads of a raw event stream, in order."""
    return [line[len('data: '):] for line in response.iter_lines() if line.startswith('data: ')]


def metric(server, name):
    """A sample of /metrics: `name`, or `name{label value}` for a labelled one."""
    from prometheus_client.parser import text_string_to_metric_families
    samples = text_string_to_metric_families(httpx.get(server.url + '/metrics').text)
    return {s.name + (f"{{{','.join(s.labels.values())}}}" if s.labels else ''): s.value
            for family in samples for s in family.samples}[name]


def test_health_and_models(server, client):
    assert httpx.get(server.url + '/health').json() == {'status': 'ok'}
    assert [m.id for m in client.models.list().data] == [MODEL]


def test_uvicorn_runs_on_uvloop_and_httptools_when_installed(server):
    """The `serve` extra installs uvloop and httptools: the server then runs on them (their C modules are loaded in
    its process), else on asyncio and h11; the log says which."""
    with open(f'/proc/{server.proc.pid}/maps', encoding='utf-8') as f:
        loaded = f.read()
    stack = []
    for name, fallback in (('uvloop', 'asyncio'), ('httptools', 'h11')):
        installed = importlib.util.find_spec(name) is not None
        assert (f'/{name}/' in loaded) == installed, name
        stack.append(name if installed else fallback)
    assert f"(uvicorn, {' + '.join(stack)})" in server.text()


@pytest.mark.parametrize('sampling', [{'temperature': 0}, {'temperature': 1.0, 'top_k': 40, 'seed': 5}])
def test_completion_streamed_equals_non_streamed(client, tokenizer, sampling):
    extra = {'top_k': sampling['top_k']} if 'top_k' in sampling else None
    kwargs = dict(model=MODEL, prompt=PROMPT, max_tokens=12, temperature=sampling['temperature'],
                  seed=sampling.get('seed'), extra_body=extra)
    whole = client.completions.create(**kwargs)
    text, reason, chunks = stream_text(client.completions.create(stream=True, **kwargs))
    assert text == whole.choices[0].text and reason == whole.choices[0].finish_reason
    assert whole.id.startswith('cmpl-') and whole.object == 'text_completion' and whole.model == MODEL
    assert len({c.id for c in chunks}) == 1
    prompt_tokens = len(tokenizer.encode_prompt(PROMPT))
    generated = 12 if reason == 'length' else whole.usage.completion_tokens
    assert (whole.usage.prompt_tokens, whole.usage.completion_tokens, whole.usage.total_tokens) == \
        (prompt_tokens, generated, prompt_tokens + generated)


def test_chat_streamed_equals_non_streamed_with_usage(client, tokenizer):
    kwargs = dict(model=MODEL, messages=CHAT, max_tokens=10, temperature=0)
    whole = client.chat.completions.create(**kwargs)
    text, reason, chunks = stream_text(client.chat.completions.create(
        stream=True, stream_options={'include_usage': True}, **kwargs))
    assert whole.id.startswith('chatcmpl-') and whole.object == 'chat.completion'
    assert whole.choices[0].message.role == 'assistant'
    assert text == whole.choices[0].message.content and reason == whole.choices[0].finish_reason
    assert chunks[0].choices[0].delta.role == 'assistant'
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage
    assert all(c.usage is None for c in chunks[:-1]) and len({c.id for c in chunks}) == 1
    # the plain chat format of base models, counted by the tokenizer
    assert whole.usage.prompt_tokens == len(tokenizer.encode_prompt('User: Good morrow\nAssistant:'))


@pytest.mark.parametrize('path,body', [
    ('/v1/completions', {'prompt': PROMPT, 'max_tokens': 4}),
    ('/v1/chat/completions', {'messages': CHAT, 'max_tokens': 4, 'stream_options': {'include_usage': True}})])
def test_raw_event_stream_ends_with_done(server, path, body):
    with httpx.stream('POST', server.url + path, json={**body, 'stream': True}, timeout=120) as response:
        assert response.status_code == 200 and response.headers['content-type'].startswith('text/event-stream')
        events = sse(response)
    assert events[-1] == '[DONE]'
    chunks = [json.loads(e) for e in events[:-1]]
    finished = [c['choices'][0] for c in chunks if c['choices'] and c['choices'][0]['finish_reason']]
    assert len(finished) == 1 and finished[0]['finish_reason'] == 'length'
    assert finished[0].get('delta', {}) == {} and finished[0].get('text', '') == ''
    if 'stream_options' in body:
        assert chunks[-1]['choices'] == [] and chunks[-1]['usage']['completion_tokens'] == 4
    else:
        assert all(c['usage'] is None for c in chunks)


def test_stop_strings_are_never_emitted_even_across_chunks(client):
    kwargs = dict(model=MODEL, prompt=PROMPT, max_tokens=24, temperature=1.0, seed=11)
    chunks = [c.choices[0].text for c in client.completions.create(stream=True, **kwargs)
              if c.choices and c.choices[0].text]
    full = ''.join(chunks)
    for i in range(1, len(chunks)):  # a stop string made of the end of one chunk and the start of the next
        stop, at = chunks[i - 1][-1] + chunks[i][0], len(''.join(chunks[:i])) - 1
        if full.find(stop) == at:
            break
    else:
        pytest.fail(f"no stop string spans two chunks first in {chunks}")
    whole = client.completions.create(stop=[stop, 'never seen'], **kwargs)
    assert whole.choices[0].text == full[:at] and whole.choices[0].finish_reason == 'stop'
    text, reason, streamed = stream_text(client.completions.create(stop=stop, stream=True, **kwargs))
    assert text == full[:at] and reason == 'stop'
    assert not any(c.choices and stop in c.choices[0].text for c in streamed)
    assert client.completions.create(**kwargs).choices[0].finish_reason == 'length'


def test_n_choices_are_the_requests_with_consecutive_seeds(client):
    kwargs = dict(model=MODEL, prompt=PROMPT, max_tokens=6, temperature=1.0)
    both = client.completions.create(n=2, seed=3, **kwargs)
    alone = [client.completions.create(seed=seed, **kwargs).choices[0].text for seed in (3, 4)]
    assert [c.index for c in both.choices] == [0, 1] and [c.text for c in both.choices] == alone


def too_long():
    return ' '.join(['word'] * (CONTEXT + 10))


ERRORS = [
    ('/v1/completions', b'{"prompt": "hi",', 400, None),
    ('/v1/completions', {'prompt': PROMPT, 'max_tokens': 0}, 400, 'max_tokens'),
    ('/v1/completions', {'prompt': PROMPT, 'max_tokens': -1}, 400, 'max_tokens'),
    ('/v1/completions', {'prompt': PROMPT, 'max_tokens': CONTEXT}, 400, 'max_tokens'),
    ('/v1/completions', {'prompt': PROMPT, 'temperature': -1}, 400, 'temperature'),
    ('/v1/completions', {'prompt': PROMPT, 'best_of': 3}, 400, 'best_of'),
    ('/v1/completions', {'prompt': PROMPT, 'nonsense': 1}, 400, 'nonsense'),
    ('/v1/completions', {'prompt': too_long()}, 400, 'prompt'),
    ('/v1/completions', {'prompt': PROMPT, 'model': 'gpt-4o'}, 404, 'model'),
    ('/v1/chat/completions', {'messages': []}, 400, 'messages'),
    ('/v1/chat/completions', {'messages': [{'role': 'assistant', 'content': 'hi'}]}, 400, 'messages'),
    ('/v1/chat/completions', {'messages': [{'role': 'wizard', 'content': 'hi'}]}, 400, 'messages'),
    ('/v1/chat/completions', {'messages': [{'role': 'user', 'content': too_long()}]}, 400, 'messages'),
    ('/v1/chat/completions', {'messages': CHAT, 'stream': True, 'logprobs': True}, 400, 'logprobs'),
]


@pytest.mark.parametrize('path,body,status,param', ERRORS, ids=[f"{e[2]}-{e[3]}" for e in ERRORS])
def test_errors_answer_json_and_the_server_keeps_serving(server, client, path, body, status, param):
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    response = httpx.post(server.url + path, content=content, headers={'Content-Type': 'application/json'},
                          timeout=120)
    error = response.json()['error']
    assert response.status_code == status and error['param'] == param and error['message']
    assert set(error) == {'message', 'type', 'param', 'code'}
    after = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=2, temperature=0)
    assert after.choices[0].finish_reason == 'length'


def test_the_openai_client_sees_the_errors(client):
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=0)
    assert info.value.status_code == 400 and 'max_tokens' in str(info.value)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model='gpt-4o', messages=CHAT)


def test_a_client_that_disconnects_frees_its_slot(server, client):
    generated, cancelled = (metric(server, name) for name in ('mindformers_generation_tokens_total',
                                                              'mindformers_requests_total{cancelled}'))
    body = {'prompt': PROMPT, 'max_tokens': CONTEXT - 16, 'min_tokens': CONTEXT - 16, 'temperature': 0,
            'stream': True}
    with httpx.stream('POST', server.url + '/v1/completions', json=body, timeout=120):
        # wait until it decodes (its text may stay empty a while: a tiny model's greedy tokens can decode to
        # nothing), then leave the block, which closes the connection mid-stream
        deadline = time.time() + 60
        while metric(server, 'mindformers_generation_tokens_total') < generated + 2 and time.time() < deadline:
            time.sleep(0.01)
    after = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=3, temperature=0)
    assert after.choices[0].finish_reason == 'length'  # admitted to the one slot
    assert metric(server, 'mindformers_requests_total{cancelled}') == cancelled + 1
    ran_on = metric(server, 'mindformers_generation_tokens_total') - generated - 3
    assert ran_on < CONTEXT - 16 and metric(server, 'mindformers_running') == 0


def test_metrics_are_prometheus_text(server):
    from prometheus_client.parser import text_string_to_metric_families
    families = {f.name: f for f in text_string_to_metric_families(httpx.get(server.url + '/metrics').text)}
    assert families['mindformers_ready'].samples[0].value == 1
    assert sum(s.value for s in families['mindformers_requests'].samples) > 0


@pytest.mark.slow
def test_health_is_503_while_loading_then_200_through_run_mindformer(tmp_path, tokenizer):
    second = Server(tmp_path / 'server.log', 'run_mindformer.py', '--config', tiny_yaml('gpt2'), '--run_mode',
                    'serve', '--served_model_name', 'tiny', '--slots', 2)
    try:
        statuses = []
        deadline = time.time() + START_TIMEOUT
        while time.time() < deadline and (not statuses or statuses[-1] != 200):
            try:
                response = httpx.get(second.url + '/health', timeout=30)
            except httpx.TransportError:  # not accepting yet
                time.sleep(0.02)
                continue
            if response.status_code == 503:
                assert response.json()['error']['code'] == 'model_loading'
            statuses.append(response.status_code)
            time.sleep(0.1)
        assert statuses[0] == 503 and statuses[-1] == 200 and set(statuses) == {503, 200}
        chat = openai.OpenAI(base_url=second.url + '/v1', api_key='unused', max_retries=0).chat.completions.create(
            model='tiny', messages=CHAT, max_tokens=3)
        assert chat.model == 'tiny' and chat.usage.completion_tokens <= 3
    finally:
        assert second.stop() == 0, second.text()[-3000:]
    assert 'ready: ' in second.text() and 'stopped' in second.text()


@pytest.mark.parametrize('args,needle', [(['--slots', 0], '--slots must be >= 1'),
                                         (['--prefill_chunk', -1], '--prefill_chunk must be >= 0'),
                                         (['--model', 'gpt2_tinny'], 'did you mean gpt2_tiny'),
                                         (['--model', 'no/such/dir'], '--model no/such/dir does not exist'),
                                         (['--port', 70000], '--port must be in'),
                                         (['--chat_format', 'alpaca'], "invalid choice: 'alpaca'"),
                                         (['--load_checkpoint', '/no/such.ckpt'], '/no/such.ckpt does not exist'),
                                         (['--bogus'], 'unrecognized arguments: --bogus')])
def test_bad_flags_exit_2_with_one_line(args, needle):
    proc = run('mindformers.serve', '--model', MODEL, *args, timeout=120)
    assert proc.returncode == 2 and proc.stderr.startswith('mindformers.serve: error: ')
    assert needle in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_a_port_in_use_exits_2(server):
    port = server.url.rsplit(':', 1)[1]
    proc = run('mindformers.serve', '--model', MODEL, '--port', port, timeout=120)
    assert proc.returncode == 2 and f'--port {port}: cannot listen there' in proc.stderr


def test_a_checkpoint_that_does_not_load_exits_1_naming_it(tmp_path):
    bad = tmp_path / 'broken.ckpt'
    bad.write_bytes(b'not a checkpoint')
    proc = run('mindformers.serve', '--model', MODEL, '--port', 0, '--load_checkpoint', bad, timeout=300)
    lines = [line for line in proc.stderr.splitlines() if line.startswith('mindformers.serve: error:')]
    assert proc.returncode == 1 and len(lines) == 1 and f'--load_checkpoint {bad}' in lines[0], proc.stderr[-2000:]


def test_pet_checkpoint_serves_an_adapter_or_a_delta(tmp_path):
    """--pet_checkpoint on a model without PET: a PEFT adapter directory, or a delta checkpoint whose meta.json
    records its pet_config, gives the finetuned model's logits; a delta without that record is refused by flag."""
    import numpy as np
    import mindspore as ms
    from mindformers.models.auto import AutoModel
    from mindformers.serving.cli import load_weights
    from mindformers.tools.checkpoint import record_checkpoint, save_checkpoint_atomic
    from mindformers.trainer.delta import delta_info
    ids = ms.Tensor([[5, 9, 17, 33, 2]], ms.int32)

    def logits(model):  # eager: three tiny models compile slower than they run
        model.set_train(False)
        ms.set_context(mode=ms.PYNATIVE_MODE)
        try:
            return model(ids).asnumpy()
        finally:
            ms.set_context(mode=ms.GRAPH_MODE)

    finetuned = AutoModel.from_config('gpt2_tiny_lora')
    rng = np.random.default_rng(0)
    for param in finetuned.trainable_params():
        param.set_data(ms.Tensor(rng.standard_normal(param.shape).astype(np.float32) * 0.1))
    expected = logits(finetuned)
    base = str(tmp_path / 'base.ckpt')
    save_checkpoint_atomic({p.name: p for p in finetuned.get_parameters() if not p.requires_grad}, base)
    finetuned.save_peft_adapter(tmp_path / 'adapter')
    os.makedirs(tmp_path / 'delta')
    save_checkpoint_atomic({p.name: p for p in finetuned.trainable_params()}, str(tmp_path / 'delta' / 'lora.ckpt'))
    no_record = str(tmp_path / 'delta' / 'lora.ckpt')
    with pytest.raises(ValueError, match=f'--pet_checkpoint {no_record}: .*no meta.json'):
        load_weights(AutoModel.from_config(MODEL), base, no_record)
    record_checkpoint(str(tmp_path / 'delta'), 'lora.ckpt', 1, 1, 1, keep_max=0, delta=delta_info(finetuned, base))
    for pet in (tmp_path / 'adapter', tmp_path / 'delta'):
        model = AutoModel.from_config(MODEL)
        load_weights(model, base, str(pet))
        assert model.pet_config is not None and np.abs(logits(model) - expected).max() < 1e-5, pet
