"""evaluation.certificate_form: the form the certificates run computes the masked model's function."""
import copy

import torch
from torch import nn

import sparsesam
from sparsesam.evaluation import certificate_form, fold_batchnorm
from sparsesam.models.small_cnn import SmallCNN
from sparsesam.pruning import magnitude_prune


def _trained_bn_model():
    torch.manual_seed(0)
    model = sparsesam.sparsify(SmallCNN(1, 10, 8, 28))
    magnitude_prune(model, 0.9)
    model.train()
    with torch.no_grad():  # BatchNorm statistics away from their initial (identity) values
        for _ in range(3):
            model(torch.rand(64, 1, 28, 28) * 2)
    return model.eval()


def test_certificate_form_is_the_masked_function_with_batchnorm_folded():
    masked = _trained_bn_model()
    form = certificate_form(sparsesam.export(masked))
    assert not any(isinstance(m, nn.BatchNorm2d) for m in form.modules())  # folded into the convs
    conv = next(m for m in form.modules() if isinstance(m, nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    x = torch.rand(32, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(form(x), masked(x), rtol=1e-5, atol=1e-5)


def test_fold_batchnorm_leaves_training_mode_and_non_neighbour_pairs():
    conv, norm = nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4)
    train_mode = nn.Sequential(copy.deepcopy(conv), copy.deepcopy(norm).train())
    fold_batchnorm(train_mode)
    assert isinstance(train_mode[1], nn.BatchNorm2d)  # batch statistics: nothing to fold
    apart = nn.Sequential(copy.deepcopy(conv), nn.ReLU(), copy.deepcopy(norm).eval())
    fold_batchnorm(apart)
    assert isinstance(apart[2], nn.BatchNorm2d)  # not the conv's neighbour
