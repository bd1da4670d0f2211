"""Parallel layouts: the parallel config every layer receives (`config`), where each parameter lives under it
(`layout`: one `TensorLayout` type), MindSpore strategy files written and read with that type (`strategy`), and
checkpoint resharding between layouts (`reshard`). Importing this package loads only `config` (no MindSpore)."""
from .config import (ParallelConfig, RecomputeConfig, build_parallel_config, default_parallel_config, layer_stages,
                     stage_layer_counts)
