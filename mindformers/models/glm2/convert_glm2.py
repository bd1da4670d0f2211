"""ChatGLM2 weights: HuggingFace `GlmForCausalLM` (model_type `glm`) or the original ChatGLM2 files (model_type
`chatglm`, THUDM remote code) <-> our `ChatGLM2ForConditionalGeneration`.

Our parameter names are our LLaMA's (q/k/v biases added). From `glm` naming only the fused `mlp.gate_up_proj`
([gate; up] rows) is split. From `chatglm` naming `query_key_value` is split by size into q (heads * kv_channels
rows), k and v (groups * kv_channels each), `dense_h_to_4h` into gate (first half) and up (second half); the rest
is renamed and `rotary_pos_emb.inv_freq` skipped. No RoPE permutation: our model rotates interleaved pairs on the
first half of each head, as both formats do. `--reversed` writes a `GlmForCausalLM` directory. THUDM's P-Tuning v2
checkpoint (`transformer.prefix_encoder.*`, `pre_seq_len` in its config.json) converts to our `ptuning2` prefix
encoder, alone (a delta to load over the converted base weights) or with the base.

    python convert_weight.py --model glm2 --input_path <HF glm | chatglm dir> --output_path glm2.ckpt
    python convert_weight.py --model glm2 --reversed --input_path glm2.ckpt --output_path <HF dir> --config <cfg>
"""
from mindformers.models.convert_utils import ConversionError, FamilyConverter, NameTable
from mindformers.models.glm2.glm2_config import ChatGLM2Config
from mindformers.models.llama.convert_llama import (HF_SKIP, LAYER, LAYER_NAMES, TOP_NAMES, decoder_config_to_hf,
                                                    decoder_sizes_from_hf)

__all__ = ['ConversionError', 'config_from_hf', 'config_to_hf', 'convert_hf_to_ms', 'convert_ms_to_hf',
           'convert_ms_to_pt', 'convert_pt_to_ms', 'load_config']

_Q, _K, _V = (LAYER + f'self_attn.{p}_proj.' for p in 'qkv')
_GATE_UP = (LAYER + 'mlp.gate_proj.weight', LAYER + 'mlp.up_proj.weight')
GLM_TABLE = NameTable([(name, name) for name in TOP_NAMES + LAYER_NAMES if name not in _GATE_UP]
                      + [(name + 'bias', name + 'bias') for name in (_Q, _K, _V)]
                      + [(LAYER + 'mlp.gate_up_proj.weight', _GATE_UP)], skip=HF_SKIP)

_OLD = 'transformer.encoder.layers.{i}.'
_PTUNING2 = 'prefix_encoder.mindpet_delta_ptuning2_'
CHATGLM_TABLE = NameTable([
    ('transformer.embedding.word_embeddings.weight', 'model.embed_tokens.weight'),
    ('transformer.encoder.final_layernorm.weight', 'model.norm.weight'),
    ('transformer.output_layer.weight', 'lm_head.weight'),
    (_OLD + 'input_layernorm.weight', LAYER + 'input_layernorm.weight'),
    (_OLD + 'self_attention.query_key_value.weight', (_Q + 'weight', _K + 'weight', _V + 'weight')),
    (_OLD + 'self_attention.query_key_value.bias', (_Q + 'bias', _K + 'bias', _V + 'bias')),
    (_OLD + 'self_attention.dense.weight', LAYER + 'self_attn.o_proj.weight'),
    (_OLD + 'post_attention_layernorm.weight', LAYER + 'post_attention_layernorm.weight'),
    (_OLD + 'mlp.dense_h_to_4h.weight', _GATE_UP),
    (_OLD + 'mlp.dense_4h_to_h.weight', LAYER + 'mlp.down_proj.weight'),
    # P-Tuning v2 (mindformers/pet/prefix.py): the same [pre_seq_len, 2 * layers * groups * kv_channels] layout
    ('transformer.prefix_encoder.embedding.weight', _PTUNING2 + 'embedding.weight'),
    ('transformer.prefix_encoder.trans.{i}.weight', _PTUNING2 + 'trans.{i}.weight'),
    ('transformer.prefix_encoder.trans.{i}.bias', _PTUNING2 + 'trans.{i}.bias'),
], skip=r'^transformer\.rotary_pos_emb\.inv_freq$')

# transformers' GlmConfig defaults, for fields a config.json leaves out
_GLM_DEFAULTS = {'vocab_size': 151552, 'hidden_size': 4096, 'intermediate_size': 13696, 'num_hidden_layers': 40,
                 'num_attention_heads': 32, 'num_key_value_heads': 2, 'head_dim': 128, 'hidden_act': 'silu',
                 'max_position_embeddings': 131072, 'rms_norm_eps': 1.5625e-07}
# the original config.json fields ChatGLM2Config takes under the same names
_CHATGLM_FIELDS = ('padded_vocab_size', 'hidden_size', 'ffn_hidden_size', 'kv_channels', 'num_attention_heads',
                   'num_layers', 'seq_length', 'layernorm_epsilon', 'rope_ratio', 'rmsnorm',
                   'apply_residual_connection_post_layernorm', 'post_layer_norm', 'add_bias_linear', 'add_qkv_bias',
                   'multi_query_attention', 'multi_query_group_num', 'bos_token_id', 'eos_token_id', 'pad_token_id')


def _config_from_glm(hf_config):
    """A ChatGLM2Config from a HF `GlmForCausalLM` config.json mapping; refuses what ChatGLM2 cannot represent."""
    sizes = decoder_sizes_from_hf(hf_config, _GLM_DEFAULTS)
    rope = sizes['rope']
    if rope['rope_type'] != 'default':
        raise ConversionError(f"HF rope_type {rope['rope_type']!r} cannot be reproduced here (ChatGLM2 uses "
                              f"'default')")
    partial = rope.get('partial_rotary_factor', 0.5)  # GlmConfig's default
    if partial != 0.5:
        raise ConversionError(f"HF partial_rotary_factor {partial} is not supported (ChatGLM2 rotates half of "
                              f"each head: 0.5)")
    heads, kv_heads = sizes['heads'], sizes['kv_heads']
    return ChatGLM2Config(padded_vocab_size=sizes['vocab'], hidden_size=sizes['hidden'],
                          ffn_hidden_size=sizes['ffn'], num_layers=sizes['layers'], num_attention_heads=heads,
                          multi_query_attention=kv_heads != heads, multi_query_group_num=kv_heads,
                          kv_channels=sizes['head_dim'], seq_length=sizes['seq_length'],
                          layernorm_epsilon=sizes['eps'], rope_ratio=float(rope['rope_theta']) / 10000.0,
                          add_qkv_bias=bool(hf_config.get('attention_bias', True)), **sizes['tokens'])


def _config_from_chatglm(hf_config):
    """A ChatGLM2Config from the original ChatGLM2 (or ChatGLM3) config.json mapping."""
    if 'padded_vocab_size' not in hf_config or hf_config.get('position_encoding_2d'):
        raise ConversionError("this 'chatglm' config is not ChatGLM2's (no padded_vocab_size, or 2D positions as "
                              "in ChatGLM-6B v1, which this converter does not handle)")
    if not hf_config.get('original_rope', True):
        raise ConversionError("original_rope=False (a different RoPE) is not supported")
    if hf_config.get('tie_word_embeddings'):
        raise ConversionError("tie_word_embeddings=True is not supported (ChatGLM2's output_layer is separate)")
    fields = {key: hf_config[key] for key in _CHATGLM_FIELDS if hf_config.get(key) is not None}
    if hf_config.get('pre_seq_len'):  # THUDM's P-Tuning v2 (its MLP, if any, is hidden_size wide)
        fields['pet_config'] = {'pet_type': 'ptuning2', 'pre_seq_len': hf_config['pre_seq_len'],
                                'prefix_projection': bool(hf_config.get('prefix_projection')),
                                'projection_dim': hf_config.get('hidden_size', 4096)}
    return ChatGLM2Config(**fields)


class ChatGLM2Converter(FamilyConverter):
    """HF `GlmForCausalLM` / original ChatGLM2 <-> our `ChatGLM2ForConditionalGeneration`."""

    family = 'ChatGLM2'
    config_class = ChatGLM2Config
    model_class = 'mindformers.models.glm2.modeling_glm2:ChatGLM2ForConditionalGeneration'
    hf_model_types = ('glm', 'chatglm')
    input_tables = (GLM_TABLE, CHATGLM_TABLE)
    output_table = GLM_TABLE
    peft_tables = (GLM_TABLE, CHATGLM_TABLE)

    def config_from_hf(self, hf_config):
        """A ChatGLM2Config from a HF config.json mapping: `GlmForCausalLM` (model_type 'glm', the default) or
        the original ChatGLM2 (model_type 'chatglm')."""
        if hf_config.get('model_type', 'glm') == 'chatglm':
            return _config_from_chatglm(hf_config)
        return _config_from_glm(hf_config)

    def config_to_hf(self, config, dtype='float32'):
        """The HF `config.json` mapping (`GlmForCausalLM`) of our ChatGLM2Config."""
        spec = config.decoder_spec()
        rope = {'rope_type': 'default', 'rope_theta': float(spec.rope_theta), 'partial_rotary_factor': 0.5}
        return {'architectures': ['GlmForCausalLM'], 'model_type': 'glm', **decoder_config_to_hf(config, dtype),
                'rope_parameters': rope, 'attention_bias': spec.attention_bias}


CONVERTER = ChatGLM2Converter()
(convert_hf_to_ms, convert_ms_to_hf, convert_pt_to_ms, convert_ms_to_pt, load_config, config_from_hf,
 config_to_hf) = CONVERTER.entry_points()
