"""Pipelines run the model and nothing else; methods consume what they produce.

- ``"whole_model"`` (:class:`WholeModelPipeline`): the model in memory, every batch through it whole.
- ``"layer_sequential"`` (:class:`LayerSequentialPipeline`): one decoder layer onloaded at a time (from
  memory or from safetensors shards), dense and/or compressed activation streams, layer events for a
  method's :class:`LayerHandler`, and a backward sweep for gradient statistics.
"""

from .activations import ActivationCache
from .handler import CallArgs, LayerContext, LayerHandler, PipelineRun
from .layer_sequential import LayerSequentialPipeline
from .whole_model import WholeModelPipeline

PIPELINES = {WholeModelPipeline.name: WholeModelPipeline, LayerSequentialPipeline.name: LayerSequentialPipeline}


def get_pipeline(name: str):
    try:
        return PIPELINES[name]
    except KeyError:
        raise ValueError(f"Unknown pipeline {name!r}; choose one of {sorted(PIPELINES)}.") from None


__all__ = ["ActivationCache", "CallArgs", "LayerContext", "LayerHandler", "LayerSequentialPipeline", "PIPELINES",
           "PipelineRun", "WholeModelPipeline", "get_pipeline"]
