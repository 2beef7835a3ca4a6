"""The activations a layer pipeline keeps between layers, in memory or offloaded to disk.

An :class:`ActivationCache` holds tensors under ``(key, batch)``: a *stream* of hidden states
(``"dense"``: the dense model's inputs of the current layer; ``"compressed"``: those of the model as
compressed so far) or any other key (the layer-by-layer Fisher pass keeps every layer's inputs under
``"layer_<i>"`` for its backward sweep). ``where="disk"`` writes each tensor to a scratch
safetensors file as soon as it is put (one file per key and batch, removed when dropped), so memory
holds one batch in flight whatever the depth; ``"memory"`` keeps them as they are.
"""

from __future__ import annotations

import os
import shutil
import tempfile

import torch

WHERE = ("memory", "disk")


class ActivationCache:
    def __init__(self, where: str = "memory", scratch_dir: str | None = None):
        if where not in WHERE:
            raise ValueError(f"activations must be one of {WHERE}, not {where!r}.")
        self.where = where
        self._memory: dict[str, dict[int, torch.Tensor]] = {}
        self._on_disk: dict[str, set[int]] = {}
        self.dir = None
        if where == "disk":
            if scratch_dir is not None:
                os.makedirs(scratch_dir, exist_ok=True)
            self.dir = tempfile.mkdtemp(prefix=".peft-basis-activations-", dir=scratch_dir)

    def put(self, key: str, batch: int, tensor: torch.Tensor) -> None:
        if self.dir is None:
            self._memory.setdefault(key, {})[batch] = tensor.detach()
            return
        from safetensors.torch import save_file

        save_file({"t": tensor.detach().contiguous().cpu()}, self._path(key, batch))
        self._on_disk.setdefault(key, set()).add(batch)

    def put_all(self, key: str, tensors: list[torch.Tensor]) -> None:
        for b, t in enumerate(tensors):
            self.put(key, b, t)

    def get(self, key: str, batch: int, device=None) -> torch.Tensor:
        if self.dir is None:
            t = self._memory[key][batch]
            return t if device is None else t.to(device)
        from safetensors import safe_open

        with safe_open(self._path(key, batch), framework="pt", device="cpu") as f:
            t = f.get_tensor("t")
        return t if device is None else t.to(device)

    def __contains__(self, key: str) -> bool:
        return key in self._memory or key in self._on_disk

    def batches(self, key: str) -> int:
        return len(self._memory.get(key, {})) if self.dir is None else len(self._on_disk.get(key, ()))

    def drop(self, key: str) -> None:
        self._memory.pop(key, None)
        for b in self._on_disk.pop(key, set()):
            path = self._path(key, b)
            if os.path.exists(path):
                os.remove(path)

    def rename(self, src: str, dst: str) -> None:
        """``dst`` takes ``src``'s tensors (what ``dst`` held is dropped)."""
        self.drop(dst)
        if self.dir is None:
            self._memory[dst] = self._memory.pop(src)
            return
        batches = self._on_disk.pop(src)
        for b in batches:
            os.replace(self._path(src, b), self._path(dst, b))
        self._on_disk[dst] = batches

    def close(self) -> None:
        self._memory.clear()
        self._on_disk.clear()
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)

    def _path(self, key: str, batch: int) -> str:
        return os.path.join(self.dir, f"{key}.{batch}.safetensors")
