"""Calibration: the statistics every method computes from calibration data, and the pipelines that run the model.

``calibrate(model, config, dataloader)`` / ``calibrate_sequential(model_or_path, config, dataloader)``;
what a method declares it needs: :mod:`peft_basis.calibration.protocol`; the pipelines:
:mod:`peft_basis.calibration.pipelines`.
"""

from __future__ import annotations

from .calibrate import calibrate, calibrate_sequential, use_statistics
from .grams import GramCollector, accumulate_gram, batch_to_kwargs, symmetrize
from .pipelines.whole_model import collect_grams
from .protocol import CalibrationMethod, method_for
from .statistics import CalibrationStatistics

__all__ = [
    "CalibrationMethod",
    "CalibrationStatistics",
    "GramCollector",
    "accumulate_gram",
    "batch_to_kwargs",
    "calibrate",
    "calibrate_sequential",
    "collect_grams",
    "method_for",
    "symmetrize",
    "use_statistics",
]
