"""Training callbacks."""
from .callback import TrainState, MFLossMonitor, CheckpointMonitor

CheckpointMointor = CheckpointMonitor  # MindFormers r1.0 spelling

__all__ = ['TrainState', 'MFLossMonitor', 'CheckpointMonitor', 'CheckpointMointor']
