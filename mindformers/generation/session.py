"""Decoding sessions: a preallocated key/value cache with slots, and the compiled prefill and decode steps over it.

A `DecodingSession(model, slots)` owns its cache (the model owns none), so one model can serve several sessions at
once. Each of the `slots` rows is an independent sequence with its own length: `prefill(rows, ids, mask)` starts new
sequences in the given free slots while the other slots keep their state, `decode(tokens)` advances every active
slot by one token, and `free(rows)` releases slots for reuse. Shapes are static: one compiled graph per (rows,
prompt bucket) for prefill and one for decode, whatever the slots hold.

`feed(slots, tokens, rows)` is the general step those two are cases of: any tokens of any slots in one decode-shaped
step of `rows` rows, several consecutive tokens of one slot among them (a prompt read in chunks while other slots
decode: continuous batching without a separate prefill). It needs the fused decode attention and a family without
per-slot state or prefix (`feed_rows(model)` > 0), and compiles once per `rows`.

The model side is the family's one forward: `model.logits(input_ids, None, cache, step)` with `cache` a view of the
session's cache (`KVCache.prefill` or `KVCache.decode`) and `step = (positions, mask, write)`, returning fp32
logits [rows, vocab] of each row's last position. The family declares its cache with `model.kv_cache_layout()`.

Cache layout per layer: keys and values `[slots, kv_heads, max_length, head_dim]` in the model config's
`kv_cache_dtype` (default: its compute dtype), Parameters updated in place (keys stored after any rotary embedding).
A cache narrower than the computation (fp16 under fp32) is rounded to nearest as it is written and widened as it is
read: the fused fp32 decode kernels convert in registers; without them (or for a compute dtype they do not take) the
decode step casts the whole cache of each layer before attending, correct but slower. A prefill writes a slot's
positions [0, T) (its prompt left-padded to the bucket T) and zeroes the rest of the row; a decode step writes one
position per slot, the next after that slot's last. Attention in a decode step reads a slot's positions up to its
own under an additive mask that hides its left padding.

A model whose attention layers hold prefix keys/values (Prefix-Tuning, P-Tuning v2: `modules.attention.prefix_length`
P > 0) gets P more cache positions per slot: a prefill stores the prefix at [0, P) and the prompt at [P, P + T),
every decode step sees the prefix columns, and the tokens' own positions still count from 0 (the prefix has none).
So a decode step runs the same kernels as without a prefix."""
import itertools

import numpy as np
import mindspore as ms
from mindspore import nn, ops, Parameter, Tensor

from mindformers.kernels import (CACHE_KERNEL_SUFFIX, FEW_ROWS, FusedDecodeAttention, FusedDecodeAttentionPacked,
                                 use_fused)
from mindformers.modules.attention import prefix_length
from mindformers.modules.layers import to_mstype

NEG_INF = -1e9
PREFILL_BUCKETS = (16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)
_SESSION_IDS = itertools.count()


def prefill_bucket(length, max_length):
    """The smallest bucket >= `length` (capped at `max_length`): prompts are left-padded to it."""
    for bucket in PREFILL_BUCKETS:
        if bucket >= length:
            return min(bucket, max_length)
    return max_length


def left_padded(prompts, width, pad=0, dtype=np.int32):
    """Ragged `prompts` (lists of ids, each <= `width`) as (ids [n, width] filled with `pad` on the left, attention
    mask [n, width] int32: 1 on the prompt's tokens)."""
    ids = np.full((len(prompts), width), pad, dtype)
    mask = np.zeros((len(prompts), width), np.int32)
    for row, tokens in enumerate(prompts):
        ids[row, width - len(tokens):], mask[row, width - len(tokens):] = tokens, 1
    return ids, mask


class _Buffer(nn.Cell):
    def __init__(self, shape, dtype, name):
        super().__init__(auto_prefix=False)
        self.data = Parameter(Tensor(np.zeros(shape), dtype), name=name, requires_grad=False)


class LayerCache(nn.Cell):
    """One layer's keys and values as a prefill (`prefill` True) or a decode step sees them: what a family's
    attention is given as `cache` (with `write`, from the step's inputs).

    `attend(query, key, value, mask, write, core)`: query [B, H, T, D] already scaled, key/value [B, Hkv, T, D]
    -> context [B, H, T, D]. Prefill: stores key/value at positions [0, T) of slots `write` ([B] int32; the rest
    of those rows is zeroed) and attends with `core` (the layer's `DotProductAttention`) under `mask`
    [B, 1, T, T]; a layer with a prefix (`core.prefix`) stores its P prefix keys/values first, the tokens at
    [P, P + T). Decode (T = 1): stores key/value at each row's position (`write` [B, Hkv, 1, 3] int32: row, head,
    position) and attends over the row's cache under `mask` [B, 1, 1, cache length]. A `core.score_scale`
    multiplies the scores here too.
    `attend_packed(qkv, mask, write, scale [1])`: the same decode step on a packed projection qkv
    [B, (H + 2 Hkv) D] (unscaled) -> [B, H D]; only where `packed` (decode, fp32 CPU kernels).
    The buffers may be narrower than `compute_dtype` (the model's): keys/values are cast as they are stored and
    read; the context comes back in the query's dtype."""

    def __init__(self, keys, values, prefill, compute_dtype=None):
        super().__init__(auto_prefix=False)
        self.keys, self.values = keys, values
        self.prefill = prefill
        self.max_length = keys.data.shape[2]
        self.cache_dtype = keys.data.dtype
        fused = use_fused(compute_dtype or self.cache_dtype) and self.cache_dtype in CACHE_KERNEL_SUFFIX
        self.packed = not prefill and fused
        self.fused_attention = FusedDecodeAttention(self.cache_dtype) if self.packed else None
        self.fused_packed = FusedDecodeAttentionPacked(self.cache_dtype) if self.packed else None
        self.scatter_rows = ops.ScatterUpdate()
        self.scatter = ops.ScatterNdUpdate()
        self.scores_matmul = ops.BatchMatMul(transpose_b=True)
        self.context_matmul = ops.BatchMatMul()
        self.softmax = ops.Softmax(axis=-1)

    def attend(self, query, key, value, mask, write, core):
        if self.prefill:
            if mask.dtype != core.softmax_dtype:  # half precision: keep the hidden scores finite
                mask = ops.cast(ops.maximum(mask, -6e4), core.softmax_dtype)
            if core.prefix is not None:
                key, value, mask = core.add_prefix(query, key, value, mask)
            length = key.shape[2]
            pad = (0, 0, 0, self.max_length - length)  # ops.pad: (last axis before, after, previous axis ...)
            for buffer, rows in ((self.keys, key), (self.values, value)):
                rows = ops.pad(rows, pad) if length < self.max_length else rows
                self.scatter_rows(buffer.data, write, self._narrow(rows))
            return core.attend(query, key, value, mask)
        if core.score_scale is not None:
            query = query * ops.cast(core.score_scale, query.dtype)
        keys, values = self.keys.data, self.values.data
        if self.fused_attention is not None and query.dtype == ms.float32:
            return self.fused_attention(query, key, value, keys, values, mask, write)
        keys = ops.depend(keys, self.scatter(keys, write, self._narrow(key)))
        values = ops.depend(values, self.scatter(values, write, self._narrow(value)))
        if keys.dtype != query.dtype:  # a narrower cache: every step widens all of it (the fused kernels do not)
            keys, values = ops.cast(keys, query.dtype), ops.cast(values, query.dtype)
        group = query.shape[1] // keys.shape[1]
        if group > 1:
            keys, values = ops.repeat_interleave(keys, group, 1), ops.repeat_interleave(values, group, 1)
        scores = self.scores_matmul(query, keys)
        if scores.dtype != ms.float32:  # half precision: the softmax runs in float32 (the mask holds -1e9)
            scores = ops.cast(scores, ms.float32)
        probs = self.softmax(scores + mask)
        return self.context_matmul(ops.cast(probs, values.dtype), values)

    def _narrow(self, x):
        return x if x.dtype == self.cache_dtype else ops.cast(x, self.cache_dtype)

    def attend_packed(self, qkv, mask, write, scale):
        return self.fused_packed(qkv, self.keys.data, self.values.data, mask, write, scale)


class CacheView(nn.Cell):
    """A session's cache as its prefill (`prefill` True) or decode step sees it: what a family's forward is given
    as `cache`. `layers[i]` is layer i's `LayerCache`; `store(name, value, write)` (prefill: per-slot state [B, 1]
    int32 into slots `write`) and `load(name)` (decode: [slots, 1]) keep what a family needs between steps (its
    `kv_cache_layout()['state']`)."""

    def __init__(self, keys, values, state, prefill, compute_dtype=None):
        super().__init__(auto_prefix=False)
        self.prefill = prefill
        self.layers = nn.CellList([LayerCache(k, v, prefill, compute_dtype) for k, v in zip(keys, values)])
        self.state = state
        self.scatter_rows = ops.ScatterUpdate()

    def store(self, name, value, write):
        self.scatter_rows(getattr(self.state, name), write, value)
        return value

    def load(self, name):
        return getattr(self.state, name)


class _State(nn.Cell):
    """Per-slot int32 state [slots, 1] Parameters, one per name."""

    def __init__(self, prefix, names, slots):
        super().__init__(auto_prefix=False)
        self.names = tuple(names)
        for name in self.names:
            setattr(self, name, Parameter(Tensor(np.zeros((slots, 1), np.int32)), name=f'{prefix}.{name}',
                                          requires_grad=False))


class KVCache(nn.Cell):
    """The buffers of one session: `num_layers` key and value caches [slots, kv_heads, max_length, head_dim] in
    `dtype`, per-slot `state` names, and the two views (`prefill`, `decode`) the compiled steps hand to the
    model, which computes in `compute_dtype` (default `dtype`)."""

    def __init__(self, num_layers, slots, kv_heads, max_length, head_dim, dtype=ms.float32, state=(),
                 compute_dtype=None):
        super().__init__(auto_prefix=False)
        prefix = f'session{next(_SESSION_IDS)}'
        shape = (slots, kv_heads, max_length, head_dim)
        self.keys = nn.CellList([_Buffer(shape, dtype, f'{prefix}.key_cache_{i}') for i in range(num_layers)])
        self.values = nn.CellList([_Buffer(shape, dtype, f'{prefix}.value_cache_{i}') for i in range(num_layers)])
        self.state = _State(prefix, state, slots)
        self.prefill = CacheView(self.keys, self.values, self.state, True, compute_dtype)
        self.decode = CacheView(self.keys, self.values, self.state, False, compute_dtype)

    def nbytes(self):
        """Bytes of the key and value buffers."""
        return sum(buffer.data.nbytes for buffers in (self.keys, self.values) for buffer in buffers)


class SlotTable:
    """Host-side bookkeeping of a session's slots: which are active, each slot's written length and which of its
    cache positions are visible; builds the step inputs in NumPy (only values change, never shapes). With `prefix`
    P the cache rows have P + max_length positions, the first P holding the model's prefix (visible, no position)."""

    def __init__(self, slots, kv_heads, max_length, prefix=0):
        self.slots, self.kv_heads, self.max_length, self.prefix = slots, kv_heads, max_length, prefix
        rows, heads = np.meshgrid(np.arange(slots), np.arange(kv_heads), indexing='ij')
        self._indices = np.stack([rows, heads, np.zeros_like(rows)], -1)[:, :, None, :].astype(np.int32)
        self.valid = np.zeros((slots, prefix + max_length), bool)   # cache positions holding a prefix or real token
        self.length = np.zeros(slots, np.int64)            # positions written so far
        self.active = np.zeros(slots, bool)

    def free_slots(self):
        return [int(s) for s in np.flatnonzero(~self.active)]

    def start(self, rows, attention_mask, bucket):
        """Left-pad `attention_mask` [n, P] to `bucket` for slots `rows`; returns (positions [n, bucket],
        mask [n, 1, bucket, bucket], left padding added)."""
        count, length = attention_mask.shape
        if length > bucket or bucket > self.max_length:
            raise ValueError(f"a prompt of {length} tokens does not fit the cache of {self.max_length} positions")
        extra = bucket - length
        mask = np.concatenate([np.zeros((count, extra), np.int32), attention_mask.astype(np.int32)], axis=1)
        valid = mask.astype(bool)
        self.open(rows)
        self.valid[rows, self.prefix:self.prefix + bucket] = valid
        self.length[rows] = self.prefix + bucket
        positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0).astype(np.int32)
        allowed = np.tril(np.ones((bucket, bucket), bool))[None] & valid[:, None, :]
        return positions, np.where(allowed, 0.0, NEG_INF).astype(np.float32)[:, None], extra

    def step(self):
        """(positions [slots, 1], mask [slots, 1, 1, P + max_length], write indices [slots, kv_heads, 1, 3]) for the
        next decode step: each active slot writes its next position; an inactive one writes position 0 of its own
        row (never read: a prefill rewrites the row)."""
        full = self.active & (self.length >= self.prefix + self.max_length)
        if full.any():
            raise ValueError(f"slot {int(np.flatnonzero(full)[0])} is full: its cache holds {self.max_length} "
                             f"positions")
        written = np.where(self.active, self.length, 0)
        positions = np.where(self.active, self.valid.sum(axis=1) - self.prefix, 0).astype(np.int32)[:, None]
        self.valid[self.active, written[self.active]] = True
        visible = self.valid.copy()
        visible[~self.active, 0] = True
        mask = np.where(visible, 0.0, NEG_INF).astype(np.float32)[:, None, None, :]
        indices = self._indices.copy()
        indices[..., 2] = written[:, None, None]
        self.length[self.active] += 1
        return positions, mask, indices

    def open(self, rows):
        """Start empty sequences in slots `rows` (their tokens come through `feed`)."""
        self.valid[rows] = False
        self.valid[rows, :self.prefix] = True
        self.length[rows] = self.prefix
        self.active[rows] = True

    def feed(self, slots, rows):
        """Step inputs for one token per entry of `slots` ([n] active slots; the entries of one slot take its next
        positions in order), padded to `rows` by repeating the last entry: (positions [rows, 1], mask
        [rows, 1, 1, P + max_length], write indices [rows, kv_heads, 1, 3] (slot, head, position))."""
        slots = np.asarray(slots, np.int64)
        if not self.active[slots].all():
            raise ValueError(f"feed: slot {int(slots[~self.active[slots]][0])} is not open")
        by_slot = np.argsort(slots, kind='stable')  # entries grouped by slot, in their order within each group
        grouped = slots[by_slot]
        starts = np.flatnonzero(np.r_[True, grouped[1:] != grouped[:-1]])
        order = np.empty(len(slots), np.int64)  # how many entries of the same slot come before each entry
        order[by_slot] = np.arange(len(slots)) - np.repeat(starts, np.diff(np.r_[starts, len(slots)]))
        written = self.length[slots] + order
        full = written >= self.prefix + self.max_length
        if full.any():
            raise ValueError(f"slot {int(slots[full][0])} is full: its cache holds {self.max_length} positions")
        positions = self.valid[slots].sum(axis=1) - self.prefix + order
        self.valid[slots, written] = True
        np.add.at(self.length, slots, 1)
        visible = self.valid[slots] & (np.arange(self.valid.shape[1]) <= written[:, None])
        pad = np.full(rows - len(slots), len(slots) - 1)
        take = np.concatenate([np.arange(len(slots)), pad])
        mask = np.where(visible[take], 0.0, NEG_INF).astype(np.float32)[:, None, None, :]
        indices = np.empty((rows, self.kv_heads, 1, 3), np.int32)
        indices[..., 0] = slots[take][:, None, None]
        indices[..., 1] = np.arange(self.kv_heads)[None, :, None]
        indices[..., 2] = written[take][:, None, None]
        return positions[take].astype(np.int32)[:, None], mask, indices

    def free(self, rows):
        self.active[rows] = False
        self.valid[rows] = False
        self.length[rows] = 0

    def reorder(self, rows):
        self.valid, self.length, self.active = self.valid[rows], self.length[rows], self.active[rows]


class _Step(nn.Cell):
    """A compiled step called once per token. On every call MindSpore assigns the graph's phase to each sub-cell
    (`compile_phase`, hundreds of Python attribute sets: about 0.5 ms of a decode step here); the phase of a step
    never changes, so a repeated assignment is skipped (sub-cells' phases are read only when the graph compiles)."""

    def __init__(self, model, view):
        super().__init__(auto_prefix=False)
        self.model, self.view = model, view

    @property
    def compile_phase(self):
        return self._compile_phase

    @compile_phase.setter
    def compile_phase(self, value):
        if value != self._compile_phase:
            nn.Cell.compile_phase.fset(self, value)

    def construct(self, input_ids, positions, mask, write):
        return self.model.logits(input_ids, None, self.view, (positions, mask, write))


class _Reorder(nn.Cell):
    def __init__(self, cache):
        super().__init__(auto_prefix=False)
        self.cache = cache

    def construct(self, rows):
        for buffers in (self.cache.keys, self.cache.values):
            for buffer in buffers:
                ops.assign(buffer.data, ops.gather(buffer.data, rows, 0))
        for name in self.cache.state.names:
            state = getattr(self.cache.state, name)
            ops.assign(state, ops.gather(state, rows, 0))
        return rows


class DecodingSession:
    """KV-cache decoding of `slots` independent sequences over `model` (any causal LM of the suite with
    `kv_cache_layout()`); see the module docstring.

    `prefill(rows, input_ids [n, P], attention_mask [n, P] = None, bucket=None)` (NumPy, left-padded) starts the
    prompts in slots `rows` (free or not: their old state is dropped) -> fp32 logits [n, vocab] of their last
    positions. `decode(tokens [slots])` feeds each slot's next token (ignored for inactive slots) -> logits
    [slots, vocab] (rows of inactive slots are meaningless). `free(rows)`, `free_slots()`, `reorder(rows [slots])`
    (beam search: slot i continues what slot rows[i] held). The prompt is padded on the left to a bucket
    (`prefill_bucket`), so prefill compiles once per (n, bucket) and decode once."""

    def __init__(self, model, slots, max_length=None):
        layout = model.kv_cache_layout()
        self.model, self.slots = model, int(slots)
        self.max_length = int(max_length or model.config.seq_length)
        if self.slots < 1 or self.max_length > int(model.config.seq_length):
            raise ValueError(f"a session needs at least one slot and at most the model's seq_length "
                             f"({model.config.seq_length}) positions; got slots={slots}, max_length={max_length}")
        prefix = prefix_length(model)
        compute_dtype = to_mstype(model.config.compute_dtype)
        cache_dtype = to_mstype(getattr(model.config, 'kv_cache_dtype', None) or compute_dtype)
        self.cache = KVCache(layout['num_layers'], self.slots, layout['kv_heads'], prefix + self.max_length,
                             layout['head_dim'], cache_dtype, layout.get('state', ()), compute_dtype)
        self.table = SlotTable(self.slots, layout['kv_heads'], self.max_length, prefix)
        self._prefill, self._decode = _Step(model, self.cache.prefill), _Step(model, self.cache.decode)
        self._feed = {self.slots: self._decode}  # rows -> step; `slots` rows have the decode step's shapes
        self.feed_rows = feed_rows(model)
        self._reorder = _Reorder(self.cache)
        for cell in (self._prefill, self._decode):
            cell.set_train(False)

    def free_slots(self):
        return self.table.free_slots()

    def prefill(self, rows, input_ids, attention_mask=None, bucket=None):
        """`bucket`: the padded prompt length to compile for (default `prefill_bucket(P)`); a caller that needs
        more room for new tokens passes a smaller one (>= P)."""
        rows = np.asarray(rows, np.int32).reshape(-1)
        input_ids = np.asarray(input_ids, np.int32)
        if input_ids.ndim != 2 or input_ids.shape[0] != len(rows) or len(rows) == 0:
            raise ValueError(f"prefill expects input_ids [{len(rows)}, P] for slots {rows.tolist()}, got shape "
                             f"{input_ids.shape}")
        if rows.min() < 0 or rows.max() >= self.slots or len(set(rows.tolist())) != len(rows):
            raise ValueError(f"prefill slots must be distinct and in [0, {self.slots}), got {rows.tolist()}")
        if attention_mask is None:
            attention_mask = np.ones_like(input_ids)
        bucket = prefill_bucket(input_ids.shape[1], self.max_length) if bucket is None else int(bucket)
        positions, mask, extra = self.table.start(rows, np.asarray(attention_mask), bucket)
        padded = np.concatenate([np.zeros((len(rows), extra), np.int32), input_ids], axis=1)
        return self._prefill(*_tensors(padded, positions, mask, rows)).asnumpy()

    def decode(self, tokens):
        tokens = np.asarray(tokens, np.int32).reshape(self.slots, 1)
        return self._decode(*_tensors(tokens, *self.table.step())).asnumpy()

    def open(self, rows):
        """Start empty sequences in slots `rows` (free or not: their old state is dropped), to be fed by `feed`."""
        self.table.open(np.asarray(rows, np.int64).reshape(-1))

    def feed(self, slots, tokens, rows=None):
        """Feed `tokens[i]` ([n] ids) to slot `slots[i]` ([n]; open slots; one slot's entries are its next tokens in
        order, each seeing the ones before it) in one step of `rows` rows (n <= rows <= `feed_rows`; default n;
        compiled once per `rows`: the extra rows repeat the last entry, which changes nothing) -> fp32 logits
        [n, vocab], row i the next-token logits after tokens[i]."""
        slots, tokens = np.asarray(slots, np.int64).reshape(-1), np.asarray(tokens, np.int32).reshape(-1)
        rows = len(tokens) if rows is None else int(rows)
        if self.feed_rows == 0:
            raise ValueError(f"{type(self.model).__name__} cannot feed several tokens of a slot in one step (it "
                             "needs the fp32 CPU kernels' decode attention, and no per-slot state or prefix); use "
                             "prefill and decode")
        if len(slots) != len(tokens) or not 0 < len(tokens) <= rows <= self.feed_rows:
            raise ValueError(f"feed takes as many slots as tokens (got {len(slots)} and {len(tokens)}), at least one, "
                             f"in a step of rows in [that count, {self.feed_rows}]; got rows={rows}")
        if slots.min() < 0 or slots.max() >= self.slots:
            raise ValueError(f"feed slots must be in [0, {self.slots}), got {slots.tolist()}")
        step = self._feed.get(rows)
        if step is None:
            step = self._feed[rows] = _Step(self.model, self.cache.decode)
            step.set_train(False)
        inputs = self.table.feed(slots, rows)
        ids = np.concatenate([tokens, np.full(rows - len(tokens), tokens[-1], np.int32)])[:, None]
        return step(*_tensors(ids, *inputs)).asnumpy()[:len(tokens)]

    def free(self, rows):
        self.table.free(np.asarray(rows, np.int64).reshape(-1))

    def reorder(self, rows):
        rows = np.asarray(rows, np.int32)
        self._reorder(Tensor(rows))
        self.table.reorder(rows)


def feed_rows(model):
    """The most rows `DecodingSession.feed` takes in one step over `model`: `FEW_ROWS` (every product then runs a
    few-rows kernel, which gives each row the same bits whatever rows are beside it), or less where a layer's
    kernel says so (`few_rows_limit`: int8); 0 when a step cannot take several tokens of a slot: without the fused
    fp32 decode attention, or for a family with per-slot state (GLM's 2-D positions) or prefix keys."""
    compute_dtype = to_mstype(model.config.compute_dtype)
    cache_dtype = to_mstype(getattr(model.config, 'kv_cache_dtype', None) or compute_dtype)
    if not (use_fused(compute_dtype) and cache_dtype in CACHE_KERNEL_SUFFIX) or prefix_length(model) \
            or model.kv_cache_layout().get('state'):
        return 0
    return min([FEW_ROWS] + [cell.few_rows_limit for _, cell in model.cells_and_names()
                             if hasattr(cell, 'few_rows_limit')])


def _tensors(*arrays):
    return tuple(Tensor(a) for a in arrays)


def session_for(model, rows):
    """A `DecodingSession` of `rows` slots over `model` for `generate()`, kept (per model and row count, in the
    model's `_generate_sessions`) so later calls reuse its compiled graphs; it goes with the model."""
    sessions = model.__dict__.setdefault('_generate_sessions', {})
    if rows not in sessions:
        sessions[rows] = DecodingSession(model, rows)
    return sessions[rows]
