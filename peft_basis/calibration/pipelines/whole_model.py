"""The whole-model pipeline: the model in memory, one forward (and, for Fisher scores, one backward) pass
per calibration batch, statistics streamed by hooks (never activations kept whole).

Cost floor of the Gram pass: the forward passes plus, per token and per *distinct* input, the symmetric
Gram update (``d_in^2 / 2`` multiply-adds); the decoder runs without its ``lm_head`` when no target needs
it (the 49k-vocab head of SmolLM2 is ~20% of its forward).

When every target sits in the first layers (``layers_to_transform``), the Gram pass stops after the last layer
holding one.

Memory floor: the model, the Grams and one decoder layer's activations. The Grams are all made before the
first batch (a forward of a few tokens lays them out), not among its activations: made during it, they leave
the heap in pieces the allocator keeps. Even so, in some runs (about one in five, whatever the hash seed,
address randomisation or thread count) glibc's heap grows during a forward with free space it does not reuse,
by several times that forward's activations. So on the CPU each batch runs one sequence at a time (as fast:
the GEMMs have 512 rows or more), which bounds that growth to a sequence's activations, and the heap's free
pages are handed back after each (``malloc_trim``, a few milliseconds; after every layer it would cost a fifth
of the pass in page faults).
"""

from __future__ import annotations

from collections.abc import Iterable
from contextlib import ExitStack

import torch
from torch import nn
from tqdm.auto import tqdm

from ...errors import CalibrationError
from ...memory import trim_memory
from ..fisher import accumulators, batch_labels, finish_fisher, sequence_loss
from ..grams import GramCollector, backbone, batch_to_kwargs, last_targeted_layer, model_device
from ..statistics import CalibrationStatistics

__all__ = ["WholeModelPipeline", "collect_fisher", "collect_grams", "model_loss"]

_LAYOUT_TOKENS = 8


class WholeModelPipeline:
    """The model in memory, every batch through it whole. ``grams()`` streams the targets' input Grams;
    ``fisher(plan, stats)`` runs the backward passes a :class:`~peft_basis.calibration.fisher.FisherPlan`
    asks for."""

    name = "whole_model"

    def __init__(self, model: nn.Module, target_names: list[str], dataloader: Iterable, *,
                 max_batches: int | None = None, progress: bool = True):
        self.model, self.names, self.dataloader = model, target_names, dataloader
        self.max_batches, self.progress = max_batches, progress

    def grams(self, stats: CalibrationStatistics | None = None, output_modules=()) -> CalibrationStatistics:
        return collect_grams(self.model, self.names, self.dataloader, max_batches=self.max_batches,
                             progress=self.progress, stats=stats, output_modules=output_modules)

    def fisher(self, plan, stats: CalibrationStatistics) -> dict[str, torch.Tensor]:
        return collect_fisher(self.model, plan.directions, self.dataloader, mode=plan.mode,
                              max_batches=self.max_batches, progress=self.progress, stats=stats, key=plan.key,
                              output_moments=plan.output_moments)


def collect_grams(
    model: nn.Module,
    target_names: list[str],
    dataloader: Iterable,
    *,
    max_batches: int | None = None,
    progress: bool = True,
    stats: CalibrationStatistics | None = None,
    output_modules: Iterable[str] = (),
) -> CalibrationStatistics:
    """One forward pass over ``dataloader`` (no grad, no KV cache), streaming the input Gram of every
    module in ``target_names`` (the output Gram of those in ``output_modules`` that are their input's only
    reader: see :class:`~peft_basis.calibration.grams.GramCollector`); all-reduced when ``torch.distributed``
    is initialised."""
    named = dict(model.named_modules())
    missing = [n for n in target_names if n not in named]
    if missing:
        raise ValueError(f"calibrate: modules not found in the model: {missing[:5]}")
    collector = GramCollector({n: named[n] for n in target_names}, stats, output_modules)
    runner, _ = backbone(model, target_names)
    runner = _stopping_after(runner, last_targeted_layer(model, target_names))
    device = model_device(model)
    total = len(dataloader) if hasattr(dataloader, "__len__") else None
    if max_batches is not None and total is not None:
        total = min(total, max_batches)
    was_training = model.training
    model.eval()
    n_batches = 0
    try:
        with torch.no_grad(), collector.attached():
            for batch in tqdm(dataloader, total=total, desc="calibrating", unit="batch", disable=not progress):
                if max_batches is not None and n_batches >= max_batches:
                    break
                kwargs = batch_to_kwargs(batch, device)
                kwargs.pop("labels", None)
                if n_batches == 0:
                    with collector.laying_out():
                        collector.start_batch(None)
                        runner(**{k: v[:1, :_LAYOUT_TOKENS] for k, v in kwargs.items()}, use_cache=False)
                for rows in _sequences(kwargs, device):
                    collector.start_batch(rows.get("attention_mask"))
                    runner(**rows, use_cache=False)
                    trim_memory()
                n_batches += 1
    finally:
        model.train(was_training)
    if n_batches == 0:
        raise CalibrationError("calibrate: the dataloader yielded no batches. Pass at least one batch of `input_ids`.")
    never_called = [n for n in target_names if n not in collector.stats.sources]
    if never_called:
        raise CalibrationError(
            f"calibrate: {len(never_called)} target modules were never called in the forward pass "
            f"(e.g. {never_called[:3]}). Remove them from `target_modules`."
        )
    return collector.finalize()


class _LastTargetDone(Exception):
    pass


def _stopping_after(runner: nn.Module, layer: nn.Module | None):
    """``runner``, its forward ended once ``layer`` has run (the layers after it change no statistic)."""
    if layer is None:
        return runner

    def stop(_module, _args, _output):
        raise _LastTargetDone

    def run(**kwargs):
        handle = layer.register_forward_hook(stop)
        try:
            runner(**kwargs)
        except _LastTargetDone:
            pass
        finally:
            handle.remove()

    return run


def _sequences(kwargs: dict, device: torch.device):
    """The batch one sequence at a time on the CPU (the same Grams: they are sums over tokens), the whole batch
    elsewhere. Why: on the CPU a 512-token sequence keeps the GEMMs as fast, and the heap glibc leaves behind
    (see the module's docstring) scales with one forward's activations."""
    n = kwargs["input_ids"].shape[0]
    if device.type != "cpu" or n == 1:
        yield kwargs
        return
    for i in range(n):
        yield {k: v[i : i + 1] for k, v in kwargs.items()}


def collect_fisher(
    model: nn.Module,
    directions: dict[str, tuple[torch.Tensor | None, torch.Tensor | None]],
    dataloader: Iterable,
    *,
    mode: str = "diagonal",
    max_batches: int | None = None,
    progress: bool = True,
    stats: CalibrationStatistics | None = None,
    key: str = "fisher",
    output_moments: bool = False,
) -> dict[str, torch.Tensor]:
    """Empirical Fisher scores of the given directions of every module in ``directions``
    (``name -> (U, R)``, ``U`` ``d_out x k`` or None, ``R`` ``k x d_in`` or None; see the module doc).

    Batches as for ``calibrate``; ``labels`` are used when present (``-100`` = ignored), otherwise the
    ``input_ids`` (padding masked by ``attention_mask``). Returns ``name -> float32 scores`` (mean over
    the sequences that have at least one labelled token) and, with ``stats``, stores them in
    ``stats.extra[fisher_key(name, key)]`` with the sequence count in ``stats.meta[key + "_sequences"]``,
    so they are saved and loaded with the rest of the statistics. ``output_moments``: also each module's
    ``mean_t delta_t^2`` per output, in ``stats.extra[output_fisher_key(name)]``.
    """
    named = dict(model.named_modules())
    missing = [n for n in directions if n not in named]
    if missing:
        raise ValueError(f"collect_fisher: modules not found in the model: {missing[:5]}")
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if embeddings is None:
        raise ValueError("collect_fisher needs a model with `get_input_embeddings()` (a transformers model).")
    device = model_device(model)
    accs = accumulators(directions, mode, device, output_moments)

    def embed_hook(module, args, output):
        return output.requires_grad_(True) if not output.requires_grad else output

    total = len(dataloader) if hasattr(dataloader, "__len__") else None
    if max_batches is not None and total is not None:
        total = min(total, max_batches)
    flags = {p: p.requires_grad for p in model.parameters()}
    was_training = model.training
    model.eval()
    n_seqs, n_batches, n_labelled_tokens = 0, 0, 0
    try:
        for p in flags:
            p.requires_grad_(False)
        with ExitStack() as stack, torch.enable_grad():
            handles = [embeddings.register_forward_hook(embed_hook)]
            handles += [named[n].register_forward_hook(acc.hook) for n, acc in accs.items()]
            stack.callback(lambda: [h.remove() for h in handles])
            for batch in tqdm(dataloader, total=total, desc="fisher", unit="batch", disable=not progress):
                if max_batches is not None and n_batches >= max_batches:
                    break
                n_batches += 1
                kwargs = batch_to_kwargs(batch, device)
                labels = batch_labels(kwargs)
                if labels is None:
                    continue
                # sum over sequences of each one's mean NLL: a sequence without labelled tokens adds nothing. One
                # sequence at a time: the scores are sums over sequences, so nothing changes, but the autograd graph,
                # the logits and the hooks' projected inputs are one sequence's, not the batch's
                rows = labels.shape[0]
                for s in range(rows):
                    one = {k: v[s : s + 1] if isinstance(v, torch.Tensor) and v.dim() and v.shape[0] == rows else v
                           for k, v in kwargs.items()}
                    out = model(**one, use_cache=False)
                    loss, seqs, tokens = sequence_loss(out.logits, labels[s : s + 1])
                    if seqs:
                        loss.backward()
                    n_seqs += seqs
                    n_labelled_tokens += tokens
                    del out, loss
    finally:
        for p, f in flags.items():
            p.requires_grad_(f)
        model.train(was_training)
    if n_batches == 0:
        raise CalibrationError("Fisher scores: the dataloader yielded no batches. Pass at least one batch of `input_ids`.")
    return finish_fisher(accs, directions, named, mode, n_seqs, n_labelled_tokens, device, stats, key)


@torch.no_grad()
def model_loss(model: nn.Module, batches: list[dict], forwards: dict | None = None) -> float:
    """Mean next-token loss of ``model`` over labelled ``batches``, with each module in ``forwards`` computing
    through the given function instead of its own forward (how a method scores a candidate compression
    without building it)."""
    device = next(p.device for p in model.parameters() if p.numel() > 0)
    patched, was_training = [], model.training
    total, count = 0.0, 0
    try:
        for module, fn in (forwards or {}).items():
            module.forward = fn
            patched.append(module)
        model.eval()
        for b in batches:
            kw = {k: v.to(device) for k, v in b.items() if v is not None}
            n = int((kw["labels"][:, 1:] != -100).sum())
            total += float(model(**kw, use_cache=False).loss) * n
            count += n
    finally:
        for module in patched:
            del module.forward
        model.train(was_training)
    return total / max(count, 1)
