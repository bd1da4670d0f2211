"""Weight-only int8 inference, model level (issue 19's bars); `benchmarks/int8.py` measures the kernels alone.

Parts (`--parts`, default all):
- `gpt2`: the 29.5M GPT-2 of `generate.py` (vocab 8192, hidden 512, 8 layers, seq 256), random weights, batch 1,
  prompt 32, 128 new tokens, greedy: ours int8 (`quantization: int8`, block32) and fp32 against HuggingFace fp32
  `generate` and HuggingFace with PyTorch's dynamic int8 (`torch.ao.quantization.quantize_dynamic` on its Linear
  layers; GPT-2's Conv1D projections are rewritten as `nn.Linear` first so it has something to quantize, and the tied
  LM head too). Variants interleaved round-robin, each in its own process; medians over `--rounds`.
- `pangu`: PanGu-alpha 2.6B in its published shape (`pangualpha_2_6b`), random weights saved once as an fp16 sharded
  safetensors set (cached under `--cache`), loaded with `quantization: int8` (quantized tensor by tensor as the
  shards load), batch 1, prompt 32, 128 new tokens with the KV cache: seconds per token and peak RSS.
- `llama7b`: LLaMA-2-7B's shape (`llama2_7b`, seq_length 2048), the same way, 32 new tokens; seconds per token next
  to the bound memory bandwidth sets (bytes of weights read per token / the GB/s a 2-thread read of 2 GB reaches
  here).
The large parts' KV cache dtype (`kv_cache_dtype`, recorded with the cache's size): `--kv_cache_dtype`, by default
float32 for pangu and float16 for llama7b (its fp32 cache at 2048 positions is 2 GiB, the fp16 one 1 GiB).

    python benchmarks/int8_models.py [--parts gpt2,pangu,llama7b] [--rounds 3] [--kv_cache_dtype float16]
        [--json int8_models.json]
"""
import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _harness import environment, medians, peak_rss_mb, report, run_worker, write_json  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CACHE = os.path.expanduser('~/.cache/mindformers-bench')
GPT2_VARIANTS = ('ours_int8', 'ours_fp32', 'torch_fp32', 'torch_dynamic_int8')
LARGE = {'pangu': ('pangualpha_2_6b', {}, 128), 'llama7b': ('llama2_7b', {'seq_length': 2048}, 32)}
KV_CACHE_DTYPES = {'pangu': 'float32', 'llama7b': 'float16'}  # the large parts' defaults (--kv_cache_dtype)
PROMPT = 32
SETTINGS = {'scheme': 'block32', 'embeddings': False}  # the large parts' quantization_config (--scheme, --embeddings)


def _gpt2(name, calls):
    import generate as g  # the 29.5M GPT-2 of benchmarks/generate.py
    if name.startswith('ours'):
        call = g.generate_mindformers(1, quantization='int8' if name == 'ours_int8' else None)
    else:
        call = g.generate_torch(1, 'float32', _dynamic_int8 if name == 'torch_dynamic_int8' else None)
    start = time.perf_counter()
    call()
    first = time.perf_counter() - start
    times = []
    for _ in range(calls):
        t = time.perf_counter()
        call()
        times.append(time.perf_counter() - t)
    report({'tokens_per_s': g.NEW_TOKENS / statistics.median(times), 'first_call_s': first,
            'peak_rss_mb': peak_rss_mb()})


def _dynamic_int8(model):
    """PyTorch's recipe for CPU inference on HF GPT-2: its Conv1D projections and the LM head (untied) as nn.Linear,
    then dynamic int8 Linear layers."""
    import torch
    from transformers.pytorch_utils import Conv1D
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, Conv1D):
                layer = torch.nn.Linear(child.weight.shape[0], child.weight.shape[1])
                layer.weight.data = child.weight.data.t().contiguous()
                layer.bias.data = child.bias.data.clone()
                setattr(module, child_name, layer)
    model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())
    torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8, inplace=True)


def _random_checkpoint(name, overrides):
    """Directory of random fp16 weights in `name`'s published shape (our format, 2 GB shards), made once."""
    sys.path.insert(0, REPO)
    from load_weights import write_random_checkpoint  # benchmarks/load_weights.py
    from mindformers import AutoConfig
    directory = os.path.join(CACHE, f'{name}_random_fp16')
    if not os.path.isfile(os.path.join(directory, 'config.json')):
        print(f"writing random fp16 weights of {name} to {directory}", file=sys.stderr)
        config = AutoConfig.from_pretrained(name, checkpoint_name_or_path='', **overrides)
        write_random_checkpoint(directory, config, '2GB', dtype='float16')
    return directory


def _read_bandwidth_gbs(megabytes=2048):
    """GB/s of summing `megabytes` of fp32 with PyTorch's 2 threads (best of 3): what a decode step can read."""
    import torch
    torch.set_num_threads(os.cpu_count())
    data = torch.ones(megabytes * (1 << 20) // 4)
    best = float('inf')
    for _ in range(3):
        t = time.perf_counter()
        data.sum()
        best = min(best, time.perf_counter() - t)
    return data.numel() * 4 / best / 1e9


def _large(part, kv_cache_dtype):
    import numpy as np
    import mindspore as ms
    name, overrides, new_tokens = LARGE[part]
    directory = _random_checkpoint(name, overrides)
    from mindformers import AutoModel
    ms.set_context(mode=0)
    ms.set_device('CPU')
    start = time.perf_counter()
    model = AutoModel.from_pretrained(directory, quantization='int8', use_past=True, kv_cache_dtype=kv_cache_dtype,
                                      quantization_config={'scheme': SETTINGS['scheme'],
                                                           'embeddings': SETTINGS['embeddings']}, **overrides)
    model.set_train(False)
    load_s = time.perf_counter() - start
    rss_loaded = peak_rss_mb()
    weight_bytes = sum(int(np.prod(p.shape)) * p.itemsize for p in model.get_parameters())
    prompt = np.random.default_rng(0).integers(10, 1000, size=(1, PROMPT)).tolist()
    short = dict(max_new_tokens=1, min_new_tokens=1, do_sample=False, use_past=True)
    t = time.perf_counter()
    model.generate(prompt, **dict(short, max_new_tokens=2, min_new_tokens=2))  # compiles prefill and decode
    first_s = time.perf_counter() - t
    t = time.perf_counter()
    model.generate(prompt, **short)
    prefill_s = time.perf_counter() - t
    t = time.perf_counter()
    model.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, use_past=True)
    total_s = time.perf_counter() - t
    from mindformers.generation.session import session_for
    figures = {'kv_cache_dtype': kv_cache_dtype, 'kv_cache_mb': session_for(model, 1).cache.nbytes() / 2 ** 20,
               'tokens_per_s': new_tokens / total_s, 'load_s': load_s, 'first_call_s': first_s,
               'prefill_s': prefill_s, 's_per_token': total_s / new_tokens,
               'decode_s_per_token': (total_s - prefill_s) / (new_tokens - 1), 'weight_mb': weight_bytes / 2 ** 20,
               'rss_after_load_mb': rss_loaded, 'peak_rss_mb': peak_rss_mb()}
    report(figures)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--parts', default='gpt2,pangu,llama7b')
    parser.add_argument('--rounds', type=int, default=3)
    parser.add_argument('--calls', type=int, default=3, help='timed generate calls per GPT-2 process after the first')
    parser.add_argument('--cache', default=os.path.expanduser('~/.cache/mindformers-bench'), help='where the random large checkpoints are kept')
    parser.add_argument('--scheme', choices=('block32', 'channel'), default='block32', help='large parts')
    parser.add_argument('--embeddings', action='store_true', help='large parts: the embedding tables int8 too')
    parser.add_argument('--kv_cache_dtype', choices=('float32', 'float16'),
                        help='large parts: the KV cache dtype (default: float32 for pangu, float16 for llama7b)')
    parser.add_argument('--json', help='write the figures here')
    parser.add_argument('--worker', help=argparse.SUPPRESS)
    args = parser.parse_args()
    global CACHE
    CACHE = args.cache
    if args.worker in GPT2_VARIANTS:
        _gpt2(args.worker, args.calls)
        return
    SETTINGS.update(scheme=args.scheme, embeddings=args.embeddings)
    if args.worker in LARGE:
        _large(args.worker, args.kv_cache_dtype or KV_CACHE_DTYPES[args.worker])
        return
    if args.worker == 'bandwidth':  # its own process: the 2 GB buffer and torch stay out of the 7B worker's RSS
        report({'read_gb_per_s': _read_bandwidth_gbs()})
        return
    parts = args.parts.split(',')
    figures = {'environment': environment()}
    script = os.path.abspath(__file__)
    if 'gpt2' in parts:
        runs = {name: [] for name in GPT2_VARIANTS}
        for round_index in range(args.rounds):
            for name in GPT2_VARIANTS:
                runs[name].append(run_worker(script, name, '--calls', args.calls, '--cache', CACHE))
                print(f"round {round_index + 1}/{args.rounds} {name}: {runs[name][-1]['tokens_per_s']:.0f} tokens/s",
                      file=sys.stderr)
        gpt2 = medians(runs)
        gpt2['int8_vs_hf_fp32'] = gpt2['ours_int8']['tokens_per_s'] / gpt2['torch_fp32']['tokens_per_s']
        gpt2['int8_vs_torch_dynamic_int8'] = (gpt2['ours_int8']['tokens_per_s']
                                              / gpt2['torch_dynamic_int8']['tokens_per_s'])
        gpt2['int8_vs_ours_fp32'] = gpt2['ours_int8']['tokens_per_s'] / gpt2['ours_fp32']['tokens_per_s']
        figures['gpt2'] = gpt2
        print(f"GPT-2 29.5M batch 1: int8 / HF fp32 {gpt2['int8_vs_hf_fp32']:.2f} (bar 2.0), int8 / torch dynamic "
              f"int8 {gpt2['int8_vs_torch_dynamic_int8']:.2f} (bar > 1), int8 / our fp32 "
              f"{gpt2['int8_vs_ours_fp32']:.2f}")
    for part in ('pangu', 'llama7b'):
        if part in parts:
            figures[part] = run_worker(script, part, '--cache', CACHE, '--scheme', args.scheme,
                                       '--kv_cache_dtype', args.kv_cache_dtype or KV_CACHE_DTYPES[part],
                                       *(['--embeddings'] if args.embeddings else []))
            figures[part]['quantization_config'] = dict(SETTINGS)
            if part == 'llama7b':
                bandwidth = run_worker(script, 'bandwidth')['read_gb_per_s']
                figures[part]['read_gb_per_s'] = bandwidth
                figures[part]['bandwidth_bound_s_per_token'] = figures[part]['weight_mb'] * 2 ** 20 / 1e9 / bandwidth
            row = figures[part]
            print(f"{LARGE[part][0]} int8: {row['s_per_token']:.3f} s/token ({row['decode_s_per_token']:.3f} decode "
                  f"only), peak RSS {row['peak_rss_mb'] / 1024:.2f} GB ({row['kv_cache_dtype']} KV cache "
                  f"{row['kv_cache_mb']:.0f} MB), load {row['load_s']:.0f} s"
                  + (f", bandwidth bound {row['bandwidth_bound_s_per_token']:.3f} s/token at "
                     f"{row['read_gb_per_s']:.1f} GB/s" if 'read_gb_per_s' in row else ''))
    write_json(args.json, figures)


if __name__ == '__main__':
    main()
