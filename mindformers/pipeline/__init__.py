"""Task pipelines."""
from .base_pipeline import BasePipeline
from .pipeline import pipeline
from .text_generation_pipeline import TextGenerationPipeline

__all__ = ['pipeline', 'BasePipeline', 'TextGenerationPipeline']
