"""ChatGLM-6B (GLM v1) weights: the HuggingFace release (`THUDM/chatglm-6b`, model_type `chatglm`, remote code) or a
MindFormers r1.0 GLM checkpoint <-> our `GLMForPreTraining`.

Our parameter names are the HF release's, so HF -> ours renames nothing; the per-layer
`attention.rotary_emb.inv_freq` buffers are skipped. MindFormers r1.0 names the word embedding
`transformer.word_embeddings.embedding_table` and the LayerNorm parameters `gamma` / `beta`; everything else is
the same; optimizer states in its checkpoints are skipped. All Linear weights are [out, in] in every format, and
query_key_value keeps its per-head [q, k, v] row order, so nothing is transposed or reordered. `--reversed` writes
a HF directory in the release's layout (config.json with model_type `chatglm`, the remote code's fields).

The release's code fixes the residual scale at sqrt(2 * 28) whatever the depth, so a config read from a HF
config.json sets `alpha` to sqrt(56); a model with another alpha cannot be written as a HF directory.

    python convert_weight.py --model glm --input_path <chatglm-6b HF dir> --output_path glm_6b.ckpt
    python convert_weight.py --model glm --input_path <MindFormers glm .ckpt> --output_path glm_6b.ckpt \\
        --config configs/glm/run_glm_6b.yaml
    python convert_weight.py --model glm --reversed --input_path glm_6b.ckpt --output_path <HF dir>
"""
import math
import os

from mindformers.models.convert_utils import (ConversionError, FamilyConverter, NameTable, load_hf_weights,
                                              open_ms_weights)
from mindformers.models.glm.glm_config import GLMConfig

__all__ = ['ConversionError', 'config_from_hf', 'config_to_hf', 'convert_hf_to_ms', 'convert_ms_to_hf',
           'convert_ms_to_pt', 'convert_pt_to_ms', 'load_config']

PUBLISHED_ALPHA = math.sqrt(2 * 28)  # the release's GLMBlock default num_layers=28, never overridden
LAYER = 'transformer.layers.{i}.'
_NORMS = ('transformer.final_layernorm', LAYER + 'input_layernorm', LAYER + 'post_attention_layernorm')
_LINEARS = [LAYER + f'{part}.{kind}' for part in ('attention.query_key_value', 'attention.dense',
                                                  'mlp.dense_h_to_4h', 'mlp.dense_4h_to_h')
            for kind in ('weight', 'bias')]
OUR_NAMES = (['transformer.word_embeddings.weight', 'lm_head.weight'] + _LINEARS
             + [f'{norm}.{kind}' for norm in _NORMS for kind in ('weight', 'bias')])

HF_TABLE = NameTable([(name, name) for name in OUR_NAMES], skip=r'\.attention\.rotary_emb\.inv_freq$')
MF_TABLE = NameTable([('transformer.word_embeddings.embedding_table', 'transformer.word_embeddings.weight'),
                      ('lm_head.weight', 'lm_head.weight')]
                     + [(name, name) for name in _LINEARS]
                     + [(f'{norm}.{theirs}', f'{norm}.{ours}') for norm in _NORMS
                        for theirs, ours in (('gamma', 'weight'), ('beta', 'bias'))],
                     skip=r'\.rotary_emb\.inv_freq$|^(adam_[mv]|moment[12]|accu_grads|global_step|learning_rate|'
                          r'scale_sense|beta[12]_power|epoch_num|step_num|loss_scale|current_iterator_step|'
                          r'last_overflow_iterator_step)')

# config.json field of the release -> GLMConfig field
_HF_FIELDS = {'vocab_size': 'vocab_size', 'hidden_size': 'hidden_size', 'num_layers': 'num_layers',
              'num_attention_heads': 'num_heads', 'inner_hidden_size': 'inner_hidden_size',
              'layernorm_epsilon': 'layernorm_epsilon', 'max_sequence_length': 'seq_length',
              'bos_token_id': 'bos_token_id', 'eos_token_id': 'eos_token_id', 'mask_token_id': 'mask_token_id',
              'gmask_token_id': 'gmask_token_id', 'pad_token_id': 'pad_token_id'}
_HF_FILES = ('model.safetensors', 'model.safetensors.index.json', 'pytorch_model.bin', 'pytorch_model.bin.index.json')
_KNOWN_HEADS = {4096: 32}  # ChatGLM-6B


def read_input(input_path):
    """Foreign tensors of `input_path`: a HF directory or weight file, a MindFormers `.ckpt` / `.safetensors`
    checkpoint, or a directory holding one `.ckpt`."""
    if os.path.isdir(input_path) and not any(os.path.isfile(os.path.join(input_path, f)) for f in _HF_FILES):
        ckpts = sorted(f for f in os.listdir(input_path) if f.endswith('.ckpt'))
        if len(ckpts) != 1:
            raise ConversionError(f"{input_path} holds no HF weights ({', '.join(_HF_FILES)}) and {len(ckpts)} "
                                  f".ckpt files; give one MindFormers checkpoint file")
        input_path = os.path.join(input_path, ckpts[0])
    if input_path.endswith('.ckpt') or (input_path.endswith('.safetensors') and not _hf_safetensors(input_path)):
        return open_ms_weights(input_path)
    return load_hf_weights(input_path)


def _hf_safetensors(path):
    """Whether a .safetensors file holds HF-named tensors (a MindSpore one carries MindFormers names)."""
    from safetensors import safe_open
    with safe_open(path, framework='np') as f:
        return not any(name.endswith(('.embedding_table', '.gamma', '.beta')) for name in f.keys())


def _config_from_hf(hf_config):
    if 'padded_vocab_size' in hf_config or 'multi_query_attention' in hf_config:
        raise ConversionError("this 'chatglm' config.json is ChatGLM2/3's (padded_vocab_size, multi-query "
                              "attention): convert it with --model glm2")
    if not hf_config.get('position_encoding_2d', True):
        raise ConversionError("position_encoding_2d=False is not supported (ChatGLM-6B uses 2-D positions)")
    if hf_config.get('quantization_bit'):
        raise ConversionError(f"quantization_bit={hf_config['quantization_bit']}: quantized ChatGLM-6B weights are "
                              f"not supported; convert the float16 release")
    if hf_config.get('pre_seq_len'):
        raise ConversionError(f"pre_seq_len={hf_config['pre_seq_len']}: P-tuning prefixes are not supported")
    fields = {ours: hf_config[theirs] for theirs, ours in _HF_FIELDS.items() if hf_config.get(theirs) is not None}
    return GLMConfig(alpha=PUBLISHED_ALPHA, **fields)


class GLMConverter(FamilyConverter):
    """HF ChatGLM-6B / MindFormers r1.0 GLM <-> our `GLMForPreTraining`."""

    family = 'GLM'
    config_class = GLMConfig
    model_class = 'mindformers.models.glm.modeling_glm:GLMForPreTraining'
    hf_model_types = ('chatglm',)
    input_tables = (HF_TABLE, MF_TABLE)
    output_table = HF_TABLE

    def read_input(self, input_path):
        return read_input(input_path)

    def config_from_hf(self, hf_config):
        """A GLMConfig from the release's config.json mapping (alpha = sqrt(56), as its code computes)."""
        try:
            return _config_from_hf(hf_config)
        except ValueError as err:
            if isinstance(err, ConversionError):
                raise
            raise ConversionError(f"config.json: {err}") from None

    def config_to_hf(self, config, dtype='float32'):
        """The release's config.json mapping of our GLMConfig."""
        if not math.isclose(config.residual_alpha, PUBLISHED_ALPHA, rel_tol=1e-9):
            raise ConversionError(f"GLMConfig.alpha is {config.residual_alpha}, but the HF ChatGLM-6B code always "
                                  f"uses sqrt(56) = {PUBLISHED_ALPHA}: such a model cannot be written as a HF "
                                  f"directory (write a .safetensors file instead)")
        fields = {theirs: getattr(config, ours) for theirs, ours in _HF_FIELDS.items()}
        return {'architectures': ['ChatGLMModel'], 'model_type': 'chatglm', **fields,
                'position_encoding_2d': True, 'torch_dtype': dtype, 'use_cache': True}

    def infer_config(self, weights, ms_names=False):
        """The sizes read off the tensors; the head count is known for ChatGLM-6B's width only."""
        table = MF_TABLE if 'transformer.word_embeddings.embedding_table' in weights else HF_TABLE
        embedding = weights.get(table.theirs_of('transformer.word_embeddings.weight'))
        inner = weights.get(table.theirs_of('transformer.layers.0.mlp.dense_h_to_4h.weight'))
        if embedding is None or inner is None or embedding.shape[1] not in _KNOWN_HEADS:
            return super().infer_config(weights, ms_names)
        layers = 1 + max(int(name.split('.')[2]) for name in weights if name.startswith('transformer.layers.'))
        return GLMConfig(vocab_size=embedding.shape[0], hidden_size=embedding.shape[1], num_layers=layers,
                         num_heads=_KNOWN_HEADS[embedding.shape[1]], inner_hidden_size=inner.shape[0],
                         alpha=PUBLISHED_ALPHA)


CONVERTER = GLMConverter()
(convert_hf_to_ms, convert_ms_to_hf, convert_pt_to_ms, convert_ms_to_pt, load_config, config_from_hf,
 config_to_hf) = CONVERTER.entry_points()
