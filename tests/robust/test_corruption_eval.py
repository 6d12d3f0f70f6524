"""Dataset-level robustness evaluation (corruption accuracy, mCE, accuracy vs
eps) and the PNG reports drawn from their result dicts."""
import json

import pytest
import torch
from torch import nn

from sparsesam.robust import (CORRUPTIONS, adversarial_accuracy, cc_cert_dataset, certified_accuracy,
                              certify_dataset, corrupt, evaluate_corruptions, mce, mean_corruption_accuracy,
                              plot_accuracy_vs_epsilon, plot_cc_cert, plot_certified_accuracy,
                              plot_corruption_accuracy)
from sparsesam.robust.corruption_eval import _batch_seed

from robust_data import ConstantClassifier, digits, natural_images, trained_digits_mlp

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


class _MeanColourClassifier(nn.Module):
    """Class = which of 4 brightness bins the image mean falls in: reacts to corruptions."""

    def forward(self, x):
        m = x.mean(dim=(1, 2, 3))
        return torch.stack([-(m - c).abs() for c in (0.2, 0.4, 0.6, 0.8)], dim=1) * 50


def _corruption_data():
    x = natural_images(24, 3, 16, seed=9)
    y = _MeanColourClassifier()(x).argmax(dim=1)  # clean accuracy 1 by construction
    return [(x[:10], y[:10]), (x[10:], y[10:])]


def test_evaluate_corruptions_counts_what_corrupt_gives():
    model = _MeanColourClassifier()
    batches = _corruption_data()
    names = ["fog", "brightness", "gaussian_noise"]
    result = evaluate_corruptions(model, batches, corruptions=names, severities=[1, 3, 5], seed=4, model_name="m")
    assert result["clean_accuracy"] == 1.0 and result["examples"] == 24 and result["severities"] == [1, 3, 5]
    assert list(result["accuracy"]) == names
    for name in names:
        for k, s in enumerate([1, 3, 5]):
            correct = 0
            for b, (x, y) in enumerate(batches):
                xc = corrupt(x, name, s, seed=_batch_seed(4, CORRUPTIONS.index(name), s, b))
                correct += (model(xc).argmax(1) == y).sum().item()
            assert result["accuracy"][name][k] == correct / 24
    assert result["mean_corruption_accuracy"] == pytest.approx(mean_corruption_accuracy(result))
    assert result["accuracy"]["brightness"][-1] < 1.0, "the probe model must notice brightness changes"
    assert json.loads(json.dumps(result)) == result
    assert evaluate_corruptions(model, batches, corruptions=names, severities=[1, 3, 5], seed=4, model_name="m") == result


def test_evaluate_corruptions_restores_the_model_mode():
    model = trained_digits_mlp()
    model.train()
    _, _, x, y = digits()
    evaluate_corruptions(model, [(x[:16], y[:16])], corruptions=["contrast"], severities=[2])
    assert model.training
    model.eval()


def test_mce_is_hendrycks_normalised_error():
    severities = [1, 2, 3, 4, 5]
    model = {"model": "sparse", "clean_accuracy": 0.9, "severities": severities,
             "accuracy": {"fog": [0.8, 0.7, 0.6, 0.5, 0.4], "snow": [0.9, 0.9, 0.8, 0.8, 0.7]}}
    base = {"model": "dense", "clean_accuracy": 0.95, "severities": severities,
            "accuracy": {"fog": [0.9, 0.8, 0.7, 0.6, 0.5], "snow": [0.8, 0.8, 0.8, 0.8, 0.8], "frost": [0.5] * 5}}
    out = mce(model, base)
    # fog: errors 0.2..0.6 sum 2.0 vs 0.1..0.5 sum 1.5; snow: 0.9 vs 1.0.
    assert out["CE"] == pytest.approx({"fog": 2.0 / 1.5, "snow": 0.9 / 1.0})
    assert out["mCE"] == pytest.approx((2.0 / 1.5 + 0.9) / 2)
    assert out["baseline"] == "dense"
    rel = mce(model, base, relative=True, baseline_name="ResNet-18 dense")
    assert rel["CE"]["fog"] == pytest.approx((2.0 - 5 * 0.1) / (1.5 - 5 * 0.05))
    assert rel["baseline"] == "ResNet-18 dense"
    assert mce(base, base)["mCE"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="severities"):
        mce(model, dict(base, severities=[1, 2, 3]))
    with pytest.raises(ValueError, match="cannot normalise"):
        mce(model, dict(base, accuracy={"fog": [1.0] * 5}))


def test_adversarial_accuracy_curve():
    model = trained_digits_mlp()
    _, _, x, y = digits()
    batches = [(x[:64], y[:64]), (x[64:128], y[64:128])]
    result = adversarial_accuracy(model, batches, epsilons=[0.0, 0.05, 0.2], steps=10, model_name="mlp")
    assert result["examples"] == 128 and result["accuracy"][0] == result["clean_accuracy"]
    assert result["accuracy"][0] > result["accuracy"][1] > result["accuracy"][2]
    fgsm_result = adversarial_accuracy(model, batches, epsilons=[0.05], attack="fgsm")
    assert fgsm_result["accuracy"][0] >= result["accuracy"][1]
    assert json.loads(json.dumps(result)) == result
    with pytest.raises(ValueError, match="attack"):
        adversarial_accuracy(model, batches, epsilons=[0.1], attack="cw")
    with pytest.raises(ValueError, match="epsilons"):
        adversarial_accuracy(model, batches, epsilons=[-0.1])


def _is_png(path):
    with open(path, "rb") as f:
        return f.read(8) == PNG_MAGIC


def test_plots_write_pngs(tmp_path):
    model = _MeanColourClassifier()
    corr = evaluate_corruptions(model, _corruption_data(), corruptions=["fog", "contrast"], severities=[1, 5])
    path = plot_corruption_accuracy({"a": corr, "b": dict(corr, model="b")}, str(tmp_path / "c" / "corr.png"))
    assert _is_png(path)
    assert _is_png(plot_corruption_accuracy(corr, str(tmp_path / "single.png"), title="one model"))

    const = ConstantClassifier([0.0, 3.0])
    x = torch.rand(4, 1, 4, 4)
    cert = certify_dataset(const, [(x, torch.tensor([1, 1, 0, 1]))], sigma=0.25, n0=10, n=100, batch_size=50)
    curve = certified_accuracy(cert, [0.0, 0.1, 0.2, 0.5])
    assert _is_png(plot_certified_accuracy({"constant": curve}, str(tmp_path / "cert.png")))

    adv = adversarial_accuracy(trained_digits_mlp(), [(digits()[2][:32], digits()[3][:32])], epsilons=[0, 0.1], steps=2)
    assert _is_png(plot_accuracy_vs_epsilon(adv, str(tmp_path / "adv.png")))

    cc = cc_cert_dataset(const, [(x, torch.tensor([1, 1, 0, 1]))], transforms={"gamma": (0.9, 1.1)}, n_samples=8)
    assert _is_png(plot_cc_cert({"constant": cc}, str(tmp_path / "cc.png")))

    with pytest.raises(ValueError, match="results"):
        plot_accuracy_vs_epsilon({"x": {"no": "epsilons"}}, str(tmp_path / "bad.png"))
    with pytest.raises(ValueError, match="epsilon 0.3 was not evaluated"):
        plot_cc_cert(cc, str(tmp_path / "bad.png"), epsilon=0.3)
