"""CC-Cert and its semantic transforms: the margin / discrepancy lemma, the
official bound against a transcription of the official code, the plug-in
Chernoff-Cramer bound against a direct computation and its analytic values,
the confidence of the KL variant by simulation, certification of invariant
and random classifiers, transform geometry, bad input."""
import math

import numpy as np
import pytest
import torch

from sparsesam.robust import (DEFAULT_RANGES, TRANSFORMS, apply_transform, cc_cert_batch, cc_cert_dataset,
                              chernoff_cramer_bound, estimate_bound, official_bound, prediction_discrepancy,
                              random_transform, top2_margin)
from sparsesam.robust.cc_cert_bounds import default_t_grid, kl_t_grid, kl_upper_confidence

from robust_data import ConstantClassifier, NoiseClassifier, natural_images, trained_digits_mlp, digits


def test_margin_and_discrepancy():
    p = torch.tensor([[0.7, 0.2, 0.1], [0.4, 0.4, 0.2]])
    torch.testing.assert_close(top2_margin(p), torch.tensor([0.25, 0.0]))
    pt = torch.tensor([[[0.7, 0.2, 0.1], [0.5, 0.3, 0.2]], [[0.1, 0.8, 0.1], [0.4, 0.4, 0.2]]])
    torch.testing.assert_close(prediction_discrepancy(p, pt), torch.tensor([[0.0, 0.2], [0.4, 0.0]]))


def test_discrepancy_below_margin_keeps_the_prediction():
    # The lemma behind CC-Cert: Z < d implies the same argmax (random check).
    g = torch.Generator().manual_seed(0)
    p = torch.softmax(3 * torch.randn(2000, 5, generator=g), dim=1)
    q = torch.softmax(3 * torch.randn(2000, 5, generator=g), dim=1)
    z = prediction_discrepancy(p, q.unsqueeze(1))[:, 0]
    below = z < top2_margin(p)
    assert below.sum() > 50
    assert (p.argmax(1)[below] == q.argmax(1)[below]).all()


def _official_get_bounds(Y, a, nbounds, nsamples, delta, t):
    """estimates/code/bounds.py::get_bounds (mikhailpautov/cccert), the bound's lines verbatim
    (torch, no .cuda()); in float64 here, where the official float32 would overflow."""
    tsteps = len(t)
    Y_ = Y.view(-1, nbounds*nsamples)
    Yt = torch.einsum('ij,k->ijk', Y_, t)
    Yt = Yt.reshape(-1, nbounds, nsamples, tsteps)
    E_exp_ty = torch.mean(torch.exp(Yt), 2)
    exp_ta = torch.exp(torch.outer(a, t))
    exp_ta = exp_ta.unsqueeze(1).repeat(1, nbounds, 1)
    R = E_exp_ty / exp_ta
    min_bounds, temp_idx = torch.topk(R, 1, dim=2, largest=False)
    max_bounds = torch.max(min_bounds, dim=1).values/delta
    bounds = max_bounds
    return torch.min(torch.ones_like(bounds), bounds)


def test_default_t_grid_is_the_official_linspace():
    # script.py: get_bounds(..., tmin=1e-4, tmax=1e4, tsteps=500) -> torch.linspace(tmin, tmax, tsteps).
    t = default_t_grid()
    assert t.shape == (500,) and t[0] == 1e-4 and t[-1] == 1e4
    torch.testing.assert_close(t[1] - t[0], torch.tensor((1e4 - 1e-4) / 499, dtype=torch.float64))


@pytest.mark.parametrize("nbounds,nsamples", [(10, 100), (3, 7), (1, 20)])
def test_official_bound_matches_the_official_code(nbounds, nsamples):
    # Z in [0, 0.06] and d <= 0.065 keep exp(t Z) and exp(t d) finite in float64 up to t = 1e4,
    # so the verbatim formula can be evaluated on the official grid itself.
    g = torch.Generator().manual_seed(11)
    z = torch.rand(6, nbounds * nsamples, generator=g, dtype=torch.float64) * 0.06
    z[4] *= 0.1                                                   # a stable image: bound ~ 0
    d = torch.tensor([0.0, 0.01, 0.03, 0.05, 0.065, 0.02], dtype=torch.float64)
    t = torch.linspace(1e-4, 1e4, 500, dtype=torch.float64)
    expect = _official_get_bounds(z, d, nbounds, nsamples, 0.9, t).squeeze(1)
    ours, t_best = official_bound(z, d, n_bounds=nbounds, delta=0.9)
    torch.testing.assert_close(ours, expect, rtol=1e-9, atol=1e-300)
    assert ours[0] == 1.0, "a zero margin certifies nothing"
    assert 0 < ours[4] < 1e-100, "every sample far below the margin: the bound vanishes at large t"
    same, _ = estimate_bound(z, d, n_bounds=nbounds)               # "official", delta 0.9 by default
    assert torch.equal(same, ours)
    assert (t_best > 0).all()


def test_official_bound_worked_example():
    # Two groups of two samples, one grid point t = 10, d = 0.1, delta = 0.5:
    # group 1: (e^{10*0} + e^{10*0.2}) / 2 / e^{1}; group 2: (e^{1} + e^{1}) / 2 / e^{1} = 1 -> max 1 / 0.5 -> capped at 1.
    z = torch.tensor([[0.0, 0.2, 0.1, 0.1], [0.0, 0.0, 0.0, 0.02]], dtype=torch.float64)
    d = torch.tensor([0.1, 0.1], dtype=torch.float64)
    bound, _ = official_bound(z, d, n_bounds=2, delta=0.5, t_grid=[10.0])
    g1 = (1 + math.exp(2.0)) / 2 / math.e
    assert g1 > 1 and bound[0] == 1.0
    second = max(1 / math.e, (1 + math.exp(0.2)) / 2 / math.e) / 0.5
    assert bound[1].item() == pytest.approx(second, rel=1e-12)


def test_plugin_bound_matches_direct_minimisation():
    g = torch.Generator().manual_seed(1)
    z = torch.rand(5, 40, generator=g, dtype=torch.float64) * 0.6
    d = torch.tensor([0.05, 0.2, 0.3, 0.45, 0.0], dtype=torch.float64)
    t = torch.tensor([0.5, 1.0, 3.0, 10.0, 30.0], dtype=torch.float64)
    bound, t_best = chernoff_cramer_bound(z, d, t_grid=t)
    same, _ = estimate_bound(z, d, estimator="plugin", t_grid=t)
    assert torch.equal(same, bound)
    direct = torch.exp(t.reshape(1, -1, 1) * z.unsqueeze(1)).mean(dim=2) * torch.exp(-t.reshape(1, -1) * d.reshape(-1, 1))
    torch.testing.assert_close(bound, direct.min(dim=1).values.clamp(max=1.0))
    torch.testing.assert_close(t_best, t[direct.argmin(dim=1)])
    assert bound[-1] == 1.0, "a zero margin certifies nothing"


def test_plugin_bound_of_an_invariant_classifier_is_exp_minus_t_max_d():
    z = torch.zeros(3, 100, dtype=torch.float64)
    d = torch.tensor([0.1, 0.3, 0.5], dtype=torch.float64)
    bound, t_best = chernoff_cramer_bound(z, d)
    t_max = float(default_t_grid()[-1])
    torch.testing.assert_close(bound, torch.exp(-t_max * d))
    assert (t_best == t_max).all()


def test_kl_bound_of_an_invariant_classifier_is_analytic():
    # Zbar = 0 so mean(Y) = 0 and KL(0 || mu) = -log(1 - mu): mu_up = 1 - (delta / K)^(1/M).
    m, delta = 500, 0.01
    t = torch.logspace(-1, 2, 16, dtype=torch.float64)
    d = torch.tensor([0.25, 0.5], dtype=torch.float64)
    bound, _ = chernoff_cramer_bound(torch.zeros(2, m, dtype=torch.float64), d, t_grid=t, delta=delta)
    mu_up = 1 - (delta / len(t)) ** (1 / m)
    expect = ((1 + torch.expm1(t).reshape(1, -1) * mu_up) * torch.exp(-t.reshape(1, -1) * d.reshape(-1, 1))).min(dim=1).values
    torch.testing.assert_close(bound, expect, rtol=1e-9, atol=0)
    assert (bound < 1).all() and bound[1] < bound[0]


def test_kl_upper_confidence_inverts_the_chernoff_hoeffding_bound():
    mean = torch.tensor([0.0, 0.1, 0.5, 0.99], dtype=torch.float64)
    up = kl_upper_confidence(mean, 200, math.log(20.0))
    assert (up >= mean).all() and (up <= 1).all()
    q = up.clamp(max=1 - 1e-15)
    kl = mean * torch.log(torch.where(mean > 0, mean / q, torch.ones_like(q))) + (1 - mean) * torch.log((1 - mean) / (1 - q))
    torch.testing.assert_close(kl, torch.full_like(kl, math.log(20.0) / 200), rtol=1e-8, atol=1e-12)


def test_kl_bound_holds_with_the_promised_confidence():
    # Z = 0.5 with probability q, else 0; d = 0.4, so P(Z >= d) = q. Over many
    # independent runs the KL bound may fall below q in at most a delta fraction.
    g = torch.Generator().manual_seed(2)
    q, delta, m, runs = 0.08, 0.2, 100, 400
    z = 0.5 * (torch.rand(runs, m, generator=g, dtype=torch.float64) < q)
    d = torch.full((runs,), 0.4, dtype=torch.float64)
    kl_bound, _ = chernoff_cramer_bound(z, d, delta=delta)
    plugin, _ = chernoff_cramer_bound(z, d, t_grid=kl_t_grid())   # the same grid as the KL bound
    assert (kl_bound < q).double().mean() <= delta
    assert (kl_bound >= plugin).all(), "the confidence correction can only raise the plug-in estimate"
    same, _ = estimate_bound(z, d, estimator="kl", delta=delta)
    assert torch.equal(same, kl_bound)


@pytest.mark.parametrize("transform", TRANSFORMS)
def test_invariant_classifier_is_certified_and_random_classifier_is_not(transform):
    x = natural_images(6, 3, 16, seed=3)
    y = torch.tensor([2, 2, 2, 0, 2, 1])
    constant = cc_cert_batch(ConstantClassifier([0.0, 0.5, 4.0]), x, y, transform=transform,
                             value_range=DEFAULT_RANGES[transform], n_samples=16, n_bounds=4)
    assert (constant["bound"] < 1e-6).all()
    assert torch.equal(constant["correct"], y == 2) and constant["stable"].all()
    random = cc_cert_batch(NoiseClassifier(3), x, y, transform=transform, value_range=DEFAULT_RANGES[transform],
                           n_samples=16, n_bounds=4)
    assert (random["bound"] > 0.5).all()
    # With the finite-sample guarantee (delta) the invariant classifier is still certified,
    # at a larger eps: the bound behaves like mu_up ** d (mu_up ~ log(K / delta) / N).
    strict = cc_cert_batch(ConstantClassifier([0.0, 0.5, 4.0]), x, y, transform=transform,
                           value_range=DEFAULT_RANGES[transform], n_samples=2000, n_bounds=1, estimator="kl",
                           delta=0.001, batch_size=4000)
    assert (strict["bound"] < 0.25).all()


def test_cc_cert_dataset_on_a_trained_model():
    model = trained_digits_mlp()
    _, _, x, y = digits()
    batches = [(x[:20], y[:20]), (x[20:40], y[20:40])]
    transforms = {"brightness": (-0.05, 0.05), "rotation": (-30, 30)}
    result = cc_cert_dataset(model, batches, transforms=transforms, epsilons=(0.01, 0.1, 0.5), n_samples=10)
    assert result["examples"] == 40 and result["estimator"] == "official" and result["delta"] == 0.9
    assert result["n_bounds"] == 10 and result["transforms_per_image"] == 100
    assert result["t_grid"] == {"min": 1e-4, "max": 1e4, "points": 500}
    for name, out in result["transforms"].items():
        acc = out["certified_accuracy"]
        assert acc[0] <= acc[1] <= acc[2] <= out["clean_accuracy"], name
        assert len(out["bounds"]) == 40
    # Small brightness changes hardly move an MLP; 30-degree rotations of 8x8 digits do.
    assert result["transforms"]["brightness"]["certified_accuracy"][1] > result["transforms"]["rotation"]["certified_accuracy"][1]
    again = cc_cert_dataset(model, batches, transforms=transforms, epsilons=(0.01, 0.1, 0.5), n_samples=10)
    assert again == result
    # Certified means bound < eps, strictly (script.py: ``b < th and correct``).
    bounds = torch.tensor(result["transforms"]["rotation"]["bounds"], dtype=torch.float64)
    correct = torch.tensor([True] * 40)
    from sparsesam.robust.cc_cert import certified_fraction
    cut = float(bounds.min())
    assert certified_fraction(correct, bounds, cut) == 0.0
    assert certified_fraction(correct, bounds, math.nextafter(cut, 2.0)) > 0.0


# ----------------------------------------------------------------------------- transforms
IDENTITY = {"rotation": 0.0, "translation": (0.0, 0.0), "scaling": 1.0, "brightness": 0.0, "contrast": 1.0,
            "blur": 0.0, "gamma": 1.0}


@pytest.mark.parametrize("transform", TRANSFORMS)
def test_identity_parameters_give_the_image(transform):
    x = natural_images(3, 3, 12, seed=4)
    params = torch.tensor([IDENTITY[transform]] * 3, dtype=torch.float64)
    torch.testing.assert_close(apply_transform(x, transform, params), x, rtol=0, atol=1e-6)


def test_geometric_transforms_move_pixels_as_specified():
    x = natural_images(2, 1, 10, seed=5)
    rotated = apply_transform(x, "rotation", torch.tensor([90.0, -90.0], dtype=torch.float64))
    torch.testing.assert_close(rotated[0], torch.rot90(x[0], k=1, dims=(1, 2)), rtol=0, atol=1e-5)
    torch.testing.assert_close(rotated[1], torch.rot90(x[1], k=-1, dims=(1, 2)), rtol=0, atol=1e-5)
    shifted = apply_transform(x, "translation", torch.tensor([[0.2, 0.0], [0.0, -0.1]], dtype=torch.float64))
    torch.testing.assert_close(shifted[0, :, :, 2:], x[0, :, :, :-2], rtol=0, atol=1e-5)   # 2 px right
    assert shifted[0, :, :, :2].abs().max() < 1e-6                                          # zero fill
    torch.testing.assert_close(shifted[1, :, :-1, :], x[1, :, 1:, :], rtol=0, atol=1e-5)   # 1 px up
    stretched = apply_transform(x, "scaling", torch.tensor([[2.0, 1.0], [1.0, 0.5]], dtype=torch.float64))
    # x factor 2 about the centre (pixel 4.5): output column c samples input column 4.5 + (c - 4.5) / 2;
    # rows unchanged. Column 4.5 + 1/4 = 4.75 -> 0.25 x[4] + 0.75 x[5]... output column 5 samples 4.75.
    expect_col5 = 0.25 * x[0, :, :, 4] + 0.75 * x[0, :, :, 5]
    torch.testing.assert_close(stretched[0, :, :, 5], expect_col5, rtol=0, atol=1e-5)
    # y factor 0.5 (shrinks vertically): output row r samples input row 4.5 + 2 (r - 4.5); row 5 -> 5.5.
    expect_row5 = 0.5 * x[1, :, 5, :] + 0.5 * x[1, :, 6, :]
    torch.testing.assert_close(stretched[1, :, 5, :], expect_row5, rtol=0, atol=1e-5)
    assert stretched[1, :, 0, :].abs().max() < 1e-6                                       # zero fill at the top
    zoomed = apply_transform(x, "scaling", torch.tensor([2.0, 2.0], dtype=torch.float64))
    torch.testing.assert_close(zoomed, apply_transform(x, "scaling", torch.full((2, 2), 2.0, dtype=torch.float64)))
    # Magnified 2x about the centre: output pixel 4.5 +- k/2 samples input 4.5 +- k/4 -> centre 2x2 block spreads.
    centre = x[0, 0, 4:6, 4:6].mean()
    assert abs(zoomed[0, 0, 4:6, 4:6].mean() - centre) < 0.2


def test_photometric_and_blur_transforms():
    scipy_ndimage = pytest.importorskip("scipy.ndimage")
    x = natural_images(2, 3, 12, seed=6).double()
    torch.testing.assert_close(apply_transform(x, "brightness", torch.tensor([0.1, -0.1])), (x + torch.tensor([0.1, -0.1]).reshape(2, 1, 1, 1)).clamp(0, 1))
    torch.testing.assert_close(apply_transform(x, "contrast", torch.tensor([1.2, 0.5])), (x * torch.tensor([1.2, 0.5]).reshape(2, 1, 1, 1)).clamp(0, 1))
    torch.testing.assert_close(apply_transform(x, "gamma", torch.tensor([0.5, 2.0])), x ** torch.tensor([0.5, 2.0], dtype=x.dtype).reshape(2, 1, 1, 1))
    blurred = apply_transform(x, "blur", torch.tensor([0.8, 1.5]))
    radius = int(3.0 * 1.5 + 0.5)  # one kernel width for the batch: the largest sigma's
    for i, s in enumerate((0.8, 1.5)):
        expect = scipy_ndimage.gaussian_filter(x[i].numpy(), sigma=(0, s, s), truncate=radius / s, mode="reflect")
        np.testing.assert_allclose(blurred[i].numpy(), expect, atol=1e-10)


def test_random_transform_draws_in_range_and_is_seeded():
    x = natural_images(50, 1, 8, seed=7)
    _, a = random_transform(x, "rotation", (-5, 15), torch.Generator().manual_seed(0))
    _, b = random_transform(x, "rotation", (-5, 15), torch.Generator().manual_seed(0))
    assert torch.equal(a, b) and a.min() >= -5 and a.max() <= 15 and a.std() > 3
    _, t = random_transform(x, "translation", (-0.1, 0.1), torch.Generator().manual_seed(0))
    assert t.shape == (50, 2)
    # Scaling draws one factor per axis (the official random_augment: two torch.rand draws), independently.
    _, s = random_transform(x, "scaling", (0.9, 1.1), torch.Generator().manual_seed(0))
    assert s.shape == (50, 2) and s.min() >= 0.9 and s.max() <= 1.1
    assert (s[:, 0] != s[:, 1]).all() and abs(np.corrcoef(s[:, 0].numpy(), s[:, 1].numpy())[0, 1]) < 0.4


def test_bad_input_names_the_argument():
    model = ConstantClassifier([0.0, 1.0])
    x = natural_images(2, 3, 8)
    y = torch.tensor([1, 1])
    with pytest.raises(ValueError, match="transform"):
        cc_cert_batch(model, x, y, transform="shear", value_range=(0, 1))
    with pytest.raises(ValueError, match="range of rotation"):
        cc_cert_batch(model, x, y, transform="rotation", value_range=(10, -10))
    with pytest.raises(ValueError, match="range of blur"):
        cc_cert_batch(model, x, y, transform="blur", value_range=(-1, 1))
    with pytest.raises(ValueError, match="range of gamma"):
        cc_cert_batch(model, x, y, transform="gamma", value_range=(0, 2))
    with pytest.raises(ValueError, match="n_samples"):
        cc_cert_batch(model, x, y, transform="rotation", value_range=(-1, 1), n_samples=0)
    with pytest.raises(ValueError, match=r"x must hold values in \[0, 1\]"):
        cc_cert_batch(model, x * 3, y, transform="rotation", value_range=(-1, 1))
    with pytest.raises(ValueError, match="delta"):
        chernoff_cramer_bound(torch.zeros(1, 5), torch.zeros(1), delta=1.5)
    with pytest.raises(ValueError, match="t_grid"):
        chernoff_cramer_bound(torch.zeros(1, 5), torch.zeros(1), t_grid=[0.0, 1.0])
    with pytest.raises(ValueError, match="epsilons"):
        cc_cert_dataset(model, [(x, y)], transforms={"rotation": (-1, 1)}, epsilons=(0.0,))
    with pytest.raises(ValueError, match="params for rotation"):
        apply_transform(x, "rotation", torch.zeros(3))
    with pytest.raises(ValueError, match="params for scaling"):
        apply_transform(x, "scaling", torch.ones(2, 3))
    with pytest.raises(ValueError, match="estimator"):
        cc_cert_batch(model, x, y, transform="rotation", value_range=(-1, 1), estimator="bernstein")
    with pytest.raises(ValueError, match="needs delta"):
        cc_cert_batch(model, x, y, transform="rotation", value_range=(-1, 1), estimator="kl")
    with pytest.raises(ValueError, match="takes no delta"):
        cc_cert_batch(model, x, y, transform="rotation", value_range=(-1, 1), estimator="plugin", delta=0.1)
    with pytest.raises(ValueError, match="n_bounds"):
        official_bound(torch.zeros(1, 10), torch.zeros(1), n_bounds=3)
    with pytest.raises(ValueError, match="n_bounds"):
        cc_cert_batch(model, x, y, transform="rotation", value_range=(-1, 1), n_bounds=0)
    with pytest.raises(ValueError, match="delta"):
        official_bound(torch.zeros(1, 10), torch.zeros(1), n_bounds=2, delta=0.0)
