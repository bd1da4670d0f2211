"""Core: context, parallel config, schedules, optimizers, losses, metrics, callbacks."""
from .context import init_context, ContextConfig, ParallelContextConfig
from mindformers.parallel.config import ParallelConfig, RecomputeConfig, build_parallel_config
from .lr import build_lr
from .optim import build_optim, AdamWeightDecay
from .clip_grad import ClipGradNorm
from .loss import CrossEntropyLoss
from .metric import PerplexityMetric, ADGENMetric
from .callback import MFLossMonitor, CheckpointMonitor, CheckpointMointor, TrainState
