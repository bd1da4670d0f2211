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
