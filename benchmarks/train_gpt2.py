"""Training-step throughput: mindformers GPT-2 vs HuggingFace GPT2LMHeadModel + torch.optim.AdamW, same machine.

The 29.5M-parameter GPT-2 (vocab 8192, hidden 512, 8 layers, 8 heads, seq 256, batch 8, AdamW, fp32, dropout 0).
Each measurement runs in its own process; variants are interleaved round-robin and the median over rounds is
reported, so machine noise hits both sides alike. mindformers runs twice per round: with an empty compile cache
(the first step includes graph compilation) and with a warm one (filled by the first run); `ratio` and
`rss_ratio` use the cold-cache run.

    python benchmarks/train_gpt2.py [--rounds 3] [--steps 12] [--json result.json]
"""
import argparse
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _harness import (environment, interleave, medians, ratio_line, report, round_ratios, step_figures,  # noqa: E402
                      write_json)

VOCAB, HIDDEN, LAYERS, HEADS, SEQ, BATCH = 8192, 512, 8, 8, 256, 8
LR, BETAS, EPS, WEIGHT_DECAY = 1e-4, (0.9, 0.95), 1e-8, 0.1


def batches(steps, seed=0):
    """`steps` int64 arrays [BATCH, SEQ + 1] of random token ids (the same for every variant)."""
    import numpy as np
    rng = np.random.default_rng(seed)
    return [rng.integers(0, VOCAB, size=(BATCH, SEQ + 1), dtype=np.int64) for _ in range(steps)]


def mindformers_context(compile_cache=None):
    """Set up MindSpore (graph mode, CPU, seed 0; `compile_cache`: a compile cache directory) and make this
    repository's `mindformers` the one imported."""
    import mindspore as ms
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    if compile_cache:
        os.environ.update(MS_COMPILER_CACHE_ENABLE='1', MS_COMPILER_CACHE_PATH=compile_cache)
    ms.set_context(mode=0)
    ms.set_device('CPU')
    ms.set_seed(0)


def mindformers_gpt2():
    from mindformers import GPT2Config, GPT2LMHeadModel
    return GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, hidden_size=HIDDEN, num_layers=LAYERS, num_heads=HEADS,
                                      seq_length=SEQ, hidden_dropout_rate=0.0, attention_dropout_rate=0.0,
                                      embedding_dropout_prob=0.0))


def time_mindformers(model, steps, warmup):
    """Per-step wall times (s) of `steps + warmup` steps of the Trainer's compiled step (MFTrainOneStepCell, no
    clipping) with AdamW over `model.trainable_params()`."""
    import mindspore as ms
    from mindformers import AdamWeightDecay, MFTrainOneStepCell
    optimizer = AdamWeightDecay(model.trainable_params(), learning_rate=LR, beta1=BETAS[0], beta2=BETAS[1], eps=EPS,
                                weight_decay=WEIGHT_DECAY)
    step = MFTrainOneStepCell(model, optimizer, use_clip_grad=False)
    step.set_train(True)
    times = []
    for batch in [ms.Tensor(b.astype('int32')) for b in batches(steps + warmup)]:
        start = time.perf_counter()
        loss, _ = step(batch)
        loss.asnumpy()
        times.append(time.perf_counter() - start)
    return times


def hf_gpt2():
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS, n_positions=SEQ,
                                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))


def time_torch(model, steps, warmup):
    """Per-step wall times (s) of `steps + warmup` steps of a HF causal LM (or a PEFT model around one) with
    torch.optim.AdamW over the parameters that require grad."""
    import torch
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR, betas=BETAS, eps=EPS,
                                  weight_decay=WEIGHT_DECAY)
    times = []
    for batch in [torch.from_numpy(b) for b in batches(steps + warmup)]:
        start = time.perf_counter()
        out = model(input_ids=batch[:, :-1], labels=batch[:, :-1])
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        out.loss.item()
        times.append(time.perf_counter() - start)
    return times


def run_mindformers(steps, warmup, compile_cache=None):
    mindformers_context(compile_cache)
    return time_mindformers(mindformers_gpt2(), steps, warmup)


def run_torch(steps, warmup):
    return time_torch(hf_gpt2(), steps, warmup)


WORKERS = {'mindformers': run_mindformers, 'mindformers_cached': run_mindformers, 'torch': run_torch}


def worker(name, steps, warmup, compile_cache=None):
    start = time.perf_counter()
    times = WORKERS[name](steps, warmup, compile_cache) if compile_cache else WORKERS[name](steps, warmup)
    report(step_figures(times, warmup, BATCH * SEQ, start))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--rounds', type=int, default=3)
    parser.add_argument('--steps', type=int, default=12, help='measured steps per process')
    parser.add_argument('--warmup', type=int, default=2, help='unmeasured steps (the first includes compilation)')
    parser.add_argument('--json', help='write the figures here')
    parser.add_argument('--worker', choices=sorted(WORKERS), help=argparse.SUPPRESS)
    parser.add_argument('--compile_cache', help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.steps, args.warmup, args.compile_cache)
        return
    cache_root = tempfile.mkdtemp(prefix='mf-bench-cache-')
    warm_cache = os.path.join(cache_root, 'warm')

    def extra(name, round_index):
        cache = []
        if name == 'mindformers':  # an empty compile cache each time: the cold first step
            cache = ['--compile_cache', os.path.join(cache_root, f'cold{round_index}')]
        elif name == 'mindformers_cached':  # filled by the first cold run of this invocation
            if not os.path.isdir(warm_cache):
                shutil.copytree(os.path.join(cache_root, 'cold0'), warm_cache)
            cache = ['--compile_cache', warm_cache]
        return ['--steps', args.steps, '--warmup', args.warmup, *cache]

    runs = interleave(os.path.abspath(__file__), WORKERS, args.rounds, extra)
    summary = medians(runs)
    shutil.rmtree(cache_root, ignore_errors=True)
    ours, ref = summary['mindformers'], summary['torch']
    figures = {'model': f'GPT-2 vocab {VOCAB}, hidden {HIDDEN}, {LAYERS} layers, {HEADS} heads, seq {SEQ}, '
                        f'batch {BATCH}, AdamW fp32', 'rounds': args.rounds, 'steps': args.steps,
               'mindformers': ours, 'mindformers_cached': summary['mindformers_cached'], 'torch': ref,
               'first_step_s_cold_cache': ours['first_step_s'],
               'first_step_s_warm_cache': summary['mindformers_cached']['first_step_s'],
               'ratio': ours['tokens_per_s'] / ref['tokens_per_s'],
               'ratio_per_round': round_ratios(runs, 'mindformers', 'torch'),
               'rss_ratio': ours['peak_rss_mb'] / ref['peak_rss_mb'], 'environment': environment()}
    print(f"{'variant':<34}{'tokens/s':>10}{'first step s':>14}{'peak RSS MB':>13}")
    for name, label in (('mindformers', 'mindformers, cold compile cache'),
                        ('mindformers_cached', 'mindformers, warm compile cache'), ('torch', 'HF transformers + torch')):
        row = summary[name]
        print(f"{label:<34}{row['tokens_per_s']:>10.0f}{row['first_step_s']:>14.1f}{row['peak_rss_mb']:>13.0f}")
    print(f"ratio (ours / torch tokens/s): {figures['ratio']:.2f}   rss_ratio: {figures['rss_ratio']:.2f}")
    print(ratio_line('ratio', figures['ratio_per_round']))
    write_json(args.json, figures)


if __name__ == '__main__':
    main()
