"""The continuous-batching engine over a tiny GPT-2 (random weights, 64 positions, 4 slots), reading prompts in
chunks beside the decoding requests (the default) and with a prefill per request: requests that arrive at different
times and share the batch give exactly what each gives alone and what `generate()` gives; newcomers start while
others decode; stop strings never leak; cancelled requests free their slot; a full queue, a prompt past the context
and bad sampling values are refused; no shape compiles twice."""
import threading
import time

import numpy as np
import pytest
import mindspore as ms

from mindformers import AutoConfig, AutoModel, AutoTokenizer
from mindformers.serving.engine import Engine, Overloaded, RequestError, SamplingParams, deliver_each

CONTEXT = 64


class Collector:
    """on_event for one request: keeps its events with their arrival times; `wait()` until the last."""

    def __init__(self):
        self.events, self.times, self.done = [], [], threading.Event()

    def __call__(self, event):
        self.events.append(event)
        self.times.append(time.monotonic())
        if event.finish_reason is not None:
            self.done.set()

    def wait(self, timeout=120):
        assert self.done.wait(timeout), f"no last event after {timeout} s: {self.events}"
        return self

    @property
    def text(self):
        return ''.join(e.text for e in self.events)

    @property
    def last(self):
        return self.events[-1]


def started(**options):
    ms.set_seed(11)
    config = AutoConfig.from_pretrained('gpt2_tiny', num_layers=2, hidden_size=64, seq_length=CONTEXT)
    model = AutoModel.from_config(config)
    tokenizer = AutoTokenizer.from_pretrained('gpt2_tiny')
    return Engine(model, tokenizer, slots=4, max_waiting=32, log_interval=0.5, **options).start()


@pytest.fixture(scope='module')
def engine():
    """Chunked prompts (the default): steps of 4, 16, 32 and 64 rows."""
    engine = started()
    assert engine._rows == [4, 16, 32, 64]
    yield engine
    engine.shutdown()


@pytest.fixture(scope='module')
def prefill_engine():
    """A prefill per request (the path of GLM, prefix models and plain ops), batched for prompts up to 16 tokens."""
    engine = started(prefill_chunk=0, batched_prefill=16)
    assert engine._rows == []
    yield engine
    engine.shutdown()


def compiled(engine):
    session = engine._session
    return (len(session._prefill.compile_cache),
            {rows: len(step.compile_cache) for rows, step in session._feed.items()})


def run(engine, prompt, **params):
    """Submit one request (greedy unless `params` say otherwise) and wait for its end; returns its Collector."""
    collector = Collector()
    engine.submit(prompt, SamplingParams(**{'temperature': 0, **params}), collector)
    return collector.wait()


def wait_until(condition, timeout=60):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, 'timed out'
        time.sleep(0.002)


def prompts(count, seed, longest=29):
    rng = np.random.default_rng(seed)
    return [rng.integers(2, 500, int(n)).tolist() for n in rng.integers(3, longest + 1, count)]


@pytest.mark.parametrize('mode', ['chunked', 'prefill'])
def test_sixteen_staggered_requests_give_what_each_gives_alone_and_what_generate_gives(mode, request):
    engine = request.getfixturevalue('engine' if mode == 'chunked' else 'prefill_engine')
    requests = prompts(16, seed=1)
    budgets = [int(n) for n in np.random.default_rng(2).integers(4, 30, 16)]
    alone = [run(engine, p, max_tokens=m) for p, m in zip(requests, budgets)]
    for prompt, budget, result in zip(requests[:4], budgets[:4], alone):  # the library's own generate()
        ids = engine.model.generate([prompt], max_new_tokens=budget, do_sample=False, use_past=True)[0]
        assert result.text == engine.tokenizer.decode(ids[len(prompt):], skip_special_tokens=True)
    shapes = compiled(engine)

    together = [Collector() for _ in requests]
    for index, (prompt, budget) in enumerate(zip(requests, budgets)):
        engine.submit(prompt, SamplingParams(budget, temperature=0), together[index])
        time.sleep(0.01 * (index % 5))  # arrivals spread over the running batch
    for index, collector in enumerate(together):
        collector.wait()
        assert collector.text == alone[index].text, index
        assert (collector.last.finish_reason, collector.last.completion_tokens) == \
               (alone[index].last.finish_reason, alone[index].last.completion_tokens), index
        assert collector.last.prompt_tokens == len(requests[index])
    assert compiled(engine) == shapes
    stats = engine.stats()
    assert stats['running'] == 0 and stats['waiting'] == 0
    assert stats['requests_total']['length'] + stats['requests_total']['stop'] >= 32


def test_requests_waiting_together_start_in_one_prefill_and_give_what_each_gives_alone(prefill_engine):
    """batched_prefill=16: requests of bucket 16 admitted together share a prefill in the shapes start() compiled
    (4 rows, then 2, then 1); a longer prompt gets its own; each gives exactly its text alone."""
    engine = prefill_engine
    requests = prompts(6, seed=7, longest=16) + [list(range(2, 22))]
    alone = [run(engine, p, max_tokens=5) for p in requests]
    compiled = len(engine._session._prefill.compile_cache)
    prefills = engine.stats()['prefills_total']
    together = [Collector() for _ in requests]
    with engine._lock:  # the engine thread cannot admit until all have been submitted
        for prompt, collector in zip(requests, together):
            engine.submit(prompt, SamplingParams(5, temperature=0), collector)
    for collector, single in zip(together, alone):
        assert collector.wait().text == single.text and collector.last.finish_reason == single.last.finish_reason
    # 4 slots: four of bucket 16 in one prefill; when they end, the other two in one and the 20 tokens alone
    assert engine.stats()['prefills_total'] - prefills == 3
    assert len(engine._session._prefill.compile_cache) == compiled


def test_a_request_arriving_while_others_decode_starts_and_ends_before_they_finish(engine):
    long_ones = [Collector() for _ in range(3)]
    generated = engine.stats()['generation_tokens_total']
    for collector, prompt in zip(long_ones, prompts(3, seed=3, longest=20)):
        engine.submit(prompt, SamplingParams(40, temperature=0, top_k=0), collector)
    wait_until(lambda: engine.stats()['generation_tokens_total'] >= generated + 15)  # 5 tokens each
    short = Collector()
    engine.submit(prompts(1, seed=4)[0], SamplingParams(3, temperature=0), short)
    short.wait()
    for collector in long_ones:
        collector.wait()
        assert collector.last.completion_tokens == 40
        assert short.times[0] < collector.times[-1] and short.times[-1] < collector.times[-1]


def test_a_prompt_too_long_for_its_bucket_plus_max_tokens_is_split_and_matches_recomputation(prefill_engine):
    """40 prompt tokens (bucket 64) + 20 new tokens do not fit 64 positions padded: 32 are prefilled and 8 go
    through decode steps; the greedy tokens equal full recomputation's."""
    engine = prefill_engine
    prompt = (prompts(1, seed=5, longest=5)[0] * 20)[:40]
    result = run(engine, prompt, max_tokens=20)
    ids = engine.model.generate([prompt], max_new_tokens=20, do_sample=False, use_past=False)[0]
    assert result.text == engine.tokenizer.decode(ids[40:], skip_special_tokens=True)
    assert result.last.completion_tokens == len(ids) - 40


def test_a_long_prompt_is_read_in_chunks_while_the_others_keep_decoding(engine):
    """3 requests decode; a 29-token prompt arrives: steps of at most 16 rows give it the 13 rows the three leave,
    so its prompt takes three steps, each of which also advances the three; no prefill runs, no new shape
    compiles, and every request gives exactly its text alone."""
    engine.prefill_chunk, engine._rows = 16, [4, 16]
    steps, feed = [], engine._session.feed
    try:
        short, long_prompt = prompts(3, seed=14, longest=4), (prompts(1, seed=15, longest=29)[0] * 10)[:29]
        alone = [run(engine, p, max_tokens=20) for p in short] + [run(engine, long_prompt, max_tokens=3)]
        shapes, before = compiled(engine), engine.stats()
        decoding = [Collector() for _ in short]
        for prompt, collector in zip(short, decoding):
            engine.submit(prompt, SamplingParams(20, temperature=0), collector)
        wait_until(lambda: engine.stats()['generation_tokens_total'] >= before['generation_tokens_total'] + 6)
        engine._session.feed = lambda slots, tokens, rows: (steps.append((list(slots), rows)),
                                                            feed(slots, tokens, rows))[1]
        late = Collector()
        engine.submit(long_prompt, SamplingParams(3, temperature=0), late)
        for collector, single in zip(decoding + [late.wait()], alone):
            assert collector.wait().text == single.text
            assert collector.last.completion_tokens == single.last.completion_tokens
        late_slot = next(slot for slots, _ in steps for slot in set(slots) if slots.count(slot) > 1)
        reading = [(sorted(slots.count(s) for s in set(slots)), rows) for slots, rows in steps
                   if slots.count(late_slot) > 1]
        assert reading == [([1, 1, 1, 13], 16), ([1, 1, 1, 13], 16), ([1, 1, 1, 3], 16)]
        assert engine.stats()['prefills_total'] == before['prefills_total'] and compiled(engine) == shapes
    finally:
        del engine._session.feed
        engine.prefill_chunk, engine._rows = 64, [4, 16, 32, 64]


def test_seeded_sampling_is_reproducible_and_equals_generate(engine):
    prompt = prompts(1, seed=6)[0]
    options = dict(temperature=0.8, top_k=20, top_p=0.9, seed=5)
    first, second = run(engine, prompt, max_tokens=12, **options), run(engine, prompt, max_tokens=12, **options)
    assert first.text == second.text
    ids = engine.model.generate([prompt], max_new_tokens=12, do_sample=True, temperature=0.8, top_k=20, top_p=0.9,
                                seed=5)[0]
    assert first.text == engine.tokenizer.decode(ids[len(prompt):], skip_special_tokens=True)
    assert run(engine, prompt, max_tokens=12, **{**options, 'seed': 6}).text != first.text


def test_a_stop_string_split_over_tokens_ends_the_request_and_is_never_emitted(engine):
    prompt = prompts(1, seed=7)[0]
    full = run(engine, prompt, max_tokens=30)
    text = full.text
    # a stop string made of the end of one generated piece (token) and the start of the next
    pieces = [e.text for e in full.events if e.text]
    middle = len(pieces) // 2
    stop = pieces[middle - 1][-2:] + pieces[middle][:2]
    assert len(pieces) >= 4 and len(stop) >= 2
    cut = run(engine, prompt, max_tokens=30, stop=('@@never@@', stop))
    assert cut.last.finish_reason == 'stop' and stop not in cut.text
    assert cut.text == text[:text.find(stop)]
    emitted = ''
    for event in cut.events:  # nothing emitted is ever taken back
        emitted += event.text
        assert text.startswith(emitted)


def test_cancelling_frees_the_slot_and_ends_the_events(engine):
    hogs = [Collector() for _ in range(engine.slots)]
    generated = engine.stats()['generation_tokens_total']
    handles = [engine.submit(p, SamplingParams(50, temperature=0), c)
               for p, c in zip(prompts(engine.slots, seed=8, longest=12), hogs)]
    wait_until(lambda: engine.stats()['generation_tokens_total'] >= generated + 2 * engine.slots)
    assert engine.stats()['running'] == engine.slots
    handles[0].cancel()
    newcomer = Collector()
    engine.submit(prompts(1, seed=9)[0], SamplingParams(2, temperature=0), newcomer)
    newcomer.wait()
    assert newcomer.times[-1] < min(c.wait().times[-1] for c in hogs[1:])  # admitted into the freed slot at once
    assert not hogs[0].done.is_set() and len(hogs[0].events) < 50
    assert engine.stats()['requests_total']['cancelled'] >= 1


def test_refusals_name_the_field(engine):
    with pytest.raises(RequestError, match=f"prompt has {CONTEXT} tokens; this model's context is {CONTEXT}") as info:
        engine.submit([5] * CONTEXT, SamplingParams(1), Collector())
    assert info.value.param == 'prompt'
    with pytest.raises(RequestError, match='use at most max_tokens=44') as info:
        engine.submit([5] * 20, SamplingParams(45), Collector())
    assert info.value.param == 'max_tokens'
    for bad, field in ((dict(max_tokens=0), 'max_tokens'), (dict(max_tokens=2, top_p=0), 'top_p'),
                       (dict(max_tokens=2, temperature=-1), 'temperature'), (dict(max_tokens=2, stop=('',)), 'stop')):
        with pytest.raises(RequestError) as info:
            engine.submit([5, 6], SamplingParams(**bad), Collector())
        assert info.value.param == field
    with pytest.raises(RequestError, match='outside the model'):
        engine.submit([5, 99999], SamplingParams(2), Collector())
    assert run(engine, [5, 6], max_tokens=2).last.completion_tokens == 2  # still serving


def test_a_full_queue_is_refused_at_once_and_timeouts_end_requests(engine):
    hogs = [Collector() for _ in range(engine.slots + engine.max_waiting)]
    handles = [engine.submit([7, 8, 9], SamplingParams(60, temperature=0), c) for c in hogs]
    start = time.monotonic()
    with pytest.raises(Overloaded, match='retry later'):
        engine.submit([7], SamplingParams(2), Collector())
    assert time.monotonic() - start < 0.5
    for handle in handles:
        handle.cancel()
    engine.timeout = 1e-6  # over before the engine looks at it
    try:
        late = Collector()
        engine.submit([7, 8, 9], SamplingParams(60, temperature=0), late)
        late.wait()
    finally:
        engine.timeout = 600.0
    assert (late.last.finish_reason, late.last.completion_tokens) == ('timeout', 0)
    assert "time limit of 1e-06 s" in late.last.message
    assert run(engine, [7, 8, 9], max_tokens=3).last.finish_reason == 'length'


def test_eos_ends_with_stop_unless_min_tokens_holds_it_off(engine):
    prompt = prompts(1, seed=10)[0]
    eos = engine.eos_token_ids
    greedy = engine.model.generate([prompt], max_new_tokens=1, do_sample=False)[0][-1]
    engine.eos_token_ids = [greedy]  # the greedy first token is EOS now
    try:
        ended = run(engine, prompt, max_tokens=8)
        held = run(engine, prompt, max_tokens=8, min_tokens=5)
    finally:
        engine.eos_token_ids = eos
    assert (ended.last.finish_reason, ended.last.completion_tokens, ended.text) == ('stop', 1, '')
    assert held.last.completion_tokens >= 5 and held.last.finish_reason in ('stop', 'length')


def test_a_batched_pick_gives_each_row_what_picking_it_alone_gives(engine):
    """Greedy rows (one with a repetition penalty, one with EOS held off) and sampled rows of two parameter groups
    picked in one call equal the per-row processing generate() does."""
    from mindformers.generation.logits_process import (repetition_penalty, sample, suppress_eos, temperature,
                                                       top_k, top_p)
    from mindformers.serving.engine import _Request
    rng = np.random.default_rng(12)
    kinds = [dict(temperature=0), dict(temperature=0, repetition_penalty=1.3), dict(temperature=0, min_tokens=3),
             dict(temperature=0.7, top_k=30, seed=1), dict(temperature=0.7, top_k=30, seed=2),
             dict(temperature=1.2, top_p=0.8, seed=3, repetition_penalty=0.9), dict(temperature=0)]
    logits = rng.normal(size=(len(kinds), engine.vocab_size)).astype(np.float32)
    logits[2, engine.eos_token_ids] = 100.0  # EOS would win were it not held off
    requests = [_Request([3, 4, 5], SamplingParams(8, **kind), None, 0) for kind in kinds]
    for request in requests:
        request.tokens = [int(t) for t in rng.integers(0, 100, 2)]
    picked = engine._pick(requests, logits.copy())
    for row, kind in enumerate(kinds):
        params, tokens = SamplingParams(8, **kind), requests[row].tokens
        scores = logits[row:row + 1, :engine.decodable].copy()
        scores = repetition_penalty(scores, np.asarray([[3, 4, 5, *tokens]]), params.repetition_penalty)
        if len(tokens) < params.min_tokens:
            scores = suppress_eos(scores, engine.eos_token_ids)
        if params.temperature == 0:
            expected = int(scores[0].argmax())
        else:
            scores = top_p(top_k(temperature(scores, params.temperature), params.top_k), params.top_p)
            expected = int(sample(scores, np.random.default_rng(params.seed))[0])
        assert picked[row] == expected, (row, kind)
    assert picked[2] not in engine.eos_token_ids


@pytest.mark.parametrize('name', ['gpt2_tiny', 'llama_tiny', 'glm2_tiny'])
def test_incremental_detokenization_equals_decoding_every_token(name):
    """Multi-byte characters split over byte-level tokens, SentencePiece pieces whose leading space depends on
    their neighbours, and special tokens in between: after every token the text is the full decode's."""
    from mindformers.serving.engine import _Request
    tokenizer = AutoTokenizer.from_pretrained(name)
    ids = tokenizer.encode("Good morrow, 你好 café — 🙂 friend!\n  Two  spaces", add_special_tokens=False)
    specials = [i for i in tokenizer.all_special_ids if i is not None][:1]
    ids = ids[:5] + specials + ids[5:]
    request = _Request([1], SamplingParams(len(ids)), None, 0)
    for count, token in enumerate(ids, 1):
        request.tokens.append(token)
        request.detokenize(tokenizer)
        assert request.text == tokenizer.decode(ids[:count], skip_special_tokens=True), count
    assert request.text.endswith('spaces')


def test_a_step_dispatches_its_events_together(engine):
    batches = []
    engine.dispatch = lambda batch: (batches.append(len(batch)), deliver_each(batch))
    try:
        collectors = [Collector() for _ in range(engine.slots)]
        for prompt, collector in zip(prompts(engine.slots, seed=13, longest=8), collectors):
            engine.submit(prompt, SamplingParams(12, temperature=0, min_tokens=12), collector)
        for collector in collectors:
            collector.wait()
    finally:
        engine.dispatch = deliver_each
    assert sum(batches) == sum(len(c.events) for c in collectors)
    assert max(batches) == engine.slots  # a decode step of every slot: one dispatch
