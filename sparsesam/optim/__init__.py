"""The SAM family of optimizers over fused kernels."""
from .batchnorm import frozen_bn_stats
from .sam import SAM, param_masks

__all__ = ["SAM", "param_masks", "frozen_bn_stats"]
