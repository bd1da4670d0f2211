"""Datasets: task datasets (built from a `dataset_config`) and data loaders."""
from .base_dataset import BaseDataset, seeded_sampler, sampler_seed
from .dataloader import TextCorpusDataset, find_mindrecord_files
from .causal_language_model_dataset import (CausalLanguageModelDataset, check_dataset_columns,
                                            get_dataset_columns_and_lengths)
from .instruction_dataset import InstructionDataset
from .keyword_gen_dataset import ADGenDataLoader, KeyWordGenDataset

__all__ = ['ADGenDataLoader', 'BaseDataset', 'CausalLanguageModelDataset', 'InstructionDataset', 'KeyWordGenDataset',
           'TextCorpusDataset', 'check_dataset_columns', 'find_mindrecord_files', 'get_dataset_columns_and_lengths',
           'sampler_seed', 'seeded_sampler']
