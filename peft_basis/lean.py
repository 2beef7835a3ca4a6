"""Lean loading of a compressed model: never materialise the dense weights the adapter replaces.

``AutoModelForCausalLM.from_pretrained(base)`` + ``PeftModel.from_pretrained(model, adapter)`` first
builds the whole dense model (peak memory = the dense model), then drops the replaced weights. Here
the base model is built on the meta device, every tensor the compressed model still needs is read
from the checkpoint's safetensors shards, the weights the adapter replaces are never read, and the
adapter is injected with PEFT's ``low_cpu_mem_usage`` path (its tensors are assigned straight from
the adapter file). Peak memory: the compressed model plus one tensor in flight (measured in
``docs/scaling.md``). The result is an ordinary ``PeftModel`` serving the factorised forward.
"""

from __future__ import annotations

import torch
from torch import nn

from .calibration.sequential import ShardedCheckpoint, _set_tensor, meta_model

__all__ = ["load_lean", "replaced_weight_names"]


def replaced_weight_names(peft_config) -> set[str]:
    """Checkpoint names of the dense weights a compression adapter replaces (``<module>.weight``)."""
    groups = getattr(peft_config, "groups", None)
    if not groups:
        raise ValueError(
            f"{type(peft_config).__name__} does not say which dense weights it replaces (no `groups`): lean loading "
            "supports compression adapters (SharedBasisConfig). Load other adapters with PeftModel.from_pretrained."
        )
    return {f"{m}.weight" for members in groups.values() for m in members}


def load_lean(model_path: str, adapter_path: str, *, dtype: torch.dtype | None = None,
              device: torch.device | str = "cpu", adapter_name: str = "default"):
    """Load ``adapter_path`` (a compressed model: SharedBasis) onto the base checkpoint at ``model_path``
    without ever reading the dense weights it replaces. Returns a ``PeftModel`` in eval mode whose
    logits equal ``PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_path), adapter_path)``."""
    import peft_basis  # noqa: F401  (registers the tuner types, so PEFT can read the adapter config)
    from peft import PeftConfig, PeftModel

    peft_config = PeftConfig.from_pretrained(adapter_path)
    skip = replaced_weight_names(peft_config)
    model = meta_model(model_path, dtype)
    ckpt = ShardedCheckpoint(model_path)
    try:
        names = dict(model.named_parameters(remove_duplicate=False))
        missing_in_model = sorted(n for n in skip if n not in names)
        if missing_in_model:
            raise ValueError(
                f"The adapter at {adapter_path} replaces {missing_in_model[:3]}, which the model at {model_path} lacks: "
                "load it onto the base model it was made from."
            )
        for name, p in names.items():
            if name in skip or p.device.type != "meta":
                continue
            if name in ckpt:
                _set_tensor(model, name, ckpt.get(name, dtype).to(device))
                ckpt.close()  # unmap at once: mapped shard pages count in RSS
        model.tie_weights()  # a tied output embedding is not in the checkpoint; it shares the input one
        for name, b in list(model.named_buffers()):
            if b.device.type == "meta" and name in ckpt:
                _set_tensor(model, name, ckpt.get(name).to(device))
    finally:
        ckpt.close()
    # The replaced weights get their shape but no memory: a zero-stride tensor holds one element, whatever its
    # shape (so shape-reading code such as GPT-2's Conv1D still works); SharedBasisLayer then drops it to a
    # zero-size tensor on `device`, where PEFT's low_cpu_mem_usage path moves the adapter tensors it assigns.
    for name in skip:
        owner_name, _, leaf = name.rpartition(".")
        owner = model.get_submodule(owner_name)
        p = owner._parameters[leaf]
        hollow = torch.empty_strided(tuple(p.shape), (0,) * p.dim(), dtype=dtype or p.dtype, device=device)
        owner._parameters[leaf] = nn.Parameter(hollow, requires_grad=False)
    peft_model = PeftModel.from_pretrained(model, adapter_path, adapter_name=adapter_name, low_cpu_mem_usage=True)
    # PEFT reads the adapter file onto its inferred device (CUDA when present); the layers' tensors follow their
    # base layer, but tensors on the tuner itself (the shared bases) would stay there: put everything on `device`.
    peft_model.to(device)
    hollow_left = [n for n, p in peft_model.named_parameters() if p.numel() > 0 and 0 in p.stride()]
    if hollow_left:
        raise RuntimeError(f"The adapter did not replace {hollow_left[:3]}; it does not match this base model.")
    still_meta = [n for n, p in peft_model.named_parameters() if p.device.type == "meta" and p.numel() > 0]
    if still_meta:
        raise RuntimeError(
            f"{len(still_meta)} tensors were in neither the base checkpoint nor the adapter (e.g. {still_meta[:3]}); "
            f"the checkpoint at {model_path} is incomplete for this architecture."
        )
    return peft_model.eval()
