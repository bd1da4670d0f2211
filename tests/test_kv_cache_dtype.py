"""A KV cache stored in fp16 under fp32 computation (`kv_cache_dtype: float16`): the decode-attention kernels (native
and portable builds, through ctypes) store keys/values rounded as NumPy rounds them and attend as NumPy does over the
widened cache (a layer's kernel and cast paths: tests/test_cpu_kernels.py); a session's buffers are half the bytes
and its greedy output and logits match the fp32 cache on a trained tiny LLaMA, with float or int8 weights; the config
key is checked and reachable from pipeline() and the CLIs."""
import ctypes
import platform

import numpy as np
import pytest
import mindspore as ms

from helpers.tiny import tiny_yaml
from helpers.trained import trained_tiny
from mindformers import kernels

pytestmark = pytest.mark.usefixtures('cpu_kernels_on')

GREEDY = dict(do_sample=False, eos_token_id=[])
# |fp16-cache logit - fp32-cache logit| <= LOGIT_TOLERANCE * max |fp32-cache logit| over the decode steps; measured
# on the trained tiny LLaMA: 4.0e-4 with fp32 weights (8 prompts), 4.2e-4 with int8 (6 prompts), and 64-token greedy
# equal on 20/20 prompts
LOGIT_TOLERANCE = 1e-3
# values whose fp16 rounding is a corner case: zeros, ties to even, subnormals, the largest half, overflow to inf
EDGES = np.array([0.0, -0.0, 1e-8, 2 ** -25, 1.5 * 2 ** -25, 3e-6, -6.1e-5, 2 ** -14, 1 + 2 ** -11, 1 + 3 * 2 ** -11,
                  -2049.0, 65504.0, 65519.0, 65520.0, -1e6, 0.1], np.float32)


def _call(library, entry, inputs, output_shape):
    """An AOT kernel called as MindSpore calls it: (return code, output)."""
    arrays = [np.ascontiguousarray(a) for a in inputs] + [np.full(output_shape, np.nan, np.float32)]
    count = len(arrays)
    dims = [(ctypes.c_int64 * a.ndim)(*a.shape) for a in arrays]
    code = getattr(ctypes.CDLL(library), entry)(
        count, (ctypes.c_void_p * count)(*[a.ctypes.data for a in arrays]),
        (ctypes.c_int * count)(*[a.ndim for a in arrays]),
        (ctypes.POINTER(ctypes.c_int64) * count)(*[ctypes.cast(d, ctypes.POINTER(ctypes.c_int64)) for d in dims]),
        None, None, None)
    return code, arrays[-1]


@pytest.fixture(scope='module')
def libraries():
    """fused.cc built natively (AVX-512 here) and without AVX-512 (the portable conversions)."""
    if platform.machine() not in ('x86_64', 'AMD64'):
        pytest.fail('the portable build is defined for x86-64; add flags for this machine')
    return [kernels.build_library(kernels.SOURCES[:1], flags) for flags in ((), ('-mno-avx512f',))]


def _step(batch=3, heads=4, kv_heads=2, length=12, dim=20, seed=0):
    """Inputs of one decode step: each row at its own position, row 0 left-padded, an fp16 history before it."""
    rng = np.random.default_rng(seed)
    positions = np.array([7, 3, 11])[:batch]
    query = rng.standard_normal((batch, heads, 1, dim)).astype(np.float32) / np.sqrt(dim)
    key, value = (rng.standard_normal((batch, kv_heads, 1, dim)).astype(np.float32) for _ in range(2))
    history = rng.standard_normal((2, batch, kv_heads, length, dim)).astype(np.float16)
    valid = np.arange(length)[None] <= positions[:, None]
    valid[0, :2] = False
    mask = np.where(valid, 0.0, -1e9).astype(np.float32)[:, None, None, :]
    indices = np.zeros((batch, kv_heads, 1, 3), np.int32)
    indices[..., 0] = np.arange(batch)[:, None, None]  # each row writes its own cache row
    indices[..., 2] = positions[:, None, None]
    return query, key, value, history, mask, indices, positions


def _expected(query, keys, values, mask, positions):
    """NumPy attention of each row over its positions of the (written, widened) cache, in float64."""
    out = np.zeros(query.shape)
    group = query.shape[1] // keys.shape[1]
    for row, position in enumerate(positions):
        k = np.repeat(keys[row], group, 0)[:, :position + 1].astype(np.float64)
        v = np.repeat(values[row], group, 0)[:, :position + 1].astype(np.float64)
        scores = query[row] @ k.transpose(0, 2, 1) + mask[row, :, :, :position + 1]
        probs = np.exp(scores - scores.max(-1, keepdims=True))
        out[row] = probs / probs.sum(-1, keepdims=True) @ v
    return out


@pytest.mark.parametrize('dim', [20, 64])
def test_fp16_cache_kernels_store_numpy_rounding_and_attend_like_numpy(libraries, dim):
    query, key, value, history, mask, indices, positions = _step(dim=dim)
    batch, heads, kv_heads = query.shape[0], query.shape[1], key.shape[1]
    for library in libraries:
        caches = history.copy()
        code, out = _call(library, 'DecodeAttentionF16', (query, key, value, caches[0], caches[1], mask, indices),
                          query.shape)
        assert code == 0
        rows = np.arange(batch)
        np.testing.assert_array_equal(caches[0][rows, :, positions], key[:, :, 0].astype(np.float16))
        np.testing.assert_array_equal(caches[1][rows, :, positions], value[:, :, 0].astype(np.float16))
        np.testing.assert_allclose(out, _expected(query, caches[0], caches[1], mask, positions), rtol=1e-5, atol=1e-5)
        # the packed entry: the same step from q | k | v rows, unscaled
        scale = 0.5
        qkv = np.concatenate([query.reshape(batch, -1) / scale, key.reshape(batch, -1), value.reshape(batch, -1)], 1)
        packed = history.copy()
        code, merged = _call(library, 'DecodeAttentionPackedF16',
                             (qkv, packed[0], packed[1], mask, indices, np.array([scale], np.float32)),
                             (batch, heads * dim))
        assert code == 0
        np.testing.assert_array_equal(packed, caches)
        np.testing.assert_allclose(merged, out.reshape(batch, heads * dim), rtol=1e-5, atol=1e-6)
        # rounding corner cases in the vector lanes and the scalar tail; overflow gives inf (only the bits are read)
        edges = np.resize(EDGES, (batch, kv_heads, 1, dim))
        edges[..., -len(EDGES):] = EDGES
        caches = history.copy()
        code, _ = _call(library, 'DecodeAttentionF16', (query, edges, -edges, caches[0], caches[1], mask, indices),
                        query.shape)
        assert code == 0
        with np.errstate(over='ignore'):
            rounded = edges[:, :, 0].astype(np.float16)
        np.testing.assert_array_equal(caches[0][rows, :, positions].view(np.uint16), rounded.view(np.uint16))
        np.testing.assert_array_equal(caches[1][rows, :, positions].view(np.uint16), (-rounded).view(np.uint16))
        bad = indices.copy()
        bad[1, ..., 2] = history.shape[3]
        code, _ = _call(library, 'DecodeAttentionF16', (query, key, value, *history.copy(), mask, bad), query.shape)
        assert code == 1
        bad = indices.copy()
        bad[2, ..., 0] = history.shape[1]  # a cache row past the cache
        code, _ = _call(library, 'DecodeAttentionF16', (query, key, value, *history.copy(), mask, bad), query.shape)
        assert code == 1


@pytest.fixture(scope='module')
def llama(tmp_path_factory):
    return trained_tiny('llama', str(tmp_path_factory.mktemp('trained')))


def _session_logits(model, prompts, steps=6):
    """fp32 logits of a session's prefill and `steps` greedy decode steps over `prompts` (one slot each), and the
    session: generate()'s session of that many rows, so generate() on as many prompts reuses its compiled graphs."""
    from mindformers.generation.session import session_for
    width = max(map(len, prompts))
    ids = np.array([[0] * (width - len(p)) + p for p in prompts], np.int32)
    mask = np.array([[0] * (width - len(p)) + [1] * len(p) for p in prompts], np.int32)
    session = session_for(model, len(prompts))
    logits = [session.prefill(np.arange(len(prompts)), ids, mask)]
    for _ in range(steps):
        logits.append(session.decode(logits[-1].argmax(-1)))
    return np.stack(logits), session


def test_fp16_cache_session_matches_the_fp32_cache(llama):
    prompts = llama.prompts(8)
    fp32, fp16 = llama.model(), llama.model(kv_cache_dtype='float16')
    expected, wide = _session_logits(fp32, prompts)
    got, narrow = _session_logits(fp16, prompts)
    assert {b.data.dtype for b in narrow.cache.keys} == {ms.float16}
    assert narrow.cache.nbytes() * 2 == wide.cache.nbytes()
    assert narrow.cache.decode.layers[0].packed  # the fused kernels read the fp16 cache
    error = np.abs(got - expected).max() / np.abs(expected).max()
    assert 0 < error <= LOGIT_TOLERANCE, error
    reference = fp32.generate(prompts, use_past=True, max_new_tokens=24, **GREEDY)
    assert fp16.generate(prompts, use_past=True, max_new_tokens=24, **GREEDY) == reference
    assert len({tuple(row[-24:]) for row in reference}) >= 4  # the prompts lead to different continuations


def test_int8_weights_with_an_fp16_cache(llama):
    prompts = llama.prompts(6)
    int8 = llama.model(quantization='int8')
    both = llama.model(quantization='int8', kv_cache_dtype='float16')
    assert both.generate(prompts, use_past=True, max_new_tokens=16, **GREEDY) == \
        int8.generate(prompts, use_past=True, max_new_tokens=16, **GREEDY)
    error = np.abs(_session_logits(both, prompts, 3)[0] - _session_logits(int8, prompts, 3)[0])
    assert error.max() <= LOGIT_TOLERANCE * np.abs(_session_logits(int8, prompts, 3)[0]).max()


def test_pipeline_takes_kv_cache_dtype(llama):
    from mindformers import pipeline
    from mindformers.generation.session import session_for
    built = pipeline('text_generation', model=llama.path, kv_cache_dtype='float16', max_new_tokens=4, **GREEDY)
    assert built.model.config.kv_cache_dtype == 'float16'
    built('To be')
    assert session_for(built.model, 1).cache.keys[0].data.dtype == ms.float16
    instance = pipeline('text_generation', model=llama.model(), tokenizer=llama.tokenizer, kv_cache_dtype='float16')
    assert instance.model.config.kv_cache_dtype == 'float16'
    with pytest.raises(ValueError, match=r"pipeline\(\)\.kv_cache_dtype must be one of float32, float16"):
        pipeline('text_generation', model=llama.path, kv_cache_dtype='int8')


def test_bad_kv_cache_dtype_is_refused_naming_the_key():
    from mindformers.models.base_config import KV_CACHE_DTYPES
    from mindformers.models.llama import LlamaConfig
    from mindformers.serving.cli import KV_CACHE_DTYPE_CHOICES, build_parser
    assert KV_CACHE_DTYPE_CHOICES == KV_CACHE_DTYPES
    with pytest.raises(ValueError, match=r"LlamaConfig\.kv_cache_dtype must be one of float32, float16 \(or unset: "
                                         r"the compute_dtype\), got 'fp8'"):
        LlamaConfig(kv_cache_dtype='fp8')
    with pytest.raises(ValueError, match="bfloat16: MindSpore's CPU scatter ops have no bfloat16 kernel"):
        LlamaConfig(kv_cache_dtype='bfloat16')
    assert LlamaConfig(kv_cache_dtype='float16').kv_cache_dtype == 'float16'
    assert build_parser().parse_args(['--model', 'x', '--kv_cache_dtype', 'float16']).kv_cache_dtype == 'float16'
    with pytest.raises(SystemExit):
        build_parser().parse_args(['--model', 'x', '--kv_cache_dtype', 'bfloat16'])


def test_run_mindformer_and_the_server_set_kv_cache_dtype():
    import run_mindformer
    from mindformers.serving.cli import load_model
    args, overrides = run_mindformer.parse_args(['--config', tiny_yaml('llama'), '--run_mode', 'predict',
                                                 '--kv_cache_dtype', 'float16'])
    assert run_mindformer.build_config(args, overrides).model.model_config.kv_cache_dtype == 'float16'
    model, _ = load_model(tiny_yaml('llama'), True, None, 'float16')
    assert model.config.kv_cache_dtype == 'float16'
