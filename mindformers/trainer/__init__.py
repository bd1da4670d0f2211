"""Trainer and TrainingArguments.

The Trainer's parts, one job each: trainer.py (the public API: config, tokenizer, datasets, weights), build.py (the
run's model: `build_network`), train_loop.py (steps, accumulation, resume arithmetic, logging), evaluation.py
(metrics fed what they declare), strategy.py (`only_save_strategy`), resume.py and run_dir.py (resume points and
output directories)."""
from .trainer import Trainer
from .training_args import TrainingArguments

__all__ = ['Trainer', 'TrainingArguments']
