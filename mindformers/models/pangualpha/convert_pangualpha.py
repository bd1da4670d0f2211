"""PanGu-alpha weights: the HuggingFace port (`GPTPanguForCausalLM`, model_type `gpt_pangu`) or MindSpore PanGu
checkpoints (MindFormers r1.0 / the original release) <-> our `PanguAlphaHeadModel`.

HF port: `transformer.wte/wpe/wqe`, `transformer.h.{i}` (`ln_1`, `attn.q_proj/k_proj/v_proj/c_proj`, `ln_2`,
`mlp.c_fc/c_proj`, all nn.Linear [out, in] like ours, so nothing is transposed), `transformer.ln_f`; the LAST
`h` (index num_layers - 1) is the query layer. `lm_head.weight` is tied to `wte` and dropped (an untied one is
refused). MindSpore naming: `backbone.embedding.{word,position}_embedding.embedding_table`,
`backbone.top_query_embedding.embedding_table`, `backbone.blocks.{i}` and `backbone.top_query_layer`
(`layernorm1/2.gamma/beta`, `attention.dense1..3` [out, in], `attention.projection`, `output.mapping`,
`output.projection` [in, out]: transposed), `backbone.layernorm`; optimizer states are skipped. A directory
holding one merged `.ckpt` is read with the original release's `word_embedding.npy`, `position_embedding.npy` and
`top_query_embedding.npy` beside it (merge the 512 released shards first, e.g. with `mindformers/tools/
transform_ckpt.py`). MindSpore checkpoints carry no config: give `--config` (a run YAML such as
configs/pangualpha/run_pangualpha_2_6b.yaml), else the sizes are read off the tensors and the head count guessed.
`--reversed` writes a HF-port directory (`config.json` with `activation_function: quick_gelu` + safetensors).

    python convert_weight.py --model pangualpha --input_path <HF-port dir | MindSpore ckpt or dir> \\
        --output_path pangualpha.ckpt [--config configs/pangualpha/run_pangualpha_2_6b.yaml]
    python convert_weight.py --model pangualpha --reversed --input_path pangualpha.ckpt --output_path <HF dir>
"""
import os
import re

import numpy as np

from mindformers.models.convert_utils import (ConversionError, FamilyConverter, NameTable, Rule, TensorView,
                                              load_hf_weights, load_ms_weights)
from mindformers.models.pangualpha.pangualpha_config import PanguAlphaConfig

__all__ = ['ConversionError', 'config_from_hf', 'config_to_hf', 'convert_hf_to_ms', 'convert_ms_to_hf',
           'convert_ms_to_pt', 'convert_pt_to_ms', 'infer_config', 'load_config', 'read_input']

OURS = 'backbone.'
QUERY_LAYER = 'backbone.top_query_layer.'
HF_QUERY_LAYER = 'transformer.top_query_layer.'  # what the last transformer.h.{n-1} is renamed to while converting
# (HF-port part, our part) of one layer, nothing transposed
_HF_LAYER = [('ln_1', 'input_layernorm'), ('attn.q_proj', 'attention.q_proj'), ('attn.k_proj', 'attention.k_proj'),
             ('attn.v_proj', 'attention.v_proj'), ('attn.c_proj', 'attention.o_proj'),
             ('ln_2', 'post_attention_layernorm'), ('mlp.c_fc', 'mlp.fc_in'), ('mlp.c_proj', 'mlp.fc_out')]
_HF_TOP = [('transformer.wte.weight', OURS + 'embed_tokens.weight'),
           ('transformer.wpe.weight', OURS + 'embed_positions.weight'),
           ('transformer.wqe.weight', OURS + 'embed_top_query.weight'),
           ('transformer.ln_f.weight', OURS + 'final_layernorm.weight'),
           ('transformer.ln_f.bias', OURS + 'final_layernorm.bias')]
HF_TABLE = NameTable(_HF_TOP + [(f'{theirs}.{hf}.{p}', f'{ours}{ms}.{p}')
                                for theirs, ours in (('transformer.h.{i}', OURS + 'layers.{i}.'),
                                                     (HF_QUERY_LAYER[:-1], QUERY_LAYER))
                                for hf, ms in _HF_LAYER for p in ('weight', 'bias')],
                     skip=r'^lm_head\.weight$|\.attn\.(bias|masked_bias)$')

# (MindSpore part, our part, weight transposed); LayerNorm gamma/beta are weight/bias
_MS_LAYER = [('layernorm1', 'input_layernorm', None), ('attention.dense1', 'attention.q_proj', False),
             ('attention.dense2', 'attention.k_proj', False), ('attention.dense3', 'attention.v_proj', False),
             ('attention.projection', 'attention.o_proj', True), ('layernorm2', 'post_attention_layernorm', None),
             ('output.mapping', 'mlp.fc_in', True), ('output.projection', 'mlp.fc_out', True)]


def _ms_layer_rules(theirs, ours):
    rules = []
    for ms_part, our_part, transposed in _MS_LAYER:
        if transposed is None:
            rules += [(f'{theirs}.{ms_part}.gamma', f'{ours}{our_part}.weight'),
                      (f'{theirs}.{ms_part}.beta', f'{ours}{our_part}.bias')]
        else:
            rules += [Rule(f'{theirs}.{ms_part}.weight', f'{ours}{our_part}.weight', transposed),
                      (f'{theirs}.{ms_part}.bias', f'{ours}{our_part}.bias')]
    return rules


MS_TABLE = NameTable([
    ('backbone.embedding.word_embedding.embedding_table', OURS + 'embed_tokens.weight'),
    ('backbone.embedding.position_embedding.embedding_table', OURS + 'embed_positions.weight'),
    ('backbone.top_query_embedding.embedding_table', OURS + 'embed_top_query.weight'),
    ('backbone.layernorm.gamma', OURS + 'final_layernorm.weight'),
    ('backbone.layernorm.beta', OURS + 'final_layernorm.bias'),
] + _ms_layer_rules('backbone.blocks.{i}', OURS + 'layers.{i}.') + _ms_layer_rules('backbone.top_query_layer',
                                                                                    QUERY_LAYER),
    skip=r'^(adam_[mv]|moment[12]|accu_grads|global_step|learning_rate|scale_sense|beta[12]_power|epoch_num|'
         r'step_num|loss_scale|current_iterator_step|last_overflow_iterator_step)')

# the original release's embedding tables, stored beside the checkpoint
RELEASE_NPY = {'word_embedding.npy': 'backbone.embedding.word_embedding.embedding_table',
               'position_embedding.npy': 'backbone.embedding.position_embedding.embedding_table',
               'top_query_embedding.npy': 'backbone.top_query_embedding.embedding_table'}
_HF_FILES = ('model.safetensors', 'model.safetensors.index.json', 'pytorch_model.bin', 'pytorch_model.bin.index.json')

# HF-port activation names -> ours. The port's config says 'gelu', but the MindSpore checkpoints were trained with
# fast_gelu (= quick_gelu), so 'gelu' is read as fast_gelu (specs/models.md 7.1).
_HF_ACTIVATIONS = {'gelu': 'fast_gelu', 'quick_gelu': 'fast_gelu', 'fast_gelu': 'fast_gelu', 'gelu_new': 'gelu',
                   'relu': 'relu'}
_TO_HF_ACTIVATIONS = {'fast_gelu': 'quick_gelu', 'quick_gelu': 'quick_gelu', 'gelu': 'gelu_new',
                      'gelu_new': 'gelu_new', 'relu': 'relu'}
_KNOWN_HEADS = {2560: 32, 5120: 40}  # PanGu-alpha 2.6B and 13B


def read_input(input_path):
    """Foreign tensors of `input_path`: a HF-port directory or file, a MindSpore `.ckpt`, or a directory holding
    one merged `.ckpt` (with the original release's embedding `.npy` files beside it, if any)."""
    if os.path.isdir(input_path) and not any(os.path.isfile(os.path.join(input_path, f)) for f in _HF_FILES):
        ckpts = sorted(f for f in os.listdir(input_path) if f.endswith('.ckpt'))
        if len(ckpts) != 1:
            raise ConversionError(f"{input_path} holds no HF weights and {len(ckpts)} .ckpt files; give one merged "
                                  f"MindSpore checkpoint (merge the released shards first, e.g. with "
                                  f"mindformers/tools/transform_ckpt.py)")
        input_path = os.path.join(input_path, ckpts[0])
    if not input_path.endswith('.ckpt'):
        return load_hf_weights(input_path)
    weights = load_ms_weights(input_path)
    directory = os.path.dirname(os.path.abspath(input_path))
    for file_name, name in RELEASE_NPY.items():
        path = os.path.join(directory, file_name)
        if os.path.isfile(path):
            if name in weights:
                raise ConversionError(f"{name} is both in {input_path} and in {path}; remove one")
            weights[name] = np.load(path, allow_pickle=False)
    return weights


class PanguAlphaConverter(FamilyConverter):
    """HF-port `GPTPanguForCausalLM` / MindSpore PanGu-alpha <-> our `PanguAlphaHeadModel`."""

    family = 'PanGu-alpha'
    config_class = PanguAlphaConfig
    model_class = 'mindformers.models.pangualpha.modeling_pangualpha:PanguAlphaHeadModel'
    hf_model_types = ('gpt_pangu', 'pangualpha')
    input_tables = (HF_TABLE, MS_TABLE)
    output_table = HF_TABLE

    def read_input(self, input_path):
        return read_input(input_path)

    def is_ours(self, data):
        return 'type' in data or 'num_layers' in data and 'model_type' not in data

    def prepare_hf(self, state_dict, config):
        """The HF port's last `transformer.h` is the query layer; an untied `lm_head.weight` is refused."""
        head, embedding = state_dict.get('lm_head.weight'), state_dict.get('transformer.wte.weight')
        if head is not None and embedding is not None and not np.array_equal(np.asarray(head),
                                                                                 np.asarray(embedding)):
            raise ConversionError("lm_head.weight differs from transformer.wte.weight: PanGu-alpha ties its output "
                                  "head to the word embedding, an untied head cannot be converted")
        last = f'transformer.h.{config.num_layers - 1}.'
        return TensorView(state_dict, {HF_QUERY_LAYER + name[len(last):] if name.startswith(last) else name: name
                                       for name in state_dict})

    def raise_if(self, config, problems):
        try:
            super().raise_if(config, problems)
        except ConversionError as err:
            raise ConversionError(str(err).replace(HF_QUERY_LAYER, f'transformer.h.{config.num_layers - 1}.')) \
                from None

    def convert_ms_to_hf(self, state_dict, config):
        out = super().convert_ms_to_hf(state_dict, config)
        last = f'transformer.h.{config.num_layers - 1}.'
        return {last + name[len(HF_QUERY_LAYER):] if name.startswith(HF_QUERY_LAYER) else name: value
                for name, value in out.items()}

    def config_from_hf(self, hf_config):
        """A PanguAlphaConfig from the HF port's `config.json` mapping (GPTPanguConfig field names)."""
        act = hf_config.get('activation_function', 'gelu')
        if act not in _HF_ACTIVATIONS:
            raise ConversionError(f"HF activation_function {act!r} has no equivalent here "
                                  f"(supported: {', '.join(_HF_ACTIVATIONS)})")
        get = hf_config.get
        return PanguAlphaConfig(vocab_size=get('vocab_size', 40000), hidden_size=get('hidden_size', 2560),
                                ffn_hidden_size=get('intermediate_size'), num_layers=get('num_layers', 32),
                                num_heads=get('num_heads', 32), seq_length=get('max_position_embeddings', 1024),
                                hidden_act=_HF_ACTIVATIONS[act], layernorm_epsilon=get('layer_norm_epsilon', 1e-5),
                                embedding_dropout_prob=get('embd_pdrop', 0.1),
                                hidden_dropout_rate=get('resid_pdrop', 0.1),
                                attention_dropout_rate=get('attn_pdrop', 0.1),
                                initializer_range=get('initializer_range', 0.02),
                                bos_token_id=get('bos_token_id', 9), eos_token_id=get('eos_token_id', 9),
                                pad_token_id=get('pad_token_id') if get('pad_token_id') is not None else 6)

    def config_to_hf(self, config, dtype='float32'):
        """The HF-port `config.json` mapping of our PanguAlphaConfig."""
        if config.hidden_act not in _TO_HF_ACTIVATIONS:
            raise ConversionError(f"hidden_act {config.hidden_act!r} has no HF equivalent")
        return {'architectures': ['GPTPanguForCausalLM'], 'model_type': 'gpt_pangu',
                'vocab_size': config.vocab_size, 'max_position_embeddings': config.seq_length,
                'hidden_size': config.hidden_size, 'intermediate_size': config.ffn_size,
                'num_layers': config.num_layers, 'num_heads': config.num_heads,
                'activation_function': _TO_HF_ACTIVATIONS[config.hidden_act],
                'resid_pdrop': config.hidden_dropout_rate, 'embd_pdrop': config.embedding_dropout_prob,
                'attn_pdrop': config.attention_dropout_rate, 'layer_norm_epsilon': config.layernorm_epsilon,
                'initializer_range': config.initializer_range, 'bos_token_id': config.bos_token_id,
                'eos_token_id': config.eos_token_id, 'pad_token_id': config.pad_token_id,
                'tie_word_embeddings': True, 'torch_dtype': dtype}

    def infer_config(self, weights, ms_names=False):
        """A PanguAlphaConfig sized from the tensors (HF-port, MindSpore or our names); the head count is not
        stored in any shape: 32 for hidden 2560 and 40 for 5120 (the public sizes), else hidden / 64 (or 1)."""
        def find(*names):
            for name in names:
                if name in weights:
                    return np.asarray(weights[name]).shape
            raise ConversionError(f"cannot size the model: no tensor {names[0]!r} in the input; give the model's "
                                  f"config (convert_weight.py --config)")
        vocab, hidden = find(OURS + 'embed_tokens.weight', 'transformer.wte.weight',
                             'backbone.embedding.word_embedding.embedding_table')
        positions = find(OURS + 'embed_positions.weight', 'transformer.wpe.weight',
                         'backbone.embedding.position_embedding.embedding_table')[0]
        ffn = max(find(OURS + 'layers.0.mlp.fc_in.weight', 'transformer.h.0.mlp.c_fc.weight',
                       'backbone.blocks.0.output.mapping.weight'))
        pattern = re.compile(r'(?:^|\.)(?:h|layers|blocks)\.(\d+)\.')
        indices = [int(m.group(1)) for m in map(pattern.search, weights) if m]
        if not indices:
            raise ConversionError("cannot size the model: the input holds no transformer layers")
        hf_names = any(name.startswith('transformer.h.') for name in weights)
        num_layers = max(indices) + 1 + (0 if hf_names else 1)  # the HF port's h includes the query layer
        heads = _KNOWN_HEADS.get(hidden) or (hidden // 64 if hidden % 64 == 0 else 1)
        return PanguAlphaConfig(vocab_size=vocab, hidden_size=hidden, num_layers=num_layers, num_heads=heads,
                                seq_length=positions, ffn_hidden_size=ffn)

    def config_beside(self, input_path, weights=None):
        config = super().config_beside(input_path, weights)
        if config is None and weights is not None and any(n.startswith('backbone.') for n in weights):
            from mindformers.tools.logger import logger
            config = self.infer_config(weights)
            logger.warning("no config given for MindSpore PanGu-alpha weights: sized from the tensors, num_heads "
                           "%d guessed; pass --config <run YAML> to set it", config.num_heads)
        return config

    def guessed(self, config):
        from mindformers.tools.logger import logger
        logger.warning("num_heads is not stored in the weights: config.json gets num_heads=%d; pass the model's "
                       "config (convert_weight.py --config) to set it", config.num_heads)


CONVERTER = PanguAlphaConverter()
(convert_hf_to_ms, convert_ms_to_hf, convert_pt_to_ms, convert_ms_to_pt, load_config, config_from_hf,
 config_to_hf) = CONVERTER.entry_points()
infer_config = CONVERTER.infer_config
