"""``CompressedModel.from_pretrained``: a standalone compressed checkpoint back to a transformers model."""

from __future__ import annotations

import os
import types
from typing import Optional

import torch
from torch import nn

from ..modules import in_out_features, is_linear
from ..memory import release_pages, trim_memory
from ..tuners.factorized import aligned_rows, default_rank_multiple, pad_factor
from ..validation import warn_if_half_precision_is_emulated
from .checkpoint import (
    COMPRESSION_CONFIG,
    SCALE_SUFFIX,
    CompressedCheckpointError,
    CompressedShards,
    dequantize_rows_int8,
    dtype_from_name,
    meta_model,
    read_compression_config,
    set_tensor,
)
from .modules import LowRankLinear
from .save import COMPRESSION_ATTR, push_compressed_to_hub, save_compressed

__all__ = ["CompressedModel"]


def _resolve_folder(path_or_repo_id: str, revision, token, local_files_only, subfolder) -> str:
    local = os.path.join(path_or_repo_id, subfolder or "")
    if os.path.isdir(local):
        return local
    if os.path.isabs(path_or_repo_id) or path_or_repo_id.startswith((".", "~")) or os.path.exists(path_or_repo_id):
        raise FileNotFoundError(f"{local} is not a folder: pass the folder save_compressed wrote, or a Hub repo id.")
    from ..io.hub_files import download_folder

    return download_folder(path_or_repo_id, revision=revision, subfolder=subfolder, token=token,
                           local_files_only=local_files_only)


class CompressedModel:
    """Loads the standalone checkpoints :func:`peft_basis.save_compressed` writes. Not a model class:
    ``from_pretrained`` returns the transformers model itself (e.g. a ``LlamaForCausalLM``), whose
    factorised Linears are :class:`LowRankLinear` modules. No ``trust_remote_code``, no dense base."""

    @classmethod
    def from_pretrained(cls, path_or_repo_id: str, *, revision: Optional[str] = None, token=None,
                        dtype: Optional[torch.dtype] = None, device: torch.device | str = "cpu",
                        local_files_only: bool = False, subfolder: Optional[str] = None,
                        rank_multiple: Optional[int] = None) -> nn.Module:
        """The compressed model at ``path_or_repo_id`` (a local folder, or a Hub repo id downloaded with
        ``snapshot_download``; ``revision``, ``token``, ``subfolder``, ``local_files_only`` as in
        ``huggingface_hub``), in eval mode on ``device``. ``dtype``: the compute dtype (default: the one it
        was saved in); int8 factors are dequantised to it on load. The architecture is built from
        ``config.json`` on the meta device and every tensor is read once from the shards.
        ``rank_multiple``: the factorised modules run their many-token products at ranks rounded up to this
        multiple, zero-padded (the same values; :func:`~peft_basis.standalone.pad_ranks`). Default: 32 in
        bfloat16 (and in float16 on a GPU), whose matrix units work in tiles; 16 otherwise (float32's vector
        width); 1 turns it off. Give ``dtype`` and ``device`` here rather than moving the model later: a
        move or cast drops the padding (call ``pad_ranks(model, 32)``, 16 in float32, again after it).

        The returned model's ``save_pretrained`` and ``push_to_hub`` write this format again (not a
        transformers checkpoint, which could not hold the factors)."""
        if rank_multiple is not None and (not isinstance(rank_multiple, int) or rank_multiple < 1):
            raise ValueError(f"rank_multiple={rank_multiple!r}: use a positive integer (1: no padding).")
        folder = _resolve_folder(path_or_repo_id, revision, token, local_files_only, subfolder)
        compression = read_compression_config(folder)
        shards = CompressedShards(folder)
        stored_dtype = dtype_from_name(compression["dtype"])
        compute_dtype = dtype or stored_dtype
        warn_if_half_precision_is_emulated(compute_dtype, device, "The compressed model")
        int8 = compression["factors"] == "int8"
        model = meta_model(folder, compute_dtype)
        used: set[str] = set()

        def tensor(name: str) -> torch.Tensor:
            t = shards.get(name)
            used.add(name)
            if dtype is not None and t.is_floating_point():
                t = t.to(dtype)
            return t.to(device)

        multiple = default_rank_multiple(compute_dtype, torch.device(device)) if rank_multiple is None else rank_multiple

        def factor(name: str, rank_dim: int) -> nn.Parameter:
            # Laid out once, in its final form: padded to ``multiple`` along the rank (``pad_ranks``), or with its rows
            # on cache lines (faster decoding). A second copy per factor (aligned, then padded) left the first ones'
            # memory in the heap: the bfloat16 + int8 load peaked at twice the model's bytes.
            if int8:
                q, scale = shards.get(name), shards.get(name + SCALE_SUFFIX)
                used.update((name, name + SCALE_SUFFIX))
                read = dequantize_rows_int8(q, scale, compute_dtype).to(device)
                release_pages(q)  # the int8 values are read: their mapped pages are not needed any more
            else:
                read = tensor(name)
            param = nn.Parameter(read, requires_grad=False)
            if multiple > 1 and pad_factor(param, rank_dim, multiple):
                return param  # a view of its padded copy; the mapped pages were released
            aligned = aligned_rows(read)
            if aligned is not read:
                release_pages(read)  # copied: the mapped checkpoint's pages are not needed any more
            return param if aligned is read else nn.Parameter(aligned, requires_grad=False)

        try:
            bases: dict[str, nn.Parameter] = {}
            for name, spec in compression["factorized_modules"].items():
                try:
                    target = model.get_submodule(name)
                except AttributeError:
                    target = None
                if target is None or not is_linear(target):
                    raise CompressedCheckpointError(
                        f"{COMPRESSION_CONFIG} names {name} as factorised, but the model built from config.json "
                        f"has {'no such module' if target is None else 'a ' + type(target).__name__ + ' there'}: the "
                        "two files come from different models. Save the checkpoint again."
                    )
                if spec["basis"] not in bases:
                    bases[spec["basis"]] = factor(spec["basis"], 0)
                basis, coefficient = bases[spec["basis"]], factor(spec["coefficient"], 1)
                bias = None if spec["bias"] is None else nn.Parameter(tensor(spec["bias"]), requires_grad=False)
                d_in, d_out = in_out_features(target)
                if basis.shape[1] != d_in or coefficient.shape[0] != d_out or coefficient.shape[1] != basis.shape[0]:
                    raise CompressedCheckpointError(
                        f"{name}: factors {tuple(coefficient.shape)} x {tuple(basis.shape)} do not make the "
                        f"{d_out} x {d_in} weight config.json describes; the files come from different models."
                    )
                parent_name, _, child = name.rpartition(".")
                parent = model.get_submodule(parent_name) if parent_name else model
                setattr(parent, child, LowRankLinear(basis, coefficient, bias, spec["basis"]))
            # parameters are on meta until read; buffers are real (computed from the config), and overwritten by the
            # checkpoint where it holds them (persistent buffers)
            tensors = [(n, p) for n, p in model.named_parameters(remove_duplicate=False) if p.device.type == "meta"]
            tensors += [(n, b) for n, b in model.named_buffers() if n in shards]
            for name, t in tensors:
                if name in compression["tied_weights"]:
                    continue
                value = tensor(name)
                if tuple(value.shape) != tuple(t.shape):
                    raise CompressedCheckpointError(
                        f"{name}: the checkpoint holds shape {tuple(value.shape)}, config.json's model "
                        f"{tuple(t.shape)}; the files come from different models. Save the checkpoint again."
                    )
                set_tensor(model, name, value)
        finally:
            shards.close()
        for name, source in compression["tied_weights"].items():  # e.g. a tied output embedding, stored once
            owner_name, _, leaf = name.rpartition(".")
            owner = model.get_submodule(owner_name) if owner_name else model
            kept = model.get_parameter(source) if source in dict(model.named_parameters()) else model.get_buffer(source)
            if leaf in owner._parameters:
                owner._parameters[leaf] = kept
            else:
                owner._buffers[leaf] = kept
        unused = sorted(set(shards.names()) - used)
        if unused:
            raise CompressedCheckpointError(
                f"The checkpoint at {folder} holds tensors the model built from its config.json has no place for "
                f"(e.g. {unused[:3]}): the files come from different models. Save the checkpoint again."
            )
        still_meta = [n for n, p in model.named_parameters() if p.device.type == "meta"]
        if still_meta:
            raise CompressedCheckpointError(f"{len(still_meta)} tensors were not in the checkpoint (e.g. {still_meta[:3]}).")
        model.to(device)  # buffers computed from the config (rotary frequencies) were built on the CPU
        trim_memory()  # the dequantisation's and the reads' temporaries
        _load_generation_config(model, folder)
        setattr(model, COMPRESSION_ATTR, compression)  # how it was made; save_compressed reads it to save again
        model.save_pretrained = types.MethodType(_save_pretrained, model)
        model.push_to_hub = types.MethodType(push_compressed_to_hub, model)
        return model.eval()


def _load_generation_config(model, folder: str) -> None:
    if not os.path.isfile(os.path.join(folder, "generation_config.json")):
        return
    from transformers import GenerationConfig

    model.generation_config = GenerationConfig.from_pretrained(folder)


def _save_pretrained(self, save_directory: str, *, dtype=None, factors: Optional[str] = None, max_shard_size="5GB",
                     tokenizer=None, is_main_process: bool = True, safe_serialization: bool = True, **unsupported):
    """Save this compressed model again, as a standalone compressed checkpoint (``save_compressed``;
    ``factors`` defaults to the format it was loaded from)."""
    if unsupported:
        raise TypeError(
            f"save_pretrained of a compressed model takes dtype, factors, max_shard_size and tokenizer (it calls "
            f"peft_basis.save_compressed); got {sorted(unsupported)}."
        )
    if not is_main_process:
        return save_directory
    factors = factors or getattr(self, COMPRESSION_ATTR)["factors"]
    return save_compressed(self, save_directory, dtype=dtype, factors=factors, max_shard_size=max_shard_size,
                           tokenizer=tokenizer)
