"""Pruning criteria and masks."""
from .magnitude import SCOPES, global_sparsity, magnitude_prune

__all__ = ["SCOPES", "magnitude_prune", "global_sparsity"]
