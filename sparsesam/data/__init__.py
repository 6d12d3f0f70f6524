"""Datasets available offline, as images in [0, 1] (normalisation belongs to the model)."""
from .cifar10 import load_cifar10
from .cifar10c import load_cifar10c
from .dataset import DatasetInfo, ImageDataset
from .digits import load_digits
from .fashion_mnist import load_fashion_mnist
from .imagefolder import load_imagefolder
from .registry import DATASETS, build_dataset, canonical_name, load_dataset
from .synthetic import make_synthetic

__all__ = ["load_fashion_mnist", "load_cifar10", "load_digits", "make_synthetic", "DatasetInfo", "ImageDataset",
           "DATASETS", "build_dataset", "load_dataset",
           "load_imagefolder", "canonical_name", "load_cifar10c"]
