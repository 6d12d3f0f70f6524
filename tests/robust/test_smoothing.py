"""Randomized smoothing: Clopper-Pearson and radius formulas against scipy and
known values, CERTIFY / PREDICT on classifiers with known answers, the
dataset curve, determinism and bad input."""
import math

import pytest
import torch

from sparsesam.robust import (ABSTAIN, certified_accuracy, certified_radius, certify, certify_dataset,
                              clopper_pearson_lower, largest_certified_radius, predict)

from sparsesam.robust.smoothing import sample_counts

from robust_data import ConstantClassifier, SignClassifier, trained_digits_mlp, digits

stats = pytest.importorskip("scipy.stats")


@pytest.mark.parametrize("k,n,alpha", [(1, 1, 0.05), (7, 10, 0.05), (50, 100, 0.001), (99_000, 100_000, 0.001),
                                       (3, 1000, 0.01), (100, 100, 0.001)])
def test_clopper_pearson_matches_scipy_exact_interval(k, n, alpha):
    # One-sided (1 - alpha) lower bound = lower end of the two-sided exact (1 - 2 alpha) interval.
    expect = stats.binomtest(k, n).proportion_ci(confidence_level=1 - 2 * alpha, method="exact").low
    assert clopper_pearson_lower(k, n, alpha) == pytest.approx(expect, rel=1e-10, abs=1e-12)


def test_clopper_pearson_known_values():
    # All n successes: the bound solves p^n = alpha.
    assert clopper_pearson_lower(100, 100, 0.001) == pytest.approx(0.001 ** (1 / 100), rel=1e-12)
    assert clopper_pearson_lower(100, 100, 0.001) == pytest.approx(0.933254300796991, rel=1e-12)
    assert clopper_pearson_lower(0, 10, 0.05) == 0.0
    # A one-sided bound is below the point estimate and tightens with n.
    assert clopper_pearson_lower(80, 100, 0.001) < clopper_pearson_lower(800, 1000, 0.001) < 0.8


def test_radius_formula():
    assert certified_radius(0.5, 0.25) == 0.0
    assert certified_radius(stats.norm.cdf(1.0), 0.5) == pytest.approx(0.5, rel=1e-12)
    # Cohen et al.: N = 100,000 and alpha = 0.001 cap the radius near 3.8 sigma.
    p = clopper_pearson_lower(100_000, 100_000, 0.001)
    assert certified_radius(p, 0.25) == pytest.approx(0.25 * stats.norm.ppf(0.001 ** 1e-5), rel=1e-12)
    assert 3.7 < certified_radius(p, 1.0) < 3.9


def test_largest_certified_radius_is_the_unanimous_vote():
    # All n votes for the top class: p_lower = alpha ** (1 / n), radius sigma * Phi^-1 of it.
    assert largest_certified_radius(10_000, 0.001, 0.25) == pytest.approx(
        0.25 * stats.norm.ppf(0.001 ** (1 / 10_000)), rel=1e-12)
    assert 0.79 < largest_certified_radius(10_000, 0.001, 0.25) < 0.80  # the study's cap: radius 1.0 is out of reach
    assert largest_certified_radius(1000, 0.001, 0.25) == pytest.approx(0.25 * stats.norm.ppf(0.001 ** 1e-3), rel=1e-12)
    with pytest.raises(ValueError, match="n"):
        largest_certified_radius(0, 0.001, 0.25)


@pytest.mark.parametrize("sigma", [0.12, 0.25, 0.5, 1.0])
def test_certify_constant_classifier_gives_the_analytic_radius(sigma):
    model = ConstantClassifier([0.0, 0.0, 5.0, 1.0])
    x = torch.rand(3, 8, 8)
    n, alpha = 1000, 0.001
    prediction, radius = certify(model, x, sigma, 100, n, alpha, 256)
    assert prediction == 2
    assert radius == pytest.approx(sigma * stats.norm.ppf(alpha ** (1 / n)), rel=1e-12)
    assert predict(model, x, sigma, n, alpha, 256) == 2


def test_tied_classes_abstain():
    x = torch.full((1, 6, 6), 0.5)
    model = SignClassifier(x)  # noise splits the two classes 50/50
    assert certify(model, x, 0.25, 100, 2000, 0.001, 500) == (ABSTAIN, 0.0)
    assert predict(model, x, 0.25, 2000, 0.001, 500) == ABSTAIN


def test_clear_winner_is_certified_and_predicted_on_a_trained_model():
    model = trained_digits_mlp()
    _, _, x, y = digits()
    certified = 0
    for i in range(5):
        prediction, radius = certify(model, x[i], 0.12, 100, 500, 0.001, 250, seed=i)
        if prediction != ABSTAIN:
            certified += 1
            assert radius > 0
            assert predict(model, x[i], 0.12, 500, 0.001, 250, seed=i) in (prediction, ABSTAIN)
    assert certified >= 3


def test_certify_is_seeded():
    model = trained_digits_mlp()
    _, _, x, _ = digits()
    a = certify(model, x[0], 0.25, 50, 300, 0.01, 128, seed=3)
    assert a == certify(model, x[0], 0.25, 50, 300, 0.01, 128, seed=3)
    counts = [tuple(sample_counts(model, x[0], 0.5, 300, 128, torch.Generator().manual_seed(s))) for s in range(4)]
    assert len(set(counts)) > 1, "different seeds must draw different noise"
    assert all(sum(c) == 300 for c in counts)


def test_certify_dataset_and_curve():
    model = ConstantClassifier([0.0, 4.0, 0.0])
    x = torch.rand(10, 1, 5, 5)
    y = torch.tensor([1, 1, 0, 1, 2, 1, 1, 0, 1, 1])
    batches = [(x[:4], y[:4]), (x[4:], y[4:])]
    result = certify_dataset(model, batches, sigma=0.5, n0=20, n=200, alpha=0.001, batch_size=64)
    assert result["examples"] == 10 and [r["index"] for r in result["records"]] == list(range(10))
    radius = 0.5 * stats.norm.ppf(0.001 ** (1 / 200))
    assert all(r["prediction"] == 1 and r["radius"] == pytest.approx(radius) for r in result["records"])
    curve = certified_accuracy(result, [0.0, radius / 2, radius, radius * 1.01])
    assert curve["certified_accuracy"] == [0.7, 0.7, 0.7, 0.0]


@pytest.mark.parametrize("skip,max_index", [(1, None), (3, None), (3, 6), (3, 7), (1, 4), (4, 100), (20, 5)])
def test_certify_dataset_skip_and_max_are_certify_py(skip, max_index):
    # Cohen's code/certify.py: every skip-th index, stopping at index max (--max -1: never).
    def certify_py_indices(length, skip, max_):
        out = []
        for i in range(length):
            if i % skip != 0:
                continue
            if i == max_:
                break
            out.append(i)
        return out

    model = ConstantClassifier([0.0, 4.0, 0.0])
    x = torch.rand(10, 1, 5, 5)
    y = torch.ones(10, dtype=torch.long)
    batches = [(x[:4], y[:4]), (x[4:7], y[4:7]), (x[7:], y[7:])]
    result = certify_dataset(model, batches, sigma=0.5, n0=4, n=16, alpha=0.001, batch_size=16, skip=skip,
                             max_index=max_index)
    indices = [r["index"] for r in result["records"]]
    if max_index is None or max_index % skip == 0 or max_index >= 10:
        assert indices == certify_py_indices(10, skip, -1 if max_index is None else max_index)
    else:  # the kept deviation: certify.py would not stop here; we stop at max_index anyway
        assert indices == list(range(0, max_index, skip))
        assert certify_py_indices(10, skip, max_index) == list(range(0, 10, skip))
    assert result["skip"] == skip and result["max_index"] == max_index and result["examples"] == len(indices)


def test_bad_input_names_the_argument():
    model = ConstantClassifier([0.0, 1.0])
    x = torch.rand(1, 4, 4)
    with pytest.raises(ValueError, match="sigma"):
        certify(model, x, 0.0, 10, 100, 0.001, 10)
    with pytest.raises(ValueError, match="sigma"):
        certify(model, x, -0.5, 10, 100, 0.001, 10)
    with pytest.raises(ValueError, match="n0"):
        certify(model, x, 0.25, 200, 100, 0.001, 10)
    with pytest.raises(ValueError, match="alpha"):
        certify(model, x, 0.25, 10, 100, 1.5, 10)
    with pytest.raises(ValueError, match="batch_size"):
        predict(model, x, 0.25, 100, 0.001, 0)
    with pytest.raises(ValueError, match="rank 3"):
        certify(model, x.unsqueeze(0), 0.25, 10, 100, 0.001, 10)
    with pytest.raises(ValueError, match=r"x must hold values in \[0, 1\]"):
        certify(model, x + 2, 0.25, 10, 100, 0.001, 10)
    with pytest.raises(ValueError, match="trials"):
        clopper_pearson_lower(11, 10, 0.05)
    with pytest.raises(ValueError, match="skip"):
        certify_dataset(model, [(x.unsqueeze(0), torch.tensor([0]))], sigma=0.25, skip=0)
    with pytest.raises(ValueError, match="max_index"):
        certify_dataset(model, [(x.unsqueeze(0), torch.tensor([0]))], sigma=0.25, max_index=0)
    assert math.isfinite(certify(model, x, 0.25, 10, 100, 0.001, 10)[1])
