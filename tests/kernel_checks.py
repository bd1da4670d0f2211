"""Helpers shared by the CPU kernel tests."""
from mindspore import nn, Tensor


class ProbeAll(nn.Cell):
    """sum(fn(*inputs) * probe): differentiable in every input, with gradient `probe` at fn's output."""

    def __init__(self, fn, probe):
        super().__init__()
        self.fn, self.probe = fn, Tensor(probe)

    def construct(self, *inputs):
        return (self.fn(*inputs) * self.probe).sum()
