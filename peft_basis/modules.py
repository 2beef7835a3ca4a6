"""Finding and reading the weights the methods act on, for any causal LM built from ``nn.Linear``
or GPT-2's ``Conv1D`` (which stores its weight transposed, ``d_in x d_out``)."""

from __future__ import annotations

import re

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

LINEAR_TYPES = (nn.Linear, Conv1D)


def is_linear(module: nn.Module) -> bool:
    return isinstance(module, LINEAR_TYPES)


def linear_weight(module: nn.Module) -> torch.Tensor:
    """The weight as ``d_out x d_in`` whatever the layer type (a view, not a copy)."""
    if isinstance(module, Conv1D):
        return module.weight.T
    return module.weight


def in_out_features(module: nn.Module) -> tuple[int, int]:
    if isinstance(module, Conv1D):
        d_in, d_out = module.weight.shape
        return d_in, d_out
    return module.in_features, module.out_features


_LAYER_INDEX = re.compile(r"\.(\d+)\.")


def layer_index(name: str) -> int | None:
    """Index of the repeated block a module sits in (``model.layers.7.mlp.up_proj`` -> 7)."""
    m = _LAYER_INDEX.search(f".{name}.")
    return int(m.group(1)) if m else None


def module_type(name: str) -> str:
    """The name with the layer index replaced, so the same matrix of every layer compares equal:
    ``model.layers.7.mlp.up_proj`` -> ``model.layers.*.mlp.up_proj``."""
    return _LAYER_INDEX.sub(".*.", f".{name}.", count=1).strip(".")


def output_embedding_names(model: nn.Module) -> set[str]:
    """Names of modules that are (tied to) the output embedding: never factorised by default, since
    compressing ``lm_head`` of a tied model would untie it and grow the model."""
    out = getattr(model, "get_output_embeddings", lambda: None)()
    if out is None:
        return set()
    return {n for n, m in model.named_modules() if m is out}


def find_linear_names(model: nn.Module, include_output_embedding: bool = False) -> list[str]:
    """Every Linear/Conv1D inside a repeated block, i.e. what ``target_modules=None`` means here."""
    skip = set() if include_output_embedding else output_embedding_names(model)
    return [n for n, m in model.named_modules() if is_linear(m) and n not in skip and layer_index(n) is not None]
