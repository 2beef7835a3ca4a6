"""Standalone compressed checkpoints: a compressed model saved without its dense base, loaded back
without it (see ``docs/standalone.md``).

``save_compressed(peft_model, path)`` writes every tensor the compressed model still uses and its
factors once (optionally int8); ``CompressedModel.from_pretrained(path_or_repo_id)`` returns the
transformers model with its targeted Linears factorised.
"""

from .checkpoint import FORMAT_VERSION, CompressedCheckpointError
from .load import CompressedModel
from .modules import LowRankLinear, pad_ranks
from .save import push_compressed_to_hub, save_compressed

__all__ = [
    "FORMAT_VERSION",
    "CompressedCheckpointError",
    "CompressedModel",
    "LowRankLinear",
    "pad_ranks",
    "push_compressed_to_hub",
    "save_compressed",
]
