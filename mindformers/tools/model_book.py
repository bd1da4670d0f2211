"""Old path of `mindformers.models.model_book` (registered model names and their published weights)."""
from mindformers.models.model_book import (CHECKPOINTS, SOURCES, HubSource, checkpoint_for,  # noqa: F401
                                           find_config, list_models, register_checkpoint, register_source,
                                           source_for)
