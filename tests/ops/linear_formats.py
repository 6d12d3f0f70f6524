"""What the tests of the three compressed-weight linear ops share: ``csr_linear``, ``bsr_linear`` and ``nm_linear``.

Each op computes ``y = x W^T + b`` with W kept as ``values`` at a pattern's
entries, and its backward gives ``(dx, dvalues)`` for an ``output_mask``; so
each op's file (tests/ops/test_<op>.py) checks the same things in the same
way, with its own pattern, shapes and index arguments:

- ``assert_linear_format_matches_dense``: any backend's kernels against
  ``F.linear`` on the dense weight (the first test of each file);
- ``assert_op_within_torch_error``: the op with autograd (or any function of
  ``x, values, bias``) against its reference, output and every gradient;
- ``assert_backward_within_torch_error``: one backward kernel's ``(dx, dvalues)``;
- ``assert_same_bits_at_every_thread_count``: the CPU kernels split work
  over threads without changing a bit;
- ``assert_script_passes_on_the_baseline_isa``: the kernels compiled for CPUs
  without AVX2, in a fresh process.

Every tolerance is the flash-attention rule of tests/tolerance.py: at most
about twice PyTorch's own error against float64, where the sums behind an
output have ``in_features`` terms (y), ``out_features`` (dx) or the batch
(dvalues, dbias).
"""
from __future__ import annotations

import os
import subprocess
import sys
from typing import Callable, Dict, Sequence

import torch

from op_cases import outputs_and_grads, to64
from tolerance import assert_within_torch_error

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def assert_linear_format_matches_dense(forward, backward, device, pattern, index_args) -> None:
    """A compressed-weight linear op (CSR, BSR, N:M) against ``F.linear`` on its dense weight.

    ``forward(x, values, *index_args(pattern), bias)`` and ``backward(grad_out,
    x, values, *index_args(pattern), [True, True])`` in float32 on ``device``,
    against the float64 dense math (y = x W^T + b, dx = g W, dvalues = the
    kept entries of g^T x), within twice PyTorch's own float32 error.
    """
    n_out, n_in = pattern.shape
    values = pattern.gather(torch.randn(n_out, n_in, dtype=torch.float64))
    x, bias, grad = torch.randn(7, 3, n_in, dtype=torch.float64), torch.randn(n_out, dtype=torch.float64), \
        torch.randn(7, 3, n_out, dtype=torch.float64)

    def dense(x, values, bias, grad):
        weight = pattern.to(values.device).scatter(values)
        weight_grad = grad.reshape(-1, n_out).t() @ x.reshape(-1, n_in)
        return torch.nn.functional.linear(x, weight, bias), grad @ weight, pattern.gather(weight_grad)

    truth = dense(x, values, bias, grad)
    torch_own = dense(*(t.float() for t in (x, values, bias, grad)))
    on = lambda t: t.float().to(device)  # noqa: E731
    index = index_args(pattern.to(device))
    y = forward(on(x), on(values), *index, on(bias))
    dx, dvalues = backward(on(grad), on(x), on(values), *index, [True, True])
    for name, ours, own, ref, sums in zip(("y", "dx", "dvalues"), (y, dx, dvalues), torch_own, truth, (n_in, n_out, 21)):
        assert_within_torch_error(name, ours.cpu(), own, ref, reduction_size=sums)


def assert_op_within_torch_error(ours: Callable, reference: Callable, pattern, inputs: Dict[str, torch.Tensor]) -> None:
    """``ours(x, values, bias)`` against ``reference(x, values, bias)``: y and every input's gradient.

    The reference runs twice: in the inputs' dtype (PyTorch's own error) and
    in float64 (the truth); ours must be within about twice the former's
    error from the latter.
    """
    ours_y, ours_grads = outputs_and_grads(ours, inputs)
    torch_y, torch_grads = outputs_and_grads(reference, inputs)
    ref_y, ref_grads = outputs_and_grads(reference, to64(inputs))
    batch = inputs["x"].shape[:-1].numel()
    assert_within_torch_error("y", ours_y, torch_y, ref_y, reduction_size=pattern.in_features)
    assert set(ours_grads) == set(ref_grads)
    for name in ref_grads:
        sums = {"x": pattern.out_features, "values": batch, "bias": batch}[name]
        assert_within_torch_error(f"d{name}", ours_grads[name], torch_grads[name], ref_grads[name], reduction_size=sums)


def assert_backward_within_torch_error(ours: Sequence[torch.Tensor], torch_own: Sequence[torch.Tensor],
                                       reference64: Sequence[torch.Tensor], output_mask: Sequence[bool], pattern,
                                       grad_out: torch.Tensor) -> None:
    """``(dx, dvalues)`` of a backward kernel for ``output_mask`` against the reference's, in the inputs'
    dtype (``torch_own``) and in float64; a gradient not asked for must come back empty (``schemas.h``)."""
    batch = grad_out.shape[:-1].numel()
    for name, o, t, r, wanted, sums in zip(("dx", "dvalues"), ours, torch_own, reference64, output_mask,
                                           (pattern.out_features, batch)):
        if wanted:
            assert_within_torch_error(name, o, t, r.to(torch.float64), reduction_size=sums)
        else:
            assert o.shape == (0,)


def assert_same_bits_at_every_thread_count(run: Callable[[], Sequence[torch.Tensor]]) -> None:
    """``run()`` (the op's outputs) gives the same bits with 1, 2 and 3 threads: how the CPU kernels split
    the work over threads must not change a result."""
    results = []
    threads = torch.get_num_threads()
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            results.append(tuple(run()))
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)


def assert_script_passes_on_the_baseline_isa(script: str) -> None:
    """Run ``script`` in a fresh process with ``ATEN_CPU_CAPABILITY=default``, so the op runs the kernels
    compiled for the baseline ISA (CPUs without AVX2; the choice is made once per process, as ATen's own);
    the script asserts what it checks and prints ``ok`` at the end."""
    env = dict(os.environ, ATEN_CPU_CAPABILITY="default")
    done = subprocess.run([sys.executable, "-c", script], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-3000:]
