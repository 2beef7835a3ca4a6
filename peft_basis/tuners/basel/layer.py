from __future__ import annotations

from typing import Optional

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from ...linalg import Whitener
from ...modules import in_out_features
from ..factorized import FactorizedLayerMixin, dense_is_dropped, drop_dense_weight, factorized_forward


def _sliced(p: nn.Parameter, dim: int, index: torch.Tensor, optimizer) -> nn.Parameter:
    """A new Parameter holding ``p`` restricted to ``index`` along ``dim``. Where ``optimizer`` holds
    ``p``, the new Parameter takes its place in the param group and inherits its state (Adam's moments:
    every tensor of ``p``'s old shape, sliced the same way). A new object, not ``p.data = ...``: autograd
    remembers a leaf's shape, so shrinking it in place breaks the next backward pass."""
    new = nn.Parameter(p.detach().index_select(dim, index.to(p.device)).contiguous(), requires_grad=p.requires_grad)
    if optimizer is None:
        return new
    for group in optimizer.param_groups:
        for i, q in enumerate(group["params"]):
            if q is p:
                group["params"][i] = new
    state = optimizer.state.pop(p, None)
    if state is not None:
        optimizer.state[new] = {
            k: v.index_select(dim, index.to(v.device)).contiguous() if torch.is_tensor(v) and v.shape == p.shape else v
            for k, v in state.items()
        }
    return new


class BaselLayer(FactorizedLayerMixin, nn.Module, BaseTunerLayer):
    """A target Linear under Basel.

    ``train`` phase: ``y = ((x A^T) * w^2) B^T + (x A_add^T) B_add^T + bias`` with ``A`` (``r x d_in``) and
    ``B`` (``d_out x r``) the frozen SVD bases, ``w`` the relearned singular values (``w^2 = s`` at
    init) and ``A_add``/``B_add`` the trainable extra bases. ``factorized`` phase (after
    consolidation): ``y = (x A^T) B^T + bias``, both factors trainable (Basel's part 2).
    """

    adapter_layer_names = ("basel_A", "basel_B", "basel_w", "basel_A_add", "basel_B_add")
    other_param_names = ("basel_phase",)
    method_name, config_name = "Basel", "BaselConfig"

    def __init__(self, base_layer: nn.Module, keep_dense_weight: bool = False):
        super().__init__()
        self.base_layer = base_layer
        self.basel_A = nn.ParameterDict({})
        self.basel_B = nn.ParameterDict({})
        self.basel_w = nn.ParameterDict({})
        self.basel_A_add = nn.ParameterDict({})
        self.basel_B_add = nn.ParameterDict({})
        self.basel_phase: dict[str, str] = {}
        self._original_weight: Optional[torch.Tensor] = None
        self._disable_adapters = False
        self.merged_adapters = []
        self.in_features, self.out_features = in_out_features(base_layer)
        self.keep_dense_weight = keep_dense_weight

    # ---- creation ---------------------------------------------------------------------------------
    def update_layer(self, adapter_name: str, A: torch.Tensor, B: torch.Tensor, w: Optional[torch.Tensor] = None,
                     A_add: Optional[torch.Tensor] = None, B_add: Optional[torch.Tensor] = None) -> None:
        self.basel_A[adapter_name] = nn.Parameter(A)
        self.basel_B[adapter_name] = nn.Parameter(B)
        if w is None:
            self.basel_phase[adapter_name] = "factorized"
        else:
            self.basel_phase[adapter_name] = "train"
            self.basel_w[adapter_name] = nn.Parameter(w)
            self.basel_A_add[adapter_name] = nn.Parameter(A_add)
            self.basel_B_add[adapter_name] = nn.Parameter(B_add)
        if not self.keep_dense_weight and not dense_is_dropped(self.base_layer):
            drop_dense_weight(self.base_layer)
        self.set_adapter([adapter_name])

    def set_adapter(self, adapter_names, inference_mode: bool = False) -> None:
        super().set_adapter(adapter_names, inference_mode=inference_mode)
        # The SVD bases are frozen while Basel re-learns the singular values; trainable once factorised.
        for name in [adapter_names] if isinstance(adapter_names, str) else adapter_names:
            if self.basel_phase.get(name) == "train":
                self.basel_A[name].requires_grad_(False)
                self.basel_B[name].requires_grad_(False)

    def rank(self, adapter_name: str) -> int:
        return self.basel_A[adapter_name].shape[0]

    def phase(self, adapter_name: str) -> str:
        return self.basel_phase[adapter_name]

    def effective_weight(self, adapter_name: str) -> torch.Tensor:
        """``W_eff`` (``d_out x d_in``) of the adapter in its current phase."""
        A, B = self.basel_A[adapter_name], self.basel_B[adapter_name]
        if self.basel_phase[adapter_name] == "factorized":
            return B @ A
        w2 = self.basel_w[adapter_name] ** 2
        return B @ (w2[:, None] * A) + self.basel_B_add[adapter_name] @ self.basel_A_add[adapter_name]

    # ---- pruning and consolidation -------------------------------------------------------------------
    def prune(self, adapter_name: str, keep: torch.Tensor, optimizer=None) -> None:
        """Keep only the bases ``keep`` (indices); the others vanish from memory and compute. Pass the
        (unwrapped torch) optimizer so it trains the shrunk parameters and keeps their state."""
        if self.basel_phase[adapter_name] != "train":
            raise RuntimeError("prune() applies to the training phase; this adapter is already factorised.")
        keep = torch.as_tensor(keep, dtype=torch.long)
        for params, dim in ((self.basel_A, 0), (self.basel_B, 1), (self.basel_w, 0)):
            params[adapter_name] = _sliced(params[adapter_name], dim, keep, optimizer)

    @torch.no_grad()
    def consolidate(self, adapter_name: str, whitener: Optional[Whitener], svd_threshold: float) -> int:
        """Re-factorise ``W_eff`` to the current rank ``r`` (whitened when a whitener is given, so the
        truncation minimises the task's output error), drop ``w`` and the extra bases; returns the rank.

        ``W_eff = [B w^2 | B_add] [A; A_add]`` has rank ``q <= r + r_add``, so the SVD runs on a ``q x q`` core
        after two thin QRs instead of on the ``d_out x d_in`` matrix."""
        if self.basel_phase[adapter_name] != "train":
            return self.rank(adapter_name)
        A = self.basel_A[adapter_name]
        trainable = self.basel_w[adapter_name].requires_grad
        rank = self.rank(adapter_name)
        w2 = self.basel_w[adapter_name].detach().double() ** 2
        left = torch.cat([self.basel_B[adapter_name].detach().double() * w2, self.basel_B_add[adapter_name].detach().double()], 1)
        right = torch.cat([A.detach().double(), self.basel_A_add[adapter_name].detach().double()], 0)
        q_left, r_left = torch.linalg.qr(left)
        # the paper's rule on W_eff's own spectrum: drop numerically-zero directions (mean over all min(d) values)
        plain = torch.linalg.svdvals(r_left @ torch.linalg.qr(right.T)[1].T)
        floor = svd_threshold * plain.sum() / min(self.in_features, self.out_features)
        rank = min(rank, max(1, int((plain >= floor).sum())))
        white_right = right if whitener is None else right @ whitener.matrix.T
        q_right, r_right = torch.linalg.qr(white_right.T)
        u, s, vh = torch.linalg.svd(r_left @ r_right.T)
        coefficient = (q_left @ u[:, :rank]) * s[:rank]
        basis = vh[:rank] @ q_right.T
        if whitener is not None:
            basis = basis @ whitener.inverse.T
        # each direction's norm split evenly between the two factors (same product): the whitened basis alone has
        # rows of norm ~1/sqrt(tokens), so one learning rate for both factors (part 2) would wreck it
        scale = (coefficient.norm(dim=0) / basis.norm(dim=1).clamp_min(1e-300)).sqrt().clamp_min(1e-150)
        coefficient, basis = coefficient / scale, basis * scale[:, None]
        for d in (self.basel_w, self.basel_A_add, self.basel_B_add):
            del d[adapter_name]
        # the factors are the model's weights from now on: in the model's dtype (training may have upcast A to fp32)
        dtype = self.base_layer.weight.dtype if self.base_layer.weight.is_floating_point() else A.dtype
        self.basel_A[adapter_name] = nn.Parameter(basis.to(dtype).contiguous(), requires_grad=trainable)
        self.basel_B[adapter_name] = nn.Parameter(coefficient.to(dtype).contiguous(), requires_grad=trainable)
        self.basel_phase[adapter_name] = "factorized"
        return rank

    def adapter_forward(self, x: torch.Tensor, adapter: str) -> torch.Tensor:
        A, B, bias = self.basel_A[adapter], self.basel_B[adapter], self.base_layer.bias
        if self.basel_phase[adapter] == "factorized":
            return factorized_forward(x, A, B, bias, pad=True)
        dtype = x.dtype
        xc = x.to(A.dtype)
        h = nn.functional.linear(xc, A) * (self.basel_w[adapter] ** 2)
        y = nn.functional.linear(h, B, None if bias is None else bias.to(B.dtype))
        A_add = self.basel_A_add[adapter]
        if A_add.shape[0] > 0:
            y = y + nn.functional.linear(nn.functional.linear(xc, A_add), self.basel_B_add[adapter])
        return y.to(dtype)

    def __repr__(self) -> str:
        return "basel." + super().__repr__()
