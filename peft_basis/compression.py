"""``compress_sequential``: compress a model one decoder layer at a time, with the method's own layer handler.

The layer-sequential pipeline runs the model; the method (its tuner's ``layer_compressor``, a
:class:`~peft_basis.calibration.pipelines.LayerHandler`) factorises inside the layer events and writes
the adapter. Adding a method that compresses layer by layer means writing that handler in its tuner
folder; nothing here changes.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable

import torch
from torch import nn

from .calibration.inputs import checked_batches, model_vocab_size, statistics_fingerprint
from .calibration.pipelines import LayerSequentialPipeline
from .calibration.protocol import method_for
from .distributed import barrier, is_main_process
from .io import atomic_folder

__all__ = ["compress_sequential"]


def compress_sequential(
    model: nn.Module | str,
    config,
    dataloader: Iterable,
    output_dir: str,
    *,
    max_batches: int | None = None,
    progress: bool = True,
    dtype: torch.dtype | None = None,
    device: torch.device | str = "cpu",
    **options,
) -> list[dict]:
    """Compress ``model`` (a checkpoint folder of safetensors shards, read one layer at a time, or a model in
    memory) with ``config``'s method, one decoder layer in memory at a time; write to ``output_dir`` the
    adapter that ``calibrate`` + ``get_peft_model`` + ``save_pretrained`` would write, and return the
    compression report. Load it with ``PeftModel.from_pretrained(base, output_dir)`` or leanly with
    :func:`peft_basis.load_lean`.

    ``options`` go to the method's compressor (Basis Sharing:
    :class:`~peft_basis.tuners.shared_basis.sequential.SharedBasisLayerCompressor`: ``inputs="dense"`` or
    ``"compressed"``, ``scratch_dir``, ``save_statistics_to``). Under ``torch.distributed`` call it on every
    rank with that rank's shard of the data; rank 0 writes. ``device``: where each layer runs and its
    statistics accumulate (e.g. ``f"cuda:{local_rank}"`` with NCCL).
    """
    method = method_for(config)
    if method.needs_fisher(config):  # the dense model's Grams and Fisher scores first (its ranks come from them)
        from .calibration import calibrate_sequential

        options["statistics"] = calibrate_sequential(model, config, dataloader, max_batches=max_batches,
                                                     progress=progress, dtype=dtype, device=device)
    # the adapter folder appears complete or not at all (rank 0 writes; the others write nothing)
    folder = atomic_folder(output_dir) if is_main_process() else contextlib.nullcontext(output_dir)
    with folder as out:
        handler = method.layer_compressor(config, out, **options)
        if handler is None:
            raise TypeError(
                f"{type(config).__name__} has no layer-by-layer compressor (SharedBasisConfig has). For other methods, "
                "calibrate layer by layer with `calibrate_sequential` and build the adapter with `get_peft_model`."
            )
        targets = lambda m: method.resolve_target_names(m, handler.config)  # noqa: E731
        if hasattr(handler.config, "base_model_fingerprint"):
            handler.config.base_model_fingerprint = statistics_fingerprint(model, targets)
        dataloader = checked_batches(dataloader, model_vocab_size(model), max_batches)
        pipeline = LayerSequentialPipeline(model, targets, dataloader, max_batches=max_batches, progress=progress,
                                           dtype=dtype, device=device)
        report = pipeline.run(handler)
    barrier()
    return report
