"""Optional dependencies: import one, or fail with the pip extra that provides it.

``pip install sparsesam`` brings what training, pruning and export need; the
rest is grouped into extras (``pyproject.toml``'s
``[project.optional-dependencies]``, kept equal to :data:`EXTRAS` by
``tests/test_extras.py``). Every optional import goes through
:func:`require`, so a missing package is reported with the command that
installs it::

    load_digits = require("sklearn.datasets", extra="data", purpose="the digits data set").load_digits
"""
from __future__ import annotations

import importlib
from types import ModuleType
from typing import Dict, Tuple

# extra -> the distributions it installs (as pyproject.toml names them).
EXTRAS: Dict[str, Tuple[str, ...]] = {
    "data": ("scikit-learn",),
    "robust": ("scipy", "matplotlib", "pillow"),
    "structured": ("torch-pruning>=1.6",),
    # torchvision: its architectures by name (--model torchvision:NAME) and image folders
    # (--dataset imagefolder:PATH). 0.29 is the release built for torch 2.14.
    "vision": ("torchvision>=0.29,<0.30",),
    # timm's architectures by name (--model timm:NAME); timm itself needs torchvision.
    "timm": ("timm>=1.0",),
    # APGD / AutoAttack from the package index (sparsesam.robust.autoattack).
    "attacks": ("torchattacks>=3.5",),
    # Pushing / pulling model folders to / from the Hugging Face Hub (sparsesam.hub).
    "hub": ("huggingface_hub>=0.24",),
}

# Top-level import name -> distribution, where the two differ or the
# distribution carries a version bound.
_DISTRIBUTION = {
    "sklearn": "scikit-learn",
    "scipy": "scipy",
    "matplotlib": "matplotlib",
    "PIL": "pillow",
    "torch_pruning": "torch-pruning>=1.6",
    "torchvision": "torchvision>=0.29,<0.30",
    "timm": "timm>=1.0",
    "torchattacks": "torchattacks>=3.5",
    "huggingface_hub": "huggingface_hub>=0.24",
}


def require(module: str, *, extra: str, purpose: str = "") -> ModuleType:
    """Import ``module`` (dotted names allowed) or raise an ImportError naming ``extra``.

    Args:
        module: what to import, e.g. ``"sklearn.datasets"``.
        extra: the extra of ``pyproject.toml`` that installs it (a key of :data:`EXTRAS`).
        purpose: what needs it, for the message (e.g. ``"the digits data set"``).
    """
    if not isinstance(module, str) or not module:
        raise TypeError(f"module must be a non-empty module name, got {module!r}")
    if extra not in EXTRAS:
        raise ValueError(f"extra must be one of {sorted(EXTRAS)}, got {extra!r}")
    top = module.split(".")[0]
    distribution = _DISTRIBUTION.get(top)
    if distribution is None or distribution not in EXTRAS[extra]:
        # A programming error at the call site, caught by the first test that reaches it.
        raise ValueError(f"module {module!r} is not provided by the extra {extra!r} "
                         f"(which installs {', '.join(EXTRAS[extra])})")
    try:
        return importlib.import_module(module)
    except ImportError as error:
        needs = f"{purpose} needs" if purpose else f"{module} is needed:"
        raise ImportError(f"{needs} {distribution.split('>')[0]}, which is optional: "
                          f"pip install 'sparsesam[{extra}]'") from error


__all__ = ["EXTRAS", "require"]
