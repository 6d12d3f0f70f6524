"""Models used by the demo, the tests and the experiments."""
from .small_cnn import SmallCNN

__all__ = ["SmallCNN"]
