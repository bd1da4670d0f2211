"""Downloads against a local HTTP server on loopback: cache hits, resume after a cut transfer, servers that ignore
ranges, wrong checksums, HTTP errors, offline mode, and a published checkpoint loaded by model name."""
import hashlib
import http.server
import threading

import numpy as np
import pytest
import mindspore as ms

from mindformers import AutoModel, GPT2Config, GPT2LMHeadModel
from mindformers.models import model_book
from mindformers.tools.download import DownloadError, download_file

PAYLOAD = np.random.default_rng(0).bytes(300_000)
DIGEST = hashlib.sha256(PAYLOAD).hexdigest()


class Server:
    """Serves `files[path]`; `behaviour` per path: 'ok', 'cut' (closes after half, Content-Length says all, once),
    'norange' (ignores Range), 'error500'. Records every request as (path, Range header)."""

    def __init__(self):
        self.files, self.behaviour, self.requests = {}, {}, []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                server.requests.append((self.path, self.headers.get('Range')))
                behaviour = server.behaviour.get(self.path, 'ok')
                if self.path not in server.files:
                    self.send_error(404, 'Not Found')
                    return
                if behaviour == 'error500':
                    self.send_error(500, 'Internal Server Error')
                    return
                data, start = server.files[self.path], 0
                ranged = self.headers.get('Range')
                if ranged and behaviour != 'norange':
                    start = int(ranged.split('=')[1].rstrip('-'))
                    if start >= len(data):
                        self.send_error(416, 'Range Not Satisfiable')
                        return
                    self.send_response(206)
                    self.send_header('Content-Range', f'bytes {start}-{len(data) - 1}/{len(data)}')
                else:
                    self.send_response(200)
                body = data[start:]
                self.send_header('Content-Length', str(len(body)))
                self.end_headers()
                if behaviour == 'cut':
                    server.behaviour[self.path] = 'ok'  # only the first transfer is cut
                    self.wfile.write(body[:len(body) // 2])
                    self.wfile.flush()
                    self.connection.shutdown(2)
                    return
                self.wfile.write(body)

        self.httpd = http.server.ThreadingHTTPServer(('127.0.0.1', 0), Handler)
        self.url = f'http://127.0.0.1:{self.httpd.server_address[1]}'
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()


@pytest.fixture
def server(monkeypatch, tmp_path):
    monkeypatch.setenv('MINDFORMERS_CACHE', str(tmp_path / 'cache'))
    monkeypatch.delenv('MINDFORMERS_OFFLINE', raising=False)
    srv = Server()
    srv.files['/w.bin'] = PAYLOAD
    yield srv
    srv.httpd.shutdown()


def test_download_then_cache_hit_without_a_request(server):
    path = download_file(server.url + '/w.bin', sha256=DIGEST)
    assert open(path, 'rb').read() == PAYLOAD
    assert download_file(server.url + '/w.bin', sha256=DIGEST) == path
    assert len(server.requests) == 1


def test_cut_transfer_is_resumed_with_a_range_request(server):
    server.behaviour['/w.bin'] = 'cut'
    with pytest.raises(DownloadError, match=r'stopped after \d+ of 300000 bytes; run again to resume'):
        download_file(server.url + '/w.bin', sha256=DIGEST)
    path = download_file(server.url + '/w.bin', sha256=DIGEST)
    assert open(path, 'rb').read() == PAYLOAD
    assert server.requests[1][1] == 'bytes=150000-'


def test_server_that_ignores_ranges_restarts_cleanly(server):
    server.behaviour['/w.bin'] = 'cut'
    with pytest.raises(DownloadError):
        download_file(server.url + '/w.bin', sha256=DIGEST)
    server.behaviour['/w.bin'] = 'norange'
    path = download_file(server.url + '/w.bin', sha256=DIGEST)
    assert open(path, 'rb').read() == PAYLOAD


def test_wrong_checksum_keeps_nothing_and_leaves_a_good_file_alone(server, tmp_path):
    wrong = '0' * 64
    with pytest.raises(DownloadError, match=f'checksum mismatch.*expected sha256 {wrong}, got {DIGEST}'):
        download_file(server.url + '/w.bin', sha256=wrong)
    assert not list((tmp_path / 'cache' / 'downloads').glob('w.bin*[!k]'))  # no file, no .part (lock may stay)
    good = download_file(server.url + '/w.bin', sha256=DIGEST)
    server.files['/w.bin'] = b'tampered'
    with pytest.raises(DownloadError, match='left as it was'):
        download_file(server.url + '/w.bin', sha256=hashlib.sha256(b'other').hexdigest())
    assert open(good, 'rb').read() == PAYLOAD


@pytest.mark.parametrize('behaviour, path, message', [('error500', '/w.bin', 'HTTP 500'),
                                                      ('ok', '/missing.bin', 'HTTP 404')])
def test_http_errors_are_named(server, behaviour, path, message):
    server.behaviour[path] = behaviour
    with pytest.raises(DownloadError, match=f'downloading {server.url}{path} failed: {message}'):
        download_file(server.url + path)


def test_unreachable_server(server):
    with pytest.raises(DownloadError, match='failed'):
        download_file('http://127.0.0.1:9/w.bin', timeout=2)


def test_offline_mode_never_touches_the_network(server, monkeypatch):
    monkeypatch.setenv('MINDFORMERS_OFFLINE', '1')
    with pytest.raises(DownloadError, match='not in the cache and offline mode'):
        download_file(server.url + '/w.bin', sha256=DIGEST)
    assert server.requests == []
    monkeypatch.delenv('MINDFORMERS_OFFLINE')
    path = download_file(server.url + '/w.bin', sha256=DIGEST)
    monkeypatch.setenv('MINDFORMERS_OFFLINE', '1')
    assert download_file(server.url + '/w.bin', sha256=DIGEST) == path
    assert len(server.requests) == 1


def test_published_checkpoint_is_fetched_by_model_name(server, tmp_path, monkeypatch):
    small = dict(num_layers=1, hidden_size=32, num_heads=2, seq_length=32)
    source = GPT2LMHeadModel(GPT2Config(vocab_size=512, **small))
    source.save_pretrained(tmp_path / 'saved')
    data = (tmp_path / 'saved' / 'model.safetensors').read_bytes()
    server.files['/gpt2_tiny.safetensors'] = data
    monkeypatch.setattr(model_book, 'CHECKPOINTS', {})
    model_book.register_checkpoint('gpt2_tiny', server.url + '/gpt2_tiny.safetensors',
                                   hashlib.sha256(data).hexdigest())
    model = AutoModel.from_pretrained('gpt2_tiny', **small)
    ids = ms.Tensor(np.array([[3, 1, 4, 1, 5]], np.int32))
    source.set_train(False)
    model.set_train(False)
    np.testing.assert_array_equal(model(ids).asnumpy(), source(ids).asnumpy())
    AutoModel.from_pretrained('gpt2_tiny', **small)
    assert len(server.requests) == 1  # the second load came from the cache
    with pytest.raises(ValueError, match='sha256 must be'):
        model_book.register_checkpoint('gpt2_tiny', server.url + '/x', 'abc')
