"""build_model(name, ...): every model of the package by name, for the CLI and the experiments."""
from __future__ import annotations

from typing import Callable, Dict, Optional, Sequence, Tuple

from torch import nn

from ._width import check_width, scaled
from .external import build_external, is_external
from .googlenet import GoogLeNet
from .mobilenetv2 import MobileNetV2
from .normalize import with_normalization
from .resnet import ResNet18
from .small_cnn import SmallCNN
from .vgg import VGG16BN


def _resnet18(in_channels: int, num_classes: int, width: float, image_size: int, **kwargs) -> nn.Module:
    return ResNet18(in_channels, num_classes, width=scaled(64, width), **kwargs)


def _smallcnn(in_channels: int, num_classes: int, width: float, image_size: int, **kwargs) -> nn.Module:
    # SmallCNN flattens its feature map, so it alone needs the image size.
    return SmallCNN(in_channels, num_classes, width=scaled(32, width), image_size=image_size, **kwargs)


def _adaptive(cls) -> Callable[..., nn.Module]:
    def build(in_channels: int, num_classes: int, width: float, image_size: int, **kwargs) -> nn.Module:
        return cls(in_channels, num_classes, width=width, **kwargs)
    return build


# name -> builder(in_channels, num_classes, width multiplier, image_size, **model options)
MODELS: Dict[str, Callable[..., nn.Module]] = {
    "resnet18": _resnet18,
    "googlenet": _adaptive(GoogLeNet),
    "mobilenetv2": _adaptive(MobileNetV2),
    "vgg16bn": _adaptive(VGG16BN),
    "smallcnn": _smallcnn,
}

# A multiplier above this is almost surely a channel count (ResNet18(width=16) style) passed by mistake.
MAX_WIDTH = 8.0


def build_model(name: str, in_channels: int = 3, num_classes: int = 10, width: float = 1.0, *,
                image_size: int = 32, normalization: Optional[Tuple[Sequence[float], Sequence[float]]] = None,
                **kwargs) -> nn.Module:
    """The model called ``name`` (one of ``MODELS``, or ``torchvision:NAME`` / ``timm:NAME``), freshly initialised.

    width: a multiplier of the paper's channel counts for every model (1.0 =
        ResNet-18 with 64 stem channels, SmallCNN with 32, ...), not a
        channel count (at most 8: a larger value is taken for a channel count
        passed by mistake).
    image_size: only SmallCNN uses it (its classifier is sized to the
        feature map); the others end in global average pooling and take any
        size (28x28 and 32x32 tested).
    normalization: ``(mean, std)`` per channel, e.g. a dataset's
        ``info.mean, info.std``; when given the model is wrapped as
        ``Sequential(normalize=Normalize(mean, std), net=model)`` so it takes
        images in [0, 1].
    kwargs: passed to the model's constructor (``blocks=`` for ResNet18).

    ``torchvision:NAME`` and ``timm:NAME`` build that library's architecture
    without weights (sparsesam.models.external); they take no width other
    than 1.0 and no kwargs.
    """
    if not isinstance(name, str):
        raise TypeError(f"name must be a str, got {type(name).__name__}")
    external = is_external(name)
    if not external and name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {sorted(MODELS)}, "
                         f"or torchvision:NAME / timm:NAME")
    for arg, value in (("in_channels", in_channels), ("num_classes", num_classes), ("image_size", image_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{arg} must be a positive int, got {value!r}")
    width = check_width(width)
    if width > MAX_WIDTH:
        raise ValueError(f"width is a multiplier of the paper's channels (1.0 = paper), got {width}: "
                         f"pass e.g. width=0.25 for a quarter-width {name}")
    if external:
        if width != 1.0 or kwargs:
            raise ValueError(f"model {name!r}: an external architecture is built as its library defines it "
                             f"(width must be 1.0, got {width}; no options, got {sorted(kwargs)})")
        model = build_external(name, in_channels, num_classes)
    else:
        model = MODELS[name](in_channels, num_classes, width, image_size, **kwargs)
    if normalization is not None:
        mean, std = normalization
        if len(mean) != in_channels:
            raise ValueError(f"normalization has {len(mean)} channel means but in_channels={in_channels}")
        model = with_normalization(model, mean, std)
    return model


def output_layer(model: nn.Module) -> nn.Linear:
    """The classifier that produces the logits (the last nn.Linear): keep it out of channel pruning."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError(f"{type(model).__name__} has no nn.Linear layer")
    return linears[-1]
