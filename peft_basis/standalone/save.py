"""``save_compressed``: a compressed model as a standalone checkpoint that needs no dense base."""

from __future__ import annotations

import copy
import json
import os
import tempfile
from dataclasses import dataclass
from typing import Callable, Optional, Union

import torch
from torch import nn

from ..io.folders import atomic_folder
from ..validation import all_finite
from .checkpoint import (
    COMPRESSION_CONFIG,
    FACTOR_FORMATS,
    FORMAT,
    FORMAT_VERSION,
    INDEX,
    SCALE_SUFFIX,
    SHARD,
    CompressedCheckpointError,
    SafetensorsStreamWriter,
    dtype_name,
    quantize_rows_int8,
)
from .modules import Factorized, factorized_modules

DEFAULT_MAX_SHARD_SIZE = "5GB"
# set by CompressedModel.from_pretrained on the models it returns, so they can be saved again
COMPRESSION_ATTR = "compression_config"

__all__ = ["save_compressed", "push_compressed_to_hub"]


@dataclass
class _Entry:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    produce: Callable[[], torch.Tensor]  # called when the tensor is written: one converted tensor in memory at a time
    is_parameter: bool = True  # False for buffers and int8 scales (not counted as parameters)

    @property
    def nbytes(self) -> int:
        return int(torch.Size(self.shape).numel()) * torch.empty((), dtype=self.dtype).element_size()


def parse_size(size: Union[int, str]) -> int:
    """``5_000_000``, ``"5GB"``, ``"500MiB"`` -> bytes (decimal units as transformers reads them, binary ``*iB``)."""
    if isinstance(size, int):
        return size
    text = str(size).strip().upper().replace(" ", "")
    units = {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40, "KB": 10**3, "MB": 10**6, "GB": 10**9,
             "TB": 10**12, "B": 1}
    for unit, factor in units.items():
        if text.endswith(unit):
            try:
                return int(float(text[: -len(unit)]) * factor)
            except ValueError:
                break
    raise ValueError(f"max_shard_size={size!r} is not a size; pass bytes (an int) or a string such as '5GB' or '500MiB'.")


def _unwrap(model) -> tuple[nn.Module, Optional[object], str, Optional[dict]]:
    """(transformers model, PEFT config or None, adapter name, compression config of a loaded model or None)."""
    from peft import PeftModel
    from peft.tuners.tuners_utils import BaseTuner

    tuner = model.base_model if isinstance(model, PeftModel) else model
    if isinstance(tuner, BaseTuner):
        adapter = tuner.active_adapters[0] if tuner.active_adapters else "default"
        return tuner.model, tuner.peft_config[adapter], adapter, None
    loaded = getattr(model, COMPRESSION_ATTR, None)
    if isinstance(loaded, dict) and loaded.get("format") == FORMAT:
        return model, None, "default", loaded
    raise TypeError(
        f"save_compressed takes a PeftModel holding a Basis Sharing or consolidated Basel adapter, or a model loaded "
        f"with CompressedModel.from_pretrained; got a {type(model).__name__}. For a dense model use `save_pretrained`."
    )


def _public_name(name_or_path: Optional[str]) -> Optional[str]:
    """A model id to record: a Hub id as is; a local folder by its last component (never an absolute path)."""
    if not name_or_path:
        return None
    name = str(name_or_path)
    if os.path.isabs(name) or os.path.exists(name) or name.startswith(("./", "../", "~")):
        return os.path.basename(os.path.normpath(name)) or None
    return name


def _adapter_config_dict(peft_config) -> dict:
    d = peft_config.to_dict()
    d["base_model_name_or_path"] = _public_name(d.get("base_model_name_or_path"))
    return json.loads(json.dumps(d, default=lambda v: sorted(v) if isinstance(v, (set, frozenset)) else str(v)))


def _check_finite(name: str, t: torch.Tensor) -> torch.Tensor:
    if not all_finite(t):
        raise CompressedCheckpointError(
            f"{name} holds NaN or inf; refusing to save a broken model. Find what made it non-finite (calibration, "
            "training, a dtype overflow with dtype=float16) and compress again."
        )
    return t


def _plan(model: nn.Module, factorized: dict[str, Factorized], dtype: Optional[torch.dtype], factors: str):
    """What to write, in order, and the tied names (dropped duplicates -> the name kept)."""
    entries: list[_Entry] = []
    tied: dict[str, str] = {}

    def cast(t: torch.Tensor) -> torch.Tensor:
        t = t.detach()
        return t.to(dtype) if dtype is not None and t.is_floating_point() else t

    def add(name: str, t: torch.Tensor, is_parameter: bool = True) -> None:
        out_dtype = dtype if dtype is not None and t.is_floating_point() else t.dtype
        entries.append(_Entry(name, tuple(t.shape), out_dtype, lambda: _check_finite(name, cast(t)).contiguous(),
                              is_parameter))

    def add_factor(name: str, t: torch.Tensor) -> None:
        if factors == "float":
            add(name, t)
            return
        box: dict[str, torch.Tensor] = {}

        def quantized() -> torch.Tensor:
            box["q"], box["scale"] = quantize_rows_int8(cast(t), name)
            return box["q"]

        entries.append(_Entry(name, tuple(t.shape), torch.int8, quantized))
        entries.append(_Entry(name + SCALE_SUFFIX, (t.shape[0],), torch.float32, lambda: box.pop("scale"), False))

    skip = tuple(f"{n}." for n in factorized)
    seen: dict[int, str] = {}
    for name, t in model.state_dict(keep_vars=True).items():
        if name.startswith(skip):
            continue
        if id(t) in seen:
            tied[name] = seen[id(t)]
            continue
        seen[id(t)] = name
        add(name, t, isinstance(t, nn.Parameter))
    bases_done: set[str] = set()
    for name, f in factorized.items():
        if f.basis_name not in bases_done:
            bases_done.add(f.basis_name)
            add_factor(f.basis_name, f.basis)
        add_factor(f"{name}.coefficient", f.coefficient)
        if f.bias is not None:
            add(f"{name}.bias", f.bias)
    return entries, tied


def _shards(entries: list[_Entry], max_bytes: int) -> list[list[_Entry]]:
    shards: list[list[_Entry]] = [[]]
    size = 0
    for e in entries:
        if shards[-1] and size + e.nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(e)
        size += e.nbytes
    return shards


def _write_shards(folder: str, entries: list[_Entry], max_bytes: int) -> dict:
    shards = _shards(entries, max_bytes)
    weight_map, total = {}, 0
    for i, shard in enumerate(shards):
        file = SHARD.format(i + 1, len(shards))
        writer = SafetensorsStreamWriter(os.path.join(folder, file), {e.name: (e.shape, e.dtype) for e in shard},
                                         {"format": "pt"})
        try:
            for e in shard:
                writer.write(e.name, e.produce())
                weight_map[e.name] = file
                total += e.nbytes
            writer.close()
        except BaseException:
            writer.abort()
            raise
    return {"metadata": {"format": FORMAT, "total_size": total}, "weight_map": weight_map}


def _model_card(compression: dict) -> str:
    base = compression.get("base_model") or "a causal LM"
    method = compression["method"]
    return "\n".join([
        "---", "library_name: peft-basis", "tags:", "- peft-basis", "- compressed", f"- {compression['peft_type'].lower()}",
        "---", "", f"# {base}, compressed with {method} (peft-basis)", "",
        f"A standalone compressed checkpoint: {compression['parameters']:,} parameters "
        f"({compression['dtype']}, {compression['factors']} factors); it needs no dense base model.", "",
        "```python", "from peft_basis import CompressedModel  # pip install peft-basis", "",
        'model = CompressedModel.from_pretrained("<this repo or folder>")', "```", "",
        f"Made with peft-basis {compression['peft_basis_version']}; how it was made is in `{COMPRESSION_CONFIG}`.", "",
    ])


def save_compressed(model, directory: str, *, dtype: Optional[torch.dtype] = None, factors: str = "float",
                    max_shard_size: Union[int, str] = DEFAULT_MAX_SHARD_SIZE, tokenizer=None) -> str:
    """Write ``model`` (a PeftModel holding a Basis Sharing or consolidated Basel adapter, or a model
    loaded with :class:`CompressedModel`) to ``directory`` as a standalone compressed checkpoint:
    every base tensor the compressed model still uses (embeddings, norms, biases, untargeted Linears;
    a tied output embedding once), each factor once (a shared basis once for its whole group), the
    base model's ``config.json``, ``compression_config.json`` (how it was made) and, if given, the
    tokenizer. Load it with ``CompressedModel.from_pretrained(directory)``; no dense base is needed.

    ``dtype``: cast float tensors to it (default: keep each tensor's dtype). ``factors="int8"``: store
    the factors as int8 with one float32 scale per output row (dequantised on load); everything else
    stays float. The write is atomic: files go to a temporary folder beside ``directory``, which
    replaces it only when complete, so a failure leaves a previous checkpoint there intact.
    Returns ``directory``."""
    from .._version import __version__
    from ..hub import METHOD_CARDS as METHODS

    if factors not in FACTOR_FORMATS:
        raise ValueError(f"factors must be one of {FACTOR_FORMATS}, got {factors!r}.")
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise ValueError(f"dtype must be a float torch.dtype (e.g. torch.bfloat16), got {dtype!r}.")
    max_bytes = parse_size(max_shard_size)
    base, peft_config, adapter, loaded = _unwrap(model)
    factorized = factorized_modules(base, adapter)
    if not factorized:
        kind = type(peft_config).__name__ if peft_config is not None else type(model).__name__
        raise ValueError(
            f"This model ({kind}) has no factorised module: a compressed checkpoint stores Basis Sharing or "
            "consolidated Basel factors. For other adapters, `merge_and_unload()` then `save_pretrained`."
        )
    entries, tied = _plan(base, factorized, dtype, factors)
    float_bytes: dict[torch.dtype, int] = {}
    for e in entries:
        if e.dtype.is_floating_point:
            float_bytes[e.dtype] = float_bytes.get(e.dtype, 0) + e.nbytes
    compute_dtype = dtype or max(float_bytes, key=float_bytes.get)
    if loaded is not None:
        made = {k: loaded[k] for k in ("method", "peft_type", "adapter_config", "base_model")}
    else:
        peft_type = getattr(peft_config.peft_type, "value", peft_config.peft_type)
        made = {"method": METHODS.get(peft_type, (peft_type,))[0], "peft_type": peft_type,
                "adapter_config": _adapter_config_dict(peft_config),
                "base_model": _public_name(peft_config.base_model_name_or_path or getattr(base, "name_or_path", None))}
    compression = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "peft_basis_version": __version__, **made,
        "dtype": dtype_name(compute_dtype), "factors": factors,
        "int8": ({"scheme": "symmetric, one float32 scale per output row", "scale_suffix": SCALE_SUFFIX}
                 if factors == "int8" else None),
        "parameters": int(sum(torch.Size(e.shape).numel() for e in entries if e.is_parameter)),
        "factorized_modules": {n: {"basis": f.basis_name, "coefficient": f"{n}.coefficient",
                                   "bias": None if f.bias is None else f"{n}.bias"} for n, f in factorized.items()},
        "tied_weights": tied,
    }

    final = os.path.abspath(directory)
    if os.path.exists(final) and not os.path.isdir(final):
        raise FileExistsError(f"{directory} is a file; save_compressed writes a folder. Pass another path.")
    if os.path.isdir(final) and os.listdir(final) and not os.path.isfile(os.path.join(final, COMPRESSION_CONFIG)):
        raise FileExistsError(
            f"{directory} holds files but no compressed checkpoint. save_compressed replaces the whole folder, so it "
            "refuses to: pass a new or empty folder."
        )
    with atomic_folder(final, carry_over=False) as tmp:  # old shards would be stale beside the new ones
        index = _write_shards(tmp, entries, max_bytes)
        with open(os.path.join(tmp, INDEX), "w", encoding="utf-8") as f:
            json.dump(index, f, indent=2)
        with open(os.path.join(tmp, COMPRESSION_CONFIG), "w", encoding="utf-8") as f:
            json.dump(compression, f, indent=2)
        config = copy.deepcopy(base.config)
        config.dtype = compute_dtype
        if not getattr(config, "architectures", None):
            config.architectures = [type(base).__name__]
        config.save_pretrained(tmp)
        generation = getattr(base, "generation_config", None)
        if generation is not None:
            generation.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        with open(os.path.join(tmp, "README.md"), "w", encoding="utf-8") as f:
            f.write(_model_card(compression))
    return directory


def push_compressed_to_hub(model, repo_id: str, *, dtype: Optional[torch.dtype] = None, factors: str = "float",
                           max_shard_size: Union[int, str] = DEFAULT_MAX_SHARD_SIZE, tokenizer=None, token=None,
                           private: Optional[bool] = None, revision: Optional[str] = None,
                           subfolder: Optional[str] = None, commit_message: Optional[str] = None,
                           create_pr: bool = False):
    """``save_compressed`` into a temporary folder, then upload it to ``repo_id`` (created if needed;
    ``revision`` creates the branch). Returns the ``CommitInfo``. Load it with
    ``CompressedModel.from_pretrained(repo_id, revision=...)``."""
    from ..io.hub_files import upload_folder_to_hub

    with tempfile.TemporaryDirectory() as tmp:
        folder = os.path.join(tmp, "checkpoint")
        save_compressed(model, folder, dtype=dtype, factors=factors, max_shard_size=max_shard_size,
                        tokenizer=tokenizer)
        return upload_folder_to_hub(folder, repo_id, private=private, token=token, revision=revision,
                                    subfolder=subfolder, create_pr=create_pr,
                                    commit_message=commit_message or "Upload peft-basis compressed checkpoint")
