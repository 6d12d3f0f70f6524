"""Evaluate a model at a perturbed point and come back bitwise, without copying the tensors.

SAM-style methods take a gradient at a perturbed value ``v'`` of some
tensors (the weights for SAM / ASAM / AdaSAP, the soft masks for C-SAM)
and then update the *unperturbed* value ``v``. The usual implementation
saves ``v`` (a copy), writes ``v'`` into the tensor, and copies ``v`` back:
two extra passes over the tensors per step and a transient allocation.

``PerturbedPoint`` keeps one persistent buffer per tensor instead. The
caller writes ``v'`` into the buffer (``buffers()``), ``swap_in()`` points
each tensor at its buffer (``t.data = buffer``: the modules, autograd and
the gradient accumulation see ``v'``; ``t.grad`` and optimizer state keyed
by ``t`` are untouched), and ``restore()`` points it back at its own
storage -- exact, since ``v`` was never written -- keeping the displaced
storage as next step's buffer. No copy, and after the first step no
allocation::

    point = PerturbedPoint()
    out = point.buffers(tensors)      # persistent, contiguous; write v' here
    ...fill out...
    point.swap_in(tensors)            # tensors now hold v'
    loss_at_perturbed_point().backward()
    point.restore()                   # tensors hold v again, bit for bit
"""
from __future__ import annotations

from typing import Dict, List, Sequence, Tuple

import torch

Tensor = torch.Tensor


class PerturbedPoint:
    """Persistent buffers and the storage swap that puts tensors at a perturbed value and back (module docstring)."""

    def __init__(self) -> None:
        self._buffers: Dict[int, Tensor] = {}          # id(tensor) -> buffer; reused from step to step
        self._swapped: List[Tuple[Tensor, Tensor]] = []  # (tensor, its own storage) while perturbed

    @property
    def active(self) -> bool:
        """True between swap_in() and restore()."""
        return bool(self._swapped)

    def buffer_for(self, tensor: Tensor) -> Tensor:
        """The persistent buffer of ``tensor`` (same shape, dtype, device and strides); new only when those change."""
        if not isinstance(tensor, Tensor):
            raise TypeError(f"tensor must be a torch.Tensor, got {type(tensor).__name__}")
        buf = self._buffers.get(id(tensor))
        if (buf is None or buf.shape != tensor.shape or buf.dtype != tensor.dtype or buf.device != tensor.device
                or buf.stride() != tensor.stride()):
            buf = torch.empty_like(tensor)
            self._buffers[id(tensor)] = buf
        return buf

    def buffers(self, tensors: Sequence[Tensor]) -> List[Tensor]:
        """One buffer per tensor (see buffer_for); write the perturbed values into them before swap_in()."""
        if isinstance(tensors, Tensor):
            raise TypeError("tensors must be a sequence of tensors, got a single tensor")
        return [self.buffer_for(t) for t in tensors]

    @torch.no_grad()
    def swap_in(self, tensors: Sequence[Tensor]) -> None:
        """Point every tensor at its buffer (its perturbed value); may be called again before restore()."""
        if isinstance(tensors, Tensor):
            raise TypeError("tensors must be a sequence of tensors, got a single tensor")
        swapped = {id(t) for t, _ in self._swapped}
        for t in tensors:
            if id(t) in swapped:
                raise RuntimeError("a tensor was swapped in twice without restore() in between")
            buf = self._buffers.get(id(t))
            if buf is None:
                raise RuntimeError("swap_in() of a tensor that has no buffer: fill buffers(tensors) first")
            if buf.shape != t.shape or buf.dtype != t.dtype or buf.device != t.device:
                raise RuntimeError("a tensor changed shape, dtype or device since its buffer was made")
            original = t.data
            t.data = buf
            self._swapped.append((t, original))
            swapped.add(id(t))

    @torch.no_grad()
    def restore(self) -> None:
        """Point every swapped tensor back at its own storage (exact); its perturbed storage becomes its buffer."""
        for t, original in self._swapped:
            perturbed = t.data
            t.data = original
            self._buffers[id(t)] = perturbed
        self._swapped.clear()

    def clear(self) -> None:
        """Drop every buffer (e.g. when the tensors are replaced); refused while perturbed."""
        if self._swapped:
            raise RuntimeError("clear() while tensors are swapped in: restore() first")
        self._buffers.clear()


__all__ = ["PerturbedPoint"]
