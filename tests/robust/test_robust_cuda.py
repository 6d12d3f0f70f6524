"""sparsesam.robust on a CUDA device: corruptions match the CPU (random numbers
are drawn on the CPU), attacks and certificates run on device tensors."""
import pytest
import torch

from sparsesam.robust import CORRUPTIONS, cc_cert_batch, certify, corrupt, pgd

from robust_data import ConstantClassifier, natural_images, trained_digits_mlp, digits

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

# Stored as uint8 in between (floor): an ulp of difference before flooring moves a value by 1/255.
QUANTISED = {"glass_blur", "snow"}


@pytest.mark.parametrize("name", CORRUPTIONS)
def test_corruptions_on_cuda_match_cpu(name):
    x = natural_images(4, 3, 32, seed=0)
    cpu = corrupt(x, name, 4, seed=3)
    gpu = corrupt(x.cuda(), name, 4, seed=3)
    assert gpu.device.type == "cuda" and gpu.dtype == x.dtype
    diff = (gpu.cpu() - cpu).abs()
    if name in QUANTISED:
        assert diff.mean() < 2e-3
    else:
        assert diff.max() < 1e-4, diff.max()


def test_pgd_and_certify_on_cuda():
    model = trained_digits_mlp()
    gpu_model = type(model)().cuda()
    gpu_model.load_state_dict(model.state_dict())
    gpu_model.eval()
    _, _, x, y = digits()
    x, y = x[:64].cuda(), y[:64].cuda()
    x_adv = pgd(gpu_model, x, y, eps=0.1, steps=10)
    assert x_adv.device.type == "cuda" and (x_adv - x).abs().max() <= 0.1 + 1e-6
    assert (gpu_model(x_adv).argmax(1) == y).float().mean() < (gpu_model(x).argmax(1) == y).float().mean()
    prediction, radius = certify(ConstantClassifier([0.0, 2.0]).cuda(), x[0], 0.25, 10, 100, 0.001, 50)
    assert prediction == 1 and radius > 0
    out = cc_cert_batch(ConstantClassifier([0.0, 2.0]).cuda(), x[:4], torch.ones(4, dtype=torch.long, device="cuda"),
                        transform="rotation", value_range=(-10, 10), n_samples=16)
    assert (out["bound"] < 1e-6).all()
