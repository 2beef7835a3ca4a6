"""Writing a weight delta out as a PEFT LoRA adapter, where it has that form (e.g. deltas of LoRA
fine-tunes, or sums of a few of them): per Linear, the truncated SVD at the smallest exact rank."""

from __future__ import annotations

import os

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from ..errors import TaskVectorError
from ..io import atomic_write
from ..modules import is_linear


@torch.no_grad()
def lowrank_factors(delta: torch.Tensor, tol: float) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(B, A)`` with ``B @ A ~ delta`` (``d_out x d_in``) at the smallest rank whose relative Frobenius
    error is <= ``tol``; ``None`` for an all-zero delta."""
    d = delta.double()
    norm = float(d.norm())
    if norm == 0.0:
        return None
    U, S, Vh = torch.linalg.svd(d, full_matrices=False)
    tail = torch.cat([torch.cumsum(S.flip(0) ** 2, 0).flip(0), S.new_zeros(1)])  # tail[r] = sum_{i>=r} S_i^2
    ok = (tail.sqrt() <= tol * norm).nonzero()
    r = max(1, int(ok[0]))
    root = S[:r].sqrt()
    return (U[:, :r] * root).float(), (root[:, None] * Vh[:r]).float()


def write_lora(base_model: nn.Module, delta: dict[str, torch.Tensor], save_directory: str, tol: float = 1e-5) -> dict[str, int]:
    from peft import LoraConfig
    from safetensors.torch import save_file

    modules = dict(base_model.named_modules())
    tensors, ranks, fan_in_fan_out = {}, {}, set()
    for key, d in delta.items():
        name = key[: -len(".weight")] if key.endswith(".weight") else None
        module = modules.get(name) if name else None
        if module is None or not is_linear(module):
            if float(d.abs().max()) == 0.0:
                continue
            raise TaskVectorError(f"The delta changes {key!r}, which is not the weight of a Linear layer: a LoRA adapter "
                                  "cannot hold it. Write the result as a full model instead (add(...).save_pretrained).")
        conv = isinstance(module, Conv1D)
        mat = d.T if conv else d  # d_out x d_in
        f = lowrank_factors(mat, tol)
        if f is None:
            continue
        B, A = f
        r = A.shape[0]
        d_out, d_in = mat.shape
        if r * (d_out + d_in) >= d_out * d_in:
            raise TaskVectorError(f"The delta of {key!r} needs rank {r} of {min(d_out, d_in)} to stay within tol={tol}: "
                                  "it is not low-rank (a full fine-tune?), so LoRA factors would be larger than the "
                                  "weight. Write the result as a full model instead, or raise tol.")
        fan_in_fan_out.add(conv)
        tensors[f"base_model.model.{name}.lora_A.weight"] = A.contiguous()
        tensors[f"base_model.model.{name}.lora_B.weight"] = B.contiguous()
        ranks[name] = r
    if not ranks:
        raise TaskVectorError("The delta is zero everywhere: there is nothing to write as an adapter.")
    if len(fan_in_fan_out) > 1:
        raise TaskVectorError("The delta touches both Conv1D and Linear layers; one LoRA config cannot hold both "
                              "layouts. Write the result as a full model instead.")
    r_max = max(ranks.values())
    config = LoraConfig(r=r_max, lora_alpha=r_max, target_modules=sorted(ranks), lora_dropout=0.0, bias="none",
                        rank_pattern={n: r for n, r in ranks.items() if r != r_max},
                        alpha_pattern={n: r for n, r in ranks.items() if r != r_max},
                        fan_in_fan_out=fan_in_fan_out.pop(), init_lora_weights=False,
                        base_model_name_or_path=getattr(base_model, "name_or_path", None) or None)
    os.makedirs(save_directory, exist_ok=True)
    config.save_pretrained(save_directory)  # adapter_config.json (small; PEFT's own writer)
    atomic_write(os.path.join(save_directory, "adapter_model.safetensors"),
                 lambda p: save_file(tensors, p, metadata={"format": "pt"}))
    return ranks
