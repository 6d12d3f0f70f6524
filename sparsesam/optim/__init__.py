"""The SAM family of optimizers over fused kernels, and the perturbed-point swap they share with C-SAM."""
from .batchnorm import frozen_bn_stats
from .fused_sgd import FusedMaskedSGD
from .perturbation import PerturbedPoint
from .sam import SAM, param_masks

__all__ = ["SAM", "FusedMaskedSGD", "param_masks", "frozen_bn_stats", "PerturbedPoint"]
