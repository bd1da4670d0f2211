"""GPT-2: learned positions, pre-LayerNorm blocks of fused-qkv causal attention and a GELU MLP, tied LM head."""
import math

import mindspore as ms
from mindspore import nn, ops

from mindformers.models.base_model import CausalLMModel
from mindformers.models.gpt2.gpt2_config import GPT2Config
from mindformers.modules import CausalMask, CausalSelfAttention, Dropout, Embedding, LayerNorm, MLP
from mindformers.modules.layers import _dp_mp, to_mstype
from mindformers.tools.register import MindFormerRegister, MindFormerModuleType


class GPT2Block(nn.Cell):
    """x + attention(LN(x), mask), then + mlp(LN(.)): x [B, S, H], additive mask [B, heads, S, S] -> [B, S, H]."""

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
        dp, _ = _dp_mp(parallel)
        self.add = ops.Add().shard(((dp, 1, 1), (dp, 1, 1)))

    def construct(self, x, mask):
        x = self.add(x, self.attention(self.input_layernorm(x), mask))
        return self.add(x, self.mlp(self.post_attention_layernorm(x)))


def _recompute_layer(recompute, layer_id, num_layers, pipeline_stages):
    """Whether layer `layer_id` is recomputed: `recompute` is a bool, or per pipeline stage the number of layers
    (counted from the stage's first) to recompute."""
    if isinstance(recompute, bool):
        return recompute
    if isinstance(recompute, (list, tuple)):
        per_stage = math.ceil(num_layers / pipeline_stages)
        stage, index = divmod(layer_id, per_stage)
        return stage < len(recompute) and index < int(recompute[stage])
    raise ValueError(f"recompute must be a bool or a list of per-stage layer counts, got {recompute!r}")


@MindFormerRegister.register(MindFormerModuleType.MODELS)
class GPT2Model(nn.Cell):
    """The GPT-2 backbone: input_ids [B, S] int32 (S <= seq_length) -> final hidden states [B, S, H]."""

    def __init__(self, config):
        super().__init__()
        config.validate()
        parallel = config.parallel_config
        self.seq_length = config.seq_length
        self.compute_dtype = to_mstype(config.compute_dtype)
        self.embed_tokens = Embedding(config.vocab_size, config.hidden_size, config.initializer_range,
                                      config.param_init_type, parallel)
        self.embed_positions = Embedding(config.seq_length, config.hidden_size, config.initializer_range,
                                         config.param_init_type, parallel)
        self.embed_dropout = Dropout(config.embedding_dropout_prob)
        self.causal_mask = CausalMask(config.seq_length, config.softmax_compute_type)
        self.num_heads = config.num_heads
        self.layers = nn.CellList([GPT2Block(config) for _ in range(config.num_layers)])
        self.final_layernorm = LayerNorm(config.hidden_size, config.layernorm_epsilon, config.param_init_type,
                                         config.layernorm_compute_type, parallel)
        recompute, stages = parallel.recompute.recompute, parallel.pipeline_stage
        for layer_id, layer in enumerate(self.layers):
            if _recompute_layer(recompute, layer_id, config.num_layers, stages):
                layer.recompute()
            if stages > 1:
                layer.pipeline_stage = layer_id * stages // config.num_layers
        dp, _ = _dp_mp(parallel)
        self.add_positions = ops.Add().shard(((dp, 1, 1), (1, 1)))
        self.embed_dropout.shard(((dp, 1, 1),))

    def construct(self, input_ids):
        batch, seq = input_ids.shape
        if seq > self.seq_length:
            raise ValueError(f"input_ids has {seq} tokens per row, more than seq_length {self.seq_length}")
        mask = self.causal_mask(batch, self.num_heads, seq)
        positions = self.embed_positions.weight
        if seq != self.seq_length:
            positions = positions[:seq]
        hidden = self.add_positions(self.embed_tokens(input_ids), positions)
        if hidden.dtype != self.compute_dtype:
            hidden = ops.cast(hidden, self.compute_dtype)
        hidden = self.embed_dropout(hidden)
        for layer in self.layers:
            hidden = layer(hidden, mask)
        return self.final_layernorm(hidden)


@MindFormerRegister.register(MindFormerModuleType.MODELS)
class GPT2LMHeadModel(CausalLMModel):
    """GPT-2 with its output head tied to the token embedding. Training and inference contracts: `CausalLMModel`."""

    def __init__(self, config: GPT2Config):
        super().__init__(config)
        self.backbone = GPT2Model(config)
        dp, mp = _dp_mp(config.parallel_config)
        # logits = hidden @ embed_tokens.weight^T; the vocabulary is split mp ways unless the embedding is replicated
        self.head_matmul = ops.MatMul(transpose_b=True).shard(
            ((dp, 1), (1, 1)) if config.parallel_config.vocab_emb_dp else ((dp, 1), (mp, 1)))
        self.load_checkpoint(config)

    def logits(self, input_ids):
        """[B, S] -> fp32 logits [B * S, vocab_size]."""
        hidden = self.backbone(input_ids)
        hidden = hidden.reshape(-1, hidden.shape[-1])
        weight = self.backbone.embed_tokens.weight
        if weight.dtype != hidden.dtype:
            weight = ops.cast(weight, hidden.dtype)
        logits = self.head_matmul(hidden, weight)
        if logits.dtype != ms.float32:
            logits = ops.cast(logits, ms.float32)
        return logits
