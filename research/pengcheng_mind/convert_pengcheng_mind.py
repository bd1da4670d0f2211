"""PengCheng.Mind weights: the MindSpore release naming of PengCheng's own code (PanGu-α style, `backbone.*`) <->
our `PengChengMindForCausalLM` (our LLaMA's names with biases and LayerNorm β, no `lm_head`).

    backbone.embedding.word_embedding.embedding_table  -> model.embed_tokens.weight (also the output head)
    backbone.blocks.{i}.layernorm1.gamma / .beta        -> model.layers.{i}.input_layernorm.weight / .bias
    backbone.blocks.{i}.attention.dense1|2|3.weight/bias -> ...self_attn.q_proj|k_proj|v_proj ([out, in] both)
    backbone.blocks.{i}.attention.projection.weight     -> ...self_attn.o_proj.weight, transposed ([in, out] there)
    backbone.blocks.{i}.layernorm2.gamma / .beta        -> ...post_attention_layernorm.weight / .bias
    backbone.blocks.{i}.output.mapping.weight [h, 2f]   -> transposed, rows [0:f] mlp.gate_proj, [f:2f] mlp.up_proj
    backbone.blocks.{i}.output.mapping.bias [2f]        -> [0:f] mlp.gate_proj.bias, [f:2f] mlp.up_proj.bias
    backbone.blocks.{i}.output.projection.weight [f, h] -> mlp.down_proj.weight, transposed
    backbone.layernorm.gamma / .beta                    -> model.norm.weight / .bias
Biases keep their names. Optimizer state in a training checkpoint (adam_m.*, global_step, ...) is skipped.
Both sides are MindSpore checkpoints (`.ckpt` / `.safetensors`); `--reversed` writes PengCheng's naming.

    python convert_weight.py --model pengcheng_mind --input_path pcm_7b.ckpt --output_path ours.ckpt \\
        [--config research/pengcheng_mind/run_pengcheng_mind_7b.yaml] [--dtype fp32]
    python convert_weight.py --model pengcheng_mind --reversed --input_path ours.ckpt --output_path pcm.ckpt
The released checkpoint is float16; the architecture comes from --config, else a config.json beside the input, else
the tensor shapes when they are those of the 7B model (whose 32 heads cannot be read off the weights).
"""
import os

from mindformers.models.convert_utils import (ConversionError, FamilyConverter, NameTable, Rule, check_dtype,
                                              open_ms_weights, save_ms_weights)

from .modeling_pengcheng_mind import PengChengMindForCausalLM
from .pengcheng_mind_config import PengChengMindConfig

__all__ = ['ConversionError', 'PCM_TABLE', 'config_from_hf', 'config_to_hf', 'convert_hf_to_ms', 'convert_ms_to_hf',
           'convert_ms_to_pt', 'convert_pt_to_ms', 'load_config']

_BLOCK, _LAYER = 'backbone.blocks.{i}.', 'model.layers.{i}.'
_EMBEDDING = 'backbone.embedding.word_embedding.embedding_table'


def _norm(theirs, ours):
    return [(theirs + 'gamma', ours + 'weight'), (theirs + 'beta', ours + 'bias')]


def _linear(theirs, ours, transposed=False):
    return [Rule(theirs + 'weight', ours + 'weight', transposed=transposed), (theirs + 'bias', ours + 'bias')]


PCM_TABLE = NameTable(
    [(_EMBEDDING, 'model.embed_tokens.weight')] + _norm('backbone.layernorm.', 'model.norm.')
    + _norm(_BLOCK + 'layernorm1.', _LAYER + 'input_layernorm.')
    + _linear(_BLOCK + 'attention.dense1.', _LAYER + 'self_attn.q_proj.')
    + _linear(_BLOCK + 'attention.dense2.', _LAYER + 'self_attn.k_proj.')
    + _linear(_BLOCK + 'attention.dense3.', _LAYER + 'self_attn.v_proj.')
    + _linear(_BLOCK + 'attention.projection.', _LAYER + 'self_attn.o_proj.', transposed=True)
    + _norm(_BLOCK + 'layernorm2.', _LAYER + 'post_attention_layernorm.')
    + [Rule(_BLOCK + 'output.mapping.weight', (_LAYER + 'mlp.gate_proj.weight', _LAYER + 'mlp.up_proj.weight'),
            transposed=True),
       (_BLOCK + 'output.mapping.bias', (_LAYER + 'mlp.gate_proj.bias', _LAYER + 'mlp.up_proj.bias'))]
    + _linear(_BLOCK + 'output.projection.', _LAYER + 'mlp.down_proj.', transposed=True),
    skip=r'^(adam_[mv]\.|moment[12]\.|accu_grads\.|(global_step|epoch_num|step_num|loss_scale|scale_sense|'
         r'learning_rate|beta[12]_power|current_iterator_step|last_overflow_iterator_step)$)')

# the released 7B, the one size whose head count is known without a config
_RELEASE_7B = dict(vocab_size=125952, hidden_size=4096, num_layers=32, num_heads=32, ffn_hidden_size=10880)


class PengChengMindConverter(FamilyConverter):
    """PengCheng's MindSpore checkpoint naming <-> our `PengChengMindForCausalLM` (both MindSpore checkpoints)."""

    family = 'PengCheng.Mind'
    config_class = PengChengMindConfig
    model_class = f'{PengChengMindForCausalLM.__module__}:PengChengMindForCausalLM'
    hf_model_types = ('pengcheng_mind',)
    input_tables = (PCM_TABLE,)
    output_table = PCM_TABLE

    def config_from_hf(self, hf_config):
        raise ConversionError("PengCheng.Mind has no HuggingFace config.json format; give our config.json "
                              "(PengChengMindConfig.save_pretrained) or a run YAML (--config)")

    def config_to_hf(self, config, dtype='float32'):
        raise ConversionError("PengCheng.Mind has no HuggingFace format; its weights are written as a MindSpore "
                              "checkpoint in PengCheng's naming")

    def read_input(self, input_path):
        return open_ms_weights(input_path)

    def infer_config(self, weights, ms_names=False):
        """The 7B release's config when the tensors have its sizes; any other size needs --config."""
        key = 'model.embed_tokens.weight' if ms_names else _EMBEDDING
        table = weights.get(key)
        prefix = 'model.layers.' if ms_names else 'backbone.blocks.'
        layers = {name.split('.')[2] for name in weights if name.startswith(prefix)}
        if table is not None and tuple(table.shape) == (125952, 4096) and len(layers) == 32:
            return PengChengMindConfig(**_RELEASE_7B)
        return super().infer_config(weights, ms_names)

    def convert_ms_to_pt(self, input_path, output_path, dtype=None, config=None):
        """Our checkpoint -> a MindSpore checkpoint file in PengCheng's naming at `output_path` (`.ckpt` or
        `.safetensors`). Returns {PengCheng tensor name: shape}."""
        check_dtype(dtype)
        if os.path.isdir(output_path):
            raise ConversionError(f"output path {output_path} is a directory; give a checkpoint file "
                                  f"(.ckpt or .safetensors)")
        weights = open_ms_weights(input_path)
        if config is not None:
            config = self.load_config(config)
        else:
            config = self.config_beside(input_path) or self.infer_config(weights, ms_names=True)
        converted = self.convert_ms_to_hf(weights, config)
        save_ms_weights(converted, output_path, dtype)
        return {name: tuple(value.shape) for name, value in converted.items()}


CONVERTER = PengChengMindConverter()
(convert_hf_to_ms, convert_ms_to_hf, convert_pt_to_ms, convert_ms_to_pt, load_config, config_from_hf,
 config_to_hf) = CONVERTER.entry_points()
