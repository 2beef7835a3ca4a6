from __future__ import annotations

from typing import Any, Optional

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from ...modules import in_out_features
from ..factorized import dense_is_dropped, drop_dense_weight, factorized_forward, write_dense_weight


class SharedBasisLayer(nn.Module, BaseTunerLayer):
    """A target Linear of Basis Sharing: per-layer ``sb_coefficient`` (``d_out x k``) times the
    group's shared basis (``k x d_in``), which lives once on the tuner (``sb_bases``) and is looked
    up at every forward, so reloading or re-assigning it never leaves a stale copy here."""

    adapter_layer_names = ("sb_coefficient",)
    other_param_names = ("sb_group", "sb_rank")

    def __init__(self, base_layer: nn.Module, keep_dense_weight: bool = False):
        super().__init__()
        self.base_layer = base_layer
        self.sb_coefficient = nn.ParameterDict({})
        self.sb_group: dict[str, str] = {}
        self.sb_rank: dict[str, int] = {}
        self._sb_bases: dict[str, nn.ParameterDict] = {}  # plain dict: not registered, saved once by the tuner
        self._original_weight: Optional[torch.Tensor] = None
        self._disable_adapters = False
        self.merged_adapters = []
        self.in_features, self.out_features = in_out_features(base_layer)
        self.keep_dense_weight = keep_dense_weight

    def update_layer(self, adapter_name: str, bases: nn.ParameterDict, group: str, coefficient: torch.Tensor):
        self._sb_bases[adapter_name] = bases
        self.sb_group[adapter_name] = group
        self.sb_rank[adapter_name] = coefficient.shape[1]
        self.sb_coefficient[adapter_name] = nn.Parameter(coefficient)
        if not self.keep_dense_weight and not dense_is_dropped(self.base_layer):
            drop_dense_weight(self.base_layer)
        self.set_adapter([adapter_name])

    def basis(self, adapter_name: str) -> torch.Tensor:
        return self._sb_bases[adapter_name][self.sb_group[adapter_name]]

    def factorized_weight(self, adapter_name: str) -> torch.Tensor:
        """The compressed weight, ``d_out x d_in``."""
        return self.sb_coefficient[adapter_name] @ self.basis(adapter_name)

    # ---- merge = decompress ---------------------------------------------------------------------
    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        if self.merged:
            return
        adapter = (adapter_names or self.active_adapters)[0]
        weight = self.factorized_weight(adapter).detach()
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
                "unload() would return a model without these weights: Basis Sharing dropped the dense weights. Use "
                "merge_and_unload() for a dense model, or create the adapter with keep_dense_weight=True."
            )
        return self.get_base_layer()

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            if dense_is_dropped(self.base_layer):
                raise RuntimeError(
                    "The adapter is disabled, but the dense weights were dropped at compression. Create the adapter "
                    "with SharedBasisConfig(keep_dense_weight=True) to compare against the dense model."
                )
            return self.base_layer(x, *args, **kwargs)
        if self.merged:
            return self.base_layer(x, *args, **kwargs)
        adapter = self.active_adapters[0]
        return factorized_forward(x, self.basis(adapter), self.sb_coefficient[adapter], self.base_layer.bias)

    def __repr__(self) -> str:
        return "shared_basis." + super().__repr__()
