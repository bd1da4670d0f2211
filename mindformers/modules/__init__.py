"""Shared transformer building blocks: layers, norms, rotary positions, attention, feed-forward."""
from .layers import Linear, LayerNorm, Embedding, Dropout, get_activation, to_mstype
from .norm import RMSNorm
from .rotary import RotaryEmbedding
from .attention import CausalMask, CausalSelfAttention, DotProductAttention, GroupedQueryAttention
from .mlp import MLP, GatedMLP

__all__ = ['Linear', 'LayerNorm', 'Embedding', 'Dropout', 'get_activation', 'to_mstype', 'RMSNorm',
           'RotaryEmbedding', 'CausalMask', 'CausalSelfAttention', 'DotProductAttention', 'GroupedQueryAttention',
           'MLP', 'GatedMLP']
