"""One calibration engine for every method: ``calibrate(model, config, dataloader)``.

Algorithms (the tuners) say which modules they need and what extra passes they run; pipelines
(here the basic one: the whole model in memory, one forward per batch) decide how the data flows.
"""

from __future__ import annotations

from collections.abc import Iterable

from torch import nn

from .engine import GramCollector, accumulate_gram, batch_to_kwargs, collect_grams, symmetrize
from .statistics import CalibrationStatistics, atomic_write

__all__ = [
    "CalibrationStatistics",
    "GramCollector",
    "accumulate_gram",
    "atomic_write",
    "batch_to_kwargs",
    "calibrate",
    "collect_grams",
    "symmetrize",
    "use_statistics",
]


def _tuner_cls(config):
    from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING

    try:
        return PEFT_TYPE_TO_TUNER_MAPPING[config.peft_type]
    except KeyError:
        raise TypeError(f"calibrate: {type(config).__name__} is not a registered PEFT tuner config.") from None


def calibrate(
    model: nn.Module,
    config,
    dataloader: Iterable | None = None,
    *,
    statistics: CalibrationStatistics | str | None = None,
    max_batches: int | None = None,
    progress: bool = True,
    save_to: str | None = None,
) -> CalibrationStatistics:
    """Stream the statistics ``config``'s method needs over ``dataloader`` and attach them to ``config``.

    Batches are dicts with ``input_ids`` (and optionally ``attention_mask``; padded tokens are
    ignored; ``labels`` for methods that run backward passes), tensors of ids, or tuples.
    Pass ``statistics`` (an object or a file saved with ``save_to``) to reuse earlier statistics
    instead of recomputing them. Under ``torch.distributed`` each rank passes its own shard of the
    data and every rank ends with the statistics of all of it.
    """
    tuner_cls = _tuner_cls(config)
    names = tuner_cls.resolve_target_names(model, config)
    if statistics is not None:
        stats = CalibrationStatistics.load(statistics) if isinstance(statistics, str) else statistics
        missing = [n for n in names if n not in stats]
        if missing:
            raise ValueError(
                f"The given statistics lack {len(missing)} of this config's targets (e.g. {missing[:3]}); they were "
                "computed for other modules. Recompute them with `calibrate(model, config, dataloader)`."
            )
    else:
        if dataloader is None:
            raise ValueError("calibrate needs a `dataloader` (or precomputed `statistics`).")
        stats = collect_grams(model, names, dataloader, max_batches=max_batches, progress=progress)
    extra = getattr(tuner_cls, "extra_calibration", None)
    if extra is not None and dataloader is not None:
        extra(model, config, stats, dataloader, max_batches=max_batches, progress=progress)
    if save_to is not None:
        stats.save(save_to)
    use_statistics(config, stats)
    return stats


def use_statistics(config, stats: CalibrationStatistics | str) -> None:
    """Attach saved statistics to a config without running the model."""
    if isinstance(stats, str):
        stats = CalibrationStatistics.load(stats)
    config.attach_statistics(stats)
