"""A fixed-mask layer's checkpoint loads whatever form it was saved in.

A masked layer saves ``weight`` + ``weight_mask``; its sparse forms save
``values`` and their format's index instead (CSR and BSR: ``crow_indices`` +
``col_indices``, with 1-D or 3-D ``values``; N:M: ``indices`` + the ``n``/``m``
extra state). Every form's ``_load_from_state_dict`` first calls
:func:`in_own_form`: if the layer's entries in ``state_dict`` are in another
form, they are decoded to the dense weight and mask (exact: pruned weights
come back as the zeros a sparse form stores) and encoded in the layer's own
form, so ``load_state_dict(strict=True)`` works across forms and the form's
own loading (another pattern, another nnz) takes over from there.
"""
from __future__ import annotations

import math
from typing import Callable, Dict, List, Optional, Tuple

from torch import Tensor

from ..sparse.bsr import BSRPattern
from ..sparse.csr import CSRPattern
from ..sparse.nm import NMPattern

# Every entry name that holds the weight in one form or another (bias is the same in all forms).
WEIGHT_ENTRIES = ("weight", "weight_orig", "weight_mask", "values", "crow_indices", "col_indices", "indices",
                  "_extra_state")


def saved_form(state_dict, prefix: str) -> Optional[str]:
    """"dense", "csr", "bsr" or "nm": the form of the layer at ``prefix`` in ``state_dict``
    (None: no weight entries there, e.g. a partial checkpoint)."""
    if prefix + "weight" in state_dict or prefix + "weight_orig" in state_dict:
        return "dense"
    values = state_dict.get(prefix + "values")
    if not isinstance(values, Tensor):
        return None
    if prefix + "indices" in state_dict:
        return "nm"
    if prefix + "crow_indices" in state_dict and prefix + "col_indices" in state_dict:
        return "bsr" if values.dim() == 3 else "csr"
    return None


def saved_dense(state_dict, prefix: str, weight_shape: Tuple[int, ...],
                current_mask: Callable[[], Tensor]) -> Tuple[Tensor, Tensor]:
    """The saved weight and bool mask of the layer at ``prefix``, of shape ``weight_shape``, whatever
    form they were saved in. A dense checkpoint without a mask (a plain nn.Linear's) keeps the
    layer's ``current_mask()``, as the masked layers do. ValueError/TypeError/KeyError if the
    entries are not a valid form of that shape."""
    form = saved_form(state_dict, prefix)
    rows, cols = weight_shape[0], math.prod(weight_shape[1:])
    if form == "dense":
        weight = state_dict.get(prefix + "weight")
        if weight is None:  # a torch.nn.utils.prune checkpoint
            weight = state_dict[prefix + "weight_orig"]
        mask = state_dict.get(prefix + "weight_mask")
        mask = current_mask() if mask is None else mask != 0
        weight, mask = weight.detach(), mask.to(weight.device)
        if tuple(weight.shape) != tuple(weight_shape):
            raise ValueError(f"the saved weight has shape {tuple(weight.shape)}, the layer's {tuple(weight_shape)}")
    else:
        values = state_dict[prefix + "values"].detach()
        if form == "csr":
            pattern = CSRPattern.from_csr(state_dict[prefix + "crow_indices"], state_dict[prefix + "col_indices"], cols)
        elif form == "bsr":
            pattern = BSRPattern.from_bsr(state_dict[prefix + "crow_indices"], state_dict[prefix + "col_indices"], cols,
                                          tuple(int(s) for s in values.shape[1:]))
        else:
            extra = state_dict[prefix + "_extra_state"]
            pattern = NMPattern.from_indices(state_dict[prefix + "indices"], extra["n"], extra["m"])
        if pattern.shape != (rows, cols):
            raise ValueError(f"the saved pattern has shape {pattern.shape}, the layer's weight {(rows, cols)}")
        pattern = pattern.to(values.device)
        weight, mask = pattern.scatter(values), pattern.mask()
    if mask.numel() != weight.numel():
        raise ValueError(f"the saved mask has shape {tuple(mask.shape)}, the weight {tuple(weight.shape)}")
    return weight.reshape(weight_shape), mask.reshape(weight_shape)


def in_own_form(state_dict, prefix: str, own_form: str, weight_shape: Tuple[int, ...],
                current_mask: Callable[[], Tensor], encode: Callable[[Tensor, Tensor], Dict[str, object]],
                error_msgs: List[str]):
    """``state_dict`` with the layer's entries at ``prefix`` in ``own_form`` (``encode(weight,
    mask)``: the entries of that form, without the prefix). The same dict if they already are (or
    are absent); None, with the reason appended to ``error_msgs``, if they cannot be."""
    form = saved_form(state_dict, prefix)
    if form is None or form == own_form:
        return state_dict
    try:
        weight, mask = saved_dense(state_dict, prefix, weight_shape, current_mask)
        entries = encode(weight, mask)
    except (TypeError, ValueError, KeyError) as err:
        layer = prefix[:-1] if prefix else "the layer"
        error_msgs.append(f"{layer}: the checkpoint holds this layer in {form} form, which cannot load into its "
                          f"{own_form} form: {err}")
        return None
    converted = {key: value for key, value in state_dict.items()
                 if not (key.startswith(prefix) and key[len(prefix):] in WEIGHT_ENTRIES)}
    converted.update({prefix + name: value for name, value in entries.items()})
    return converted


def sparse_layer_state(layer, own_form: str, state_dict, prefix: str, error_msgs: List[str]):
    """:func:`in_own_form` for a sparse-form layer: one with ``weight_shape``, ``pattern`` and
    ``_state_entries(weight, mask)`` (its ``values`` and index entries for that weight and mask)."""
    return in_own_form(state_dict, prefix, own_form, tuple(layer.weight_shape),
                       lambda: layer.pattern.mask().view(layer.weight_shape), layer._state_entries, error_msgs)
