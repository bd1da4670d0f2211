"""Old path of `mindformers.parallel.layout` and `mindformers.parallel.strategy` (kept for users' imports;
`ParamLayout` is now `TensorLayout`)."""
from mindformers.parallel.layout import TensorLayout, parameter_layouts, run_layouts  # noqa: F401
from mindformers.parallel.strategy import (MERGED_STRATEGY_FILE, strategy_file_name,  # noqa: F401
                                           write_strategy_files)

ParamLayout = TensorLayout
