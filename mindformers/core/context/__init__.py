"""Context setup."""
from .build_context import (init_context, ContextConfig, ParallelContextConfig, best_device, device_available,
                            sum_over_ranks)

__all__ = ['init_context', 'ContextConfig', 'ParallelContextConfig', 'best_device', 'device_available',
           'sum_over_ranks']
