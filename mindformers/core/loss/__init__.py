"""Losses."""
from .cross_entropy import CrossEntropyLoss

__all__ = ['CrossEntropyLoss']
