"""Helpers shared by the CPU kernel tests."""
import contextlib
import os

from mindspore import nn, Tensor


class ProbeAll(nn.Cell):
    """sum(fn(*inputs) * probe): differentiable in every input, with gradient `probe` at fn's output."""

    def __init__(self, fn, probe):
        super().__init__()
        self.fn, self.probe = fn, Tensor(probe)

    def construct(self, *inputs):
        return (self.fn(*inputs) * self.probe).sum()


@contextlib.contextmanager
def cpu_kernels_set(enabled):
    """`MINDFORMERS_CPU_KERNELS` set to 1 or 0 and the kernels' state reset inside the block; both restored after.
    Cells built inside the block pick the fused kernels or plain ops accordingly."""
    import mindformers.kernels as cpu_kernels
    saved_env, saved_state = os.environ.get('MINDFORMERS_CPU_KERNELS'), dict(cpu_kernels._STATE)
    os.environ['MINDFORMERS_CPU_KERNELS'] = '1' if enabled else '0'
    cpu_kernels._STATE.clear()
    try:
        yield
    finally:
        cpu_kernels._STATE.clear()
        cpu_kernels._STATE.update(saved_state)
        if saved_env is None:
            os.environ.pop('MINDFORMERS_CPU_KERNELS')
        else:
            os.environ['MINDFORMERS_CPU_KERNELS'] = saved_env


def call_kernel(library, entry, inputs, out_shape, out_dtype=None):
    """Calls the AOT kernel `entry` of the compiled `library` as MindSpore does (params = inputs then the output):
    (return code, output array of `out_shape`, NaN-filled before the call)."""
    import ctypes
    import numpy as np
    out = np.full(out_shape, np.nan, out_dtype or np.float32)
    arrays = [np.ascontiguousarray(a) for a in inputs] + [out]
    count = len(arrays)
    params = (ctypes.c_void_p * count)(*[a.ctypes.data for a in arrays])
    ndims = (ctypes.c_int * count)(*[a.ndim for a in arrays])
    dims = [(ctypes.c_int64 * max(a.ndim, 1))(*a.shape) for a in arrays]
    shapes = (ctypes.POINTER(ctypes.c_int64) * count)(*[ctypes.cast(d, ctypes.POINTER(ctypes.c_int64)) for d in dims])
    code = getattr(ctypes.CDLL(library), entry)(count, params, ndims, shapes, None, None, None)
    return code, out
