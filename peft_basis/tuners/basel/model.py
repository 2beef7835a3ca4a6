"""Basel's tuner: SVD reparametrisation, scheduled pruning to an exact parameter budget, consolidation
to a factorised model, and the 8-bit path for the factors."""

from __future__ import annotations

import math
import warnings
from typing import Optional

import torch
from torch import nn
from tqdm.auto import tqdm

from ...budget import greedy_allocate
from ...linalg import WhitenerCache, whitened_svd
from ...modules import in_out_features, linear_weight
from ..base import PeftBasisTuner, warn_no_calibration
from ..shared_basis import scores as anchored_scores
from .anchored import INPUT_GRAMS, BaselAnchoredCalibrator, anchored_fit_config, anchored_reparametrisation
from ..factorized import factorized_forward
from .config import BaselConfig
from .layer import BaselLayer
from .schedule import BaselSchedule


def _unwrap_optimizer(optimizer):
    """The torch optimizer under accelerate's / Trainer's wrappers (whose ``state`` we slice)."""
    seen = 0
    while optimizer is not None and hasattr(optimizer, "optimizer") and seen < 4:
        optimizer = optimizer.optimizer
        seen += 1
    return optimizer


class BaselModel(PeftBasisTuner):
    """PEFT tuner for :class:`BaselConfig`.

    Per step of training call ``basel_step(step, total_steps, optimizer)`` after ``optimizer.step()``
    (``step`` = optimizer steps completed, 1-based), or use :class:`BaselCallback` in ``Trainer``. At
    ``step == total_steps`` the model is consolidated into its factorised form. ``history`` records every
    pruning event; ``kept_fraction()`` the stored fraction of the targeted dense parameters.
    """

    prefix = "basel_"
    tuner_layer_cls = BaselLayer
    method_label = "Basel"

    @classmethod
    def is_loading(cls, config) -> bool:
        return bool(config.rank_pattern)

    @classmethod
    def saved_keys(cls, config) -> set[str]:
        parts = ("basel_A", "basel_B") + (("basel_w", "basel_A_add", "basel_B_add") if config.phase == "train" else ())
        return {f"base_model.model.{n}.{p}" for n in config.rank_pattern for p in parts}

    def _cast_adapter_dtype(self, adapter_name: str, autocast_adapter_dtype: bool = True) -> None:
        """PEFT's upcast of half-precision adapter weights to fp32 for training, but not for consolidated factors:
        those are the model's weights, kept in its dtype."""
        if self.peft_config[adapter_name].phase == "factorized":
            return
        super()._cast_adapter_dtype(adapter_name, autocast_adapter_dtype=autocast_adapter_dtype)

    def _check_new_adapter_config(self, config) -> None:
        super()._check_new_adapter_config(config)
        if sum(isinstance(c, BaselConfig) for c in self.peft_config.values()) > 1:
            raise ValueError(
                "A model holds one Basel adapter: it replaces the dense weights. Compress fresh copies of the base "
                "model to compare settings."
            )

    @classmethod
    def layer_calibrator(cls, config, statistics=None):
        """``init="anchored"``: the anchored fit, layer by layer (:class:`~.anchored.BaselAnchoredCalibrator`)."""
        if isinstance(config, BaselConfig) and config.init == "anchored":
            return BaselAnchoredCalibrator(config, statistics)
        return None

    # ---- the anchored start's Fisher pass: loss-aware ranks / output weights of the anchored fit, if asked ----------
    @classmethod
    def needs_fisher(cls, config) -> bool:
        return (isinstance(config, BaselConfig) and config.init == "anchored"
                and anchored_scores.needs_fisher(anchored_fit_config(config)))

    @classmethod
    def fisher_plan(cls, model, config, names: list[str], stats, *, progress: bool = False):
        """The anchored fit's own plan (Basis Sharing's, on the same targets)."""
        if not cls.needs_fisher(config):
            return None
        return anchored_scores.fisher_plan(model, anchored_fit_config(config), names, stats, progress)

    # ---- building the reparametrisation -----------------------------------------------------------
    def _pre_injection_hook(self, model: nn.Module, config: BaselConfig, adapter_name: str) -> None:
        names = self.resolve_target_names(model, config)
        modules = dict(model.named_modules())
        shapes = {n: in_out_features(modules[n]) for n in names}
        self._pending: dict[str, dict] = {}
        if not hasattr(self, "history"):
            self.history: list[dict] = []
            self._events_done: dict[str, int] = {}
        if config.rank_pattern:  # loading: shapes from the config, values from the checkpoint; no SVD
            self.check_rank_pattern_targets("Basel", config.rank_pattern, shapes)
            for n, r in config.rank_pattern.items():
                d_in, d_out = shapes[n]
                dtype = modules[n].weight.dtype
                spec = {"A": torch.zeros(r, d_in, dtype=dtype), "B": torch.zeros(d_out, r, dtype=dtype)}
                if config.phase == "train":
                    r_add = min(config.extra_rank, d_in, d_out)
                    spec.update(w=torch.zeros(r, dtype=dtype), A_add=torch.zeros(r_add, d_in, dtype=dtype),
                                B_add=torch.zeros(d_out, r_add, dtype=dtype))
                self._pending[n] = spec
            return
        if config.phase != "train":
            raise ValueError("A new Basel adapter starts in phase 'train'; `phase` is filled by the tuner, leave it.")
        names = self._profitable(names, shapes, config)
        stats = config.calibration_statistics
        anchored = config.init == "anchored" or (config.init == "auto" and stats is not None and "factors" in stats.meta)
        if anchored:
            return self._anchored_start(modules, names, shapes, config)
        whitened = config.init == "whitened" or (config.init == "auto" and stats is not None)
        if config.init == "whitened" and stats is None:
            raise ValueError(
                "BaselConfig(init='whitened') needs calibration statistics: call "
                "`peft_basis.calibrate(model, config, task_dataloader)` first, or use init='svd'."
            )
        if config.init == "auto" and stats is None:
            warn_no_calibration("BaselConfig")
        # covariance scale (X^T X / N): w^2 are then the singular values W has on unit-variance inputs, O(1) as in the
        # paper's plain SVD, so Adam's steps (about lr each) relearn them; on the Gram's scale they are sqrt(N) larger
        # and barely move in a few hundred steps. Exactness and the pruning order do not depend on the scale.
        whitener = WhitenerCache(stats, config.damping, covariance=True) if whitened else None

        def bases(n: str):
            u, s, vh = whitened_svd(linear_weight(modules[n]), whitener(n) if whitened else None)
            # The paper's rule drops numerically-zero directions of W itself. Applied to the whitened spectrum it
            # would also drop directions the calibration text happens not to excite, and change the model; so the
            # whitened init keeps every direction (the first pruning event removes the weak ones) and the rule is
            # applied at consolidation, to W_eff's own spectrum.
            r = len(s) if whitened else max(1, int((s >= config.svd_threshold * s.mean()).sum()))
            return u, s, vh, r

        self._start_training_phase(modules, names, shapes, config, bases)

    def _anchored_start(self, modules, names, shapes, config: BaselConfig) -> None:
        """``init="anchored"``: each target's anchored factors ``C B`` as ``U diag(s) R``, whitened by the Gram of its
        inputs in the anchored model (:mod:`.anchored`), so the model starts at the anchored model exactly."""
        stats = config.calibration_statistics
        fitted = None if stats is None else stats.meta.get("factors")
        if fitted is None or stats.meta.get("input_grams") != INPUT_GRAMS:
            what = "no statistics are attached" if stats is None else (
                "the attached statistics hold Grams but no anchored factors" if fitted is None else
                "the attached anchored factors come without the Grams of the anchored model's inputs (a "
                "SharedBasisConfig's calibration)")
            raise ValueError(
                f"BaselConfig(init='anchored') starts from the anchored factorisation, but {what}. Call "
                "`peft_basis.calibrate(model, config, task_dataloader)` with this BaselConfig first (it runs the "
                "anchored fit layer by layer), or use init='whitened'."
            )
        group_of = {m: key for key, members in fitted["groups"].items() for m in members}
        missing = [n for n in names if n not in group_of]
        if missing:
            raise ValueError(f"The attached anchored statistics hold no factors for {missing[:3]}: they were fitted for "
                             "other target modules. Run `peft_basis.calibrate(model, config, dataloader)` with this "
                             "config.")
        left_dense = sorted(set(group_of) - set(names))
        if left_dense:
            warnings.warn(
                f"Basel leaves {left_dense[:3]} ({len(left_dense)} in all) dense, but the anchored fit compressed them: "
                "the modules after them were fitted to their compressed outputs, so the start is not the anchored "
                "model there. Raise keep_ratio, or exclude them from target_modules before calibrating.",
                stacklevel=3,
            )
        whitener = WhitenerCache(stats, config.damping, covariance=True)  # the scale: as for init="whitened"

        def bases(n: str):
            coefficient = stats.extra[f"factors/coefficient/{n}"]
            basis = stats.extra[f"factors/basis/{group_of[n]}"]
            u, s, r = anchored_reparametrisation(coefficient, basis, whitener(n))
            return u, s, r, len(s)  # every direction: the start is exact; the first pruning event removes weak ones

        self._start_training_phase(modules, names, shapes, config, bases)

    def _start_training_phase(self, modules, names, shapes, config: BaselConfig, bases) -> None:
        """Every target's training-phase tensors from ``bases(name) -> (U, s, R, r)``: ``W = U diag(s) R``, first ``r`` kept."""
        gen = torch.Generator().manual_seed(0)
        dense = stored = 0
        for n in tqdm(names, desc="Basel SVD", unit="module", disable=len(names) < 20):
            d_in, d_out = shapes[n]
            u, s, vh, r = bases(n)
            r_add = min(config.extra_rank, d_in, d_out)
            dtype = modules[n].weight.dtype
            self._pending[n] = {
                "A": vh[:r].to(dtype).contiguous(),
                "B": u[:, :r].to(dtype).contiguous(),
                "w": s[:r].sqrt().to(dtype),
                "A_add": (torch.randn(r_add, d_in, generator=gen) / max(r_add, 1) ** 0.5).to(dtype),
                "B_add": torch.zeros(d_out, r_add, dtype=dtype),
            }
            config.rank_pattern[n] = r
            dense += d_in * d_out
            stored += r * (d_in + d_out)
        config.initial_fraction = stored / dense

    @staticmethod
    def _profitable(names: list[str], shapes: dict, config: BaselConfig) -> list[str]:
        """Targets whose share of the budget holds at least ``min_rank`` (a rank step costs d_in + d_out)."""
        too_small = [
            n for n in names
            if config.keep_ratio * shapes[n][0] * shapes[n][1] < config.min_rank * (shapes[n][0] + shapes[n][1])
        ]
        if len(too_small) == len(names):
            n = too_small[0]
            d_in, d_out = shapes[n]
            raise ValueError(
                f"No target can be factorised profitably at keep_ratio={config.keep_ratio}: e.g. {n} ({d_out}x{d_in}) "
                f"has {d_in * d_out} parameters, its share is {config.keep_ratio * d_in * d_out:.0f}, but one rank of "
                f"factors costs d_in + d_out = {d_in + d_out}. Target larger modules, or raise keep_ratio."
            )
        if too_small:
            warnings.warn(
                f"Basel leaves {len(too_small)} targets dense (e.g. {too_small[:3]}): at keep_ratio={config.keep_ratio} "
                "their share of the budget is below one rank of factors (d_in + d_out parameters).",
                stacklevel=4,
            )
        return [n for n in names if n not in too_small]

    def _create_and_replace(self, config, adapter_name, target, target_name, parent, current_key, **kwargs):
        if isinstance(target, BaselLayer):
            raise ValueError(f"{current_key} already carries a Basel adapter.")
        spec = self._pending.pop(current_key, None)
        if spec is None:
            return  # left dense (too small to factorise at this keep ratio)
        layer = BaselLayer(target, keep_dense_weight=config.keep_dense_weight)
        layer.update_layer(adapter_name, **spec)
        self._replace_module(parent, target_name, layer, target)

    def _post_injection_hook(self, model, config, adapter_name) -> None:
        self._pending = {}

    # ---- sizes -------------------------------------------------------------------------------------
    def basel_layers(self, adapter_name: str = "default") -> dict[str, BaselLayer]:
        return {n: m for n, m in self.model.named_modules() if isinstance(m, BaselLayer) and adapter_name in m.basel_A}

    def dense_parameters(self, adapter_name: str = "default") -> int:
        """Dense parameters of the factorised targets (the base of ``keep_ratio``)."""
        return sum(m.in_features * m.out_features for m in self.basel_layers(adapter_name).values())

    def kept_parameters(self, adapter_name: str = "default") -> int:
        """Parameters the factors hold at the current ranks, ``sum r (d_in + d_out)``."""
        return sum(m.rank(adapter_name) * (m.in_features + m.out_features) for m in self.basel_layers(adapter_name).values())

    def kept_fraction(self, adapter_name: str = "default") -> float:
        return self.kept_parameters(adapter_name) / self.dense_parameters(adapter_name)

    def ranks(self, adapter_name: str = "default") -> dict[str, int]:
        return {n: m.rank(adapter_name) for n, m in self.basel_layers(adapter_name).items()}

    # ---- the schedule ----------------------------------------------------------------------------
    def basel_step(self, step: int, total_steps: int, optimizer=None, adapter_name: str = "default") -> None:
        """Call after every ``optimizer.step()``. Prunes when the schedule says so (pass the optimizer so
        its state shrinks with the parameters) and consolidates at ``step >= total_steps``."""
        config = self.peft_config[adapter_name]
        if config.phase == "factorized":
            return
        schedule = BaselSchedule.from_config(config, total_steps)
        due = schedule.events_done(step)
        if due > self._events_done.get(adapter_name, 0):
            frac = schedule.target_fraction(due, schedule.events, config.initial_fraction or 1.0, config.keep_ratio)
            budget = int(frac * self.dense_parameters(adapter_name))
            if due == schedule.events:
                budget = int(config.keep_ratio * self.dense_parameters(adapter_name))
            self.prune_to(budget, optimizer=optimizer, adapter_name=adapter_name, step=step)
            self._events_done[adapter_name] = due
        if step >= total_steps:
            self.consolidate(adapter_name)

    @torch.no_grad()
    def prune_to(self, budget: int, optimizer=None, adapter_name: str = "default", step: Optional[int] = None) -> None:
        """Keep the bases with the highest relative relearned energy per parameter, ``(w_i^2)^2 / sum_j (w_j^2)^2``
        (the squared error removing basis ``i`` costs, relative to the module's total), within ``budget``
        stored parameters; ranks only go down. ``rank_allocation="uniform"``: every module first keeps its own
        share of the budget (the same fraction of its dense parameters), the leftover buys at most one more
        rank where that energy is highest."""
        config = self.peft_config[adapter_name]
        layers = [(n, m) for n, m in self.basel_layers(adapter_name).items() if m.phase(adapter_name) == "train"]
        orders, scores, costs, r_max = [], [], [], []
        for _, m in layers:
            energy = m.basel_w[adapter_name].detach().double() ** 4
            order = torch.argsort(energy, descending=True)
            orders.append(order)
            scores.append(energy[order] / energy.sum().clamp_min(1e-300))
            costs.append(m.in_features + m.out_features)
            r_max.append(m.rank(adapter_name))
        r_min = [min(config.min_rank, r) for r in r_max]
        if config.rank_allocation == "uniform":
            fraction = budget / max(sum(m.in_features * m.out_features for _, m in layers), 1)
            r_min = [min(r, max(lo, math.floor(fraction * m.in_features * m.out_features / c)))
                     for (_, m), r, lo, c in zip(layers, r_max, r_min, costs)]
            r_max = [min(r, lo + 1) for r, lo in zip(r_max, r_min)]
        try:
            ranks = greedy_allocate(scores, costs, budget, r_min=r_min, r_max=r_max)
        except ValueError as e:
            raise ValueError(
                f"Basel cannot reach {budget:,} parameters with min_rank={config.min_rank} on every module ({e}). Raise "
                "keep_ratio or lower min_rank."
            ) from None
        optimizer = _unwrap_optimizer(optimizer)
        threshold = 1.0
        for (name, m), order, score, r in zip(layers, orders, scores, ranks):
            if r > 0:
                threshold = min(threshold, float(score[r - 1]))
            if r < m.rank(adapter_name):
                m.prune(adapter_name, torch.sort(order[:r]).values, optimizer)
            config.rank_pattern[name] = r
        self.history.append({
            "step": step, "budget": budget, "kept_parameters": self.kept_parameters(adapter_name),
            "kept_fraction": self.kept_fraction(adapter_name), "energy_threshold": threshold,
        })

    @torch.no_grad()
    def consolidate(self, adapter_name: str = "default") -> None:
        """Re-factorise every target to its current rank (``W_eff ~ B A``) and drop the training-phase
        parameters: afterwards the model holds exactly the factors that ``save_pretrained`` writes.
        Uses the task's whitening when calibration statistics are attached (the truncation then minimises
        the task's output error), plain SVD otherwise."""
        config = self.peft_config[adapter_name]
        if config.phase == "factorized":
            return
        stats = config.calibration_statistics
        whitener = None if stats is None else WhitenerCache(stats, config.damping)
        for name, m in self.basel_layers(adapter_name).items():
            wh = whitener(name) if whitener is not None and name in stats else None
            config.rank_pattern[name] = m.consolidate(adapter_name, wh, config.svd_threshold)
        config.phase = "factorized"
        frac = self.kept_fraction(adapter_name)
        if frac > config.keep_ratio + 1e-9 and self.basel_layers(adapter_name):
            warnings.warn(
                f"Basel consolidated at {frac:.3f} of the targeted parameters, above keep_ratio={config.keep_ratio}: "
                "training stopped before the pruning schedule ended. Call `prune_to(budget)` before consolidating, or "
                "train to the end of the schedule.",
                stacklevel=2,
            )


# ---- 8-bit -------------------------------------------------------------------------------------------
class FactorizedLinear(nn.Sequential):
    """Basel's exported pair of Linears: ``down`` (``d_in -> r``, ``A``) then ``up`` (``r -> d_out``, ``B``, bias)."""

    def __init__(self, A: torch.Tensor, B: torch.Tensor, bias: Optional[torch.Tensor]):
        r, d_in = A.shape
        d_out = B.shape[0]
        down = nn.Linear(d_in, r, bias=False)
        up = nn.Linear(r, d_out, bias=bias is not None)
        down.weight = nn.Parameter(A.detach().clone(), requires_grad=False)
        up.weight = nn.Parameter(B.detach().clone(), requires_grad=False)
        if bias is not None:
            up.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
        super().__init__(down, up)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        down, up = self[0], self[1]
        if type(down) is nn.Linear and type(up) is nn.Linear:  # the Basel layer's own arithmetic: equal outputs
            return factorized_forward(x, down.weight, up.weight, up.bias, pad=True)
        return super().forward(x)  # e.g. dynamically quantised Linears


def export_factorized(peft_model, adapter_name: str = "default") -> nn.Module:
    """The plain transformers model with every consolidated Basel target replaced by a
    :class:`FactorizedLinear` (two ``nn.Linear``: Basel's export format). No PEFT wrapper left."""
    tuner = peft_model.base_model if hasattr(peft_model, "base_model") else peft_model
    config = tuner.peft_config[adapter_name]
    if config.phase != "factorized":
        raise ValueError("export_factorized needs a consolidated model: call `consolidate()` (or finish training) first.")
    model = tuner.model
    for name, m in list(tuner.basel_layers(adapter_name).items()):
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, FactorizedLinear(m.basel_A[adapter_name], m.basel_B[adapter_name], m.base_layer.bias))
    return model


def quantize_factors_8bit(model: nn.Module) -> nn.Module:
    """Int8 weights for every factor Linear (PyTorch's own dynamic quantisation,
    ``torch.ao.quantization.quantize_dynamic``: per-tensor int8 weights, activations quantised on the
    fly; CPU inference). Pass the output of :func:`export_factorized`. Only the factors are quantised;
    embeddings and the LM head stay in float."""
    from torch.ao.quantization import quantize_dynamic

    names = {f"{n}.{c}" for n, m in model.named_modules() if isinstance(m, FactorizedLinear) for c in ("0", "1")}
    if not names:
        raise ValueError("No FactorizedLinear in this model: call `export_factorized(peft_model)` first.")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", UserWarning)
        return quantize_dynamic(model, qconfig_spec=names, dtype=torch.qint8, inplace=False)
