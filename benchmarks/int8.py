"""Int8 weight-only linear layers, kernel level: y = x W^T for the published models' matrix shapes, our int8 kernel
(`Int8Linear`, mindformers/kernels/int8.cc, `block32` = llama.cpp Q8_0 layout and per-row `channel`) against our
fp32 few-rows kernel, MindSpore's MatMul, torch fp32 `F.linear`, torch's dynamic int8 Linear
(`torch.ao.quantization.quantize_dynamic`: per-tensor int8 weights, activations quantized per call) and, when the
`onednn` wheels can be loaded, oneDNN's int8 matmuls (benchmarks/onednn_int8.cc; see ONEDNN_MODES). `read` is the
bandwidth reference: our library's `Int8ReadBytes` summing the same cold int8 weight copies, split over the cores
by the kernels' thread pool (vector loads widened and added: about the kernel's instruction mix minus the
multiplies). With
`--baseline REV` the variants `int8_block32_base` / `int8_channel_base` run our kernel as it was at git revision REV,
in processes alternating with the current one (an A/B of a kernel change).

Shapes are (in K, out N): GPT-2 768x2304 (qkv), 768x3072, 3072x768, 768x50257 (LM head); LLaMA-7B 4096x4096,
4096x11008, 11008x4096, 4096x32000 (head); PanGu-alpha 2.6B 2560x7680 (qkv), 2560x2560, 2560x10240, 10240x2560,
2560x40000 (head). Rows M = 1 and 16 (decode) and 128 (prefill) by default. Decode runs on cold weights, as in a
model's decode step: each call reads the next of enough copies of the weight to pass through `--cold-mb` MB (beyond
the last-level cache), and the weight bytes read per second are reported (int8 + scales, fp32 4 bytes per weight). Prefill repeats one weight (it is compute-bound) and reports GFLOP/s.
The JSON keeps every round's raw figures (`raw`) besides the medians.

Each variant runs in its own process, variants interleaved round-robin, medians over `--rounds` rounds. Our kernels are
called through ctypes exactly as MindSpore calls an AOT op (no framework overhead); `ms_matmul` and `ms_int8` are
compiled MindSpore cells (one launch each per call, so they include MindSpore's launch overhead).

With `--single-core` every variant runs on one core and is timed by its process's CPU time: on a machine shared
with other work, 2-thread kernels lose whole scheduler slices waiting for a descheduled thread, which wall time
shows and CPU time does not (the kernels' own efficiency, not the machine's scaling).

    python benchmarks/int8.py [--rounds 3] [--shapes gpt2_qkv,llama_up] [--rows 1,16,128] [--single-core]
                              [--variants read,int8_block32] [--baseline b9ac11b] [--json int8.json]
"""
import argparse
import ctypes
import os
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _harness import environment, report, run_worker, write_json  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAPES = {'gpt2_qkv': (768, 2304), 'gpt2_fc': (768, 3072), 'gpt2_proj': (3072, 768), 'gpt2_head': (768, 50257),
          'llama_qkvo': (4096, 4096), 'llama_up': (4096, 11008), 'llama_down': (11008, 4096),
          'llama_head': (4096, 32000), 'pangu_qkv': (2560, 7680), 'pangu_dense': (2560, 2560),
          'pangu_fc': (2560, 10240), 'pangu_proj': (10240, 2560), 'pangu_head': (2560, 40000)}
ROWS = (1, 16, 128)
DECODE_ROWS = 16
VARIANTS = ('read', 'int8_block32', 'int8_channel', 'fp32_fewrows', 'ms_matmul', 'ms_int8', 'torch_fp32',
            'torch_dynamic_int8', 'onednn_wdecomp', 'onednn_u8s8')
BASELINE = ('int8_block32_base', 'int8_channel_base')  # with --baseline REV
BASELINE_DIR = 'INT8_BENCH_BASELINE'  # environment: where the workers find REV's kernel sources
# oneDNN variants (benchmarks/onednn_int8.cc): `wdecomp` = fp32 activations, s8 weights with an fp32 scale per 32
# inputs (oneDNN's weights decompression; with fp16 scales, as block32 stores them, oneDNN 3.13 has only its slow
# reference kernel, so the scales are given widened), `u8s8` = activations already quantized to u8 (the matmul of a
# dynamic-quantization path, quantizing not timed).
ONEDNN_MODES = {'onednn_wdecomp': 'wdecomp:scale_f32', 'onednn_u8s8': 'u8s8'}
# The PyPI `onednn` wheel is a SYCL build: its CPU engine needs the OpenCL CPU runtime of `intel-opencl-rt` (a
# dependency). `pip install --target` drops the wheels' libraries, so extract each wheel's `*.data/data/` into one
# prefix (lib/, include/) and point ONEDNN_ROOT at it.
ONEDNN = os.environ.get('ONEDNN_ROOT', '/tmp/int8k/onednn-prefix')


CLOCK = [time.perf_counter]  # time.process_time with --single-core


def _timed(call, copies, seconds=0.25, least=5):
    """Median time of call(copy index) (wall, or the process's CPU time with --single-core), cycling over `copies`,
    after two warm-up calls."""
    clock = CLOCK[0]
    call(0)
    call(1 % copies)
    times, index, spent = [], 0, 0.0
    while spent < seconds or len(times) < least:
        index = (index + 1) % copies
        t = clock()
        call(index)
        times.append(clock() - t)
        spent += times[-1]
    return statistics.median(times)


def _copies(weight_bytes, cold_mb):
    return max(2, -(-cold_mb * 2 ** 20 // weight_bytes))


class _Kernel:
    """One of our AOT kernels called through ctypes: fixed output, prebuilt argument arrays per weight copy."""

    def __init__(self, library, name, x, weights, n_dim):
        import numpy as np
        self.fn = getattr(ctypes.CDLL(library), name)
        self.y = np.empty((x.shape[0], n_dim), np.float32)
        self.keep, self.args = [], []
        for arrays in weights:
            arrays = [x, *arrays, self.y]
            dims = [(ctypes.c_int64 * a.ndim)(*a.shape) for a in arrays]
            args = (len(arrays), (ctypes.c_void_p * len(arrays))(*[a.ctypes.data for a in arrays]),
                    (ctypes.c_int * len(arrays))(*[a.ndim for a in arrays]),
                    (ctypes.POINTER(ctypes.c_int64) * len(arrays))(
                        *[ctypes.cast(d, ctypes.POINTER(ctypes.c_int64)) for d in dims]), None, None, None)
            self.keep.append((arrays, dims))
            self.args.append(args)

    def __call__(self, index):
        if self.fn(*self.args[index]):
            raise RuntimeError('kernel refused its inputs')


def _weights(name, k_dim, n_dim, cold_mb):
    """(weight copies in the variant's form, bytes of one copy): enough copies to pass through cold_mb MB."""
    import numpy as np
    weight = np.random.default_rng(0).standard_normal((n_dim, k_dim), dtype=np.float32) * 0.02
    if name.startswith('int8_') or name in ('ms_int8', 'read'):
        from mindformers.quantization import quantize
        q, scale = quantize(weight, 'channel' if name.startswith('int8_channel') else 'block32')
        if name == 'read':
            return [q] + [q.copy() for _ in range(_copies(q.nbytes, cold_mb) - 1)], q.nbytes
        size = q.nbytes + scale.nbytes
        return [(q, scale)] + [(q.copy(), scale.copy()) for _ in range(_copies(size, cold_mb) - 1)], size
    if name == 'torch_dynamic_int8':
        import copy
        import torch
        linear = torch.nn.Linear(k_dim, n_dim, bias=False)
        linear.weight.data = torch.from_numpy(weight)
        module = torch.ao.quantization.quantize_dynamic(torch.nn.Sequential(linear), {torch.nn.Linear},
                                                        dtype=torch.qint8)
        del linear, weight
        size = n_dim * k_dim
        return [module] + [copy.deepcopy(module) for _ in range(_copies(size, cold_mb) - 1)], size
    return [weight] + [weight.copy() for _ in range(_copies(weight.nbytes, cold_mb) - 1)], weight.nbytes


def _caller(name, x, weights, n_dim):
    """call(copy index) running variant `name` on x and the index-th weight copy."""
    if name.startswith('int8_') or name == 'fp32_fewrows':
        from mindformers.kernels import build_library
        entry = 'LinearFewRows' if name == 'fp32_fewrows' else 'Int8Linear'
        sources = None
        if name.endswith('_base'):
            sources = [os.path.join(os.environ[BASELINE_DIR], f) for f in ('fused.cc', 'int8.cc')]
        return _Kernel(build_library(sources), entry, x, [w if isinstance(w, tuple) else (w,) for w in weights],
                       n_dim)
    if name == 'read':
        from mindformers.kernels import build_library
        read = ctypes.CDLL(build_library()).Int8ReadBytes
        read.argtypes, read.restype = [ctypes.c_void_p, ctypes.c_int64], ctypes.c_int64
        return lambda i: read(weights[i].ctypes.data, weights[i].nbytes)
    if name in ('ms_int8', 'ms_matmul'):
        import mindspore as ms
        from mindspore import nn, ops
        from mindformers.kernels import FusedInt8Linear
        ms.set_context(mode=0)

        class _MatMul(nn.Cell):
            def __init__(self):
                super().__init__()
                self.matmul = ops.MatMul(transpose_b=True)

            def construct(self, a, b):
                return self.matmul(a, b)
        cell, xt = (FusedInt8Linear('block32') if name == 'ms_int8' else _MatMul()), ms.Tensor(x)
        tensors = [tuple(map(ms.Tensor, w)) if isinstance(w, tuple) else (ms.Tensor(w),) for w in weights]
        return lambda i: cell(xt, *tensors[i]).asnumpy()
    import torch
    torch.set_grad_enabled(False)
    xt = torch.from_numpy(x)
    if name == 'torch_fp32':
        tensors = [torch.from_numpy(w) for w in weights]
        return lambda i: torch.nn.functional.linear(xt, tensors[i])
    if name == 'torch_dynamic_int8':
        return lambda i: weights[i](xt)
    raise ValueError(name)


def _measure(name, k_dim, n_dim, rows, cold_mb):
    """{rows: (seconds per call, weight bytes per call)} of variant `name` on x [rows, k_dim], W [n_dim, k_dim]:
    cold (cycling over the copies) for decode rows, one copy for more."""
    import numpy as np
    sys.path.insert(0, REPO)
    weights, size = _weights(name, k_dim, n_dim, cold_mb)
    figures = {}
    for m in rows:
        if name in ('fp32_fewrows', 'read') and m > DECODE_ROWS or name == 'read' and m > 1:
            continue
        x = np.random.default_rng(m).standard_normal((m, k_dim), dtype=np.float32)
        used = weights if m <= DECODE_ROWS else weights[:1]
        figures[m] = (_timed(_caller(name, x, used, n_dim), len(used)), size)
    return figures


def _onednn(mode, shapes, rows, cold_mb):
    """oneDNN's int8 matmul through benchmarks/onednn_int8.cc, or the reason it cannot run here."""
    include, lib = os.path.join(ONEDNN, 'include'), os.path.join(ONEDNN, 'lib')
    if not os.path.isfile(os.path.join(include, 'dnnl.hpp')):
        return {'error': f'no oneDNN headers under {ONEDNN} (see ONEDNN in benchmarks/int8.py)'}
    binary = os.path.join(ONEDNN, 'onednn_int8')
    source = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'onednn_int8.cc')
    build = subprocess.run(['g++', '-O2', '-std=c++17', source, '-I', include, '-L', lib, '-ldnnl',
                            f'-Wl,-rpath,{lib}', '-o', binary], capture_output=True, text=True)
    if build.returncode:
        return {'error': 'build failed: ' + build.stderr[-500:]}
    env = {**os.environ, 'LD_LIBRARY_PATH': lib, 'OCL_ICD_FILENAMES': os.path.join(lib, 'libintelocl.so'),
           'ONEAPI_DEVICE_SELECTOR': 'opencl:cpu'}
    figures = {}
    for shape in shapes:
        k_dim, n_dim = SHAPES[shape]
        for m in rows:
            run = subprocess.run([binary, str(m), str(k_dim), str(n_dim), str(cold_mb if m <= DECODE_ROWS else 0),
                                  mode, 'cpu' if CLOCK[0] is time.process_time else 'wall'],
                                 capture_output=True, text=True, env=env)
            if run.returncode:
                return {'error': 'run failed: ' + (run.stderr or run.stdout)[-500:]}
            lines = run.stdout.split('\n')
            seconds, size = map(float, lines[1].split())
            figures[f'{shape}/M{m}'] = {'s': seconds, 'bytes': size, 'impl': lines[0]}
    return figures


def _extract_baseline(revision):
    """Write the kernel sources of git `revision` to a scratch directory named in the workers' environment."""
    import tempfile
    target = tempfile.mkdtemp(prefix='int8-baseline-')
    for name in ('fused.cc', 'int8.cc', 'common.h'):
        source = subprocess.run(['git', '-C', REPO, 'show', f'{revision}:mindformers/kernels/{name}'],
                                capture_output=True, text=True, check=True).stdout
        with open(os.path.join(target, name), 'w', encoding='utf-8') as f:
            f.write(source)
    os.environ[BASELINE_DIR] = target


def worker(name, shapes, rows, cold_mb, single_core):
    if single_core:  # before any library starts its threads: every pool sees one CPU
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
        os.environ['OMP_NUM_THREADS'] = '1'
        CLOCK[0] = time.process_time
    if name in ONEDNN_MODES:
        report({'figures': _onednn(ONEDNN_MODES[name], shapes, rows, cold_mb)})
        return
    figures = {}
    for shape in shapes:
        for m, (seconds, size) in _measure(name, *SHAPES[shape], rows, cold_mb).items():
            figures[f'{shape}/M{m}'] = {'s': seconds, 'bytes': size}
    report({'figures': figures})


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--rounds', type=int, default=3)
    parser.add_argument('--shapes', default=','.join(SHAPES))
    parser.add_argument('--rows', default=','.join(map(str, ROWS)))
    parser.add_argument('--variants', default=','.join(VARIANTS))
    parser.add_argument('--cold-mb', type=int, default=1024, help='weights cycled through per decode measurement')
    parser.add_argument('--single-core', action='store_true',
                        help='every variant on one core, timed by process CPU time (for a loaded machine)')
    parser.add_argument('--baseline', metavar='REV',
                        help='also run int8_block32_base / int8_channel_base: the kernel sources at git revision REV')
    parser.add_argument('--json', help='write the figures here')
    parser.add_argument('--worker', choices=VARIANTS + BASELINE, help=argparse.SUPPRESS)
    args = parser.parse_args()
    shapes, rows = args.shapes.split(','), [int(r) for r in args.rows.split(',')]
    if args.worker:
        worker(args.worker, shapes, rows, args.cold_mb, args.single_core)
        return
    variants = args.variants.split(',')
    if args.baseline:
        _extract_baseline(args.baseline)
        variants += [f'{name}_base' for name in variants if f'{name}_base' in BASELINE]
    runs = {name: [] for name in variants}
    for round_index in range(args.rounds):
        for name in variants:
            extra = ['--single-core'] if args.single_core else []
            runs[name].append(run_worker(os.path.abspath(__file__), name, '--shapes', args.shapes, '--rows',
                                         args.rows, '--cold-mb', args.cold_mb, *extra)['figures'])
            print(f"round {round_index + 1}/{args.rounds} {name} done", file=sys.stderr)
    results = {'environment': environment(('mindspore', 'torch', 'numpy')), 'rounds': args.rounds,
               'cold_mb': args.cold_mb, 'single_core': args.single_core, 'load_average': os.getloadavg(),
               'baseline': args.baseline, 'seconds': {}, 'errors': {}, 'raw': runs}
    for name, rounds in runs.items():
        if 'error' in rounds[0]:
            results['errors'][name] = rounds[0]['error']
            continue
        results['seconds'][name] = {key: statistics.median(r[key]['s'] for r in rounds) for key in rounds[0]}
        results.setdefault('weight_bytes', {})[name] = {key: rounds[0][key]['bytes'] for key in rounds[0]}
        if name in ONEDNN_MODES:
            results.setdefault('onednn_impl', {})[name] = sorted({r['impl'] for r in rounds[0].values()})
    print(f"CPU: {results['environment']['cpu']} ({results['environment']['cpu_count']} cores), "
          f"{'one core, CPU time' if args.single_core else 'all cores, wall time'}, "
          f"load average at the end {results['load_average'][0]:.1f}")
    timed = list(results['seconds'])
    print(f"{'shape/M':<18}" + ''.join(f'{name:>20}' for name in timed))
    for key in max(results['seconds'].values(), key=len):
        cells = []
        for name in timed:
            seconds = results['seconds'][name].get(key)
            if seconds is None:
                cells.append(f"{'-':>20}")
                continue
            m_rows = int(key.rsplit('M', 1)[1])
            if m_rows <= DECODE_ROWS:
                text = f"{seconds * 1e6:.0f}us {results['weight_bytes'][name][key] / seconds / 1e9:.1f}GB/s"
            else:
                k_dim, n_dim = SHAPES[key.split('/')[0]]
                text = f"{seconds * 1e3:.1f}ms {2 * m_rows * k_dim * n_dim / seconds / 1e9:.0f}GF/s"
            cells.append(f'{text:>20}')
        print(f'{key:<18}' + ''.join(cells))
    for name in ('int8_block32', 'int8_channel', *BASELINE):
        read = results['seconds'].get('read')
        if read and name in results['seconds']:  # GB/s of the kernel over GB/s of the plain read, decode rows
            read_rate = {key: results['weight_bytes']['read'][key] / seconds for key, seconds in read.items()}
            fractions = {key: results['weight_bytes'][name][key] / seconds / read_rate[key.split('/')[0] + '/M1']
                         for key, seconds in results['seconds'][name].items()
                         if int(key.rsplit('M', 1)[1]) <= DECODE_ROWS and key.split('/')[0] + '/M1' in read_rate}
            results[f'read_fraction_{name}'] = fractions
            print(f"{name} GB/s / read GB/s: " + ', '.join(f'{k} {v:.2f}' for k, v in fractions.items()))
    for name in ('int8_block32', 'int8_channel'):
        if f'{name}_base' in results['seconds'] and name in results['seconds']:
            ratios = {key: results['seconds'][f'{name}_base'][key] / seconds
                      for key, seconds in results['seconds'][name].items()}
            results[f'speedup_{name}_vs_base'] = ratios
            print(f"{name} speedup vs {args.baseline}: " + ', '.join(f'{k} {v:.2f}' for k, v in ratios.items()))
    ours = results['seconds'].get('int8_block32', {})
    for reference in ('torch_fp32', 'fp32_fewrows', 'ms_matmul', 'torch_dynamic_int8', *ONEDNN_MODES):
        if reference in results['seconds'] and ours:
            ratios = {key: results['seconds'][reference][key] / ours[key]
                      for key in ours if key in results['seconds'][reference]}
            results[f'speedup_vs_{reference}'] = ratios
            print(f"int8_block32 speedup vs {reference}: " + ', '.join(f'{k} {v:.2f}' for k, v in ratios.items()))
    for name, impls in results.get('onednn_impl', {}).items():
        print(f'{name}: oneDNN implementations {impls}')
    for name, error in results['errors'].items():
        print(f'{name}: not measured: {error}')
    write_json(args.json, results)


if __name__ == '__main__':
    main()
