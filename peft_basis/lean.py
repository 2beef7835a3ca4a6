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

from .io import ShardedCheckpoint, meta_model, set_tensor

__all__ = ["load_lean", "replaced_weight_names"]


def replaced_weight_names(peft_config) -> set[str]:
    """Checkpoint names of the dense weights a compression adapter replaces (``<module>.weight``)."""
    replaced = getattr(peft_config, "replaced_modules", None)
    modules = replaced() if replaced is not None else []
    if not modules:
        raise ValueError(
            f"This {type(peft_config).__name__} adapter replaces no dense weight: lean loading supports compression "
            "adapters (SharedBasisConfig, and BaselConfig without keep_dense_weight). Load other adapters with "
            "PeftModel.from_pretrained."
        )
    return {f"{m}.weight" for m in modules}


def load_lean(model_path: str, adapter_path: str, *, dtype: torch.dtype | None = None,
              device: torch.device | str = "cpu", adapter_name: str = "default"):
    """Load ``adapter_path`` (a compressed model: SharedBasis, or Basel trained or consolidated) onto the base checkpoint at ``model_path``
    without ever reading the dense weights it replaces. Returns a ``PeftModel`` in eval mode whose
    logits equal ``PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_path), adapter_path)``."""
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
                set_tensor(model, name, ckpt.get(name, dtype).to(device))
                ckpt.close()  # unmap at once: mapped shard pages count in RSS
        model.tie_weights()  # a tied output embedding is not in the checkpoint; it shares the input one
        for name, b in list(model.named_buffers()):
            if b.device.type == "meta" and name in ckpt:
                set_tensor(model, name, ckpt.get(name).to(device))
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
    # Inject with PEFT (adapter tensors on meta), then assign the adapter file in chunks with PEFT's own
    # set_peft_model_state_dict: PeftModel.from_pretrained would first read the whole file into memory, which
    # (with the file's mapped pages) costs twice the adapter at the peak.
    peft_config.inference_mode = True
    # Under the meta device context, the tuner's placeholders for the factors (zeros it fills from the file)
    # take no memory either.
    with torch.device("meta"):
        peft_model = PeftModel(model, peft_config, adapter_name=adapter_name, low_cpu_mem_usage=True)
    _load_adapter_in_chunks(peft_model, adapter_path, adapter_name, device, dtype)
    peft_model.to(device)  # tensors on the tuner itself (the shared bases) follow no base layer
    for p in peft_model.parameters():  # inference, as PeftModel.from_pretrained(is_trainable=False) leaves it
        p.requires_grad_(False)
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


CHUNK_BYTES = 64 * 2**20


def _load_adapter_in_chunks(peft_model, adapter_path: str, adapter_name: str, device, dtype=None) -> None:
    import os

    from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
    from safetensors import safe_open

    from .persistence import check_loaded_tensors

    file = os.path.join(adapter_path, "adapter_model.safetensors")
    if not os.path.exists(file):
        raise FileNotFoundError(f"{file} not found: lean loading reads safetensors adapters (save_pretrained's default).")
    try:
        with safe_open(file, framework="pt") as f:
            keys = list(f.keys())
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error type for a damaged header
        from .errors import CheckpointError

        raise CheckpointError(f"{file} is damaged or truncated ({e}): save or download the adapter again.") from e
    expected = get_peft_model_state_dict(peft_model, adapter_name=adapter_name)
    # the factors in the model's dtype (assigning keeps the file's dtype: an fp32 adapter on a bf16 model)
    want = {k: t.dtype for k, t in expected.items()}
    unexpected: list[str] = []
    i = 0
    while i < len(keys):
        chunk, size = {}, 0
        with safe_open(file, framework="pt", device="cpu") as f:  # reopened per chunk: mapped pages are released
            while i < len(keys) and (not chunk or size < CHUNK_BYTES):
                t = f.get_tensor(keys[i])
                t = t.to(device, dtype=want[keys[i]]) if t.is_floating_point() and keys[i] in want else t.to(device)
                chunk[keys[i]] = t
                size += t.numel() * t.element_size()
                i += 1
        check_loaded_tensors(peft_model, chunk, adapter_name, complete=False, where=adapter_path)
        result = set_peft_model_state_dict(peft_model, chunk, adapter_name=adapter_name, low_cpu_mem_usage=True)
        unexpected += result.unexpected_keys
        del chunk
    missing = sorted(k for k in expected if k not in keys)
    if missing:
        present = {k: torch.empty(0, device="meta") for k in keys}
        check_loaded_tensors(peft_model, present, adapter_name, where=adapter_path)  # raises: names what is missing
    if unexpected:
        raise RuntimeError(f"The adapter holds tensors this model has no place for (e.g. {unexpected[:3]}); load it onto "
                           "the base model it was made from.")
