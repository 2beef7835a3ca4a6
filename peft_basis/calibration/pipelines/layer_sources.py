"""Where the layer-sequential pipeline's layers come from: a safetensors checkpoint read one layer at a time
(the dense model is never whole in memory), or a model already in memory. Both offer the same calls:
onload / offload a layer, the modules outside the layers, and any target's dense weight."""

from __future__ import annotations

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from ...io import ShardedCheckpoint, materialize, meta_model, release, set_tensor, trim_memory
from ...modules import linear_weight

__all__ = ["CheckpointLayers", "MemoryLayers"]


class CheckpointLayers:
    """Layers read from a safetensors checkpoint into a model built on the meta device, one at a time."""

    def __init__(self, model_path: str, dtype: torch.dtype | None, device):
        self.model_path, self.dtype, self.device = model_path, dtype, device
        self.model = meta_model(model_path, dtype)
        self._outside: list[str] = []

    def onload_layer(self, layer: nn.Module, prefix: str) -> None:
        ckpt = ShardedCheckpoint(self.model_path)
        materialize(layer, prefix, ckpt, self.dtype, self.device)
        ckpt.close()  # unmap the shard: its pages would otherwise stay in this process's RSS

    def offload_layer(self, layer: nn.Module) -> None:
        release(layer)
        trim_memory()

    def read_weight(self, module_name: str) -> torch.Tensor:
        ckpt = ShardedCheckpoint(self.model_path)
        w = ckpt.get(module_name + ".weight", self.dtype)
        ckpt.close()
        return w.T if isinstance(self.model.get_submodule(module_name), Conv1D) else w

    def onload_outside(self, layer_prefix: str, with_head: bool) -> None:
        """Everything outside the decoder layers: the embeddings, and (``with_head``) the final norm and LM head.
        Without the head, the output embedding is skipped unless the checkpoint stores it separately (the LM
        head is not run; for a tied model it is the input embedding anyway)."""
        model = self.model
        ckpt = ShardedCheckpoint(self.model_path)
        if with_head:
            names = [n for n, _ in model.named_parameters() if not n.startswith(layer_prefix) and n in ckpt]
        else:
            out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
            out_ids = {id(p) for p in out_emb.parameters()} if out_emb is not None else set()
            names = [n for n, p in model.named_parameters() if not n.startswith(layer_prefix)
                     and (id(p) not in out_ids or n in ckpt)]
        for n in names:
            set_tensor(model, n, ckpt.get(n, self.dtype).to(self.device))
        ckpt.close()
        self._outside = names
        self._tied_head = None
        if with_head:
            head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
            if head is not None and head.weight.device.type == "meta":  # tied: not in the checkpoint
                head.weight = model.get_input_embeddings().weight
                self._tied_head = head

    def offload_outside(self) -> None:
        if self._tied_head is not None:
            self._tied_head.weight = nn.Parameter(torch.empty_like(self._tied_head.weight, device="meta"),
                                                  requires_grad=False)
            self._tied_head = None
        for n in self._outside:
            p = self.model.get_parameter(n)
            set_tensor(self.model, n, torch.empty_like(p, device="meta"))
        self._outside = []
        trim_memory()


class MemoryLayers:
    """Layers of a model already in memory: onloading and offloading are no-ops."""

    def __init__(self, model: nn.Module):
        self.model = model

    def onload_layer(self, layer, prefix) -> None:
        pass

    def offload_layer(self, layer) -> None:
        pass

    def read_weight(self, module_name: str) -> torch.Tensor:
        return linear_weight(self.model.get_submodule(module_name)).detach()

    def onload_outside(self, layer_prefix: str, with_head: bool) -> None:
        pass

    def offload_outside(self) -> None:
        pass


