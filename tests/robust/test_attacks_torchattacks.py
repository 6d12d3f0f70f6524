"""APGD / AutoAttack through torchattacks (the [attacks] extra) on the undefended digits MLP: at least as strong
as our PGD, inside the threat model, at the official settings, leaving the caller's RNG alone; and the eval
command's --attack option."""
import json
import sys

import pytest
import torch
from torch import nn

from sparsesam.robust import adversarial_accuracy, autoattack, pgd
from sparsesam.robust.attacks_torchattacks import ITERATIONS, TORCHATTACKS, build_attack, torchattacks_attack

from robust_data import digits, trained_digits_mlp

torchattacks = pytest.importorskip("torchattacks")


def _test_set(n=300):
    _, _, x, y = digits()
    return x[:n], y[:n]


def _correct(model, x, y):
    with torch.no_grad():
        return model(x).argmax(dim=1) == y


@pytest.mark.parametrize("eps", [0.03, 0.05, 0.1])
def test_apgd_is_at_least_as_strong_as_our_pgd_within_the_ball(eps):
    model = trained_digits_mlp()
    x, y = _test_set()
    ours = _correct(model, pgd(model, x, y, eps=eps, steps=20, seed=0), y)
    x_adv = torchattacks_attack(model, x, y, attack="apgd-ce", eps=eps, steps=20, seed=0)
    theirs = _correct(model, x_adv, y)
    # APGD's adaptive step size finds at least what fixed-step PGD finds with the same budget (Croce & Hein
    # 2020, Table 2): allow one example of slack for the different random starts.
    assert theirs.sum() <= ours.sum() + 1, (theirs.sum().item(), ours.sum().item())
    assert theirs.sum() < _correct(model, x, y).sum()
    assert ((x_adv - x).flatten(1).abs().amax(1) <= eps + 1e-6).all()
    assert x_adv.min() >= 0 and x_adv.max() <= 1


def test_l2_apgd_stays_in_the_l2_ball():
    model = trained_digits_mlp()
    x, y = _test_set(100)
    x_adv = torchattacks_attack(model, x, y, attack="apgd-ce", eps=0.5, norm="l2", steps=10)
    assert ((x_adv - x).flatten(1).norm(dim=1) <= 0.5 + 1e-5).all()
    assert _correct(model, x_adv, y).sum() < _correct(model, x, y).sum()


def test_autoattack_is_the_official_standard_ensemble():
    model = trained_digits_mlp()
    ensemble = build_attack(model, "autoattack", eps=8 / 255, n_classes=10)
    apgd, apgd_t, fab_t, square = ensemble.attacks
    assert isinstance(apgd, torchattacks.APGD) and apgd.steps == ITERATIONS == 100 and apgd.loss == "ce"
    assert isinstance(apgd_t, torchattacks.APGDT) and apgd_t.steps == 100 and apgd_t.n_target_classes == 9
    assert isinstance(fab_t, torchattacks.FAB) and fab_t.steps == 100 and fab_t.multi_targeted
    assert fab_t.n_target_classes == 9
    assert isinstance(square, torchattacks.Square) and square.n_queries == 5000 and not square.rescale_schedule
    assert all(a.n_restarts == 1 for a in ensemble.attacks)


class _FirstClasses(nn.Module):
    """The digits MLP restricted to digits 0 .. n-1 (its logits for them)."""

    def __init__(self, model, n):
        super().__init__()
        self.model, self.n = model, n

    def forward(self, x):
        return self.model(x)[:, :self.n]


def test_autoattack_with_five_classes_is_at_least_as_strong_as_apgd_ce():
    model = _FirstClasses(trained_digits_mlp(), 5)
    x, y = _test_set()
    keep = y < 5
    x, y = x[keep][:40], y[keep][:40]
    eps = 0.15
    apgd_correct = _correct(model, torchattacks_attack(model, x, y, attack="apgd-ce", eps=eps, seed=0), y)
    x_aa = autoattack(model, x, y, eps=eps, seed=0)  # targets the 4 other classes, not 9
    aa_correct = _correct(model, x_aa, y)
    assert not (aa_correct & ~apgd_correct).any()  # the ensemble starts with the same APGD-CE
    assert ((x_aa - x).flatten(1).abs().amax(1) <= eps + 1e-6).all()


def test_the_callers_random_state_is_left_alone():
    model = trained_digits_mlp()
    x, y = _test_set(20)
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    torchattacks_attack(model, x, y, attack="apgd-ce", eps=0.05, steps=5, seed=7)
    assert torch.equal(torch.rand(3), expected)


def test_adversarial_accuracy_with_apgd_and_bad_input():
    model = trained_digits_mlp()
    x, y = _test_set(64)
    result = adversarial_accuracy(model, [(x[:32], y[:32]), (x[32:], y[32:])], epsilons=[0.0, 0.1],
                                  attack="apgd-ce", steps=10)
    assert result["attack"] == "apgd-ce" and result["steps"] == 10
    assert result["accuracy"][0] == result["clean_accuracy"] and result["accuracy"][1] < result["clean_accuracy"]
    with pytest.raises(ValueError, match="attack"):
        torchattacks_attack(model, x, y, attack="cw", eps=0.1)
    with pytest.raises(ValueError, match="version"):
        autoattack(model, x, y, eps=0.1, version="plus")
    with pytest.raises(ValueError, match="n_classes"):
        build_attack(model, "apgd-t", eps=0.1, n_classes=1)
    with pytest.raises(ValueError, match="4 classes at least"):
        autoattack(_FirstClasses(model, 3), x, y % 3, eps=0.1)
    assert set(TORCHATTACKS) >= {"autoattack", "apgd-ce", "apgd-t"}


def test_missing_torchattacks_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "torchattacks", None)
    model = trained_digits_mlp()
    x, y = _test_set(4)
    with pytest.raises(ImportError, match=r"pip install 'sparsesam\[attacks\]'"):
        autoattack(model, x, y, eps=0.1)


def test_eval_command_runs_apgd(tmp_path):
    from cli_helpers import DATA, MODEL, run
    out = tmp_path / "model"
    assert run(["train", *MODEL, *DATA, "--epochs", "1", "--out", out]) == 0
    assert run(["eval", out, "--no-progress", "--no-corruptions", "--no-smoothing", "--no-cc-cert",
                "--attack", "apgd-ce", "--pgd-eps", "0,0.1", "--pgd-steps", "5", "--pgd-examples", "16",
                "--latency-batch", "2", "--latency-repeats", "1", "--execution", "dense"]) == 0
    adversarial = json.loads((out / "eval" / "eval.json").read_text())["pgd"]
    assert adversarial["attack"] == "apgd-ce" and adversarial["examples"] == 16 and adversarial["steps"] == 5
