"""The factorised Linear of a standalone compressed model, and what a model to save is made of."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from ..tuners.factorized import factorized_forward, pad_factors


class LowRankLinear(nn.Module):
    """``y = (x basis^T) coefficient^T + bias``: a Linear (or GPT-2 ``Conv1D``) stored as two factors,
    ``basis`` (``rank x d_in``) and ``coefficient`` (``d_out x rank``). The members of a Basis Sharing
    group hold the same ``basis`` Parameter. Same forward (``factorized_forward``) as the PEFT layers,
    so the logits equal those of the adapter model it was saved from."""

    def __init__(self, basis: nn.Parameter, coefficient: nn.Parameter, bias: Optional[nn.Parameter],
                 basis_name: str):
        super().__init__()
        if coefficient.shape[1] != basis.shape[0]:
            raise ValueError(f"coefficient {tuple(coefficient.shape)} does not match basis {tuple(basis.shape)}.")
        self.basis = basis
        self.coefficient = coefficient
        self.bias = bias
        self.basis_name = basis_name  # the basis' tensor name in the checkpoint (shared ones are stored once)
        self.in_features, self.out_features = basis.shape[1], coefficient.shape[0]

    @property
    def rank(self) -> int:
        return self.basis.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return factorized_forward(x, self.basis, self.coefficient, self.bias)  # padded copies: ``pad_ranks``

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
                f"bias={self.bias is not None}, basis={self.basis_name}")


def pad_ranks(model: nn.Module, multiple: int) -> int:
    """Let every factorised module run its many-token products at its rank rounded up to ``multiple``, with
    zero rows in the basis and zero columns in the coefficient: the same products (the padding adds exact
    zeros), on the tiles that the kernels run at full speed (``peft_basis.tuners.factorized.pad_factors``).
    ``basis`` and ``coefficient`` stay the same Parameters, views of the unpadded part, so parameter counts,
    ``state_dict`` and saved checkpoints are unchanged; decoding (few tokens) uses the views. A basis shared by
    several modules is padded once. A cast or a move (``.to``) drops the padding; call this again after it.
    Returns how many elements the padding added."""
    if multiple <= 1:
        return 0
    return sum(pad_factors(m.basis, m.coefficient, multiple) for m in model.modules() if isinstance(m, LowRankLinear))


@dataclass
class Factorized:
    """One factorised module of a model to save: its basis (possibly shared, then ``basis_name`` is the
    group's), its coefficient and its bias."""

    name: str
    basis_name: str
    basis: torch.Tensor
    coefficient: torch.Tensor
    bias: Optional[torch.Tensor]


def factorized_modules(model: nn.Module, adapter_name: str) -> dict[str, Factorized]:
    """Every factorised module of ``model`` (the transformers model under a PEFT tuner, or one loaded by
    ``CompressedModel``), by module name. Raises where a module holds something the format cannot store."""
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils import ModulesToSaveWrapper

    from ..tuners.basel.layer import BaselLayer
    from ..tuners.shared_basis.layer import SharedBasisLayer

    out: dict[str, Factorized] = {}
    for name, m in model.named_modules():
        if isinstance(m, SharedBasisLayer):
            group = m.sb_group[adapter_name]
            out[name] = Factorized(name, f"shared_bases.{group}", m.basis(adapter_name),
                                   m.sb_coefficient[adapter_name], m.base_layer.bias)
        elif isinstance(m, BaselLayer):
            if m.phase(adapter_name) != "factorized":
                raise ValueError(
                    f"{name} is a Basel layer still in its training phase (singular values and extra bases, not two "
                    "factors). Consolidate first: `peft_model.base_model.consolidate()` (training to the end of the "
                    "schedule does it), then save_compressed."
                )
            out[name] = Factorized(name, f"{name}.basis", m.basel_A[adapter_name], m.basel_B[adapter_name],
                                   m.base_layer.bias)
        elif isinstance(m, LowRankLinear):
            out[name] = Factorized(name, m.basis_name, m.basis, m.coefficient, m.bias)
        elif isinstance(m, (BaseTunerLayer, ModulesToSaveWrapper)):
            raise ValueError(
                f"{name} holds a {type(m).__name__}, which a compressed checkpoint cannot store: it stores a Basis "
                "Sharing or consolidated Basel adapter alone. Merge other adapters into the base model first "
                "(`merge_and_unload()`), or save them with `save_pretrained`."
            )
    return out
