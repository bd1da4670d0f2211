"""The chat page at `/` of `python -m mindformers.serve --model gpt2_tiny`, in headless Chromium (Debian's
/usr/bin/chromium driven by Playwright): answers stream in as they arrive and equal the API's greedy answer, a second
turn sends the whole conversation, Stop aborts the stream, errors (HTTP and mid-stream) are shown as text, and the
history stays in its tab. A screenshot is kept under the test's tmp dir (and copied to $MF_SCREENSHOT_DIR if set)."""
import json
import os
import shutil

import pytest
from playwright.sync_api import sync_playwright

from helpers.serving import call, served

CHROMIUM = '/usr/bin/chromium'
CHAT = '/v1/chat/completions'
GREEDY = {'temperature': '0', 'top_p': '1', 'top_k': '0', 'repetition_penalty': '1', 'seed': ''}

pytestmark = pytest.mark.slow


@pytest.fixture(scope='module')
def server(tmp_path_factory):
    with served('--model', 'gpt2_tiny', log_path=tmp_path_factory.mktemp('serve') / 'server.log') as url:
        yield url


@pytest.fixture(scope='module')
def browser():
    with sync_playwright() as playwright:
        args = ['--no-sandbox'] if os.geteuid() == 0 else []
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=args)
        yield browser
        browser.close()


def open_page(browser, server):
    page = browser.new_page(viewport={'width': 1100, 'height': 720})   # its own context: a separate client
    page.set_default_timeout(120_000)                                    # a first prompt length compiles its graph
    errors = []
    page.on('pageerror', lambda error: errors.append(error))
    page.goto(server + '/')
    page.wait_for_function("document.getElementById('status').className === 'ready'")
    page.js_errors = errors
    return page


def set_controls(page, **values):
    for name, value in values.items():
        page.fill('#' + name, str(value))


def ask(page, text):
    """Types `text`, sends it and waits for the answer to end; returns the JSON body the page POSTed."""
    page.fill('#prompt', text)
    with page.expect_request(lambda request: request.url.endswith(CHAT)) as sent:
        page.press('#prompt', 'Enter')
    page.wait_for_selector('#send:not([disabled])')
    return sent.value.post_data_json


def unstreamed(body):
    """The request the page sent, asking for one JSON answer instead of a stream."""
    return {key: value for key, value in body.items() if key not in ('stream', 'stream_options')}


def api_answer(server, body):
    """The server's non-streamed answer to the request the page sent."""
    status, answer = call(server + CHAT, unstreamed(body))
    assert status == 200, answer
    return answer['choices'][0]['message']['content']


def bubbles(page, role):
    return page.locator('#transcript .msg.' + role + ' .text').all_text_contents()


def history(page):
    return page.evaluate("JSON.parse(sessionStorage.getItem('mindformers-chat')).history")


@pytest.fixture(scope='module')
def chat(browser, server):
    """A page after one greedy turn, with the lengths its answer bubble showed while it streamed."""
    page = open_page(browser, server)
    set_controls(page, max_tokens=24, **GREEDY)
    page.evaluate("""() => {
        window.seenLengths = [];
        new MutationObserver(() => {
            const streaming = document.querySelector('.msg.assistant.streaming .text');
            if (streaming) window.seenLengths.push(streaming.textContent.length);
        }).observe(document.getElementById('transcript'), {childList: true, subtree: true, characterData: true});
    }""")
    body = ask(page, 'ROMEO:')
    yield page, body
    page.close()


def test_page_shows_the_served_model_and_its_health(chat, server):
    page, _ = chat
    _, models = call(server + '/v1/models')
    assert page.inner_text('#model-id') == models['data'][0]['id']
    assert page.inner_text('#status') == 'ready'


def test_answer_streams_in_and_equals_the_api_answer(chat, server):
    page, body = chat
    assert body['stream'] is True and body['messages'] == [{'role': 'user', 'content': 'ROMEO:'}]
    assert body['temperature'] == 0 and body['max_tokens'] == 24
    answer = bubbles(page, 'assistant')[-1]
    assert answer and answer == api_answer(server, body)
    grown = [n for n in page.evaluate('window.seenLengths') if n]
    assert len(set(grown)) >= 2 and grown == sorted(grown) and grown[0] < len(answer), grown
    assert not page.js_errors


def test_second_turn_sends_the_whole_conversation(chat, server, tmp_path):
    page, first = chat
    first_answer = bubbles(page, 'assistant')[-1]
    body = ask(page, 'JULIET:')
    assert body['messages'] == [{'role': 'user', 'content': 'ROMEO:'},
                                {'role': 'assistant', 'content': first_answer},
                                {'role': 'user', 'content': 'JULIET:'}]
    assert bubbles(page, 'user') == ['ROMEO:', 'JULIET:']
    assert bubbles(page, 'assistant')[-1] == api_answer(server, body)
    assert history(page) == body['messages'] + [{'role': 'assistant', 'content': bubbles(page, 'assistant')[-1]}]
    shot = tmp_path / 'serving_chat_page.png'
    page.screenshot(path=str(shot))
    assert shot.stat().st_size > 10_000
    if os.environ.get('MF_SCREENSHOT_DIR'):
        os.makedirs(os.environ['MF_SCREENSHOT_DIR'], exist_ok=True)
        shutil.copy(shot, os.environ['MF_SCREENSHOT_DIR'])


def test_history_stays_in_its_tab(chat, browser, server):
    page, _ = chat
    other = open_page(browser, server)         # another client: a fresh context, nothing shared
    assert other.locator('#transcript .msg').count() == 0
    other.close()
    before = bubbles(page, 'assistant')
    page.reload()
    page.wait_for_function("document.getElementById('status').className === 'ready'")
    assert bubbles(page, 'assistant') == before  # sessionStorage keeps the tab's conversation across a reload


def interrupted(page, button, text):
    """Sends `text` and clicks `button` as soon as the answer shows text; returns the request, which must fail (the
    page closed the connection before the answer ended)."""
    page.evaluate("""(button) => new MutationObserver((changes, observer) => {
        const streaming = document.querySelector('.msg.assistant.streaming .text');
        if (streaming && streaming.textContent) { observer.disconnect(); document.getElementById(button).click(); }
    }).observe(document.getElementById('transcript'), {childList: true, subtree: true, characterData: true})""",
                  button)
    page.fill('#prompt', text)
    with page.expect_event('requestfailed') as failed, page.expect_request(lambda r: r.url.endswith(CHAT)) as sent:
        page.click('#send')
    assert failed.value.url.endswith(CHAT)
    page.wait_for_selector('#send:not([disabled])')
    return sent.value


def test_stop_aborts_the_stream(chat, server):
    page, _ = chat
    page.click('#new-chat')
    assert page.locator('#transcript .msg').count() == 0 and history(page) == []
    set_controls(page, max_tokens=80, **GREEDY)
    sent = interrupted(page, 'stop', 'To be, or not to be')
    shown = bubbles(page, 'assistant')[-1]
    page.wait_for_timeout(500)
    assert bubbles(page, 'assistant')[-1] == shown
    assert 'stopped' in page.locator('#transcript .msg.assistant .note').all_text_contents()
    full = api_answer(server, sent.post_data_json)
    assert shown and full.startswith(shown) and len(shown) < len(full)
    assert history(page)[-1] == {'role': 'assistant', 'content': shown}   # a stopped answer keeps what arrived


def test_new_chat_while_streaming_starts_empty(chat):
    page, _ = chat
    interrupted(page, 'new-chat', 'Once more')
    page.wait_for_timeout(300)
    assert page.locator('#transcript .msg').count() == 0 and history(page) == []


def test_http_error_is_shown_and_the_turn_left_out(chat, server):
    page, _ = chat
    page.click('#new-chat')
    set_controls(page, max_tokens=0)
    body = ask(page, 'bad request')
    status, error = call(server + CHAT, unstreamed(body))
    assert status == 400
    shown = page.inner_text('#transcript .msg.error')
    assert 'HTTP 400' in shown and error['error']['message'] in shown and 'max_tokens' in shown
    assert history(page) == [] and page.input_value('#prompt') == 'bad request'
    set_controls(page, max_tokens=8)
    page.click('#send')                        # the text is back in the box: sending again works
    page.wait_for_selector('#send:not([disabled])')
    assert [turn['role'] for turn in history(page)] == ['user', 'assistant']


def test_mid_stream_error_and_markup_are_shown_as_text(chat):
    page, _ = chat
    page.click('#new-chat')
    chunk = {'id': 'chatcmpl-x', 'object': 'chat.completion.chunk', 'created': 0, 'model': 'm',
             'choices': [{'index': 0, 'delta': {'content': '<img src=x onerror="window.pwned=1">'},
                          'finish_reason': None}]}
    error = {'error': {'message': 'the request ran out of time', 'type': 'server_error', 'param': None,
                       'code': 'timeout'}}
    stream = f'data: {json.dumps(chunk)}\n\ndata: {json.dumps(error)}\n\n'
    page.route('**' + CHAT, lambda route: route.fulfill(status=200, content_type='text/event-stream', body=stream))
    try:
        ask(page, 'hi')
        assert bubbles(page, 'assistant') == ['<img src=x onerror="window.pwned=1">']
        assert page.locator('#transcript img').count() == 0 and page.evaluate('window.pwned') is None
        assert 'the request ran out of time' in page.inner_text('#transcript .msg.error')
        page.unroute('**' + CHAT)
        page.route('**' + CHAT, lambda route: route.fulfill(status=200, content_type='text/event-stream',
                                                              body=f'data: {json.dumps(chunk)}\n\n'))
        page.fill('#prompt', 'again')
        page.press('#prompt', 'Enter')
        page.wait_for_selector('#send:not([disabled])')
        assert 'before data: [DONE]' in page.locator('#transcript .msg.error').last.inner_text()
    finally:
        page.unroute('**' + CHAT)
    assert history(page) == []


def test_status_line_follows_health(chat):
    page, _ = chat
    loading = {'error': {'message': 'the model is loading', 'type': 'unavailable_error', 'param': None, 'code': 503}}
    page.route('**/health', lambda route: route.fulfill(status=503, json=loading))
    try:
        page.reload()
        page.wait_for_function("document.getElementById('status').className === 'loading'")
        assert page.get_attribute('#status', 'title') == 'the model is loading'
    finally:
        page.unroute('**/health')
    page.wait_for_function("document.getElementById('status').className === 'ready'", timeout=5000)  # polled again
