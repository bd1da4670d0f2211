"""Shared transformer building blocks: layers, attention, feed-forward."""
from .layers import Linear, LayerNorm, Embedding, Dropout, get_activation, to_mstype
from .attention import CausalMask, CausalSelfAttention
from .mlp import MLP

__all__ = ['Linear', 'LayerNorm', 'Embedding', 'Dropout', 'get_activation', 'to_mstype', 'CausalMask',
           'CausalSelfAttention', 'MLP']
