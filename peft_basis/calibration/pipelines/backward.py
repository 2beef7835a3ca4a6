"""The backward sweep of the layer-sequential pipeline: loss gradients through a model never whole in memory.

A statistic of the output gradients (a Fisher score needs each target's ``delta_t``) depends on every
later layer, so after the forward sweep (which kept each layer's dense inputs):

1. **Loss end**: the modules outside the decoder layers (embeddings, final norm, LM head) are onloaded,
   the last layer's outputs go through them one sequence at a time (the logits are the largest tensors
   of the whole pass), and the per-sequence loss is differentiated with respect to those outputs.
2. **Backward**, last layer first: the layer is onloaded again, re-run on its stored inputs with
   gradients on, the gradient arriving from layer ``i + 1`` is pushed through it with the handler's hooks
   attached (``on_backward_layer``), and the gradient with respect to its inputs goes to layer ``i - 1``.

Cost against the whole-model pass (one forward and one backward): one more forward per layer (the
re-run), every layer onloaded twice, and the layers' inputs written once and read once
(``layers x tokens x hidden`` values, on disk by default). Memory: one layer, its autograd graph for one
batch, the stored input being re-run and the gradients of every batch, and at the loss end the logits of
one sequence.
"""

from __future__ import annotations

import torch
from torch import nn
from tqdm.auto import tqdm

from ..fisher import batch_labels, sequence_loss
from ..grams import batch_to_kwargs
from .activations import ActivationCache
from .handler import LayerContext


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


def backward_sweep(pipeline, handler, layer_inputs: ActivationCache) -> None:
    model = pipeline.model
    # gradients flow to the activations only: no parameter gradient is formed (nor left on a user's model)
    flags = {p: p.requires_grad for p in model.parameters()}
    for p in flags:
        p.requires_grad_(False)
    try:
        _backward_sweep(pipeline, handler, layer_inputs)
    finally:
        for p, f in flags.items():
            p.requires_grad_(f)


def _backward_sweep(pipeline, handler, layer_inputs: ActivationCache) -> None:
    grads, n_seqs, n_tokens = _loss_end(pipeline)
    model, device = pipeline.model, pipeline.device
    prefix0 = pipeline.container_name + "."
    by_layer: dict[int, dict[str, nn.Module]] = {}
    for n in pipeline.names:
        i = int(n[len(prefix0):].split(".", 1)[0])
        by_layer.setdefault(i, {})[n] = model.get_submodule(n)
    with torch.enable_grad():
        for i in tqdm(reversed(range(len(pipeline.layers))), total=len(pipeline.layers), desc="backward",
                      unit="layer", disable=not pipeline.progress):
            layer = pipeline.layers[i]
            pipeline.source.onload_layer(layer, f"{prefix0}{i}.")
            ctx = LayerContext(i, f"{prefix0}{i}", layer, by_layer.get(i, {}), pipeline=pipeline)
            handles = handler.on_backward_layer(ctx)
            try:
                for b, call in enumerate(pipeline.call_args):
                    if grads[b] is None:
                        continue
                    x = layer_inputs.get(f"layer_{i}", b, device).requires_grad_(True)
                    out = layer(x, *call.args, **call.kwargs)
                    out = out[0] if isinstance(out, (tuple, list)) else out
                    torch.autograd.backward(out, grads[b])
                    grads[b] = x.grad if i > 0 else None
                    del x, out
            finally:
                for h in handles:
                    h.remove()
                pipeline.source.offload_layer(layer)
                layer_inputs.drop(f"layer_{i}")
            handler.on_backward_layer_done(ctx)
    handler.on_backward_done(n_seqs, n_tokens)


def _loss_end(pipeline):
    """Per batch, d(loss)/d(last layer's output) (None for a batch without labelled tokens), and how many
    sequences and labelled tokens count."""
    model, device, layers = pipeline.model, pipeline.device, pipeline.layers
    container_name = pipeline.container_name
    labels = [batch_labels(batch_to_kwargs(b, device)) for b in pipeline.batches]
    pipeline.source.onload_outside(container_name + ".", with_head=True)
    parent_name, _, attr = container_name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    inject = _InjectOutputs(layers[-1])
    setattr(parent, attr, nn.ModuleList([inject]))
    grads, n_seqs, n_tokens = [], 0, 0
    try:
        with torch.enable_grad():
            for b, batch in enumerate(tqdm(pipeline.batches, desc="loss", unit="batch",
                                           disable=not pipeline.progress)):
                if labels[b] is None:
                    grads.append(None)
                    continue
                kwargs = batch_to_kwargs(batch, device)
                kwargs.pop("labels", None)
                final = pipeline.cache.get("dense", b, device)
                grad = torch.empty_like(final)
                # one sequence at a time: the loss is a sum over sequences, so nothing changes
                for s in range(final.shape[0]):
                    inject.value = final[s : s + 1].detach().requires_grad_(True)
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
        pipeline.source.offload_outside()
    return grads, n_seqs, n_tokens
