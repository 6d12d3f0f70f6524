"""build_dataset / load_dataset: every dataset of the package by name, for the CLI and the experiments."""
from __future__ import annotations

import os
from typing import Callable, Dict, Optional, Tuple

from .cifar10 import load_cifar10
from .dataset import ImageDataset, check_split
from .digits import load_digits
from .fashion_mnist import load_fashion_mnist
from .imagefolder import PREFIX as IMAGEFOLDER, load_imagefolder
from .synthetic import make_synthetic


def _needs_no_folder(name: str, load: Callable[..., ImageDataset]) -> Callable[..., ImageDataset]:
    def build(train: bool, data_dir: Optional[str], limit: Optional[int], **options) -> ImageDataset:
        if data_dir is not None:
            raise ValueError(f"data_dir does not apply to {name!r}, which needs no files; got {data_dir!r}")
        return load(train, limit=limit, **options)
    return build


# name -> builder(train, data_dir, limit, **options); options are the loader's keyword arguments.
DATASETS: Dict[str, Callable[..., ImageDataset]] = {
    "fashion_mnist": lambda train, data_dir, limit: load_fashion_mnist(train, root=data_dir, limit=limit),
    "cifar10": lambda train, data_dir, limit: load_cifar10(train, root=data_dir, limit=limit),
    "digits": _needs_no_folder("digits", load_digits),
    "synthetic": _needs_no_folder("synthetic", make_synthetic),
}


def canonical_name(name: str) -> str:
    """The registry's spelling of ``name``: ``"fashion_mnist"`` for ``"Fashion-MNIST"``, and
    ``"imagefolder:<absolute path>"`` for ``"imagefolder:PATH"``; a ValueError if it names no dataset."""
    if not isinstance(name, str):
        raise TypeError(f"name must be a str, got {type(name).__name__}")
    if name.startswith(IMAGEFOLDER):
        path = name[len(IMAGEFOLDER):]
        if not path:
            raise ValueError(f"dataset {name!r}: write imagefolder:PATH, PATH holding train/ and test/ class folders")
        return IMAGEFOLDER + os.path.abspath(path)
    key = name.lower().replace("-", "_")  # "fashion-mnist" as typed on a command line
    if key not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {sorted(DATASETS)} or imagefolder:PATH")
    return key


def _builder(key: str) -> Callable[..., ImageDataset]:
    if not key.startswith(IMAGEFOLDER):
        return DATASETS[key]
    root = key[len(IMAGEFOLDER):]
    return _needs_no_folder(key, lambda train, limit, **options: load_imagefolder(root, train, limit=limit, **options))


def build_dataset(name: str, split: str, data_dir: Optional[str] = None, *, limit: Optional[int] = None,
                  **options) -> ImageDataset:
    """One split ("train" or "test") of dataset ``name`` (one of ``DATASETS``, or ``imagefolder:PATH``:
    your own images, see sparsesam.data.imagefolder), images in [0, 1].

    data_dir: the folder of a file-backed dataset (Fashion-MNIST IDX files;
        CIFAR-10's cifar-10-batches-py or its parent); None takes the
        dataset's default. A missing folder raises FileNotFoundError naming it.
    limit: keep only the first ``limit`` examples.
    options: the loader's own settings (digits: ``image_size``; synthetic:
        ``num_classes, in_channels, image_size, train_size, test_size, noise,
        max_shift, seed``; imagefolder: ``image_size``, resize and centre-crop).
    The result's ``.info`` (a DatasetInfo) holds in_channels, num_classes,
    image_size and the normalisation mean / std.
    """
    key = canonical_name(name)
    train = check_split(split)
    try:
        return _builder(key)(train, data_dir, limit, **options)
    except TypeError as error:
        if options and "unexpected keyword argument" in str(error):
            raise TypeError(f"dataset {key!r} does not take option(s) {sorted(options)}: {error}") from error
        raise


def load_dataset(name: str, data_dir: Optional[str] = None, *, limit: Optional[int] = None,
                 **options) -> Tuple[ImageDataset, ImageDataset]:
    """``(train, test)`` of dataset ``name``; both carry the same ``.info``. See build_dataset."""
    train = build_dataset(name, "train", data_dir, limit=limit, **options)
    test = build_dataset(name, "test", data_dir, limit=limit, **options)
    return train, test
