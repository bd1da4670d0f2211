"""GLM v1 (ChatGLM-6B): LayerNorm at the block input whose OUTPUT, scaled by alpha, is the residual; attention with
a per-head interleaved query_key_value projection, 2-D RoPE and a prefix-LM mask; a tanh-GELU MLP; the final
LayerNorm and an untied output head.

The model reads its 2-D positions and its mask off the tokens (so datasets need only input_ids and labels): a row
`context ... [gMASK] <sop> generated ...` has
    position row 0: 0, 1, 2, ... over the context, then the position of its blank ([gMASK], else [MASK]) for `<sop>`
        and everything after it;
    position row 1 (block positions): 0 over the context, then 1, 2, 3, ... from `<sop>` on;
    attention: every token sees the whole context (everything before `<sop>`, bidirectional) and, after it,
        causally.
A row without `<sop>` (plain text, as in pretraining) is all context for the positions (row 0 counts, row 1 is 0)
and causal for the mask. Without a blank before `<sop>`, the token before `<sop>` stands in for it. Positions count
from each row's first real token (`attention_mask`, left padding); explicit `position_ids` [B, 2, S] replace the
derived ones.

Parameter names are those of the published HF ChatGLM-6B checkpoint (`transformer.word_embeddings`,
`transformer.layers.{i}.{input_layernorm, attention.query_key_value, attention.dense, post_attention_layernorm,
mlp.dense_h_to_4h, mlp.dense_4h_to_h}`, `transformer.final_layernorm`, `lm_head`)."""
import math

import mindspore as ms
from mindspore import nn, ops, Tensor

from mindformers.models.chat import ChatMixin
from mindformers.models.base_model import CausalLMModel
from mindformers.models.glm.glm_config import GLMConfig
from mindformers.modules import Dropout, Embedding, LayerNorm, Linear, MLP
from mindformers.modules.attention import DotProductAttention
from mindformers.modules.layers import _dp_mp, output_head, place_last, place_layers, to_mstype
from mindformers.modules.rotary import Rotary2DEmbedding
from mindformers.tools.register import MindFormerRegister, MindFormerModuleType

MASKED_SCORE = -10000.0  # the published model's value for hidden keys (finite: safe in float16)
NO_BLOCK = 1 << 30  # the context length of a row without <sop>: no token is in a generated block


def glm_position_ids(positions, context_length, mask_position):
    """2-D position ids [B, 2, S] from token positions [B, S] (counting from the row's first token), the position
    of each row's `<sop>` (`context_length` [B, 1]; NO_BLOCK when none) and of its blank (`mask_position` [B, 1])."""
    block = positions >= context_length
    first = ops.where(block, ops.broadcast_to(mask_position, positions.shape), positions)
    second = ops.where(block, positions - context_length + 1, ops.zeros_like(positions))
    return ops.stack([first, second], 1)


class GLMInputLayout(nn.Cell):
    """Reads a GLM batch's structure off its tokens (see the module docstring).

    `construct(input_ids [B, S] int32, valid [B, S] int32 (1 = token, 0 = padding))` -> (position_ids [B, 2, S]
    int32, additive attention mask [B, num_heads, S, S] in `dtype` (0 visible; MASKED_SCORE for padding keys and
    for keys after the query that lie past the context), context_length [B, 1] (the position of `<sop>`, NO_BLOCK
    without one), mask_position [B, 1] (the position of the blank))."""

    def __init__(self, config):
        super().__init__()
        self.bos, self.gmask, self.mask = config.bos_token_id, config.gmask_token_id, config.mask_token_id
        self.num_heads = config.num_heads
        self.dtype = to_mstype(config.softmax_compute_type)
        self.first_column = ops.ReduceMin(keep_dims=True)

    def _first(self, found, columns, seq):
        """The first column where `found` [B, S] is true, or seq, as [B, 1]."""
        return self.first_column(ops.where(found, columns, seq), 1)

    def construct(self, input_ids, valid):
        batch, seq = input_ids.shape
        columns = ops.arange(seq, dtype=ms.int32).reshape(1, seq)
        real = valid > 0
        positions = ops.maximum(ops.cumsum(valid, 1) - 1, 0)
        sop_column = self._first(ops.logical_and(input_ids == self.bos, real), columns, seq)
        in_context = ops.logical_and(columns < sop_column, real)
        gmask_column = self._first(ops.logical_and(input_ids == self.gmask, in_context), columns, seq)
        mask_column = self._first(ops.logical_and(input_ids == self.mask, in_context), columns, seq)
        blank_column = ops.where(gmask_column < seq, gmask_column,
                                 ops.where(mask_column < seq, mask_column, sop_column - 1))
        mask_position = ops.gather_elements(positions, 1, ops.clip(blank_column, 0, seq - 1))
        sop_position = ops.gather_elements(positions, 1, ops.minimum(sop_column, seq - 1))
        has_sop = sop_column < seq
        context_length = ops.where(has_sop, sop_position, NO_BLOCK)
        position_ids = glm_position_ids(positions, context_length, mask_position)

        causal = columns <= columns.reshape(seq, 1)  # [query, key]
        in_prefix = columns < ops.where(has_sop, sop_column, 0)  # [B, S]: keys every query sees
        visible = ops.logical_or(causal.reshape(1, seq, seq), in_prefix.reshape(batch, 1, seq))
        visible = ops.logical_and(visible, real.reshape(batch, 1, seq))
        mask = ops.cast(ops.logical_not(visible), self.dtype) * MASKED_SCORE
        mask = ops.broadcast_to(mask.reshape(batch, 1, seq, seq), (batch, self.num_heads, seq, seq))
        return position_ids, mask, context_length, mask_position


class GLMAttention(nn.Cell):
    """Self-attention of block `layer_index` (0-based).

    `query_key_value.weight` [3 * heads * head_dim, hidden] holds per head its q, k and v rows in turn
    ([q_h0, k_h0, v_h0, q_h1, ...]: a column split under model parallel keeps whole heads); `dense` [hidden,
    heads * head_dim]; both with biases. Queries and keys are 2-D rotated; the query is divided by
    sqrt(head_dim) * (layer_index + 1) in the compute dtype and the scores multiplied back by layer_index + 1 after
    their cast to the softmax dtype, as the published model does to keep float16 scores in range.

    `construct(x [B, S, hidden], mask [B, heads, S, S] additive, cos, sin [B, S, 1, head_dim], cache=None,
    write=None)` -> [B, S, hidden]; with `cache` (one layer's view of a decoding session's cache) and `write` the
    keys and values are stored there and attention reads the cache."""

    def __init__(self, config, layer_index, rotary):
        super().__init__()
        parallel = config.parallel_config
        dp, mp = _dp_mp(parallel)
        self.num_heads, self.head_dim = config.num_heads, config.head_size
        self.inner_size = inner = self.num_heads * self.head_dim
        common = dict(has_bias=True, init_std=config.initializer_range, param_init_type=config.param_init_type,
                      compute_dtype=config.compute_dtype, parallel_config=parallel)
        self.query_key_value = Linear(config.hidden_size, 3 * inner, split='column', **common)
        self.dense = Linear(inner, config.hidden_size, split='row', **common)
        self.rotary = rotary
        coeff = float(layer_index + 1)
        self.query_scale = Tensor(1.0 / (math.sqrt(self.head_dim) * coeff), to_mstype(config.compute_dtype))
        self.core = DotProductAttention(config.attention_dropout_rate, config.compute_dtype,
                                        config.softmax_compute_type, parallel, score_scale=coeff)
        self.split_qkv = ops.Split(axis=-1, output_num=3).shard(((dp, 1, mp, 1),))
        self.mul_scale = ops.Mul().shard(((dp, 1, mp, 1), ()))
        self.to_heads = ops.Transpose().shard(((dp, 1, mp, 1),))
        self.from_heads = ops.Transpose().shard(((dp, mp, 1, 1),))

    def project(self, x, cos, sin):
        """x [B, S, hidden] -> (query, key, value) [B, S, heads, head_dim], query and key rotated, none scaled."""
        batch, seq, hidden = x.shape
        mixed = self.query_key_value(x.reshape(batch * seq, hidden))
        query, key, value = self.split_qkv(mixed.reshape(batch, seq, self.num_heads, 3 * self.head_dim))
        return self.rotary.apply(query, cos, sin), self.rotary.apply(key, cos, sin), value

    def construct(self, x, mask, cos, sin, cache=None, write=None):
        batch, seq, _ = x.shape
        query, key, value = self.project(x, cos, sin)
        query = self.mul_scale(query, self.query_scale)
        query, key, value = (self.to_heads(t, (0, 2, 1, 3)) for t in (query, key, value))
        if cache is None:
            context = self.core(query, key, value, mask)
        else:
            context = cache.attend(query, key, value, mask, write, self.core)
        context = self.from_heads(context, (0, 2, 1, 3)).reshape(batch * seq, self.inner_size)
        return self.dense(context).reshape(batch, seq, -1)


class GLMBlock(nn.Cell):
    """normed = input_layernorm(x); x' = alpha * normed + attention(normed); then
    normed' = post_attention_layernorm(x'); out = alpha * normed' + mlp(normed'). x [B, S, H] -> [B, S, H]."""

    def __init__(self, config, layer_index, rotary):
        super().__init__()
        parallel = config.parallel_config
        norm_args = dict(eps=config.layernorm_epsilon, param_init_type=config.param_init_type,
                         compute_type=config.layernorm_compute_type, parallel_config=parallel)
        self.input_layernorm = LayerNorm(config.hidden_size, **norm_args)
        self.attention = GLMAttention(config, layer_index, rotary)
        self.attention_dropout = Dropout(config.hidden_dropout_rate)
        self.post_attention_layernorm = LayerNorm(config.hidden_size, **norm_args)
        self.mlp = MLP(config.hidden_size, config.inner_hidden_size, hidden_act=config.activation_name,
                       dropout=config.hidden_dropout_rate, init_std=config.initializer_range,
                       param_init_type=config.param_init_type, compute_dtype=config.compute_dtype,
                       parallel_config=parallel, names=('dense_h_to_4h', 'dense_4h_to_h'))
        self.alpha = Tensor(config.residual_alpha, to_mstype(config.compute_dtype))
        dp, _ = _dp_mp(parallel)
        self.attention_dropout.shard(((dp, 1, 1),))
        self.scale = ops.Mul().shard(((dp, 1, 1), ()))
        self.add = ops.Add().shard(((dp, 1, 1), (dp, 1, 1)))

    def residual(self, normed, branch):
        """alpha * normed + branch."""
        return self.add(self.scale(normed, self.alpha), branch)

    def construct(self, x, mask, cos, sin, cache=None, write=None):
        normed = self.input_layernorm(x)
        x = self.residual(normed, self.attention_dropout(self.attention(normed, mask, cos, sin, cache, write)))
        normed = self.post_attention_layernorm(x)
        return self.residual(normed, self.mlp(normed))


@MindFormerRegister.register(MindFormerModuleType.MODELS)
class GLMModel(nn.Cell):
    """The GLM transformer: input_ids [B, S] int32 (S <= seq_length) -> hidden states [B, S, H] after
    final_layernorm. `attention_mask` [B, S] (1 = token, 0 = padding) and `position_ids` [B, 2, S] are optional
    (see the module docstring). With `cache` (a decoding session's `CacheView`) and `step` = (positions [B, T]
    int32, additive mask, write) the tokens continue the session's sequences: a prefill reads each row's structure
    off its left-padded tokens (the session mask's last row marks the real ones) and keeps each slot's `<sop>` and
    blank positions in the cache; a decode step continues the 2-D positions from them (row 0 stays at the blank,
    row 1 counts on)."""

    def __init__(self, config):
        super().__init__()
        parallel = config.parallel_config
        self.seq_length = config.seq_length
        self.compute_dtype = to_mstype(config.compute_dtype)
        self.word_embeddings = Embedding(config.vocab_size, config.hidden_size, config.initializer_range,
                                         config.param_init_type, parallel)
        self.embedding_dropout = Dropout(config.embedding_dropout_prob)
        # block positions run to seq_length (a row that starts with <sop>), hence one more row
        self.rotary = Rotary2DEmbedding(config.head_size, config.seq_length + 1, dtype=config.rotary_dtype)
        self.layout = GLMInputLayout(config)
        self.layers = nn.CellList([GLMBlock(config, i, self.rotary) for i in range(config.num_layers)])
        self.final_layernorm = LayerNorm(config.hidden_size, config.layernorm_epsilon, config.param_init_type,
                                         config.layernorm_compute_type, parallel)
        place_layers(self.layers, parallel, config.offset)
        place_last(parallel, self.final_layernorm)
        dp, _ = _dp_mp(parallel)
        self.embedding_dropout.shard(((dp, 1, 1),))

    def embed(self, input_ids):
        hidden = self.word_embeddings(input_ids)
        if hidden.dtype != self.compute_dtype:
            hidden = ops.cast(hidden, self.compute_dtype)
        return self.embedding_dropout(hidden)

    def construct(self, input_ids, attention_mask=None, cache=None, step=None, position_ids=None):
        batch, seq = input_ids.shape
        if seq > self.seq_length:
            raise ValueError(f"input_ids has {seq} tokens per row, more than seq_length {self.seq_length}")
        write = None
        if cache is None:
            valid = ops.ones((batch, seq), ms.int32) if attention_mask is None else ops.cast(attention_mask, ms.int32)
            derived, mask, _, _ = self.layout(input_ids, valid)
            position_ids = derived if position_ids is None else ops.cast(position_ids, ms.int32)
        else:
            positions, mask, write = step
            if cache.prefill:
                position_ids, mask, context_length, mask_position = self.layout(
                    input_ids, ops.cast(mask[:, 0, -1, :] == 0, ms.int32))
                cache.store('context_length', context_length, write)
                cache.store('mask_position', mask_position, write)
            else:
                position_ids = glm_position_ids(positions, cache.load('context_length'), cache.load('mask_position'))
        cos, sin = self.rotary.tables(position_ids)
        hidden = self.embed(input_ids)
        for index, layer in enumerate(self.layers):
            hidden = layer(hidden, mask, cos, sin, None if cache is None else cache.layers[index], write)
        return self.final_layernorm(hidden)


@MindFormerRegister.register(MindFormerModuleType.MODELS)
class GLMForPreTraining(CausalLMModel):
    """GLM with its own output head `lm_head` [vocab, hidden] (no bias). Contracts of `CausalLMModel`, plus an
    optional `position_ids` [B, 2, S] (training: aligned with input_ids [B, S+1] or with the S inputs) replacing
    the positions read off the tokens (one forward for training, prefill and decode)."""

    pet_default_targets = {'lora': ('query_key_value',), 'adapter': ('dense', 'dense_4h_to_h')}

    def __init__(self, config: GLMConfig):
        super().__init__(config)
        config.validate()
        parallel = config.parallel_config
        self.transformer = GLMModel(config)
        self.lm_head = output_head(config, parallel)
        place_last(parallel, self.lm_head, self.loss)
        self.load_checkpoint(config)

    def head(self, hidden):
        """Final hidden states [N, hidden] -> fp32 logits [N, vocab_size]."""
        logits = self.lm_head(hidden)
        return logits if logits.dtype == ms.float32 else ops.cast(logits, ms.float32)

    def logits(self, input_ids, attention_mask=None, cache=None, step=None, position_ids=None):
        """`CausalLMModel.logits`, plus explicit `position_ids` [B, 2, S] (without a cache)."""
        hidden = self.transformer(input_ids, attention_mask, cache, step, position_ids)
        return self.head(self.logit_rows(hidden, cache))

    def kv_cache_layout(self):
        return {'num_layers': int(self.config.num_layers), 'kv_heads': int(self.config.num_heads),
                'head_dim': int(self.config.head_size), 'state': ('context_length', 'mask_position')}

    def next_token_loss(self, input_ids, attention_mask=None, labels=None, position_ids=None):
        input_ids, attention_mask, labels, position_ids = self.loss_batch(input_ids, attention_mask, labels,
                                                                          position_ids)
        targets, weights = self.loss_targets(input_ids, attention_mask, labels)
        if position_ids is not None and position_ids.shape[-1] == input_ids.shape[1]:
            position_ids = position_ids[:, :, :-1]
        logits = self.logits(input_ids[:, :-1], None, None, None, position_ids)
        return self.token_loss(logits, targets, weights, input_ids.shape[0])

    def construct(self, input_ids, attention_mask=None, labels=None, position_ids=None):
        if not self.training:
            batch, seq = input_ids.shape
            return self.logits(input_ids, attention_mask, None, None, position_ids).reshape(batch, seq, self.vocab_size)
        loss, _ = self.next_token_loss(input_ids, attention_mask, labels, position_ids)
        return loss

@MindFormerRegister.register(MindFormerModuleType.MODELS)
class GLMChatModel(ChatMixin, GLMForPreTraining):
    """ChatGLM-6B for chat: `GLMForPreTraining` plus `chat` / `stream_chat` (`ChatMixin`) with the v1 prompt of
    `ChatGLMTokenizer.build_prompt` ("[Round i]\\n问：...\\n答：...\\n"), encoded with its `[gMASK] <sop>` ending."""
