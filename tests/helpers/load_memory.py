"""Peak memory of loading a save_pretrained directory, run in a fresh process:

    python tests/helpers/load_memory.py <model dir> stream|whole [param_init_type]

`stream`: `AutoModel.from_pretrained(dir)` (built without initialising, shard by shard, one tensor at a time).
`whole`: what loading did before: the model built with initialised weights and every tensor of the checkpoint read
into one dict, then loaded. Prints one JSON line: {"before": peak RSS in bytes once MindSpore's runtime is up,
"peak": peak RSS after loading, "seconds": load time}."""
import json
import os
import resource
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


def peak_bytes():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def main(directory, mode, param_init_type=None):
    import numpy as np
    import mindspore as ms
    from mindformers import AutoConfig, AutoModel
    from mindformers.tools.weights import load_weights, open_weights
    ms.set_context(mode=0)
    ms.Tensor(np.ones(4, np.float32)).sum().asnumpy()  # start MindSpore's runtime
    overrides = {'param_init_type': param_init_type} if param_init_type else {}
    config = AutoConfig.from_pretrained(directory, **overrides)
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
