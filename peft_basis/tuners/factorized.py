"""A Linear replaced by low-rank factors ``y = (x basis^T) coefficient^T + bias``.

Shared by the compression methods (Basis Sharing, Basel's export): the dense weight is dropped
(assigned a zero-size tensor, which also bypasses ``init_empty_weights``' patched
``register_parameter``), so the model really is smaller; ``merge`` writes ``coefficient @ basis``
back into it, which is what ``merge_and_unload`` ("decompress") returns.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D


def drop_dense_weight(base_layer: nn.Module) -> None:
    w = base_layer.weight
    base_layer._parameters["weight"] = nn.Parameter(torch.empty(0, dtype=w.dtype, device=w.device), requires_grad=False)


def dense_is_dropped(base_layer: nn.Module) -> bool:
    return base_layer.weight.numel() == 0


def write_dense_weight(base_layer: nn.Module, weight_out_in: torch.Tensor) -> None:
    """Set the base layer's weight from a ``d_out x d_in`` matrix (transposed for Conv1D)."""
    w = weight_out_in.T if isinstance(base_layer, Conv1D) else weight_out_in
    old = base_layer.weight
    dtype = old.dtype if old.is_floating_point() else weight_out_in.dtype
    base_layer._parameters["weight"] = nn.Parameter(w.detach().to(dtype).contiguous(), requires_grad=False)


def factorized_forward(x: torch.Tensor, basis: torch.Tensor, coefficient: torch.Tensor, bias) -> torch.Tensor:
    dtype = x.dtype
    h = nn.functional.linear(x.to(basis.dtype), basis)
    y = nn.functional.linear(h, coefficient, None if bias is None else bias.to(coefficient.dtype))
    return y.to(dtype)
