"""Mixed precision: half-precision model wrapper, fp32-master optimizer wrapper, loss scalers."""

from .fp16 import FP16_Module, FP16_Optimizer
from .loss_scaler import DynamicLossScaler, LossScaler

__all__ = ["DynamicLossScaler", "FP16_Module", "FP16_Optimizer", "LossScaler"]
