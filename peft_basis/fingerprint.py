"""A fingerprint of a base model's weights, recorded in adapters (``base_model_fingerprint`` in
``adapter_config.json``) and calibration statistics (``meta``), and checked when they are used, so an
adapter or statistics made on another model of the same architecture are refused instead of silently
giving wrong outputs.

What it holds: for a few weight tensors that the adapter does NOT replace (the input embedding first, then
evenly spaced others; the targets of the adapter are left out, since compression drops them and lean
loading never reads them), a few values at fixed positions and the tensor's sum of squares (float64).
A model in the dtype it was recorded in must match the sampled values exactly and the sums to 1e-6; in
another dtype (an fp32 adapter on an fp16 model) the values and sums must agree to that dtype's rounding.

``PEFT_BASIS_BASE_MODEL_CHECK=warn`` turns a refusal into a warning, ``=off`` skips the check.
"""

from __future__ import annotations

import os
import warnings

import torch
from torch import nn

from .errors import BaseModelMismatchError

__all__ = ["check_fingerprint", "model_fingerprint"]

VERSION = 1
MAX_TENSORS = 6
SAMPLES = 8
CHUNK = 1 << 20
# relative tolerance across dtypes: float16 / bfloat16 round each value by at most 2^-11 / 2^-8
CROSS_DTYPE_RTOL = 2.0**-7
SAME_DTYPE_RTOL = 1e-6
SUM_CROSS_DTYPE_RTOL = 1e-3


def _sum_squares(t: torch.Tensor) -> float:
    flat = t.detach().reshape(-1)
    total = 0.0
    for i in range(0, flat.numel(), CHUNK):
        total += float(flat[i : i + CHUNK].double().square().sum())
    return total


def _positions(n: int) -> list[int]:
    return sorted({round(i * (n - 1) / (SAMPLES - 1)) for i in range(SAMPLES)}) if n > 1 else [0]


def _candidates(model: nn.Module, exclude_modules, meta_ok: bool = False) -> dict[str, torch.Tensor]:
    """Floating parameters outside ``exclude_modules`` and outside any PEFT tuner layer, by name."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    skip = set(exclude_modules)
    skip |= {n for n, m in model.named_modules() if isinstance(m, BaseTunerLayer)}
    out = {}
    for name, p in model.named_parameters():
        owner = name.rpartition(".")[0]
        if any(owner == s or owner.startswith(s + ".") for s in skip):
            continue
        if p.is_floating_point() and (meta_ok or p.device.type != "meta") and p.numel() > 0 and 0 not in p.stride():
            out[name] = p
    return out


def model_fingerprint(model: nn.Module, exclude_modules=(), read=None) -> dict | None:
    """The fingerprint of ``model`` (see the module docstring); ``None`` when it has no real weights to read.
    ``read(name)``: where the tensors come from for a model on the meta device (a checkpoint's reader)."""
    params = _candidates(model, exclude_modules, meta_ok=read is not None)
    if not params:
        return None
    names = sorted(params)
    emb = getattr(model, "get_input_embeddings", lambda: None)()
    first = [n for n in names if emb is not None and params[n] is getattr(emb, "weight", None)]
    rest = [n for n in names if n not in first]
    k = MAX_TENSORS - len(first)
    picked = first + ([rest[round(i * (len(rest) - 1) / max(k - 1, 1))] for i in range(k)] if len(rest) > k else rest)
    tensors = {}
    with torch.no_grad():
        for n in dict.fromkeys(picked):
            t = params[n] if read is None or params[n].device.type != "meta" else read(n).to(params[n].dtype)
            flat = t.detach().reshape(-1)
            tensors[n] = {"shape": list(t.shape), "values": [float(flat[i]) for i in _positions(flat.numel())],
                          "sum_squares": _sum_squares(t)}
    dtype = str(params[picked[0]].dtype).replace("torch.", "")
    return {"version": VERSION, "dtype": dtype, "tensors": tensors}


def _lookup(model: nn.Module, name: str) -> torch.Tensor | None:
    params = dict(model.named_parameters(remove_duplicate=False))
    if name in params:
        return params[name]
    owner, _, leaf = name.rpartition(".")
    return params.get(f"{owner}.base_layer.{leaf}")  # the module was wrapped by another adapter since


def _close(a: float, b: float, rtol: float) -> bool:
    return abs(a - b) <= rtol * max(abs(a), abs(b)) + 1e-30


def mismatch(recorded: dict, model: nn.Module) -> str | None:
    """Why ``model`` does not match ``recorded`` (``None``: it matches, or there is nothing to compare)."""
    if not recorded or recorded.get("version") != VERSION:
        return None
    same_dtype = None
    for name, rec in recorded["tensors"].items():
        t = _lookup(model, name)
        if t is None:
            return f"it has no weight named {name}"
        if t.device.type == "meta" or 0 in t.stride():
            continue
        if list(t.shape) != rec["shape"]:
            return f"{name} has shape {list(t.shape)}, not {rec['shape']}"
        if same_dtype is None:
            same_dtype = str(t.dtype).replace("torch.", "") == recorded["dtype"]
        rtol = SAME_DTYPE_RTOL if same_dtype else CROSS_DTYPE_RTOL
        with torch.no_grad():
            flat = t.detach().reshape(-1)
            values = [float(flat[i]) for i in _positions(flat.numel())]
            if same_dtype and values != rec["values"] or not all(_close(a, b, rtol) for a, b in zip(values, rec["values"])):
                return f"{name} holds other values"
            srtol = SAME_DTYPE_RTOL if same_dtype else SUM_CROSS_DTYPE_RTOL
            if not _close(_sum_squares(t), rec["sum_squares"], srtol):
                return f"{name} holds other values (sum of squares)"
    return None


def check_fingerprint(recorded: dict | None, model: nn.Module, what: str, fix: str) -> None:
    """Refuse (or warn, or skip: ``PEFT_BASIS_BASE_MODEL_CHECK``) when ``model`` is not the model ``recorded``
    was taken from. ``what`` names the artifact ("This Basis Sharing adapter"), ``fix`` says what to do."""
    mode = os.environ.get("PEFT_BASIS_BASE_MODEL_CHECK", "error").lower()
    if mode == "off" or not recorded:
        return
    why = mismatch(recorded, model)
    if why is None:
        return
    message = (f"{what} was made on another base model than the one given: {why}. {fix} (Set "
               "PEFT_BASIS_BASE_MODEL_CHECK=warn to load it anyway.)")
    if mode == "warn":
        warnings.warn(message, stacklevel=3)
        return
    raise BaseModelMismatchError(message)
