from __future__ import annotations

import torch
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from torch import nn
from transformers.pytorch_utils import Conv1D

from ...modules import in_out_features


class BasisLayer(nn.Module, BaseTunerLayer):
    """A target Linear/Conv1D under BASIS: ``y = base(x) + ((x R^T) M^T) U^T`` per active adapter.

    ``basis_R`` (``r x d_in``: input directions, white on the calibration data) and ``basis_U``
    (``d_out x r``: orthonormal output directions) are frozen; ``basis_core`` (``r x r``, or ``r`` for a
    diagonal core) is the only trainable tensor and starts at zero. The base layer is never modified
    except while merged (``W + U M R``, undone exactly by ``unmerge`` up to float rounding).
    """

    adapter_layer_names = ("basis_core",)
    other_param_names = ("basis_U", "basis_R")

    def __init__(self, base_layer: nn.Module):
        super().__init__()
        self.base_layer = base_layer
        self.basis_core = nn.ParameterDict({})
        self.basis_U = nn.ParameterDict({})
        self.basis_R = nn.ParameterDict({})
        self._disable_adapters = False
        self.merged_adapters = []
        self.in_features, self.out_features = in_out_features(base_layer)

    def update_layer(self, adapter_name: str, U: torch.Tensor, R: torch.Tensor, core: torch.Tensor) -> None:
        self.basis_U[adapter_name] = nn.Parameter(U, requires_grad=False)
        self.basis_R[adapter_name] = nn.Parameter(R, requires_grad=False)
        self.basis_core[adapter_name] = nn.Parameter(core)
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters)

    def rank(self, adapter_name: str) -> int:
        return self.basis_R[adapter_name].shape[0]

    def core_matrix(self, adapter_name: str) -> torch.Tensor:
        core = self.basis_core[adapter_name]
        return torch.diag(core) if core.dim() == 1 else core

    def delta_weight(self, adapter_name: str) -> torch.Tensor:
        """``U M R`` as ``d_out x d_in``."""
        U, R = self.basis_U[adapter_name], self.basis_R[adapter_name]
        return U @ self.core_matrix(adapter_name).to(U.dtype) @ R

    # ---- merge ---------------------------------------------------------------------------------------
    def _apply_delta(self, adapter_name: str, sign: float, safe_merge: bool = False) -> None:
        weight = self.get_base_layer().weight
        delta = self.delta_weight(adapter_name).detach().to(weight.dtype)
        if isinstance(self.get_base_layer(), Conv1D):
            delta = delta.T
        if safe_merge:
            new = weight.data + sign * delta
            if not torch.isfinite(new).all():
                raise ValueError(f"NaNs in the BASIS adapter {adapter_name}; refusing to merge.")
            weight.data = new
        else:
            weight.data += sign * delta

    def merge(self, safe_merge: bool = False, adapter_names=None) -> None:
        adapter_names = check_adapters_to_merge(self, adapter_names)
        for name in adapter_names:
            if name in self.basis_core:
                self._apply_delta(name, 1.0, safe_merge)
                self.merged_adapters.append(name)

    def unmerge(self) -> None:
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            if name in self.basis_core:
                self._apply_delta(name, -1.0)

    # ---- forward -------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        if self.merged:
            return self.base_layer(x, *args, **kwargs)
        result = self.base_layer(x, *args, **kwargs)
        for name in self.active_adapters:
            if name not in self.basis_core:
                continue
            core, U, R = self.basis_core[name], self.basis_U[name], self.basis_R[name]
            h = nn.functional.linear(x.to(R.dtype), R)  # white coordinates of x in the subspace
            h = h * core.to(h.dtype) if core.dim() == 1 else nn.functional.linear(h, core.to(h.dtype))
            result = result + nn.functional.linear(h, U).to(result.dtype)
        return result

    def __repr__(self) -> str:
        return "basis." + super().__repr__()
