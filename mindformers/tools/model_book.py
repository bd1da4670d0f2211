"""Old path of `mindformers.models.model_book` (registered model names and their published checkpoints)."""
from mindformers.models.model_book import (CHECKPOINTS, checkpoint_for, find_config, list_models,  # noqa: F401
                                           register_checkpoint)
