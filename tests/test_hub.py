"""Published weights by model name, against a HuggingFace Hub stand-in on loopback (tests/helpers/hub_server.py):
a sharded safetensors repository loaded by name (logits equal to the model the weights came from; converted once),
.bin weights, tokenizer files, resume after a cut connection, bad checksums refused with the good cached file kept,
a gated repository without a token, offline mode, no network, and names without published weights."""
import io
import os
import types

import numpy as np
import pytest
import mindspore as ms

from mindformers import AutoConfig, AutoModel, AutoProcessor, AutoTokenizer, pipeline
from mindformers.models import model_book
from mindformers.models.gpt2 import convert_gpt2
from mindformers.models.model_book import HubSource
from mindformers.tools.download import DownloadError
from mindformers.tools.hub import HubRepo
from mindformers.tools.utils import resolve_path

from helpers.hub_server import HubServer

REPO, BIN_REPO = 'test-org/tiny-gpt2', 'test-org/tiny-gpt2-bin'
SHARDS = ('model-00001-of-00002.safetensors', 'model-00002-of-00002.safetensors')
IDS = ms.Tensor(np.array([[3, 1, 4, 1, 5, 9, 2, 6]], np.int32))


def _params(model):
    return {p.name: p.asnumpy() for p in model.get_parameters()}


def _repo_files(source, config):
    """HF files of `source` (our gpt2_tiny): config.json, two safetensors shards + index, tokenizer files."""
    import json
    from safetensors.numpy import save
    tensors = convert_gpt2.convert_ms_to_hf(_params(source), config)
    names = sorted(tensors)
    halves = (names[:len(names) // 2], names[len(names) // 2:])
    files = {shard: save({n: np.ascontiguousarray(tensors[n]) for n in part}, metadata={'format': 'pt'})
             for shard, part in zip(SHARDS, halves)}
    files['model.safetensors.index.json'] = json.dumps({
        'metadata': {'total_size': sum(t.nbytes for t in tensors.values())},
        'weight_map': {n: shard for shard, part in zip(SHARDS, halves) for n in part}}).encode()
    files['config.json'] = json.dumps(convert_gpt2.config_to_hf(config)).encode()
    for name in ('vocab.json', 'merges.txt'):
        with open(resolve_path(f'assets/gpt2_tiny/{name}'), 'rb') as f:
            files[name] = f.read()
    return files, tensors


@pytest.fixture(scope='module')
def hub():
    import torch
    server = HubServer()
    config = AutoConfig.from_pretrained('gpt2_tiny')
    source = AutoModel.from_config(config)
    source.set_train(False)
    files, tensors = _repo_files(source, config)
    server.add_repo(REPO, files)
    buffer = io.BytesIO()
    torch.save({n: torch.from_numpy(np.array(t)) for n, t in tensors.items()}, buffer)
    server.add_repo(BIN_REPO, {'config.json': files['config.json'], 'pytorch_model.bin': buffer.getvalue()})
    yield types.SimpleNamespace(server=server, source=source, files=files,
                                logits=source(IDS).asnumpy(), params=_params(source))
    server.close()


@pytest.fixture
def env(hub, monkeypatch, tmp_path):
    """A fresh cache, the stand-in as the Hub, no token, online; gpt2 and gpt2_tiny published in REPO."""
    monkeypatch.setenv('MINDFORMERS_CACHE', str(tmp_path / 'cache'))
    monkeypatch.setenv('HF_ENDPOINT', hub.server.url)
    monkeypatch.setenv('HF_HOME', str(tmp_path / 'hf_home'))
    for name in ('MINDFORMERS_OFFLINE', 'HF_HUB_OFFLINE', 'HF_TOKEN', 'HUGGING_FACE_HUB_TOKEN', 'HF_TOKEN_PATH'):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(model_book, 'SOURCES', {'gpt2_tiny': HubSource(REPO), 'gpt2': HubSource(REPO)})
    hub.server.requests.clear()
    hub.server.cut.clear()
    hub.server.corrupt.clear()
    hub.server.authorized.clear()
    return tmp_path / 'cache'


def _fetched(server):
    return sorted(path.rsplit('/', 1)[1] for method, path, _ in server.requests if '/resolve/' in path)


def _assert_same_params(model, hub):
    params = _params(model)
    assert params.keys() == hub.params.keys()
    for name, value in hub.params.items():
        np.testing.assert_array_equal(params[name], value, err_msg=name)


def test_sharded_repository_by_name_converts_once(hub, env):
    model = AutoModel.from_pretrained('gpt2_tiny')
    model.set_train(False)
    np.testing.assert_array_equal(model(IDS).asnumpy(), hub.logits)
    assert _fetched(hub.server) == sorted(['config.json', 'model.safetensors.index.json', *SHARDS])
    snapshot = env / 'hub' / 'test-org--tiny-gpt2' / 'main'
    for shard in SHARDS:  # a second load must not need (or convert) the HF weights again
        os.remove(snapshot / shard)
    hub.server.requests.clear()
    _assert_same_params(AutoModel.from_pretrained('gpt2_tiny'), hub)
    assert [path.split('?')[0] for _, path, _ in hub.server.requests] == \
        [f'/api/models/{REPO}/revision/main']  # the listing only: the converted copy is current
    by_checkpoint = AutoModel.from_config(AutoConfig.from_pretrained('gpt2_tiny', checkpoint_name_or_path='gpt2_tiny'))
    _assert_same_params(by_checkpoint, hub)
    pipe = pipeline('text_generation', model='gpt2_tiny', max_new_tokens=2)
    _assert_same_params(pipe.model, hub)
    assert pipe('ROMEO:')[0]['text_generation_text'][0].startswith('ROMEO:')


def test_bin_weights_and_tokenizer_files_by_name(hub, env, monkeypatch):
    monkeypatch.setitem(model_book.SOURCES, 'gpt2_tiny', HubSource(BIN_REPO))
    _assert_same_params(AutoModel.from_pretrained('gpt2_tiny'), hub)
    assert _fetched(hub.server) == ['config.json', 'pytorch_model.bin']
    text = 'To be, or not to be'
    tokenizer = AutoTokenizer.from_pretrained('gpt2')  # run_gpt2.yaml names no vocabulary: the published one
    assert tokenizer(text)['input_ids'] == AutoTokenizer.from_pretrained('gpt2_tiny')(text)['input_ids']
    assert AutoProcessor.from_pretrained('gpt2').tokenizer(text)['input_ids'] == tokenizer(text)['input_ids']
    assert _fetched(hub.server).count('vocab.json') == 1  # the processor found it in the cache


def test_cut_connection_is_resumed_with_a_range_request(hub, env):
    shard, size = SHARDS[0], len(hub.files[SHARDS[0]])
    hub.server.cut[shard] = size // 3
    with pytest.raises(DownloadError, match=rf'stopped after {size // 3} of {size} bytes; run again to resume'):
        HubRepo(REPO).download([shard])
    path = HubRepo(REPO).download([shard])[0]  # as a new process would
    with open(path, 'rb') as f:
        assert f.read() == hub.files[shard]
    assert [r for _, p, r in hub.server.requests if p.endswith(shard)] == [None, f'bytes={size // 3}-']


def test_bad_checksum_is_refused_and_the_good_cached_file_kept(hub, env):
    with pytest.raises(DownloadError, match=f"checksum mismatch for .*config.json: expected sha256 {'0' * 64}"):
        HubRepo(REPO, pins={'config.json': '0' * 64}).download(['config.json'])
    snapshot = env / 'hub' / 'test-org--tiny-gpt2' / 'main'
    assert not (snapshot / 'config.json').exists() and not (snapshot / 'config.json.part').exists()
    repo = 'test-org/changing'
    good, newer = os.urandom(4096), os.urandom(4096)
    hub.server.add_repo(repo, {'w.bin': good, 'notes.txt': b'first'})
    cached = HubRepo(repo).download(['w.bin', 'notes.txt'])
    hub.server.add_repo(repo, {'w.bin': newer, 'notes.txt': b'second'})  # a new commit ...
    hub.server.corrupt.update({'w.bin': os.urandom(4096), 'notes.txt': b'garbled'})  # ... served damaged
    for name, kind in (('w.bin', 'sha256'), ('notes.txt', 'git-sha1')):
        with pytest.raises(DownloadError, match=f'checksum mismatch .*{name}: expected {kind} .*left as it was'):
            HubRepo(repo).download([name])
    with open(cached[0], 'rb') as f:
        assert f.read() == good
    kept = HubRepo(repo, offline=True).download(['w.bin', 'notes.txt'])  # the cache still serves the good ones
    assert kept == cached and open(kept[1], 'rb').read() == b'first'


def test_gated_repository_needs_hf_token(hub, env, monkeypatch):
    hub.server.add_repo('test-org/gated', {'config.json': b'{}', 'model.safetensors': bytes(2048)}, token='s3cret')
    with pytest.raises(DownloadError, match=r'test-org/gated is gated or private \(HTTP 401 for config.json; no token '
                                            r'was given\).*set HF_TOKEN'):
        HubRepo('test-org/gated').download(['config.json'])
    monkeypatch.setenv('HF_TOKEN', 'wrong')
    with pytest.raises(DownloadError, match=r'HTTP 403 .*the token given has no access'):
        HubRepo('test-org/gated').download(['config.json'])
    monkeypatch.setenv('HF_TOKEN', 's3cret')
    assert open(HubRepo('test-org/gated').download(['config.json'])[0]).read() == '{}'
    monkeypatch.delenv('HF_TOKEN')
    monkeypatch.setenv('MINDFORMERS_CACHE', str(env.parent / 'other_cache'))
    (env.parent / 'hf_home').mkdir()
    (env.parent / 'hf_home' / 'token').write_text('s3cret\n')  # what `hf auth login` leaves
    assert open(HubRepo('test-org/gated').download(['config.json'])[0]).read() == '{}'
    (env.parent / 'hf_home' / 'token').unlink()
    monkeypatch.setitem(model_book.SOURCES, 'gpt2_tiny', HubSource('test-org/gated', gated=True))
    monkeypatch.setenv('MINDFORMERS_CACHE', str(env.parent / 'third_cache'))
    with pytest.raises(DownloadError, match='HF_TOKEN'):
        AutoModel.from_pretrained('gpt2_tiny')


def test_offline_and_no_network_name_the_missing_files(hub, env, monkeypatch):
    monkeypatch.setenv('MINDFORMERS_OFFLINE', '1')
    snapshot = env / 'hub' / 'test-org--tiny-gpt2' / 'main'
    with pytest.raises(DownloadError) as raised:
        AutoModel.from_pretrained('gpt2_tiny')
    message = str(raised.value)
    for part in ('config.json', 'model.safetensors', 'MINDFORMERS_OFFLINE=1', str(snapshot), 'hf download'):
        assert part in message
    assert hub.server.requests == []
    monkeypatch.delenv('MINDFORMERS_OFFLINE')
    AutoModel.from_pretrained('gpt2_tiny')
    monkeypatch.setenv('HF_HUB_OFFLINE', '1')
    hub.server.requests.clear()
    _assert_same_params(AutoModel.from_pretrained('gpt2_tiny'), hub)  # from the cache, no request
    with pytest.raises(DownloadError, match=r'vocab.json, merges.txt not in the cache and offline mode '
                                            r'\(HF_HUB_OFFLINE=1\)'):
        AutoTokenizer.from_pretrained('gpt2')
    assert hub.server.requests == []
    monkeypatch.delenv('HF_HUB_OFFLINE')
    monkeypatch.setenv('HF_ENDPOINT', 'http://127.0.0.1:9')  # nothing listens there
    _assert_same_params(AutoModel.from_pretrained('gpt2_tiny'), hub)  # cached: used with a warning
    with pytest.raises(DownloadError, match=r'vocab.json, merges.txt not in the cache and the Hub could not be '
                                            r'reached .*put the repository'):
        AutoTokenizer.from_pretrained('gpt2')


def test_names_without_published_weights_point_at_from_config(env, monkeypatch, tmp_path):
    monkeypatch.setattr(model_book, 'SOURCES', {})
    with pytest.raises(ValueError, match=r"'gpt2_tiny' has no published weights.*AutoModel.from_config\("
                                         r"AutoConfig.from_pretrained\('gpt2_tiny'\)\)"):
        AutoModel.from_pretrained('gpt2_tiny')
    with pytest.raises(ValueError, match='no published weights'):
        pipeline('text_generation', model='gpt2_tiny')
    yaml = tmp_path / 'run_mine.yaml'
    yaml.write_text(f"base_config: {os.path.abspath(model_book.find_config('gpt2_tiny'))}\n")
    with pytest.raises(ValueError, match='sets no model.model_config.checkpoint_name_or_path.*from_config'):
        AutoModel.from_pretrained(str(yaml))


def test_every_public_name_knows_its_source():
    no_release = ('llama_7b', 'llama_13b', 'llama_65b', 'gpt2_13b')  # LLaMA-1: Meta's by request; gpt2_13b: none
    for name in model_book.list_models():
        base = name.replace('_lora', '').replace('_ptuning2', '')
        if 'tiny' in name or base in no_release:
            assert not model_book.has_weights(name), name
        else:
            assert model_book.source_for(name) is not None, name
    assert model_book.source_for('gpt2_medium').repo == 'openai-community/gpt2-medium'
    assert model_book.source_for('llama2_7b_lora') == HubSource('meta-llama/Llama-2-7b-hf', gated=True)
    assert model_book.source_for('glm2_6b_ptuning2').repo == 'THUDM/chatglm2-6b'


def test_mindspore_release_by_name_is_converted_with_the_yaml_config(hub, env, monkeypatch, tmp_path):
    """A `weights='mindspore'` source (pengcheng_mind_7b's kind): the repository's one .ckpt in PengCheng's names."""
    from research.pengcheng_mind import convert_pengcheng_mind
    from mindformers.models.convert_utils import save_ms_weights
    config = AutoConfig.from_pretrained('pengcheng_mind_tiny')
    ours = AutoModel.from_config(config)
    release = save_ms_weights(convert_pengcheng_mind.convert_ms_to_hf(_params(ours), config), str(tmp_path / 'r.ckpt'))
    with open(release, 'rb') as f:
        hub.server.add_repo('test-org/pcm', {'release.ckpt': f.read(), 'README.md': b'weights'})
    monkeypatch.setitem(model_book.SOURCES, 'pengcheng_mind_tiny', HubSource('test-org/pcm', weights='mindspore'))
    loaded = _params(AutoModel.from_pretrained('pengcheng_mind_tiny'))
    for name, value in _params(ours).items():
        np.testing.assert_array_equal(loaded[name], value, err_msg=name)
    assert _fetched(hub.server) == ['release.ckpt']


def test_token_goes_to_the_hub_only_not_to_the_cdn_it_redirects_to(hub, env, monkeypatch):
    data = os.urandom(8192)
    hub.server.add_repo('test-org/gated-cdn', {'config.json': b'{}', 'model.safetensors': data}, token='s3cret')
    monkeypatch.setenv('HF_TOKEN', 's3cret')
    monkeypatch.setattr(hub.server, 'redirect_lfs', True)
    hub.server.cut['model.safetensors'] = 3000  # the resumed request follows the redirect with its Range too
    with pytest.raises(DownloadError, match='stopped after 3000'):
        HubRepo('test-org/gated-cdn').download(['model.safetensors'])
    path = HubRepo('test-org/gated-cdn').download(['model.safetensors'])[0]
    with open(path, 'rb') as f:
        assert f.read() == data
    cdn = [(p, r) for _, p, r in hub.server.requests if p.startswith('/cdn/')]
    assert cdn == [(cdn[0][0], None), (cdn[0][0], 'bytes=3000-')]
    assert not [p for p in hub.server.authorized if p.startswith('/cdn/')]
    assert any('/resolve/' in p for p in hub.server.authorized)


def test_int8_by_name_quantizes_on_load_and_keeps_the_converted_cache_float(hub, env):
    from mindformers.quantization import quantization_of
    model = AutoModel.from_pretrained('gpt2_tiny', quantization='int8')  # first use: downloads and converts
    model.set_train(False)
    assert quantization_of(model) == {'scheme': 'block32', 'embeddings': False}
    logits = model(IDS).asnumpy()
    assert 0 < np.abs(logits - hub.logits).max() <= 0.04 * np.abs(hub.logits).max()
    _assert_same_params(AutoModel.from_pretrained('gpt2_tiny'), hub)  # the converted copy holds the float weights
    again = AutoModel.from_pretrained('gpt2_tiny', quantization='int8')  # from the converted copy
    again.set_train(False)
    np.testing.assert_array_equal(again(IDS).asnumpy(), logits)
