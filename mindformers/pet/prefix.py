"""Prefix-Tuning and P-Tuning v2: trainable keys and values put in front of every attention layer's own.

One `PrefixEncoder` per model (`model.prefix_encoder`) computes, in the forward, the prefix of all L layers as
[P, 2 * L * kv_heads * head_dim]: viewed as [P, 2L, kv_heads, head_dim], entry 2i holds layer i's keys and 2i + 1 its
values (the order of THUDM's ChatGLM2 `PrefixEncoder`, whose `embedding.weight` therefore loads as it is). Each
attention layer's `DotProductAttention.prefix` is a `LayerPrefix` that takes its pair out of it (see
`modules.attention`): the prefix is visible to every token, carries no position, and the tokens keep theirs.
- Prefix-Tuning (Li & Liang): Embedding(P, hidden) -> Linear(hidden, mid_dim) -> Tanh -> Linear(mid_dim, width).
- P-Tuning v2: Embedding(P, width), optionally -> Linear(width, projection_dim) -> Tanh -> Linear(projection_dim,
  width) (`prefix_projection`).
The prefix ids 0..P-1 are a constant. Parameters: `prefix_encoder.mindpet_delta_<pet_type>_embedding.weight` and,
with the MLP, `prefix_encoder.mindpet_delta_<pet_type>_trans.{0,2}.{weight,bias}`; `freeze_delta` trains only them."""
import dataclasses
from typing import ClassVar

import numpy as np
from mindspore import nn, ops, Tensor

from mindformers.modules.attention import DotProductAttention
from mindformers.modules.layers import Dropout, Embedding, Linear, to_mstype
from mindformers.pet.config import PetConfig, register_pet_config
from mindformers.pet.freeze import DELTA_PREFIX
from mindformers.pet.model import forget_compiled, register_pet_method


@dataclasses.dataclass
class PrefixTuningConfig(PetConfig):
    """Prefix-Tuning: `prefix_token_num` prefix positions per layer from Embedding(P, hidden) -> Linear(hidden,
    `mid_dim`) -> Tanh -> Linear(mid_dim, 2 * L * kv_heads * head_dim), computed in the forward; `dropout_rate` acts
    on each layer's prefix keys and values in training. MindFormers' `PrefixTuningConfig` names and defaults."""

    pet_type: ClassVar[str] = 'prefixtuning'
    prefix_token_num: int = 128
    mid_dim: int = 512
    dropout_rate: float = 0.1

    def validate(self):
        self._positive_int('prefix_token_num', 'mid_dim')
        self._probability('dropout_rate')


@dataclasses.dataclass
class Ptuning2Config(PetConfig):
    """P-Tuning v2: an embedding of `pre_seq_len` ids, [pre_seq_len, 2 * L * kv_heads * head_dim] (for ChatGLM2
    sized by its key/value groups, as THUDM's), optionally through Linear(width, `projection_dim`) -> Tanh ->
    Linear(projection_dim, width) (`prefix_projection`; THUDM's own uses projection_dim = hidden_size);
    `dropout_prob` acts on the prefix keys and values in training. MindFormers' `Ptuning2Config` names and
    defaults."""

    pet_type: ClassVar[str] = 'ptuning2'
    pre_seq_len: int = 128
    prefix_projection: bool = False
    projection_dim: int = 128
    dropout_prob: float = 0.01

    def validate(self):
        self._positive_int('pre_seq_len', 'projection_dim')
        if not isinstance(self.prefix_projection, bool):
            raise ValueError(f"pet_config.prefix_projection must be true or false, got {self.prefix_projection!r}")
        self._probability('dropout_prob')


class PrefixEncoder(nn.Cell):
    """The prefix of every layer: `construct()` -> [length, width] in `compute_dtype` (width = 2 * L * kv_heads *
    head_dim, see the module docstring). An embedding [length, embed_dim] of the ids 0..length-1, then, with
    `mid_dim`, Linear(embed_dim, mid_dim) -> Tanh -> Linear(mid_dim, width) (embed_dim = width without it).
    Parameters are named `<delta>_embedding.weight` and `<delta>_trans.{0,2}.*` (`delta` = 'mindpet_delta_<type>')."""

    def __init__(self, delta, length, width, embed_dim=None, mid_dim=None, init_std=0.02,
                 param_init_type='float32', compute_dtype='float32'):
        super().__init__()
        self.length, self.width = int(length), int(width)
        self.embedding_name, self.trans_name = f'{delta}_embedding', f'{delta}_trans'
        embed_dim = embed_dim or width
        # N(0, 1), as torch's nn.Embedding (THUDM, PEFT) starts it
        setattr(self, self.embedding_name, Embedding(length, embed_dim, 1.0, param_init_type))
        self.ids = Tensor(np.arange(length, dtype=np.int32).reshape(1, length))
        self.compute_dtype = to_mstype(compute_dtype, 'compute_dtype')
        if mid_dim:
            common = dict(init_std=init_std, param_init_type=param_init_type, compute_dtype=compute_dtype)
            setattr(self, self.trans_name, nn.SequentialCell([Linear(embed_dim, mid_dim, **common), nn.Tanh(),
                                                              Linear(mid_dim, width, **common)]))
        else:
            setattr(self, self.trans_name, None)

    def construct(self):
        prefix = getattr(self, self.embedding_name)(self.ids).reshape(self.length, -1)
        if prefix.dtype != self.compute_dtype:
            prefix = ops.cast(prefix, self.compute_dtype)
        trans = getattr(self, self.trans_name)
        return prefix if trans is None else trans(prefix)


class LayerPrefix(nn.Cell):
    """Layer `index`'s prefix for `DotProductAttention.prefix`: `construct(batch)` -> (keys, values), each
    [batch, length, kv_heads, head_dim], columns [2i, 2i + 2) * kv_heads * head_dim of the encoder's output, with
    `dropout` in training. `visible` False hides the prefix from attention without a cache (a test switch: the model
    then computes what the base model does)."""

    def __init__(self, encoder, index, kv_heads, head_dim, dropout=0.0):
        super().__init__()
        # the encoder belongs to the model and serves every layer: held outside the cell tree, since a child's
        # parameters would be renamed after this cell
        self.encoder = (encoder,)
        self.length, self.index, self.kv_heads, self.head_dim = encoder.length, index, kv_heads, head_dim
        self.visible = True
        self.dropout = Dropout(dropout)

    def construct(self, batch):
        size = 2 * self.kv_heads * self.head_dim
        pair = self.encoder[0]()[:, self.index * size:(self.index + 1) * size]
        pair = ops.broadcast_to(pair.reshape(1, self.length, 2, self.kv_heads, self.head_dim),
                                (batch, self.length, 2, self.kv_heads, self.head_dim))
        pair = self.dropout(pair)
        return pair[:, :, 0], pair[:, :, 1]


_NAMES = {'prefixtuning': 'Prefix-Tuning', 'ptuning2': 'P-Tuning v2'}


def attention_cores(model):
    """The `DotProductAttention` of every attention layer of `model`, in layer order (the order of its cache)."""
    return [cell for _, cell in model.cells_and_names() if isinstance(cell, DotProductAttention)]


def _prefix_layout(model, pet_type):
    """(cores, num_layers, kv_heads, head_dim) of `model`, or ValueError naming its family when a prefix cannot be
    put in front of its attention."""
    family, name = type(model).__name__, _NAMES[pet_type]
    layout = getattr(model, 'kv_cache_layout', None)
    cores = attention_cores(model)
    if layout is None or not cores:
        raise ValueError(f"{name} is not supported for {family}: it needs attention layers built on "
                         f"modules.attention.DotProductAttention and kv_cache_layout() (the six families of the "
                         f"suite have both)")
    layout = layout()
    if len(cores) != layout['num_layers']:
        raise ValueError(f"{name} is not supported for {family}: it has {len(cores)} attention layers but its "
                         f"kv_cache_layout() declares {layout['num_layers']}")
    parallel = getattr(getattr(model, 'config', None), 'parallel_config', None)
    if getattr(parallel, 'pipeline_stage', 1) > 1:
        raise ValueError(f"{name} for {family}: pipeline_stage {parallel.pipeline_stage} > 1 is not supported (one "
                         f"prefix encoder serves every layer); use data/model parallel")
    if hasattr(model, 'prefix_encoder'):
        raise ValueError(f"{name}: {family} already has a prefix_encoder")
    return cores, int(layout['num_layers']), int(layout['kv_heads']), int(layout['head_dim'])


def apply_prefix(model, config):
    """Give every attention layer of `model` a `LayerPrefix` over one new `model.prefix_encoder` (PrefixTuningConfig
    or Ptuning2Config); returns the encoder's parameter names."""
    cores, layers, kv_heads, head_dim = _prefix_layout(model, config.pet_type)
    width = 2 * layers * kv_heads * head_dim
    model_config = model.config
    common = dict(init_std=getattr(model_config, 'initializer_range', 0.02),
                  param_init_type=getattr(model_config, 'param_init_type', 'float32'),
                  compute_dtype=getattr(model_config, 'compute_dtype', 'float32'))
    delta = DELTA_PREFIX + config.pet_type
    if isinstance(config, PrefixTuningConfig):
        encoder = PrefixEncoder(delta, config.prefix_token_num, width, int(model_config.hidden_size), config.mid_dim,
                                **common)
        dropout = config.dropout_rate
    else:
        encoder = PrefixEncoder(delta, config.pre_seq_len, width,
                                mid_dim=config.projection_dim if config.prefix_projection else None, **common)
        dropout = config.dropout_prob
    model.prefix_encoder = encoder
    for index, core in enumerate(cores):
        core.prefix = LayerPrefix(encoder, index, kv_heads, head_dim, dropout)
    return [param.name for param in encoder.get_parameters()]


def set_prefix_visible(model, visible):
    """Show or hide the prefix of every attention layer (without a cache); the next call compiles anew."""
    for core in attention_cores(model):
        if core.prefix is None:
            raise ValueError(f"{type(model).__name__} has no prefix")
        core.prefix.visible = bool(visible)
    forget_compiled(model)


for _config in (PrefixTuningConfig, Ptuning2Config):
    register_pet_config(_config)
    register_pet_method(_config, apply_prefix)
