"""Training that turns NaN / inf stops with TrainingDiverged naming the epoch and the step, and nothing is
exported: the dense loop of ``sparsesam train`` and every algorithm's fit (through EpochMeter and fit's
end-of-epoch check of the parameters and BatchNorm statistics)."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from sparsesam.algorithms import Magnitude, MagnitudeConfig
from sparsesam.algorithms._steps import EpochMeter
from sparsesam import training
from sparsesam.divergence import StepCheck, TrainingDiverged, check_state
from sparsesam.models import SmallCNN

from algorithm_problems import MemoryCheckpoint, pretrained_model, train_loader
from cli_helpers import DATA, MODEL, run


# --- the checks --------------------------------------------------------------------------------------------


def test_step_check_names_the_first_non_finite_value_and_its_step():
    check = StepCheck()
    check.step(loss=2.3)
    check.step(loss=1.9, regulariser=0.1)
    with pytest.raises(TrainingDiverged) as error:
        check.step(loss=1.5, regulariser=math.inf)
    assert error.value.step == 3
    assert str(error.value) == "training diverged: the regulariser is inf at step 3"


def test_located_message_names_phase_epoch_step_and_hint():
    error = TrainingDiverged("the loss is nan", step=17).locate(epoch=2, where="magnitude finetune", hint="lr 1e+06")
    assert str(error) == "magnitude finetune: training diverged: the loss is nan at epoch 2, step 17 (lr 1e+06)"
    assert isinstance(error, FloatingPointError)
    assert str(TrainingDiverged("x holds NaN or inf", epoch=1)) == "training diverged: x holds NaN or inf after epoch 1"


def test_check_state_names_a_non_finite_batchnorm_statistic():
    model = SmallCNN(in_channels=1, num_classes=10, width=8, image_size=8)
    check_state(model)  # a fresh model is finite
    bn = next(m for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    name = next(n for n, m in model.named_modules() if m is bn)
    bn.running_var[0] = math.inf
    with pytest.raises(TrainingDiverged, match=rf"{name}.running_var holds NaN or inf$"):
        check_state(model)
    bn.running_mean[1] = math.nan
    next(model.parameters()).data[0] = math.nan
    with pytest.raises(TrainingDiverged, match=r"holds NaN or inf \(and 2 more tensors\)"):
        check_state(model)


def test_epoch_meter_refuses_a_non_finite_loss():
    meter = EpochMeter(bar=_NoBar())
    y = torch.zeros(4, dtype=torch.long)
    meter.add(4, None, y, loss=0.5)
    with pytest.raises(TrainingDiverged, match="the loss is nan at step 2"):
        meter.add(4, None, y, loss=math.nan)


class _NoBar:
    def set_postfix(self, *args, **kwargs):
        pass


# --- the dense loop (sparsesam train) ----------------------------------------------------------------------


class _NanAfter(nn.Module):
    """A linear classifier whose output turns NaN from its ``bad``-th training forward on."""

    def __init__(self, bad: int) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 3)
        self.bad, self.calls = bad, 0

    def forward(self, x):
        self.calls += self.training
        out = self.linear(x)
        return out * math.nan if self.training and self.calls >= self.bad else out


def _loader():
    torch.manual_seed(0)
    return DataLoader(TensorDataset(torch.randn(40, 4), torch.randint(0, 3, (40,))), batch_size=8)


def test_dense_epoch_stops_at_the_step_whose_loss_is_nan():
    model = _NanAfter(bad=3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(TrainingDiverged) as error:
        training.train_epoch(model, _loader(), optimizer, desc="train 1/1", progress=False)
    assert error.value.step == 3 and "the loss is nan" in str(error.value)


def test_cli_train_whose_loss_turns_nan_exits_3_naming_epoch_and_step(tmp_path, capsys, monkeypatch):
    """The loss goes NaN at the 2nd step of epoch 2: one line, exit 3, no model exported."""
    calls = {"n": 0}

    def cross_entropy_loss(model, x, y, step):
        calls["n"] += 1
        logits = model(x)
        loss = F.cross_entropy(logits, y)
        return (loss * math.nan if calls["n"] == 5 else loss), logits  # 3 steps an epoch (96 images, batches of 32)

    # The training loop's default loss (the test evaluation, in the same module, keeps its own cross-entropy).
    monkeypatch.setattr(training, "cross_entropy_loss", cross_entropy_loss)
    out = tmp_path / "run"
    assert run(["train", *MODEL, *DATA, "--epochs", "3", "--out", out]) == 3
    err = capsys.readouterr().err.strip()
    assert err == ("sparsesam train: error: training diverged: the loss is nan at epoch 2, step 2 "
                   "(--lr 0.05: lower it)")
    assert not (out / "model.safetensors").exists() and not (out / "train.json").exists()



def test_cli_train_with_a_huge_lr_exits_3_and_exports_nothing(tmp_path, capsys):
    """``--lr 1e6`` used to exit 0 and export a model whose BatchNorm running_var was inf (the loss, computed
    with the batch's own statistics, stayed finite)."""
    out = tmp_path / "run"
    assert run(["train", *MODEL, *DATA, "--epochs", "2", "--lr", "1e6", "--out", out]) == 3
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert err.startswith("sparsesam train: error: training diverged: ") and "epoch 1" in err, err
    assert ".running_var holds NaN or inf" in err and "(--lr 1e+06: lower it)" in err, err
    assert not (out / "model.safetensors").exists() and not (out / "train.json").exists()


# --- the algorithms -----------------------------------------------------------------------------------------


def _magnitude(**changes) -> Magnitude:
    return Magnitude(MagnitudeConfig(**{"target_sparsity": 0.5, "finetune_epochs": 2, "lr": 0.01,
                                        "execution": "dense", **changes}))


def test_algorithm_fit_stops_at_the_step_whose_loss_is_nan_and_saves_nothing_more():
    algorithm = _magnitude()
    clean = algorithm.loss_fn

    def loss_fn(model, x, y, step):
        loss, logits = clean(model, x, y, step)
        return (loss * math.nan if step == 12 else loss), logits  # 10 steps an epoch: epoch 2, step 3

    algorithm.loss_fn = loss_fn
    checkpoint = MemoryCheckpoint()
    with pytest.raises(TrainingDiverged) as error:
        algorithm.fit(pretrained_model(), train_loader(), progress=False, checkpoint=checkpoint)
    assert str(error.value) == ("magnitude finetune: training diverged: the loss is nan at epoch 2, step 3 "
                                "(lr 0.005)")
    assert checkpoint.saves == 1  # epoch 1 only


def test_algorithm_fit_stops_when_a_batchnorm_statistic_overflows():
    """Every step's loss finite, but a running_var is inf at the end of the epoch: fit's state check."""
    algorithm = _magnitude(finetune_epochs=1)
    clean = algorithm.loss_fn

    def loss_fn(model, x, y, step):
        if step == 9:  # the epoch's last step: its loss is still finite
            bn = next(m for m in model.modules() if isinstance(m, nn.BatchNorm2d))
            bn.running_var[0] = math.inf
        return clean(model, x, y, step)

    algorithm.loss_fn = loss_fn
    with pytest.raises(TrainingDiverged, match=r"^magnitude finetune: training diverged: \S+\.running_var holds "
                                               r"NaN or inf after epoch 1 \(lr 0\.01\)$"):
        algorithm.fit(pretrained_model(), train_loader(), progress=False)
