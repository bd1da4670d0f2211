"""Peak memory of loading a save_pretrained directory, run in a fresh process:

    python tests/helpers/load_memory.py <model dir> stream|whole [param_init_type]
    python tests/helpers/load_memory.py <weights dir> trainer '<model_config fields as JSON>'

`stream`: `AutoModel.from_pretrained(dir)` (built without initialising, shard by shard, one tensor at a time).
`whole`: what loading did before: the model built with initialised weights and every tensor of the checkpoint read
into one dict, then loaded. `trainer`: the Trainer's network for LLaMA's tiny run YAML with those fields and
`quantization: int8`, built for `load_checkpoint: <weights dir>` (as `run_mindformer.py --run_mode predict` does). Prints one JSON line: {"before": RSS in bytes once MindSpore's runtime is up (the peak
is reset there), "peak": peak RSS after loading, "seconds": load time, "parameter_bytes"}."""
import json
import os
import resource
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
sys.path.insert(1, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/, for helpers


def peak_bytes():
    """This process's peak resident set size: /proc's VmHWM (ru_maxrss would do, but Linux carries it over from
    the parent across fork and exec, so a child of a large pytest process would report the parent's peak)."""
    with open('/proc/self/status', encoding='ascii') as f:
        for line in f:
            if line.startswith('VmHWM:'):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def reset_peak():
    """Start the peak over from the current RSS (Linux >= 4.0), so only what follows is measured."""
    try:
        with open('/proc/self/clear_refs', 'w', encoding='ascii') as f:
            f.write('5')
    except OSError:
        pass


def trainer_load(directory, fields):
    """(before, the Trainer's int8 network loaded from `directory`); see the module doc."""
    from mindformers import Trainer
    from mindformers.quantization import Int8Linear
    from mindformers.tools.register import MindFormerConfig
    from helpers.tiny import tiny_yaml
    config = MindFormerConfig(tiny_yaml('llama'))
    config.model.model_config.merge_from_dict({**json.loads(fields), 'quantization': 'int8'})
    trainer = Trainer(args=config)
    trainer._setup(compile_cache=False)  # pylint: disable=protected-access
    reset_peak()
    before = peak_bytes()
    network = trainer._network_with_weights(directory)  # pylint: disable=protected-access
    return before, network, sum(isinstance(cell, Int8Linear) for _, cell in network.cells_and_names())


def main(directory, mode, param_init_type=None):
    import numpy as np
    import mindspore as ms
    from mindformers import AutoConfig, AutoModel
    from mindformers.tools.weights import load_weights, open_weights
    if mode == 'trainer':
        start = time.perf_counter()
        before, model, int8_layers = trainer_load(directory, param_init_type)
        print(json.dumps({'before': before, 'peak': peak_bytes(), 'seconds': time.perf_counter() - start,
                          'int8_layers': int8_layers,
                          'parameter_bytes': sum(p.size * p.itemsize for p in model.get_parameters())}))
        return
    ms.set_context(mode=0)
    ms.Tensor(np.ones(4, np.float32)).sum().asnumpy()  # start MindSpore's runtime
    overrides = {'param_init_type': param_init_type} if param_init_type else {}
    config = AutoConfig.from_pretrained(directory, **overrides)
    reset_peak()
    before, start = peak_bytes(), time.perf_counter()
    if mode == 'stream':
        model = AutoModel.from_pretrained(directory, **overrides)
    else:
        model = AutoModel.from_config(config)
        source = open_weights(directory)
        weights = {name: source.read(name) for name in source.names()}
        load_weights(model, weights.items(), directory)
    seconds = time.perf_counter() - start
    params = sum(p.size * p.itemsize for p in model.get_parameters())
    print(json.dumps({'before': before, 'peak': peak_bytes(), 'seconds': seconds, 'parameter_bytes': params}))


if __name__ == '__main__':
    main(*sys.argv[1:4])
