"""optim.PerturbedPoint: tensors evaluated at a perturbed value through a storage swap, restored bitwise, no copies."""
import pytest
import torch
from torch import nn

from sparsesam.optim import SAM, PerturbedPoint


def test_swap_in_shows_the_buffer_and_restore_gives_back_the_same_bits_and_storage():
    torch.manual_seed(0)
    layer = nn.Linear(5, 3)
    params = [layer.weight, layer.bias]
    own = [p.data_ptr() for p in params]
    before = [p.detach().clone() for p in params]
    point = PerturbedPoint()
    buffers = point.buffers(params)
    assert all(b.shape == p.shape and b.data_ptr() != p.data_ptr() for b, p in zip(buffers, params))
    for b, p in zip(buffers, params):
        b.copy_(p.detach() + 1.0)
    x = torch.randn(4, 5)
    point.swap_in(params)
    assert point.active
    assert torch.allclose(layer(x), x @ (before[0] + 1).T + before[1] + 1)
    layer(x).sum().backward()  # the gradient at the perturbed point lands in .grad as usual
    assert torch.allclose(layer.bias.grad, torch.full((3,), 4.0))
    point.restore()
    assert not point.active
    assert [p.data_ptr() for p in params] == own
    assert all(torch.equal(p, b) for p, b in zip(params, before))


def test_buffers_persist_from_step_to_step():
    t = torch.zeros(8)
    point = PerturbedPoint()
    first = point.buffers([t])[0]
    point.swap_in([t])
    point.restore()
    # the displaced storage is next step's buffer: no new allocation
    assert point.buffers([t])[0].data_ptr() == first.data_ptr()
    point.swap_in([t])
    point.restore()
    assert point.buffer_for(t).data_ptr() == first.data_ptr()


def test_a_changed_tensor_gets_a_new_buffer():
    t = torch.zeros(2, 3)
    point = PerturbedPoint()
    old = point.buffer_for(t)
    t.data = torch.zeros(3, 2).t()  # same shape, other strides
    new = point.buffer_for(t)
    assert new is not old and new.stride() == t.stride()


def test_misuse_is_refused():
    t = torch.zeros(3)
    point = PerturbedPoint()
    with pytest.raises(RuntimeError, match="no buffer"):
        point.swap_in([t])
    point.buffers([t])
    point.swap_in([t])
    with pytest.raises(RuntimeError, match="twice"):
        point.swap_in([t])
    with pytest.raises(RuntimeError, match="restore"):
        point.clear()
    point.restore()
    with pytest.raises(TypeError, match="sequence"):
        point.buffers(t)
    with pytest.raises(TypeError, match="tensor"):
        point.buffer_for([t])


def test_sam_keeps_its_ascent_point_in_a_perturbed_point():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    optimizer = SAM(model.parameters(), torch.optim.SGD, rho=0.1, lr=0.1)
    x, y = torch.randn(8, 4), torch.randint(0, 2, (8,))
    own = [p.data_ptr() for p in model.parameters()]
    buffers = None
    for _ in range(3):
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.first_step(zero_grad=True)
        assert optimizer._point.active and [p.data_ptr() for p in model.parameters()] != own
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.second_step(zero_grad=True)
        assert not optimizer._point.active and [p.data_ptr() for p in model.parameters()] == own
        now = sorted(b.data_ptr() for b in optimizer._ascent_buffers.values())
        assert buffers is None or now == buffers
        buffers = now
