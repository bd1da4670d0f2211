"""Trainer and TrainingArguments."""
from .trainer import Trainer
from .training_args import TrainingArguments

__all__ = ['Trainer', 'TrainingArguments']
