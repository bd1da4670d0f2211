"""Position-wise feed-forward network."""
from mindspore import nn

from mindformers.modules.layers import Linear, Dropout, get_activation, _dp_mp


class MLP(nn.Cell):
    """fc_out(act(fc_in(x))), then dropout: x [B, S, hidden_size] -> [B, S, hidden_size].

    `fc_in.weight` [ffn_hidden_size, hidden_size] is column-split and `fc_out.weight` [hidden_size, ffn_hidden_size]
    row-split under model parallel. `hidden_act` names the activation (see `layers.get_activation`)."""

    def __init__(self, hidden_size, ffn_hidden_size, hidden_act='gelu', has_bias=True, dropout=0.0, init_std=0.02,
                 out_init_std=None, param_init_type='float32', compute_dtype='float32', parallel_config=None):
        super().__init__()
        common = dict(has_bias=has_bias, param_init_type=param_init_type, compute_dtype=compute_dtype,
                      parallel_config=parallel_config)
        self.fc_in = Linear(hidden_size, ffn_hidden_size, init_std=init_std, split='column', **common)
        self.fc_out = Linear(ffn_hidden_size, hidden_size, init_std=out_init_std or init_std, split='row', **common)
        dp, mp = _dp_mp(parallel_config)
        self.act = get_activation(hidden_act).shard(((dp, 1, mp),))
        self.dropout = Dropout(dropout).shard(((dp, 1, 1),))

    def construct(self, x):
        return self.dropout(self.fc_out(self.act(self.fc_in(x))))
