"""Greedy generation throughput: mindformers GPT-2 `generate(use_past=True)` vs HuggingFace `generate` with its KV
cache (fp32, and bf16 for reference), same machine, interleaved in one run.

The 29.5M-parameter GPT-2 (vocab 8192, hidden 512, 8 layers, 8 heads, seq 256), random weights, prompt 32 tokens,
128 new tokens (EOS suppressed so every call produces all 128), batch 1 and batch 8. Each variant runs in its own
process; per process the first call (compilation included) is timed apart, then `--calls` more calls are timed and
their median is used. Medians over `--rounds` rounds are reported, and each round's ours / HF ratio.

    python benchmarks/generate.py [--rounds 3] [--calls 3] [--json result.json]
"""
import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _harness import (environment, interleave, medians, peak_rss_mb, ratio_line, report, round_ratios,  # noqa: E402
                      write_json)

VOCAB, HIDDEN, LAYERS, HEADS, SEQ = 8192, 512, 8, 8, 256
PROMPT, NEW_TOKENS = 32, 128
BATCHES = (1, 8)


def _prompts(batch):
    import numpy as np
    return np.random.default_rng(batch).integers(0, VOCAB - 1, size=(batch, PROMPT)).tolist()


def generate_mindformers(batch, **config_fields):
    """Returns a function that runs one generate call; `config_fields` are further GPT2Config fields (e.g.
    quantization='int8')."""
    import mindspore as ms
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from mindformers import GPT2Config, GPT2LMHeadModel
    ms.set_context(mode=0)
    ms.set_device('CPU')
    ms.set_seed(0)
    config = GPT2Config(vocab_size=VOCAB, hidden_size=HIDDEN, num_layers=LAYERS, num_heads=HEADS, seq_length=SEQ,
                        eos_token_id=VOCAB - 1, pad_token_id=VOCAB - 1, use_past=True, **config_fields)
    model = GPT2LMHeadModel(config)
    model.set_train(False)
    prompts = _prompts(batch)
    return lambda: model.generate(prompts, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False,
                                  use_past=True)


def generate_torch(batch, dtype, prepare=None):
    """Returns a function that runs one HF generate call; `prepare(model)` may change the model first."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=VOCAB, n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS, n_positions=SEQ,
                        eos_token_id=VOCAB - 1, pad_token_id=VOCAB - 1, bos_token_id=VOCAB - 1)
    model = GPT2LMHeadModel(config).eval().to(getattr(torch, dtype))
    if prepare is not None:
        prepare(model)
    input_ids = torch.tensor(_prompts(batch))
    attention_mask = torch.ones_like(input_ids)

    def call():
        with torch.no_grad():
            return model.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=NEW_TOKENS,
                                  min_new_tokens=NEW_TOKENS, do_sample=False, use_cache=True)
    return call


def _variants():
    variants = {}
    for batch in BATCHES:
        variants[f'mindformers_b{batch}'] = (batch, lambda b=batch: generate_mindformers(b))
        for dtype in ('float32', 'bfloat16'):
            variants[f'torch_{dtype}_b{batch}'] = (batch, lambda b=batch, d=dtype: generate_torch(b, d))
    return variants


VARIANTS = _variants()


def worker(name, calls):
    import statistics
    batch, build = VARIANTS[name]
    start = time.perf_counter()
    call = build()
    first_start = time.perf_counter()
    output = call()
    first_call = time.perf_counter() - first_start
    if len(output[0]) != PROMPT + NEW_TOKENS:
        sys.exit(f"{name}: expected {PROMPT + NEW_TOKENS} tokens per row, got {len(output[0])}")
    times = []
    for _ in range(calls):
        t = time.perf_counter()
        call()
        times.append(time.perf_counter() - t)
    report({'tokens_per_s': batch * NEW_TOKENS / statistics.median(times), 'first_call_s': first_call,
            'setup_and_first_call_s': first_start - start + first_call, 'peak_rss_mb': peak_rss_mb()})


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--rounds', type=int, default=3)
    parser.add_argument('--calls', type=int, default=3, help='timed generate calls per process after the first')
    parser.add_argument('--json', help='write the figures here')
    parser.add_argument('--worker', choices=sorted(VARIANTS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.calls)
        return
    results = interleave(os.path.abspath(__file__), list(VARIANTS), args.rounds,
                         lambda name, round_index: ['--calls', args.calls])
    summary = medians(results)
    figures = {'model': f'GPT-2 vocab {VOCAB}, hidden {HIDDEN}, {LAYERS} layers, {HEADS} heads, seq {SEQ}; '
                        f'prompt {PROMPT}, {NEW_TOKENS} new tokens, greedy', 'rounds': args.rounds, **summary}
    print(f"{'variant':<24}{'tokens/s':>10}{'first call s':>14}{'peak RSS MB':>13}")
    for name, row in summary.items():
        print(f"{name:<24}{row['tokens_per_s']:>10.1f}{row['first_call_s']:>14.2f}{row['peak_rss_mb']:>13.0f}")
    for batch in BATCHES:
        ours, ref = summary[f'mindformers_b{batch}'], summary[f'torch_float32_b{batch}']
        figures[f'ratio_b{batch}'] = ours['tokens_per_s'] / ref['tokens_per_s']
        figures[f'rss_ratio_b{batch}'] = ours['peak_rss_mb'] / ref['peak_rss_mb']
        figures[f'ratio_b{batch}_per_round'] = round_ratios(results, f'mindformers_b{batch}', f'torch_float32_b{batch}')
        print(f"batch {batch}: ratio (ours / HF fp32 tokens/s) {figures[f'ratio_b{batch}']:.2f}, "
              f"rss_ratio {figures[f'rss_ratio_b{batch}']:.2f}")
        print(ratio_line(f'batch {batch} ratio', figures[f'ratio_b{batch}_per_round']))
    figures['environment'] = environment()
    write_json(args.json, figures)


if __name__ == '__main__':
    main()
