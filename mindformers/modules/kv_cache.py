"""Incremental decoding: a preallocated key/value cache updated in place, and the host-side bookkeeping around it.

Layout per layer: key and value caches `[batch, kv_heads, max_length, head_dim]`, Parameters updated in place:
a prefill writes positions `[0, P)` at once; each decode step writes one position (the same for every row, since
prompts are left-padded to a common length) with `ScatterNdUpdate`. Attention in a decode step reads the whole cache
under an additive mask that hides positions not written yet and each row's left padding. All shapes are static:
one compiled graph per prefill bucket and one for the decode step. On CPU in fp32 a decode step's cache write and
attention run in one fused kernel (`FusedDecodeAttention`) that writes the cache in place and reads only the
positions written so far."""
import numpy as np
import mindspore as ms
from mindspore import nn, ops, Parameter, Tensor

from mindformers.kernels import FusedDecodeAttention, use_fused
from mindformers.modules.layers import to_mstype

NEG_INF = -1e9
PREFILL_BUCKETS = (16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)


class KVCache(nn.Cell):
    """Key/value caches of `num_layers` layers, `[batch, kv_heads, max_length, head_dim]` each, in `dtype`."""

    def __init__(self, num_layers, batch, kv_heads, max_length, head_dim, dtype=ms.float32):
        super().__init__()
        shape = (batch, kv_heads, max_length, head_dim)
        self.kv_heads, self.max_length = kv_heads, max_length
        self.keys = nn.CellList([_Buffer(shape, dtype, f'key_cache_{i}') for i in range(num_layers)])
        self.values = nn.CellList([_Buffer(shape, dtype, f'value_cache_{i}') for i in range(num_layers)])
        self.scatter = ops.ScatterNdUpdate()
        self.fused_attention = FusedDecodeAttention() if use_fused(dtype) else None
        self.scores_matmul = ops.BatchMatMul(transpose_b=True)
        self.context_matmul = ops.BatchMatMul()
        self.softmax = ops.Softmax(axis=-1)

    def write_prefill(self, layer, key, value):
        """Store `[B, kv_heads, P, D]` keys and values at positions [0, P); returns the inputs (for use in attention)."""
        length = key.shape[2]
        if length < self.max_length:
            pad = (0, 0, 0, self.max_length - length)  # ops.pad: (last axis before, after, previous axis ...)
            ops.assign(self.keys[layer].data, ops.pad(key, pad))
            ops.assign(self.values[layer].data, ops.pad(value, pad))
        else:
            ops.assign(self.keys[layer].data, key)
            ops.assign(self.values[layer].data, value)
        return key, value

    def write_step(self, layer, key, value, indices):
        """Store one position (`key`/`value` `[B, kv_heads, 1, D]`; `indices` `[B, kv_heads, 1, 3]` int32 holding
        (row, head, position)); returns the whole caches after the write."""
        keys, values = self.keys[layer].data, self.values[layer].data
        keys = ops.depend(keys, self.scatter(keys, indices, key))
        values = ops.depend(values, self.scatter(values, indices, value))
        return keys, values


    def attend_step(self, layer, query, key, value, mask, indices):
        """A decode step's attention: store `key`/`value` `[B, kv_heads, 1, D]` at the position in `indices` (see
        `write_step`) and return softmax(query keys^T + mask) values, `[B, heads, 1, D]`, for `query`
        `[B, heads, 1, D]` already scaled by 1/sqrt(D); heads must be a multiple of kv_heads (grouped queries)."""
        if self.fused_attention is not None:
            return self.fused_attention(query, key, value, self.keys[layer].data, self.values[layer].data, mask,
                                        indices)
        keys, values = self.write_step(layer, key, value, indices)
        group = query.shape[1] // keys.shape[1]
        if group > 1:
            keys, values = ops.repeat_interleave(keys, group, 1), ops.repeat_interleave(values, group, 1)
        scores = self.scores_matmul(query, keys)
        if scores.dtype != ms.float32:  # half precision: the softmax runs in float32 (the mask holds -1e9)
            scores = ops.cast(scores, ms.float32)
        probs = self.softmax(scores + mask)
        return self.context_matmul(ops.cast(probs, values.dtype), values)


    def attend(self, layer, query, key, value, mask, indices, prefill, core):
        """Layer `layer`'s attention in a prefill (store positions [0, T) and attend with `core`, a
        `DotProductAttention`) or a decode step (`attend_step`): query [B, heads, T, D] scaled, key/value
        [B, kv_heads, T, D] -> context [B, T, heads * D] (heads merged)."""
        if prefill:
            keys, values = self.write_prefill(layer, key, value)
            context = core(query, keys, values, mask)
        else:
            context = self.attend_step(layer, query, key, value, mask, indices)
        batch, heads, length, dim = context.shape
        return ops.transpose(context, (0, 2, 1, 3)).reshape(batch, length, heads * dim)


class IncrementalCore(nn.Cell):
    """Base of a family's incremental core (what `IncrementalSession` drives): the `model`, its `hidden_size`, and a
    `KVCache` of `seq_length` positions per layer for `kv_heads` heads of `head_dim`, in the config's
    `compute_dtype`. Subclasses define `forward(input_ids, positions, mask, indices, prefill)`."""

    def __init__(self, model, batch, kv_heads, head_dim):
        super().__init__(auto_prefix=False)
        config = model.config
        self.model = model
        self.hidden_size = config.hidden_size
        self.cache = KVCache(config.num_layers, batch, kv_heads, config.seq_length, head_dim,
                             to_mstype(config.compute_dtype))


class _Buffer(nn.Cell):
    def __init__(self, shape, dtype, name):
        super().__init__()
        self.data = Parameter(Tensor(np.zeros(shape), dtype), name=name, requires_grad=False)


def prefill_bucket(length, max_length):
    """The smallest bucket >= `length` (capped at `max_length`): prompts are left-padded to it."""
    for bucket in PREFILL_BUCKETS:
        if bucket >= length:
            return min(bucket, max_length)
    return max_length


class CacheState:
    """Host-side state of one incremental generation: per-row padding, the next write position, and the masks and
    indices the compiled graphs take as inputs (rebuilt in NumPy each step; only values change, never shapes)."""

    def __init__(self, batch, kv_heads, max_length):
        self.batch, self.kv_heads, self.max_length = batch, kv_heads, max_length
        rows, heads = np.meshgrid(np.arange(batch), np.arange(kv_heads), indexing='ij')
        self._indices = np.stack([rows, heads, np.zeros_like(rows)], -1)[:, :, None, :].astype(np.int32)
        self.valid = None      # [B, max_length] bool: positions that hold a real token
        self.length = 0        # positions written so far (the same for every row)

    def start(self, attention_mask, bucket):
        """Left-pad `attention_mask` [B, P] to `bucket`; returns (positions [B, bucket], mask [B, 1, bucket, bucket],
        left padding added) for the prefill."""
        batch, length = attention_mask.shape
        if length > bucket or bucket > self.max_length:
            raise ValueError(f"prompt of {length} tokens does not fit the cache of {self.max_length}")
        extra = bucket - length
        mask = np.concatenate([np.zeros((batch, extra), np.int32), attention_mask.astype(np.int32)], axis=1)
        self.valid = np.zeros((batch, self.max_length), bool)
        self.valid[:, :bucket] = mask.astype(bool)
        self.length = bucket
        positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0).astype(np.int32)
        causal = np.tril(np.ones((bucket, bucket), bool))
        allowed = causal[None] & self.valid[:, None, :bucket]
        additive = np.where(allowed, 0.0, NEG_INF).astype(np.float32)[:, None]
        return positions, additive, extra

    def step(self):
        """(positions [B, 1], mask [B, 1, 1, max_length], write indices [B, kv_heads, 1, 3]) for the next decode
        step, which writes position `self.length`."""
        if self.length >= self.max_length:
            raise ValueError(f"the cache of {self.max_length} positions is full")
        position = self.length
        self.valid[:, position] = True
        positions = (self.valid[:, :position].sum(axis=1, keepdims=True)).astype(np.int32)
        additive = np.where(self.valid, 0.0, NEG_INF).astype(np.float32)[:, None, None, :]
        indices = self._indices.copy()
        indices[..., 2] = position
        self.length += 1
        return positions, additive, indices

    def reorder(self, rows):
        self.valid = self.valid[np.asarray(rows)]


def to_tensors(*arrays):
    return tuple(Tensor(a) for a in arrays)


class _Step(nn.Cell):
    """A compiled step called once per token. On every call MindSpore assigns the graph's phase to each sub-cell
    (`compile_phase`, hundreds of Python attribute sets: about 0.5 ms of a decode step here); the phase of a step
    never changes, so a repeated assignment is skipped (sub-cells' phases are read only when the graph compiles)."""

    @property
    def compile_phase(self):
        return self._compile_phase

    @compile_phase.setter
    def compile_phase(self, value):
        if value != self._compile_phase:
            nn.Cell.compile_phase.fset(self, value)


class _Prefill(_Step):
    def __init__(self, core):
        super().__init__(auto_prefix=False)
        self.core = core

    def construct(self, input_ids, positions, mask):
        return self.core.forward(input_ids, positions, mask, None, True)


class _Decode(_Step):
    def __init__(self, core):
        super().__init__(auto_prefix=False)
        self.core = core

    def construct(self, input_ids, positions, mask, indices):
        return self.core.forward(input_ids, positions, mask, indices, False)


class _Reorder(nn.Cell):
    def __init__(self, cache):
        super().__init__(auto_prefix=False)
        self.cache = cache

    def construct(self, rows):
        for buffers in (self.cache.keys, self.cache.values):
            for buffer in buffers:
                ops.assign(buffer.data, ops.gather(buffer.data, rows, 0))
        return rows


class IncrementalSession:
    """Drives a family's incremental core: `core.cache` (a KVCache) and `core.forward(input_ids, positions, mask,
    indices, prefill)` returning fp32 logits `[B, vocab]` of each row's last position.

    `prefill(input_ids [B, P], attention_mask [B, P])` (NumPy, left-padded) -> logits [B, V];
    `decode(tokens [B])` -> logits [B, V]; `reorder(rows [B])` permutes the cache rows (beam search).
    The prompt is padded on the left to a bucket length, so prefill compiles once per bucket and decode once."""

    def __init__(self, core, batch, kv_heads, max_length):
        self.core, self.batch, self.max_length = core, batch, max_length
        self.state = CacheState(batch, kv_heads, max_length)
        self._prefill, self._decode, self._reorder = _Prefill(core), _Decode(core), _Reorder(core.cache)
        for cell in (self._prefill, self._decode):
            cell.set_train(False)

    def prefill(self, input_ids, attention_mask=None, bucket=None):
        """`bucket`: the padded prompt length to compile for (default `prefill_bucket(P)`); callers that need
        more room for new tokens pass a smaller one (>= P)."""
        input_ids = np.asarray(input_ids, np.int32)
        if input_ids.ndim != 2 or input_ids.shape[0] != self.batch:
            raise ValueError(f"prefill expects input_ids [{self.batch}, P], got shape {input_ids.shape}")
        if attention_mask is None:
            attention_mask = np.ones_like(input_ids)
        bucket = prefill_bucket(input_ids.shape[1], self.max_length) if bucket is None else int(bucket)
        positions, mask, extra = self.state.start(np.asarray(attention_mask), bucket)
        padded = np.concatenate([np.zeros((self.batch, extra), np.int32), input_ids], axis=1)
        logits = self._prefill(*to_tensors(padded, positions, mask))
        return logits.asnumpy()

    def decode(self, tokens):
        tokens = np.asarray(tokens, np.int32).reshape(self.batch, 1)
        positions, mask, indices = self.state.step()
        return self._decode(*to_tensors(tokens, positions, mask, indices)).asnumpy()

    def reorder(self, rows):
        rows = np.asarray(rows, np.int32)
        self._reorder(Tensor(rows))
        self.state.reorder(rows)
