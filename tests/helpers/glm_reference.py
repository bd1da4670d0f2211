"""GLM v1 (ChatGLM-6B) has no transformers model: its reference is this independent NumPy implementation written
from specs/models.md section 5 (float64), with the tiny GLM it is checked on (sizes, config, random weights in the HF
release's names; the special ids are the tiny tokenizer's)."""
import json
import math
import os

import numpy as np
import torch
import mindspore as ms

from mindformers.models.glm import GLMConfig

VOCAB, HIDDEN, LAYERS, HEADS, INNER, SEQ = 1024, 64, 2, 4, 256, 64
HEAD = HIDDEN // HEADS
MASK, GMASK, BOS, EOS, PAD = 1000, 1001, 1004, 1005, 3  # the tiny tokenizer's ids
SQRT56 = math.sqrt(56.0)

# the release's config.json fields (THUDM/chatglm-6b), with the tiny sizes
RELEASE_CONFIG = {'_name_or_path': 'THUDM/chatglm-6b', 'architectures': ['ChatGLMModel'],
                  'auto_map': {'AutoConfig': 'configuration_chatglm.ChatGLMConfig',
                               'AutoModel': 'modeling_chatglm.ChatGLMForConditionalGeneration'},
                  'bos_token_id': BOS, 'eos_token_id': EOS, 'mask_token_id': MASK, 'gmask_token_id': GMASK,
                  'pad_token_id': PAD, 'hidden_size': HIDDEN, 'inner_hidden_size': INNER, 'layernorm_epsilon': 1e-5,
                  'max_sequence_length': SEQ, 'model_type': 'chatglm', 'num_attention_heads': HEADS,
                  'num_layers': LAYERS, 'position_encoding_2d': True, 'torch_dtype': 'float16',
                  'transformers_version': '4.27.1', 'use_cache': True, 'vocab_size': VOCAB, 'pre_seq_len': None,
                  'prefix_projection': False, 'quantization_bit': 0}


def tiny_config(**overrides):
    args = dict(vocab_size=VOCAB, hidden_size=HIDDEN, num_layers=LAYERS, num_heads=HEADS, inner_hidden_size=INNER,
                seq_length=SEQ, bos_token_id=BOS, eos_token_id=EOS, mask_token_id=MASK, gmask_token_id=GMASK,
                pad_token_id=PAD)
    args.update(overrides)
    return GLMConfig(**args)


def random_weights(seed=0):
    """HF ChatGLM-6B-named weights, large enough that attention is far from uniform (so a wrong mask or wrong
    positions show) and with LayerNorm / bias values away from their 1 / 0 starts."""
    rng = np.random.default_rng(seed)
    normal = lambda *shape, std=1.0: (rng.standard_normal(shape) * std).astype(np.float32)
    out = {'transformer.word_embeddings.weight': normal(VOCAB, HIDDEN),
           'transformer.final_layernorm.weight': 1 + normal(HIDDEN, std=0.2),
           'transformer.final_layernorm.bias': normal(HIDDEN, std=0.2),
           'lm_head.weight': normal(VOCAB, HIDDEN, std=0.1)}
    for i in range(LAYERS):
        p = f'transformer.layers.{i}.'
        for norm in ('input_layernorm', 'post_attention_layernorm'):
            out[p + norm + '.weight'], out[p + norm + '.bias'] = 1 + normal(HIDDEN, std=0.2), normal(HIDDEN, std=0.2)
        out[p + 'attention.query_key_value.weight'] = normal(3 * HIDDEN, HIDDEN, std=0.25)
        out[p + 'attention.query_key_value.bias'] = normal(3 * HIDDEN, std=0.2)
        out[p + 'attention.dense.weight'] = normal(HIDDEN, HIDDEN, std=0.1)
        out[p + 'attention.dense.bias'] = normal(HIDDEN, std=0.1)
        out[p + 'mlp.dense_h_to_4h.weight'] = normal(INNER, HIDDEN, std=0.1)
        out[p + 'mlp.dense_h_to_4h.bias'] = normal(INNER, std=0.1)
        out[p + 'mlp.dense_4h_to_h.weight'] = normal(HIDDEN, INNER, std=0.05)
        out[p + 'mlp.dense_4h_to_h.bias'] = normal(HIDDEN, std=0.1)
    return out


def load_weights(model, weights):
    own = {p.name: p for p in model.get_parameters()}
    assert set(own) == set(weights), sorted(set(own) ^ set(weights))
    for name, param in own.items():
        param.set_data(ms.Tensor(weights[name]).astype(param.dtype))
    model.set_train(False)
    return model


def reference_layout(ids, valid, prefix=True, two_d=True):
    """(position ids [2, S], masked [S, S] True = hidden) of one left-padded row, as the published code (and its
    tokenizer's padding) builds them. A row without <sop> is all context for the positions and causal. `prefix` /
    `two_d` False give the wrong variants (plain causal mask; 1-D positions)."""
    length = len(ids)
    start = int(np.argmax(valid)) if valid.any() else length
    seq = [int(t) for t in ids[start:]]
    n = len(seq)
    if BOS in seq:
        context = seq.index(BOS)
        blank = GMASK if GMASK in seq[:context] else MASK
        mask_position = seq[:context].index(blank) if blank in seq[:context] else context - 1
        first = list(range(context)) + [mask_position] * (n - context)
        second = [0] * context + list(range(1, n - context + 1))
    else:
        context, first, second = 0, list(range(n)), [0] * n
    if not two_d:
        first, second = list(range(n)), [0] * n
    allowed = np.tril(np.ones((n, n), bool))
    if prefix:
        allowed[:, :context] = True
    positions = np.zeros((2, length), np.int64)
    positions[0, start:], positions[1, start:] = first, second
    masked = np.ones((length, length), bool)
    masked[start:, start:] = ~allowed
    return positions, masked


def _layer_norm(x, weight, bias, eps=1e-5):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * weight + bias


def _gelu(x):
    return 0.5 * x * (1 + np.tanh(0.7978845608028654 * (x + 0.044715 * x ** 3)))


def rotate_2d(x, positions, round_frequencies=True):
    """2-D RoPE on x [S, heads, d]: half 1 by positions[0], half 2 by positions[1]; rotate-half in each half."""
    half = x.shape[-1] // 2
    inv_freq = 1.0 / 10000 ** (np.arange(0, half, 2, dtype=np.float32) / half)
    if round_frequencies:
        inv_freq = inv_freq.astype(np.float16)
    inv_freq = inv_freq.astype(np.float64)
    out = []
    for part, pos in zip((x[..., :half], x[..., half:]), positions):
        angles = pos[:, None] * inv_freq[None, :]
        cos = np.cos(np.concatenate([angles, angles], -1))[:, None, :]
        sin = np.sin(np.concatenate([angles, angles], -1))[:, None, :]
        rotated = np.concatenate([-part[..., half // 2:], part[..., :half // 2]], -1)
        out.append(part * cos + rotated * sin)
    return np.concatenate(out, -1)


def reference_logits(weights, ids, attention_mask=None, alpha=SQRT56, prefix=True, two_d=True,
                     round_frequencies=True):
    """[B, S] -> logits [B, S, VOCAB] (float64)."""
    w = {name: value.astype(np.float64) for name, value in weights.items()}
    ids = np.asarray(ids)
    valid = np.ones_like(ids) if attention_mask is None else np.asarray(attention_mask)
    result = []
    for row, row_valid in zip(ids, valid):
        positions, masked = reference_layout(row, row_valid.astype(bool), prefix, two_d)
        x = w['transformer.word_embeddings.weight'][row]
        seq = len(row)
        for layer in range(LAYERS):
            p = f'transformer.layers.{layer}.'
            a = _layer_norm(x, w[p + 'input_layernorm.weight'], w[p + 'input_layernorm.bias'])
            qkv = a @ w[p + 'attention.query_key_value.weight'].T + w[p + 'attention.query_key_value.bias']
            qkv = qkv.reshape(seq, HEADS, 3 * HEAD)  # per head: q, k, v
            q, k, v = qkv[..., :HEAD], qkv[..., HEAD:2 * HEAD], qkv[..., 2 * HEAD:]
            q, k = rotate_2d(q, positions, round_frequencies), rotate_2d(k, positions, round_frequencies)
            coeff = layer + 1
            q = q / (math.sqrt(HEAD) * coeff)
            scores = np.einsum('qhd,khd->hqk', q, k)
            scores = np.where(masked[None], -10000.0, scores) * coeff
            probs = np.exp(scores - scores.max(-1, keepdims=True))
            probs /= probs.sum(-1, keepdims=True)
            context = np.einsum('hqk,khd->qhd', probs, v).reshape(seq, HIDDEN)
            attended = context @ w[p + 'attention.dense.weight'].T + w[p + 'attention.dense.bias']
            x = alpha * a + attended
            m = _layer_norm(x, w[p + 'post_attention_layernorm.weight'], w[p + 'post_attention_layernorm.bias'])
            h = _gelu(m @ w[p + 'mlp.dense_h_to_4h.weight'].T + w[p + 'mlp.dense_h_to_4h.bias'])
            x = alpha * m + h @ w[p + 'mlp.dense_4h_to_h.weight'].T + w[p + 'mlp.dense_4h_to_h.bias']
        x = _layer_norm(x, w['transformer.final_layernorm.weight'], w['transformer.final_layernorm.bias'])
        result.append(x @ w['lm_head.weight'].T)
    return np.stack(result)



def prompt_batch():
    """Three rows of 14 tokens: context, [gMASK], <sop>, generated tokens; a [MASK] in the middle of the context;
    plain text without <sop>."""
    rng = np.random.default_rng(7)
    ids = rng.integers(5, 1000, (3, 14)).astype(np.int32)
    ids[0, 8], ids[0, 9] = GMASK, BOS
    ids[1, 3], ids[1, 7] = MASK, BOS
    return ids


def our_logits(net, ids, mask=None, position_ids=None):
    args = [ms.Tensor(np.asarray(ids, np.int32))]
    args.append(None if mask is None else ms.Tensor(np.asarray(mask, np.int32)))
    if position_ids is not None:
        args += [None, ms.Tensor(np.asarray(position_ids, np.int32))]
    return net(*args).asnumpy()


def write_release(directory, tensors, config=RELEASE_CONFIG):
    """Two pytorch_model-0000N-of-00002.bin shards, their index and config.json, as in THUDM/chatglm-6b."""
    os.makedirs(directory, exist_ok=True)
    names = sorted(tensors)
    shards = {f'pytorch_model-0000{n + 1}-of-00002.bin': names[n::2] for n in range(2)}
    for file_name, part in shards.items():
        torch.save({name: torch.from_numpy(np.array(tensors[name])) for name in part}, directory / file_name)
    weight_map = {name: file_name for file_name, part in shards.items() for name in part}
    (directory / 'pytorch_model.bin.index.json').write_text(json.dumps({'metadata': {}, 'weight_map': weight_map}))
    (directory / 'config.json').write_text(json.dumps(config))
    return directory
