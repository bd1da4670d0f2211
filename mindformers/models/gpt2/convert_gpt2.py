"""GPT-2 weights: HuggingFace `GPT2LMHeadModel` <-> mindformers `GPT2LMHeadModel`.

HF stores its projections as `Conv1D` weights [in, out] (y = x W + b); ours are `Linear` weights [out, in], so every
projection is transposed. The fused `c_attn` (q | k | v) maps onto our fused `qkv_proj` unchanged apart from that.
HF's `lm_head.weight` is tied to `wte` and dropped (an untied one is refused); the causal-mask buffers
`attn.bias` / `attn.masked_bias` of older files are skipped. HF names are accepted with or without the
`transformer.` prefix and written with it. The machinery is `convert_utils.FamilyConverter`.

    python convert_weight.py --model gpt2 --input_path <HF dir or file> --output_path gpt2.ckpt
    python convert_weight.py --model gpt2 --reversed --input_path gpt2.ckpt --output_path <HF dir | file.safetensors>
"""
import re

import numpy as np

from mindformers.models.convert_utils import (ConversionError, FamilyConverter, NameTable, Rule, load_hf_weights,
                                              load_ms_weights, save_ms_weights)
from mindformers.models.gpt2.gpt2_config import GPT2Config

__all__ = ['ConversionError', 'config_from_hf', 'config_to_hf', 'convert_hf_to_ms', 'convert_ms_to_hf',
           'convert_ms_to_pt', 'convert_pt_to_ms', 'infer_config', 'load_config', 'load_hf_weights',
           'load_ms_weights', 'save_ms_weights']

HF_PREFIX = 'transformer.'
# (HF name, our name, transposed); '{i}' is the layer index
_TOP = [('wte.weight', 'backbone.embed_tokens.weight', False),
        ('wpe.weight', 'backbone.embed_positions.weight', False),
        ('ln_f.weight', 'backbone.final_layernorm.weight', False),
        ('ln_f.bias', 'backbone.final_layernorm.bias', False)]
_LAYER = [('ln_1.weight', 'input_layernorm.weight', False),
          ('ln_1.bias', 'input_layernorm.bias', False),
          ('attn.c_attn.weight', 'attention.qkv_proj.weight', True),
          ('attn.c_attn.bias', 'attention.qkv_proj.bias', False),
          ('attn.c_proj.weight', 'attention.o_proj.weight', True),
          ('attn.c_proj.bias', 'attention.o_proj.bias', False),
          ('ln_2.weight', 'post_attention_layernorm.weight', False),
          ('ln_2.bias', 'post_attention_layernorm.bias', False),
          ('mlp.c_fc.weight', 'mlp.fc_in.weight', True),
          ('mlp.c_fc.bias', 'mlp.fc_in.bias', False),
          ('mlp.c_proj.weight', 'mlp.fc_out.weight', True),
          ('mlp.c_proj.bias', 'mlp.fc_out.bias', False)]
_RULES = _TOP + [(f'h.{{i}}.{hf}', f'backbone.layers.{{i}}.{ms}', t) for hf, ms, t in _LAYER]
# written with the prefix, read with or without it
HF_TABLE = NameTable([Rule(HF_PREFIX + hf, ms, t) for hf, ms, t in _RULES] + [Rule(*rule) for rule in _RULES],
                     skip=r'^(transformer\.)?(lm_head\.weight|h\.\d+\.attn\.(bias|masked_bias))$')

_HF_ACTIVATIONS = {'gelu_new': 'gelu', 'gelu_pytorch_tanh': 'gelu', 'gelu_fast': 'gelu', 'quick_gelu': 'quick_gelu',
                   'relu': 'relu'}
_TO_HF_ACTIVATIONS = {'gelu': 'gelu_new', 'gelu_new': 'gelu_new', 'fast_gelu': 'quick_gelu',
                      'quick_gelu': 'quick_gelu', 'relu': 'relu'}


class GPT2Converter(FamilyConverter):
    """HF `GPT2LMHeadModel` <-> our `GPT2LMHeadModel`."""

    family = 'GPT-2'
    config_class = GPT2Config
    model_class = 'mindformers.models.gpt2.modeling_gpt2:GPT2LMHeadModel'
    hf_model_types = ('gpt2',)
    input_tables = (HF_TABLE,)
    output_table = HF_TABLE
    peft_tables = (HF_TABLE,)

    def is_ours(self, data):
        return 'num_layers' in data or 'type' in data

    def prepare_hf(self, state_dict, config):
        """GPT-2's output head is the token embedding; a checkpoint whose `lm_head.weight` differs cannot be
        mapped."""
        head = state_dict.get('lm_head.weight')
        embedding = next((state_dict[n] for n in ('wte.weight', HF_PREFIX + 'wte.weight') if n in state_dict), None)
        if head is not None and embedding is not None:
            head, embedding = np.asarray(head), np.asarray(embedding)
            if head.shape != embedding.shape or not np.array_equal(head, embedding):
                raise ConversionError("lm_head.weight differs from transformer.wte.weight: GPT-2 here ties its output "
                                      "head to the token embedding, an untied head cannot be converted")
        return state_dict

    def config_from_hf(self, hf_config):
        """A GPT2Config from a HF GPT-2 `config.json` mapping."""
        act = hf_config.get('activation_function', 'gelu_new')
        if act not in _HF_ACTIVATIONS:
            raise ConversionError(f"HF activation_function {act!r} has no equivalent here "
                                  f"(supported: {', '.join(_HF_ACTIVATIONS)})")
        if hf_config.get('scale_attn_by_inverse_layer_idx') or not hf_config.get('scale_attn_weights', True):
            raise ConversionError("HF config with scale_attn_by_inverse_layer_idx=True or scale_attn_weights=False "
                                  "is not supported")
        hidden = hf_config.get('n_embd', 768)
        inner = hf_config.get('n_inner') or 4 * hidden
        if inner % hidden:
            raise ConversionError(f"HF n_inner ({inner}) is not a multiple of n_embd ({hidden}); GPT2Config only "
                                  f"has an integer expand_ratio")
        eos = hf_config.get('eos_token_id', 50256)
        pad = hf_config.get('pad_token_id')
        return GPT2Config(vocab_size=hf_config.get('vocab_size', 50257), hidden_size=hidden,
                          num_layers=hf_config.get('n_layer', 12), num_heads=hf_config.get('n_head', 12),
                          seq_length=hf_config.get('n_positions', 1024),
                          expand_ratio=inner // hidden,
                          layernorm_epsilon=hf_config.get('layer_norm_epsilon', 1e-5),
                          hidden_act=_HF_ACTIVATIONS[act],
                          embedding_dropout_prob=hf_config.get('embd_pdrop', 0.1),
                          hidden_dropout_rate=hf_config.get('resid_pdrop', 0.1),
                          attention_dropout_rate=hf_config.get('attn_pdrop', 0.1),
                          initializer_range=hf_config.get('initializer_range', 0.02),
                          bos_token_id=hf_config.get('bos_token_id', 50256), eos_token_id=eos,
                          pad_token_id=eos if pad is None else pad)  # GPT-2 pads with EOS

    def config_to_hf(self, config, dtype='float32'):
        """The HF `config.json` mapping (`GPT2LMHeadModel`) of our GPT2Config."""
        if config.hidden_act not in _TO_HF_ACTIVATIONS:
            raise ConversionError(f"hidden_act {config.hidden_act!r} has no HF GPT-2 equivalent")
        return {'architectures': ['GPT2LMHeadModel'], 'model_type': 'gpt2', 'vocab_size': config.vocab_size,
                'n_positions': config.seq_length, 'n_embd': config.hidden_size, 'n_layer': config.num_layers,
                'n_head': config.num_heads, 'n_inner': config.expand_ratio * config.hidden_size,
                'activation_function': _TO_HF_ACTIVATIONS[config.hidden_act],
                'resid_pdrop': config.hidden_dropout_rate, 'embd_pdrop': config.embedding_dropout_prob,
                'attn_pdrop': config.attention_dropout_rate, 'layer_norm_epsilon': config.layernorm_epsilon,
                'initializer_range': config.initializer_range, 'bos_token_id': config.bos_token_id,
                'eos_token_id': config.eos_token_id, 'pad_token_id': config.pad_token_id,
                'tie_word_embeddings': True, 'torch_dtype': dtype}

    def infer_config(self, weights, ms_names=False):
        """A GPT2Config sized from the tensors themselves (HF names, or ours with `ms_names`); heads do not change
        any weight shape, so num_heads is taken as hidden_size / 64 where that divides."""
        def find(hf_name):
            name = HF_TABLE.ours_of(hf_name)[0] if ms_names else hf_name
            for candidate in (name, HF_PREFIX + name):
                if candidate in weights:
                    return np.asarray(weights[candidate]).shape
            raise ConversionError(f"cannot size the model: no tensor {name!r} in the input")
        vocab, hidden = find('wte.weight')
        positions = find('wpe.weight')[0]
        pattern = re.compile(r'(?:^|\.)(?:h|layers)\.(\d+)\.')
        indices = [int(m.group(1)) for m in map(pattern.search, weights) if m]
        num_layers = max(indices) + 1 if indices else 0
        if not num_layers:
            raise ConversionError("cannot size the model: the input holds no transformer layers")
        try:
            fc_in = find('h.0.mlp.c_fc.weight')
            expand_ratio = max((fc_in[0] if ms_names else fc_in[-1]) // hidden, 1)
        except ConversionError:
            expand_ratio = 4  # the missing tensor is reported by the conversion itself
        return GPT2Config(vocab_size=vocab, hidden_size=hidden, num_layers=num_layers,
                          num_heads=hidden // 64 if hidden % 64 == 0 else 1, seq_length=positions,
                          expand_ratio=expand_ratio)

    def guessed(self, config):
        from mindformers.tools.logger import logger
        logger.warning("num_heads is not stored in the weights: config.json gets n_head=%d (head size %d); "
                       "pass the model's config (convert_weight.py --config) to set it", config.num_heads,
                       config.hidden_size // config.num_heads)


CONVERTER = GPT2Converter()
(convert_hf_to_ms, convert_ms_to_hf, convert_pt_to_ms, convert_ms_to_pt, load_config, config_from_hf,
 config_to_hf) = CONVERTER.entry_points()
infer_config = CONVERTER.infer_config
