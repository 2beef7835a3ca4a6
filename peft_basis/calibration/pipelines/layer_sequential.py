"""The layer-sequential pipeline: run a causal LM one decoder layer at a time, for methods to consume.

This module runs the model and nothing else (llm-compressor's sequential pipeline). The calibration
batches go through the embeddings once; then, layer after layer, the layer is onloaded (from the
checkpoint's safetensors shards, or already in memory), its targets' input Grams are streamed by the
same hooks as the whole-model pipeline, the method's :class:`LayerHandler` gets the layer's events,
and the layer's outputs become the next layer's inputs before it is offloaded; the sweep ends with the
last layer that holds a target (unless the handler needs the loss or every layer). A method never runs
the model itself; it reacts to events:

- ``on_start(run)``: the model (meta or real), the target names, the layer container.
- ``on_layer_calibrated(layer)``: the layer is onloaded and ``layer.stats`` holds its targets' input
  Grams (all ranks' data). The handler may change the layer in place (compress it).
- ``on_layer_done(layer)``: the layer's outputs are computed (through the layer as the handler left
  it, for the ``"compressed"`` stream); the layer is offloaded right after.
- ``on_backward_layer(layer)`` / ``on_backward_done(...)``: with ``needs_backward``, a second sweep
  from the last layer pushes the loss gradient back through each layer (re-run on its stored inputs),
  with the handler's hooks attached (the layer-by-layer Fisher pass).
- ``on_end()``: its return value is what :meth:`LayerSequentialPipeline.run` returns.

Streams: ``"dense"`` (every layer sees the dense model's inputs: its statistics equal the whole-model
ones), ``"compressed"`` (every layer sees the outputs of the layers before it as the handler left
them: llm-compressor's sequential mode), or ``"both"`` (the two side by side, for methods that fit
the compressed model to the dense one). Statistics are all-reduced under ``torch.distributed``
before any handler sees them. Memory: one decoder layer, the activations of the streams kept (in RAM
or on disk, :class:`~peft_basis.calibration.pipelines.activations.ActivationCache`), and what the
handler keeps.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterable
from itertools import islice

import torch
from torch import nn
from tqdm.auto import tqdm

from ...errors import CalibrationError
from ...modules import layer_index
from ..grams import GramCollector, backbone, batch_to_kwargs
from ..statistics import CalibrationStatistics
from .activations import ActivationCache
from .backward import backward_sweep
from .handler import CallArgs, LayerContext, LayerHandler, PipelineRun
from .layer_sources import CheckpointLayers, MemoryLayers

__all__ = ["LayerContext", "LayerHandler", "LayerSequentialPipeline", "STREAMS"]

STREAMS = ("dense", "compressed", "both")


def layers_container(model: nn.Module, target_names: list[str]) -> tuple[str, nn.ModuleList]:
    """The ``ModuleList`` of decoder layers the targets live in (``model.layers`` for Llama)."""
    first = target_names[0]
    idx = layer_index(first)
    if idx is None:
        raise ValueError(f"{first} is not inside a repeated decoder layer; the sequential pipeline needs layered targets.")
    container_name = first[: first.index(f".{idx}.")]
    container = model.get_submodule(container_name)
    if not isinstance(container, nn.ModuleList):
        raise ValueError(f"{container_name} is not a ModuleList of decoder layers.")
    outside = [n for n in target_names if not n.startswith(container_name + ".")]
    if outside:
        raise ValueError(f"Targets outside {container_name} ({outside[:3]}) cannot be calibrated layer by layer; exclude them.")
    return container_name, container


class _Captured(Exception):
    pass


def _input_hook(name: str, got: dict, token_mask: torch.Tensor | None, wanted: int | None = None):
    """A forward pre-hook that stores a module's input in ``got[name]`` (tokens x d_in, padding removed,
    float32); with ``wanted``, it stops the forward (``_Captured``) once ``got`` holds that many."""

    def pre_hook(_module, args, kwargs=None):
        x = args[0] if args else next(iter(kwargs.values()))
        flat = x.detach().reshape(-1, x.shape[-1])
        if token_mask is not None and token_mask.numel() == flat.shape[0]:
            flat = flat[token_mask]
        got[name] = flat.float()
        if wanted is not None and len(got) == wanted:
            raise _Captured

    return pre_hook


# ---- the pipeline ----------------------------------------------------------------------------------
class LayerSequentialPipeline:
    """Run ``handler``'s events over ``model`` (a model in memory) or ``model_path`` (a safetensors
    checkpoint, one layer read at a time), for the calibration batches of ``dataloader``.

    ``target_names(model)`` gives the modules whose input Grams are streamed (usually the tuner's
    ``resolve_target_names``). ``activations``: where the streams wait between layers (``"memory"`` or
    ``"disk"``); ``saved_inputs``: where every layer's inputs wait for the backward sweep (``"disk"`` by
    default: they grow with depth); ``scratch_dir``: where disk files go."""

    name = "layer_sequential"

    def __init__(self, model: nn.Module | str, target_names, dataloader: Iterable, *, max_batches: int | None = None,
                 progress: bool = True, dtype: torch.dtype | None = None, device: torch.device | str = "cpu",
                 activations: str = "memory", saved_inputs: str = "disk", scratch_dir: str | None = None):
        if isinstance(model, str):
            self.source = CheckpointLayers(model, dtype, device)
        else:
            self.source = MemoryLayers(model)
            device = next((p.device for p in model.parameters() if p.device.type != "meta"), torch.device(device))
        self.model = self.source.model
        self.names = target_names(self.model) if callable(target_names) else list(target_names)
        self.container_name, self.layers = layers_container(self.model, self.names)
        self.batches = list(islice(dataloader, max_batches))
        if not self.batches:
            raise CalibrationError("The dataloader yielded no batches. Pass at least one batch of `input_ids`.")
        self.progress, self.device = progress, device
        self.activations, self.saved_inputs, self.scratch_dir = activations, saved_inputs, scratch_dir
        self.cache: ActivationCache | None = None
        self.call_args: list[CallArgs] = []
        self._input_orders: dict[tuple, list[list[str]]] = {}

    # -- public ---------------------------------------------------------------------------------------
    def run(self, handler: LayerHandler):
        if handler.streams not in STREAMS:
            raise ValueError(f"streams must be one of {STREAMS}, not {handler.streams!r}.")
        was_training = self.model.training
        self.model.eval()
        self.cache = ActivationCache(self.activations, self.scratch_dir)
        layer_inputs = ActivationCache(self.saved_inputs, self.scratch_dir) if handler.needs_backward else None
        try:
            handler.on_start(PipelineRun(self.model, self.names, self.container_name, self.layers, self.batches,
                                         self.device, self.source.read_weight,
                                         getattr(self.model, "name_or_path", None), self.progress))
            self._embed(handler.streams)
            self._forward_sweep(handler, layer_inputs)
            if handler.needs_backward:
                backward_sweep(self, handler, layer_inputs)
            return handler.on_end()
        finally:
            self.cache.close()
            if layer_inputs is not None:
                layer_inputs.close()
            self.model.train(was_training)

    def run_layer(self, layer: nn.Module, stream: str, collector: GramCollector | None = None,
                  store: str | None = None, capture: dict[str, nn.Module] | None = None) -> dict[int, dict]:
        """Run ``layer`` on every batch of ``stream`` (streaming ``collector``'s Grams if given); ``store``: the
        stream the outputs go to (None: dropped). ``capture``: modules whose inputs are returned, per batch, as
        :meth:`capture_inputs` returns them (in the same pass)."""
        captured: dict[int, dict] = {}
        with torch.no_grad(), (collector.attached() if collector is not None else contextlib.nullcontext()):
            for b, call in enumerate(self.call_args):
                got = captured[b] = {} if capture else None
                handles = [m.register_forward_pre_hook(_input_hook(n, got, call.token_mask))
                           for n, m in (capture or {}).items()]
                try:
                    if collector is not None:
                        collector.start_batch(call.token_mask)
                    out = layer(self.cache.get(stream, b, self.device), *call.args, **call.kwargs)
                finally:
                    for h in handles:
                        h.remove()
                if store is not None:
                    self.cache.put(store, b, out[0] if isinstance(out, (tuple, list)) else out)
        if collector is not None:
            collector.end_batch()
        if not capture:
            return {}
        for got in captured.values():
            self._check_captured(capture, got, layer)
        return captured

    def input_order(self, layer: nn.Module, modules: dict[str, nn.Module], stream: str = "dense") -> list[list[str]]:
        """``modules`` grouped by the tensor they read (q/k/v read one), in the order ``layer`` calls them (batch 0).
        Found once per layer class and set of targets (by their names inside the layer): the decoder layers of
        one model call their modules alike (a hybrid model is refused before the sweep)."""
        inside = {id(m): n for n, m in layer.named_modules()}
        key = (type(layer), tuple(sorted(inside.get(id(m), name) for name, m in modules.items())))
        known = self._input_orders.get(key)
        if known is not None:
            by_inside = {inside.get(id(m), name): name for name, m in modules.items()}
            return [[by_inside[n] for n in stage] for stage in known]
        stages = self._input_order(layer, modules, stream)
        self._input_orders[key] = [[inside.get(id(modules[n]), n) for n in stage] for stage in stages]
        return stages

    def _input_order(self, layer: nn.Module, modules: dict[str, nn.Module], stream: str) -> list[list[str]]:
        order: list[tuple[str, int]] = []
        seen: dict[int, tuple] = {}  # id(tensor) -> (weakref, input number); the weakref proves it is the same tensor

        def hook(name):
            def pre_hook(_module, args, kwargs=None):
                x = args[0] if args else next(iter(kwargs.values()))
                known = seen.get(id(x))
                if known is None or known[0]() is not x:
                    known = seen[id(x)] = (weakref.ref(x), len(order) and max(k for _, k in order) + 1)
                order.append((name, known[1]))

            return pre_hook

        call = self.call_args[0]
        handles = [m.register_forward_pre_hook(hook(n)) for n, m in modules.items()]
        try:
            with torch.no_grad():
                layer(self.cache.get(stream, 0, self.device), *call.args, **call.kwargs)
        finally:
            for h in handles:
                h.remove()
        groups: dict[int, list[str]] = {}
        for name, key in order:
            if name not in groups.setdefault(key, []):
                groups[key].append(name)
        return [groups[k] for k in sorted(groups)]

    def forward(self, layer: nn.Module, stream: str, batch: int) -> torch.Tensor:
        """``layer``'s output hidden states on one batch of ``stream`` (gradients as the caller's context says)."""
        call = self.call_args[batch]
        out = layer(self.cache.get(stream, batch, self.device), *call.args, **call.kwargs)
        return out[0] if isinstance(out, (tuple, list)) else out

    def capture_inputs(self, layer: nn.Module, stream: str, modules: dict[str, nn.Module], *,
                       batches: Iterable[int] | None = None):
        """Per batch of ``stream``, the inputs of ``modules`` when ``layer`` runs on it (as it is now): yields
        ``(batch_index, {name: tokens x d_in})``, padded tokens removed, in float32. The forward stops as soon
        as every module has been reached, so capturing the first modules of a layer costs little."""
        for b in range(len(self.call_args)) if batches is None else batches:
            call, got = self.call_args[b], {}
            handles = [m.register_forward_pre_hook(_input_hook(n, got, call.token_mask, len(modules)))
                       for n, m in modules.items()]
            try:
                with torch.no_grad():
                    layer(self.cache.get(stream, b, self.device), *call.args, **call.kwargs)
            except _Captured:
                pass
            finally:
                for h in handles:
                    h.remove()
            self._check_captured(modules, got, layer)
            yield b, got

    @staticmethod
    def _check_captured(modules: dict, got: dict, layer: nn.Module) -> None:
        missing = set(modules) - set(got)
        if missing:
            raise CalibrationError(f"{sorted(missing)[:3]} were never called by {type(layer).__name__}; remove "
                                   "them from `target_modules`.")

    # -- steps ----------------------------------------------------------------------------------------
    def _embed(self, streams: str) -> None:
        """Run everything before the first decoder layer once; keep its inputs (the first stream values)."""
        model, device = self.model, self.device
        runner, _ = backbone(model, self.names)
        self.source.onload_outside(self.container_name + ".", with_head=False)
        store = {}

        def hook(_module, args, kwargs):
            store["args"], store["kwargs"] = args, kwargs
            raise _Captured

        handle = self.layers[0].register_forward_pre_hook(hook, with_kwargs=True)
        keys = ["dense", "compressed"] if streams == "both" else [streams]
        try:
            with torch.no_grad():
                for b, batch in enumerate(tqdm(self.batches, desc="embedding", unit="batch",
                                               disable=not self.progress)):
                    kwargs = batch_to_kwargs(batch, device)
                    kwargs.pop("labels", None)
                    mask = kwargs.get("attention_mask")
                    try:
                        runner(**kwargs, use_cache=False)
                    except _Captured:
                        pass
                    else:
                        raise RuntimeError("The model's forward never called its first decoder layer.")
                    args, kw = tuple(store["args"]), dict(store["kwargs"])
                    hidden = args[0] if args else kw.pop("hidden_states")
                    for key in keys:
                        self.cache.put(key, b, hidden)
                    self.call_args.append(CallArgs(args[1:], kw, None if mask is None else mask.reshape(-1).bool()))
        finally:
            handle.remove()
            self.source.offload_outside()

    def _forward_sweep(self, handler: LayerHandler, layer_inputs: ActivationCache | None) -> None:
        model, streams = self.model, handler.streams
        by_layer: dict[int, list[str]] = {}
        for n in self.names:
            by_layer.setdefault(layer_index(n[len(self.container_name):]), []).append(n)
        first_type = getattr(self.layers[0], "attention_type", None)
        prefix0 = self.container_name + "."
        # past the last targeted layer nothing is calibrated: stop there, unless the loss is needed (the backward
        # sweep starts from it) or the handler asks for every layer
        runs_all = handler.needs_backward or handler.needs_all_layers or not by_layer
        stop = len(self.layers) if runs_all else max(by_layer) + 1
        for i in tqdm(range(stop), desc="layers", unit="layer", disable=not self.progress):
            layer = self.layers[i]
            if getattr(layer, "attention_type", None) != first_type:
                raise NotImplementedError(
                    f"Layer {i} uses attention type {layer.attention_type!r} but layer 0 uses {first_type!r} (a hybrid "
                    "sliding-window model); the sequential pipeline replays layer 0's attention mask. Use `calibrate` "
                    "on the whole model for this architecture."
                )
            self.source.onload_layer(layer, f"{prefix0}{i}.")
            try:
                targets = {n: model.get_submodule(n) for n in by_layer.get(i, [])}
                stats, stages, dense_inputs = self._layer_grams(layer, i, targets, handler, layer_inputs)
                ctx = LayerContext(i, f"{prefix0}{i}", layer, targets, stats, self, stages, dense_inputs)
                handler.on_layer_calibrated(ctx)
                if streams in ("compressed", "both"):  # through the layer as the handler left it
                    self.run_layer(layer, "compressed", store="compressed_out")
                handler.on_layer_done(ctx)
                del ctx
                for stream in ("dense", "compressed"):  # this layer's outputs are the next one's inputs
                    if f"{stream}_out" in self.cache:
                        self.cache.rename(f"{stream}_out", stream)
            finally:
                self.source.offload_layer(layer)

    def _layer_grams(self, layer, i, targets, handler, layer_inputs):
        """The dense outputs are computed here, while the layer is as loaded (``"dense_out"`` until the layer is
        done); Grams are streamed on ``handler.gram_stream``, in the same pass where that is the dense one, and so
        are the dense inputs ``handler.capture_dense_inputs`` asks for. Returns the statistics, the stages and
        the captured inputs (None when not asked for)."""
        collector = GramCollector(targets) if handler.gram_stream is not None and targets else None
        stages = owners = dense_inputs = None
        if handler.capture_dense_inputs and targets and handler.streams in ("dense", "both"):
            stages = self.input_order(layer, targets)
            owners = {stage[0]: targets[stage[0]] for stage in stages}
        if layer_inputs is not None:
            for b in range(len(self.call_args)):
                layer_inputs.put(f"layer_{i}", b, self.cache.get("dense", b))
        if handler.streams in ("dense", "both"):
            captured = self.run_layer(layer, "dense", collector if handler.gram_stream == "dense" else None,
                                      store="dense_out", capture=owners)
            dense_inputs = captured or None
        if handler.gram_stream == "compressed" and collector is not None:
            self.run_layer(layer, "compressed", collector)
        if collector is None:
            return CalibrationStatistics(), stages, dense_inputs
        never = [n for n in targets if n not in collector.stats.sources]
        if never:
            raise CalibrationError(
                f"{len(never)} target modules of layer {i} were never called (e.g. {never[:3]}). Remove them from "
                "`target_modules`."
            )
        return collector.finalize(), stages, dense_inputs
