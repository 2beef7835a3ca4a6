"""The layer-sequential pipeline: calibrate and compress models larger than memory.

The base model is built on the ``meta`` device (no weights); its decoder layers are materialised
one at a time from the checkpoint's safetensors shards, the calibration batches are run through
that layer alone, its input Grams are streamed by the same hooks as :func:`calibrate`
(:class:`GramCollector`, so q/k/v and gate/up still share one Gram), then the layer is freed and its
outputs become the next layer's inputs. Peak memory: one decoder layer, the calibration
activations (two ``tokens x hidden`` tensors) and the Grams of the layers whose group is still open,
whatever the depth (measured in ``docs/scaling.md``). This is llm-compressor's "sequential
pipeline" idea, written for our engine.

Two entry points:

- :func:`iter_layer_statistics`: yields every decoder layer, materialised, with its
  :class:`CalibrationStatistics` (input Grams of the config's targets in that layer), then frees it.
  Any method whose statistics are per-layer input Grams can consume it (BASIS covariances,
  Basel's initial whitened factorisation); see ``docs/scaling.md``.
- :func:`compress_sequential`: Basis Sharing (``SharedBasisConfig``) end to end, writing the same
  adapter folder ``calibrate`` + ``get_peft_model`` + ``save_pretrained`` write.

Basis Sharing groups span consecutive layers and its rank allocation (``uniform`` spends the
rounding leftover, ``global`` everything) needs every group's spectrum before any rank is known. So
compression runs in two phases: (1) stream the layers; when a group's last layer is done, compute its
whitened spectrum, then drop its Grams from memory (each layer's Grams go to a scratch safetensors
file on disk); (2) allocate ranks from the spectra, then factorise group by group, reading the Grams
back from scratch and the weights lazily from the shards, streaming the factors into the adapter
file. Memory holds one group's Grams and weights at a time; disk holds all Grams until the end.

Under ``torch.distributed`` every rank passes its own shard of the calibration data; each layer's
Grams are all-reduced before use, so every rank sees the statistics of all the data, and rank 0
alone writes files.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import struct
import tempfile
from collections.abc import Iterable, Iterator
from itertools import islice
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers.pytorch_utils import Conv1D

from ..linalg import CalibrationError
from ..modules import find_linear_names, in_out_features, layer_index, linear_weight
from .engine import GramCollector, batch_to_kwargs
from .statistics import CalibrationStatistics

__all__ = [
    "LayerStatistics",
    "calibrate_sequential",
    "SafetensorsStreamWriter",
    "ShardedCheckpoint",
    "compress_sequential",
    "iter_layer_statistics",
    "meta_model",
]

SAFETENSORS_SINGLE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"


# ---- the checkpoint, read lazily ---------------------------------------------------------------------
class ShardedCheckpoint:
    """Tensor name -> shard file of a transformers safetensors checkpoint; reads one tensor at a time."""

    def __init__(self, model_path: str):
        self.path = model_path
        index = os.path.join(model_path, SAFETENSORS_INDEX)
        single = os.path.join(model_path, SAFETENSORS_SINGLE)
        if os.path.exists(index):
            with open(index, encoding="utf-8") as f:
                weight_map = json.load(f)["weight_map"]
            self.files = {k: os.path.join(model_path, v) for k, v in weight_map.items()}
        elif os.path.exists(single):
            from safetensors import safe_open

            with safe_open(single, framework="pt") as f:
                self.files = {k: single for k in f.keys()}
        else:
            raise FileNotFoundError(
                f"{model_path} holds no {SAFETENSORS_SINGLE} or {SAFETENSORS_INDEX}. The layer-by-layer pipeline reads "
                "safetensors shards lazily; convert the checkpoint once with "
                "`AutoModelForCausalLM.from_pretrained(path).save_pretrained(new_path)` (safetensors is the default)."
            )
        self._handles: dict[str, object] = {}

    def __contains__(self, key: str) -> bool:
        return key in self.files

    def get(self, key: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        from safetensors import safe_open

        try:
            file = self.files[key]
        except KeyError:
            raise KeyError(
                f"{key} is not in the checkpoint at {self.path}. The checkpoint's tensor names must match the model "
                "built from its config.json (save it with a recent transformers `save_pretrained`)."
            ) from None
        handle = self._handles.get(file)
        if handle is None:
            handle = self._handles[file] = safe_open(file, framework="pt", device="cpu")
        t = handle.get_tensor(key)
        return t if dtype is None or not t.is_floating_point() else t.to(dtype)

    def close(self) -> None:
        self._handles.clear()


def meta_model(model_path: str, dtype: torch.dtype | None = None) -> nn.Module:
    """The causal LM of ``model_path`` with every parameter on the meta device (buffers such as rotary
    frequencies are real: they are computed from the config, not read from the checkpoint)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_path)
    kwargs = {} if dtype is None else {"dtype": dtype}
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, **kwargs)
    model.name_or_path = model_path
    return model.eval()


def _set_tensor(module: nn.Module, name: str, value: torch.Tensor) -> None:
    owner_name, _, leaf = name.rpartition(".")
    owner = module.get_submodule(owner_name) if owner_name else module
    if leaf in owner._parameters:
        owner._parameters[leaf] = nn.Parameter(value, requires_grad=False)
    else:
        owner._buffers[leaf] = value


def materialize(module: nn.Module, prefix: str, ckpt: ShardedCheckpoint, dtype: torch.dtype | None,
                device: torch.device | str = "cpu", skip: set[str] = frozenset()) -> None:
    """Load every meta parameter/buffer of ``module`` (named ``prefix`` in the model) from the checkpoint."""
    for name, t in list(module.named_parameters(recurse=True)) + list(module.named_buffers(recurse=True)):
        if t.device.type != "meta" or (prefix + name) in skip:
            continue
        value = ckpt.get(prefix + name, dtype if t.is_floating_point() else None)
        if tuple(value.shape) != tuple(t.shape):
            raise ValueError(f"{prefix + name}: checkpoint shape {tuple(value.shape)} != model shape {tuple(t.shape)}.")
        _set_tensor(module, name, value.to(device))


def trim_memory() -> None:
    """Hand freed heap pages back to the OS (glibc keeps them otherwise, and RSS then creeps up a few MB per
    layer, which over 80 layers would look like growth with depth). A no-op where glibc is absent."""
    global _MALLOC_TRIM
    if _MALLOC_TRIM is None:
        try:
            import ctypes

            _MALLOC_TRIM = ctypes.CDLL("libc.so.6").malloc_trim
        except (OSError, AttributeError):
            _MALLOC_TRIM = False
    if _MALLOC_TRIM:
        _MALLOC_TRIM(0)


_MALLOC_TRIM = None


def release(module: nn.Module) -> None:
    """Send ``module``'s parameters back to the meta device (frees their memory)."""
    for name, p in list(module.named_parameters(recurse=True)):
        if p.device.type != "meta":
            _set_tensor(module, name, torch.empty_like(p, device="meta"))


def _layers_container(model: nn.Module, target_names: list[str]) -> tuple[str, nn.ModuleList]:
    """The ``ModuleList`` of decoder layers the targets live in (``model.layers`` for Llama)."""
    first = target_names[0]
    idx = layer_index(first)
    if idx is None:
        raise ValueError(f"{first} is not inside a repeated decoder layer; the sequential pipeline needs layered targets.")
    container_name = first[: first.index(f".{idx}.")]
    container = model.get_submodule(container_name)
    if not isinstance(container, nn.ModuleList):
        raise ValueError(f"{container_name} is not a ModuleList of decoder layers.")
    outside = [n for n in target_names if not n.startswith(container_name + ".")]
    if outside:
        raise ValueError(f"Targets outside {container_name} ({outside[:3]}) cannot be calibrated layer by layer; exclude them.")
    return container_name, container


class _Captured(Exception):
    pass


@dataclass
class _Batch:
    hidden: torch.Tensor
    args: tuple  # positional arguments after the hidden states (GPT-2 passes its mask positionally)
    kwargs: dict
    token_mask: torch.Tensor | None


@dataclass
class LayerStatistics:
    """One decoder layer, materialised, and the input Grams of its targets (all ranks' data)."""

    index: int
    name: str  # e.g. "model.layers.7"
    layer: nn.Module
    targets: dict[str, nn.Module]  # full module name -> module, inside this layer
    stats: CalibrationStatistics = field(default_factory=CalibrationStatistics)
    # with keep_inputs=True: per batch, the hidden states that entered the layer, those it returned, and the
    # other arguments the model passes every layer (masks, rotary embeddings)
    inputs: list[torch.Tensor] | None = None
    outputs: list[torch.Tensor] | None = None
    call_args: list[tuple[tuple, dict]] | None = None


def _capture_first_layer_inputs(model, runner, first_layer, batches, device, progress) -> list[_Batch]:
    captured: list[_Batch] = []
    store = {}

    def hook(_module, args, kwargs):
        store["args"], store["kwargs"] = args, kwargs
        raise _Captured

    handle = first_layer.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            for batch in tqdm(batches, desc="embedding", unit="batch", disable=not progress):
                kwargs = batch_to_kwargs(batch, device)
                kwargs.pop("labels", None)
                mask = kwargs.get("attention_mask")
                try:
                    runner(**kwargs, use_cache=False)
                except _Captured:
                    pass
                else:
                    raise RuntimeError("The model's forward never called its first decoder layer.")
                args, kw = tuple(store["args"]), dict(store["kwargs"])
                hidden = args[0] if args else kw.pop("hidden_states")
                token_mask = None if mask is None else mask.reshape(-1).bool()
                captured.append(_Batch(hidden, args[1:], kw, token_mask))
    finally:
        handle.remove()
    return captured


def iter_layer_statistics(
    model_path: str,
    config,
    dataloader: Iterable,
    *,
    max_batches: int | None = None,
    progress: bool = True,
    dtype: torch.dtype | None = None,
    device: torch.device | str = "cpu",
    model: nn.Module | None = None,
    replay: bool = False,
    keep_inputs: bool = False,
) -> Iterator[LayerStatistics]:
    """Stream the decoder layers of the checkpoint at ``model_path`` one at a time.

    Yields a :class:`LayerStatistics` per layer, in order, after its targets' input Grams were
    collected over ``dataloader`` (all-reduced across ``torch.distributed`` ranks). The layer is
    materialised while the consumer holds it and freed when the generator resumes. Inputs of each
    layer are the *dense* outputs of the previous one, so the statistics equal those
    :func:`peft_basis.calibrate` computes on the whole model.

    ``replay=True``: the layer's inputs are kept while the consumer holds it, and when the generator
    resumes the layer runs again on them, so the next layer's inputs are the outputs of the layer *as
    the consumer left it* (e.g. compressed in place): llm-compressor's sequential pipeline, where
    every layer is calibrated on the outputs of the already-compressed layers before it.

    ``keep_inputs=True``: each item also carries the layer's inputs, outputs and call arguments (what the
    layer-by-layer Fisher pass stores for its backward sweep).
    """
    from . import _tuner_cls
    from .engine import _backbone

    model = meta_model(model_path, dtype) if model is None else model
    ckpt = ShardedCheckpoint(model_path)
    names = _tuner_cls(config).resolve_target_names(model, config)
    container_name, layers = _layers_container(model, names)
    runner, _ = _backbone(model, names)
    batches = list(islice(dataloader, max_batches))
    if not batches:
        raise CalibrationError("The dataloader yielded no batches. Pass at least one batch of `input_ids`.")

    # Everything before the first layer (embeddings): materialise what the runner owns outside the layers,
    # never the output embedding (the LM head is not run; for a tied model it is the input embedding anyway).
    layer_prefix = container_name + "."
    out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    out_ids = {id(p) for p in out_emb.parameters()} if out_emb is not None else set()
    outside = [n for n, p in model.named_parameters() if not n.startswith(layer_prefix)
               and (id(p) not in out_ids or n in ckpt)]
    for n in outside:
        _set_tensor(model, n, ckpt.get(n, dtype).to(device))
    ckpt.close()
    captured = _capture_first_layer_inputs(model, runner, layers[0], batches, device, progress)
    for n in outside:  # the embeddings are not needed any more
        p = model.get_parameter(n)
        _set_tensor(model, n, torch.empty_like(p, device="meta"))

    by_layer: dict[int, list[str]] = {}
    for n in names:
        by_layer.setdefault(layer_index(n[len(container_name):]), []).append(n)
    first_type = getattr(layers[0], "attention_type", None)
    for i, layer in enumerate(tqdm(layers, desc="layers", unit="layer", disable=not progress)):
        if getattr(layer, "attention_type", None) != first_type:
            raise NotImplementedError(
                f"Layer {i} uses attention type {layer.attention_type!r} but layer 0 uses {first_type!r} (a hybrid "
                "sliding-window model); the sequential pipeline replays layer 0's attention mask. Use `calibrate` on "
                "the whole model for this architecture."
            )
        prefix = f"{layer_prefix}{i}."
        materialize(layer, prefix, ckpt, dtype, device)
        ckpt.close()  # unmap the shard: its pages would otherwise stay in this process's RSS
        targets = {n: model.get_submodule(n) for n in by_layer.get(i, [])}
        collector = GramCollector(targets)
        layer_inputs = [b.hidden for b in captured] if replay or keep_inputs else None
        with torch.no_grad(), collector.attached():
            for b in captured:
                collector._seen.clear()
                collector.token_mask = b.token_mask
                out = layer(b.hidden, *b.args, **b.kwargs)
                b.hidden = out[0] if isinstance(out, (tuple, list)) else out
        collector._seen.clear()
        never = [n for n in targets if n not in collector.stats.sources]
        if never:
            raise CalibrationError(
                f"{len(never)} target modules of layer {i} were never called (e.g. {never[:3]}). Remove them from "
                "`target_modules`."
            )
        stats = collector.finalize() if targets else CalibrationStatistics()
        item = LayerStatistics(i, f"{layer_prefix}{i}", layer, targets, stats)
        if keep_inputs:
            item.inputs, item.outputs = layer_inputs, [b.hidden for b in captured]
            item.call_args = [(b.args, b.kwargs) for b in captured]
        try:
            yield item
            del item
            if replay:
                with torch.no_grad():
                    for b, x in zip(captured, layer_inputs):
                        out = layer(x, *b.args, **b.kwargs)
                        b.hidden = out[0] if isinstance(out, (tuple, list)) else out
            layer_inputs = None
        finally:
            release(layer)
            trim_memory()
    ckpt.close()


def calibrate_sequential(
    model_path: str,
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
    """``calibrate`` for a checkpoint on disk, one decoder layer in memory at a time: the input Grams of every
    target of ``config`` (any registered peft-basis config: SharedBasis, Basel's whitened initialisation, BASIS
    covariances), attached to ``config`` as ``calibrate`` attaches them, optionally saved to ``save_to``.

    The result holds every layer's Grams (what the method's ``get_peft_model`` reads), but never the dense
    model. When the config needs Fisher scores (BASIS with ``rank_allocation="fisher"``) they are computed
    layer by layer too, by a forward sweep that stores each layer's inputs and a backward sweep from the
    last layer (:mod:`peft_basis.calibration.sequential_fisher`: about one forward more than ``calibrate``,
    each layer read twice; ``activations``/``scratch_dir`` say where the stored inputs wait).

    ``keep_grams=False`` (methods with a ``layer_summary``: BASIS) keeps, instead of each layer's Grams,
    what the method's ``get_peft_model`` needs of them, computed while the layer is loaded (BASIS: each
    module's directions and spectrum): memory and file size then grow by ``r_max x (d_in + d_out)`` floats
    per module instead of ``d_in^2`` (at 70B: about 3 GB in all instead of 327 GB). The statistics then
    serve this config (or one needing no more directions), not any method."""
    from . import _tuner_cls, use_statistics

    tuner_cls = _tuner_cls(config)
    summarise = None
    if not keep_grams:
        summary = getattr(tuner_cls, "layer_summary", None)
        if summary is None:
            raise ValueError(f"keep_grams=False: {type(config).__name__} builds its adapter from the Grams themselves; "
                             "keep them (keep_grams=True).")

        def swap_grams_for_summary(model, item):
            """Swap the layer's Grams for the method's summary of them (the Fisher plan then reads that)."""
            if item.targets:
                item.stats.extra.update(summary(model, config, list(item.targets), item.stats))
            item.stats.grams.clear()

        summarise = swap_grams_for_summary

    needs_fisher = getattr(tuner_cls, "needs_fisher", None)
    if needs_fisher is not None and needs_fisher(config):
        from .sequential_fisher import calibrate_sequential_fisher

        merged = calibrate_sequential_fisher(model_path, config, dataloader, max_batches=max_batches,
                                             progress=progress, dtype=dtype, device=device,
                                             activations=activations, scratch_dir=scratch_dir, summarise=summarise)
    else:
        merged = CalibrationStatistics()
        model = meta_model(model_path, dtype)
        for item in iter_layer_statistics(model_path, config, dataloader, max_batches=max_batches,
                                          progress=progress, dtype=dtype, device=device, model=model):
            if summarise is not None:
                summarise(model, item)
            merged.merge(item.stats)
    merged.meta["pipeline"] = "sequential"
    if save_to is not None:
        merged.save(save_to)
    use_statistics(config, merged)
    return merged


# ---- writing safetensors without holding the whole file in memory ------------------------------------
_ST_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64"}


class SafetensorsStreamWriter:
    """Write a safetensors file tensor by tensor: shapes are declared up front (the header), data is
    appended in declaration order, so the file never needs to fit in memory. The file appears under
    its final name only when complete (atomic rename)."""

    def __init__(self, path: str, specs: dict[str, tuple[tuple[int, ...], torch.dtype]], metadata: dict | None = None):
        self.path = path
        self.order = list(specs)
        header: dict = {"__metadata__": metadata or {}}
        offset = 0
        for name, (shape, dtype) in specs.items():
            nbytes = int(torch.Size(shape).numel()) * torch.empty((), dtype=dtype).element_size()
            header[name] = {"dtype": _ST_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        self.specs = specs
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        directory = os.path.dirname(os.path.abspath(path))
        os.makedirs(directory, exist_ok=True)
        fd, self.tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=os.path.basename(path))
        self.f = os.fdopen(fd, "wb")
        self.f.write(struct.pack("<Q", len(raw)))
        self.f.write(raw)
        self.next = 0

    def write(self, name: str, tensor: torch.Tensor) -> None:
        expected = self.order[self.next]
        if name != expected:
            raise RuntimeError(f"SafetensorsStreamWriter: expected {expected}, got {name} (write in declaration order).")
        shape, dtype = self.specs[name]
        if tuple(tensor.shape) != tuple(shape) or tensor.dtype != dtype:
            raise RuntimeError(f"{name}: declared {tuple(shape)} {dtype}, got {tuple(tensor.shape)} {tensor.dtype}.")
        self.f.write(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        self.next += 1

    def close(self) -> None:
        self.f.close()
        if self.next != len(self.order):
            os.remove(self.tmp)
            raise RuntimeError(f"SafetensorsStreamWriter: {len(self.order) - self.next} tensors were never written.")
        os.replace(self.tmp, self.path)

    def abort(self) -> None:
        self.f.close()
        if os.path.exists(self.tmp):
            os.remove(self.tmp)


# ---- Basis Sharing, layer by layer ---------------------------------------------------------------------
def _rank() -> int:
    dist = torch.distributed
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _barrier() -> None:
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _plan_groups(model, names, config):
    """The groups ``SharedBasisModel._compress`` forms for an integer ``group_size``."""
    from ..tuners.shared_basis.model import _by_type, plan_groups

    shapes = {n: in_out_features(model.get_submodule(n)) for n in names}
    return plan_groups(getattr(model.config, "model_type", None), _by_type(names), config, shapes)


def _check_supported(config) -> None:
    from ..tuners.shared_basis.config import SharedBasisConfig

    if not isinstance(config, SharedBasisConfig):
        raise TypeError(
            f"compress_sequential supports SharedBasisConfig; got {type(config).__name__}. For other methods, consume "
            "per-layer Grams with `peft_basis.calibration.sequential.iter_layer_statistics`."
        )
    if config.group_size == "auto":
        raise ValueError(
            "compress_sequential does not support group_size='auto' (it compares groupings of 1, 2 and 4 layers with "
            "every member's Gram in memory). Pass an integer group_size (2 is the paper's), or run `calibrate` + "
            "`get_peft_model` on the whole model."
        )
    if config.groups:
        raise ValueError("This config already carries `groups` (it was used to create an adapter); pass a fresh config.")


def compress_sequential(
    model_path: str,
    config,
    dataloader: Iterable,
    output_dir: str,
    *,
    max_batches: int | None = None,
    progress: bool = True,
    dtype: torch.dtype | None = None,
    scratch_dir: str | None = None,
    save_statistics_to: str | None = None,
    device: torch.device | str = "cpu",
    inputs: str = "dense",
) -> list[dict]:
    """Compress the checkpoint at ``model_path`` with Basis Sharing, one decoder layer in memory at a time.

    Writes to ``output_dir`` the adapter that ``calibrate(model, config, dataloader)``,
    ``get_peft_model(model, config)`` and ``save_pretrained(output_dir)`` would write
    (``adapter_config.json``, ``adapter_model.safetensors``; same factors up to float rounding), and
    returns the compression report (one dict per group). Load it with
    ``PeftModel.from_pretrained(base, output_dir)`` or leanly with :func:`peft_basis.lean.load_lean`.

    Supports ``rank_allocation`` ``"uniform"`` and ``"global"`` and any integer ``group_size``;
    ``group_size="auto"`` raises. ``scratch_dir`` holds every layer's Grams on disk until the end
    (default: a temporary folder next to ``output_dir``, removed afterwards); ``save_statistics_to``
    additionally keeps them there, one ``layer_<i>.safetensors`` file per layer
    (:class:`CalibrationStatistics` format). Under ``torch.distributed`` call it on every rank with
    that rank's shard of the data; rank 0 writes. ``device``: where each layer runs and its Grams
    accumulate (e.g. ``f"cuda:{local_rank}"`` with NCCL); the factorisation reads them back on the CPU.

    ``inputs="compressed"``: every layer is calibrated on the outputs of the layers before it *as
    compressed* (llm-compressor's sequential pipeline), so its factors fit the inputs it will really
    see; each layer is factorised as soon as its Grams are complete and replayed compressed. Needs
    every group to be one layer (``group_size=1``, or no shared matrix types: a shared basis would
    need the Grams of later layers, whose inputs depend on it) and ``rank_allocation="uniform"``
    (ranks are fixed before any spectrum is seen: each group at its own ratio's rank, without the
    one-rank top-up of the leftover budget). Costs one more forward pass per layer. On SmolLM2-135M
    it lowered held-out perplexity by 4.7/10.4/16.0% at 10/20/30% removed and raised it by 13.5% at
    40% (docs/shared_basis.md).
    """
    from ..tuners.shared_basis.model import SharedBasisModel

    _check_supported(config)
    if inputs not in ("dense", "compressed"):
        raise ValueError(f"inputs must be 'dense' or 'compressed', not {inputs!r}.")
    config = copy.deepcopy(config)
    model = meta_model(model_path, dtype)
    names = SharedBasisModel.resolve_target_names(model, config)
    groups = _plan_groups(model, names, config)
    if inputs == "compressed":
        shared = [g for g in groups if len(g.members) > 1]
        if shared:
            raise ValueError(
                f"inputs='compressed' factorises each layer before the next one runs, but {shared[0].key} shares one "
                f"basis across layers {shared[0].members[0]} ... {shared[0].members[-1]}. Pass group_size=1 (or "
                "shared_modules=[]), or inputs='dense'."
            )
        if config.rank_allocation != "uniform":
            raise ValueError("inputs='compressed' fixes every rank before the first layer runs: use "
                             "rank_allocation='uniform', or inputs='dense' for 'global'.")
        report = _compress_on_compressed_inputs(model_path, model, config, groups, dataloader, output_dir,
                                                max_batches=max_batches, progress=progress, dtype=dtype,
                                                device=device, save_statistics_to=save_statistics_to)
        _barrier()
        return report
    is_main = _rank() == 0
    own_scratch = save_statistics_to is None and scratch_dir is None
    if save_statistics_to is not None:
        scratch = save_statistics_to
    elif scratch_dir is not None:
        scratch = scratch_dir
    else:
        os.makedirs(output_dir, exist_ok=True)
        scratch = tempfile.mkdtemp(prefix=".sequential-grams-", dir=output_dir) if is_main else None
    try:
        report = _compress(model_path, model, config, groups, dataloader, output_dir, scratch, is_main,
                           max_batches=max_batches, progress=progress, dtype=dtype, device=device)
    finally:
        if own_scratch and is_main and scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
    _barrier()
    return report


def _group_stats(layer_stats: dict[int, CalibrationStatistics], members: list[str]) -> CalibrationStatistics:
    merged = CalibrationStatistics()
    for m in members:
        s = layer_stats[layer_index(m)]
        key = s.sources[m]
        merged.sources[m] = key
        merged.grams[key] = s.grams[key]
        merged.tokens[key] = s.tokens[key]
    return merged


def _compress_on_compressed_inputs(model_path, model, config, groups, dataloader, output_dir, *, max_batches,
                                   progress, dtype, device, save_statistics_to) -> list[dict]:
    """One pass: each layer's groups are factorised from Grams on the compressed model's inputs, written
    to the adapter file, and the layer is replayed with the factorised weights for the next layer."""
    from ..tuners.shared_basis.model import SharedBasisModel, factorize_group, member_error

    is_main = _rank() == 0
    rank_of = {g.key: SharedBasisModel._floor(g, config) for g in groups}
    group_of = {g.members[0]: g for g in groups}
    shapes = {m: in_out_features(model.get_submodule(m)) for g in groups for m in g.members}
    specs: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
    dtypes = {m: model.get_submodule(m).weight.dtype for m in shapes}
    for g in sorted(groups, key=lambda g: layer_index(g.members[0])):
        (m,) = g.members
        specs[f"base_model.sb_bases.{g.key}"] = ((rank_of[g.key], g.d_in), dtypes[m])
        specs[f"base_model.model.{m}.sb_coefficient"] = ((shapes[m][1], rank_of[g.key]), dtypes[m])
    writer = None
    if is_main:
        os.makedirs(output_dir, exist_ok=True)
        writer = SafetensorsStreamWriter(os.path.join(output_dir, "adapter_model.safetensors"), specs,
                                         {"format": "pt"})
    reports: dict[str, dict] = {}
    try:
        for item in iter_layer_statistics(model_path, config, dataloader, max_batches=max_batches, progress=progress,
                                          dtype=dtype, model=model, device=device, replay=True):
            if save_statistics_to is not None and is_main:
                os.makedirs(save_statistics_to, exist_ok=True)
                item.stats.save(os.path.join(save_statistics_to, f"layer_{item.index}.safetensors"))
            for m, module in item.targets.items():
                g = group_of[m]
                weight = linear_weight(module).detach()
                gram = item.stats.gram(m).to("cpu")
                f = factorize_group([weight.to("cpu")], gram, rank_of[g.key], config.damping, m)
                coef, basis = f.coefficients[0], f.basis
                # the layer as it will be served: the next layers are calibrated on its outputs (every rank
                # computes the same factors from the same all-reduced Gram)
                compressed = (coef @ basis).to(module.weight.dtype).to(module.weight.device)
                module.weight.data.copy_(compressed.T if isinstance(module, Conv1D) else compressed)
                if writer is not None:
                    writer.write(f"base_model.sb_bases.{g.key}", basis.to(dtypes[m]))
                    writer.write(f"base_model.model.{m}.sb_coefficient", coef.to(dtypes[m]))
                reports[g.key] = {"group": g.key, "members": g.members, "rank": rank_of[g.key],
                                  "params": rank_of[g.key] * g.cost, "dense_params": g.dense_params,
                                  "relative_error": member_error(weight.to("cpu"), coef, basis, gram)}
        if writer is not None:
            writer.close()
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    if is_main:
        _save_adapter_config(model_path, model, config, groups, rank_of, output_dir)
    return [reports[g.key] for g in groups]


def _save_adapter_config(model_path, model, config, groups, rank_of, output_dir) -> None:
    """The config exactly as SharedBasisModel fills it, saved as PeftModel.save_pretrained saves it."""
    if config.target_modules is None:  # what BasisTunerBase._prepare_adapter_config writes
        config.target_modules = sorted({n.rsplit(".", 1)[-1] for n in find_linear_names(model)})
    for g in groups:
        config.groups[g.key] = g.members
        config.rank_pattern.update({m: rank_of[g.key] for m in g.members})
    config.base_model_name_or_path = config.base_model_name_or_path or model_path
    config.inference_mode = True
    auto_mapping = None
    if config.task_type is None:
        base_cls = type(model)
        auto_mapping = {"base_model_class": base_cls.__name__, "parent_library": base_cls.__module__}
    config.save_pretrained(output_dir, auto_mapping_dict=auto_mapping)


def _compress(model_path, model, config, groups, dataloader, output_dir, scratch, is_main, *, max_batches,
              progress, dtype, device) -> list[dict]:
    from ..tuners.shared_basis.model import (
        SharedBasisModel,
        factorize_group,
        group_gram,
        group_spectrum,
        member_error,
        normalised_spectrum,
    )

    last_layer = {g.key: max(layer_index(m) for m in g.members) for g in groups}
    first_layer = {g.key: min(layer_index(m) for m in g.members) for g in groups}
    spectra: dict[str, torch.Tensor] = {}
    open_stats: dict[int, CalibrationStatistics] = {}
    open_weights: dict[str, torch.Tensor] = {}
    weight_dtypes: dict[str, torch.dtype] = {}

    # ---- phase 1: stream the layers; spectra of each group as soon as it is complete --------------------
    for item in iter_layer_statistics(model_path, config, dataloader, max_batches=max_batches, progress=progress,
                                      dtype=dtype, model=model, device=device):
        i = item.index
        open_stats[i] = item.stats
        if is_main:
            item.stats.save(os.path.join(scratch, f"layer_{i}.safetensors"))
        for n, m in item.targets.items():
            open_weights[n] = linear_weight(m).detach()
            weight_dtypes[n] = m.weight.dtype
        if not is_main:
            open_stats.clear()
            open_weights.clear()
            continue
        for g in groups:
            if last_layer[g.key] != i:
                continue
            stats = _group_stats(open_stats, g.members)
            lam = group_spectrum([open_weights[m] for m in g.members], group_gram(stats, g.members),
                                 config.damping, g.members[0])
            spectra[g.key] = normalised_spectrum(lam)
        # forget what no open group needs any more: only the Grams and weights of members of groups that span
        # later layers stay (shared q/k/v and gate/up inputs), never a private module's (down_proj: the largest)
        keep_members = {m for g in groups if last_layer[g.key] > i for m in g.members if layer_index(m) <= i}
        for j in list(open_stats):
            kept = [m for m in keep_members if layer_index(m) == j]
            open_stats[j] = _group_stats(open_stats, kept)
            if not kept:
                del open_stats[j]
        for n in [n for n in open_weights if n not in keep_members]:
            del open_weights[n]
    if not is_main:
        return []

    # ---- phase 2: ranks from all spectra, then factors group by group, streamed to the adapter file -------
    ranks = SharedBasisModel._allocate(groups, config, lambda g: spectra[g.key])
    rank_of = {g.key: r for g, r in zip(groups, ranks)}
    shapes = {m: in_out_features(model.get_submodule(m)) for g in groups for m in g.members}
    order = sorted(groups, key=lambda g: (last_layer[g.key], first_layer[g.key]))
    specs: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
    for g in order:
        dt = weight_dtypes[g.members[0]]
        specs[f"base_model.sb_bases.{g.key}"] = ((rank_of[g.key], g.d_in), dt)
        for m in g.members:
            specs[f"base_model.model.{m}.sb_coefficient"] = ((shapes[m][1], rank_of[g.key]), weight_dtypes[m])
    os.makedirs(output_dir, exist_ok=True)
    writer = SafetensorsStreamWriter(os.path.join(output_dir, "adapter_model.safetensors"), specs, {"format": "pt"})
    ckpt = ShardedCheckpoint(model_path)
    loaded: dict[int, CalibrationStatistics] = {}
    reports: dict[str, dict] = {}
    try:
        for g in tqdm(order, desc="factorising", unit="group", disable=not progress):
            rank = rank_of[g.key]
            for j in {layer_index(m) for m in g.members} - set(loaded):
                loaded[j] = CalibrationStatistics.load(os.path.join(scratch, f"layer_{j}.safetensors"))
            for j in [j for j in loaded if j < first_layer[g.key]]:
                del loaded[j]
            stats = _group_stats(loaded, g.members)
            weights = {}
            for m in g.members:
                w = ckpt.get(m + ".weight", dtype)
                weights[m] = w.T if isinstance(model.get_submodule(m), Conv1D) else w  # d_out x d_in
            ckpt.close()
            trim_memory()
            f = factorize_group([weights[m] for m in g.members], group_gram(stats, g.members), rank,
                                config.damping, g.members[0])
            dt = weight_dtypes[g.members[0]]
            writer.write(f"base_model.sb_bases.{g.key}", f.basis.to(dt))
            errors = []
            for m, coef in zip(g.members, f.coefficients):
                writer.write(f"base_model.model.{m}.sb_coefficient", coef.to(weight_dtypes[m]))
                errors.append(member_error(weights[m], coef, f.basis, stats.gram(m)))
            reports[g.key] = {
                "group": g.key,
                "members": g.members,
                "rank": rank,
                "params": rank * g.cost,
                "dense_params": g.dense_params,
                "relative_error": sum(errors) / len(errors),
            }
        writer.close()
    except BaseException:
        writer.abort()
        raise
    finally:
        ckpt.close()

    _save_adapter_config(model_path, model, config, groups, rank_of, output_dir)
    return [reports[g.key] for g in groups]

