"""Fisher scores layer by layer: backward passes through a model that is never whole in memory.

A Fisher score needs each target's output gradient ``delta_t``, which depends on every later layer, so
the layer-sequential pipeline runs in two sweeps over the decoder layers:

1. **Forward** (:func:`~peft_basis.calibration.sequential.iter_layer_statistics`): layer ``i`` is loaded,
   its targets' input Grams are streamed (exactly as ``calibrate_sequential``), the method's Fisher
   directions are computed from them (``fisher_plan``), and the layer's *inputs* are stored (on disk by
   default, one safetensors file per layer), then the layer is freed.
2. **Loss end**: the modules outside the decoder layers (embeddings, final norm, LM head) are loaded,
   the last layer's outputs go through them, and the per-sequence loss is differentiated with respect
   to those outputs.
3. **Backward**, last layer first: layer ``i`` is loaded again, re-run on its stored inputs with
   gradients on, and the gradient arriving from layer ``i + 1`` is pushed through it. The same hooks as
   the whole-model pass (:mod:`peft_basis.calibration.fisher`) turn each target's inputs and output
   gradients into Fisher scores; the gradient with respect to the layer's inputs goes to layer ``i - 1``.

The result equals the whole-model ``calibrate`` (same loss, same per-sequence gradients; tested).

What it costs, against the whole-model path (one Gram forward, then one forward and one backward):
the same arithmetic plus one more forward per layer (re-running it in the backward sweep: about
4 forward-equivalents instead of 3, plus the Gram arithmetic), every layer read from the checkpoint
twice, and the layers' inputs written once and read once (``layers x tokens x hidden`` values, on
disk: 30 x 8192 x 576 x 4 bytes = 0.57 GB for SmolLM2-135M and 8192 tokens; 80 x 8192 x 8192 x 4 =
21 GB for a 70B Llama). Memory: one layer, its autograd graph for one batch, two activation sets
(the stored input being re-run and the gradients of every batch), and at the loss end the logits of
one sequence (the loss end runs sequence by sequence), whatever the depth.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterable
from itertools import islice

import torch
from torch import nn
from tqdm.auto import tqdm

from .engine import batch_to_kwargs
from .fisher import accumulators, batch_labels, finish_fisher, sequence_loss
from .sequential import (
    ShardedCheckpoint,
    _layers_container,
    _set_tensor,
    iter_layer_statistics,
    materialize,
    meta_model,
    release,
    trim_memory,
)
from .statistics import CalibrationStatistics

__all__ = ["calibrate_sequential_fisher"]

ACTIVATIONS = ("disk", "memory")


class _ActivationStore:
    """Each layer's inputs, per batch, between the forward and the backward sweep: in RAM or in scratch files."""

    def __init__(self, where: str, scratch_dir: str | None):
        if where not in ACTIVATIONS:
            raise ValueError(f"activations must be one of {ACTIVATIONS}, not {where!r}.")
        self.where = where
        self.memory: dict[int, list[torch.Tensor]] = {}
        self.dir = None
        if where == "disk":
            if scratch_dir is not None:
                os.makedirs(scratch_dir, exist_ok=True)
            self.dir = tempfile.mkdtemp(prefix=".fisher-activations-", dir=scratch_dir)

    def put(self, layer: int, tensors: list[torch.Tensor]) -> None:
        if self.dir is None:
            self.memory[layer] = [t.detach() for t in tensors]
            return
        from safetensors.torch import save_file

        save_file({str(b): t.detach().contiguous().cpu() for b, t in enumerate(tensors)}, self._path(layer))

    def get(self, layer: int, batch: int, device) -> torch.Tensor:
        if self.dir is None:
            return self.memory[layer][batch]
        from safetensors import safe_open

        with safe_open(self._path(layer), framework="pt", device="cpu") as f:
            return f.get_tensor(str(batch)).to(device)

    def drop(self, layer: int) -> None:
        self.memory.pop(layer, None)
        if self.dir is not None and os.path.exists(self._path(layer)):
            os.remove(self._path(layer))

    def close(self) -> None:
        self.memory.clear()
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)

    def _path(self, layer: int) -> str:
        return os.path.join(self.dir, f"layer_{layer}.safetensors")


class _InjectOutputs(nn.Module):
    """Stands in for the whole stack of decoder layers at the loss end: returns the stored outputs of the
    last layer, so the model's own forward applies what follows the layers (final norm, LM head)."""

    def __init__(self, like: nn.Module):
        super().__init__()
        self.value: torch.Tensor | None = None
        if hasattr(like, "attention_type"):  # models pick each layer's mask by it
            self.attention_type = like.attention_type

    def forward(self, hidden_states, *args, **kwargs):
        return self.value


def calibrate_sequential_fisher(
    model_path: str,
    config,
    dataloader: Iterable,
    *,
    max_batches: int | None = None,
    progress: bool = True,
    dtype: torch.dtype | None = None,
    device: torch.device | str = "cpu",
    activations: str = "disk",
    scratch_dir: str | None = None,
    summarise=None,
) -> CalibrationStatistics:
    """Input Grams and Fisher scores of ``config``'s targets, one decoder layer in memory at a time (module doc).

    ``config``'s tuner must define ``fisher_plan`` (BASIS with ``rank_allocation="fisher"``). Returns the
    statistics ``calibrate(model, config, dataloader)`` would compute (not yet attached to ``config``:
    :func:`~peft_basis.calibration.sequential.calibrate_sequential` does that). ``activations``: where the
    layers' inputs wait for the backward sweep, ``"disk"`` (default; scratch files under ``scratch_dir``,
    or the system's temporary folder, removed afterwards) or ``"memory"`` (faster, but grows with depth).
    Under ``torch.distributed`` every rank passes its own shard; Grams and scores are all-reduced.
    ``summarise(model, item)``: called on each layer's statistics while the layer is loaded, before its Fisher
    directions are computed (``calibrate_sequential(..., keep_grams=False)`` swaps the Grams for the
    method's summary of them there).
    """
    from . import _tuner_cls

    tuner_cls = _tuner_cls(config)
    plan_for = getattr(tuner_cls, "fisher_plan", None)
    if plan_for is None:
        raise TypeError(f"{type(config).__name__} computes no Fisher scores; use calibrate_sequential.")
    batches = list(islice(dataloader, max_batches))
    model = meta_model(model_path, dtype)
    names = tuner_cls.resolve_target_names(model, config)
    container_name, layers = _layers_container(model, names)
    layer_prefix = container_name + "."

    merged = CalibrationStatistics()
    accs, directions, plans = {}, {}, []
    store = _ActivationStore(activations, scratch_dir)
    try:
        # ---- 1. forward sweep: Grams, Fisher directions, and every layer's inputs ---------------------------
        final, call_args = None, None
        for item in iter_layer_statistics(model_path, config, batches, max_batches=None, progress=progress,
                                          dtype=dtype, device=device, model=model, keep_inputs=True):
            if summarise is not None:
                summarise(model, item)
            merged.merge(item.stats)
            if item.targets:
                plan = plan_for(model, config, list(item.targets), item.stats)
                if plan is None:
                    raise ValueError(f"{type(config).__name__} as configured needs no Fisher scores; use "
                                     "calibrate_sequential.")
                plans.append(plan)
                accs.update(accumulators(plan.directions, plan.mode, device))
                # finish_fisher only needs their shapes
                directions.update({n: tuple(None if t is None else t.to("meta") for t in d)
                                   for n, d in plan.directions.items()})
            store.put(item.index, item.inputs)
            item.inputs = None  # on disk now (or owned by the store)
            final, call_args = item.outputs, item.call_args
        plan = plans[0]

        # ---- 2. the loss end: gradients of the loss with respect to the last layer's outputs ---------------
        labels = [batch_labels(batch_to_kwargs(b, device)) for b in batches]
        grads, n_seqs, n_tokens = _loss_end(model_path, model, container_name, layers, batches, labels, final,
                                            dtype, device, progress)
        del final

        # ---- 3. backward sweep, last layer first --------------------------------------------------------------
        ckpt = ShardedCheckpoint(model_path)
        named = dict(model.named_modules())
        with torch.enable_grad():
            for i in tqdm(reversed(range(len(layers))), total=len(layers), desc="fisher (backward)", unit="layer",
                          disable=not progress):
                layer, prefix = layers[i], f"{layer_prefix}{i}."
                materialize(layer, prefix, ckpt, dtype, device)
                ckpt.close()
                handles = [named[n].register_forward_hook(acc.hook) for n, acc in accs.items() if n.startswith(prefix)]
                try:
                    for b, (args, kwargs) in enumerate(call_args):
                        if grads[b] is None:
                            continue
                        x = store.get(i, b, device).requires_grad_(True)
                        out = layer(x, *args, **kwargs)
                        out = out[0] if isinstance(out, (tuple, list)) else out
                        torch.autograd.backward(out, grads[b])
                        grads[b] = x.grad if i > 0 else None
                        del x, out
                finally:
                    for h in handles:
                        h.remove()
                    release(layer)
                    store.drop(i)
                    trim_memory()
                for n in [n for n in accs if n.startswith(prefix)]:  # the directions are not needed any more
                    accs[n].U = accs[n].R = None
        ckpt.close()
    finally:
        store.close()
    scores = finish_fisher(accs, directions, named, plan.mode, n_seqs, n_tokens, device, merged, plan.key)
    for p in plans:
        p.store(merged, {n: scores[n] for n in p.directions})
    return merged


def _loss_end(model_path, model, container_name, layers, batches, labels, final, dtype, device, progress):
    """Per batch, d(loss)/d(last layer's output) (None for a batch without labelled tokens), and how many
    sequences and labelled tokens count. Loads the modules outside the decoder layers for the time being."""
    ckpt = ShardedCheckpoint(model_path)
    # a tied LM head is not in the checkpoint: it is the input embedding (tied below)
    outside = [n for n, _ in model.named_parameters() if not n.startswith(container_name + ".") and n in ckpt]
    for n in outside:
        _set_tensor(model, n, ckpt.get(n, dtype).to(device))
    ckpt.close()
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    tied = head is not None and head.weight.device.type == "meta"
    if tied:
        head.weight = model.get_input_embeddings().weight
    parent_name, _, attr = container_name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    inject = _InjectOutputs(layers[-1])
    setattr(parent, attr, nn.ModuleList([inject]))
    grads, n_seqs, n_tokens = [], 0, 0
    try:
        with torch.enable_grad():
            for b, batch in enumerate(tqdm(batches, desc="fisher (loss)", unit="batch", disable=not progress)):
                if labels[b] is None:
                    grads.append(None)
                    continue
                kwargs = batch_to_kwargs(batch, device)
                kwargs.pop("labels", None)
                grad = torch.empty_like(final[b])
                # one sequence at a time: the logits (sequence x vocabulary, and their gradient) are the largest
                # tensors of the whole pass; the loss is a sum over sequences, so nothing changes
                for s in range(final[b].shape[0]):
                    inject.value = final[b][s : s + 1].detach().requires_grad_(True)
                    out = model(**{k: v[s : s + 1] for k, v in kwargs.items()}, use_cache=False)
                    loss, seqs, tokens = sequence_loss(out.logits, labels[b][s : s + 1])
                    loss.backward()
                    grad[s : s + 1] = inject.value.grad
                    n_seqs, n_tokens = n_seqs + seqs, n_tokens + tokens
                    inject.value = None
                    del out, loss
                grads.append(grad)
    finally:
        setattr(parent, attr, layers)
        if tied:
            head.weight = nn.Parameter(torch.empty_like(head.weight, device="meta"), requires_grad=False)
        for n in outside:
            p = model.get_parameter(n)
            _set_tensor(model, n, torch.empty_like(p, device="meta"))
        trim_memory()
    return grads, n_seqs, n_tokens
