"""Training callbacks."""
from .callback import TrainState, MFLossMonitor, CheckpointMonitor, append_metrics, plot_loss_curve

CheckpointMointor = CheckpointMonitor  # MindFormers r1.0 spelling

__all__ = ['TrainState', 'MFLossMonitor', 'CheckpointMonitor', 'CheckpointMointor', 'append_metrics',
           'plot_loss_curve']
