"""What ``group_size="auto"`` chooses on: calibration tokens held apart from the fitted Grams (ids only,
a few KB), kept in the statistics so the choice can be made, and remade, from them alone."""

from __future__ import annotations

from ...calibration.grams import batch_to_kwargs
from ...distributed import broadcast_object

__all__ = ["keep_selection_tokens", "selection_batches"]


def keep_selection_tokens(stats, dataloader, max_tokens: int, max_batches: int | None = None) -> None:
    """Keep up to ``max_tokens`` tokens of ``dataloader`` (the held-apart batches) in ``stats.extra``. Under
    ``torch.distributed`` every rank takes rank 0's, so all choose alike."""
    kept, seen = [], 0
    for i, batch in enumerate(dataloader):
        if (max_batches is not None and i >= max_batches) or seen >= max_tokens:
            break
        kw = batch_to_kwargs(batch, "cpu")
        mask = kw.get("attention_mask")
        kept.append((kw["input_ids"], mask))
        seen += int(mask.sum()) if mask is not None else kw["input_ids"].numel()
    kept = broadcast_object(kept)
    for i, (ids, mask) in enumerate(kept):
        stats.extra[f"selection/{i}/input_ids"] = ids
        if mask is not None:
            stats.extra[f"selection/{i}/attention_mask"] = mask


def selection_batches(stats) -> list[dict]:
    """The kept tokens as labelled batches (padding masked out of the labels)."""
    if stats is None:
        return []
    batches = []
    while f"selection/{len(batches)}/input_ids" in stats.extra:
        i = len(batches)
        ids = stats.extra[f"selection/{i}/input_ids"].long()
        mask = stats.extra.get(f"selection/{i}/attention_mask")
        labels = ids if mask is None else ids.masked_fill(mask == 0, -100)
        batches.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return batches
