"""Input Grams: forward hooks that stream ``X^T X`` of every target's input, batch by batch.

Nothing is kept but the running sums. The Gram arithmetic is kept near its floor (``d_in^2 / 2``
multiply-adds per token and *distinct* input) by (1) sharing one Gram between the Linears that read
the same tensor (q/k/v, gate/up), and (2) computing only the upper block-triangle of each Gram.
Both pipelines (:mod:`peft_basis.calibration.pipelines`) attach these hooks. A module whose method needs only
``W G W^T`` (``output_modules``: a private whitened factorisation of a module with a narrower output than input)
streams ``Y^T Y`` of its outputs instead, unless another target reads the same input (whose Gram is then made anyway).
A first forward of a few tokens under :meth:`GramCollector.laying_out` finds which targets share an input and makes
every Gram before the data's first batch: made during that batch, the Grams would sit among its activations in the
heap, and the holes they leave are memory the allocator keeps.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from contextlib import contextmanager
import weakref

import torch
from torch import nn

from ..modules import in_out_features, layer_index
from ..validation import all_finite, check_finite_parameters
from .statistics import INPUT_TRACE, OUTPUT_GRAM, CalibrationStatistics

# Below this width one GEMM is cheapest; above it, splitting into blocks and skipping the lower
# triangle saves (nb - 1) / (2 nb) of the Gram arithmetic for a few extra kernel launches.
_BLOCKED_MIN_WIDTH = 512
_NUM_BLOCKS = 4


def accumulate_gram(gram: torch.Tensor, x: torch.Tensor) -> None:
    """``gram += x^T x`` (upper block-triangle only; :func:`symmetrize` fills the rest)."""
    d = x.shape[1]
    if d < _BLOCKED_MIN_WIDTH:
        gram.addmm_(x.T, x)
        return
    edges = [round(i * d / _NUM_BLOCKS) for i in range(_NUM_BLOCKS + 1)]
    for i in range(_NUM_BLOCKS):
        a, b = edges[i], edges[i + 1]
        xi_t = x[:, a:b].T
        gram[a:b, a:].addmm_(xi_t, x[:, a:])


def symmetrize(gram: torch.Tensor) -> torch.Tensor:
    """Mirror the upper triangle into the lower one (in place)."""
    d = gram.shape[0]
    if d >= _BLOCKED_MIN_WIDTH:
        upper = torch.triu(gram)
        gram.copy_(upper + torch.triu(gram, diagonal=1).T)
    return gram


def batch_to_kwargs(batch, device) -> dict:
    """Accept what users have: a dict/BatchEncoding, a tensor of ids, or an (ids, mask) tuple."""
    if isinstance(batch, Mapping):
        kwargs = {k: batch[k] for k in ("input_ids", "attention_mask", "labels") if k in batch}
    elif isinstance(batch, torch.Tensor):
        kwargs = {"input_ids": batch}
    elif isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], torch.Tensor):
        kwargs = {"input_ids": batch[0]}
        if len(batch) > 1:
            kwargs["attention_mask"] = batch[1]
    else:
        raise TypeError(
            f"Calibration batches must be dicts with `input_ids`, tensors of token ids, or (input_ids, attention_mask) "
            f"tuples; got {type(batch).__name__}."
        )
    if "input_ids" not in kwargs:
        raise TypeError("Calibration batches need `input_ids`.")
    out = {}
    for k, v in kwargs.items():
        v = torch.as_tensor(v)
        if v.dim() == 1:
            v = v[None]
        out[k] = v.to(device)
    return out


def model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        if p.device.type != "meta":
            return p.device
    return torch.device("cpu")


class GramCollector:
    """Forward hooks on ``modules`` that stream their input Grams into a :class:`CalibrationStatistics`."""

    def __init__(self, modules: dict[str, nn.Module], stats: CalibrationStatistics | None = None,
                 output_modules: Iterable[str] = ()):
        self.modules = modules
        self.stats = stats if stats is not None else CalibrationStatistics()
        self.output_candidates = set(output_modules) & set(modules)
        self.output_mode: set[str] = set()  # the candidates that turned out to be their input's only reader
        self._seen: dict[int, tuple] = {}  # id(tensor) -> (weakref, Gram key), current batch
        self.token_mask: torch.Tensor | None = None
        self._handles = []
        self._laying_out = False  # inside `laying_out`: find the sources, make the Grams, add nothing

    def start_batch(self, attention_mask: torch.Tensor | None) -> None:
        """Before each batch: which tokens count (mask 1), and forget which tensors the last batch's modules read."""
        self._seen.clear()
        self.token_mask = None if attention_mask is None else attention_mask.reshape(-1).bool()

    def end_batch(self) -> None:
        self._seen.clear()

    @contextmanager
    def laying_out(self):
        """A forward pass inside this block makes every Gram it reaches (zero) and records which targets share
        an input, without counting its tokens; a target it does not reach (an unused expert) gets its Gram later."""
        self._laying_out = True
        try:
            yield
        finally:
            self._laying_out = False
            self.end_batch()

    def _hook(self, name: str):
        def hook(module, args, kwargs=None):
            x = args[0] if args else next(iter(kwargs.values()))
            owner = self.stats.sources.get(name)
            if owner is not None and owner != name:
                return  # its Gram is accumulated by the module that owns this input
            # Same tensor object as an earlier module's input in this batch -> share its Gram. A weak
            # reference (not the data pointer, which the allocator reuses) proves it is the same tensor.
            seen = self._seen.get(id(x))
            if owner is None and seen is not None and seen[0]() is x:
                self.stats.sources[name] = seen[1]
                return
            if owner is None and name in self.output_candidates:
                self.output_mode.add(name)  # (not in _seen: a later reader of x makes its own input Gram)
            self.stats.sources[name] = name
            if self._laying_out:
                if name not in self.output_mode:
                    self._seen[id(x)] = (weakref.ref(x), name)
                    self._new_gram(name, in_out_features(module)[0], x.device)
                return
            flat = self._tokens(x)
            if name in self.output_mode:  # the input's trace here (the damping's scale), Y^T Y in the output hook
                key = INPUT_TRACE + name
                trace = flat.reshape(-1).dot(flat.reshape(-1)).double().reshape(1)
                self.stats.extra[key] = trace if key not in self.stats.extra else self.stats.extra[key] + trace
                self.stats.tokens[name] = self.stats.tokens.get(name, 0) + flat.shape[0]
                self.stats.meta.setdefault("output_gram_inputs", {})[name] = flat.shape[1]
                return
            self._seen[id(x)] = (weakref.ref(x), name)
            self._new_gram(name, in_out_features(module)[0], flat.device)
            accumulate_gram(self.stats.grams[name], flat)
            self.stats.tokens[name] += flat.shape[0]

        return hook

    def _new_gram(self, name: str, d: int, device: torch.device) -> None:
        if name not in self.stats.grams:
            self.stats.grams[name] = torch.zeros(d, d, dtype=torch.float32, device=device)
            self.stats.tokens[name] = 0

    def _tokens(self, t: torch.Tensor) -> torch.Tensor:
        flat = t.detach().reshape(-1, t.shape[-1])
        if self.token_mask is not None and self.token_mask.numel() == flat.shape[0]:
            flat = flat[self.token_mask]
        return flat.float()

    def _output_hook(self, name: str):
        def hook(module, args, output):
            if name not in self.output_mode:
                return
            key = OUTPUT_GRAM + name
            if key not in self.stats.extra:
                d = output.shape[-1]
                self.stats.extra[key] = torch.zeros(d, d, dtype=torch.float32, device=output.device)
            if self._laying_out:
                return
            y = self._tokens(output)
            bias = getattr(module, "bias", None)
            if bias is not None:
                y = y - bias.detach().float()
            accumulate_gram(self.stats.extra[key], y)

        return hook

    @contextmanager
    def attached(self):
        try:
            for name, m in self.modules.items():
                self._handles.append(m.register_forward_pre_hook(self._hook(name)))
                if name in self.output_candidates:
                    self._handles.append(m.register_forward_hook(self._output_hook(name)))
            yield self
        finally:
            for h in self._handles:
                h.remove()
            self._handles.clear()

    def finalize(self) -> CalibrationStatistics:
        """Mirror the Grams, all-reduce them across ``torch.distributed`` ranks, check them."""
        self.end_batch()
        for g in [*self.stats.grams.values(), *(self.stats.extra[OUTPUT_GRAM + n] for n in self.output_mode)]:
            symmetrize(g)
        for n in self.output_mode:  # a non-finite output Gram from finite inputs: the module's own weights
            if not all_finite(self.stats.extra[OUTPUT_GRAM + n]):
                check_finite_parameters(self.modules[n], n, "calibrating it")
        self.stats.all_reduce()
        self.stats.validate()
        return self.stats


def backbone(model: nn.Module, target_names: Iterable[str]) -> tuple[nn.Module, str]:
    """The decoder without the LM head, when no target lives outside it (saves the head's matmul)."""
    prefix = getattr(model, "base_model_prefix", "")
    inner = getattr(model, prefix, None) if prefix else None
    if isinstance(inner, nn.Module) and inner is not model and all(n.startswith(prefix + ".") for n in target_names):
        return inner, prefix + "."
    return model, ""


def last_targeted_layer(model: nn.Module, target_names: Iterable[str]) -> nn.Module | None:
    """The decoder layer after which no target runs, where a forward that only streams statistics can stop: every
    target inside one ``ModuleList`` of distinct layers, and the last layer holding one not the list's last
    (None otherwise)."""
    names = list(target_names)
    if not names or any(layer_index(n) is None for n in names):
        return None
    first = names[0]
    container_name = first[: first.index(f".{layer_index(first)}.")]
    if not all(n.startswith(container_name + ".") for n in names):
        return None
    container = model.get_submodule(container_name)
    if not isinstance(container, nn.ModuleList) or len({id(m) for m in container}) < len(container):
        return None
    last = max(layer_index(n[len(container_name):]) for n in names)
    return container[last] if last < len(container) - 1 else None
