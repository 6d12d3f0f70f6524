"""Models used by the demo, the tests and the experiments."""
from .resnet import ResNet18
from .small_cnn import SmallCNN

__all__ = ["ResNet18", "SmallCNN"]
