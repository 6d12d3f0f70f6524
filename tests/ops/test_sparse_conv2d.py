"""sparse_conv2d (direct sparse convolution, C++ CPU kernel through the registered op) vs
sparsesam.reference, and the SparseConv2d module.

The first test runs on every backend (``backends.OP_BACKENDS``: reference, CPU C++, Triton under
the interpreter, CUDA C++), each skipped with the reason where this machine lacks it: sparse_conv2d
has no Triton or CUDA C++ kernel yet, so those two skip (CUDA tensors run the reference).

Shapes cover stride, padding and dilation in each direction, windows partly
outside the image, odd sizes, 1x1 kernels, empty batches and all-pruned layers.
"""
from __future__ import annotations

import os
import sys

import pytest
import torch
import torch.nn.functional as F

from sparsesam import reference
from sparsesam.nn import MaskedConv2d, SparseConv2d
from sparsesam.ops import sparse_conv2d
from sparsesam.sparse import CSRPattern

from op_cases import outputs_and_grads, to64
from tolerance import assert_within_torch_error
from backends import backend_op, OP_BACKENDS


# ============================================================================
# Every backend (reference, cpu, triton, cuda) against the dense float64 math

@pytest.mark.parametrize("backend", OP_BACKENDS)
def test_every_backend_matches_conv2d_on_the_dense_weight(backend):
    """y, dx and dvalues (dW at the kept entries) of a strided, padded, dilated convolution, float32
    against the float64 dense math."""
    forward, device = backend_op(backend, "sparse_conv2d")
    backward, _ = backend_op(backend, "sparse_conv2d_backward")
    geometry = ([3, 2], [2, 1], [1, 2], [1, 2])  # kernel_size, stride, padding, dilation
    pattern = CSRPattern.from_mask(torch.rand(6, 4 * 3 * 2) < 0.4)
    values = pattern.gather(torch.randn(6, 24, dtype=torch.float64))
    x, b = torch.randn(2, 4, 9, 8, dtype=torch.float64), torch.randn(6, dtype=torch.float64)
    conv = lambda x, w, b: F.conv2d(x, w, b, *geometry[1:])  # noqa: E731
    g = torch.randn(conv(x, pattern.scatter(values).view(6, 4, 3, 2), b).shape, dtype=torch.float64)

    def dense(x, values, b, g):
        x, w = x.clone().requires_grad_(), pattern.scatter(values).view(6, 4, 3, 2).requires_grad_()
        y = conv(x, w, b)
        dx, dw = torch.autograd.grad(y, [x, w], g)
        return y.detach(), dx, pattern.gather(dw.flatten(1))

    truth = dense(x, values, b, g)
    torch_own = dense(*(t.float() for t in (x, values, b, g)))
    on = lambda t: t.float().to(device)  # noqa: E731
    index = tuple(pattern.to(device))
    y = forward(on(x), on(values), *index, on(b), *geometry)
    dx, dvalues = backward(on(g), on(x), on(values), *index, *geometry, [True, True])
    sums = (4 * 3 * 2, 6 * 3 * 2, g[:, 0].numel())
    for name, ours, own, ref, n in zip(("y", "dx", "dvalues"), (y, dx, dvalues), torch_own, truth, sums):
        assert_within_torch_error(name, ours.cpu(), own, ref, reduction_size=n)


# ============================================================================
# Reference and CPU C++ kernels

ops = torch.ops.sparsesam

# (N, C_in, H, W, C_out, kernel, stride, padding, dilation, density)
SHAPES = [
    (2, 3, 7, 9, 4, (3, 3), (1, 1), (1, 1), (1, 1), 0.5),
    (3, 5, 11, 6, 7, (3, 2), (2, 1), (0, 2), (1, 1), 0.4),
    (1, 4, 9, 10, 3, (3, 3), (1, 3), (2, 1), (2, 2), 0.6),
    (2, 2, 5, 5, 5, (1, 1), (1, 1), (0, 0), (1, 1), 0.7),
    (2, 6, 8, 8, 6, (5, 5), (2, 2), (3, 3), (1, 2), 0.3),
    (4, 8, 16, 13, 9, (3, 3), (1, 1), (1, 1), (1, 1), 0.1),
    (1, 1, 3, 3, 1, (3, 3), (1, 1), (0, 0), (1, 1), 1.0),
    # stride 1 and out_w == w: the flattened path (padding columns saved / zeroed)
    (2, 3, 10, 12, 5, (5, 5), (1, 1), (2, 2), (1, 1), 0.5),
    (2, 4, 9, 11, 3, (3, 3), (1, 1), (2, 2), (2, 2), 0.5),
    (3, 2, 8, 8, 4, (3, 1), (1, 1), (1, 0), (1, 1), 0.8),
    (9, 3, 6, 7, 4, (3, 3), (1, 1), (1, 1), (1, 1), 0.5),  # several dW image groups, one partial
    (0, 3, 6, 6, 4, (3, 3), (1, 1), (1, 1), (1, 1), 0.5),
    (2, 3, 6, 6, 4, (3, 3), (1, 1), (1, 1), (1, 1), 0.0),
]
DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def _inputs(n, cin, h, w, cout, kernel, stride, padding, dilation, density, dtype, bias=True):
    mask = torch.rand(cout, cin * kernel[0] * kernel[1]) < density
    pattern = CSRPattern.from_mask(mask)
    inputs = dict(
        x=torch.randn(n, cin, h, w, dtype=torch.float64).to(dtype),
        values=torch.randn(pattern.nnz, dtype=torch.float64).to(dtype),
        bias=torch.randn(cout, dtype=torch.float64).to(dtype) if bias else None,
    )
    return pattern, inputs, dict(kernel_size=kernel, stride=stride, padding=padding, dilation=dilation)


def _ours(pattern, geo):
    return lambda x, values, bias: sparse_conv2d(x, values, pattern, bias, **geo)


def _reference(pattern, geo):
    return lambda x, values, bias: reference.sparse_conv2d(x, values, *pattern, bias, geo["kernel_size"],
                                                           geo["stride"], geo["padding"], geo["dilation"])


def _check(pattern, inputs, geo):
    ours, ours_grads = outputs_and_grads(_ours(pattern, geo), inputs)
    torch_own, torch_grads = outputs_and_grads(_reference(pattern, geo), inputs)
    ref, ref_grads = outputs_and_grads(_reference(pattern, geo), to64(inputs))
    x = inputs["x"]
    assert ours.is_contiguous()
    assert_within_torch_error("y", ours, torch_own, ref, reduction_size=pattern.in_features)
    assert set(ours_grads) == set(ref_grads)
    n_out = ref.shape[0] * ref.shape[2] * ref.shape[3]
    for name in ref_grads:
        sums = {"x": pattern.in_features * pattern.out_features, "values": n_out, "bias": n_out}[name]
        assert_within_torch_error(f"d{name}", ours_grads[name], torch_grads[name], ref_grads[name],
                                  reduction_size=sums)
    assert ours_grads["x"].shape == x.shape


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_forward_backward_vs_reference(dtype, shape):
    torch.manual_seed(0)
    _check(*_inputs(*shape, dtype))


@pytest.mark.parametrize("layout", ["channels_last", "sliced"])
def test_noncontiguous_x(layout):
    torch.manual_seed(1)
    pattern, inputs, geo = _inputs(3, 4, 9, 9, 5, (3, 3), (1, 1), (1, 1), (1, 1), 0.4, torch.float32)
    x = inputs["x"]
    x = x.contiguous(memory_format=torch.channels_last) if layout == "channels_last" else \
        torch.randn(3, 4, 9, 12)[..., 1:10]
    assert not x.is_contiguous()
    inputs["x"] = x
    _check(pattern, inputs, geo)


def test_unbatched_input_and_no_bias():
    torch.manual_seed(2)
    pattern, inputs, geo = _inputs(1, 3, 6, 7, 4, (3, 3), (1, 1), (1, 1), (1, 1), 0.5, torch.float64, bias=False)
    x = inputs["x"][0]
    y = sparse_conv2d(x, inputs["values"], pattern, None, **geo)
    expected = reference.sparse_conv2d(x[None], inputs["values"], *pattern, None, (3, 3), (1, 1), (1, 1), (1, 1))[0]
    torch.testing.assert_close(y, expected)


def test_all_pruned_gives_bias_and_zero_grads():
    pattern, inputs, geo = _inputs(2, 3, 5, 5, 4, (3, 3), (1, 1), (1, 1), (1, 1), 0.0, torch.float32)
    assert pattern.nnz == 0
    out, grads = outputs_and_grads(_ours(pattern, geo), inputs)
    torch.testing.assert_close(out, inputs["bias"].view(1, 4, 1, 1).expand(2, 4, 5, 5))
    assert grads["values"].shape == (0,) and torch.count_nonzero(grads["x"]) == 0


def test_large_outputs_from_the_huge_page_allocator_are_ordinary_tensors():
    # y and dx of 8 MiB and more come from csrc/cpu/huge_page_output.h (2 MiB
    # aligned, madvise'd): same values as the reference, and the tensors behave
    # as any (resizable, writable, freed) CPU tensor.
    torch.manual_seed(6)
    pattern, inputs, geo = _inputs(2, 3, 256, 256, 16, (3, 3), (1, 1), (1, 1), (1, 1), 0.2, torch.float32)
    _check(pattern, inputs, geo)
    y = sparse_conv2d(inputs["x"], inputs["values"], pattern, inputs["bias"], **geo)
    assert y.numel() * y.element_size() >= 8 << 20
    if sys.platform.startswith("linux") and os.environ.get("SPARSESAM_NO_HUGE_PAGES", "0") in ("", "0"):
        assert y.data_ptr() % (2 << 20) == 0  # the path under test was taken
    first = y.flatten()[:1000].clone()
    y.add_(1.0)
    y.resize_(2 * y.numel())  # grows through the allocator's copy
    torch.testing.assert_close(y[:1000], first + 1.0)
    del y


def test_gradcheck():
    torch.manual_seed(3)
    pattern, inputs, geo = _inputs(2, 3, 6, 5, 4, (3, 2), (2, 1), (1, 1), (1, 2), 0.5, torch.float64)
    args = tuple(t.requires_grad_() for t in (inputs["x"], inputs["values"], inputs["bias"]))
    assert torch.autograd.gradcheck(lambda x, v, b: sparse_conv2d(x, v, pattern, b, **geo), args)


def test_opcheck():
    torch.manual_seed(4)
    for shape in [SHAPES[0], SHAPES[1], SHAPES[-2], SHAPES[-1]]:
        pattern, inputs, geo = _inputs(*shape, torch.float32)
        g = [list(geo[k]) for k in ("kernel_size", "stride", "padding", "dilation")]
        args = (inputs["x"].requires_grad_(), inputs["values"].requires_grad_(), *pattern, inputs["bias"], *g)
        torch.library.opcheck(ops.sparse_conv2d.default, args)
        grad_out = torch.randn_like(ops.sparse_conv2d.default(*args))
        for output_mask in ([True, True], [True, False], [False, True]):
            torch.library.opcheck(ops.sparse_conv2d_backward.default,
                                  (grad_out, inputs["x"].detach(), inputs["values"].detach(), *pattern, *g,
                                   output_mask))


def test_thread_count_does_not_change_results():
    torch.manual_seed(5)
    pattern, inputs, geo = _inputs(3, 6, 10, 10, 7, (3, 3), (1, 1), (1, 1), (1, 1), 0.3, torch.float32)
    threads = torch.get_num_threads()
    try:
        runs = []
        for n in (1, 2):
            torch.set_num_threads(n)
            runs.append(outputs_and_grads(_ours(pattern, geo), inputs))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(runs[0][0], runs[1][0])
    for name in runs[0][1]:
        assert torch.equal(runs[0][1][name], runs[1][1][name])


@pytest.mark.parametrize("bad, error, match", [
    (dict(values=torch.randn(3)), ValueError, "values has 3 entries"),
    (dict(x=torch.randn(2, 5, 6, 6)), ValueError, "channels"),
    (dict(x=torch.randn(6, 6)), ValueError, "x must have"),
    (dict(x=torch.randn(1, 3, 1, 1), padding=0), ValueError, "smaller than the dilated kernel"),
    (dict(stride=0), ValueError, "stride must be >= 1"),
    (dict(stride=2.5), TypeError, "stride must be an int or a pair of ints"),
    (dict(kernel_size=(3, 3.0)), TypeError, "kernel_size must be an int or a pair of ints"),
    (dict(padding=-1), ValueError, "padding must be >= 0"),
    (dict(dilation=(1, 1, 1)), ValueError, "dilation must be an int or a pair of ints"),
    (dict(bias=torch.randn(5)), ValueError, "bias has 5 entries"),
    (dict(values="v"), TypeError, "values must be a torch.Tensor"),
    (dict(pattern="p"), TypeError, "pattern must be a sparsesam.sparse.CSRPattern"),
    (dict(x=torch.randn(2, 3, 6, 6, dtype=torch.float64)), TypeError, "dtype"),
])
def test_bad_arguments_name_the_argument(bad, error, match):
    pattern, inputs, geo = _inputs(2, 3, 6, 6, 4, (3, 3), (1, 1), (1, 1), (1, 1), 0.5, torch.float32)
    args = dict(x=inputs["x"], values=inputs["values"], pattern=pattern, bias=inputs["bias"], **geo)
    args.update(bad)
    with pytest.raises(error, match=match):
        sparse_conv2d(**args)


def test_out_of_range_index_raises():
    pattern, inputs, geo = _inputs(1, 2, 5, 5, 3, (3, 3), (1, 1), (1, 1), (1, 1), 1.0, torch.float32)
    bad = pattern._replace(col_indices=pattern.col_indices.clone().fill_(99))
    g = [list(geo[k]) for k in ("kernel_size", "stride", "padding", "dilation")]
    with pytest.raises(ValueError, match="col_indices"):
        ops.sparse_conv2d.default(inputs["x"], inputs["values"], *bad, None, *g)


# --- the module -----------------------------------------------------------------------


def _masked_conv(density=0.3, **kw):
    torch.manual_seed(6)
    layer = MaskedConv2d(4, 6, 3, **kw)
    layer.set_mask(torch.rand_like(layer.weight) < density)
    return layer


@pytest.mark.parametrize("kw", [dict(padding=1), dict(stride=2, padding=(0, 2), dilation=(2, 1)), dict(padding="valid"),
                                dict(bias=False)])
def test_module_matches_masked_conv_and_converts_back_exactly(kw):
    masked = _masked_conv(**kw).double()
    sparse = SparseConv2d.from_masked(masked)
    x = torch.randn(3, 4, 9, 8, dtype=torch.float64)
    torch.testing.assert_close(sparse(x), masked(x))
    back = sparse.to_masked()
    assert torch.equal(back.weight_mask, masked.weight_mask)
    assert torch.equal(back.weight, masked.weight * masked.weight_mask)
    assert (back.bias is None) == (masked.bias is None) and (back.bias is None or torch.equal(back.bias, masked.bias))


def test_module_state_dict_round_trip_with_another_pattern():
    a = SparseConv2d.from_masked(_masked_conv(0.3, padding=1))
    b = SparseConv2d.from_masked(_masked_conv(0.8, padding=1))
    assert a.nnz != b.nnz
    b.load_state_dict(a.state_dict())
    x = torch.randn(2, 4, 7, 7)
    assert torch.equal(a(x), b(x))
    assert set(a.state_dict()) == {"values", "bias", "crow_indices", "col_indices"}


@pytest.mark.parametrize("kw, reason", [(dict(groups=2), "groups"), (dict(padding_mode="reflect", padding=1), "padding_mode"),
                                        (dict(padding="same"), "padding")])
def test_module_refuses_what_the_op_cannot_compute(kw, reason):
    layer = MaskedConv2d(4, 6, 3, **kw)
    with pytest.raises(ValueError, match=reason):
        SparseConv2d.from_masked(layer)


def test_module_refuses_trainable_mask():
    with pytest.raises(ValueError, match="trainable"):
        SparseConv2d.from_masked(MaskedConv2d(2, 2, 3, mask_mode="trainable"))
