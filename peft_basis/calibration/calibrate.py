"""``calibrate`` and ``calibrate_sequential``: a method's statistics over calibration data, by either pipeline."""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from itertools import islice

import torch
from torch import nn

from ..fingerprint import check_fingerprint
from .fisher import accumulators, finish_fisher
from .inputs import batches_fingerprint, checked_batches, model_vocab_size, statistics_fingerprint
from .pipelines import LayerHandler, LayerSequentialPipeline, WholeModelPipeline, get_pipeline
from .protocol import method_for
from .statistics import HELD_APART, CalibrationStatistics

__all__ = ["calibrate", "calibrate_sequential", "use_statistics"]

DENSE_RECIPE = "dense_statistics"  # meta: how the dense model's Fisher scores were made (damping, data, model)


def calibrate(
    model: nn.Module,
    config,
    dataloader: Iterable | None = None,
    *,
    statistics: CalibrationStatistics | str | None = None,
    max_batches: int | None = None,
    progress: bool = True,
    save_to: str | None = None,
    pipeline: str = "whole_model",
    dense_statistics: CalibrationStatistics | str | None = None,
) -> CalibrationStatistics:
    """Stream the statistics ``config``'s method needs over ``dataloader`` and attach them to ``config``.

    Batches are dicts with ``input_ids`` (and optionally ``attention_mask``; padded tokens are
    ignored; ``labels`` for methods that run backward passes), tensors of ids, or tuples.
    Pass ``statistics`` (an object or a file saved with ``save_to``) to reuse earlier statistics
    instead of recomputing them. Under ``torch.distributed`` each rank passes its own shard of the
    data and every rank ends with the statistics of all of it. ``pipeline``: ``"whole_model"`` (one pass
    of the whole model per batch) or ``"layer_sequential"`` (one decoder layer at a time: the same
    statistics, less memory; see :func:`calibrate_sequential`).

    ``dense_statistics``: for a fit that runs layer by layer against the dense model and reads its Fisher
    scores (``SharedBasisConfig(inputs="anchored")`` with ``rank_allocation="loss"`` or
    ``output_weights="fisher"``; Basel's anchored init), the statistics an earlier such ``calibrate`` of the
    same model returned (or saved): its dense Grams and Fisher passes are reused instead of run again, so
    sweeping ``compression_ratio`` costs the fit alone after the first ratio.
    """
    CalibrationStatistics.check_save_path(save_to)  # before any work
    if get_pipeline(pipeline) is LayerSequentialPipeline:
        if statistics is not None:
            raise ValueError("pipeline='layer_sequential' computes the statistics; pass `statistics` only with the "
                             "whole-model pipeline.")
        return calibrate_sequential(model, config, dataloader, max_batches=max_batches, progress=progress,
                                    save_to=save_to, activations="memory")
    method = method_for(config)
    layered = statistics is None and method.layer_calibrator(config) is not None
    if dense_statistics is not None and not (layered and method.needs_fisher(config)):
        raise ValueError(
            "dense_statistics are reused by a fit that runs layer by layer against the dense model and reads its "
            "Fisher scores (SharedBasisConfig(inputs='anchored', rank_allocation='loss' or output_weights='fisher')); "
            f"this {type(config).__name__} reads none" + (" (and `statistics` were given)" if statistics is not None
                                                          else "") + ": remove `dense_statistics`."
        )
    if layered:
        # the method's statistics need the compressed model's activations, layer by layer (after the dense model's
        # own statistics where it needs them too: Fisher scores for its ranks)
        if dataloader is None:
            raise ValueError("calibrate needs a `dataloader` (or precomputed `statistics`).")
        dataloader = checked_batches(dataloader, model_vocab_size(model), max_batches)  # read by two pipelines
        dense = None
        if method.needs_fisher(config):
            recipe = {"damping": getattr(config, "damping", None), "data": batches_fingerprint(dataloader, max_batches)}
            if dense_statistics is not None:
                dense = _reused_dense_statistics(dense_statistics, recipe, model, config)
            else:
                dense = _dense_fisher_statistics(model, config, method, dataloader, max_batches, progress)
                dense.meta[DENSE_RECIPE] = {**recipe, "extra": sorted(dense.extra), "meta": sorted(dense.meta),
                                            "base_model_fingerprint": statistics_fingerprint(
                                                model, method.resolve_target_names(model, config))}
        handler = method.layer_calibrator(config, dense)
        stats = LayerSequentialPipeline(model, lambda m: method.resolve_target_names(m, config), dataloader,
                                        max_batches=max_batches, progress=progress).run(handler)
        if dense is not None:  # carried along (scores, not Grams: small), for the next ratio's dense_statistics
            for k, v in dense.extra.items():
                stats.extra.setdefault(k, v)
            for k, v in dense.meta.items():
                stats.meta.setdefault(k, v)
        if save_to is not None:
            stats.save(save_to)
        use_statistics(config, stats)
        return stats
    names = method.resolve_target_names(model, config)
    dataloader = checked_batches(dataloader, model_vocab_size(model), max_batches)
    run = WholeModelPipeline(model, names, dataloader, max_batches=max_batches, progress=progress)
    if statistics is not None:
        stats = CalibrationStatistics.load(statistics) if isinstance(statistics, str) else statistics
        missing = [n for n in names if n not in stats]
        if missing:
            raise ValueError(
                f"The given statistics lack {len(missing)} of this config's targets (e.g. {missing[:3]}); they were "
                "computed for other modules. Recompute them with `calibrate(model, config, dataloader)`."
            )
        stats.check_fits(model, names)
    else:
        if dataloader is None:
            raise ValueError("calibrate needs a `dataloader` (or precomputed `statistics`).")
        batches = list(islice(dataloader, max_batches))  # ids only: small, and a one-shot iterable serves every pass
        held = set(method.held_apart_batches(config, len(batches)))
        run = WholeModelPipeline(model, names, [b for i, b in enumerate(batches) if i not in held], progress=progress)
        stats = run.grams(output_modules=method.output_gram_modules(model, config, names))
        stats.meta["base_model_fingerprint"] = statistics_fingerprint(model, names)
        if held:  # kept out of the fitted Grams: the method chooses on them, then adds their Grams back
            held_batches = [batches[i] for i in sorted(held)]
            apart = WholeModelPipeline(model, names, held_batches, progress=progress).grams()
            stats.extra.update({HELD_APART + k: g for k, g in apart.grams.items()})
            stats.meta["held_apart_tokens"] = dict(apart.tokens)
            stats.meta["held_apart_batches"] = sorted(held)
        dataloader, max_batches = (held_batches if held else batches), None
    if dataloader is not None:
        if method.needs_fisher(config):
            plan = method.fisher_plan(model, config, names, stats, progress=progress)
            plan.store(stats, run.fisher(plan, stats))
        method.extra_calibration(model, config, stats, dataloader, max_batches=max_batches, progress=progress)
    if save_to is not None:
        stats.save(save_to)
    use_statistics(config, stats)
    return stats


def _reused_dense_statistics(given, recipe: dict, model, config) -> CalibrationStatistics:
    """The dense model's Fisher scores (and their meta) out of ``given`` (statistics or their file), checked
    against this run; nothing else of it (an earlier fit's factors) is carried over."""
    stats = CalibrationStatistics.load(given) if isinstance(given, str) else given
    made = stats.meta.get(DENSE_RECIPE)
    if made is None:
        raise ValueError("These statistics hold no dense-model Fisher scores: pass what `calibrate` returned (or saved) "
                         f"for an earlier {type(config).__name__}(inputs='anchored', ...) of this model.")
    check_fingerprint(made.get("base_model_fingerprint"), model, "dense_statistics",
                      "Calibrate without them (or pass the statistics of this model).")
    if made["damping"] != recipe["damping"]:
        raise ValueError(f"dense_statistics were computed with damping={made['damping']}, this config has "
                         f"damping={recipe['damping']} (the scored directions depend on it): calibrate without them.")
    if made["data"] != recipe["data"]:
        warnings.warn("dense_statistics were computed on other calibration batches than these: the ranks and output "
                      "weights come from that data, the fit from this one.", stacklevel=3)
    dense = CalibrationStatistics()
    dense.extra.update({k: stats.extra[k] for k in made["extra"] if k in stats.extra})
    dense.meta.update({k: stats.meta[k] for k in made["meta"] if k in stats.meta})
    dense.meta[DENSE_RECIPE] = made
    return dense


def _dense_fisher_statistics(model, config, method, dataloader, max_batches, progress) -> CalibrationStatistics:
    """The dense model's Fisher scores for a layer calibrator's ranks (whole model: a Gram pass for the
    directions, then the backward passes); the Grams themselves are not kept."""
    names = method.resolve_target_names(model, config)
    run = WholeModelPipeline(model, names, dataloader, max_batches=max_batches, progress=progress)
    stats = run.grams()
    if method.needs_fisher(config):
        plan = method.fisher_plan(model, config, names, stats, progress=progress)
        # a layer calibrator reads the dense model's Fisher scores (its ranks), not these Grams, which are as
        # large as the model: gone before the backward passes, whose peak they would add to
        stats.grams.clear()
        plan.store(stats, run.fisher(plan, stats))
    return stats


def use_statistics(config, stats: CalibrationStatistics | str) -> None:
    """Attach saved statistics to a config without running the model."""
    if isinstance(stats, str):
        stats = CalibrationStatistics.load(stats)
    config.attach_statistics(stats)


class StatisticsHandler(LayerHandler):
    """The layer-sequential pipeline's consumer for :func:`calibrate_sequential`: every layer's statistics,
    merged; Fisher scores by the backward sweep when the method needs them."""

    def __init__(self, method, config, keep_grams: bool = True):
        self.method, self.config = method, config
        self.summarise = not keep_grams
        self.needs_backward = method.needs_fisher(config)
        self.merged = CalibrationStatistics()
        self.accs, self.directions, self.plans = {}, {}, []

    def on_start(self, run) -> None:
        self.model, self.device = run.model, run.device
        self.named = dict(run.model.named_modules())

    def on_layer_calibrated(self, layer) -> None:
        if self.summarise:  # the method's summary of the Grams replaces them (the Fisher plan then reads it)
            if layer.targets:
                layer.stats.extra.update(self.method.layer_summary(self.model, self.config, list(layer.targets),
                                                                   layer.stats))
            layer.stats.grams.clear()
        self.merged.merge(layer.stats)
        if self.needs_backward and layer.targets:
            plan = self.method.fisher_plan(self.model, self.config, list(layer.targets), layer.stats)
            if plan is None:
                raise ValueError(f"{type(self.config).__name__} as configured needs no Fisher scores.")
            self.plans.append(plan)
            self.accs.update(accumulators(plan.directions, plan.mode, self.device, plan.output_moments))
            # finish_fisher only needs their shapes
            self.directions.update({n: tuple(None if t is None else t.to("meta") for t in d)
                                    for n, d in plan.directions.items()})

    def on_backward_layer(self, layer) -> list:
        prefix = layer.name + "."
        return [self.named[n].register_forward_hook(acc.hook) for n, acc in self.accs.items() if n.startswith(prefix)]

    def on_backward_layer_done(self, layer) -> None:
        prefix = layer.name + "."
        for n in [n for n in self.accs if n.startswith(prefix)]:  # the directions are not needed any more
            self.accs[n].U = self.accs[n].R = None

    def on_backward_done(self, sequences: int, tokens: int) -> None:
        plan = self.plans[0]
        scores = finish_fisher(self.accs, self.directions, self.named, plan.mode, sequences, tokens, self.device,
                               self.merged, plan.key)
        for p in self.plans:
            p.store(self.merged, {n: scores[n] for n in p.directions if n in scores})

    def on_end(self) -> CalibrationStatistics:
        return self.merged


def calibrate_sequential(
    model: nn.Module | str,
    config,
    dataloader: Iterable,
    *,
    max_batches: int | None = None,
    progress: bool = True,
    dtype: torch.dtype | None = None,
    save_to: str | None = None,
    device: torch.device | str = "cpu",
    activations: str = "disk",
    scratch_dir: str | None = None,
    keep_grams: bool = True,
) -> CalibrationStatistics:
    """``calibrate`` one decoder layer at a time: for a checkpoint on disk (``model`` a folder of safetensors
    shards: the dense model is never in memory) or a model in memory. The input Grams of every target of
    ``config`` (any peft-basis config), attached to ``config`` as ``calibrate`` attaches them, optionally saved
    to ``save_to``; they equal the whole-model ones (which stream output Grams instead where the method asks:
    ``SharedBasisConfig(output_grams=True)``; the factors are the same).

    When the method needs Fisher scores (BASIS with ``rank_allocation="fisher"``) they are computed layer by
    layer too, by the pipeline's backward sweep (about one forward more than ``calibrate``, each layer read
    twice; ``activations``/``scratch_dir`` say where the layers' stored inputs wait).

    ``keep_grams=False`` (methods with a layer summary: BASIS) keeps, instead of each layer's Grams, what the
    method's ``get_peft_model`` needs of them, computed while the layer is loaded (BASIS: each module's
    directions and spectrum): ``r_max x (d_in + d_out)`` floats per module instead of ``d_in^2``. The
    statistics then serve this config (or one needing no more directions), not any method."""
    CalibrationStatistics.check_save_path(save_to)  # before any work
    method = method_for(config)
    if not keep_grams and not method.has_layer_summary:
        raise ValueError(f"keep_grams=False: {type(config).__name__} builds its adapter from the Grams themselves; "
                         "keep them (keep_grams=True).")
    dataloader = checked_batches(dataloader, model_vocab_size(model), max_batches)
    pipeline = LayerSequentialPipeline(model, lambda m: method.resolve_target_names(m, config), dataloader,
                                       max_batches=max_batches, progress=progress, dtype=dtype, device=device,
                                       saved_inputs=activations, scratch_dir=scratch_dir)
    merged = pipeline.run(StatisticsHandler(method, config, keep_grams))
    merged.meta["pipeline"] = "sequential"
    merged.meta["base_model_fingerprint"] = statistics_fingerprint(model, lambda m: method.resolve_target_names(m, config))
    if save_to is not None:
        merged.save(save_to)
    use_statistics(config, merged)
    return merged
