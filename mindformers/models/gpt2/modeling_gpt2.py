"""GPT-2: learned positions, pre-LayerNorm blocks of fused-qkv causal attention and a GELU MLP, tied LM head."""
import math

from mindspore import nn, ops

from mindformers.models.base_model import CausalLMModel
from mindformers.models.gpt2.gpt2_config import GPT2Config
from mindformers.modules import CausalMask, CausalSelfAttention, Dropout, Embedding, LayerNorm, MLP
from mindformers.modules.layers import TiedLMHead, _dp_mp, place_last, place_layers, to_mstype
from mindformers.tools.register import MindFormerRegister, MindFormerModuleType


class GPT2Block(nn.Cell):
    """x + attention(LN(x)), then + mlp(LN(.)): x [B, S, H] -> [B, S, H]; mask, cache and write as for
    `CausalSelfAttention` (each branch adds the residual itself, inside its output projection)."""

    def __init__(self, config):
        super().__init__()
        hidden, parallel = config.hidden_size, config.parallel_config
        out_init_std = config.initializer_range / math.sqrt(2 * config.num_layers)  # GPT-2's scaled residual init
        norm_args = dict(eps=config.layernorm_epsilon, param_init_type=config.param_init_type,
                         compute_type=config.layernorm_compute_type, parallel_config=parallel)
        common = dict(init_std=config.initializer_range, out_init_std=out_init_std,
                      param_init_type=config.param_init_type, compute_dtype=config.compute_dtype,
                      parallel_config=parallel)
        self.input_layernorm = LayerNorm(hidden, **norm_args)
        self.attention = CausalSelfAttention(hidden, config.num_heads, attention_dropout=config.attention_dropout_rate,
                                             out_dropout=config.hidden_dropout_rate,
                                             softmax_compute_type=config.softmax_compute_type, **common)
        self.post_attention_layernorm = LayerNorm(hidden, **norm_args)
        self.mlp = MLP(hidden, config.expand_ratio * hidden, hidden_act=config.hidden_act,
                       dropout=config.hidden_dropout_rate, **common)

    def construct(self, x, mask, cache=None, write=None):
        x = self.attention(self.input_layernorm(x), mask, cache, write, residual=x)
        return self.mlp(self.post_attention_layernorm(x), residual=x)


@MindFormerRegister.register(MindFormerModuleType.MODELS)
class GPT2Model(nn.Cell):
    """The GPT-2 backbone: input_ids [B, S] int32 (S <= seq_length) -> final hidden states [B, S, H].

    `attention_mask` [B, S] (1 = token, 0 = padding, e.g. left padding) is optional. With `cache` (a decoding
    session's `CacheView`) and `step` = (positions [B, S] int32, additive mask, write), the tokens continue the
    session's sequences (see `mindformers.generation.session`)."""

    # without padding the position table is added whole (a replicated table, like its own lookup's)
    parameter_inputs = {'embed_positions.weight': ('add_positions', 1)}

    def __init__(self, config):
        super().__init__()
        config.validate()
        parallel = config.parallel_config
        self.seq_length = config.seq_length
        self.compute_dtype = to_mstype(config.compute_dtype)
        self.embed_tokens = Embedding(config.vocab_size, config.hidden_size, config.initializer_range,
                                      config.param_init_type, parallel)
        self.embed_positions = Embedding(config.seq_length, config.hidden_size, config.initializer_range,
                                         config.param_init_type, parallel, replicated=True)
        self.embed_dropout = Dropout(config.embedding_dropout_prob)
        self.causal_mask = CausalMask(config.seq_length, config.softmax_compute_type)
        self.num_heads = config.num_heads
        self.layers = nn.CellList([GPT2Block(config) for _ in range(config.num_layers)])
        self.final_layernorm = LayerNorm(config.hidden_size, config.layernorm_epsilon, config.param_init_type,
                                         config.layernorm_compute_type, parallel)
        place_layers(self.layers, parallel, config.offset)
        place_last(parallel, self.final_layernorm)
        dp, _ = _dp_mp(parallel)
        self.add_positions = ops.Add().shard(((dp, 1, 1), (1, 1)))
        self.embed_dropout.shard(((dp, 1, 1),))

    def construct(self, input_ids, attention_mask=None, cache=None, step=None):
        seq = input_ids.shape[1]
        if seq > self.seq_length:
            raise ValueError(f"input_ids has {seq} tokens per row, more than seq_length {self.seq_length}")
        write = None
        if cache is not None:
            positions, mask, write = step
            hidden = self.embed_tokens(input_ids) + self.embed_positions(positions)
        elif attention_mask is None:
            mask = None  # the plain causal mask
            positions = self.embed_positions.table()
            if seq != self.seq_length:
                positions = positions[:seq]
            hidden = self.add_positions(self.embed_tokens(input_ids), positions)
        else:  # padded rows: positions count from each row's first real token, padding is hidden as a key
            mask, positions = self.causal_mask.with_padding(attention_mask, self.num_heads)
            hidden = self.embed_tokens(input_ids) + self.embed_positions(positions)
        if hidden.dtype != self.compute_dtype:
            hidden = ops.cast(hidden, self.compute_dtype)
        hidden = self.embed_dropout(hidden)
        for index, layer in enumerate(self.layers):
            hidden = layer(hidden, mask, None if cache is None else cache.layers[index], write)
        return self.final_layernorm(hidden)


@MindFormerRegister.register(MindFormerModuleType.MODELS)
class GPT2LMHeadModel(CausalLMModel):
    """GPT-2 with its output head tied to the token embedding. Training and inference contracts: `CausalLMModel`."""

    pet_default_targets = {'lora': ('qkv_proj',), 'adapter': ('o_proj', 'fc_out')}

    parameter_inputs = {'backbone.embed_tokens.weight': ('lm_head.matmul', 1)}

    def __init__(self, config: GPT2Config):
        super().__init__(config)
        self.backbone = GPT2Model(config)
        self.lm_head = TiedLMHead(config.parallel_config)
        place_last(config.parallel_config, self.lm_head, self.loss)
        self.load_checkpoint(config)

    def logits(self, input_ids, attention_mask=None, cache=None, step=None):
        hidden = self.backbone(input_ids, attention_mask, cache, step)
        return self.lm_head(self.logit_rows(hidden, cache), self.backbone.embed_tokens.table())
