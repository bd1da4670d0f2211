"""Peak memory and time of loading a LLaMA-shaped model from a sharded safetensors set, each load in a fresh process
(tests/helpers/load_memory.py), next to the whole-dict way (every tensor read first, then loaded).

    python benchmarks/load_weights.py --dir /tmp/load_bench [--hidden 2048 --layers 8 --vocab 32000 --shard 500MB]
        [--modes stream,whole,stream:float16] [--keep]

Random weights (normal, std 0.02, fp32) are written tensor by tensor with `save_pretrained`'s writer; the directory
is deleted afterwards unless --keep. Prints one JSON line per load: mode, parameter bytes, largest tensor, peak RSS
growth during the load, load seconds."""
import argparse
import json
import math
import os
import shutil
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def write_model(directory, hidden, layers, vocab, shard):
    import numpy as np
    from mindformers import LlamaConfig, LlamaForCausalLM
    from mindformers.tools.weights import no_weight_init, parameter_specs, save_sharded
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, num_layers=layers, num_heads=max(hidden // 128, 1),
                         seq_length=128)
    with no_weight_init():
        specs = parameter_specs(LlamaForCausalLM(config).get_parameters())
    shapes = {name: shape for name, _, shape in specs}
    rng = np.random.default_rng(0)
    os.makedirs(directory, exist_ok=True)
    save_sharded(directory, specs, lambda name: rng.standard_normal(shapes[name], np.float32) * 0.02,
                 max_shard_size=shard)
    config.save_pretrained(directory)
    sizes = [math.prod(shape) * 4 for shape in shapes.values()]
    return sum(sizes), max(sizes)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--dir', required=True)
    parser.add_argument('--hidden', type=int, default=2048)
    parser.add_argument('--layers', type=int, default=8)
    parser.add_argument('--vocab', type=int, default=32000)
    parser.add_argument('--shard', default='500MB')
    parser.add_argument('--modes', default='stream,whole')
    parser.add_argument('--keep', action='store_true')
    args = parser.parse_args()
    try:
        model_bytes, largest = write_model(args.dir, args.hidden, args.layers, args.vocab, args.shard)
        for mode in args.modes.split(','):
            kind, _, dtype = mode.partition(':')
            out = subprocess.run([sys.executable, os.path.join(REPO, 'tests', 'helpers', 'load_memory.py'),
                                  args.dir, kind] + ([dtype] if dtype else []), capture_output=True, text=True,
                                 check=True, env=dict(os.environ, GLOG_v='3'))
            figures = json.loads(out.stdout.strip().splitlines()[-1])
            print(json.dumps({'mode': mode, 'checkpoint_bytes': model_bytes, 'largest_tensor_bytes': largest,
                              'parameter_bytes': figures['parameter_bytes'],
                              'peak_growth_bytes': figures['peak'] - figures['before'],
                              'peak_rss_bytes': figures['peak'], 'seconds': round(figures['seconds'], 2)}),
                  flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(args.dir, ignore_errors=True)


if __name__ == '__main__':
    main()
