"""Metrics."""
from .perplexity import PerplexityMetric
from .adgen import ADGENMetric
from .contract import CONSUMES, metric_inputs, merge_rank_sums

__all__ = ['PerplexityMetric', 'ADGENMetric']
