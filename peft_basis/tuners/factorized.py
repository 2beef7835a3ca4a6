"""A Linear replaced by low-rank factors ``y = (x basis^T) coefficient^T + bias``.

Shared by the compression methods (Basis Sharing, Basel's export): the dense weight is dropped
(assigned a zero-size tensor, which also bypasses ``init_empty_weights``' patched
``register_parameter``), so the model really is smaller; ``merge`` writes ``coefficient @ basis``
back into it, which is what ``merge_and_unload`` ("decompress") returns.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from ..memory import release_pages
from ..validation import all_finite


def drop_dense_weight(base_layer: nn.Module) -> None:
    """Replace the dense weight by an empty one; the pages it held from a mapped checkpoint go back to the system."""
    w = base_layer.weight
    release_pages(w)
    base_layer._parameters["weight"] = nn.Parameter(torch.empty(0, dtype=w.dtype, device=w.device), requires_grad=False)


def dense_is_dropped(base_layer: nn.Module) -> bool:
    return base_layer.weight.numel() == 0


def write_dense_weight(base_layer: nn.Module, weight_out_in: torch.Tensor) -> None:
    """Set the base layer's weight from a ``d_out x d_in`` matrix (transposed for Conv1D)."""
    w = weight_out_in.T if isinstance(base_layer, Conv1D) else weight_out_in
    old = base_layer.weight
    dtype = old.dtype if old.is_floating_point() else weight_out_in.dtype
    base_layer._parameters["weight"] = nn.Parameter(w.detach().to(dtype).contiguous(), requires_grad=False)


# From this many tokens on, a float32 product whose rank is not a multiple of the vector width (16 floats on
# AVX-512) computes the first product as ``basis @ x^T`` (the rank is the GEMM's row count) rather than
# ``x @ basis^T`` (the rank its column count): BLAS kernels run an odd column count at a visible loss, an odd row
# count nearly free. A rank that is a multiple of 16 runs fastest in the plain order, which is why the factors
# are padded (``pad_factors``): eagerly by ``CompressedModel.from_pretrained``, at the first many-token forward
# without gradients by the PEFT layers; the transposed order is for the ranks nobody padded. Below it
# (decoding) the products are matrix-vector ones, where the plain form is as fast and the transposes only cost
# dispatch time. Not for bfloat16: oneDNN's AMX kernels run the transposed pair slower than the plain one, and
# want the rank a multiple of 32 instead.
TRANSPOSED_MIN_TOKENS = 32
PLAIN_PRODUCT_RANK_MULTIPLE = 16
PLAIN_PRODUCT_DTYPES = (torch.bfloat16,)
# Few-token (decoding) bfloat16 products on the CPU skip oneDNN: its matrix-vector products pay a fixed cost per
# call (about 20 us) that ATen's own kernels do not, and the factorised Linear makes two calls where the dense one
# makes one. The switch is torch's global one, set around the two products and restored.
_ONEDNN_SWITCH = hasattr(torch._C, "_get_mkldnn_enabled") and hasattr(torch._C, "_set_mkldnn_enabled")
# The attribute on a padded factor Parameter that records its padding (see ``pad_factor``).
_PADDING_ATTR = "_peft_basis_padding"


def default_rank_multiple(dtype: torch.dtype, device: torch.device) -> int:
    """32 where the matrix units work in tiles (bfloat16: CPU AMX, GPU tensor cores; float16 on a GPU); else 16,
    the vector width of AVX-512 kernels in float32 (``PLAIN_PRODUCT_RANK_MULTIPLE``)."""
    if dtype == torch.bfloat16 or (dtype == torch.float16 and device.type == "cuda"):
        return 32
    return PLAIN_PRODUCT_RANK_MULTIPLE


# Rows of a factor start on this byte boundary (a cache line): see ``aligned_rows``.
ROW_ALIGNMENT_BYTES = 64


def _aligned_stride(columns: int, element_size: int) -> int:
    """The row stride, in elements, that starts every row of ``columns`` elements on a 64-byte boundary."""
    step = max(ROW_ALIGNMENT_BYTES // element_size, 1)
    return -(-columns // step) * step


def aligned_rows(t: torch.Tensor, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """``t`` (2-D) with each row starting on a 64-byte boundary: itself when its rows already do, otherwise a
    view into zero-padded storage (same values and shape, row stride rounded up; at most 15 float32 of padding
    per row). Why: a coefficient ``d_out x rank`` has rows of ``rank`` floats, rarely a multiple of 16, and
    the matrix-vector products of decoding stream misaligned rows measurably slower. Saving copies it back to
    contiguous (PEFT and ``save_compressed`` both do), so checkpoints are unchanged. ``dtype``: the result's,
    cast on the way into the padded storage (one copy, not a cast and then an aligned copy)."""
    dtype = t.dtype if dtype is None else dtype
    if t.dim() != 2 or t.shape[0] <= 1 or t.shape[1] == 0:
        return t.to(dtype)
    if (dtype == t.dtype and t.stride(1) == 1 and t.stride(0) >= t.shape[1] and t.data_ptr() % ROW_ALIGNMENT_BYTES == 0
            and (t.stride(0) * t.element_size()) % ROW_ALIGNMENT_BYTES == 0):  # aligned already (contiguous, or a view)
        return t
    stride = _aligned_stride(t.shape[1], dtype.itemsize)
    if dtype != t.dtype and stride == t.shape[1]:
        return t.to(dtype, memory_format=torch.contiguous_format)  # rows of whole cache lines: aligned as allocated
    with torch.no_grad():
        storage = t.new_zeros(t.shape[0], stride, dtype=dtype)
        storage[:, : t.shape[1]] = t
    return storage[:, : t.shape[1]]


def padded_view(factor: torch.Tensor) -> Optional[torch.Tensor]:
    """The zero-padded factor that ``factor`` (a Parameter padded by ``pad_factor``) is a view of, or None where
    it was not padded or its data changed since (a cast, a move, ``.data`` assigned: the record no longer
    describes it)."""
    record = getattr(factor, _PADDING_ATTR, None)
    if record is None:
        return None
    shape, stride, pointer, nbytes, padded_shape, padded_stride = record
    if (factor.data_ptr() != pointer or factor.shape != shape or factor.stride() != stride
            or factor.untyped_storage().nbytes() != nbytes):
        return None
    return factor.detach().as_strided(padded_shape, padded_stride)


def pad_factor(factor: nn.Parameter, rank_dim: int, multiple: int) -> int:
    """Make ``factor``'s data a view of a copy whose rank dimension (0 for a basis ``rank x d_in``, 1 for a
    coefficient ``d_out x rank``) is rounded up to ``multiple`` with zeros; ``padded_view`` returns that copy.
    The Parameter stays the same object with the same shape and values (optimisers, shared bases and
    ``state_dict`` see nothing), and saving writes only the view. A coefficient's rows also start on cache
    lines (``aligned_rows``). Returns the elements added; 0 where the rank, or its padding, is a multiple
    already."""
    current = padded_view(factor)
    if factor.dim() != 2 or factor.device.type == "meta" or (current is not None and current.shape[rank_dim] % multiple == 0):
        return 0
    rank = factor.shape[rank_dim]
    padded = -(-rank // multiple) * multiple
    if rank == 0 or padded == rank:
        return 0
    if rank_dim == 0:
        rows, cols, stride = padded, factor.shape[1], factor.shape[1]
    else:
        rows, cols, stride = factor.shape[0], padded, _aligned_stride(padded, factor.element_size())
    # outside inference mode: a factor padded during ``torch.inference_mode`` must still train afterwards
    with torch.inference_mode(False), torch.no_grad():
        storage = factor.new_zeros(rows, stride)
        storage[: factor.shape[0], : factor.shape[1]] = factor
        release_pages(factor.data)  # a factor read from a mapped checkpoint: its pages are not needed any more
        factor.data = storage[: factor.shape[0], : factor.shape[1]]
    setattr(factor, _PADDING_ATTR, (factor.shape, factor.stride(), factor.data_ptr(), storage.untyped_storage().nbytes(),
                                    (rows, cols), (stride, 1)))
    return storage.numel() - factor.numel()


def pad_factors(basis: nn.Parameter, coefficient: nn.Parameter, multiple: int) -> int:
    """``pad_factor`` on a module's pair (a shared basis is padded by its first member only)."""
    return pad_factor(basis, 0, multiple) + pad_factor(coefficient, 1, multiple)


def _uses_padding(tokens: int, basis: torch.Tensor, coefficient: torch.Tensor) -> bool:
    """Many tokens, and no gradient to compute for the factors: the padded copies would not get it."""
    return tokens >= TRANSPOSED_MIN_TOKENS and not (
        torch.is_grad_enabled() and (basis.requires_grad or coefficient.requires_grad))


def factorized_forward(x: torch.Tensor, basis: torch.Tensor, coefficient: torch.Tensor, bias,
                       pad: bool = False) -> torch.Tensor:
    """``(x basis^T) coefficient^T + bias`` in the factors' dtype, returned in ``x``'s. Every factorised
    module runs this one function, so the PEFT layers and the standalone model give bitwise equal outputs.
    Many-token products without gradients run on the factors' zero-padded copies where they have them
    (``pad_factors``; the same values); ``pad=True`` pads them first (the rank multiple per dtype and device)."""
    dtype = x.dtype
    if dtype != basis.dtype:
        x = x.to(basis.dtype)
    if bias is not None and bias.dtype != coefficient.dtype:
        bias = bias.to(coefficient.dtype)
    d_in = x.shape[-1]
    tokens = x.numel() // d_in if d_in else 0
    if _uses_padding(tokens, basis, coefficient):
        padded_basis, padded_coefficient = padded_view(basis), padded_view(coefficient)
        if ((padded_basis is None or padded_coefficient is None) and pad and isinstance(basis, nn.Parameter)
                and isinstance(coefficient, nn.Parameter)
                and pad_factors(basis, coefficient, default_rank_multiple(basis.dtype, basis.device))):
            padded_basis, padded_coefficient = padded_view(basis), padded_view(coefficient)
        if (padded_basis is not None and padded_coefficient is not None
                and padded_basis.shape[0] == padded_coefficient.shape[1]):
            basis, coefficient = padded_basis, padded_coefficient
    if (tokens >= TRANSPOSED_MIN_TOKENS and basis.dtype not in PLAIN_PRODUCT_DTYPES
            and basis.shape[0] % PLAIN_PRODUCT_RANK_MULTIPLE):
        h = torch.mm(basis, x.reshape(tokens, d_in).T).T  # rank x tokens, transposed back as a view
        if h.dtype != coefficient.dtype:  # a base-dtype basis shared by adapter-dtype coefficients
            h = h.to(coefficient.dtype)
        y = torch.mm(h, coefficient.T) if bias is None else torch.addmm(bias, h, coefficient.T)
        y = y.view(*x.shape[:-1], coefficient.shape[0])
    elif tokens < TRANSPOSED_MIN_TOKENS and _ONEDNN_SWITCH and basis.dtype in PLAIN_PRODUCT_DTYPES and basis.device.type == "cpu":
        enabled = torch._C._get_mkldnn_enabled()
        torch._C._set_mkldnn_enabled(False)
        try:
            y = _two_linears(x, basis, coefficient, bias)
        finally:
            torch._C._set_mkldnn_enabled(enabled)
    else:
        y = _two_linears(x, basis, coefficient, bias)
    return y if y.dtype == dtype else y.to(dtype)


def _two_linears(x: torch.Tensor, basis: torch.Tensor, coefficient: torch.Tensor, bias) -> torch.Tensor:
    h = nn.functional.linear(x, basis)
    return nn.functional.linear(h if h.dtype == coefficient.dtype else h.to(coefficient.dtype), coefficient, bias)


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

    def merge_is_finite(self, adapter_names=None) -> bool:
        """Whether the merged weight would be finite; nothing is changed (the tuner asks every layer before it
        merges any)."""
        return self.merged or all_finite(self.effective_weight((adapter_names or self.active_adapters)[0]).detach())

    def merge(self, safe_merge: bool = False, adapter_names=None) -> None:
        if self.merged:
            return
        adapter = (adapter_names or self.active_adapters)[0]
        weight = self.effective_weight(adapter).detach()
        if safe_merge and not all_finite(weight):
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
