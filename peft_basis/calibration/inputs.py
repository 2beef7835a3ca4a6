"""What calibration reads, checked before it is used (both pipelines): token batches (ids inside the model's
vocabulary, a mask of the ids' shape), a one-shot iterator kept so that every pass sees every batch, and the
base model's fingerprint recorded in the statistics (:mod:`peft_basis.fingerprint`)."""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Iterable, Iterator

import torch
from torch import nn

from ..fingerprint import model_fingerprint
from ..validation import check_token_batch
from .grams import batch_to_kwargs

__all__ = ["batches_fingerprint", "checked_batches", "model_vocab_size", "statistics_fingerprint"]


class _Checked:
    """Iterates ``batches``, checking each batch as it is handed out (one ``min``/``max`` over the ids)."""

    def __init__(self, batches: Iterable, vocab_size: int | None):
        self.batches, self.vocab_size = batches, vocab_size

    def __iter__(self):
        for i, batch in enumerate(self.batches):
            kw = batch_to_kwargs(batch, "cpu")
            check_token_batch(kw["input_ids"], kw.get("attention_mask"), self.vocab_size, f"calibration batch {i}")
            yield batch


class _CheckedSized(_Checked):
    def __len__(self) -> int:
        return len(self.batches)


def checked_batches(dataloader: Iterable | None, vocab_size: int | None, max_batches: int | None = None):
    """``dataloader`` as calibration reads it. A generator or other one-shot iterator is read into a list first
    (token ids are small): the Gram pass would otherwise exhaust it, and the passes after it (Fisher scores,
    ``group_size="auto"``'s selection tokens) would silently see no data."""
    if dataloader is None or isinstance(dataloader, _Checked):
        return dataloader
    if isinstance(dataloader, Iterator):
        dataloader = list(itertools.islice(dataloader, max_batches) if max_batches is not None else dataloader)
    return (_CheckedSized if hasattr(dataloader, "__len__") else _Checked)(dataloader, vocab_size)


def model_vocab_size(model: nn.Module | str) -> int | None:
    """Rows of the input embedding (a model, or a checkpoint folder's config)."""
    if isinstance(model, nn.Module):
        emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
        return getattr(emb, "num_embeddings", None) or getattr(getattr(model, "config", None), "vocab_size", None)
    try:
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(model).vocab_size
    except (OSError, ValueError, AttributeError):
        return None


def statistics_fingerprint(model: nn.Module | str, target_names) -> dict | None:
    """The fingerprint of a model in memory, or of a checkpoint folder (its few tensors read from the shards)."""
    if isinstance(model, nn.Module):
        return model_fingerprint(model, target_names(model) if callable(target_names) else target_names)
    from ..io import ShardedCheckpoint, meta_model

    meta = meta_model(model)
    ckpt = ShardedCheckpoint(model)
    try:
        names = list(target_names(meta) if callable(target_names) else target_names)
        names += [n.rpartition(".")[0] for n, _ in meta.named_parameters() if n not in ckpt]  # e.g. a tied head
        return model_fingerprint(meta, names, read=lambda n: ckpt.get(n))
    finally:
        ckpt.close()


def batches_fingerprint(batches: Iterable, max_batches: int | None = None) -> str:
    """A digest of the calibration tokens (ids, mask, labels, in order): whether two runs saw the same data."""
    digest = hashlib.sha256()
    for batch in itertools.islice(batches, max_batches):
        for key, value in sorted(batch_to_kwargs(batch, "cpu").items()):
            value = value.to(torch.int64).contiguous()
            digest.update(f"{key}{tuple(value.shape)}".encode())
            digest.update(value.numpy().tobytes())
    return digest.hexdigest()[:32]
