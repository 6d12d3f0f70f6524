"""sparsesam: robust sparse training for PyTorch.

The layers, lowest first (each may import only the ones above it):

* ``sparsesam.ops``: the fused primitives (masked forward/backward, the
  SAM ascent/descent step, mask scoring, sparse matmuls), C++ / Triton /
  CUDA behind ``torch.library``; ``sparsesam.reference`` is their float64
  ground truth.
* ``sparsesam.sparse``: the sparse formats (CSR, BSR, N:M) of fixed masks.
* ``sparsesam.nn``: masked layers, ``sparsify`` / ``export`` and
  ``set_execution`` (each fixed-mask layer dense, sparse or "auto").
* ``sparsesam.optim``: ``SAM`` (and ASAM), ``FusedMaskedSGD``.
* ``sparsesam.pruning``: criteria, masks, schedules, channel compaction.
* ``sparsesam.algorithms``: AdaSAP, HARP, C-SAM and the baselines.
* ``sparsesam.robust``: corruptions, attacks, randomized smoothing, CC-Cert.
* ``sparsesam.data``, ``sparsesam.models``: datasets and architectures.
* ``sparsesam.distributed``: DDP without the per-forward mask broadcast, and
  rank helpers for torchrun (FSDP2 needs nothing from it: SAM handles shards).

Above them, the runs: ``sparsesam.training`` (the training and evaluation
loops), ``sparsesam.pruning_run`` (one algorithm's run), ``sparsesam.evaluation``
(accuracy, latency, robustness) and ``sparsesam.model_files`` (model folders
and run files), which the study (``sparsesam.study``, the papers'
comparisons) and the ``sparsesam`` command (``sparsesam.cli`` and its
subcommands) use; the library never imports the command's modules.
``sparsesam.distributed`` wraps DDP / FSDP2 for masked models. The
subpackages not imported here (algorithms, pruning, robust, data, models,
distributed)
load on first use: ``import sparsesam`` stays light.
"""
import importlib

from . import ops, optim, reference, sparse
from .nn import (CSRLinear, MaskedConv2d, MaskedLinear, SparseLinear, execution_summary, export, masked_layers,
                 resolve_execution, set_execution, sparsify)
from .optim import SAM

__version__ = "0.1.0"

_LAZY = ("algorithms", "pruning", "robust", "data", "models", "distributed")

__all__ = ["ops", "optim", "reference", "sparse", *_LAZY, "MaskedLinear", "MaskedConv2d", "CSRLinear", "SparseLinear",
           "SAM", "sparsify", "export", "masked_layers", "set_execution", "resolve_execution", "execution_summary",
           "__version__"]


def __getattr__(name: str):
    if name in _LAZY:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'sparsesam' has no attribute {name!r}")
