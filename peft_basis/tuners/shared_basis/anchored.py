"""Basis Sharing fitted to the dense model: anchored factorisation and block refinement, layer by layer.

The layer-sequential pipeline keeps two streams, the dense model's layer inputs ``H`` and the compressed
model's ``Hs``. In each decoder layer the targets are factorised sub-layer by sub-layer, in the order the
layer calls them (q/k/v, which read one tensor; then o; then gate/up; then down), each fed the inputs the
already-compressed modules before it produce:

1. **Anchored factorisation** (:func:`peft_basis.linalg.anchored_factorize`): streamed ``Gs = Xs^T Xs`` and
   cross-Gram ``C = X^T Xs`` of the module's compressed (``Xs``) and dense (``X``) inputs; the rank-``k``
   fit of the dense outputs at the interpolated target ``X_b = b X + (1 - b) Xs``, truncated in the ``Gs``
   norm. ``anchor="auto"`` chooses ``b`` per sub-layer among ``anchor_candidates`` by the error against the
   dense outputs on calibration batches held apart from the fitted ones (from their statistics alone),
   then refits on all batches at that ``b``.
2. **Block refinement** (``refine_epochs > 0``): all factors of the layer trained jointly with Adam so
   the layer's output on ``Hs`` matches the dense layer's output on ``H`` (mean squared error relative to
   the target's mean square, real tokens only), on the fitted batches, keeping the epoch with the lowest
   error on the held-apart ones; a run whose held-apart error never improves, or that diverges, keeps the
   closed-form factors and says so.

Then the pipeline runs the compressed layer on ``Hs`` for the next layer. Every module is private
(``group_size=1``): a basis shared across layers would need the statistics of later layers, whose inputs
depend on it.
"""

from __future__ import annotations

import copy
import math
import warnings

import torch
from torch import nn

from ...calibration.grams import accumulate_gram, symmetrize
from ...calibration.pipelines import LayerHandler
from ...distributed import is_distributed, is_main_process
from ...linalg import anchored_error, anchored_target, factorize_group
from ...modules import in_out_features, linear_weight
from ..factorized import factorized_forward
from .config import SharedBasisConfig
from .grouping import allocate_ranks, by_type, output_scales, plan_groups, split_dense, uniform_rank

__all__ = ["AnchoredCompressor", "held_apart_batches"]


def held_apart_batches(n_batches: int, fraction: float) -> list[int]:
    """Which calibration batches are held apart from the fit (the last ``fraction`` of them, at least one
    when there are two or more)."""
    if n_batches < 2 or fraction <= 0:
        return []
    k = min(n_batches - 1, max(1, round(fraction * n_batches)))
    return list(range(n_batches - k, n_batches))


class _Stats:
    """The streamed statistics of one input on some batches: ``Gs``, ``C`` and (held apart) ``G``."""

    def __init__(self, d: int, dense_gram: bool):
        self.gram_s = torch.zeros(d, d)
        self.cross = torch.zeros(d, d)
        self.gram = torch.zeros(d, d) if dense_gram else None
        self.tokens = 0

    def add(self, x: torch.Tensor, xs: torch.Tensor) -> None:
        accumulate_gram(self.gram_s, xs)  # the symmetric ones by their upper triangle: ``finish`` mirrors it
        self.cross.addmm_(x.T, xs)
        if self.gram is not None:
            accumulate_gram(self.gram, x)
        self.tokens += x.shape[0]

    def merged(self, other: "_Stats") -> "_Stats":
        out = _Stats(self.gram_s.shape[0], False)
        out.gram_s, out.cross, out.tokens = self.gram_s + other.gram_s, self.cross + other.cross, self.tokens + other.tokens
        return out

    def finish(self) -> None:
        """Complete the symmetric Grams and sum every statistic over the ranks; once, after the last ``add``."""
        for t in (self.gram_s,) + (() if self.gram is None else (self.gram,)):
            symmetrize(t)
        if is_distributed():
            for t in (self.gram_s, self.cross) + (() if self.gram is None else (self.gram,)):
                torch.distributed.all_reduce(t)
            n = torch.tensor([float(self.tokens)], dtype=torch.float64)
            torch.distributed.all_reduce(n)
            self.tokens = int(n)


def _mean_over_ranks(total: torch.Tensor, count: int) -> torch.Tensor:
    n = torch.tensor([float(count)], dtype=torch.float64)
    total = total.reshape(1)
    if is_distributed():
        torch.distributed.all_reduce(total)
        torch.distributed.all_reduce(n)
    return total / n


def _average_gradients(params) -> None:
    if not is_distributed():
        return
    world = torch.distributed.get_world_size()
    for p in params:
        if p.grad is not None:
            torch.distributed.all_reduce(p.grad)
            p.grad /= world


class AnchoredCompressor(LayerHandler):
    """The anchored (+ refined) Basis Sharing fit (module docstring). ``sink`` receives each module's factors
    as soon as its layer is done (:class:`~.sequential.AdapterSink` writes an adapter file;
    :class:`~.sequential.StatisticsSink` keeps them for ``get_peft_model``).
    The ranks: each module at its own ratio's rank (``rank_allocation="uniform"``) or allocated by the loss
    (``"loss"``: from the Fisher scores in ``statistics``, the dense model's, computed before this run)."""

    streams = "both"
    gram_stream = None
    capture_dense_inputs = True  # each stage's dense inputs, from the pass that computes the dense outputs

    def __init__(self, config: SharedBasisConfig, sink, *, statistics=None):
        if config.group_size not in (1, "auto") and config.shared_modules != []:
            raise ValueError(
                "inputs='anchored' fits each layer to the dense model before the next one runs, so every module "
                "has private factors: pass group_size=1 (a basis shared across layers would need the statistics of "
                "later layers, whose inputs depend on it)."
            )
        self.config = copy.deepcopy(config)
        self.config.group_size = 1
        if config.rank_allocation not in ("uniform", "loss"):
            raise ValueError("inputs='anchored' fixes every rank before the first layer runs: use "
                             "rank_allocation='uniform' or 'loss'.")
        self.sink, self.statistics = sink, statistics
        self.is_main = is_main_process()
        self.reports: dict[str, dict] = {}
        self.anchors: dict[str, float] = {}
        self.refinement: dict[int, dict] = {}
        self._patched: dict[str, nn.Module] = {}  # layers without targets (layers_to_transform) patch nothing

    # ---- events ------------------------------------------------------------------------------------
    def on_start(self, run) -> None:
        self.run, model, config = run, run.model, self.config
        shapes = {n: in_out_features(model.get_submodule(n)) for n in run.target_names}
        self.groups = plan_groups(getattr(model.config, "model_type", None), by_type(run.target_names), config, shapes)
        if config.rank_allocation == "loss":
            ranks = allocate_ranks(self.groups, config, None, self.statistics)
        else:
            ranks = [uniform_rank(g, config) for g in self.groups]
        # dense_at_break_even: these keep their dense weights; the fit, the sink and the report see the others
        self.groups, ranks, self.dense_groups = split_dense(self.groups, ranks)
        self.dense = [g.members[0] for g in self.dense_groups]
        self.group_of = {g.members[0]: g for g in self.groups}
        self.rank_of = {g.members[0]: r for g, r in zip(self.groups, ranks)}
        self.holdout = held_apart_batches(len(run.batches), config.holdout_fraction)
        self.fit = [b for b in range(len(run.batches)) if b not in self.holdout]
        needed = 2 * max(d for d, _ in shapes.values())
        tokens = sum(int(torch.as_tensor(b["input_ids"] if isinstance(b, dict) else b).numel()) for b in
                     (run.batches[i] for i in self.fit))
        if tokens < needed:
            warnings.warn(
                f"inputs='anchored': {tokens} calibration tokens are fitted, fewer than twice the widest module input "
                f"({needed // 2}); the cross-statistics will be noisy and the anchored fit overfits. Calibrate on at "
                f"least {needed} tokens (better {8 * needed // 2}).",
                stacklevel=2,
            )
        self.sink.start(self.config, run, self.groups, self.rank_of)

    def on_layer_calibrated(self, layer) -> None:
        if not layer.targets:
            return
        stages, dense_inputs = layer.stages, layer.dense_inputs
        self._patched: dict[str, nn.Module] = {}
        factors: dict[str, list] = {}
        for stage in stages:
            factors.update(self._fit_stage(layer, stage, dense_inputs))
        layer.dense_inputs = dense_inputs = None  # not needed past the fit: freed before the compressed pass
        if self.config.refine_epochs > 0:
            factors = self._refine(layer, factors)
        for name in layer.targets:  # in the order the sink declared them
            if name not in factors:  # kept dense
                continue
            basis, coef = factors[name]
            self.sink.write(name, self.group_of[name], basis, coef)

    def on_layer_done(self, layer) -> None:
        for module in self._patched.values():  # the pipeline has run the compressed layer; leave the module clean
            del module.forward
        self._patched = {}

    def on_end(self):
        """The sink's result: the compression report (an adapter written) or the statistics holding the factors."""
        return self.sink.finish(self.config, self.run, self.groups, self.rank_of, self)

    def report(self) -> list[dict]:
        return [self.reports[g.key] for g in self.groups] + [g.dense_report() for g in self.dense_groups]

    # ---- one sub-layer: anchored factorisation ----------------------------------------------------
    def _fit_stage(self, layer, stage: list[str], dense_inputs) -> dict[str, list]:
        config, pipeline = self.config, layer.pipeline
        owner = stage[0]  # the stage's input (and its dense capture's key), whether or not owner itself is fitted
        stage = [m for m in stage if m in self.rank_of]
        if not stage:  # every module reading this input is kept dense
            return {}
        d = in_out_features(layer.targets[owner])[0]
        fit, held = _Stats(d, False), _Stats(d, True)
        for b, got in pipeline.capture_inputs(layer.layer, "compressed", {owner: layer.targets[owner]}):
            (fit if b in self.fit else held).add(dense_inputs[b][owner], got[owner])
        fit.finish()
        held.finish()
        weights = {m: linear_weight(layer.targets[m]).detach() for m in stage}
        scales = {m: output_scales(self.statistics, [m], config) for m in stage}  # None unless output_weights="fisher"

        def factorize(stats: _Stats, anchor: float) -> dict:
            # the stage's modules read one input: their W* come from one solve against its Gs
            stacked = torch.cat([weights[m].to(torch.float64) for m in stage])
            targets = anchored_target(stacked, stats.gram_s, stats.cross, anchor, config.damping, owner)
            targets = targets.split([weights[m].shape[0] for m in stage])
            # one member: the anchored factorisation is the whitened one of W* in the Gs norm (as in
            # anchored_factorize, in float64)
            return {m: factorize_group([t], stats.gram_s, self.rank_of[m], config.damping, m, scales[m])
                    for m, t in zip(stage, targets)}

        def held_error(m: str, f) -> float:
            return anchored_error(weights[m], f.coefficients[0], f.basis, held.gram, held.cross, held.gram_s)

        candidates = [config.anchor] if config.anchor != "auto" else list(config.anchor_candidates)
        best = None
        if len(candidates) > 1 and held.tokens > 0:
            for a in candidates:
                err = sum(held_error(m, f) for m, f in factorize(fit, a).items())
                if best is None or err < best[0]:
                    best = (err, a)
            anchor = best[1]
        else:
            anchor = candidates[0] if config.anchor != "auto" else config.anchor_candidates[len(candidates) // 2]
        every = fit.merged(held) if held.tokens else fit
        out = {}
        for m, f in factorize(every, anchor).items():
            basis, coef = f.basis, f.coefficients[0]
            held_err = held_error(m, f) if held.tokens else None
            self.anchors[m] = anchor
            g = self.group_of[m]
            self.reports[g.key] = {**g.report(self.rank_of[m], held_err), "anchor": anchor}
            out[m] = [basis, coef]
            self._patch(layer.targets[m], m, out[m])
        return out

    def _patch(self, module: nn.Module, name: str, pair: list) -> None:
        """Make ``module`` compute through its factors (the list is read at every call, so refinement can swap
        in new tensors)."""
        bias = getattr(module, "bias", None)
        module.forward = lambda x, p=pair, bb=bias: factorized_forward(x, p[0], p[1], bb)
        self._patched[name] = module

    # ---- block refinement ---------------------------------------------------------------------------
    def _refine(self, layer, factors: dict[str, list]) -> dict[str, list]:
        """Adam on all of the layer's factors: compressed layer on ``Hs`` against the dense layer on ``H``."""
        config, pipeline = self.config, layer.pipeline
        targets = {b: t for b, t in enumerate(layer.dense_outputs())}
        masks = [c.token_mask for c in pipeline.call_args]
        closed_form = {n: [p[0].clone(), p[1].clone()] for n, p in factors.items()}
        params = []
        for pair in factors.values():
            # the closed form puts the scale in the basis (orthonormal coefficients); one learning rate serves
            # both factors once each direction's norm is split evenly between them (same product)
            basis, coef = pair[0].detach(), pair[1].detach()
            scale = (basis.norm(dim=1) / coef.norm(dim=0).clamp_min(1e-12)).sqrt().clamp_min(1e-12)
            pair[0] = nn.Parameter(basis / scale[:, None])
            pair[1] = nn.Parameter(coef * scale[None, :])
            params += pair
        optimizer = torch.optim.Adam(params, lr=config.refine_lr)
        steps = config.refine_epochs * max(len(self.fit), 1)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))

        def error(b: int) -> torch.Tensor:
            out = pipeline.forward(layer.layer, "compressed", b).float()
            y = targets[b].float()
            diff = (out - y).pow(2).sum(-1).reshape(-1)
            ref = y.pow(2).sum(-1).reshape(-1)
            if masks[b] is not None and masks[b].numel() == diff.numel():
                diff, ref = diff[masks[b]], ref[masks[b]]
            return diff.sum() / ref.sum().clamp_min(1e-30)

        def held_error() -> float:
            if not self.holdout:
                return float("nan")
            with torch.no_grad():
                total = torch.stack([error(b) for b in self.holdout]).sum().double()
            return float(_mean_over_ranks(total, len(self.holdout)))

        frozen = [p for p in layer.layer.parameters() if p.requires_grad]  # a model in memory: leave its grads alone
        for p in frozen:
            p.requires_grad_(False)
        try:
            return self._train(layer, factors, params, optimizer, schedule, error, held_error, closed_form)
        finally:
            for p in frozen:
                p.requires_grad_(True)

    def _train(self, layer, factors, params, optimizer, schedule, error, held_error, closed_form):
        config = self.config
        start = best_err = held_error()
        best = {n: [p[0].detach().clone(), p[1].detach().clone()] for n, p in factors.items()}
        history, diverged = [start], False
        with torch.enable_grad():
            for _ in range(config.refine_epochs):
                for b in self.fit:
                    optimizer.zero_grad(set_to_none=True)
                    loss = error(b)
                    if not torch.isfinite(loss):
                        diverged = True
                        break
                    loss.backward()
                    _average_gradients(params)  # every rank takes the same step, so all keep the same factors
                    optimizer.step()
                    schedule.step()
                if diverged:
                    break
                err = held_error()
                history.append(err)
                if not self.holdout or err < best_err:
                    best_err = err
                    best = {n: [p[0].detach().clone(), p[1].detach().clone()] for n, p in factors.items()}
        kept = best if not diverged else closed_form
        if diverged or (self.holdout and not best_err < start):
            warnings.warn(
                f"Block refinement of layer {layer.index} {'diverged (non-finite loss)' if diverged else 'did not lower the held-apart error'}"
                f"; its closed-form factors are kept. Lower refine_lr (now {config.refine_lr}) if this repeats.",
                stacklevel=2,
            )
            kept = closed_form
        for n, pair in factors.items():  # the patched forwards read these lists: the layer now runs the kept factors
            pair[0], pair[1] = kept[n][0].detach(), kept[n][1].detach()
        self.refinement[layer.index] = {"held_apart_error": history, "kept": "closed form" if kept is closed_form
                                        else "refined"}
        return factors
