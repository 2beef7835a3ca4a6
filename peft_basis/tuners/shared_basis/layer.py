from __future__ import annotations

from typing import Optional

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from ...linalg import GroupFactors
from ...modules import in_out_features
from ..factorized import FactorizedLayerMixin, aligned_rows, dense_is_dropped, drop_dense_weight, factorized_forward


def saved_basis_name(group_key: str) -> str:
    """The name of a shared basis in ``adapter_model.safetensors`` (it lives on the tuner, ``sb_bases``)."""
    return f"base_model.sb_bases.{group_key}"


def saved_coefficient_name(module_name: str) -> str:
    """The name of a module's coefficient in ``adapter_model.safetensors`` (PEFT strips the adapter name)."""
    return f"base_model.model.{module_name}.sb_coefficient"


def in_layer_layout(f: GroupFactors, dtype: torch.dtype) -> GroupFactors:
    """The factors as the layers hold them: in the model's ``dtype``, coefficient rows on cache lines
    (``aligned_rows``). Run where the factors were made (a decomposition worker): glibc keeps a heap per thread,
    so copies made in the main thread would grow its heap while the originals' memory stays with the worker's."""
    return GroupFactors(f.basis.to(dtype), [aligned_rows(c, dtype) for c in f.coefficients], f.eigenvalues)


class SharedBasisLayer(FactorizedLayerMixin, nn.Module, BaseTunerLayer):
    """A target Linear of Basis Sharing: per-layer ``sb_coefficient`` (``d_out x k``) times the
    group's shared basis (``k x d_in``), which lives once on the tuner (``sb_bases``) and is looked
    up at every forward, so reloading or re-assigning it never leaves a stale copy here."""

    adapter_layer_names = ("sb_coefficient",)
    other_param_names = ("sb_group", "sb_rank")
    method_name, config_name = "Basis Sharing", "SharedBasisConfig"

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
        self.sb_coefficient[adapter_name] = nn.Parameter(aligned_rows(coefficient))  # rows on cache lines: faster decoding
        if not self.keep_dense_weight and not dense_is_dropped(self.base_layer):
            drop_dense_weight(self.base_layer)
        self.set_adapter([adapter_name])

    def basis(self, adapter_name: str) -> torch.Tensor:
        return self._sb_bases[adapter_name][self.sb_group[adapter_name]]

    def effective_weight(self, adapter_name: str) -> torch.Tensor:
        """The compressed weight, ``d_out x d_in``."""
        return self.sb_coefficient[adapter_name] @ self.basis(adapter_name)

    def adapter_forward(self, x: torch.Tensor, adapter_name: str) -> torch.Tensor:
        # pad=True: the shared basis and this coefficient get zero-padded copies at the first many-token
        # forward without gradients (``pad_factors``), on which such products run faster
        return factorized_forward(x, self.basis(adapter_name), self.sb_coefficient[adapter_name], self.base_layer.bias,
                                  pad=True)

    def __repr__(self) -> str:
        return "shared_basis." + super().__repr__()
