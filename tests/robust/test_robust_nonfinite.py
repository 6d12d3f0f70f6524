"""sparsesam.robust never certifies or counts garbage: non-finite settings
(sigma, eps, alpha, step sizes, ranges, radii) are refused naming the argument,
and a model whose logits are NaN or inf predicts no class -- randomized
smoothing abstains, CC-Cert does not certify, attacks count it as a success
and stay in the threat model, accuracies never count it correct."""
import pytest
import torch
from torch import nn

from sparsesam.robust import (ABSTAIN, adversarial_accuracy, cc_cert_batch, cc_cert_dataset, certified_accuracy,
                              certify, certify_dataset, evaluate_corruptions, official_bound, pgd, predict)
from sparsesam.robust.cc_cert import certified_fraction
from sparsesam.robust.predictions import NO_CLASS, predicted_classes

from robust_data import ConstantClassifier, natural_images

pytest.importorskip("scipy.stats")

NAN, INF = float("nan"), float("inf")


class NonFiniteClassifier(nn.Module):
    """Logits that argmax would read as class 0 (NaN or +inf there), whatever the input."""

    def __init__(self, value: float, num_classes: int = 3) -> None:
        super().__init__()
        self.value = value
        self.num_classes = num_classes

    def forward(self, x):
        logits = torch.zeros(x.shape[0], self.num_classes)
        logits[:, 0] = self.value
        return logits + 0 * x.flatten(1).sum(dim=1, keepdim=True)   # differentiable, for the attacks


class FiniteOnFirstCall(nn.Module):
    """Constant logits on its first call (the clean batch), NaN on every later one (the transformed images)."""

    def __init__(self, logits) -> None:
        super().__init__()
        self.inner = ConstantClassifier(logits)
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        out = self.inner(x)
        return out if self.calls == 1 else torch.full_like(out, NAN)


class NaNAboveMean(nn.Module):
    """A linear classifier whose logits (and their gradients) turn NaN where the image's mean exceeds ``level``."""

    def __init__(self, dim: int, level: float) -> None:
        super().__init__()
        self.linear = nn.Linear(dim, 2)
        self.level = level

    def forward(self, x):
        flat = x.flatten(1)
        return self.linear(flat) + torch.log(self.level - flat.mean(dim=1, keepdim=True))


def test_predicted_classes_marks_every_non_finite_row():
    logits = torch.tensor([[0.0, 2.0], [NAN, 0.0], [INF, 0.0], [0.0, -INF], [3.0, 1.0]])
    assert predicted_classes(logits).tolist() == [1, NO_CLASS, NO_CLASS, NO_CLASS, 0]


# --- randomized smoothing ------------------------------------------------------------


@pytest.mark.parametrize("name, value", [("sigma", INF), ("sigma", NAN), ("alpha", NAN)])
def test_smoothing_refuses_non_finite_settings(name, value):
    model, x = ConstantClassifier([0.0, 5.0]), torch.rand(1, 4, 4)
    args = dict(sigma=0.25, alpha=0.001)
    args[name] = value
    with pytest.raises(ValueError, match=name):
        certify(model, x, args["sigma"], 10, 100, args["alpha"], 10)
    with pytest.raises(ValueError, match=name):
        predict(model, x, args["sigma"], 100, args["alpha"], 10)
    with pytest.raises(ValueError, match=name):
        certify_dataset(model, [(x.unsqueeze(0), torch.tensor([1]))], n0=10, n=100, batch_size=10, **args)


def test_smoothing_refuses_a_string_sigma_and_non_finite_radii():
    model, x = ConstantClassifier([0.0, 5.0]), torch.rand(1, 4, 4)
    with pytest.raises(TypeError, match="sigma must be a real number"):
        certify(model, x, "0.25", 10, 100, 0.001, 10)
    result = certify_dataset(model, [(x.unsqueeze(0), torch.tensor([1]))], sigma=0.25, n0=10, n=100, batch_size=10)
    for radius in (NAN, INF, -1.0):
        with pytest.raises(ValueError, match="radii"):
            certified_accuracy(result, [0.0, radius])


@pytest.mark.parametrize("value", [NAN, INF])
def test_smoothing_abstains_on_a_model_with_non_finite_logits(value):
    model, x = NonFiniteClassifier(value), torch.rand(1, 4, 4)
    assert certify(model, x, 0.25, 10, 200, 0.001, 50) == (ABSTAIN, 0.0)
    assert predict(model, x, 0.25, 200, 0.001, 50) == ABSTAIN
    result = certify_dataset(model, [(x.unsqueeze(0), torch.tensor([0]))], sigma=0.25, n0=10, n=200, batch_size=50)
    assert result["records"][0]["prediction"] == ABSTAIN and not result["records"][0]["correct"]
    assert certified_accuracy(result, [0.0])["certified_accuracy"] == [0.0]


class NaNOnHalfTheDraws(nn.Module):
    """Class 1 where the noisy image's first pixel is above the clean value, NaN logits elsewhere."""

    def __init__(self, centre: float) -> None:
        super().__init__()
        self.centre = centre

    def forward(self, x):
        above = x.flatten(1)[:, 0] > self.centre
        logits = torch.tensor([0.0, 5.0]).expand(x.shape[0], 2).clone()
        logits[~above] = NAN
        return logits


def test_non_finite_draws_count_for_no_class_so_the_bound_drops():
    x = torch.full((1, 4, 4), 0.5)
    model = NaNOnHalfTheDraws(0.5)
    # About half the draws name class 1, the rest no class: pA ~ 1/2, below what certifies.
    assert certify(model, x, 0.25, 20, 1000, 0.001, 500) == (ABSTAIN, 0.0)
    # PREDICT's test sees only class 1 among the draws that named a class.
    assert predict(model, x, 0.25, 1000, 0.001, 500) == 1


# --- CC-Cert ----------------------------------------------------------------------------


def test_cc_cert_never_certifies_a_model_with_non_finite_clean_logits():
    x, y = natural_images(4, 3, 8, seed=1), torch.zeros(4, dtype=torch.long)
    out = cc_cert_batch(NonFiniteClassifier(NAN), x, y, transform="brightness", value_range=(-0.1, 0.1),
                        n_samples=8, n_bounds=2)
    assert (out["prediction"] == NO_CLASS).all() and not out["correct"].any() and not out["stable"].any()
    assert torch.equal(out["bound"], torch.ones(4, dtype=out["bound"].dtype))
    assert torch.equal(out["margin"], torch.zeros(4))


def test_cc_cert_counts_a_non_finite_transform_as_a_change_of_prediction():
    x, y = natural_images(4, 3, 8, seed=1), torch.full((4,), 2, dtype=torch.long)
    out = cc_cert_batch(FiniteOnFirstCall([0.0, 0.5, 4.0]), x, y, transform="rotation", value_range=(-5.0, 5.0),
                        n_samples=8, n_bounds=2)
    assert out["correct"].all() and not out["stable"].any()
    assert torch.equal(out["bound"], torch.ones(4, dtype=out["bound"].dtype))   # Z = 1 >= d on every draw
    assert certified_fraction(out["correct"], out["bound"], 0.5) == 0.0


def test_cc_cert_refuses_non_finite_settings_and_samples():
    x, y = natural_images(2, 3, 8), torch.zeros(2, dtype=torch.long)
    model = ConstantClassifier([4.0, 0.0])
    with pytest.raises(ValueError, match="range of rotation must be finite"):
        cc_cert_batch(model, x, y, transform="rotation", value_range=(-INF, INF), n_samples=4, n_bounds=1)
    with pytest.raises(ValueError, match="range of brightness"):
        cc_cert_batch(model, x, y, transform="brightness", value_range=(NAN, 0.1), n_samples=4, n_bounds=1)
    with pytest.raises(ValueError, match="epsilons"):
        cc_cert_dataset(model, [(x, y)], transforms={"brightness": (-0.1, 0.1)}, epsilons=[NAN])
    with pytest.raises(ValueError, match="t_grid"):
        official_bound(torch.rand(2, 4), torch.full((2,), 0.3), n_bounds=1, t_grid=[1.0, INF])
    with pytest.raises(ValueError, match="z must be finite"):
        official_bound(torch.tensor([[0.1, NAN]]), torch.tensor([0.3]), n_bounds=1)
    with pytest.raises(ValueError, match="d must be finite"):
        official_bound(torch.rand(1, 2), torch.tensor([NAN]), n_bounds=1)
    with pytest.raises(ValueError, match="epsilon"):
        certified_fraction(torch.ones(2, dtype=torch.bool), torch.zeros(2), NAN)


# --- attacks and accuracies ---------------------------------------------------------------


@pytest.mark.parametrize("name, value", [("eps", INF), ("eps", NAN), ("step_size", INF), ("step_size", NAN),
                                         ("init_std", NAN)])
def test_pgd_refuses_non_finite_settings(name, value):
    x, y = torch.rand(2, 1, 4, 4), torch.zeros(2, dtype=torch.long)
    args = dict(eps=0.1, step_size=0.01, init_std=0.001)
    args[name] = value
    with pytest.raises(ValueError, match=name):
        pgd(ConstantClassifier([1.0, 0.0]), x, y, **args)


def test_adversarial_accuracy_refuses_non_finite_settings():
    batches = [(torch.rand(2, 1, 4, 4), torch.zeros(2, dtype=torch.long))]
    with pytest.raises(ValueError, match="epsilons"):
        adversarial_accuracy(ConstantClassifier([1.0, 0.0]), batches, epsilons=[0.0, INF])
    with pytest.raises(ValueError, match="step_size_factor"):
        adversarial_accuracy(ConstantClassifier([1.0, 0.0]), batches, epsilons=[0.1], step_size_factor=NAN)


@pytest.mark.parametrize("norm, eps", [("linf", 0.2), ("l2", 1.5)])
def test_pgd_stays_in_the_threat_model_where_the_model_turns_nan(norm, eps):
    torch.manual_seed(0)
    model = NaNAboveMean(16, level=0.6)
    x = torch.rand(64, 1, 4, 4) * 0.4 + 0.3            # mean ~0.5: NaN is within reach of eps
    y = torch.zeros(64, dtype=torch.long)
    x_adv = pgd(model, x, y, eps=eps, norm=norm, steps=5)
    assert torch.isfinite(x_adv).all()
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    delta = (x_adv - x).flatten(1)
    size = delta.abs().amax(dim=1) if norm == "linf" else delta.norm(dim=1)
    assert (size <= eps * (1 + 1e-5)).all()
    with torch.no_grad():
        nan_rows = ~torch.isfinite(model(x_adv)).all(dim=1)
    assert nan_rows.any()                                # the attack found the NaN region ...
    accuracy = adversarial_accuracy(model, [(x, y)], epsilons=[eps], norm=norm, steps=5)
    with torch.no_grad():                                # ... and those examples never count correct
        finite_correct = (predicted_classes(model(x_adv)) == y).sum().item()
    assert accuracy["accuracy"][0] * 64 <= finite_correct


@pytest.mark.parametrize("value", [NAN, INF])
def test_accuracies_never_count_non_finite_logits_as_correct(value):
    model = NonFiniteClassifier(value)                   # argmax would say class 0 = every label
    x, y = natural_images(4, 3, 8), torch.zeros(4, dtype=torch.long)
    result = adversarial_accuracy(model, [(x, y)], epsilons=[0.0, 0.01], attack="fgsm")
    assert result["clean_accuracy"] == 0.0 and result["accuracy"] == [0.0, 0.0]
    corrupted = evaluate_corruptions(model, [(x, y)], corruptions=["gaussian_noise"], severities=[1])
    assert corrupted["clean_accuracy"] == 0.0 and corrupted["accuracy"]["gaussian_noise"] == [0.0]


def test_model_output_of_the_wrong_shape_is_named():
    class Flat(nn.Module):
        def forward(self, x):
            return torch.zeros(x.shape[0])

    with pytest.raises(ValueError, match=r"\(batch, classes\) logits"):
        predict(Flat(), torch.rand(1, 4, 4), 0.25, 10, 0.001, 10)


def test_losses_and_radius_refuse_non_finite_settings():
    from sparsesam.robust import certified_radius, mart_loss, trades_loss

    x, y = torch.rand(2, 1, 4, 4), torch.zeros(2, dtype=torch.long)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 2))
    for loss in (trades_loss, mart_loss):
        with pytest.raises(ValueError, match="beta must be finite"):
            loss(model, x, y, eps=0.1, beta=INF)
    with pytest.raises(ValueError, match="p_lower"):
        certified_radius(1.0, 0.25)       # Phi^-1(1) = inf: no finite radius
    with pytest.raises(ValueError, match="p_lower"):
        certified_radius(NAN, 0.25)
