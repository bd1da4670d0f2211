"""Task pipelines."""
from .pipeline import pipeline
from .text_generation_pipeline import TextGenerationPipeline

__all__ = ['pipeline', 'TextGenerationPipeline']
