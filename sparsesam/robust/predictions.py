"""The class a model predicts from its logits, where a non-finite output predicts no class.

A model whose logits hold NaN or inf for an input has not classified it:
``argmax`` would still return an index (NaN compares as the largest value),
and that index could be counted as a correct prediction, a vote in randomized
smoothing or a certified class. Every evaluation of sparsesam.robust reads
predictions through ``predicted_classes``, so such an output is never a class:
it is ``NO_CLASS`` (-1), which never equals a label, and which randomized
smoothing counts as a vote for no class (so it abstains when no class wins).
"""
from __future__ import annotations

import torch

Tensor = torch.Tensor

NO_CLASS = -1


def check_logits(logits, batch: int) -> None:
    """The model's output for a batch of ``batch`` inputs must be a floating (batch, classes) tensor."""
    if not isinstance(logits, Tensor):
        raise TypeError(f"the model must return a tensor of logits, got {type(logits).__name__}")
    if not logits.is_floating_point():
        raise TypeError(f"the model must return floating logits, got {logits.dtype}")
    if logits.dim() != 2 or logits.shape[0] != batch or logits.shape[1] < 1:
        raise ValueError(f"the model must return (batch, classes) logits for a batch of {batch}, "
                         f"got shape {tuple(logits.shape)}")


def finite_rows(logits: Tensor) -> Tensor:
    """(N,) bool: True where every logit of the row is finite."""
    return torch.isfinite(logits).all(dim=1)


def predicted_classes(logits: Tensor) -> Tensor:
    """(N,) int64: the argmax of each row of (N, K) logits, or NO_CLASS where the row is not finite."""
    return torch.where(finite_rows(logits), logits.argmax(dim=1), torch.full_like(logits[:, 0], NO_CLASS,
                                                                                 dtype=torch.long))


def correct(logits: Tensor, labels: Tensor) -> Tensor:
    """(N,) bool: the prediction is a class and equals the label."""
    prediction = predicted_classes(logits)
    return (prediction != NO_CLASS) & (prediction == labels.to(prediction.device))
