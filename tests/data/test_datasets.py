"""Dataset loaders on tiny files written here (Fashion-MNIST IDX, CIFAR-10 pickles), sklearn digits,
the synthetic dataset's determinism, the registry and its error messages."""
import gzip
import os
import pickle

import numpy as np
import pytest
import torch

from sparsesam.data import DATASETS, DatasetInfo, ImageDataset, build_dataset, load_cifar10, load_dataset, \
    load_digits, load_fashion_mnist, make_synthetic
from sparsesam.file_errors import BadDatasetFileError
from sparsesam.models import build_model


# ---------------------------------------------------------------- Fashion-MNIST (IDX files)

def _write_idx(path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def _fake_fashion_mnist(folder, n_train=6, n_test=4, gz=True):
    rng = np.random.default_rng(1)
    arrays = {}
    for split, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, size=n, dtype=np.uint8)
        suffix = ".gz" if gz else ""
        _write_idx(os.path.join(folder, f"{split}-images-idx3-ubyte{suffix}"), images)
        _write_idx(os.path.join(folder, f"{split}-labels-idx1-ubyte{suffix}"), labels)
        arrays[split] = (images, labels)
    return arrays


@pytest.mark.parametrize("gz", [True, False])
def test_fashion_mnist_from_a_data_dir(tmp_path, gz):
    arrays = _fake_fashion_mnist(tmp_path, gz=gz)
    train, test = load_dataset("fashion_mnist", data_dir=str(tmp_path))
    for dataset, (images, labels) in ((train, arrays["train"]), (test, arrays["t10k"])):
        assert isinstance(dataset, ImageDataset)
        assert dataset.images.shape == (len(labels), 1, 28, 28) and dataset.images.dtype == torch.float32
        torch.testing.assert_close(dataset.images[:, 0] * 255, torch.from_numpy(images).float())
        assert torch.equal(dataset.labels, torch.from_numpy(labels.astype(np.int64)))
    assert train.info == test.info
    assert (train.info.in_channels, train.info.num_classes, train.info.image_size) == (1, 10, 28)
    assert len(build_dataset("fashion-mnist", "train", str(tmp_path), limit=2)) == 2


def test_fashion_mnist_environment_variable(tmp_path, monkeypatch):
    _fake_fashion_mnist(tmp_path, n_train=3)
    monkeypatch.setenv("SPARSESAM_FASHION_MNIST", str(tmp_path))
    assert len(load_fashion_mnist(train=True)) == 3


def test_fashion_mnist_missing_folder_and_file(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        build_dataset("fashion_mnist", "train", str(missing))
    _fake_fashion_mnist(tmp_path)
    os.remove(tmp_path / "t10k-labels-idx1-ubyte.gz")
    with pytest.raises(FileNotFoundError, match=r"t10k-labels-idx1-ubyte"):
        build_dataset("fashion_mnist", "test", str(tmp_path))


def test_fashion_mnist_rejects_mismatched_files(tmp_path):
    _fake_fashion_mnist(tmp_path, n_train=5)
    _write_idx(tmp_path / "train-labels-idx1-ubyte.gz", np.zeros(4, np.uint8))
    with pytest.raises(BadDatasetFileError, match="5 images but 4 labels"):
        build_dataset("fashion_mnist", "train", str(tmp_path))
    _write_idx(tmp_path / "train-labels-idx1-ubyte.gz", np.full(5, 12, np.uint8))
    with pytest.raises(ValueError, match=r"labels must be in \[0, 10\)"):
        build_dataset("fashion_mnist", "train", str(tmp_path))


# ---------------------------------------------------------------- CIFAR-10 (torchvision's pickles)

def _write_cifar_batch(path, n, seed, bytes_keys=False):
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
    labels = [int(v) for v in rng.integers(0, 10, size=n)]
    batch = {"batch_label": "fake", "labels": labels, "data": data, "filenames": [f"{i}.png" for i in range(n)]}
    if bytes_keys:  # as Python 2 wrote the official files, read back without latin1 decoding
        batch = {k.encode(): v for k, v in batch.items()}
    with open(path, "wb") as f:
        pickle.dump(batch, f, protocol=2)
    return data, labels


def _fake_cifar10(root, n=3, bytes_keys=False):
    folder = os.path.join(root, "cifar-10-batches-py")
    os.makedirs(folder)
    train = [_write_cifar_batch(os.path.join(folder, f"data_batch_{i}"), n, i, bytes_keys) for i in range(1, 6)]
    test = _write_cifar_batch(os.path.join(folder, "test_batch"), n + 1, 0, bytes_keys)
    with open(os.path.join(folder, "batches.meta"), "wb") as f:
        pickle.dump({"label_names": ["airplane"] * 10}, f, protocol=2)
    return folder, train, test


@pytest.mark.parametrize("bytes_keys", [False, True])
def test_cifar10_from_torchvision_folder(tmp_path, bytes_keys):
    folder, train_batches, (test_data, test_labels) = _fake_cifar10(tmp_path, bytes_keys=bytes_keys)
    train, test = load_dataset("cifar10", data_dir=str(tmp_path))
    assert train.images.shape == (15, 3, 32, 32) and test.images.shape == (4, 3, 32, 32)
    assert train.images.dtype == torch.float32 and 0 <= train.images.min() and train.images.max() <= 1
    # Rows are the R, G and B planes of a 32x32 image, row-major.
    data = np.concatenate([d for d, _ in train_batches])
    k = 7
    for c, h, w in ((0, 0, 0), (1, 5, 9), (2, 31, 30)):
        assert train.images[k, c, h, w].item() == pytest.approx(data[k, c * 1024 + h * 32 + w] / 255)
    assert train.labels.tolist() == sum((labels for _, labels in train_batches), [])
    assert test.labels.tolist() == test_labels
    torch.testing.assert_close(test.images.flatten(1) * 255, torch.from_numpy(test_data).float())
    assert train.info.num_classes == 10 and train.info.in_channels == 3 and len(train.info.mean) == 3
    # the batches folder itself works as data_dir too
    assert torch.equal(build_dataset("cifar10", "test", folder).images, test.images)


def test_cifar10_limit_reads_only_the_batches_it_needs(tmp_path):
    folder, batches, _ = _fake_cifar10(tmp_path, n=3)
    os.remove(os.path.join(folder, "data_batch_3"))
    assert len(load_cifar10(True, str(tmp_path), limit=5)) == 5
    with pytest.raises(FileNotFoundError, match="data_batch_3"):
        load_cifar10(True, str(tmp_path))


def test_cifar10_missing_folder_names_the_path(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match=rf"{tmp_path}.*cifar-10-batches-py.*never downloads"):
        build_dataset("cifar10", "train", str(tmp_path))
    monkeypatch.setenv("SPARSESAM_CIFAR10", str(tmp_path / "env"))
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "env")):
        build_dataset("cifar10", "test")


class _RunsCode:
    def __reduce__(self):
        return (os.getcwd, ())  # harmless, but a pickle that calls a function


def test_cifar10_refuses_pickles_that_run_code(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    with open(folder / "test_batch", "wb") as f:
        pickle.dump({"data": _RunsCode(), "labels": []}, f, protocol=2)
    with pytest.raises(BadDatasetFileError, match="may not refer to posix.getcwd|may not refer to nt.getcwd"):
        build_dataset("cifar10", "test", str(tmp_path))


def test_cifar10_rejects_a_wrong_batch(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    with open(folder / "test_batch", "wb") as f:
        pickle.dump({"data": np.zeros((2, 100), np.uint8), "labels": [0, 1]}, f, protocol=2)
    with pytest.raises(ValueError, match=r"'data' must be uint8 of shape \(N, 3072\)"):
        build_dataset("cifar10", "test", str(tmp_path))


# ---------------------------------------------------------------- truncated or foreign dataset files

def _bad_idx_variants(good: bytes):
    return {
        "empty": (b"", "bad magic number"),
        "text": (b"label,image\n3,0 0 0\n", "bad magic number"),
        "unknown element type": (bytes([0, 0, 0x07, 1]) + good[4:], "unknown IDX element type 0x07"),
        "header cut": (good[:6], "truncated: the header of a 3-d IDX array takes 16 bytes"),
        "payload cut": (good[:-100], r"truncated: the header says shape \(6, 28, 28\)"),
        "trailing bytes": (good + b"\0" * 7, "7 bytes follow the"),
        "header of another shape": (good[:4] + (7).to_bytes(4, "big") + good[8:], "truncated"),
    }


@pytest.mark.parametrize("case", ["empty", "text", "unknown element type", "header cut", "payload cut",
                                  "trailing bytes", "header of another shape"])
def test_a_bad_idx_file_is_a_one_line_error_naming_it(tmp_path, case):
    _fake_fashion_mnist(tmp_path, gz=False)
    path = tmp_path / "train-images-idx3-ubyte"
    content, message = _bad_idx_variants(path.read_bytes())[case]
    path.write_bytes(content)
    with pytest.raises(BadDatasetFileError, match=message) as error:
        build_dataset("fashion_mnist", "train", str(tmp_path))
    assert str(error.value).startswith(f"{path}: ") and "\n" not in str(error.value)


@pytest.mark.parametrize("case", ["truncated gzip", "not gzip"])
def test_a_bad_gzip_idx_file_is_named(tmp_path, case):
    _fake_fashion_mnist(tmp_path, gz=True)
    path = tmp_path / "t10k-labels-idx1-ubyte.gz"
    good = path.read_bytes()
    path.write_bytes(good[: len(good) // 2] if case == "truncated gzip" else b"\0\0\x08\x01" + good)
    with pytest.raises(BadDatasetFileError, match="not a readable gzip file") as error:
        build_dataset("fashion_mnist", "test", str(tmp_path))
    assert str(error.value).startswith(f"{path}: ") and "\n" not in str(error.value)


def test_idx_files_of_the_wrong_kind_name_the_file(tmp_path):
    _fake_fashion_mnist(tmp_path, gz=False)
    images = tmp_path / "train-images-idx3-ubyte"
    labels = tmp_path / "train-labels-idx1-ubyte"
    # The label file where the images belong, and images of another size.
    images.write_bytes(labels.read_bytes())
    with pytest.raises(BadDatasetFileError, match=rf"^{images}: expected uint8 images of shape \(N, 28, 28\)"):
        build_dataset("fashion_mnist", "train", str(tmp_path))
    _write_idx(images, np.zeros((6, 32, 32), np.uint8))
    with pytest.raises(BadDatasetFileError, match=r"holds uint8 of shape \(6, 32, 32\)"):
        build_dataset("fashion_mnist", "train", str(tmp_path))
    _write_idx(images, np.zeros((6, 28, 28), np.uint8))
    _write_idx(labels, np.zeros((6, 2), np.uint8))
    with pytest.raises(BadDatasetFileError, match=rf"^{labels}: expected integer labels of shape \(N,\)"):
        build_dataset("fashion_mnist", "train", str(tmp_path))


def _bad_cifar_variants(good: bytes):
    return {
        "empty": (b"", "not a readable CIFAR-10 batch.*EOFError"),
        "truncated": (good[: len(good) // 2], "not a readable CIFAR-10 batch"),
        "last byte cut": (good[:-1], "not a readable CIFAR-10 batch"),
        "random bytes": (bytes(np.random.default_rng(0).integers(0, 256, 3000, dtype=np.uint8)),
                         "not a readable CIFAR-10 batch"),
        "text": (b"airplane,automobile\n", "not a readable CIFAR-10 batch"),
        "an IDX file": (bytes([0, 0, 8, 1, 0, 0, 0, 2, 3, 4]), "not a readable CIFAR-10 batch"),
        "a pickled list": (pickle.dumps([1, 2, 3], protocol=2), r"not a CIFAR-10 batch \(a pickled dict\), got list"),
        "batches.meta": (pickle.dumps({"label_names": ["airplane"] * 10}, protocol=2), "needs 'data' and 'labels'"),
        "labels not numbers": (pickle.dumps({"data": np.zeros((2, 3072), np.uint8), "labels": ["cat", "dog"]},
                                            protocol=2), "'labels' must be integers"),
        "labels of another length": (pickle.dumps({"data": np.zeros((2, 3072), np.uint8), "labels": [1]}, protocol=2),
                                     r"2 images but labels of shape \(1,\)"),
        "data not an array": (pickle.dumps({"data": "pixels", "labels": [1]}, protocol=2),
                              r"'data' must be uint8 of shape \(N, 3072\), got str"),
    }


@pytest.mark.parametrize("case", ["empty", "truncated", "last byte cut", "random bytes", "text", "an IDX file",
                                  "a pickled list", "batches.meta", "labels not numbers", "labels of another length",
                                  "data not an array"])
def test_a_bad_cifar_batch_is_a_one_line_error_naming_it(tmp_path, case):
    folder, _, _ = _fake_cifar10(tmp_path, n=3)
    path = os.path.join(folder, "test_batch")
    with open(path, "rb") as f:
        content, message = _bad_cifar_variants(f.read())[case]
    with open(path, "wb") as f:
        f.write(content)
    with pytest.raises(BadDatasetFileError, match=message) as error:
        build_dataset("cifar10", "test", str(tmp_path))
    assert str(error.value).startswith(f"{path}: ") and "\n" not in str(error.value)


# ---------------------------------------------------------------- sklearn digits

def test_digits_original_pixels_and_split():
    sklearn_digits = pytest.importorskip("sklearn.datasets").load_digits

    raw = sklearn_digits()
    train, test = load_dataset("digits", image_size=8)
    assert len(train) + len(test) == len(raw.target) == 1797
    assert train.images.shape[1:] == (1, 8, 8) and train.info.image_size == 8
    # every original image is in exactly one split, pixels / 16
    both = torch.cat([train.images, test.images]).flatten(1)
    original = torch.from_numpy(raw.images.reshape(1797, 64) / 16).float()
    assert torch.equal(torch.sort(both, 0).values, torch.sort(original, 0).values)
    assert torch.equal(torch.bincount(torch.cat([train.labels, test.labels])),
                       torch.bincount(torch.from_numpy(raw.target)))
    # balanced test split: a fifth of each class, rounded up
    counts = torch.bincount(test.labels, minlength=10)
    expected = (torch.bincount(torch.from_numpy(raw.target)) + 4) // 5
    assert torch.equal(counts, expected)


def test_digits_upsampled_by_default():
    pytest.importorskip("sklearn")
    train = build_dataset("digits", "train")
    assert train.images.shape[1:] == (1, 32, 32)
    assert 0 <= train.images.min() and train.images.max() <= 1
    mean, std = train.info.normalization
    assert mean[0] == pytest.approx(train.images.mean().item(), rel=1e-5)
    assert std[0] == pytest.approx(train.images.std(unbiased=False).item(), rel=1e-5)
    with pytest.raises(ValueError, match="image_size must be an int >= 8"):
        load_digits(image_size=4)
    with pytest.raises(ValueError, match="data_dir does not apply to 'digits'"):
        build_dataset("digits", "train", "/some/folder")


# ---------------------------------------------------------------- synthetic

def test_synthetic_is_deterministic_given_a_seed():
    a = make_synthetic(True, train_size=64, seed=5)
    b = make_synthetic(True, train_size=64, seed=5)
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels) and a.info == b.info
    c = make_synthetic(True, train_size=64, seed=6)
    assert not torch.equal(a.images, c.images)
    test = make_synthetic(False, test_size=64, seed=5)
    assert not torch.equal(a.images, test.images)
    # the statistics and the first examples do not depend on the split sizes
    longer = make_synthetic(True, train_size=96, seed=5, limit=64)
    assert longer.info == a.info and len(longer) == 64


@pytest.mark.parametrize("channels,classes,size", [(1, 2, 28), (3, 10, 32), (4, 7, 8)])
def test_synthetic_shapes_and_balance(channels, classes, size):
    train, test = load_dataset("synthetic", in_channels=channels, num_classes=classes, image_size=size,
                               train_size=70, test_size=14)
    assert train.images.shape == (70, channels, size, size) and test.images.shape == (14, channels, size, size)
    assert 0 <= train.images.min() and train.images.max() <= 1
    counts = torch.bincount(train.labels, minlength=classes)
    assert counts.max() - counts.min() <= 1
    assert train.info == DatasetInfo("synthetic", channels, classes, size, train.info.mean, train.info.std,
                                     tuple(f"class {k}" for k in range(classes)))


def test_synthetic_labels_follow_the_images():
    # A nearest-class-mean classifier beats chance (10%) by far: the classes are learnable.
    train, test = load_dataset("synthetic", train_size=500, test_size=200)
    means = torch.stack([train.images[train.labels == k].mean(0) for k in range(10)]).flatten(1)
    predicted = torch.cdist(test.images.flatten(1), means).argmin(1)
    assert (predicted == test.labels).float().mean() > 0.5


@pytest.mark.parametrize("option,pattern", [
    (dict(num_classes=1), "num_classes must be an int >= 2"),
    (dict(in_channels=0), "in_channels must be an int >= 1"),
    (dict(image_size=2), "image_size must be an int >= 4"),
    (dict(noise=-0.1), "noise must be a finite number >= 0"),
    (dict(separation=0), r"separation must be in \(0, 1\]"),
    (dict(seed=-1), "seed must be a non-negative int"),
    (dict(limit=0), "limit must be None or a positive int"),
])
def test_synthetic_bad_options_are_named(option, pattern):
    with pytest.raises(ValueError, match=pattern):
        build_dataset("synthetic", "train", **option)


# ---------------------------------------------------------------- registry

def test_registry_names_and_errors():
    assert set(DATASETS) == {"fashion_mnist", "cifar10", "digits", "synthetic"}
    with pytest.raises(ValueError, match=r"unknown dataset 'mnist'.*cifar10.*digits.*fashion_mnist.*synthetic"):
        build_dataset("mnist", "train")
    with pytest.raises(ValueError, match=r"split must be one of \('train', 'test'\), got 'val'"):
        build_dataset("synthetic", "val")
    with pytest.raises(TypeError, match=r"dataset 'synthetic' does not take option\(s\) \['colour'\]"):
        build_dataset("synthetic", "train", colour=True)
    with pytest.raises(TypeError, match="name must be a str"):
        build_dataset(3, "train")


def test_info_builds_a_matching_model():
    train = build_dataset("synthetic", "train", in_channels=1, num_classes=4, image_size=28, train_size=8)
    info = train.info
    model = build_model("smallcnn", info.in_channels, info.num_classes, width=0.25, image_size=info.image_size,
                        normalization=info.normalization).eval()
    assert model(train.images).shape == (8, 4)
