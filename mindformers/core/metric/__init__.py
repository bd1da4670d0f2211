"""Metrics."""
from .perplexity import PerplexityMetric

__all__ = ['PerplexityMetric']
