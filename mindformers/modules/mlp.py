"""Position-wise feed-forward networks: GELU MLP (GPT-2) and SwiGLU (LLaMA, GLM2, PengCheng.Mind)."""
from mindspore import nn, ops

from mindformers.kernels import FEW_ROWS, FusedSwiGLU, use_fused
from mindformers.modules.layers import Linear, Dropout, add_residual, get_activation, _dp_mp


class MLP(nn.Cell):
    """fc_out(act(fc_in(x))), then dropout: x [B, S, hidden_size] -> [B, S, hidden_size] (`construct(x,
    residual=None)` adds `residual`).

    `fc_in.weight` [ffn_hidden_size, hidden_size] is column-split and `fc_out.weight` [hidden_size, ffn_hidden_size]
    row-split under model parallel. `hidden_act` names the activation (see `layers.get_activation`). `names`: the
    attribute (so parameter) names of the two projections, ('fc_in', 'fc_out') unless a family keeps its
    checkpoint's names (GLM: ('dense_h_to_4h', 'dense_4h_to_h'))."""

    def __init__(self, hidden_size, ffn_hidden_size, hidden_act='gelu', has_bias=True, dropout=0.0, init_std=0.02,
                 out_init_std=None, param_init_type='float32', compute_dtype='float32', parallel_config=None,
                 names=('fc_in', 'fc_out')):
        super().__init__()
        common = dict(has_bias=has_bias, param_init_type=param_init_type, compute_dtype=compute_dtype,
                      parallel_config=parallel_config)
        self.names = tuple(names)
        setattr(self, self.names[0], Linear(hidden_size, ffn_hidden_size, init_std=init_std, split='column',
                                            **common))
        setattr(self, self.names[1], Linear(ffn_hidden_size, hidden_size, init_std=out_init_std or init_std,
                                            split='row', **common))
        dp, mp = _dp_mp(parallel_config)
        self.act = get_activation(hidden_act).shard(((dp, 1, mp),))
        self.dropout = Dropout(dropout).shard(((dp, 1, 1),))
        self.act_bias = getattr(self.act, 'fused_bias', None)  # gelu(x + bias) in one CPU kernel, if any
        self.act_frozen_bias = getattr(self.act, 'fused_frozen_bias', None)  # the same without the bias gradient

    @property
    def frozen_bias(self):
        """Whether fc_in's bias is frozen (read when a graph is compiled: its gradient is then not computed)."""
        bias = getattr(self, self.names[0]).bias
        return bias is not None and not bias.requires_grad

    def _hidden(self, x):
        """act(fc_in(x)) for x [B, S, hidden_size], with fc_in's bias added inside the GELU kernel where fc_in lets
        a caller add it (decode steps keep fc_in's few-rows kernel)."""
        fc_in = getattr(self, self.names[0])
        if self.act_bias is not None and getattr(fc_in, 'bias_fusable', False) and x.size > FEW_ROWS * x.shape[-1]:
            if self.frozen_bias:
                return self.act_frozen_bias(fc_in(x, False), fc_in.bias)
            return self.act_bias(fc_in(x, False), fc_in.bias)
        return self.act(fc_in(x))

    def construct(self, x, residual=None):
        """x [..., hidden_size] -> [..., hidden_size] (+ `residual`, added inside fc_out where it can)."""
        hidden = self._hidden(x)
        fc_out = getattr(self, self.names[1])
        if self.dropout.active:
            return add_residual(residual, fc_out(hidden).reshape(x.shape), self.dropout)
        return fc_out(hidden, residual=residual).reshape(x.shape)


class GatedMLP(nn.Cell):
    """SwiGLU feed-forward: down_proj(silu(gate_proj(x)) * up_proj(x)); biases on all three projections when
    `has_bias` (PengCheng.Mind), none by default (LLaMA, GLM2).

    x [B, S, hidden_size] -> [B, S, hidden_size]. `gate_proj`/`up_proj` weights [ffn_hidden_size, hidden_size] are
    column-split, `down_proj` [hidden_size, ffn_hidden_size] row-split under model parallel."""

    def __init__(self, hidden_size, ffn_hidden_size, has_bias=False, init_std=0.02, param_init_type='float32',
                 compute_dtype='float32', parallel_config=None):
        super().__init__()
        common = dict(has_bias=has_bias, init_std=init_std, param_init_type=param_init_type,
                      compute_dtype=compute_dtype, parallel_config=parallel_config)
        self.gate_proj = Linear(hidden_size, ffn_hidden_size, split='column', **common)
        self.up_proj = Linear(hidden_size, ffn_hidden_size, split='column', **common)
        self.down_proj = Linear(ffn_hidden_size, hidden_size, split='row', **common)
        dp, mp = _dp_mp(parallel_config)
        self.sigmoid = ops.Sigmoid().shard(((dp, mp),))
        self.mul_gate = ops.Mul().shard(((dp, mp), (dp, mp)))
        self.mul = ops.Mul().shard(((dp, mp), (dp, mp)))
        self.swiglu = FusedSwiGLU() if dp == mp == 1 and use_fused(self.gate_proj.compute_dtype) else None

    def construct(self, x, residual=None):
        """x [..., hidden_size] -> [..., hidden_size] (+ `residual`)."""
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        gate = self.gate_proj(flat)
        if self.swiglu is not None:
            hidden = self.swiglu(gate, self.up_proj(flat))
        else:
            hidden = self.mul(self.mul_gate(gate, self.sigmoid(gate)), self.up_proj(flat))  # silu(gate) * up
        return self.down_proj(hidden, residual=residual).reshape(shape)
