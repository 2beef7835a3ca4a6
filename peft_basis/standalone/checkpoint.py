"""The standalone compressed checkpoint on disk: names, format version, int8 factors, and a reader
that checks every shard before it trusts it.

A folder holds ``config.json`` (the base model's transformers config), ``compression_config.json``
(how it was made, which modules are factorised and where their factors are), the weights as
safetensors shards listed by ``compressed_model.safetensors.index.json``, and optionally the
tokenizer and ``generation_config.json``. The shards are named ``compressed_model-*`` on purpose:
``AutoModelForCausalLM.from_pretrained`` then finds no weights and says so, instead of loading the
unfactorised architecture with the factorised Linears randomly initialised.
"""

from __future__ import annotations

import json
import os
import struct

import torch

from ..errors import CompressedCheckpointError
from ..validation import all_finite
from ..io import SafetensorsStreamWriter, meta_model, set_tensor

__all__ = ["CompressedCheckpointError", "SafetensorsStreamWriter", "meta_model", "set_tensor"]

FORMAT = "peft-basis-compressed"
FORMAT_VERSION = 1
COMPRESSION_CONFIG = "compression_config.json"
INDEX = "compressed_model.safetensors.index.json"
SHARD = "compressed_model-{:05d}-of-{:05d}.safetensors"
SCALE_SUFFIX = "_scale"  # int8 factor ``name`` has its per-row float32 scales under ``name + SCALE_SUFFIX``
FACTOR_FORMATS = ("float", "int8")
FLOAT_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
                "float64": torch.float64}


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def dtype_from_name(name: str) -> torch.dtype:
    try:
        return FLOAT_DTYPES[name]
    except KeyError:
        raise CompressedCheckpointError(f"Unknown dtype {name!r} in {COMPRESSION_CONFIG}; expected one of "
                                        f"{sorted(FLOAT_DTYPES)}.") from None


# ---- int8 factors ------------------------------------------------------------------------------------
def quantize_rows_int8(tensor: torch.Tensor, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 with one float32 scale per row (a factor's output channel, as ``nn.Linear`` sees it):
    ``tensor ~ q * scale[:, None]``, ``|error| <= scale / 2`` per entry."""
    if not tensor.is_floating_point():
        raise CompressedCheckpointError(
            f"{name} is a {dtype_name(tensor.dtype)} tensor, not float: int8 quantises float factors. Save this model "
            "with factors='float', or from the float model it was made from (not one already quantised)."
        )
    if tensor.dim() != 2:
        raise CompressedCheckpointError(f"{name} has shape {tuple(tensor.shape)}; int8 factors are 2-D matrices.")
    x = tensor.detach().to(torch.float32)
    if not all_finite(x):
        raise CompressedCheckpointError(
            f"{name} holds NaN or inf, which int8 cannot represent (and a float checkpoint would carry on): the factors "
            "are broken. Find what made them non-finite (calibration, training) and compress again."
        )
    scale = x.abs().amax(dim=1) / 127
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # an all-zero row: q = 0 whatever the scale
    q = torch.round(x / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scale


def dequantize_rows_int8(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return (q.to(torch.float32) * scale.to(torch.float32)[:, None]).to(dtype)


# ---- reading ------------------------------------------------------------------------------------------
def read_compression_config(folder: str) -> dict:
    path = os.path.join(folder, COMPRESSION_CONFIG)
    if not os.path.isfile(path):
        hint = ""
        if os.path.isfile(os.path.join(folder, "adapter_config.json")):
            hint = " It holds a PEFT adapter: load it with `PeftModel.from_pretrained(base_model, path)`."
        elif os.path.isfile(os.path.join(folder, "config.json")):
            hint = " It looks like a dense transformers checkpoint: load it with `AutoModelForCausalLM.from_pretrained`."
        raise CompressedCheckpointError(
            f"{folder} is not a peft-basis compressed checkpoint: it has no {COMPRESSION_CONFIG}.{hint} Write one with "
            "`peft_basis.save_compressed(peft_model, path)`."
        )
    with open(path, encoding="utf-8") as f:
        try:
            config = json.load(f)
        except json.JSONDecodeError as e:
            raise CompressedCheckpointError(f"{path} is not valid JSON ({e}); download or save the checkpoint again.") from e
    if config.get("format") != FORMAT:
        raise CompressedCheckpointError(f"{path} is not a peft-basis compressed checkpoint config (format "
                                        f"{config.get('format')!r}, expected {FORMAT!r}).")
    version = config.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION or version < 1:
        from .._version import __version__

        raise CompressedCheckpointError(
            f"{folder} was written in compressed-checkpoint format version {version!r} (by peft-basis "
            f"{config.get('peft_basis_version', '?')}); this peft-basis ({__version__}) reads format version "
            f"{FORMAT_VERSION} and older. Upgrade: `pip install -U peft-basis`."
        )
    if config.get("factors") not in FACTOR_FORMATS:
        raise CompressedCheckpointError(f"{path}: factors={config.get('factors')!r}, expected one of {FACTOR_FORMATS}.")
    return config


def _shard_header(path: str) -> tuple[dict, int]:
    """The safetensors header of ``path`` and the file size it declares (8 + header + data)."""
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            return {}, -1
        (n,) = struct.unpack("<Q", head)
        raw = f.read(n) if n < 100 * 2**20 else b""
    if len(raw) != n:
        return {}, -1
    try:
        header = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return {}, -1
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    return header, 8 + n + end


class CompressedShards:
    """The tensors of a compressed checkpoint, one at a time. Opening checks that every shard the index
    names is present, complete (its size matches its own header) and holds the tensors the index says."""

    def __init__(self, folder: str):
        self.folder = folder
        index = os.path.join(folder, INDEX)
        if not os.path.isfile(index):
            raise CompressedCheckpointError(
                f"{folder} is incomplete: {INDEX} (the list of weight shards) is missing. Download the checkpoint "
                "again, or save it again with `save_compressed`."
            )
        with open(index, encoding="utf-8") as f:
            self.files: dict[str, str] = json.load(f)["weight_map"]
        again = ("Download the checkpoint again (for a Hub repo, delete its folder in the Hugging Face cache first), "
                 "or save it again with `save_compressed`.")
        by_file: dict[str, list[str]] = {}
        for name, file in self.files.items():
            by_file.setdefault(file, []).append(name)
        for file, names in sorted(by_file.items()):
            path = os.path.join(folder, file)
            if not os.path.isfile(path):
                raise CompressedCheckpointError(
                    f"{folder} is incomplete: shard {file} is missing (it holds {len(names)} tensors, e.g. "
                    f"{names[:2]}). {again}"
                )
            header, expected = _shard_header(path)
            size = os.path.getsize(path)
            if expected < 0 or size < expected:
                raise CompressedCheckpointError(
                    f"Shard {file} in {folder} is truncated or damaged ({size:,} bytes"
                    + (f", its header declares {expected:,})" if expected > 0 else ", no readable header)")
                    + f": the download or save was interrupted. {again}"
                )
            absent = [n for n in names if n not in header]
            if absent:
                raise CompressedCheckpointError(
                    f"Shard {file} in {folder} lacks {absent[:3]}, which {INDEX} places there: the files come from "
                    f"different saves. {again}"
                )
        self._handles: dict[str, object] = {}

    def __contains__(self, name: str) -> bool:
        return name in self.files

    def names(self) -> list[str]:
        return list(self.files)

    def get(self, name: str) -> torch.Tensor:
        from safetensors import safe_open

        if name not in self.files:
            raise CompressedCheckpointError(
                f"{name} is not in the compressed checkpoint at {self.folder}, but {COMPRESSION_CONFIG} and config.json "
                "need it: the checkpoint is incomplete or its files come from different saves. Save it again with "
                "`save_compressed`."
            )
        file = self.files[name]
        handle = self._handles.get(file)
        if handle is None:
            handle = self._handles[file] = safe_open(os.path.join(self.folder, file), framework="pt", device="cpu")
        tensor = handle.get_tensor(name)
        if not all_finite(tensor):
            raise CompressedCheckpointError(
                f"Tensor {name} in shard {file} of {self.folder} holds NaN or inf: the checkpoint is corrupt, or was "
                "saved from a broken model. Download it again, or compress and save the model again."
            )
        return tensor

    def close(self) -> None:
        self._handles.clear()
