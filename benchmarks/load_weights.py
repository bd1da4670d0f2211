"""Peak memory and time of loading a LLaMA-shaped model from a sharded safetensors set, each load in a fresh process
(tests/helpers/load_memory.py), next to the whole-dict way (every tensor read first, then loaded).

    python benchmarks/load_weights.py --dir /tmp/load_bench [--hidden 2048 --layers 8 --vocab 32000 | --model NAME]
        [--shard 500MB] [--dtype float16] [--modes stream,whole,stream:float16] [--keep]

Random weights (normal, std 0.02; fp32 unless --dtype) are written tensor by tensor with `save_pretrained`'s writer
(`write_random_checkpoint`: also how a 7B-shaped sharded set is made, e.g. `--model llama2_7b --dtype float16
--modes '' --keep`); the directory is deleted afterwards unless --keep. Prints one JSON line per load: mode, parameter bytes, largest tensor, peak RSS
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


def write_random_checkpoint(directory, config, max_shard_size, dtype=None, seed=0):
    """Write random weights (normal, std 0.02) for the model `config` builds as a sharded set in `directory` (plus
    its config.json), one tensor at a time, stored in `dtype` (default: the parameters' own). Returns (bytes
    written, largest tensor bytes)."""
    import numpy as np
    from mindformers import AutoModel
    from mindformers.tools.weights import itemsize, no_weight_init, parameter_specs, save_sharded
    with no_weight_init():
        specs = parameter_specs(AutoModel.from_config(config).get_parameters())
    specs = [(name, dtype or stored, shape) for name, stored, shape in specs]
    shapes = {name: shape for name, _, shape in specs}
    rng = np.random.default_rng(seed)
    os.makedirs(directory, exist_ok=True)
    save_sharded(directory, specs, lambda name: rng.standard_normal(shapes[name], np.float32) * 0.02,
                 max_shard_size=max_shard_size)
    config.save_pretrained(directory)
    sizes = [math.prod(shape) * itemsize(stored) for _, stored, shape in specs]
    return sum(sizes), max(sizes)


def llama_config(hidden, layers, vocab):
    from mindformers import LlamaConfig
    return LlamaConfig(vocab_size=vocab, hidden_size=hidden, num_layers=layers, num_heads=max(hidden // 128, 1),
                       seq_length=128)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--dir', required=True)
    parser.add_argument('--hidden', type=int, default=2048)
    parser.add_argument('--layers', type=int, default=8)
    parser.add_argument('--vocab', type=int, default=32000)
    parser.add_argument('--shard', default='500MB')
    parser.add_argument('--model', help='a registered name (e.g. llama2_7b): its published shape instead of '
                                        '--hidden/--layers/--vocab')
    parser.add_argument('--dtype', choices=('float32', 'float16', 'bfloat16'), help='stored dtype (default fp32)')
    parser.add_argument('--modes', default='stream,whole')
    parser.add_argument('--keep', action='store_true')
    args = parser.parse_args()
    try:
        if args.model:
            from mindformers import AutoConfig
            config = AutoConfig.from_pretrained(args.model)
        else:
            config = llama_config(args.hidden, args.layers, args.vocab)
        model_bytes, largest = write_random_checkpoint(args.dir, config, args.shard, args.dtype)
        for mode in filter(None, args.modes.split(',')):
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
