"""Compiled train-step cells."""
from .train_one_step import MFTrainOneStepCell

__all__ = ['MFTrainOneStepCell']
