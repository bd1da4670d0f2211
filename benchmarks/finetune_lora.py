"""LoRA finetuning throughput: mindformers LoRA against HuggingFace transformers + PEFT + PyTorch, and against our own
full finetune, same machine, one interleaved run.

Two models, seq 256, batch 8, fp32, dropout 0, AdamW (lr 1e-4, betas (0.9, 0.95), eps 1e-8, weight decay 0.1) over
the trainable parameters only, on both sides:
- gpt2: the 29.5M GPT-2 of `train_gpt2.py` (vocab 8192, hidden 512, 8 layers, 8 heads), same data;
- llama: a LLaMA of the same width and depth (SwiGLU 1376, RMSNorm, RoPE, untied head: 33.7M parameters).
LoRA: rank 8, alpha 16, dropout 0, on the query and value projections: LLaMA's q_proj and v_proj on both sides;
GPT-2 computes q, k and v in one fused projection, so there it is that projection (our `qkv_proj`, PEFT's default
GPT-2 target `c_attn`), k included. Ours applies it with `mindformers.pet.apply_pet` and trains through the
Trainer's compiled step (MFTrainOneStepCell, no clipping); PEFT with `get_peft_model`.

Variants per family: `<family>_lora` (ours), `<family>_full` (our full finetune), `<family>_peft`. Each runs in its
own process, round-robin; medians over rounds. Figures per family: `ratio` = our LoRA / PEFT tokens/s, `rss_ratio`
= our LoRA / PEFT peak RSS, `lora_speedup` = our LoRA / our full finetune tokens/s.

    python benchmarks/finetune_lora.py [--rounds 3] [--steps 12] [--json result.json] [--variants gpt2_lora,...]
"""
import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _harness import (environment, interleave, medians, ratio_line, report, round_ratios, step_figures,  # noqa: E402
                      write_json)
from train_gpt2 import (BATCH, HEADS, HIDDEN, LAYERS, SEQ, VOCAB, hf_gpt2, mindformers_context,  # noqa: E402
                        mindformers_gpt2, time_mindformers, time_torch)

LLAMA_FFN, RMS_EPS = 1376, 1e-5
RANK, ALPHA = 8, 16
KINDS = ('lora', 'full', 'peft')


def mindformers_llama():
    from mindformers import LlamaConfig, LlamaForCausalLM
    return LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_layers=LAYERS, num_heads=HEADS,
                                        intermediate_size=LLAMA_FFN, rms_norm_eps=RMS_EPS, seq_length=SEQ))


def hf_llama():
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS,
                                        num_attention_heads=HEADS, intermediate_size=LLAMA_FFN, rms_norm_eps=RMS_EPS,
                                        max_position_embeddings=SEQ, tie_word_embeddings=False))


# family: (our model, HF model, our LoRA targets, PEFT's LoRA targets)
FAMILIES = {'gpt2': (mindformers_gpt2, hf_gpt2, ['qkv_proj'], ['c_attn']),
            'llama': (mindformers_llama, hf_llama, ['q_proj', 'v_proj'], ['q_proj', 'v_proj'])}
WORKERS = [f'{family}_{kind}' for family in FAMILIES for kind in KINDS]


def run(name, steps, warmup):
    """Per-step wall times (s) of variant `name`."""
    family, kind = name.split('_')
    ours, theirs, our_targets, peft_targets = FAMILIES[family]
    if kind == 'peft':
        from peft import LoraConfig, get_peft_model
        config = LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=peft_targets,
                            fan_in_fan_out=family == 'gpt2')  # GPT-2's Conv1D stores weights [in, out]
        return time_torch(get_peft_model(theirs(), config), steps, warmup)
    mindformers_context()
    model = ours()
    if kind == 'lora':
        from mindformers.pet import apply_pet
        apply_pet(model, {'pet_type': 'lora', 'lora_rank': RANK, 'lora_alpha': ALPHA, 'target_modules': our_targets})
    return time_mindformers(model, steps, warmup)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--rounds', type=int, default=3)
    parser.add_argument('--steps', type=int, default=12, help='measured steps per process')
    parser.add_argument('--warmup', type=int, default=2, help='unmeasured steps (the first includes compilation)')
    parser.add_argument('--variants', default=','.join(WORKERS),
                        help=f'comma-separated subset of {",".join(WORKERS)} (ratios need all three of a family)')
    parser.add_argument('--json', help='write the figures here')
    parser.add_argument('--worker', choices=WORKERS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        start = time.perf_counter()
        report(step_figures(run(args.worker, args.steps, args.warmup), args.warmup, BATCH * SEQ, start))
        return
    names = args.variants.split(',')
    unknown = sorted(set(names) - set(WORKERS))
    if unknown:
        parser.error(f"--variants: unknown {', '.join(unknown)}; choose from {', '.join(WORKERS)}")
    runs = interleave(os.path.abspath(__file__), names, args.rounds,
                      lambda name, round_index: ['--steps', args.steps, '--warmup', args.warmup])
    summary = medians(runs)
    figures = {'setup': f'seq {SEQ}, batch {BATCH}, AdamW fp32, dropout 0; LoRA rank {RANK}, alpha {ALPHA} on q/v '
                        f'(GPT-2: the fused qkv_proj / c_attn)', 'rounds': args.rounds, 'steps': args.steps, **summary}
    print(f"{'variant':<14}{'tokens/s':>10}{'first step s':>14}{'peak RSS MB':>13}")
    for name, row in summary.items():
        print(f"{name:<14}{row['tokens_per_s']:>10.0f}{row['first_step_s']:>14.1f}{row['peak_rss_mb']:>13.0f}")
    for family in FAMILIES:
        if not all(f'{family}_{kind}' in summary for kind in KINDS):
            continue
        lora, full, peft = (summary[f'{family}_{kind}'] for kind in KINDS)
        figures[family] = {'ratio': lora['tokens_per_s'] / peft['tokens_per_s'],
                           'rss_ratio': lora['peak_rss_mb'] / peft['peak_rss_mb'],
                           'lora_speedup': lora['tokens_per_s'] / full['tokens_per_s'],
                           'ratio_per_round': round_ratios(runs, f'{family}_lora', f'{family}_peft'),
                           'lora_speedup_per_round': round_ratios(runs, f'{family}_lora', f'{family}_full')}
        print(f"{family}: ratio (our LoRA / PEFT tokens/s) {figures[family]['ratio']:.2f}, rss_ratio "
              f"{figures[family]['rss_ratio']:.2f}, lora_speedup (our LoRA / our full) "
              f"{figures[family]['lora_speedup']:.2f}")
        print(ratio_line(f'{family} ratio', figures[family]['ratio_per_round']))
        print(ratio_line(f'{family} lora_speedup', figures[family]['lora_speedup_per_round']))
    figures['environment'] = environment()
    write_json(args.json, figures)


if __name__ == '__main__':
    main()
