"""Bring your own model and data: torchvision:/timm: architectures, imagefolder:PATH, --device."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from sparsesam.data import build_dataset, load_dataset, load_imagefolder
from sparsesam.file_errors import BadDatasetFileError
from sparsesam.models import build_model

from cli_helpers import run

Image = pytest.importorskip("PIL.Image")
pytest.importorskip("torchvision")


def write_folder(root, classes=("cat", "dog", "eel"), per_class=(5, 3), size=(12, 12), seed=0):
    """``root/train/<class>/*.png`` and ``root/test/<class>/*.png``: each class a colour plus noise,
    so a model can tell them apart. Returns the pixel arrays by (split, class, index)."""
    rng = np.random.default_rng(seed)
    pixels = {}
    for split, count in zip(("train", "test"), per_class):
        for label, name in enumerate(classes):
            folder = os.path.join(root, split, name)
            os.makedirs(folder, exist_ok=True)
            for i in range(count):
                base = np.zeros((*size, 3), dtype=np.int64)
                base[..., label % 3] = 200
                array = np.clip(base + rng.integers(0, 50, size=(*size, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(array).save(os.path.join(folder, f"{i:03d}.png"))
                pixels[split, name, i] = array
    return pixels


# --- Models ---------------------------------------------------------------------------------------------

def test_torchvision_architecture_without_weights():
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = build_model("torchvision:resnet18", 3, 7)
    assert isinstance(model, torchvision.models.ResNet) and model.fc.out_features == 7
    assert model(torch.rand(2, 3, 32, 32)).shape == (2, 7)
    # Freshly initialised: two builds under other seeds differ (no weights were loaded).
    torch.manual_seed(1)
    other = build_model("torchvision:resnet18", 3, 7)
    assert not torch.equal(model.conv1.weight, other.conv1.weight)


def test_torchvision_auxiliary_heads_are_off():
    model = build_model("torchvision:googlenet", 3, 5).train()
    out = model(torch.rand(2, 3, 64, 64))
    assert isinstance(out, torch.Tensor) and out.shape == (2, 5)  # not GoogLeNetOutputs


def test_timm_architecture_without_weights(monkeypatch):
    timm = pytest.importorskip("timm")
    asked = []
    create_model = timm.create_model
    monkeypatch.setattr(timm, "create_model", lambda *args, **kwargs: asked.append(kwargs) or create_model(*args, **kwargs))
    torch.manual_seed(0)
    model = build_model("timm:resnet10t", 3, 4)
    torch.manual_seed(1)
    other = build_model("timm:resnet10t", 3, 4)
    assert asked and all(kwargs.get("pretrained") is False for kwargs in asked), asked
    # Freshly initialised: two builds under other seeds differ (no weights were loaded).
    first = next(p for p in model.parameters() if p.dim() == 4)
    assert not torch.equal(first, next(p for p in other.parameters() if p.dim() == 4))


def test_timm_architecture_takes_any_channels():
    pytest.importorskip("timm")
    model = build_model("timm:resnet10t", 1, 4, normalization=((0.5,), (0.25,)))
    assert model(torch.rand(2, 1, 32, 32)).shape == (2, 4)


@pytest.mark.parametrize("name, match", [("torchvision:no_such_net", "torchvision has no image classifier"),
                                         ("timm:no_such_net", "timm has no architecture"),
                                         ("keras:resnet18", "unknown model"),
                                         ("torchvision:", "SOURCE:NAME")])
def test_unknown_external_names_are_value_errors(name, match):
    if name.startswith("timm"):
        pytest.importorskip("timm")
    with pytest.raises(ValueError, match=match):
        build_model(name, 3, 10)


def test_external_rejects_width_and_grey_images_for_torchvision():
    with pytest.raises(ValueError, match="width must be 1.0"):
        build_model("torchvision:resnet18", 3, 10, width=0.5)
    with pytest.raises(ValueError, match="3-channel images"):
        build_model("torchvision:resnet18", 1, 10)


def test_missing_timm_names_its_extra(monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "timm", None)
    with pytest.raises(ImportError, match=r"pip install 'sparsesam\[timm\]'"):
        build_model("timm:resnet18", 3, 10)


# --- Image folders --------------------------------------------------------------------------------------

def test_imagefolder_reads_pixels_labels_and_training_stats(tmp_path):
    pixels = write_folder(tmp_path)
    train, test = load_dataset(f"imagefolder:{tmp_path}")
    assert train.images.shape == (15, 3, 12, 12) and test.images.shape == (9, 3, 12, 12)
    assert train.info == test.info and train.info.classes == ("cat", "dog", "eel")
    assert train.info.name == f"imagefolder:{os.path.abspath(tmp_path)}"
    # ImageFolder's order (class by class), pixels exactly as written, scaled to [0, 1].
    assert test.labels.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    expected = torch.from_numpy(pixels["test", "dog", 1]).permute(2, 0, 1).float() / 255
    torch.testing.assert_close(test.images[4], expected, rtol=0, atol=1e-6)
    # mean / std are the training split's, for the test split too.
    all_train = np.stack([pixels["train", c, i] for c in ("cat", "dog", "eel") for i in range(5)]) / 255.0
    np.testing.assert_allclose(test.info.mean, all_train.mean((0, 1, 2)), atol=1e-6)
    np.testing.assert_allclose(test.info.std, all_train.std((0, 1, 2)), atol=1e-6)


def test_imagefolder_limit_takes_the_classes_in_turn(tmp_path):
    write_folder(tmp_path)
    train = build_dataset(f"imagefolder:{tmp_path}", "train", limit=4)
    assert train.labels.tolist() == [0, 1, 2, 0]


def test_imagefolder_resizes_when_asked_and_refuses_mixed_sizes(tmp_path):
    write_folder(tmp_path, size=(12, 16))
    with pytest.raises(BadDatasetFileError, match="pass an image size"):
        load_imagefolder(str(tmp_path), train=True)
    train = load_imagefolder(str(tmp_path), train=True, image_size=8)
    assert train.images.shape == (15, 3, 8, 8) and train.info.image_size == 8


def test_imagefolder_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_imagefolder(str(tmp_path / "nowhere"))
    (tmp_path / "train" / "a").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="no test or val sub-folder"):
        load_imagefolder(str(tmp_path), train=False)
    bad = tmp_path / "bad"
    write_folder(bad)
    (bad / "train" / "cat" / "000.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    with pytest.raises(BadDatasetFileError, match="000.png: not a readable image"):
        load_imagefolder(str(bad), train=True)


def test_imagefolder_test_classes_must_match(tmp_path):
    write_folder(tmp_path)
    os.rename(tmp_path / "test" / "eel", tmp_path / "test" / "fox")
    with pytest.raises(ValueError, match="classes"):
        load_imagefolder(str(tmp_path), train=False)


# --- CLI ------------------------------------------------------------------------------------------------

def test_cli_trains_a_torchvision_model_on_an_image_folder_then_evaluates(tmp_path):
    write_folder(tmp_path / "images", per_class=(6, 4))
    out = tmp_path / "run"
    assert run(["train", "--model", "torchvision:resnet18", "--dataset", f"imagefolder:{tmp_path / 'images'}",
                "--image-size", "16", "--epochs", "1", "--batch-size", "8", "--device", "cpu", "--no-progress",
                "--out", out]) == 0
    result = json.loads((out / "train.json").read_text())
    assert result["train_examples"] == 18 and result["test_examples"] == 12
    config = json.loads((out / "config.json").read_text())
    assert config["device"] == "cpu"
    assert run(["eval", out, "--no-progress", "--no-corruptions", "--no-pgd", "--no-smoothing", "--no-cc-cert",
                "--latency-batch", "2", "--latency-repeats", "1", "--execution", "dense"]) == 0
    evaluated = json.loads((out / "eval" / "eval.json").read_text())
    assert evaluated["model"] == "torchvision:resnet18" and evaluated["test_examples"] == 12


@pytest.mark.parametrize("argv, message", [
    (["--device", "tpu"], "--device must be cpu, cuda or cuda:N"),
    (["--device", "cuda:99"], "cuda:99"),
    (["--model", "torchvision:nope"], "torchvision has no image classifier"),
    (["--dataset", "imagefolder:/no/such/folder"], "does not exist"),
])
def test_cli_bad_model_data_or_device_is_one_line_exit_2(tmp_path, capsys, argv, message):
    base = {"--model": "smallcnn", "--dataset": "digits", "--device": "cpu"}
    for flag, value in zip(argv[::2], argv[1::2]):
        base[flag] = value
    flags = [part for pair in base.items() for part in pair]
    assert run(["train", *flags, "--epochs", "1", "--limit", "8", "--no-progress", "--out", tmp_path / "o"]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err
    assert not (tmp_path / "o").exists()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cli_trains_on_cuda(tmp_path):
    out = tmp_path / "run"
    assert run(["train", "--model", "smallcnn", "--width", "0.25", "--dataset", "digits", "--image-size", "8",
                "--limit", "64", "--epochs", "1", "--batch-size", "32", "--device", "cuda", "--no-progress",
                "--sam-rho", "0.05", "--out", out]) == 0
    assert json.loads((out / "train.json").read_text())["test_accuracy"] >= 0
