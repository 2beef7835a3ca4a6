"""Basel's anchored start: Basis Sharing's anchored factorisation, in Basel's form.

``BaselConfig(init="anchored")``: ``peft_basis.calibrate`` runs the same layer-by-layer anchored fit as
``SharedBasisConfig(group_size=1, inputs="anchored")`` (one implementation: :class:`AnchoredCompressor`), at
the ranks of ``initial_keep``, and then streams each target's input Gram in the anchored model (the inputs
its factors see once every earlier module is compressed, block refinement included). ``get_peft_model``
turns each module's factors ``C B`` (``d_out x k``, ``k x d_in``) into ``U diag(s) R``, the SVD of ``C B``
whitened by that Gram ``Gs`` (:func:`anchored_reparametrisation`), with ``w = sqrt(s)``: the model starts at
the anchored model exactly, and ``s_i^2`` is what dropping basis ``i`` costs of the module's output in the
anchored model, so pruning without training is the anchored fit at the lower rank (without refinement, the
Gs-whitened SVD of the rank-``k`` fit is the top of the full-rank fit's). Consolidation truncates in the same
``Gs`` norm.
"""

from __future__ import annotations

import torch

from ...calibration.grams import GramCollector
from ...linalg import Whitener, decomposition_threads
from ..shared_basis.anchored import AnchoredCompressor
from ..shared_basis.config import SharedBasisConfig
from ..shared_basis.sequential import StatisticsSink
from .config import BaselConfig

__all__ = ["BaselAnchoredCalibrator", "anchored_fit_config", "anchored_reparametrisation", "INPUT_GRAMS"]

# meta["input_grams"] of anchored statistics: their Grams are of the anchored model's inputs, not the dense one's
INPUT_GRAMS = "anchored"


def anchored_fit_config(config: BaselConfig) -> SharedBasisConfig:
    """The Basis Sharing config of Basel's anchored fit: private factors, the same targets and damping, the
    ranks of ``config.starting_keep()``, and ``config.anchored_fit``'s options."""
    return SharedBasisConfig(
        compression_ratio=1.0 - config.starting_keep(), group_size=1, inputs="anchored",
        target_modules=config.target_modules, exclude_modules=config.exclude_modules,
        layers_to_transform=config.layers_to_transform, layers_pattern=config.layers_pattern,
        damping=config.damping, **dict(config.anchored_fit or {}),
        dense_at_break_even=False,  # Basel reparametrises every target: each needs factors
    )


class BaselAnchoredCalibrator(AnchoredCompressor):
    """The anchored fit (:class:`AnchoredCompressor` into a :class:`StatisticsSink`), plus each target's input Gram
    in the anchored model: once a layer is fitted (and refined), the layer as compressed runs on the compressed
    stream with the Gram hooks on. The result holds the factors and those Grams."""

    def __init__(self, config: BaselConfig, statistics=None):
        super().__init__(anchored_fit_config(config), StatisticsSink(), statistics=statistics)
        self.input_grams = None

    def on_layer_calibrated(self, layer) -> None:
        super().on_layer_calibrated(layer)  # fits, refines, and leaves the targets computing through their factors
        if not layer.targets:
            return
        collector = GramCollector(layer.targets)
        layer.pipeline.run_layer(layer.layer, "compressed", collector)
        grams = collector.finalize()
        if self.input_grams is None:
            self.input_grams = grams
        else:
            self.input_grams.merge(grams)

    def on_end(self):
        stats = super().on_end()
        if self.input_grams is not None:  # each module's source is now its Gram (the factors are found by meta)
            stats.grams.update(self.input_grams.grams)
            stats.tokens.update(self.input_grams.tokens)
            stats.sources.update(self.input_grams.sources)
        stats.meta["input_grams"] = INPUT_GRAMS
        return stats


def anchored_reparametrisation(coefficient: torch.Tensor, basis: torch.Tensor, whitener: Whitener | None):
    """``C B = U diag(s) R`` (float64): ``U`` (``d_out x k``) orthonormal, ``s`` descending, ``R`` (``k x d_in``)
    with ``R G R^T = I`` for the whitener's Gram ``G`` (``None``: the plain SVD, ``R R^T = I``). From a thin QR
    of ``C`` and the SVD of a ``k x d_in`` matrix, never of ``d_out x d_in``."""
    c, b = coefficient.detach().double(), basis.detach().double()
    with decomposition_threads():
        q, r = torch.linalg.qr(c)
        core = r @ (b if whitener is None else b @ whitener.matrix.T)  # C B S^T = q core
        u, s, vh = torch.linalg.svd(core, full_matrices=False)
    right = vh if whitener is None else vh @ whitener.inverse.T
    return q @ u, s, right
