"""Checkpointer on bad files: every way a checkpoint can be unusable is a one-line BadCheckpointError naming it.

Each bad file is generated here from a real checkpoint (the state a train
run saves: model, optimizer, epoch, history, RNG state): empty, random
bytes, text, truncated at several points, a flipped byte inside the
archive, a pickle that is not plain data, a dict missing what a resume
needs, and states of another model width, another architecture, another
optimizer and another algorithm.
"""
from __future__ import annotations

import os
import random

import pytest
import torch

from sparsesam.checkpoint import Checkpointer, capture_rng_state
from sparsesam.file_errors import BadCheckpointError, BadFileError
from sparsesam.models import build_model
from sparsesam.optim import SAM

REQUIRED = ("model", "optimizer", "epoch", "history", "rng")


def _model(width=0.25, name="resnet18"):
    torch.manual_seed(0)
    return build_model(name, in_channels=3, num_classes=10, width=width, image_size=32)


def _optimizer(model):
    return torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)


def _saved_run(path, width=0.25, name="resnet18"):
    """A checkpoint as ``sparsesam train`` writes it, after one optimizer step (so momentum buffers exist)."""
    model = _model(width, name)
    optimizer = _optimizer(model)
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    optimizer.step()
    ckpt = Checkpointer(path)
    ckpt.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": 1, "history": [],
               "rng": capture_rng_state()})
    return ckpt


def _assert_one_line(error, path):
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith(f"{path}: ")
    assert isinstance(error.value, BadFileError) and isinstance(error.value, ValueError)
    assert error.value.path == str(path)


@pytest.fixture(scope="module")
def good_bytes(tmp_path_factory):
    path = tmp_path_factory.mktemp("good") / "checkpoint.pt"
    _saved_run(path)
    return path.read_bytes()


def test_a_good_checkpoint_loads_with_every_required_key(tmp_path, good_bytes):
    path = tmp_path / "checkpoint.pt"
    path.write_bytes(good_bytes)
    state = Checkpointer(path).load(required=REQUIRED)
    assert set(REQUIRED) <= set(state) and state["epoch"] == 1


def _bad_variants(good: bytes):
    rng = random.Random(0)
    middle = len(good) // 2
    flipped = bytearray(good)
    flipped[middle] ^= 0xFF  # one byte inside a tensor's storage: torch.load alone would not notice
    return {
        "empty": (b"", "is empty"),
        "random bytes": (bytes(rng.getrandbits(8) for _ in range(4096)), "does not start like a zip archive"),
        "text": (b"epoch: 3\nmodel: resnet18\n", "does not start like a zip archive"),
        "first 10 bytes": (good[:10], "truncated or corrupt"),
        "first half": (good[:middle], "truncated or corrupt"),
        "all but the last byte": (good[:-1], "truncated or corrupt"),
        "one byte flipped": (bytes(flipped), "fails its CRC-32 check"),
    }


@pytest.mark.parametrize("case", ["empty", "random bytes", "text", "first 10 bytes", "first half",
                                  "all but the last byte", "one byte flipped"])
def test_unreadable_checkpoints_are_one_line_errors(tmp_path, good_bytes, case):
    content, message = _bad_variants(good_bytes)[case]
    path = tmp_path / "checkpoint.pt"
    path.write_bytes(content)
    with pytest.raises(BadCheckpointError, match=message) as error:
        Checkpointer(path).load()
    _assert_one_line(error, path)


class Payload:
    """Any class: a checkpoint holding it is refused, since unpickling could run code."""


def test_objects_other_than_plain_data_are_refused(tmp_path):
    path = tmp_path / "checkpoint.pt"
    torch.save({"epoch": 1, "object": Payload()}, path)
    with pytest.raises(BadCheckpointError, match="objects other than tensors.*not loaded") as error:
        Checkpointer(path).load()
    _assert_one_line(error, path)


def test_a_checkpoint_that_is_not_a_dict_is_refused(tmp_path):
    path = tmp_path / "checkpoint.pt"
    torch.save([torch.zeros(3)], path)
    with pytest.raises(BadCheckpointError, match="does not hold a dict") as error:
        Checkpointer(path).load()
    _assert_one_line(error, path)


def test_missing_keys_are_named(tmp_path):
    ckpt = Checkpointer(tmp_path / "checkpoint.pt")
    ckpt.save({"model": {}, "epoch": 2})
    with pytest.raises(BadCheckpointError, match=r"lacks \['optimizer', 'history', 'rng'\]") as error:
        ckpt.load(required=REQUIRED)
    _assert_one_line(error, ckpt.path)
    with pytest.raises(TypeError, match="required"):
        ckpt.load(required="model")


@pytest.mark.parametrize("other", [{"width": 0.5}, {"name": "smallcnn"}], ids=["another width", "another model"])
def test_a_model_state_of_another_model_is_named(tmp_path, other):
    ckpt = _saved_run(tmp_path / "checkpoint.pt", **other)
    state = ckpt.load(required=REQUIRED)
    model = _model()
    with pytest.raises(BadCheckpointError, match="'model' state does not fit this run's") as error:
        ckpt.restore(model, state, "model")
    _assert_one_line(error, ckpt.path)


def test_an_optimizer_state_of_another_model_is_named(tmp_path):
    ckpt = _saved_run(tmp_path / "checkpoint.pt", width=0.5)
    state = ckpt.load(required=REQUIRED)
    # Another width: as many parameters, so torch's load_state_dict accepts the momentum buffers of
    # the wrong shapes; restore checks them against the parameters.
    with pytest.raises(BadCheckpointError, match=r"momentum_buffer of parameter 0 has shape \(32, 3, 3, 3\), "
                                                  r"the parameter \(16, 3, 3, 3\)") as error:
        ckpt.restore(_optimizer(_model(width=0.25)), state, "optimizer")
    _assert_one_line(error, ckpt.path)
    # Another architecture: parameter groups of another size.
    with pytest.raises(BadCheckpointError, match="'optimizer' state does not fit this run's SGD"):
        ckpt.restore(_optimizer(torch.nn.Linear(3, 2)), state, "optimizer")


def test_a_sgd_state_given_to_sam_is_named(tmp_path):
    ckpt = _saved_run(tmp_path / "checkpoint.pt")
    state = ckpt.load(required=REQUIRED)
    model = _model()
    sam = SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9)
    with pytest.raises(BadCheckpointError, match="'optimizer' state does not fit this run's SAM"):
        ckpt.restore(sam, state, "optimizer")


def test_restore_loads_a_matching_state_exactly(tmp_path):
    ckpt = _saved_run(tmp_path / "checkpoint.pt")
    state = ckpt.load(required=REQUIRED)
    model = build_model("resnet18", in_channels=3, num_classes=10, width=0.25, image_size=32)  # other init
    optimizer = _optimizer(model)
    ckpt.restore(model, state, "model")
    ckpt.restore(optimizer, state, "optimizer")
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, state["model"][name]), name
    assert optimizer.state_dict()["state"].keys() == state["optimizer"]["state"].keys()
    with pytest.raises(BadCheckpointError, match="has no 'scheduler' state"):
        ckpt.restore(model, state, "scheduler")
    with pytest.raises(TypeError, match="load_state_dict"):
        ckpt.restore(object(), state, "model")


def test_a_checkpoint_of_another_algorithm_is_named(tmp_path):
    ckpt = Checkpointer(tmp_path / "prune_checkpoint.pt")
    ckpt.save({"algorithm": "adasap", "version": 1})
    state = ckpt.load()
    ckpt.expect(state, algorithm="adasap", version=1)
    with pytest.raises(BadCheckpointError, match=r"written with algorithm='adasap', this run has algorithm='harp'") \
            as error:
        ckpt.expect(state, algorithm="harp", version=1)
    _assert_one_line(error, ckpt.path)


def test_error_text_of_a_long_multiline_cause_is_cut_to_one_line(tmp_path):
    from sparsesam.file_errors import one_line
    text = "Error(s) in loading state_dict for ResNet:\n\tsize mismatch for a\n\n\t" + "x" * 1000
    line = one_line(text)
    assert "\n" not in line and "\t" not in line and len(line) <= 300 and line.endswith("...")
    assert line.startswith("Error(s) in loading state_dict for ResNet:; size mismatch for a; xxx")
    assert os.fspath(BadFileError(tmp_path / "f", "a\nb").path) == str(tmp_path / "f")
    assert str(BadFileError("f.pt", "a\nb")) == "f.pt: a; b"


def test_fit_refuses_a_state_of_another_config_phase_or_width_naming_the_file(tmp_path):
    import dataclasses
    from algorithm_problems import fresh_model, pretrained_model, train_loader
    from sparsesam.algorithms import Magnitude, MagnitudeConfig
    ckpt = Checkpointer(tmp_path / "prune_checkpoint.pt")
    config = MagnitudeConfig(target_sparsity=0.5, finetune_epochs=2)
    Magnitude(config).fit(pretrained_model(), train_loader(), progress=False, checkpoint=ckpt)
    saved = ckpt.load()

    other = dataclasses.replace(config, target_sparsity=0.6)
    with pytest.raises(BadCheckpointError, match=r"another config: target_sparsity \(0.5 -> 0.6\)") as error:
        Magnitude(other).fit(pretrained_model(), train_loader(), progress=False, checkpoint=ckpt)
    _assert_one_line(error, ckpt.path)

    ckpt.save({**saved, "phase": "search"})
    with pytest.raises(BadCheckpointError, match="phase 'search', which 'magnitude' does not have") as error:
        Magnitude(config).fit(pretrained_model(), train_loader(), progress=False, checkpoint=ckpt)
    _assert_one_line(error, ckpt.path)

    # A model state with every tensor twice as long (a wider model's) does not fit the run's model.
    state = {key: torch.cat([value, value]) if value.dim() else value for key, value in saved["model"].items()}
    ckpt.save({**saved, "model": state})
    with pytest.raises(BadCheckpointError, match="'model' state does not fit") as error:
        Magnitude(config).fit(fresh_model(), train_loader(), progress=False, checkpoint=ckpt)
    _assert_one_line(error, ckpt.path)

    del saved["rng"]
    ckpt.save(saved)
    with pytest.raises(BadCheckpointError, match=r"lacks \['rng'\]") as error:
        Magnitude(config).fit(pretrained_model(), train_loader(), progress=False, checkpoint=ckpt)
    _assert_one_line(error, ckpt.path)


@pytest.mark.parametrize("kind", [BadFileError, BadCheckpointError])
def test_file_errors_survive_pickling_as_a_worker_process_sends_them(kind):
    """``sparsesam reproduce --workers N`` gets a worker's error back through pickle: it must rebuild whole."""
    import pickle
    error = pickle.loads(pickle.dumps(kind("/runs/a/checkpoint.pt", "the checkpoint is at epoch 7")))
    assert type(error) is kind
    assert (error.path, error.problem) == ("/runs/a/checkpoint.pt", "the checkpoint is at epoch 7")
    assert str(error) == "/runs/a/checkpoint.pt: the checkpoint is at epoch 7"
