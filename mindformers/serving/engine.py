"""Continuous batching: many requests share one `DecodingSession`, each in its own slot.

One engine thread runs the model. Every iteration it drops requests that were cancelled or ran out of time, starts
waiting requests in free slots (the other slots keep their state), then runs one compiled step that advances every
running request by one token and hands each its new text. A request leaves its slot as soon as it ends, and the next
waiting one takes it, so no request waits for another to finish. Shapes never change: each compiles once.

Chunked prompts (`prefill_chunk` = C, default 64; where the session can `feed`, `feed_rows(model)` > 0): a new
request's prompt is read by the same steps that decode the others. Each step has one row per decoding request and
gives the rows left, up to C in all, to the prompts still being read (oldest request first); the step's row count is
the smallest of the slots, 16, 32, ... up to C that holds them (all compiled by `start()`). A prompt costs its rows
of a step, well under a prefill of its own, and the decoding requests never stop for it. Every product of such a
step runs a few-rows kernel, so each row's result is the same bits whatever the other rows hold.

Otherwise (GLM's per-slot state, prefix keys, no fused kernels, or `prefill_chunk` 0) a request starts with a
prefill of its prompt, padded on the left to its bucket (`generation.session.prefill_bucket`). When the bucket plus
the request's `max_tokens` would not fit the context, the prompt is split: the largest bucket that the prompt fills
is prefilled and the rest of the prompt is fed through decode steps one token a step. Families that keep per-slot
state between steps (GLM: its 2-D positions) cannot take prompt tokens through decode; for them the bucket shrinks
to what fits, as `generate()` does (a shape compiled once per such size). Batched admission (`batched_prefill` =
N > 0): requests admitted in the same iteration whose prompts share a bucket <= N start in one prefill of 2, 4, ...
rows (powers of two up to the slots); `start()` compiles those graphs (and the one-row ones of those buckets).

A step's host work is batched: greedy rows are picked with one argmax, sampled rows are warped together per
(temperature, top_k, top_p) and each drawn with its own generator; each request's text is updated by decoding only
its newest tokens; the step's events go out together after every pick.

Per-request sampling follows `generate()` with `seed`: the same request gives the same tokens whatever runs beside
it. Only ids the tokenizer can decode are picked (a model's embedding may be padded past its tokenizer). Stop strings end a request and are never part of its text, also when they arrive split over several tokens."""
import collections
import dataclasses
import itertools
import threading
import time
from typing import Callable, Optional

import numpy as np

from mindformers.generation.generation_config import GenerationConfig
from mindformers.generation.logits_process import (repetition_penalty, sample, suppress_eos, temperature, top_k,
                                                   top_p)
from mindformers.generation.session import PREFILL_BUCKETS, DecodingSession, left_padded, prefill_bucket
from mindformers.tools.logger import logger

FINISH_REASONS = ('stop', 'length', 'timeout', 'error', 'cancelled')
DETOKENIZE_WINDOW = 8  # tokens a request's detokenization window grows to before it moves on
_IDS = itertools.count(1)


class RequestError(ValueError):
    """A request the engine cannot run as asked: `param` names the request field at fault (HTTP 400)."""

    def __init__(self, message, param=None, code='invalid_value'):
        super().__init__(message)
        self.param, self.code = param, code


class Overloaded(RuntimeError):
    """Every slot is busy and the waiting queue is full (HTTP 503): retry later."""


@dataclasses.dataclass
class SamplingParams:
    """How one request decodes. temperature 0 is greedy; top_k 0 and top_p 1 turn those filters off; `stop`: strings
    that end the request (never emitted); `seed` makes sampling reproducible; EOS is not picked before `min_tokens`
    new tokens."""
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    stop: tuple = ()
    seed: Optional[int] = None
    min_tokens: int = 0

    def validate(self):
        checks = (
            (isinstance(self.max_tokens, int) and self.max_tokens >= 1, 'max_tokens', 'an integer >= 1'),
            (self.temperature >= 0, 'temperature', '>= 0 (0 is greedy)'),
            (0 < self.top_p <= 1, 'top_p', 'in (0, 1]'),
            (isinstance(self.top_k, int) and self.top_k >= 0, 'top_k', 'an integer >= 0 (0 turns it off)'),
            (self.repetition_penalty > 0, 'repetition_penalty', '> 0'),
            (all(isinstance(s, str) and s for s in self.stop), 'stop', 'non-empty strings'),
            (self.seed is None or isinstance(self.seed, int), 'seed', 'an integer'),
            (isinstance(self.min_tokens, int) and 0 <= self.min_tokens <= self.max_tokens, 'min_tokens',
             'an integer in [0, max_tokens]'),
        )
        for ok, name, rule in checks:
            if not ok:
                raise RequestError(f"{name} must be {rule}, got {getattr(self, name)!r}", name)
        return self


@dataclasses.dataclass
class Event:
    """What a request produced since its last event. `text` never contains a stop string; the last event of a
    request has `finish_reason` ('stop': EOS or a stop string, 'length': max_tokens, 'timeout', 'error' with
    `message`). Token counts are totals so far (`completion_tokens` counts every generated token, EOS included)."""
    text: str
    finish_reason: Optional[str]
    prompt_tokens: int
    completion_tokens: int
    message: str = ''


class Handle:
    """The submitter's side of a request: `cancel()` when the client has gone (no further events; a waiting request
    leaves the queue at once, a running one frees its slot at the engine's next step)."""

    def __init__(self, request, engine):
        self._request, self._engine = request, engine
        self.id = request.id

    def cancel(self):
        self._engine._cancel(self._request)


class _Request:
    def __init__(self, prompt, params, on_event, deadline):
        self.id = next(_IDS)
        self.prompt, self.params, self.on_event, self.deadline = prompt, params, on_event, deadline
        self.rng = np.random.default_rng(params.seed)
        self.submitted = time.monotonic()
        self.slot, self.pending, self.tokens = None, [], []
        self.text, self.sent, self.cancelled = '', 0, False
        # incremental detokenization: tokens[start:] are decoded; `before` is the text of tokens[start:read],
        # `stable` the text of tokens[:read] (read: where the text was last complete)
        self.start, self.read, self.before, self.stable = 0, 0, '', ''

    def detokenize(self, tokenizer):
        """Update `text` after a new token, decoding only the tokens since a recent point where the text was
        complete (the ones before it are context for tokenizers whose pieces depend on their neighbours): the text
        equals decoding every token. One decode call per step; the window moves on every DETOKENIZE_WINDOW tokens
        (one more call then)."""
        window = tokenizer.decode(self.tokens[self.start:], skip_special_tokens=True)
        new = window[len(self.before):]
        self.text = self.stable + new
        if new.endswith('\ufffd'):
            return  # an incomplete multi-byte character: the window keeps growing
        if len(self.tokens) - self.start > DETOKENIZE_WINDOW:
            self.start = self.read
            window = tokenizer.decode(self.tokens[self.start:], skip_special_tokens=True)
        self.stable, self.read, self.before = self.text, len(self.tokens), window

    @property
    def next_input(self):
        return self.pending[0] if self.pending else self.tokens[-1]


class Engine:
    """Serves generation requests over `model` (a causal LM of the suite) and `tokenizer` with `slots` concurrent
    sequences; at most `max_waiting` more wait for a slot; a request is ended ('timeout') after `timeout` seconds.
    `prefill_chunk`: the most rows of a step that reads prompts (0: a prefill per request; see the module
    docstring).
    Progress (running/waiting requests, prompt and generation tokens/s) is logged every `log_interval` seconds
    while there is work. `submit` is thread-safe; events are delivered on the engine thread, after each prefill and
    decode step, as one call of `dispatch` with that step's [(on_event, Event)] (default `deliver_each`: calls
    each on_event in order; a server replaces it to cross to its event loop once per step)."""

    def __init__(self, model, tokenizer, slots=8, max_waiting=64, timeout=600.0, log_interval=5.0,
                 batched_prefill=0, prefill_chunk=64):
        if int(slots) < 1 or int(max_waiting) < 0 or float(timeout) <= 0 or int(batched_prefill) < 0 \
                or int(prefill_chunk) < 0:
            raise ValueError(f"Engine needs slots >= 1, max_waiting >= 0, timeout > 0, batched_prefill >= 0 and "
                             f"prefill_chunk >= 0; got slots={slots}, max_waiting={max_waiting}, timeout={timeout}, "
                             f"batched_prefill={batched_prefill}, prefill_chunk={prefill_chunk}")
        self.model, self.tokenizer = model, tokenizer
        self.slots, self.max_waiting, self.timeout = int(slots), int(max_waiting), float(timeout)
        self.log_interval = float(log_interval)
        self.context_length = int(model.config.seq_length)
        self.vocab_size = int(model.config.vocab_size)
        self.eos_token_ids = GenerationConfig.from_model_config(model.config).eos_token_ids
        # ids past the tokenizer's (a padded embedding) cannot become text: never picked
        self.decodable = min(len(tokenizer), self.vocab_size)
        self._stateful = bool(model.kv_cache_layout().get('state'))
        # batched admission: prefill shapes (rows, bucket) compiled by start(), rows the powers of two in (1, slots]
        self.batched_prefill = int(batched_prefill)
        self._group_rows = [rows for rows in (2 ** i for i in range(1, self.slots.bit_length())) if rows <= self.slots]
        self._group_shapes = set()
        self.prefill_chunk = int(prefill_chunk)
        self._rows = []  # chunked prompts: the row counts of the compiled steps, ascending (empty: prefills)
        self._session = None
        self._waiting = collections.deque()
        self._running = {}
        self._lock = threading.Condition()
        self._thread, self._stopping = None, False
        self.ready = False
        self.dispatch = deliver_each
        self._outbox = []  # (on_event, Event) of the current step, handed to `dispatch` together
        self._stats = {'requests_total': dict.fromkeys(FINISH_REASONS, 0), 'prompt_tokens_total': 0,
                       'generation_tokens_total': 0, 'time_to_first_token_seconds_sum': 0.0,
                       'time_to_first_token_seconds_count': 0, 'request_seconds_sum': 0.0,
                       'decode_steps_total': 0, 'prefills_total': 0}
        self._logged = (time.monotonic(), 0, 0)

    # ----- the submitter's side (any thread)

    def start(self):
        """Build the decoding session, compile its steps and start the engine thread. Chunked prompts: the steps of
        every row count compile here. Prefills: those of the buckets up to `batched_prefill` (for 1, 2, 4, ...
        rows); the others on first use."""
        self.model.set_train(False)
        self._session = DecodingSession(self.model, self.slots)
        chunk = min(self.prefill_chunk, self._session.feed_rows, self.context_length)
        if chunk > self.slots:
            self._rows = sorted({self.slots, chunk, *(r for r in (2 ** i for i in range(4, chunk.bit_length()))
                                                      if self.slots < r < chunk)})
            self._session.open(list(range(self.slots)))
            for rows in self._rows:  # each slot gets at most ceil(rows / slots) <= chunk <= context positions
                self._session.feed(sorted(i % self.slots for i in range(rows)), np.zeros(rows, np.int32), rows)
                self._session.open(list(range(self.slots)))
        for bucket in PREFILL_BUCKETS:
            if self._rows or bucket > min(self.batched_prefill, self.context_length - 1):
                break
            for rows in (1, *self._group_rows):
                self._session.prefill(list(range(rows)), np.zeros((rows, bucket), np.int32), bucket=bucket)
                self._group_shapes.add((rows, bucket))
        self._session.free(list(range(self.slots)))
        self._thread = threading.Thread(target=self._loop, name='mindformers-engine', daemon=True)
        self._thread.start()
        self.ready = True
        return self

    def shutdown(self):
        """Stop the engine thread; running and waiting requests end with finish_reason 'error'."""
        with self._lock:
            self._stopping = True
            self._lock.notify_all()
        if self._thread is not None:
            self._thread.join()
        self.ready = False

    def submit(self, prompt_ids, params, on_event: Callable[[Event], None]):
        """Queue a request continuing `prompt_ids` (token ids). Raises RequestError when it cannot fit the context
        or has ids outside the vocabulary, Overloaded when the waiting queue is full."""
        params.validate()
        prompt = [int(t) for t in prompt_ids]
        if not prompt:
            raise RequestError("the prompt encodes to no tokens; give at least one token of text", 'prompt')
        bad = [t for t in prompt if not 0 <= t < self.vocab_size]
        if bad:
            raise RequestError(f"the prompt has token id {bad[0]}, outside the model's vocabulary "
                               f"[0, {self.vocab_size})", 'prompt')
        if len(prompt) >= self.context_length:
            raise RequestError(f"the prompt has {len(prompt)} tokens; this model's context is {self.context_length} "
                               f"tokens, so at most {self.context_length - 1} leave room to generate", 'prompt',
                               'context_length_exceeded')
        if len(prompt) + params.max_tokens > self.context_length:
            raise RequestError(f"max_tokens={params.max_tokens} after a prompt of {len(prompt)} tokens exceeds this "
                               f"model's context of {self.context_length} tokens; use at most max_tokens="
                               f"{self.context_length - len(prompt)}", 'max_tokens', 'context_length_exceeded')
        if not self.ready:
            raise Overloaded("the model is still loading")
        request = _Request(prompt, params, on_event, time.monotonic() + self.timeout)
        with self._lock:
            free = self.slots - len(self._running)
            if len(self._waiting) >= self.max_waiting + max(free, 0):
                raise Overloaded(f"all {self.slots} slots are busy and {len(self._waiting)} requests are waiting "
                                 f"(the server's limit); retry later")
            self._waiting.append(request)
            self._lock.notify_all()
        return Handle(request, self)

    def stats(self):
        """Counters since start (Prometheus-style totals) and the current running / waiting / slots."""
        with self._lock:
            stats = {**self._stats, 'requests_total': dict(self._stats['requests_total'])}
            stats.update(running=len(self._running), waiting=len(self._waiting), slots=self.slots)
        return stats

    def _cancel(self, request):
        """A waiting request leaves the queue now; a running one leaves its slot at the engine's next step."""
        with self._lock:
            request.cancelled = True
            if request in self._waiting:
                self._finish(request, 'cancelled')
            self._lock.notify_all()

    # ----- the engine thread

    def _loop(self):
        while True:
            with self._lock:
                while not (self._stopping or self._waiting or self._running):
                    self._lock.wait()
                if self._stopping:
                    break
                self._drop_ended()
                admit = []
                while self._waiting and len(self._running) + len(admit) < self.slots:
                    admit.append(self._waiting.popleft())
                for request in admit:
                    self._running[self._free_slot()] = request
            if self._rows:
                self._open(admit)
            else:
                for group in self._admission_groups(admit):
                    self._guard(self._prefill, *group)
            self._flush()
            if any(r.slot is not None for r in self._running.values()):
                self._guard(self._step)
            self._flush()
            self._log_progress()
        with self._lock:
            for request in [*self._waiting, *self._running.values()]:
                self._finish(request, 'error', "the server is shutting down")
        self._flush()

    def _flush(self):
        """Hand the events gathered since the last flush to `dispatch` (engine thread)."""
        if self._outbox:
            batch, self._outbox = self._outbox, []
            self.dispatch(batch)

    def _free_slot(self):
        taken = set(self._running)
        return next(s for s in range(self.slots) if s not in taken)

    def _drop_ended(self):
        """Under the lock: free cancelled requests and end those past their deadline."""
        now = time.monotonic()
        for request in [*self._waiting, *self._running.values()]:
            if request.cancelled:
                self._finish(request, 'cancelled')
            elif now > request.deadline:
                self._finish(request, 'timeout', f"the request ran longer than the server's time limit of "
                                                 f"{self.timeout:g} s")

    def _guard(self, step, *args):
        """Run `step`; a failure ends the requests it concerned with finish_reason 'error' (the engine goes on)."""
        try:
            step(*args)
        except Exception as error:  # pylint: disable=broad-except
            logger.exception("serving: %s failed", step.__name__.strip('_'))
            with self._lock:
                for request in (args or list(self._running.values())):
                    self._finish(request, 'error', f"generation failed: {type(error).__name__}: {error}")

    def _bucket(self, request):
        """The padded length of `request`'s prefill (its prompt's bucket unless that leaves too little room)."""
        prompt, budget = request.prompt, request.params.max_tokens
        bucket = prefill_bucket(len(prompt), self.context_length)
        if bucket + budget > self.context_length:
            if self._stateful:
                return self.context_length - budget
            return max(b for b in (1, *PREFILL_BUCKETS) if b <= len(prompt))
        return bucket

    def _admission_groups(self, requests):
        """`requests` split into the groups prefilled together: those of one bucket, in as few compiled shapes
        (`batched_prefill`) as fit, largest first; the rest one by one."""
        by_bucket = collections.defaultdict(list)
        for request in requests:
            by_bucket[self._bucket(request)].append(request)
        groups = []
        for bucket, waiting in by_bucket.items():
            while waiting:
                rows = max((r for r in self._group_rows if r <= len(waiting) and (r, bucket) in self._group_shapes),
                           default=1)
                groups.append(waiting[:rows])
                waiting = waiting[rows:]
        return groups

    def _prefill(self, *requests):
        """Start `requests` (of one bucket) in their slots with one prefill; the prompt past the bucket is fed
        through decode steps."""
        slots = {id(r): s for s, r in self._running.items()}
        bucket = self._bucket(requests[0])
        heads = []
        for request in requests:
            heads.append(request.prompt[:bucket])
            request.pending = request.prompt[bucket:]
            self._stats['prompt_tokens_total'] += len(heads[-1])
        ids, mask = left_padded(heads, bucket)
        logits = self._session.prefill([slots[id(r)] for r in requests], ids, mask, bucket=bucket)
        for request in requests:
            request.slot = slots[id(request)]
        self._stats['prefills_total'] += 1
        ready = [row for row, request in enumerate(requests) if not request.pending]
        if ready:
            self._emit([requests[row] for row in ready], logits[ready])

    def _open(self, requests):
        """Chunked prompts: start `requests` in their (empty) slots with all of the prompt still to read."""
        slots = {id(r): s for s, r in self._running.items()}
        for request in requests:
            request.slot = slots[id(request)]
            request.pending = list(request.prompt)
        if requests:
            self._session.open([r.slot for r in requests])

    def _step(self):
        """Advance every running request by one token with one compiled step. A request still reading its prompt
        takes a piece of it instead: chunked prompts, as many tokens as the rows left by the decoding requests allow
        (oldest request first); otherwise one token (a decode step over all slots)."""
        active = sorted((r for r in self._running.values() if r.slot is not None), key=lambda r: r.slot)
        if self._rows:
            taken = [(r, 1) for r in active if not r.pending]
            spare = self._rows[-1] - len(taken)
            for request in sorted(active, key=lambda r: r.id):
                if request.pending and spare > 0:
                    taken.append((request, min(spare, len(request.pending))))
                    spare -= taken[-1][1]
            slots = [r.slot for r, count in taken for _ in range(count)]
            tokens = [t for r, count in taken for t in (r.pending[:count] if r.pending else r.tokens[-1:])]
            logits = self._session.feed(slots, tokens, next(rows for rows in self._rows if rows >= len(tokens)))
            last = np.cumsum([count for _, count in taken]) - 1  # each request's last row
        else:
            taken = [(r, 1) for r in active]
            tokens = np.zeros(self.slots, np.int32)
            for request in active:
                tokens[request.slot] = request.next_input
            logits = self._session.decode(tokens)
            last = [r.slot for r in active]
        self._stats['decode_steps_total'] += 1
        ready, rows = [], []
        for (request, count), row in zip(taken, last):
            if request.pending:
                del request.pending[:count]
                self._stats['prompt_tokens_total'] += count
                if request.pending:
                    continue
            ready.append(request)
            rows.append(row)
        if ready:
            self._emit(ready, logits[rows])

    def _emit(self, requests, logits):
        """Pick each request's next token from its row of `logits` [len(requests), vocab], update its text and
        tell the submitters (all of this step's events together, after every pick)."""
        tokens = self._pick(requests, logits)
        now = time.monotonic()
        events, finished = [], []
        for request, token in zip(requests, tokens):
            request.tokens.append(token)
            if len(request.tokens) == 1:
                self._stats['time_to_first_token_seconds_sum'] += now - request.submitted
                self._stats['time_to_first_token_seconds_count'] += 1
            finish = None
            if token in self.eos_token_ids:
                finish = 'stop'
            else:
                request.detokenize(self.tokenizer)
            cut, hold = _stop_scan(request.text, request.params.stop, request.sent)
            if cut is not None:
                request.text, finish = request.text[:cut], 'stop'
            elif finish is None and len(request.tokens) >= request.params.max_tokens:
                finish = 'length'
            if finish is not None:
                finished.append((request, finish))
            elif not request.text.endswith('\ufffd'):  # else an incomplete multi-byte character: wait for the rest
                ready = len(request.text) - hold
                if ready > request.sent:
                    piece, request.sent = request.text[request.sent:ready], ready
                    events.append((request, Event(piece, None, len(request.prompt), len(request.tokens))))
        self._stats['generation_tokens_total'] += len(requests)
        self._outbox += [(request.on_event, event) for request, event in events]
        if finished:
            with self._lock:
                for request, finish in finished:
                    self._finish(request, finish)

    def _pick(self, requests, logits):
        """The next token of each of `requests` from `logits` [len(requests), vocab] (a copy this may change):
        greedy rows in one argmax, sampled rows warped together per (temperature, top_k, top_p) and drawn each
        with its own generator."""
        scores = logits[:, :self.decodable]
        if scores.dtype != np.float32:
            scores = scores.astype(np.float32)
        for row, request in enumerate(requests):
            params = request.params
            if params.repetition_penalty != 1.0:
                seen = np.asarray([request.prompt + request.tokens], np.int64)
                scores[row:row + 1] = repetition_penalty(scores[row:row + 1], seen, params.repetition_penalty)
        held = [row for row, r in enumerate(requests) if len(r.tokens) < r.params.min_tokens]
        if held:
            scores[held] = suppress_eos(scores[held], self.eos_token_ids)
        picked = scores.argmax(axis=-1).tolist()
        groups = collections.defaultdict(list)
        for row, request in enumerate(requests):
            params = request.params
            if params.temperature != 0:
                groups[params.temperature, params.top_k, params.top_p].append(row)
        for (temp, k, p), rows in groups.items():
            warped = top_p(top_k(temperature(scores[rows], temp), k), p)
            for index, row in enumerate(rows):
                picked[row] = int(sample(warped[index:index + 1], requests[row].rng)[0])
        return picked

    def _finish(self, request, reason, message=''):
        """Under the lock: take `request` out of the queue or its slot, count it and send its last event (none
        when cancelled: nobody listens)."""
        slot = next((s for s, r in self._running.items() if r is request), None)
        if slot is not None:
            del self._running[slot]
            self._session.free([slot])
        elif request in self._waiting:
            self._waiting.remove(request)
        else:
            return  # already finished
        request.slot = None
        self._stats['requests_total'][reason] += 1
        self._stats['request_seconds_sum'] += time.monotonic() - request.submitted
        if reason != 'cancelled':
            text = request.text[request.sent:] if reason in ('stop', 'length') else ''
            request.sent = len(request.text)
            self._outbox.append((request.on_event, Event(text, reason, len(request.prompt), len(request.tokens),
                                                         message)))

    def _log_progress(self):
        now = time.monotonic()
        last, prompt_before, generated_before = self._logged
        if now - last < self.log_interval:
            return
        prompt, generated = self._stats['prompt_tokens_total'], self._stats['generation_tokens_total']
        logger.info("serving: %d running, %d waiting; prompt %.1f tokens/s, generation %.1f tokens/s",
                    len(self._running), len(self._waiting), (prompt - prompt_before) / (now - last),
                    (generated - generated_before) / (now - last))
        self._logged = (now, prompt, generated)


def deliver_each(batch):
    """The default `Engine.dispatch`: call each on_event with its Event, in order."""
    for on_event, event in batch:
        on_event(event)


def _stop_scan(text, stops, start):
    """(index where the first stop string begins in `text` at or after `start`, or None; how many characters at
    the end of `text` to hold back because they may begin a stop string)."""
    if not stops:
        return None, 0
    found = [i for i in (text.find(s, max(0, start - len(s) + 1)) for s in stops) if i >= 0]
    if found:
        return min(found), 0
    hold = 0
    for stop in stops:
        for size in range(min(len(stop) - 1, len(text)), hold, -1):
            if text.endswith(stop[:size]):
                hold = size
                break
    return None, hold
