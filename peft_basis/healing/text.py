"""The healing text: examples from blocks of ids, padding, and the guarantee that it holds no evaluation text."""

from __future__ import annotations

import torch

LEAK_WINDOW = 64  # tokens: a shared run this long between healing and evaluation text is a leak, not chance


def _as_examples(blocks, what: str) -> list[dict]:
    """``n x seq_len`` ids, or a sequence of 1-D id tensors / dicts with ``input_ids`` (and ``attention_mask``)."""
    if isinstance(blocks, torch.Tensor):
        if blocks.dim() != 2:
            raise ValueError(f"{what} must be an n x seq_len tensor of token ids, got shape {tuple(blocks.shape)}.")
        items = list(blocks)
    else:
        items = list(blocks or [])
    out = []
    for item in items:
        d = dict(item) if isinstance(item, dict) else {"input_ids": item}
        d["input_ids"] = torch.as_tensor(d["input_ids"]).long().reshape(-1)
        if d.get("attention_mask") is not None:
            d["attention_mask"] = torch.as_tensor(d["attention_mask"]).long().reshape(-1)
        out.append({k: v for k, v in d.items() if k in ("input_ids", "attention_mask", "labels") and v is not None})
    if not out:
        raise ValueError(f"{what} is empty: pass blocks of token ids, e.g. peft_basis.data.token_blocks(...).")
    return out


def _real_ids(example: dict) -> torch.Tensor:
    mask = example.get("attention_mask")
    return example["input_ids"] if mask is None else example["input_ids"][mask.bool()]


_P, _B = 2_147_483_647, 1_000_003  # a Mersenne prime and a base: polynomial hashes of token windows


def _window_hashes(ids: torch.Tensor, n: int) -> torch.Tensor:
    """The hash of every window of ``n`` consecutive ids (int64, no overflow for ids < 2^24 and n <= 64)."""
    if ids.numel() < n:
        return ids.new_zeros(0)
    powers = torch.tensor([pow(_B, n - 1 - j, _P) for j in range(n)], dtype=torch.int64)
    out = []
    for start in range(0, ids.numel() - n + 1, 1 << 15):
        windows = ids[start : start + (1 << 15) + n - 1].unfold(0, n, 1)
        out.append((windows * powers).sum(1) % _P)
    return torch.cat(out)


def check_held_apart(train_blocks, eval_blocks, window: int = LEAK_WINDOW) -> None:
    """Refuse healing text that contains evaluation text: no run of ``window`` tokens of any evaluation block
    (the whole block, if shorter) may occur in the healing text. ``eval_blocks``: a tensor, a list, or a dict
    name -> blocks."""
    train = torch.cat([_real_ids(e) for e in _as_examples(train_blocks, "train_blocks")])
    sets = eval_blocks if isinstance(eval_blocks, dict) else {"evaluation": eval_blocks}
    cache: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    for name, blocks in sets.items():
        leaked = 0
        examples = _as_examples(blocks, f"eval_blocks[{name!r}]")
        for ex in examples:
            ids = _real_ids(ex)
            n = min(window, ids.numel())
            if n == 0:
                continue
            if n not in cache:
                h = _window_hashes(train, n)
                cache[n] = torch.sort(h)
            sorted_h, order = cache[n]
            if sorted_h.numel() == 0:
                continue
            probe = _window_hashes(ids, n)
            pos = torch.searchsorted(sorted_h, probe).clamp_max(sorted_h.numel() - 1)
            for j in (sorted_h[pos] == probe).nonzero().flatten().tolist():  # a hash hit: compare the tokens
                k = int(pos[j])
                hit = False
                while k < sorted_h.numel() and sorted_h[k] == probe[j]:
                    start = int(order[k])
                    if torch.equal(train[start : start + n], ids[j : j + n]):
                        hit = True
                        break
                    k += 1
                if hit:
                    leaked += 1
                    break
        if leaked:
            which = "" if name == "evaluation" else f"{name!r} "
            raise ValueError(
                f"Healing text never contains the evaluation text: {leaked} of {len(examples)} {which}evaluation "
                f"blocks share a run of {window} tokens with the healing text. Heal on other parts of the text (the "
                "main job takes the blocks between the calibration and the evaluation blocks) or on another text.")


def _collate(examples: list[dict]) -> dict:
    """Stack, right-padding to the longest example (padding masked out; the loss never sees it)."""
    length = max(e["input_ids"].numel() for e in examples)
    batch = {"input_ids": torch.zeros(len(examples), length, dtype=torch.long),
             "attention_mask": torch.zeros(len(examples), length, dtype=torch.long)}
    has_labels = any("labels" in e for e in examples)
    if has_labels:
        batch["labels"] = torch.full((len(examples), length), -100, dtype=torch.long)
    for i, e in enumerate(examples):
        n = e["input_ids"].numel()
        batch["input_ids"][i, :n] = e["input_ids"]
        batch["attention_mask"][i, :n] = e.get("attention_mask", torch.ones(n, dtype=torch.long))
        if has_labels:
            batch["labels"][i, :n] = e.get("labels", e["input_ids"])
    return batch
