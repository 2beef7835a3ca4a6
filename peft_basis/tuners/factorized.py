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
    y = nn.functional.linear(h.to(coefficient.dtype), coefficient, None if bias is None else bias.to(coefficient.dtype))
    return y.to(dtype)


class FactorizedLayerMixin:
    """Merge (= decompress), unmerge, unload and the disabled/merged forward of a tuner layer whose
    adapter REPLACES the dense weight (Basis Sharing, Basel). A subclass provides ``effective_weight``
    (``d_out x d_in``) and ``adapter_forward``; ``method_name``/``config_name`` word its errors."""

    method_name = "this method"
    config_name = "the config"

    def effective_weight(self, adapter_name: str) -> torch.Tensor:
        raise NotImplementedError

    def adapter_forward(self, x: torch.Tensor, adapter_name: str) -> torch.Tensor:
        raise NotImplementedError

    def merge(self, safe_merge: bool = False, adapter_names=None) -> None:
        if self.merged:
            return
        adapter = (adapter_names or self.active_adapters)[0]
        weight = self.effective_weight(adapter).detach()
        if safe_merge and not torch.isfinite(weight).all():
            raise ValueError(f"NaNs in the factors of adapter {adapter}; refusing to merge.")
        if not dense_is_dropped(self.base_layer):
            self._original_weight = self.base_layer.weight
        write_dense_weight(self.base_layer, weight)
        self.merged_adapters.append(adapter)

    def unmerge(self) -> None:
        if not self.merged:
            return
        if self._original_weight is not None:
            self.base_layer._parameters["weight"] = self._original_weight
            self._original_weight = None
        else:
            drop_dense_weight(self.base_layer)
        self.merged_adapters.clear()

    def unload_and_optionally_merge_module(self, merge: bool, safe_merge: bool, adapter_names) -> nn.Module:
        if merge:
            self.merge(safe_merge=safe_merge, adapter_names=adapter_names)
        elif dense_is_dropped(self.base_layer):
            raise ValueError(
                f"unload() would return a model without these weights: {self.method_name} dropped the dense weights. "
                f"Use merge_and_unload() (decompress) for a dense model, or create the adapter with "
                f"{self.config_name}(keep_dense_weight=True)."
            )
        return self.get_base_layer()

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            if dense_is_dropped(self.base_layer):
                raise RuntimeError(
                    "The adapter is disabled, but the dense weights were dropped. Create the adapter with "
                    f"{self.config_name}(keep_dense_weight=True) to compare against the dense model."
                )
            return self.base_layer(x, *args, **kwargs)
        if self.merged:
            return self.base_layer(x, *args, **kwargs)
        return self.adapter_forward(x, self.active_adapters[0])
