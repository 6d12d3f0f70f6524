"""sparsesam.robust attacks and adversarial training losses: PGD / FGSM against an
undefended digits MLP and against linear models whose worst case is known,
the threat-model constraints, restarts, model state, losses, bad input."""
import copy

import pytest
import torch
from torch import nn
import torch.nn.functional as F

from sparsesam.robust import autoattack, fgsm, mart_loss, pgd, pgd_at_loss, trades_loss

from robust_data import digits, trained_digits_mlp


def _test_set(n=300):
    _, _, x, y = digits()
    return x[:n], y[:n]


def _accuracy(model, x, y):
    with torch.no_grad():
        return (model(x).argmax(dim=1) == y).float().mean().item()


def _linf(a, b):
    return (a - b).flatten(1).abs().amax(dim=1)


def _l2(a, b):
    return (a - b).flatten(1).norm(dim=1)


@pytest.mark.parametrize("norm,epsilons", [("linf", [0.0, 0.03, 0.06, 0.1, 0.2]), ("l2", [0.0, 0.25, 0.5, 1.0, 2.0])])
def test_pgd_drives_accuracy_down_monotonically_within_the_threat_model(norm, epsilons):
    model = trained_digits_mlp()
    x, y = _test_set()
    clean = _accuracy(model, x, y)
    assert clean > 0.85
    accuracies = []
    for eps in epsilons:
        x_adv = pgd(model, x, y, eps=eps, norm=norm, steps=20, seed=1)
        distance = _linf(x_adv, x) if norm == "linf" else _l2(x_adv, x)
        assert (distance <= eps * (1 + 1e-6) + 1e-6).all(), f"left the {norm} ball at eps={eps}"
        assert x_adv.min() >= 0 and x_adv.max() <= 1
        accuracies.append(_accuracy(model, x_adv, y))
    assert accuracies[0] == clean
    assert all(b <= a for a, b in zip(accuracies, accuracies[1:])), accuracies
    assert accuracies[-1] < 0.1 * clean, accuracies
    assert accuracies[1] < clean, "the smallest eps already hurts an undefended model"


def test_fgsm_is_one_full_step_and_weaker_than_pgd():
    model = trained_digits_mlp()
    x, y = _test_set()
    eps = 0.1
    x_fgsm = fgsm(model, x, y, eps=eps)
    torch.testing.assert_close(x_fgsm, pgd(model, x, y, eps=eps, steps=1, step_size=eps, start="zero"))
    assert (_linf(x_fgsm, x) <= eps + 1e-6).all() and x_fgsm.min() >= 0 and x_fgsm.max() <= 1
    clean, fgsm_acc = _accuracy(model, x, y), _accuracy(model, x_fgsm, y)
    pgd_acc = _accuracy(model, pgd(model, x, y, eps=eps, steps=20), y)
    assert pgd_acc <= fgsm_acc < clean


def _linear_two_class(seed=0, dim=12):
    g = torch.Generator().manual_seed(seed)
    model = nn.Sequential(nn.Flatten(), nn.Linear(dim, 2))
    with torch.no_grad():
        model[1].weight.copy_(torch.randn(2, dim, generator=g))
        model[1].bias.zero_()
    x = 0.4 + 0.2 * torch.rand(16, 1, 1, dim, generator=g)  # interior: the [0, 1] box is never active
    y = torch.randint(0, 2, (16,), generator=g)
    return model, x, y


def test_pgd_linf_finds_the_exact_worst_case_of_a_linear_model():
    # CE of a 2-class linear model grows with (w_other - w_y).delta: the L-inf
    # maximiser is delta = eps * sign(w_other - w_y), reached by sign steps.
    model, x, y = _linear_two_class()
    eps = 0.05
    w = model[1].weight.detach()
    direction = (w[1 - y] - w[y]).reshape(x.shape)
    x_adv = pgd(model, x, y, eps=eps, norm="linf", steps=5, seed=3)
    torch.testing.assert_close(x_adv, x + eps * direction.sign(), rtol=0, atol=1e-6)


def test_pgd_l2_finds_the_exact_worst_case_of_a_linear_model():
    model, x, y = _linear_two_class(seed=1)
    eps = 0.1
    w = model[1].weight.detach()
    direction = (w[1 - y] - w[y]).reshape(x.shape)
    best = x + eps * direction / direction.flatten(1).norm(dim=1).reshape(-1, 1, 1, 1)
    # Each step adds s*d and rescales onto the sphere, shrinking the random
    # start's component orthogonal to d by ~eps / (eps + s): 50 steps of eps/2 remove it.
    x_adv = pgd(model, x, y, eps=eps, norm="l2", steps=50, step_size=eps / 2, seed=3)
    torch.testing.assert_close(x_adv, best, rtol=0, atol=1e-5)


def test_restarts_keep_the_worst_case_per_example():
    model = trained_digits_mlp()
    x, y = _test_set()
    kwargs = dict(eps=0.05, steps=3, seed=5)
    one = pgd(model, x, y, restarts=1, **kwargs)
    three = pgd(model, x, y, restarts=3, **kwargs)
    with torch.no_grad():
        fooled_one = model(one).argmax(1) != y
        fooled_three = model(three).argmax(1) != y
        loss_one = F.cross_entropy(model(one), y, reduction="none")
        loss_three = F.cross_entropy(model(three), y, reduction="none")
    # Restart 1 of both runs is the same draw, and the worst case is kept.
    assert (fooled_three | ~fooled_one).all()
    same_outcome = fooled_one == fooled_three
    assert (loss_three[same_outcome] >= loss_one[same_outcome] - 1e-6).all()
    assert fooled_three.sum() > fooled_one.sum()


def test_seeded_and_zero_eps():
    model = trained_digits_mlp()
    x, y = _test_set(50)
    a = pgd(model, x, y, eps=0.1, norm="l2", seed=11)
    assert torch.equal(a, pgd(model, x, y, eps=0.1, norm="l2", seed=11))
    assert not torch.equal(a, pgd(model, x, y, eps=0.1, norm="l2", seed=12))
    assert torch.equal(pgd(model, x, y, eps=0.0), x)


class _WithBatchNorm(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.BatchNorm1d(32), nn.ReLU())
        self.head = nn.Linear(32, 10)

    def forward(self, x):
        return self.head(self.body(x))


def _model_state(model):
    return ([m.training for m in model.modules()], [p.requires_grad for p in model.parameters()],
            {k: v.clone() for k, v in model.state_dict().items()})


def test_attacks_restore_mode_and_requires_grad_and_leave_no_gradients():
    torch.manual_seed(0)
    model = _WithBatchNorm().train()
    model.body[2].eval()                       # mixed modes: a frozen BatchNorm
    model.head.bias.requires_grad_(False)      # mixed requires_grad
    before = _model_state(model)
    x, y = _test_set(64)
    attacks = [("eval", lambda: pgd(model, x, y, eps=0.1, steps=3)),
               ("eval", lambda: fgsm(model, x, y, eps=0.1)),
               ("train", lambda: pgd(model, x, y, eps=0.5, norm="l2", steps=3, model_mode="train"))]
    for mode, attack in attacks:
        attack()
        after = _model_state(model)
        assert after[0] == before[0] and after[1] == before[1]
        assert all(p.grad is None for p in model.parameters())
        changed = [k for k, v in before[2].items() if not torch.equal(after[2][k], v)]
        if mode == "eval":  # eval-mode attacks leave BatchNorm statistics alone
            assert changed == []
        else:  # model_mode="train" runs every module in train mode: statistics move
            assert changed == ["body.2.running_mean", "body.2.running_var", "body.2.num_batches_tracked"]


def test_attack_restores_state_when_the_model_raises():
    model = trained_digits_mlp()
    model.train()
    with pytest.raises(RuntimeError):
        pgd(model, torch.rand(4, 1, 8, 9), torch.zeros(4, dtype=torch.long), eps=0.1)
    assert model.training and all(p.requires_grad for p in model.parameters())
    model.eval()


# ----------------------------------------------------------------------------- losses
@pytest.mark.parametrize("loss_fn", [pgd_at_loss, trades_loss, mart_loss])
@pytest.mark.parametrize("norm,eps", [("linf", 0.1), ("l2", 0.5)])
def test_adversarial_losses_are_finite_with_gradients(loss_fn, norm, eps):
    model = copy.deepcopy(trained_digits_mlp()).train()
    x, y = _test_set(64)
    loss = loss_fn(model, x, y, eps=eps, norm=norm, steps=3)
    assert loss.dim() == 0 and torch.isfinite(loss) and loss.item() > 0
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
    assert model.training and all(p.requires_grad for p in model.parameters())


def test_losses_reduce_to_their_parts():
    model = copy.deepcopy(trained_digits_mlp())
    x, y = _test_set(64)
    with torch.no_grad():
        clean_ce = F.cross_entropy(model(x), y)
        # TRADES with beta = 0 is the clean cross-entropy.
        torch.testing.assert_close(trades_loss(model, x, y, eps=0.1, beta=0.0, steps=2), clean_ce)
        # At eps = 0, x_adv = x: PGD-AT is clean CE, TRADES' KL vanishes, MART's KL vanishes.
        torch.testing.assert_close(pgd_at_loss(model, x, y, eps=0.0), clean_ce)
        torch.testing.assert_close(trades_loss(model, x, y, eps=0.0, beta=6.0), clean_ce)
        p = F.softmax(model(x), dim=1)
        wrong = p.clone()
        wrong[torch.arange(len(y)), y] = -1
        boosted = clean_ce - torch.log(1.0001 - wrong.max(dim=1).values + 1e-12).mean()
        torch.testing.assert_close(mart_loss(model, x, y, eps=0.0, beta=6.0), boosted, rtol=1e-5, atol=1e-6)
        # The robust terms only add: beta > 0 and eps > 0 cost more.
        assert trades_loss(model, x, y, eps=0.1, beta=6.0, steps=3) > clean_ce
        assert mart_loss(model, x, y, eps=0.1, beta=6.0, steps=3) > mart_loss(model, x, y, eps=0.1, beta=0.0, steps=3)


def test_one_pgd_at_step_lowers_the_adversarial_loss():
    model = copy.deepcopy(trained_digits_mlp()).train()
    x, y = _test_set(128)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    before = pgd_at_loss(model, x, y, eps=0.1, steps=5, seed=0)
    for _ in range(5):
        optimizer.zero_grad()
        pgd_at_loss(model, x, y, eps=0.1, steps=5, seed=0).backward()
        optimizer.step()
    assert pgd_at_loss(model, x, y, eps=0.1, steps=5, seed=0) < before


# ----------------------------------------------------------------------------- autoattack / errors
def test_autoattack_optional_import_has_a_clear_message(monkeypatch):
    # AutoAttack comes from torchattacks (the [attacks] extra), no longer from a git install.
    monkeypatch.setitem(__import__("sys").modules, "torchattacks", None)
    model = trained_digits_mlp()
    x, y = _test_set(8)
    with pytest.raises(ImportError, match=r"pip install 'sparsesam\[attacks\]'"):
        autoattack(model, x, y, eps=8 / 255)


def test_bad_input_names_the_argument():
    model = trained_digits_mlp()
    x, y = _test_set(8)
    with pytest.raises(ValueError, match="eps"):
        pgd(model, x, y, eps=-0.1)
    with pytest.raises(ValueError, match="norm"):
        pgd(model, x, y, eps=0.1, norm="l1")
    with pytest.raises(ValueError, match="steps"):
        pgd(model, x, y, eps=0.1, steps=0)
    with pytest.raises(ValueError, match="restarts"):
        pgd(model, x, y, eps=0.1, restarts=0)
    with pytest.raises(ValueError, match="start"):
        pgd(model, x, y, eps=0.1, start="gaussian")
    with pytest.raises(ValueError, match="model_mode"):
        pgd(model, x, y, eps=0.1, model_mode="test")
    with pytest.raises(ValueError, match=r"x must hold values in \[0, 1\]"):
        pgd(model, x + 1, y, eps=0.1)
    with pytest.raises(ValueError, match="rank 4"):
        pgd(model, x.flatten(1), y, eps=0.1)
    with pytest.raises(ValueError, match="y must have shape"):
        pgd(model, x, y[:4], eps=0.1)
    with pytest.raises(TypeError, match="y must be an integer"):
        pgd(model, x, y.float(), eps=0.1)
    with pytest.raises(ValueError, match="beta"):
        trades_loss(model, x, y, eps=0.1, beta=-1.0)
    with pytest.raises(ValueError, match="eps"):
        fgsm(model, x, y, eps=float("nan"))
