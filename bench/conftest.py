import pytest
import torch

from sparsesam.nn import DispatchCache, set_dispatch_cache


@pytest.fixture(autouse=True)
def _fixed_seed_and_threads():
    torch.manual_seed(0)
    yield


@pytest.fixture(autouse=True)
def _fresh_dispatch_cache():
    """Every benchmark's "auto" layers decide afresh, in memory: no decision carried over from
    another case or read from $SPARSESAM_DISPATCH_CACHE."""
    old = set_dispatch_cache(DispatchCache())
    yield
    set_dispatch_cache(old)
