"""What a method sees of the layer-sequential pipeline: the events it handles and the layer it is handed."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from ..statistics import CalibrationStatistics

__all__ = ["CallArgs", "LayerContext", "LayerHandler", "PipelineRun"]


@dataclass
class CallArgs:
    """What the model passes every decoder layer besides the hidden states, for one batch (masks, rotary
    embeddings; GPT-2 passes its mask positionally), and which tokens are real (not padding)."""

    args: tuple
    kwargs: dict
    token_mask: torch.Tensor | None


@dataclass
class PipelineRun:
    """Handed to ``on_start``: the model (its layers on the meta device when read from a checkpoint), the
    target names, the decoder layers, the calibration batches as the pipeline runs them, and
    ``read_weight(module_name)``: a target's dense weight (``d_out x d_in``) at any time, read from the
    checkpoint (or the model in memory) without onloading its layer."""

    model: nn.Module
    target_names: list[str]
    container_name: str
    layers: nn.ModuleList
    batches: list
    device: torch.device | str
    read_weight: Callable[[str], torch.Tensor]
    model_name_or_path: str | None = None
    progress: bool = True


@dataclass
class LayerContext:
    """One decoder layer, onloaded, while a handler holds it."""

    index: int
    name: str  # e.g. "model.layers.7"
    layer: nn.Module
    targets: dict[str, nn.Module]  # full module name -> module, inside this layer
    stats: CalibrationStatistics = field(default_factory=CalibrationStatistics)
    pipeline: object = None  # the LayerSequentialPipeline running it
    # with ``LayerHandler.capture_dense_inputs``: the targets grouped by the tensor they read, in call order, and
    # per batch the dense input of each group's first member (tokens x d_in, padding removed, float32)
    stages: list[list[str]] | None = None
    dense_inputs: dict[int, dict[str, torch.Tensor]] | None = None

    def inputs(self, stream: str) -> list[torch.Tensor]:
        """This layer's inputs on ``stream`` (``"dense"`` / ``"compressed"``), one tensor per batch."""
        p = self.pipeline
        return [p.cache.get(stream, b, p.device) for b in range(len(p.call_args))]

    def dense_outputs(self) -> list[torch.Tensor]:
        """The dense layer's outputs on the dense inputs (computed before ``on_layer_calibrated``)."""
        p = self.pipeline
        return [p.cache.get("dense_out", b, p.device) for b in range(len(p.call_args))]

    @property
    def call_args(self) -> list[CallArgs]:
        return self.pipeline.call_args


class LayerHandler:
    """What a method does inside the layer-sequential pipeline. Subclass it and override the events you need;
    the class attributes say what the pipeline computes for you (events and streams:
    :mod:`peft_basis.calibration.pipelines.layer_sequential`).

    - ``streams``: ``"dense"``, ``"compressed"`` or ``"both"``.
    - ``gram_stream``: which stream the targets' input Grams are streamed on before
      ``on_layer_calibrated`` (``None``: none; the handler computes what it needs itself).
    - ``needs_backward``: keep every layer's dense inputs and run the backward sweep after the forward one.
    - ``capture_dense_inputs``: capture the targets' inputs on the dense stream in the pass that computes the
      dense outputs (``LayerContext.stages`` / ``dense_inputs``), instead of a pass of the handler's own.
    - ``needs_all_layers``: hand over every decoder layer. By default the forward sweep ends with the last layer
      that holds a target (the layers after it change nothing a handler sees); with ``needs_backward`` it always
      runs them all.
    """

    streams: str = "dense"
    gram_stream: str | None = "dense"
    needs_backward: bool = False
    capture_dense_inputs: bool = False
    needs_all_layers: bool = False

    def on_start(self, run: PipelineRun) -> None:
        pass

    def on_layer_calibrated(self, layer: LayerContext) -> None:
        pass

    def on_layer_done(self, layer: LayerContext) -> None:
        pass

    def on_backward_layer(self, layer: LayerContext) -> list:
        """Hooks to attach while the backward sweep runs ``layer`` (returned handles are removed after)."""
        return []

    def on_backward_layer_done(self, layer: LayerContext) -> None:
        pass

    def on_backward_done(self, sequences: int, tokens: int) -> None:
        pass

    def on_end(self):
        return None
