"""LoRA: a low-rank update on a Linear, y = x W^T + b + (alpha / r) * dropout(x) A^T B^T.

A targeted `Linear` becomes a `LoRALinear` in place (same object, same parameter names, same kernels and shard
strategies), gaining `<path>.mindpet_delta_lora_a` [r, in] and `<path>.mindpet_delta_lora_b` [out, r] (MindPet's and
MindFormers' names). The base output keeps every fused path of `Linear.construct`: the update is added after it, so a
caller's fused bias or residual still applies."""
import math

import numpy as np
import mindspore as ms
from mindspore import nn, ops, Parameter, Tensor
from mindspore.common.initializer import HeUniform, initializer

from mindformers.kernels import FusedLoRA
from mindformers.modules.layers import Linear
from mindformers.pet.freeze import DELTA_PREFIX

LORA_A, LORA_B = DELTA_PREFIX + 'lora_a', DELTA_PREFIX + 'lora_b'


def adopt_linear(linear, cls, parameters, what, path='Linear'):
    """Turn `linear` (a plain `Linear` at `path`) into `cls`, a Linear subclass, in place: the same object keeps its
    parameters, primitives, shard strategies and place in the model (a wrapper holding it as a child would rename
    its parameters `<path>.base.*`). Adds `parameters` {name: (shape, initializer)} in the weight's dtype, named
    `<linear's path>.<name>`; returns those full names."""
    if type(linear) is not Linear:
        raise TypeError(f"{what} adapts a plain Linear; {path} is a {type(linear).__name__}")
    prefix = linear.weight.name.rsplit('.', 1)[0] + '.' if '.' in linear.weight.name else ''
    linear.__class__ = cls
    names = []
    for name, (shape, init) in parameters.items():
        param = Parameter(initializer(init, shape, linear.weight.dtype), name=name)
        setattr(linear, name, param)
        param.name = prefix + name
        names.append(param.name)
    return names


class LoRALinear(Linear):
    """A Linear with a LoRA update. Made from an existing Linear by `LoRALinear.adopt(linear, rank, alpha,
    dropout)`; `construct(x [..., in], add_bias=True, residual=None)` keeps Linear's contract."""

    parameter_inputs = dict(Linear.parameter_inputs, **{LORA_A: ('lora_a_matmul', 1),
                                                        LORA_B: ('lora_b_matmul', 1)})

    @classmethod
    def adopt(cls, linear, rank, alpha, dropout=0.0, path='Linear'):
        """Turn `linear` (a Linear at `path`, not already adapted) into a LoRALinear in place and return it."""
        adopt_linear(linear, cls, {LORA_A: ([rank, linear.in_features], HeUniform(negative_slope=math.sqrt(5))),
                                   LORA_B: ([linear.out_features, rank], 'zeros')}, 'LoRA', path)
        linear.lora_rank, linear.lora_scaling = int(rank), float(alpha) / int(rank)
        linear.lora_dropout = nn.Dropout(p=float(dropout)) if dropout else nn.Identity()
        linear.lora_a_matmul = ops.MatMul(transpose_b=True)
        linear.lora_b_matmul = ops.MatMul(transpose_b=True)
        linear.lora_add = ops.Add()
        # on CPU, fp32 and unsharded (where Linear has its few-rows kernel): the update in one kernel pass each way
        fused = linear.few_rows is not None and linear.weight.dtype == ms.float32
        linear.lora_fused = FusedLoRA(linear.lora_scaling) if fused else None
        strategy = linear.matmul.in_strategy
        if strategy is not None:  # x (dp, a) @ W^T with W split (b, a): A is split like W's inputs, B like its outputs
            (dp, split_in), (split_out, _) = strategy
            linear.lora_a_matmul.shard(((dp, split_in), (1, split_in)))
            linear.lora_b_matmul.shard(((dp, 1), (split_out, 1)))
            linear.lora_add.shard(((dp, split_out), (dp, split_out)))
        return linear

    def construct(self, x, add_bias=True, residual=None):
        y = Linear.construct(self, x, add_bias, residual)
        shape = x.shape
        h = self.lora_dropout(x.reshape(-1, shape[-1]))
        lora_a, lora_b = getattr(self, LORA_A), getattr(self, LORA_B)
        if h.dtype != self.compute_dtype:
            h = ops.cast(h, self.compute_dtype)
        if self.lora_fused is not None:
            return self.lora_fused(h, y.reshape(h.shape[0], -1), lora_a, lora_b)[0].reshape(y.shape)
        if lora_a.dtype != self.compute_dtype:
            lora_a, lora_b = ops.cast(lora_a, self.compute_dtype), ops.cast(lora_b, self.compute_dtype)
        h = self.lora_a_matmul(h, lora_a) * self.lora_scaling
        update = self.lora_b_matmul(h, lora_b)
        return self.lora_add(y, update.reshape(y.shape))

    def delta_weight(self):
        """(alpha / r) * B @ A [out, in] as an fp32 NumPy array."""
        a = getattr(self, LORA_A).asnumpy().astype(np.float32)
        b = getattr(self, LORA_B).asnumpy().astype(np.float32)
        return self.lora_scaling * (b @ a)

    def merge(self):
        """Fold the update into the weight (W + (alpha / r) B A, summed in fp32 and cast back to W's dtype) and turn
        back into a plain Linear; returns it."""
        weight = self.weight.asnumpy().astype(np.float32) + self.delta_weight()
        self.weight.set_data(Tensor(weight, ms.float32).astype(self.weight.dtype))
        for name in (LORA_A, LORA_B, 'lora_dropout', 'lora_a_matmul', 'lora_b_matmul', 'lora_add', 'lora_fused',
                     'lora_rank', 'lora_scaling'):
            delattr(self, name)
        self.__class__ = Linear
        return self


def apply_lora(model, config, targets):
    """Adapt each Linear of `targets` ([(path, Linear)]) with `config` (LoraConfig); returns the delta names."""
    names = []
    for path, linear in targets:
        LoRALinear.adopt(linear, config.lora_rank, config.lora_alpha, config.lora_dropout, path)
        names += [getattr(linear, LORA_A).name, getattr(linear, LORA_B).name]
    return names
