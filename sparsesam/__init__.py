"""sparsesam: robust sparse training for PyTorch.

Masked layers over fused kernels (C++ CPU, Triton, CUDA), a drop-in
``sparsify`` / ``export``, and (in later modules) the SAM family of
optimizers and the AdaSAP / HARP / C-SAM algorithms.
"""
from . import ops, optim, reference
from .nn import MaskedConv2d, MaskedLinear, export, masked_layers, sparsify

__version__ = "0.1.0"

__all__ = ["ops", "optim", "reference", "MaskedLinear", "MaskedConv2d", "sparsify", "export", "masked_layers", "__version__"]

# True sparse execution of fixed masks: the sparse formats, and the one call that sets each
# fixed-mask layer's form (dense, a sparse format, or "auto": the fastest, timed).
from . import sparse  # noqa: E402
from .nn import SparseLinear, execution_summary, resolve_execution, set_execution  # noqa: E402

__all__ += ["sparse", "SparseLinear", "set_execution", "resolve_execution", "execution_summary"]
