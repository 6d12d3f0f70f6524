import random

import numpy as np
import pytest
import torch


@pytest.fixture(autouse=True)
def _seed_everything():
    """Every test starts from the same seeds with deterministic algorithms on."""
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    torch.use_deterministic_algorithms(True, warn_only=True)
    yield
    torch.use_deterministic_algorithms(False)


_THREADS = torch.get_num_threads()  # the session's thread count, read before any test can change it


@pytest.fixture(autouse=True)
def _restore_thread_count():
    """A test (or a module-scoped fixture: an in-process `sparsesam reproduce --threads 1`, a
    thread-independence check) must not leave torch's thread count changed: later float32 tests
    compare against references whose rounding depends on it. Every test starts with the
    session's count."""
    if torch.get_num_threads() != _THREADS:
        torch.set_num_threads(_THREADS)
    yield
    if torch.get_num_threads() != _THREADS:
        torch.set_num_threads(_THREADS)
