from __future__ import annotations

import torch
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from torch import nn
from transformers.pytorch_utils import Conv1D

from ...modules import in_out_features
from ...validation import all_finite


class BasisLayer(nn.Module, BaseTunerLayer):
    """A target Linear/Conv1D under BASIS: ``y = base(x) + x (U M R)^T`` per active adapter.

    ``basis_R`` (``r x d_in``: input directions, white on the calibration data) and ``basis_U``
    (``d_out x r``: orthonormal output directions) are frozen; ``basis_core`` is the only trainable tensor
    and starts at zero. Its shape is the trainable shape: ``d_out x r`` (``"output"``: ``Delta W = M R``, no
    ``U`` stored), ``r x d_in`` (``"input"``: ``Delta W = U M``, no ``R`` stored), ``r x r`` (``"core"``) or
    ``r`` (``"diagonal"``, ``U diag(M) R``). A missing ``U`` or ``R`` acts as the identity. The ``"output"``
    and ``"input"`` shapes scale the update by ``alpha / r`` (``basis_scaling``). The base layer is
    never modified except while merged (``W + Delta W``, undone exactly by ``unmerge`` up to float rounding).
    """

    adapter_layer_names = ("basis_core",)
    other_param_names = ("basis_U", "basis_R")

    def __init__(self, base_layer: nn.Module):
        super().__init__()
        self.base_layer = base_layer
        self.basis_core = nn.ParameterDict({})
        self.basis_U = nn.ParameterDict({})
        self.basis_R = nn.ParameterDict({})
        self.basis_scaling: dict[str, float] = {}  # alpha / r for the "output"/"input" shapes, else 1
        self._disable_adapters = False
        self.merged_adapters = []
        self.in_features, self.out_features = in_out_features(base_layer)

    def update_layer(self, adapter_name: str, U: torch.Tensor | None, R: torch.Tensor | None,
                     core: torch.Tensor, scaling: float = 1.0) -> None:
        self.basis_scaling[adapter_name] = float(scaling)
        for store, value in ((self.basis_U, U), (self.basis_R, R)):
            if value is not None:
                store[adapter_name] = nn.Parameter(value, requires_grad=False)
            elif adapter_name in store:
                del store[adapter_name]
        self.basis_core[adapter_name] = nn.Parameter(core)
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters)

    def rank(self, adapter_name: str) -> int:
        if adapter_name in self.basis_R:
            return self.basis_R[adapter_name].shape[0]
        return self.basis_U[adapter_name].shape[1]

    def core_matrix(self, adapter_name: str) -> torch.Tensor:
        core = self.basis_core[adapter_name]
        return torch.diag(core) if core.dim() == 1 else core

    def delta_weight(self, adapter_name: str) -> torch.Tensor:
        """``U M R`` as ``d_out x d_in`` (a missing ``U`` or ``R`` is the identity)."""
        delta = self.core_matrix(adapter_name)
        if adapter_name in self.basis_U:
            delta = self.basis_U[adapter_name] @ delta.to(self.basis_U[adapter_name].dtype)
        if adapter_name in self.basis_R:
            delta = delta.to(self.basis_R[adapter_name].dtype) @ self.basis_R[adapter_name]
        return delta * self.basis_scaling.get(adapter_name, 1.0)

    # ---- merge ---------------------------------------------------------------------------------------
    def _delta_as_weight(self, adapter_name: str, dtype: torch.dtype) -> torch.Tensor:
        delta = self.delta_weight(adapter_name).detach().to(dtype)
        return delta.T if isinstance(self.get_base_layer(), Conv1D) else delta

    def _apply_delta(self, adapter_name: str, sign: float, safe_merge: bool = False) -> None:
        weight = self.get_base_layer().weight
        delta = self._delta_as_weight(adapter_name, weight.dtype)
        if safe_merge:
            new = weight.data + sign * delta
            if not all_finite(new):
                raise ValueError(f"NaNs in the BASIS adapter {adapter_name}; refusing to merge.")
            weight.data = new
        else:
            weight.data += sign * delta

    def merge_is_finite(self, adapter_names=None) -> bool:
        """Whether merging ``adapter_names`` (default: the active ones not merged yet) keeps the weight finite;
        nothing is changed (the tuner asks every layer before it merges any)."""
        weight = self.get_base_layer().weight.detach()
        new = weight
        for name in adapter_names or self.active_adapters:
            if name in self.basis_core and name not in self.merged_adapters:
                new = new + self._delta_as_weight(name, weight.dtype)
        return new is weight or all_finite(new)

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
            core = self.basis_core[name]
            h = x.to(core.dtype)
            if name in self.basis_R:
                h = nn.functional.linear(h, self.basis_R[name])  # white coordinates of x in the subspace
            h = h * core if core.dim() == 1 else nn.functional.linear(h, core)
            if name in self.basis_U:
                h = nn.functional.linear(h, self.basis_U[name])
            scaling = self.basis_scaling.get(name, 1.0)
            if scaling != 1.0:
                h = h * scaling
            result = result + h.to(result.dtype)
        return result

    def __repr__(self) -> str:
        return "basis." + super().__repr__()
