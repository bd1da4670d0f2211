"""Old path of `mindformers.parallel.config` (kept for users' imports)."""
from mindformers.parallel.config import *  # noqa: F401,F403
