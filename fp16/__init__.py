"""Mixed precision: half-precision model wrapper, fp32-master optimizer wrappers (replicated, or sharded
over the data-parallel group), loss scalers."""

from .distributed_optimizer import DistributedOptimizer
from .fp16 import FP16_Module, FP16_Optimizer
from .loss_scaler import DynamicLossScaler, LossScaler

__all__ = ["DistributedOptimizer", "DynamicLossScaler", "FP16_Module", "FP16_Optimizer", "LossScaler"]
