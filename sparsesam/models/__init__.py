"""Models used by the demo, the tests and the experiments."""
from .external import build_external, is_external
from .googlenet import GoogLeNet
from .mobilenetv2 import MobileNetV2
from .normalize import Normalize, with_normalization
from .registry import MODELS, build_model, output_layer
from .resnet import ResNet18
from .small_cnn import SmallCNN
from .vgg import VGG16BN

__all__ = ["ResNet18", "SmallCNN", "GoogLeNet", "MobileNetV2", "VGG16BN", "Normalize", "with_normalization",
           "MODELS", "build_model", "output_layer",
           "build_external", "is_external"]
