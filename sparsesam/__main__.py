"""``python -m sparsesam``: the ``sparsesam`` command (what ``torchrun -m sparsesam ...`` starts on every rank)."""
import sys

from .cli import main

sys.exit(main())
