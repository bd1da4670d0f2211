"""PanGu-alpha: learned positions, num_layers - 1 pre-LayerNorm blocks (separate q/k/v attention, fast_gelu MLP),
the final LayerNorm, then the query layer whose attention query comes from a learned top-query embedding of the
positions; output head tied to the word embedding.

Parameter names: `backbone.embed_tokens`, `backbone.embed_positions`, `backbone.embed_top_query`,
`backbone.layers.{i}.{input_layernorm, attention.{q,k,v,o}_proj, post_attention_layernorm, mlp.fc_in, mlp.fc_out}`,
`backbone.final_layernorm`, `backbone.top_query_layer.*` (the same parts as a block); all Linear weights are
[out, in]. `convert_pangualpha.py` maps the HF-port and the MindSpore PanGu names onto them."""
import mindspore as ms
from mindspore import nn, ops

from mindformers.models.base_model import CausalLMModel
from mindformers.models.pangualpha.pangualpha_config import PanguAlphaConfig
from mindformers.modules import CausalMask, Dropout, Embedding, GroupedQueryAttention, LayerNorm, MLP
from mindformers.modules.layers import TiedLMHead, _dp_mp, place_last, place_layers, to_mstype
from mindformers.tools.register import MindFormerRegister, MindFormerModuleType


class PanguAttention(GroupedQueryAttention):
    """Multi-head attention with separate q/k/v projections (biases) and an output projection with bias, no rotary
    positions; the query may come from its own input (the query layer's top-query embedding).

    `construct(x, mask, query_input, cache=None, write=None)`: keys and values from x [B, S, hidden]; queries from
    `query_input` [B, S, hidden] (pass x itself for self-attention); mask, cache and write as for
    `GroupedQueryAttention` -> [B, S, hidden]."""

    def __init__(self, hidden_size, num_heads, attention_dropout=0.0, init_std=0.02, param_init_type='float32',
                 compute_dtype='float32', softmax_compute_type='float32', parallel_config=None):
        super().__init__(hidden_size, num_heads, qkv_bias=True, out_bias=True, attention_dropout=attention_dropout,
                         init_std=init_std, param_init_type=param_init_type, compute_dtype=compute_dtype,
                         softmax_compute_type=softmax_compute_type, parallel_config=parallel_config)

    def construct(self, x, mask, query_input, cache=None, write=None):
        return self.attend(self.heads(query_input, self.q_proj), self.heads(x, self.k_proj),
                           self.heads(x, self.v_proj), mask, cache, write, None)


class PanguBlock(nn.Cell):
    """x + attention(LN(x), mask), then + mlp(LN(.)): x [B, S, H] -> [B, S, H]. With `query` [B, S, H] (the query
    layer) the attention queries come from it instead of LN(x); cache and write as for `PanguAttention`."""

    def __init__(self, config):
        super().__init__()
        hidden, parallel = config.hidden_size, config.parallel_config
        norm_args = dict(eps=config.layernorm_epsilon, param_init_type=config.param_init_type,
                         compute_type=config.layernorm_compute_type, parallel_config=parallel)
        common = dict(init_std=config.initializer_range, param_init_type=config.param_init_type,
                      compute_dtype=config.compute_dtype, parallel_config=parallel)
        self.input_layernorm = LayerNorm(hidden, **norm_args)
        self.attention = PanguAttention(hidden, config.num_heads, attention_dropout=config.attention_dropout_rate,
                                        softmax_compute_type=config.softmax_compute_type, **common)
        self.attention_dropout = Dropout(config.hidden_dropout_rate)
        self.post_attention_layernorm = LayerNorm(hidden, **norm_args)
        self.mlp = MLP(hidden, config.ffn_size, hidden_act=config.hidden_act, dropout=config.hidden_dropout_rate,
                       **common)
        dp, _ = _dp_mp(parallel)
        self.attention_dropout.shard(((dp, 1, 1),))
        self.add = ops.Add().shard(((dp, 1, 1), (dp, 1, 1)))

    def construct(self, x, mask, query=None, cache=None, write=None):
        normed = self.input_layernorm(x)
        attended = self.attention(normed, mask, normed if query is None else query, cache, write)
        x = self.add(x, self.attention_dropout(attended))
        return self.mlp(self.post_attention_layernorm(x), residual=x)


@MindFormerRegister.register(MindFormerModuleType.MODELS)
class PanguAlphaModel(nn.Cell):
    """The PanGu-alpha backbone: input_ids [B, S] int32 (S <= seq_length) -> hidden states [B, S, H] after the query
    layer (no norm follows it). `attention_mask` [B, S] (1 = token, 0 = padding, e.g. left padding for generation) is
    optional: padded keys are hidden and positions count from each row's first real token. With `cache` (a decoding
    session's `CacheView`; the query layer's keys and values are cached last) and `step` = (positions [B, S] int32,
    additive mask, write), the tokens continue the session's sequences."""

    def __init__(self, config):
        super().__init__()
        config.validate()
        parallel = config.parallel_config
        self.seq_length, self.num_heads = config.seq_length, config.num_heads
        self.compute_dtype = to_mstype(config.compute_dtype)
        embedding = lambda rows, replicated: Embedding(rows, config.hidden_size, config.initializer_range,
                                                       config.param_init_type, parallel, replicated=replicated)
        self.embed_tokens = embedding(config.vocab_size, False)
        # the position tables are replicated (data parallel), as in MindFormers' PanGu-alpha
        self.embed_positions = embedding(config.seq_length, True)
        self.embed_top_query = embedding(config.seq_length, True)
        self.embed_dropout = Dropout(config.embedding_dropout_prob)
        self.causal_mask = CausalMask(config.seq_length, config.softmax_compute_type)
        self.layers = nn.CellList([PanguBlock(config) for _ in range(config.num_layers - 1)])
        self.final_layernorm = LayerNorm(config.hidden_size, config.layernorm_epsilon, config.param_init_type,
                                         config.layernorm_compute_type, parallel)
        self.top_query_layer = PanguBlock(config)
        # the query layer counts as the last of num_layers layers when they are spread over pipeline stages
        place_layers(list(self.layers) + [self.top_query_layer], parallel, config.offset)
        place_last(parallel, self.final_layernorm)
        dp, _ = _dp_mp(parallel)
        self.embed_dropout.shard(((dp, 1, 1),))

    def construct(self, input_ids, attention_mask=None, cache=None, step=None):
        batch, seq = input_ids.shape
        if seq > self.seq_length:
            raise ValueError(f"input_ids has {seq} tokens per row, more than seq_length {self.seq_length}")
        write = None
        if cache is not None:
            positions, mask, write = step
        elif attention_mask is None:
            mask = None  # the plain causal mask
            positions = ops.broadcast_to(ops.arange(seq, dtype=ms.int32).reshape(1, seq), (batch, seq))
        else:  # padded rows: positions count from each row's first real token, padding is hidden as a key
            mask, positions = self.causal_mask.with_padding(attention_mask, self.num_heads)
        hidden = self.embed_tokens(input_ids) + self.embed_positions(positions)
        query = self.embed_top_query(positions)
        if hidden.dtype != self.compute_dtype:
            hidden, query = ops.cast(hidden, self.compute_dtype), ops.cast(query, self.compute_dtype)
        hidden = self.embed_dropout(hidden)
        for index, layer in enumerate(self.layers):
            hidden = layer(hidden, mask, None, None if cache is None else cache.layers[index], write)
        return self.top_query_layer(self.final_layernorm(hidden), mask, query,
                                    None if cache is None else cache.layers[len(self.layers)], write)


@MindFormerRegister.register(MindFormerModuleType.MODELS)
class PanguAlphaHeadModel(CausalLMModel):
    """PanGu-alpha with its output head tied to the word embedding. Training and inference contracts:
    `CausalLMModel` (one forward for training, prefill and decode; the query layer counts as the last of
    `num_layers` cached layers)."""

    parameter_inputs = {'backbone.embed_tokens.weight': ('lm_head.matmul', 1)}
    pet_default_targets = dict(CausalLMModel.pet_default_targets, adapter=('o_proj', 'fc_out'))

    def __init__(self, config: PanguAlphaConfig):
        super().__init__(config)
        self.backbone = PanguAlphaModel(config)
        self.lm_head = TiedLMHead(config.parallel_config)
        place_last(config.parallel_config, self.lm_head, self.loss)
        self.load_checkpoint(config)

    def head(self, hidden):
        """[N, H] -> fp32 logits [N, vocab_size] through the tied word embedding."""
        return self.lm_head(hidden, self.backbone.embed_tokens.table())

    def logits(self, input_ids, attention_mask=None, cache=None, step=None):
        return self.head(self.logit_rows(self.backbone(input_ids, attention_mask, cache, step), cache))
