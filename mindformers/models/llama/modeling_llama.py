"""LLaMA / LLaMA-2: pre-RMSNorm blocks of rotary grouped-query attention and a SwiGLU MLP, untied LM head.

The decoder reads its architecture from one typed `DecoderSpec` (`config.decoder_spec()`: sizes, rotary, norm type,
biases, tied head) and its run settings (seq_length, dtypes, init, parallel config) from the config, so other
families with this topology and their own config names (ChatGLM2, PengCheng.Mind) build on it by filling the spec.
Parameter names match HF `LlamaForCausalLM`."""
import mindspore as ms
from mindspore import nn, ops

from mindformers.models.base_model import CausalLMModel
from mindformers.models.llama.llama_config import LlamaConfig
from mindformers.modules import CausalMask, Embedding, GatedMLP, GroupedQueryAttention
from mindformers.modules.layers import TiedLMHead, output_head, place_last, place_layers, to_mstype
from mindformers.modules.norm import build_norm
from mindformers.modules.rotary import RotaryEmbedding
from mindformers.tools.register import MindFormerRegister, MindFormerModuleType


class LlamaDecoderLayer(nn.Cell):
    """x + self_attn(norm(x)), then + mlp(norm(.)) (norm: RMSNorm, or LayerNorm by `spec.norm_type`): x [B, S, H],
    mask, rotary tables, cache and write as for `GroupedQueryAttention` -> [B, S, H]."""

    def __init__(self, config, spec, rotary):
        super().__init__()
        hidden, parallel = spec.hidden_size, config.parallel_config
        norm_args = dict(eps=spec.norm_eps, param_init_type=config.param_init_type,
                         compute_type=config.layernorm_compute_type, parallel_config=parallel)
        common = dict(init_std=config.initializer_range, param_init_type=config.param_init_type,
                      compute_dtype=config.compute_dtype, parallel_config=parallel)
        self.input_layernorm = build_norm(spec.norm_type, hidden, **norm_args)
        self.self_attn = GroupedQueryAttention(hidden, spec.num_heads, spec.kv_heads, spec.head_size,
                                               qkv_bias=spec.attention_bias, out_bias=spec.out_bias, rotary=rotary,
                                               softmax_compute_type=config.softmax_compute_type, **common)
        self.post_attention_layernorm = build_norm(spec.norm_type, hidden, **norm_args)
        self.mlp = GatedMLP(hidden, spec.ffn_size, has_bias=spec.mlp_bias, **common)

    def construct(self, x, mask, cos, sin, cache=None, write=None):
        x = self.self_attn(self.input_layernorm(x), mask, cos, sin, cache, write, residual=x)
        return self.mlp(self.post_attention_layernorm(x), residual=x)


@MindFormerRegister.register(MindFormerModuleType.MODELS)
class LlamaModel(nn.Cell):
    """The decoder: input_ids [B, S] int32 (S <= seq_length) -> final hidden states [B, S, H] after the last norm.
    `attention_mask` [B, S] (1 = token, 0 = padding) is optional: padded keys are hidden and positions count from
    each row's first real token (left-padded generation batches). With `cache` (a decoding session's `CacheView`)
    and `step` = (positions [B, S] int32, additive mask, write), the tokens continue the session's sequences (see
    `mindformers.generation.session`)."""

    def __init__(self, config):
        super().__init__()
        spec, parallel = config.decoder_spec(), config.parallel_config
        self.seq_length, self.num_heads = config.seq_length, spec.num_heads
        self.compute_dtype = to_mstype(config.compute_dtype)
        self.embed_tokens = Embedding(spec.vocab_size, spec.hidden_size, config.initializer_range,
                                      config.param_init_type, parallel)
        self.rotary = RotaryEmbedding(spec.head_size, config.seq_length, spec.rotary_size, spec.rope_theta,
                                      spec.rotary_interleaved, spec.extend_method, spec.scaling_factor,
                                      config.rotary_dtype)
        self.causal_mask = CausalMask(config.seq_length, config.softmax_compute_type)
        self.layers = nn.CellList([LlamaDecoderLayer(config, spec, self.rotary) for _ in range(spec.num_layers)])
        self.norm = build_norm(spec.norm_type, spec.hidden_size, spec.norm_eps, config.param_init_type,
                               config.layernorm_compute_type, parallel)
        place_layers(self.layers, parallel, config.offset)
        place_last(parallel, self.norm)

    def construct(self, input_ids, attention_mask=None, cache=None, step=None):
        seq = input_ids.shape[1]
        if seq > self.seq_length:
            raise ValueError(f"input_ids has {seq} tokens per row, more than seq_length {self.seq_length}")
        hidden = self.embed_tokens(input_ids)
        if hidden.dtype != self.compute_dtype:
            hidden = ops.cast(hidden, self.compute_dtype)
        write = None
        if cache is not None:
            positions, mask, write = step
            cos, sin = self.rotary.tables(positions)
        elif attention_mask is None:
            mask = None  # the plain causal mask
            cos, sin = self.rotary.static_tables(seq)
        else:
            mask, positions = self.causal_mask.with_padding(attention_mask, self.num_heads)
            cos, sin = self.rotary.tables(positions)
        for index, layer in enumerate(self.layers):
            hidden = layer(hidden, mask, cos, sin, None if cache is None else cache.layers[index], write)
        return self.norm(hidden)


@MindFormerRegister.register(MindFormerModuleType.MODELS)
class LlamaForCausalLM(CausalLMModel):
    """LLaMA with its own output head `lm_head` [vocab, hidden] (with `spec.tied_head` a `TiedLMHead` without a
    weight: the logits are then taken against `model.embed_tokens.weight`). Training and inference contracts:
    `CausalLMModel` (one forward for training, prefill and decode)."""

    def __init__(self, config: LlamaConfig):
        super().__init__(config)
        config.validate()
        self.model = LlamaModel(config)
        parallel = config.parallel_config
        self.tied_head = config.decoder_spec().tied_head
        if self.tied_head:
            self.lm_head = TiedLMHead(parallel)
            self.parameter_inputs = {'model.embed_tokens.weight': ('lm_head.matmul', 1)}
        else:
            self.lm_head = output_head(config, parallel)
        place_last(parallel, self.lm_head, self.loss)
        self.load_checkpoint(config)

    def head(self, hidden):
        """Final hidden states [N, hidden] -> fp32 logits [N, vocab_size]."""
        if self.tied_head:
            return self.lm_head(hidden, self.model.embed_tokens.table())
        logits = self.lm_head(hidden)
        return logits if logits.dtype == ms.float32 else ops.cast(logits, ms.float32)

    def logits(self, input_ids, attention_mask=None, cache=None, step=None):
        return self.head(self.logit_rows(self.model(input_ids, attention_mask, cache, step), cache))

    def kv_cache_layout(self):
        spec = self.config.decoder_spec()
        return {'num_layers': spec.num_layers, 'kv_heads': spec.kv_heads, 'head_dim': spec.head_size}
