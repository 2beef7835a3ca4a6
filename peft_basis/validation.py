"""Checks of what users hand in, in one place, each with a message that names the problem and the fix:

* config fields (type and range), used by every config's ``__post_init__``;
* the model's weights (finite) before a compression reads them;
* token batches (ids inside the vocabulary, a mask of the ids' shape);
* the tensors of an adapter file before PEFT loads them (complete, floating point, finite, the shapes the
  model expects), so a damaged or foreign file is refused instead of loading as zeros or NaN.

Nothing here knows about a method: the callers say what they expect.
"""

from __future__ import annotations

import math

import torch

from .errors import CalibrationError, CheckpointError, ConfigError

__all__ = ["all_finite", "check_adapter_tensors", "check_finite_weights", "check_token_batch", "choice", "int_list",
           "number", "warn_if_half_precision_is_emulated"]


# ---- config fields ------------------------------------------------------------------------------------
def _bounds(low, high, low_open: bool, high_open: bool) -> str:
    if low is None and high is None:
        return ""
    if high is None:
        return f" {'>' if low_open else '>='} {low}"
    if low is None:
        return f" {'<' if high_open else '<='} {high}"
    return f" in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"


def number(config, name: str, *, low=None, high=None, low_open: bool = False, high_open: bool = False,
           integer: bool = False, optional: bool = False, meaning: str = "", hint: str = "") -> None:
    """``config.<name>`` must be a number (an ``int`` with ``integer``) within the bounds; ``None`` if ``optional``.
    ``meaning`` says what the field is ("the fraction of ..."), ``hint`` what to pass."""
    value = getattr(config, name)
    if value is None and optional:
        return
    kind = "an int" if integer else "a number"
    bounds = _bounds(low, high, low_open, high_open).strip()
    want = (f"{bounds} ({kind})" if bounds else kind) + (" or None" if optional else "")
    ok = isinstance(value, int) if integer else isinstance(value, (int, float))
    head = f"{type(config).__name__}({name}={value!r}): {name} " + (f"is {meaning} and " if meaning else "")
    if isinstance(value, bool) or not ok:
        raise ConfigError(f"{head}must be {want}, not {type(value).__name__}. {hint}".strip())
    bad = isinstance(value, float) and math.isnan(value)
    bad = bad or (low is not None and (value <= low if low_open else value < low))
    bad = bad or (high is not None and (value >= high if high_open else value > high))
    if bad:
        raise ConfigError(f"{head}must be {want}. {hint}".strip())


def choice(config, name: str, choices, hint: str = "") -> None:
    """``config.<name>`` must be one of ``choices``."""
    value = getattr(config, name)
    if isinstance(value, bool) or value not in tuple(choices):
        raise ConfigError(f"{type(config).__name__}({name}={value!r}): {name} must be one of "
                          f"{', '.join(repr(c) for c in choices)}. {hint}".strip())


def int_list(config, name: str, *, low: int = 1, hint: str = "") -> None:
    """``config.<name>`` must be a non-empty list of ints ``>= low``."""
    value = getattr(config, name)
    if (not isinstance(value, (list, tuple)) or not value
            or not all(isinstance(v, int) and not isinstance(v, bool) and v >= low for v in value)):
        raise ConfigError(f"{type(config).__name__}({name}={value!r}): {name} must be a non-empty list of ints "
                          f">= {low}. {hint}".strip())


# ---- the model's weights ------------------------------------------------------------------------------
def all_finite(tensor: torch.Tensor) -> bool:
    """No NaN or inf in ``tensor``: its smallest and largest entries, in one pass (``aminmax`` propagates NaN).
    No temporary and no overflow, unlike a float32 sum of a 16-bit tensor (which upcasts it whole) or
    ``isfinite(t).all()`` (a bool per entry)."""
    if not tensor.is_floating_point() or tensor.numel() == 0:
        return True
    low, high = torch.aminmax(tensor)
    return bool(torch.isfinite(low) & torch.isfinite(high))


def check_finite_weights(model: torch.nn.Module, names, what: str = "this compression") -> None:
    """Every parameter of the modules ``names`` must be finite (a NaN weight gives NaN factors, NaN logits)."""
    modules = dict(model.named_modules())
    for n in names:
        check_finite_parameters(getattr(modules[n], "base_layer", modules[n]), n, what)  # base_layer: wrapped already


def check_finite_parameters(module: torch.nn.Module, name: str, what: str = "this compression") -> None:
    """The parameters of ``module`` (named ``name``) must be finite."""
    for pname, p in module.named_parameters(recurse=False):
        if p.device.type != "meta" and not all_finite(p):
            bad = int((~torch.isfinite(p)).sum())
            raise ValueError(
                f"{name}.{pname} holds {bad} NaN/Inf values, so {what} would give NaN factors and NaN logits. The base "
                "model is damaged (a failed load, an overflow in an earlier edit, a corrupt checkpoint): reload it "
                "from its checkpoint, in float32 or bfloat16."
            )


# ---- compute dtype -----------------------------------------------------------------------------------
def warn_if_half_precision_is_emulated(dtype: torch.dtype, device, what: str = "This model") -> bool:
    """Warn where ``dtype`` (bfloat16, float16) would run on an x86 CPU without AVX-512 (or AMX): there the
    16-bit matrix products are emulated, several times slower than float32 (docs/performance.md). Returns
    whether it warned."""
    import platform
    import warnings

    if dtype not in (torch.bfloat16, torch.float16) or torch.device(device).type != "cpu":
        return False
    if platform.machine().lower() not in ("x86_64", "amd64", "i386", "i686"):
        return False  # ARM CPUs run bfloat16 natively where they have it; nothing measured here
    capability = torch.backends.cpu.get_cpu_capability()
    if capability.upper().startswith(("AVX512", "AMX")):
        return False
    name = str(dtype).removeprefix("torch.")
    warnings.warn(
        f"{what} computes in {name} on this CPU ({capability}, no AVX-512 or AMX), where {name} matrix products are "
        f"emulated and several times slower than float32. For speed, pass dtype=torch.float32 (the {name} "
        "checkpoint still saves disk and download).",
        stacklevel=3,
    )
    return True


# ---- token batches ------------------------------------------------------------------------------------
def check_token_batch(input_ids: torch.Tensor, attention_mask: torch.Tensor | None, vocab_size: int | None,
                      where: str = "batch") -> None:
    """Token ids must be integers in ``[0, vocab_size)``; an attention mask must have the ids' shape."""
    if input_ids.is_floating_point() or input_ids.dtype == torch.bool:
        raise CalibrationError(f"{where}: input_ids are {input_ids.dtype}; token ids are integers (torch.long). "
                               "Pass the tokenizer's `input_ids`.")
    if input_ids.numel():
        lo, hi = int(input_ids.min()), int(input_ids.max())
        if lo < 0 or (vocab_size is not None and hi >= vocab_size):
            bad = lo if lo < 0 else hi
            raise CalibrationError(
                f"{where}: token id {bad} is outside this model's vocabulary [0, {vocab_size}). Tokenize with the "
                "model's own tokenizer (ids from another model, or padding with -100 / -1, do not fit); mark padding "
                "with `attention_mask` instead."
            )
    if attention_mask is not None and tuple(attention_mask.shape) != tuple(input_ids.shape):
        raise CalibrationError(
            f"{where}: attention_mask has shape {tuple(attention_mask.shape)} but input_ids {tuple(input_ids.shape)}; "
            "they must match (one mask entry per token, 1 = real token, 0 = padding)."
        )


# ---- an adapter's tensors, before they are loaded -------------------------------------------------------
def check_adapter_tensors(expected: dict[str, torch.Tensor], loaded: dict[str, torch.Tensor], where: str,
                          method: str, foreign: dict[str, str] | None = None, complete: bool = True) -> None:
    """Refuse an adapter file whose tensors do not fit: ``expected`` (key -> the model's tensor of that name, as
    PEFT names saved keys), ``loaded`` (what the file holds). Every expected key must be there (``complete``),
    each floating point, finite and of the expected shape. ``foreign`` (key fragment -> method) names the method
    a file's keys belong to when they are another method's."""
    keys = [k for k in loaded if k in expected]
    if complete:
        missing = sorted(k for k in expected if k not in loaded)
        if missing:
            others = sorted({m for k in loaded for frag, m in (foreign or {}).items() if frag in k})
            if others and not keys:
                raise CheckpointError(
                    f"{where}: adapter_config.json says this is a {method} adapter, but the weights file holds "
                    f"{' / '.join(others)} tensors (e.g. {sorted(loaded)[0]}). The config was edited or belongs to "
                    "another adapter: save the adapter again, or restore its own adapter_config.json."
                )
            raise CheckpointError(
                f"{where}: the adapter file lacks {len(missing)} of the {len(expected)} tensors a {method} adapter "
                f"with this config needs (e.g. {missing[:3]}); loading it would leave them at zero. The file is "
                "incomplete (an interrupted save or copy, or saved after merge_and_unload): save the adapter again."
            )
    for k in keys:
        t, want = loaded[k], expected[k]
        if not t.is_floating_point():
            raise CheckpointError(
                f"{where}: {k} is stored as {t.dtype}, but adapter tensors are floating point (float32, float16 or "
                "bfloat16). The file was not written by save_pretrained, or was converted wrongly: save it again."
            )
        if tuple(t.shape) != tuple(want.shape):
            raise CheckpointError(
                f"{where}: {k} has shape {tuple(t.shape)} in the file, but this model needs {tuple(want.shape)}. The "
                "adapter was made for a model of other sizes (hidden size, layers, vocabulary): load it onto the base "
                "model it was created from."
            )
        if t.device.type != "meta" and not all_finite(t):
            raise CheckpointError(
                f"{where}: {k} holds {int((~torch.isfinite(t)).sum())} NaN/Inf values; the model would output NaN. "
                "The file is damaged, or the adapter diverged in training: save or download it again."
            )
