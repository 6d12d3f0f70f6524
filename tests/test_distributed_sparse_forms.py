"""DDP over layers in sparse execution forms (CSR, N:M, BSR): their fixed index buffers, like the fixed masks,
are left out of DDP's per-forward buffer broadcast -- only BatchNorm's statistics remain in it -- and are made
rank 0's once at wrapping; SAM steps through that DDP keep the ranks identical."""
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from sparsesam.distributed import fixed_mask_buffer_names, wrap_ddp
from sparsesam.nn import MaskedConv2d, MaskedLinear, set_execution
from sparsesam.nn.dispatch import form_of
from sparsesam.optim import SAM
from distributed_helpers import needs_gloo, run_ranks

FORMS = {"0": "csr", "4": "nm", "5": "bsr", "6": "dense"}


def _model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(MaskedConv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                          MaskedLinear(144, 16), MaskedLinear(16, 16), MaskedLinear(16, 5))
    model[0].set_mask(torch.rand(model[0].weight.shape) < 0.5)
    two_of_four = torch.zeros(16, 144, dtype=torch.bool)
    two_of_four[:, 0::4] = two_of_four[:, 1::4] = True
    model[4].set_mask(two_of_four)
    blocks = torch.zeros(16, 16, dtype=torch.bool)
    blocks[:8, :8] = blocks[8:, 8:] = True  # two 8x8 blocks kept
    model[5].set_mask(blocks)
    model[6].set_mask(torch.rand(model[6].weight.shape) < 0.5)
    return set_execution(model, FORMS)


def test_fixed_pattern_names_hold_masks_and_every_sparse_index_buffer():
    model = _model()
    assert {name: form_of(model.get_submodule(name)) for name in FORMS} == FORMS
    names = fixed_mask_buffer_names(model)
    buffers = dict(model.named_buffers())
    sparse = [name for name in buffers if name.split(".")[0] in ("0", "4", "5")]
    assert sparse and set(names) == set(sparse) | {"6.weight_mask"}
    assert not any(name.startswith("1.") for name in names)


def _ranks(rank, world_size):
    model = _model()
    ddp = wrap_ddp(model)
    assert set(ddp.named_module_buffers) == {"1.running_mean", "1.running_var", "1.num_batches_tracked"}
    optimizer = SAM(ddp.parameters(), torch.optim.SGD, rho=0.1, lr=0.1, momentum=0.9, model=ddp)
    g = torch.Generator().manual_seed(rank)
    for _ in range(3):
        x, y = torch.rand(4, 1, 6, 6, generator=g), torch.randint(0, 5, (4,), generator=g)
        F.cross_entropy(ddp(x), y).backward()
        optimizer.first_step(zero_grad=True)
        F.cross_entropy(ddp(x), y).backward()
        optimizer.second_step(zero_grad=True)
    state = {k: v for k, v in model.state_dict().items() if "running_" not in k}
    gathered = [None] * world_size
    dist.all_gather_object(gathered, state)
    for key, value in gathered[0].items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, gathered[1][key]), key
        else:  # a layer's extra state (its form)
            assert value == gathered[1][key], key
    assert not torch.equal(state["4.values"], _model().state_dict()["4.values"])  # it trained


@needs_gloo
def test_ddp_broadcasts_batch_norm_buffers_only_and_ranks_stay_identical():
    run_ranks(_ranks)
