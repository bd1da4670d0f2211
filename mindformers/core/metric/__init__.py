"""Metrics."""
from .perplexity import PerplexityMetric
from .adgen import ADGENMetric

__all__ = ['PerplexityMetric', 'ADGENMetric']
