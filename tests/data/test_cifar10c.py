"""CIFAR-10-C from small generated .npy files in Hendrycks' layout: the loader (severity blocks, limits, bad
files), the evaluation (the same images as the clean test set, corrupted) and eval --cifar10c."""
import json
import os
import pickle

import numpy as np
import pytest
import torch
from torch import nn

from sparsesam.data import load_cifar10c
from sparsesam.data.cifar10c import available_corruptions, find_cifar10c
from sparsesam.file_errors import BadDatasetFileError
from sparsesam.robust import evaluate_cifar10c

PER_SEVERITY = 6


def write_cifar10c(root, corruptions=("gaussian_noise", "fog"), n=PER_SEVERITY, labels=None, seed=0):
    """``root/CIFAR-10-C/<corruption>.npy`` of (5n, 32, 32, 3) uint8 and ``labels.npy`` (5n,) as released:
    the same n labels repeated for each severity. Returns (folder, {corruption: images})."""
    rng = np.random.default_rng(seed)
    folder = os.path.join(root, "CIFAR-10-C")
    os.makedirs(folder, exist_ok=True)
    labels = rng.integers(0, 10, size=n).astype(np.uint8) if labels is None else np.asarray(labels, np.uint8)
    np.save(os.path.join(folder, "labels.npy"), np.tile(labels, 5))
    images = {}
    for name in corruptions:
        images[name] = rng.integers(0, 256, size=(5 * n, 32, 32, 3), dtype=np.uint8)
        np.save(os.path.join(folder, f"{name}.npy"), images[name])
    return folder, images


def test_loader_reads_one_severity_block_as_chw_floats(tmp_path):
    folder, images = write_cifar10c(tmp_path)
    for root in (str(tmp_path), folder):  # the parent or the folder itself
        assert find_cifar10c(root) == folder
    assert available_corruptions(str(tmp_path)) == ("gaussian_noise", "fog")
    data = load_cifar10c(str(tmp_path), "fog", 3)
    assert data.images.shape == (PER_SEVERITY, 3, 32, 32) and data.images.dtype == torch.float32
    expected = torch.from_numpy(images["fog"][2 * PER_SEVERITY:3 * PER_SEVERITY]).permute(0, 3, 1, 2).float() / 255
    assert torch.equal(data.images, expected)
    assert data.info.name == "cifar10" and data.labels.dtype == torch.int64
    limited = load_cifar10c(str(tmp_path), "fog", 5, limit=2)
    expected = torch.from_numpy(images["fog"][4 * PER_SEVERITY:4 * PER_SEVERITY + 2]).permute(0, 3, 1, 2).float()
    assert torch.equal(limited.images, expected / 255)


def test_bad_arguments_and_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="never downloads"):
        load_cifar10c(str(tmp_path), "fog", 1)
    write_cifar10c(tmp_path)
    with pytest.raises(FileNotFoundError, match="snow.npy is missing"):
        load_cifar10c(str(tmp_path), "snow", 1)
    with pytest.raises(ValueError, match="corruption must be one of"):
        load_cifar10c(str(tmp_path), "rain", 1)
    with pytest.raises(ValueError, match="severity"):
        load_cifar10c(str(tmp_path), "fog", 6)


@pytest.mark.parametrize("damage, message", [
    ("truncate", "not a readable .npy array"),
    ("pickle", "not a readable .npy array"),
    ("text", "not a readable .npy array"),
    ("shape", r"uint8 of shape \(N, 32, 32, 3\)"),
    ("dtype", r"uint8 of shape \(N, 32, 32, 3\)"),
    ("count", "images but"),
])
def test_damaged_files_are_one_line_bad_file_errors(tmp_path, damage, message):
    folder, _ = write_cifar10c(tmp_path)
    path = os.path.join(folder, "fog.npy")
    if damage == "truncate":
        data = open(path, "rb").read()
        open(path, "wb").write(data[:len(data) // 2])
    elif damage == "pickle":
        with open(path, "wb") as f:
            pickle.dump({"data": 1}, f)
    elif damage == "text":
        open(path, "w").write("not an array\n")
    elif damage == "shape":
        np.save(path, np.zeros((5 * PER_SEVERITY, 3, 32, 32), np.uint8))
    elif damage == "dtype":
        np.save(path, np.zeros((5 * PER_SEVERITY, 32, 32, 3), np.float32))
    else:
        np.save(path, np.zeros((5 * PER_SEVERITY - 5, 32, 32, 3), np.uint8))
    with pytest.raises(BadDatasetFileError, match=message) as caught:
        load_cifar10c(str(tmp_path), "fog", 1)
    assert caught.value.path == path and "\n" not in str(caught.value)


def test_bad_labels_file(tmp_path):
    folder, _ = write_cifar10c(tmp_path)
    np.save(os.path.join(folder, "labels.npy"), np.zeros(7, np.int64))  # not 5 x N
    with pytest.raises(BadDatasetFileError, match="labels must be integers"):
        load_cifar10c(str(tmp_path), "fog", 1)
    np.save(os.path.join(folder, "labels.npy"), np.full(5 * PER_SEVERITY, 12, np.int64))
    with pytest.raises(BadDatasetFileError, match=r"labels must be in \[0, 10\)"):
        load_cifar10c(str(tmp_path), "fog", 1)


class _MeanColour(nn.Module):
    """Predicts class 1 where the red mean exceeds one half, else class 0 (a model whose answers we know)."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, x):
        red = x[:, 0].mean(dim=(1, 2)) * self.scale - 0.5
        others = torch.full((x.shape[0], 8), -10.0)
        return torch.cat([-red[:, None], red[:, None], others], dim=1)


def test_evaluation_scores_every_severity_on_the_matching_images(tmp_path):
    labels = [0, 1, 1, 0, 1, 0]
    folder, images = write_cifar10c(tmp_path, labels=labels)
    # Severity s of gaussian_noise: the first s images bright red (class 1), the others dark.
    for s in range(5):
        block = images["gaussian_noise"][s * PER_SEVERITY:(s + 1) * PER_SEVERITY]
        block[:, :, :, 0] = 0
        block[:s + 1, :, :, 0] = 255
    np.save(os.path.join(folder, "gaussian_noise.npy"), images["gaussian_noise"])
    model = _MeanColour()
    clean = [(torch.zeros(PER_SEVERITY, 3, 32, 32), torch.tensor(labels))]  # all dark: class 0
    result = evaluate_cifar10c(model, clean, str(tmp_path), corruptions=["gaussian_noise"], batch_size=4)
    predicted = [[1] * (s + 1) + [0] * (PER_SEVERITY - s - 1) for s in range(5)]
    expected = [float(np.mean(np.equal(p, labels))) for p in predicted]
    assert result["accuracy"]["gaussian_noise"] == pytest.approx(expected)
    assert result["clean_accuracy"] == pytest.approx(np.mean(np.equal(labels, 0)))
    assert result["examples"] == PER_SEVERITY and result["severities"] == [1, 2, 3, 4, 5]
    assert result["mean_corruption_accuracy"] == pytest.approx(np.mean(expected))
    # Clean images that are not CIFAR-10-C's (other labels) are refused.
    with pytest.raises(ValueError, match="labels differ"):
        evaluate_cifar10c(model, [(clean[0][0], torch.tensor(labels[::-1]))], str(tmp_path),
                          corruptions=["gaussian_noise"])


def test_eval_command_reads_cifar10c(tmp_path, monkeypatch):
    """A CIFAR-10 model (fake CIFAR-10 batches) evaluated with --cifar10c on files whose labels are its test labels."""
    from cli_helpers import run
    from test_datasets import _fake_cifar10
    _, _, (_, test_labels) = _fake_cifar10(str(tmp_path / "cifar"), n=4)  # 5 test images
    write_cifar10c(tmp_path / "c", corruptions=("fog", "saturate"), n=5, labels=test_labels)
    out = tmp_path / "model"
    assert run(["train", "--model", "smallcnn", "--width", "0.25", "--dataset", "cifar10",
                "--data-dir", tmp_path / "cifar", "--epochs", "1", "--batch-size", "4", "--no-progress",
                "--out", out]) == 0
    assert run(["eval", out, "--data-dir", tmp_path / "cifar", "--no-progress", "--no-pgd", "--no-smoothing",
                "--no-cc-cert", "--cifar10c", tmp_path / "c", "--corruptions", "fog,saturate", "--severities",
                "1,5", "--latency-batch", "2", "--latency-repeats", "1", "--execution", "dense"]) == 0
    corruption = json.loads((out / "eval" / "eval.json").read_text())["corruption"]
    assert corruption["source"].startswith("CIFAR-10-C") and corruption["examples"] == 5
    assert sorted(corruption["accuracy"]) == ["fog", "saturate"]
    assert all(len(v) == 2 for v in corruption["accuracy"].values())
    # A corruption the folder lacks, or a folder without labels.npy: one line, exit 2.
    assert run(["eval", out, "--data-dir", tmp_path / "cifar", "--no-progress", "--no-pgd", "--no-smoothing",
                "--no-cc-cert", "--cifar10c", tmp_path / "nowhere", "--execution", "dense"]) == 2
