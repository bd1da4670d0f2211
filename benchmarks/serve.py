"""Serving throughput and latency: the OpenAI-compatible server (`python -m mindformers.serve`) on loopback against
our own offline `generate()` at batch 8, and the same server with one slot.

The 29.5M-parameter GPT-2 of the other benchmarks (vocab 8192, hidden 512, 8 layers, 8 heads, seq 256, random
weights) with a byte-level BPE trained on the bundled Tiny Shakespeare (it reaches 6655 tokens; ids past it are
never picked), saved once to a cache directory. 32 streamed completion requests, prompts of 16-64 tokens (cut from
the corpus), 64-128 new tokens each (`min_tokens` = `max_tokens`, so every request produces all of them), greedy.
Each server is measured twice:
- **8 concurrent streams**: 8 clients, each sending its next request as soon as its previous one ends, until the
  32 are done: output tokens/s at 8 streams, and the time to first token (TTFT) of requests that arrive while the
  other 7 decode;
- **fixed rate**: the 32 requests arriving at a fixed rate, 0.75 x the request rate the 8-stream run sustained:
  request throughput, output tokens/s, TTFT and time per output token after the first (TPOT), p50 and p99.
Offline: `generate()` over the same prompts in batches of 8 (left-padded), 128 new tokens each.
The clients are light (a plain asyncio connection per request that parses chunks as JSON only until the first text
and for the usage), since they share the machine's cores with the server; each run reports the CPU seconds per
second the server and the clients used (`server_cpu_per_s`, `client_cpu_per_s`).

Bars (issue 18): 8-stream output tokens/s >= 0.8 x offline batch-8 and >= 4 x the 1-slot server; p99 TTFT < 1 s
while 8 streams decode.

    python benchmarks/serve.py [--requests 32] [--rounds 1] [--variants offline,8,1] [--server_flags '...']
                               [--json result.json]
"""
import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _harness import environment, report, run_worker, write_json  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VOCAB, HIDDEN, LAYERS, HEADS, SEQ = 8192, 512, 8, 8, 256
CACHE = os.path.join(os.environ.get('XDG_CACHE_HOME', os.path.expanduser('~/.cache')), 'mindformers-bench',
                     'gpt2_29m_serve')


def build_model_dir(path=CACHE):
    """The benchmark model and tokenizer, saved with save_pretrained (built once)."""
    if os.path.isfile(os.path.join(path, 'done')):
        return path
    sys.path.insert(0, REPO)
    import mindspore as ms
    from mindformers import GPT2Config, GPT2LMHeadModel, GPT2Tokenizer
    from mindformers.models.bpe_training import save_gpt2_files, train_byte_level_bpe
    os.makedirs(path, exist_ok=True)
    corpus = os.path.join(REPO, 'mindformers', 'assets', 'corpus', 'tiny_shakespeare.txt')
    vocab, merges = save_gpt2_files(train_byte_level_bpe([corpus], VOCAB, 2), path)
    tokenizer = GPT2Tokenizer(vocab, merges)
    ms.set_seed(0)
    eos = tokenizer.eos_token_id
    config = GPT2Config(vocab_size=VOCAB, hidden_size=HIDDEN, num_layers=LAYERS, num_heads=HEADS, seq_length=SEQ,
                        eos_token_id=eos, pad_token_id=eos, bos_token_id=eos)
    GPT2LMHeadModel(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    open(os.path.join(path, 'done'), 'w').close()
    return path


def workload(count, seed=0):
    """`count` requests: (prompt text, prompt tokens, new tokens), prompts cut from the corpus at token bounds."""
    import numpy as np
    sys.path.insert(0, REPO)
    from mindformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(CACHE)
    with open(os.path.join(REPO, 'mindformers', 'assets', 'corpus', 'tiny_shakespeare.txt'), encoding='utf-8') as f:
        ids = tokenizer.encode(f.read(200_000), add_special_tokens=False)
    added = len(tokenizer.build_prompt_inputs([]))  # the BOS a prompt gets
    rng = np.random.default_rng(seed)
    requests = []
    while len(requests) < count:
        length, start = int(rng.integers(16, 65)), int(rng.integers(0, len(ids) - 100))
        text = tokenizer.decode(ids[start:start + length - added])
        if len(tokenizer.encode_prompt(text)) == length:  # the cut re-encodes to the same tokens
            requests.append((text, length, int(rng.integers(64, 129))))
    return requests


def offline_worker(count):
    """Our generate() at batch 8 over the same prompts (left-padded), 128 new tokens each; tokens/s of the calls
    after the first (compilation)."""
    sys.path.insert(0, REPO)
    import mindspore as ms
    from mindformers import AutoModel, AutoTokenizer
    ms.set_context(mode=0)
    model, tokenizer = AutoModel.from_pretrained(CACHE), AutoTokenizer.from_pretrained(CACHE)
    model.set_train(False)
    prompts = [tokenizer.encode_prompt(text) for text, _, _ in workload(count)]
    batches = [prompts[i:i + 8] for i in range(0, len(prompts), 8)]
    run = lambda batch: model.generate(batch, max_new_tokens=128, min_new_tokens=128, do_sample=False,  # noqa: E731
                                       use_past=True)
    run(batches[0])
    start = time.perf_counter()
    for batch in batches:
        run(batch)
    report({'tokens_per_s': 128 * len(prompts) / (time.perf_counter() - start)})


def free_port():
    with socket.socket() as sock:
        sock.bind(('127.0.0.1', 0))
        return sock.getsockname()[1]


async def stream_one(port, text, new_tokens, sent_at):
    """One streamed completion over a plain asyncio connection, as a light client reads it: the chunks are only
    parsed as JSON until the first text arrives and for the usage; returns (send time, first-token time, end time,
    completion tokens)."""
    await asyncio.sleep(max(0.0, sent_at - time.perf_counter()))
    body = json.dumps({'model': 'bench', 'prompt': text, 'max_tokens': new_tokens, 'min_tokens': new_tokens,
                       'temperature': 0, 'stream': True, 'stream_options': {'include_usage': True}}).encode()
    start, first, usage = time.perf_counter(), None, None
    reader, writer = await asyncio.open_connection('127.0.0.1', port)
    try:
        writer.write(b'POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n'
                     b'Connection: close\r\nContent-Length: %d\r\n\r\n%s' % (len(body), body))
        head = (await reader.readuntil(b'\r\n\r\n')).decode('latin-1')
        if not head.startswith('HTTP/1.1 200') or 'transfer-encoding: chunked' not in head.lower():
            raise RuntimeError(f"unexpected answer: {head!r}")
        while True:
            size = int((await reader.readuntil(b'\r\n')).split(b';')[0], 16)
            data = await reader.readexactly(size + 2)
            if size == 0:
                break
            if first is None or b'"usage": {' in data:
                for line in data.decode().split('\n'):
                    if not line.startswith('data: {'):
                        continue
                    chunk = json.loads(line[6:])
                    if chunk.get('usage'):
                        usage = chunk['usage']
                    elif first is None and chunk['choices'] and chunk['choices'][0].get('text'):
                        first = time.perf_counter()
    finally:
        writer.close()
    return start, first, time.perf_counter(), usage['completion_tokens']


async def drive(port, requests, rate=None, streams=8):
    """Replay `requests`: at `rate` requests/s, or (rate None) by `streams` clients one request after another."""
    # compile every prompt bucket and the decode step before timing
    await asyncio.gather(*(stream_one(port, text, 4, 0) for text, _, _ in requests[:8]))
    begin = time.perf_counter()
    if rate is not None:
        return await asyncio.gather(*(stream_one(port, text, new, begin + i / rate)
                                      for i, (text, _, new) in enumerate(requests)))
    queue, results = list(requests), []

    async def client_loop():
        while queue:
            text, _, new = queue.pop(0)
            results.append(await stream_one(port, text, new, 0))
    await asyncio.gather(*(client_loop() for _ in range(streams)))
    return results


def cpu_seconds(pid):
    """User + system CPU seconds of process `pid` so far (Linux /proc)."""
    with open(f'/proc/{pid}/stat', encoding='ascii') as f:
        fields = f.read().rsplit(')', 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf('SC_CLK_TCK')


def measured(port, server, requests, rate=None):
    """figures() of one drive(), with the CPU the server and this client used per second of it."""
    server_cpu, client_cpu, start = cpu_seconds(server.pid), time.process_time(), time.perf_counter()
    result = figures(asyncio.run(drive(port, requests, rate)))
    wall = time.perf_counter() - start
    return {**result, 'server_cpu_per_s': (cpu_seconds(server.pid) - server_cpu) / wall,
            'client_cpu_per_s': (time.process_time() - client_cpu) / wall}


def figures(results):
    begin, end = min(r[0] for r in results), max(r[2] for r in results)
    tokens = sum(r[3] for r in results)
    ttft = [r[1] - r[0] for r in results]
    tpot = [(r[2] - r[1]) / (r[3] - 1) for r in results if r[3] > 1]
    return {'tokens_per_s': tokens / (end - begin), 'requests_per_s': len(results) / (end - begin),
            'ttft_p50_s': percentile(ttft, 50), 'ttft_p99_s': percentile(ttft, 99),
            'tpot_p50_ms': 1e3 * percentile(tpot, 50), 'tpot_p99_ms': 1e3 * percentile(tpot, 99),
            'mean_streams': sum(r[2] - r[1] for r in results) / (end - begin), 'completion_tokens': tokens}


def percentile(values, q):
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q / 100 * (len(values) - 1))))]


def server_worker(count, slots, flags=()):
    """Start the server with `slots` slots (and more `flags`); measure 8 concurrent streams, then a fixed rate (8
    slots only)."""
    port = free_port()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (REPO, os.environ.get('PYTHONPATH')) if p))
    server = subprocess.Popen([sys.executable, '-m', 'mindformers.serve', '--model', CACHE, '--port', str(port),
                               '--slots', str(slots), '--served_model_name', 'bench', '--max_waiting', '64', *flags],
                              cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        import httpx
        deadline = time.time() + 600
        while True:
            if server.poll() is not None:
                sys.exit(f"server exited {server.returncode}:\n{server.stderr.read()[-3000:]}")
            try:
                if httpx.get(f'http://127.0.0.1:{port}/health', timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.time() > deadline:
                sys.exit("server not ready after 600 s")
            time.sleep(0.2)
        requests = workload(count)
        result = {'streams_8': measured(port, server, requests)}
        if slots > 1:
            rate = 0.75 * result['streams_8']['requests_per_s']
            result['fixed_rate'] = {'rate': rate, **measured(port, server, requests, rate)}
    finally:
        server.terminate()
        server.wait()
    report({'tokens_per_s': result['streams_8']['tokens_per_s'], **result})


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--requests', type=int, default=32)
    parser.add_argument('--rounds', type=int, default=1)
    parser.add_argument('--json', default=None)
    parser.add_argument('--worker', default=None)
    parser.add_argument('--slots', type=int, default=8)
    parser.add_argument('--server_flags', default='', help="more flags for the servers, e.g. '--prefill_chunk 0'")
    parser.add_argument('--variants', default='offline,8,1', help='what to run: offline, 8 (slots), 1 (slot)')
    args = parser.parse_args()
    if args.worker == 'offline':
        return offline_worker(args.requests)
    if args.worker == 'server':
        return server_worker(args.requests, args.slots, args.server_flags.split())
    build_model_dir()
    rounds = []
    variants = {'offline': ('offline_batch8', ('offline',)), '8': ('server_8_slots', ('server', '--slots', 8)),
                '1': ('server_1_slot', ('server', '--slots', 1))}
    chosen = args.variants.split(',')
    if not chosen or set(chosen) - set(variants):
        parser.error(f"--variants takes a comma-separated subset of {', '.join(variants)}, got {args.variants!r}")
    for index in range(args.rounds):
        results = {}
        for variant in chosen:
            key, worker = variants[variant]
            results[key] = run_worker(__file__, *worker, '--requests', args.requests,
                                      *(('--server_flags', args.server_flags) if variant != 'offline' else ()))
        rounds.append(results)
        print(f"round {index + 1}/{args.rounds}: " + ', '.join(f"{key} {result['tokens_per_s']:.0f} tokens/s"
                                                               for key, result in results.items()), file=sys.stderr)
    tokens = {key: statistics.median(r[key]['tokens_per_s'] for r in rounds) for key in rounds[0]}
    summary = {'tokens_per_s': tokens}
    if 'server_8_slots' in tokens:
        summary['ttft_p99_s_at_8_streams'] = statistics.median(r['server_8_slots']['streams_8']['ttft_p99_s']
                                                               for r in rounds)
        for key, name in (('offline_batch8', 'vs_offline_batch8'), ('server_1_slot', 'vs_one_slot')):
            if key in tokens:
                summary[name] = tokens['server_8_slots'] / tokens[key]
    write_json(args.json, {'environment': environment(('mindspore', 'fastapi', 'uvicorn', 'httptools', 'uvloop',
                                                       'httpx', 'numpy')),
                           'rounds': rounds, **summary})
    print(json.dumps({**summary, 'last_round': rounds[-1]}, indent=2))
    return 0


if __name__ == '__main__':
    sys.exit(main())
