"""Quality, size and speed, measured the same way for every method."""

from __future__ import annotations

import math
import os
import time

import torch
from torch import nn


@torch.no_grad()
def perplexity(model: nn.Module, blocks: torch.Tensor, batch_size: int = 4, progress: bool | str = False) -> float:
    """Token-level perplexity over ``blocks`` (``n x seq_len`` ids), every block scored whole. ``progress``: a
    progress bar (its description, if a string)."""
    from tqdm.auto import tqdm

    from .validation import check_token_batch

    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    check_token_batch(blocks, None, getattr(emb, "num_embeddings", None), "perplexity blocks")
    was_training = model.training
    model.eval()
    nll, count = 0.0, 0
    device = next(p.device for p in model.parameters() if p.device.type != "meta")
    starts = range(0, blocks.shape[0], batch_size)
    desc = progress if isinstance(progress, str) else "perplexity"
    for i in tqdm(starts, desc=desc, unit="batch", disable=not progress, leave=False):
        ids = blocks[i : i + batch_size].to(device)
        logits = model(input_ids=ids, use_cache=False).logits[:, :-1].float()
        target = ids[:, 1:]
        nll += nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="sum").item()
        count += target.numel()
    model.train(was_training)
    return math.exp(nll / count)


def count_parameters(model: nn.Module) -> int:
    """Distinct parameter elements (tied embeddings counted once; dropped dense weights count 0)."""
    seen, total = set(), 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total


@torch.no_grad()
def tokens_per_second(model: nn.Module, batch_size: int = 8, seq_len: int = 256, repeats: int = 3,
                      vocab_size: int | None = None) -> float:
    """Forward throughput (prefill, no KV cache) on random ids; best of ``repeats`` after a warm-up."""
    vocab_size = vocab_size or model.config.vocab_size
    ids = torch.randint(0, vocab_size, (batch_size, seq_len), generator=torch.Generator().manual_seed(0))
    model.eval()
    model(input_ids=ids, use_cache=False)
    best = math.inf
    for _ in range(repeats):
        t = time.perf_counter()
        model(input_ids=ids, use_cache=False)
        best = min(best, time.perf_counter() - t)
    return batch_size * seq_len / best


def size_on_disk(path: str) -> int:
    if os.path.isfile(path):
        return os.path.getsize(path)
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


def rss_bytes() -> int:
    """Resident memory of this process now."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes() -> int:
    """Peak resident memory of this process image (Linux ``VmHWM``; since :func:`reset_peak_rss` if called).

    Not ``ru_maxrss``: Linux keeps that across ``execve``, so a process started by a large parent reports
    the parent's memory at fork time as its own peak (measured: 1.2 GB for a child that used 14 MB).
    ``ru_maxrss`` is the fallback where ``/proc`` is absent."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def reset_peak_rss() -> None:
    """Start :func:`peak_rss_bytes` again from the current memory (Linux >= 4.0; a no-op elsewhere)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
