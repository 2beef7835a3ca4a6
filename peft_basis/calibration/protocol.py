"""What a method declares to the calibration pipelines: one small contract, written once.

A tuner class (every peft-basis tuner, through :class:`~peft_basis.tuners.base.PeftBasisTuner`)
is a :class:`CalibrationMethod`. The pipelines ask it, never guess by attribute lookup:

- ``resolve_target_names(model, config)``: the modules whose input Grams are streamed (required).
- ``needs_fisher(config)`` / ``fisher_plan(model, config, names, stats)``: whether Fisher scores are
  needed, and of which directions (a :class:`~peft_basis.calibration.fisher.FisherPlan`) given the
  modules' Grams. Either pipeline then runs the backward passes (whole model, or the layer-sequential
  backward sweep).
- ``output_gram_modules(model, config, names)``: the targets whose fit reads only ``W G W^T`` (a private
  whitened factorisation with an output narrower than the input): the whole-model pipeline streams their
  output Grams (``d_out^2`` instead of ``d_in^2``: less memory and arithmetic) where no other target reads
  the same input. Default: none.
- ``extra_calibration(model, config, stats, dataloader, ...)``: anything else the method keeps from the
  calibration data (Basis Sharing's ``group_size="auto"`` keeps token ids to score groupings on).
- ``held_apart_batches(config, n_batches)``: calibration batches to keep out of the fitted Grams (the method
  makes a choice on them: Basis Sharing's ``group_size="auto"``); the whole-model pipeline then streams their
  Grams separately (``held_apart/gram/<key>``) and hands those batches to ``extra_calibration``.
- ``has_layer_summary`` / ``layer_summary(model, config, names, stats)``: what ``get_peft_model`` needs of
  one layer's Grams, computed while the layer is loaded, so the layer-sequential pipeline can keep that
  instead of the Grams (``calibrate_sequential(..., keep_grams=False)``).
- ``layer_calibrator(config, statistics=None)``: a
  :class:`~peft_basis.calibration.pipelines.handler.LayerHandler` whose run returns the statistics, for a
  config whose statistics need the layer-sequential pipeline (Basis Sharing's anchored fit: each layer is
  fitted on the compressed model's inputs); ``None`` (default): the whole-model pipeline serves. When the
  method also ``needs_fisher``, ``statistics`` holds the dense model's Grams and Fisher scores, computed first.
- ``layer_compressor(config, output_dir, statistics=None, **options)``: a
  :class:`~peft_basis.calibration.pipelines.handler.LayerHandler` that compresses the model layer by
  layer and writes the adapter (``peft_basis.compress_sequential``); ``None`` where the method has none.
"""

from __future__ import annotations

import abc

from torch import nn

__all__ = ["CalibrationMethod", "method_for"]


class CalibrationMethod(abc.ABC):
    has_layer_summary: bool = False

    @classmethod
    @abc.abstractmethod
    def resolve_target_names(cls, model: nn.Module, config) -> list[str]:
        """Full names of the modules ``config`` targets in ``model``."""

    @classmethod
    def needs_fisher(cls, config) -> bool:
        return False

    @classmethod
    def fisher_plan(cls, model: nn.Module, config, names: list[str], stats, *, progress: bool = False):
        """The directions whose Fisher scores the method needs (``None``: none), from ``names``' Grams
        (``progress``: a progress bar while they are computed, for a whole model's worth of ``names``)."""
        return None

    @classmethod
    def output_gram_modules(cls, model: nn.Module, config, names: list[str]) -> list[str]:
        return []

    @classmethod
    def extra_calibration(cls, model: nn.Module, config, stats, dataloader, *, max_batches=None,
                          progress: bool = True) -> None:
        """Called after the Gram (and Fisher) passes of the whole-model pipeline, with the same data."""

    @classmethod
    def held_apart_batches(cls, config, n_batches: int) -> list[int]:
        return []

    @classmethod
    def layer_summary(cls, model: nn.Module, config, names: list[str], stats) -> dict:
        raise NotImplementedError(f"{cls.__name__} keeps no layer summary; it needs the Grams themselves.")

    @classmethod
    def layer_calibrator(cls, config, statistics=None):
        return None

    @classmethod
    def layer_compressor(cls, config, output_dir: str, statistics=None, **options):
        return None


def method_for(config) -> type[CalibrationMethod]:
    """The registered tuner class of a peft-basis config (PEFT's own registry)."""
    from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING

    try:
        cls = PEFT_TYPE_TO_TUNER_MAPPING[config.peft_type]
    except (KeyError, AttributeError):
        raise TypeError(f"{type(config).__name__} is not a registered PEFT tuner config.") from None
    if not (isinstance(cls, type) and issubclass(cls, CalibrationMethod)):
        raise TypeError(
            f"{type(config).__name__} ({getattr(config.peft_type, 'value', config.peft_type)}) is not a peft-basis "
            "method: peft-basis calibrates SharedBasisConfig, BaselConfig and BasisConfig (or a tuner that "
            "implements peft_basis.calibration.protocol.CalibrationMethod)."
        )
    return cls
