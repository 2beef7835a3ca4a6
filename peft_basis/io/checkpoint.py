"""Reading a transformers safetensors checkpoint lazily: tensor by tensor, across shards, into a model
built on the ``meta`` device (no weights), and handing the memory back afterwards. What the
layer-sequential pipeline and lean loading stand on."""

from __future__ import annotations

import json
import os

import torch
from torch import nn

from ..errors import CheckpointError
from ..memory import trim_memory

__all__ = ["ShardedCheckpoint", "materialize", "meta_model", "release", "set_tensor", "trim_memory"]

SAFETENSORS_SINGLE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"


# ---- the checkpoint, read lazily ---------------------------------------------------------------------
class ShardedCheckpoint:
    """Tensor name -> shard file of a transformers safetensors checkpoint; reads one tensor at a time."""

    def __init__(self, model_path: str):
        self.path = model_path
        index = os.path.join(model_path, SAFETENSORS_INDEX)
        single = os.path.join(model_path, SAFETENSORS_SINGLE)
        if os.path.exists(index):
            with open(index, encoding="utf-8") as f:
                weight_map = json.load(f)["weight_map"]
            self.files = {k: os.path.join(model_path, v) for k, v in weight_map.items()}
        elif os.path.exists(single):
            from safetensors import safe_open

            with safe_open(single, framework="pt") as f:
                self.files = {k: single for k in f.keys()}
        else:
            raise FileNotFoundError(
                f"{model_path} holds no {SAFETENSORS_SINGLE} or {SAFETENSORS_INDEX}. The layer-by-layer pipeline reads "
                "safetensors shards lazily; convert the checkpoint once with "
                "`AutoModelForCausalLM.from_pretrained(path).save_pretrained(new_path)` (safetensors is the default)."
            )
        self._handles: dict[str, object] = {}

    def __contains__(self, key: str) -> bool:
        return key in self.files

    def get(self, key: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        from safetensors import safe_open

        try:
            file = self.files[key]
        except KeyError:
            raise CheckpointError(
                f"{key} is not in the checkpoint at {self.path}. The checkpoint's tensor names must match the model "
                "built from its config.json (save it with a recent transformers `save_pretrained`)."
            ) from None
        handle = self._handles.get(file)
        if handle is None:
            handle = self._handles[file] = safe_open(file, framework="pt", device="cpu")
        t = handle.get_tensor(key)
        return t if dtype is None or not t.is_floating_point() else t.to(dtype)

    def close(self) -> None:
        self._handles.clear()


def meta_model(model_path: str, dtype: torch.dtype | None = None) -> nn.Module:
    """The causal LM of ``model_path`` with every parameter on the meta device (buffers such as rotary
    frequencies are real: they are computed from the config, not read from the checkpoint)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_path)
    kwargs = {} if dtype is None else {"dtype": dtype}
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, **kwargs)
    model.name_or_path = model_path
    return model.eval()


def set_tensor(module: nn.Module, name: str, value: torch.Tensor) -> None:
    owner_name, _, leaf = name.rpartition(".")
    owner = module.get_submodule(owner_name) if owner_name else module
    if leaf in owner._parameters:
        owner._parameters[leaf] = nn.Parameter(value, requires_grad=False)
    else:
        owner._buffers[leaf] = value


def materialize(module: nn.Module, prefix: str, ckpt: ShardedCheckpoint, dtype: torch.dtype | None,
                device: torch.device | str = "cpu", skip: set[str] = frozenset()) -> None:
    """Load every meta parameter/buffer of ``module`` (named ``prefix`` in the model) from the checkpoint."""
    for name, t in list(module.named_parameters(recurse=True)) + list(module.named_buffers(recurse=True)):
        if t.device.type != "meta" or (prefix + name) in skip:
            continue
        value = ckpt.get(prefix + name, dtype if t.is_floating_point() else None)
        if tuple(value.shape) != tuple(t.shape):
            raise CheckpointError(f"{prefix + name}: checkpoint shape {tuple(value.shape)} != model shape {tuple(t.shape)}.")
        set_tensor(module, name, value.to(device))


def release(module: nn.Module) -> None:
    """Send ``module``'s parameters back to the meta device (frees their memory)."""
    for name, p in list(module.named_parameters(recurse=True)):
        if p.device.type != "meta":
            set_tensor(module, name, torch.empty_like(p, device="meta"))
