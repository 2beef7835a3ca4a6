"""Basis Sharing layer by layer: the layer-sequential pipeline's handler that compresses a model larger than
memory and writes the adapter ``calibrate`` + ``get_peft_model`` + ``save_pretrained`` would write.

``inputs="dense"``: groups span consecutive layers and the rank allocation needs every group's spectrum
before any rank is known, so compression runs in two phases: (1) as the layers stream by, each layer's
Grams go to a scratch safetensors file and, when a group's last layer is done, its whitened spectrum is
computed and its Grams dropped from memory; (2) at the end, ranks are allocated from the spectra, then
the groups are factorised one by one (Grams read back from scratch, weights read lazily from the
checkpoint) and the factors streamed into the adapter file. Memory holds one group's Grams and weights
at a time; disk holds all Grams until the end.

``inputs="compressed"`` (llm-compressor's sequential mode): every layer's Grams come from the outputs of
the layers before it as compressed; each layer is factorised as soon as its Grams are complete and its
weights replaced in place, so the pipeline feeds the next layer through the compressed one. Needs every
group to be one layer (a shared basis would need the Grams of later layers, whose inputs depend on it)
and ``rank_allocation="uniform"`` (ranks are fixed before any spectrum is seen: each group at its own
ratio's rank, without the one-rank top-up of the leftover budget).

Under ``torch.distributed`` every rank computes the same factors from the same all-reduced Grams; rank 0
alone writes files.
"""

from __future__ import annotations

import copy
import os
import shutil
import tempfile

import torch
from tqdm.auto import tqdm
from transformers.pytorch_utils import Conv1D

from ...calibration.pipelines import LayerHandler
from ...calibration.statistics import CalibrationStatistics
from ...distributed import is_main_process
from ...io import SafetensorsStreamWriter, trim_memory
from ...linalg import factorize_group, group_spectrum, member_error, normalised_spectrum
from ...modules import find_linear_names, in_out_features, layer_index, linear_weight
from .config import SharedBasisConfig
from .grouping import Group, allocate_ranks, by_type, group_gram, plan_groups, record_groups, uniform_rank
from .layer import saved_basis_name, saved_coefficient_name

INPUTS = ("dense", "compressed")


def _members_stats(layer_stats: dict[int, CalibrationStatistics], members: list[str]) -> CalibrationStatistics:
    """The statistics of ``members`` gathered from their layers' statistics."""
    merged = CalibrationStatistics()
    for m in members:
        s = layer_stats[layer_index(m)]
        key = s.sources[m]
        merged.sources[m] = key
        merged.grams[key] = s.grams[key]
        merged.tokens[key] = s.tokens[key]
    return merged


class SharedBasisLayerCompressor(LayerHandler):
    """Compress with Basis Sharing while the layer-sequential pipeline streams the layers (module docstring).

    ``scratch_dir`` holds every layer's Grams on disk until the end (``inputs="dense"``; default: a temporary
    folder inside ``output_dir``, removed afterwards); ``save_statistics_to`` additionally keeps them there, one
    ``layer_<i>.safetensors`` file per layer (:class:`CalibrationStatistics` format). The result of the run is
    the compression report (one dict per group)."""

    def __init__(self, config: SharedBasisConfig, output_dir: str, *, inputs: str = "dense",
                 scratch_dir: str | None = None, save_statistics_to: str | None = None):
        if not isinstance(config, SharedBasisConfig):
            raise TypeError(f"SharedBasisLayerCompressor compresses with SharedBasisConfig, not {type(config).__name__}.")
        if config.group_size == "auto":
            raise ValueError(
                "compress_sequential does not support group_size='auto' (it compares groupings of 1, 2 and 4 layers "
                "with every member's Gram in memory). Pass an integer group_size (2 is the paper's), or run "
                "`calibrate` + `get_peft_model` on the whole model."
            )
        if config.groups:
            raise ValueError("This config already carries `groups` (it was used to create an adapter); pass a fresh "
                             "config.")
        if inputs not in INPUTS:
            raise ValueError(f"inputs must be 'dense' or 'compressed', not {inputs!r}.")
        self.config = copy.deepcopy(config)
        self.output_dir, self.inputs = output_dir, inputs
        self.scratch_dir, self.save_statistics_to = scratch_dir, save_statistics_to
        self.streams = self.gram_stream = inputs
        self.is_main = is_main_process()
        self.reports: dict[str, dict] = {}

    # ---- events ------------------------------------------------------------------------------------
    def on_start(self, run) -> None:
        self.run = run
        model, config = run.model, self.config
        shapes = {n: in_out_features(model.get_submodule(n)) for n in run.target_names}
        self.groups = plan_groups(getattr(model.config, "model_type", None), by_type(run.target_names), config, shapes)
        self.shapes = shapes
        self.dtypes = {n: model.get_submodule(n).weight.dtype for n in run.target_names}
        if self.inputs == "compressed":
            shared = [g for g in self.groups if len(g.members) > 1]
            if shared:
                raise ValueError(
                    f"inputs='compressed' factorises each layer before the next one runs, but {shared[0].key} shares "
                    f"one basis across layers {shared[0].members[0]} ... {shared[0].members[-1]}. Pass group_size=1 "
                    "(or shared_modules=[]), or inputs='dense'."
                )
            if config.rank_allocation != "uniform":
                raise ValueError("inputs='compressed' fixes every rank before the first layer runs: use "
                                 "rank_allocation='uniform', or inputs='dense' for 'global'.")
            self._start_compressed()
        else:
            self._start_dense()

    def on_layer_calibrated(self, layer) -> None:
        if self.save_statistics_to is not None and self.is_main:
            os.makedirs(self.save_statistics_to, exist_ok=True)
            layer.stats.save(os.path.join(self.save_statistics_to, f"layer_{layer.index}.safetensors"))
        if self.inputs == "compressed":
            self._compress_layer(layer)
        else:
            self._collect_layer(layer)

    def on_end(self) -> list[dict]:
        try:
            if self.inputs == "dense":
                if not self.is_main:
                    return []
                self._factorise_groups()
            elif self.writer is not None:
                self.writer.close()
        except BaseException:
            if getattr(self, "writer", None) is not None:
                self.writer.abort()
            raise
        finally:
            if self.inputs == "dense" and self.own_scratch and self.scratch is not None:
                shutil.rmtree(self.scratch, ignore_errors=True)
        if self.is_main:
            self._save_adapter_config()
        return [self.reports[g.key] for g in self.groups]

    # ---- inputs="compressed": factorise each layer as it comes ---------------------------------------
    def _start_compressed(self) -> None:
        self.rank_of = {g.key: uniform_rank(g, self.config) for g in self.groups}
        self.group_of = {g.members[0]: g for g in self.groups}
        specs: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
        for g in sorted(self.groups, key=lambda g: layer_index(g.members[0])):
            (m,) = g.members
            specs[saved_basis_name(g.key)] = ((self.rank_of[g.key], g.d_in), self.dtypes[m])
            specs[saved_coefficient_name(m)] = ((self.shapes[m][1], self.rank_of[g.key]), self.dtypes[m])
        self.writer = None
        if self.is_main:
            os.makedirs(self.output_dir, exist_ok=True)
            self.writer = SafetensorsStreamWriter(os.path.join(self.output_dir, "adapter_model.safetensors"), specs,
                                                  {"format": "pt"})

    def _compress_layer(self, layer) -> None:
        for m, module in layer.targets.items():
            g = self.group_of[m]
            weight = linear_weight(module).detach()
            gram = layer.stats.gram(m).to("cpu")
            f = factorize_group([weight.to("cpu")], gram, self.rank_of[g.key], self.config.damping, m,
                                dtype=getattr(torch, self.config.decomposition_dtype))
            coef, basis = f.coefficients[0], f.basis
            # the layer as it will be served: the next layers are calibrated on its outputs
            compressed = (coef @ basis).to(module.weight.dtype).to(module.weight.device)
            module.weight.data.copy_(compressed.T if isinstance(module, Conv1D) else compressed)
            if self.writer is not None:
                self.writer.write(saved_basis_name(g.key), basis.to(self.dtypes[m]))
                self.writer.write(saved_coefficient_name(m), coef.to(self.dtypes[m]))
            self.reports[g.key] = g.report(self.rank_of[g.key], member_error(weight.to("cpu"), coef, basis, gram))

    # ---- inputs="dense": spectra as groups complete, factors at the end -----------------------------
    def _start_dense(self) -> None:
        groups = self.groups
        self.last_layer = {g.key: max(layer_index(m) for m in g.members) for g in groups}
        self.first_layer = {g.key: min(layer_index(m) for m in g.members) for g in groups}
        self.spectra: dict[str, torch.Tensor] = {}
        self.open_stats: dict[int, CalibrationStatistics] = {}
        self.open_weights: dict[str, torch.Tensor] = {}
        self.own_scratch = self.save_statistics_to is None and self.scratch_dir is None
        if self.save_statistics_to is not None:
            self.scratch = self.save_statistics_to
        elif self.scratch_dir is not None:
            self.scratch = self.scratch_dir
        elif self.is_main:
            os.makedirs(self.output_dir, exist_ok=True)
            self.scratch = tempfile.mkdtemp(prefix=".sequential-grams-", dir=self.output_dir)
        else:
            self.scratch = None
        if self.scratch is not None:
            os.makedirs(self.scratch, exist_ok=True)

    def _collect_layer(self, layer) -> None:
        i = layer.index
        self.open_stats[i] = layer.stats
        if self.is_main and self.save_statistics_to is None:
            layer.stats.save(os.path.join(self.scratch, f"layer_{i}.safetensors"))
        for n, m in layer.targets.items():
            self.open_weights[n] = linear_weight(m).detach()
            self.dtypes[n] = m.weight.dtype  # as loaded (the checkpoint's dtype unless one was asked for)
        if not self.is_main:
            self.open_stats.clear()
            self.open_weights.clear()
            return
        for g in self.groups:
            if self.last_layer[g.key] != i:
                continue
            stats = _members_stats(self.open_stats, g.members)
            lam = group_spectrum([self.open_weights[m] for m in g.members], group_gram(stats, g.members),
                                 self.config.damping, g.members[0], dtype=getattr(torch, self.config.decomposition_dtype))
            self.spectra[g.key] = normalised_spectrum(lam)
        # forget what no open group needs any more: only the Grams and weights of members of groups that span
        # later layers stay (shared q/k/v and gate/up inputs), never a private module's (down_proj: the largest)
        keep = {m for g in self.groups if self.last_layer[g.key] > i for m in g.members if layer_index(m) <= i}
        for j in list(self.open_stats):
            kept = [m for m in keep if layer_index(m) == j]
            self.open_stats[j] = _members_stats(self.open_stats, kept)
            if not kept:
                del self.open_stats[j]
        for n in [n for n in self.open_weights if n not in keep]:
            del self.open_weights[n]

    def _factorise_groups(self) -> None:
        config, groups = self.config, self.groups
        ranks = allocate_ranks(groups, config, lambda g: self.spectra[g.key], allow_dense=False)
        self.rank_of = rank_of = {g.key: r for g, r in zip(groups, ranks)}
        order = sorted(groups, key=lambda g: (self.last_layer[g.key], self.first_layer[g.key]))
        specs: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
        for g in order:
            specs[saved_basis_name(g.key)] = ((rank_of[g.key], g.d_in), self.dtypes[g.members[0]])
            for m in g.members:
                specs[saved_coefficient_name(m)] = ((self.shapes[m][1], rank_of[g.key]), self.dtypes[m])
        os.makedirs(self.output_dir, exist_ok=True)
        self.writer = SafetensorsStreamWriter(os.path.join(self.output_dir, "adapter_model.safetensors"), specs,
                                              {"format": "pt"})
        loaded: dict[int, CalibrationStatistics] = {}
        for g in tqdm(order, desc="factorising", unit="group", disable=not self.run.progress):
            rank = rank_of[g.key]
            for j in {layer_index(m) for m in g.members} - set(loaded):
                loaded[j] = CalibrationStatistics.load(os.path.join(self.scratch, f"layer_{j}.safetensors"))
            for j in [j for j in loaded if j < self.first_layer[g.key]]:
                del loaded[j]
            stats = _members_stats(loaded, g.members)
            weights = {m: self.run.read_weight(m) for m in g.members}  # d_out x d_in
            trim_memory()
            f = factorize_group([weights[m] for m in g.members], group_gram(stats, g.members), rank,
                                config.damping, g.members[0], dtype=getattr(torch, config.decomposition_dtype))
            self.writer.write(saved_basis_name(g.key), f.basis.to(self.dtypes[g.members[0]]))
            errors = []
            for m, coef in zip(g.members, f.coefficients):
                self.writer.write(saved_coefficient_name(m), coef.to(self.dtypes[m]))
                errors.append(member_error(weights[m], coef, f.basis, stats.gram(m)))
            self.reports[g.key] = g.report(rank, sum(errors) / len(errors))
        self.writer.close()
        self.writer = None

    # ---- the adapter config ---------------------------------------------------------------------------
    def _save_adapter_config(self) -> None:
        save_adapter_config(self.config, self.run, self.groups, [self.rank_of[g.key] for g in self.groups],
                            self.output_dir)


def save_adapter_config(config: SharedBasisConfig, run, groups: list[Group], ranks: list[int], output_dir: str) -> None:
    """The config exactly as SharedBasisModel fills it, saved as PeftModel.save_pretrained saves it."""
    model = run.model
    if config.target_modules is None:  # what PeftBasisTuner._prepare_adapter_config writes
        config.target_modules = sorted({n.rsplit(".", 1)[-1] for n in find_linear_names(model)})
    record_groups(config, groups, ranks)
    config.base_model_name_or_path = config.base_model_name_or_path or run.model_name_or_path
    config.inference_mode = True
    auto_mapping = None
    if config.task_type is None:
        base_cls = type(model)
        auto_mapping = {"base_model_class": base_cls.__name__, "parent_library": base_cls.__module__}
    config.save_pretrained(output_dir, auto_mapping_dict=auto_mapping)


# ---- where a layer-by-layer fit puts its factors -------------------------------------------------------
class AdapterSink:
    """Streams the factors into ``output_dir/adapter_model.safetensors`` (declared in layer order) and writes
    ``adapter_config.json`` at the end: the folder ``PeftModel.from_pretrained`` loads."""

    def __init__(self, output_dir: str):
        self.output_dir = output_dir
        self.writer = None

    def start(self, config, run, groups: list[Group], rank_of: dict[str, int]) -> None:
        if not is_main_process():
            return
        specs: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
        for g in sorted(groups, key=lambda g: run.target_names.index(g.members[0])):
            (m,) = g.members
            dtype = run.model.get_submodule(m).weight.dtype
            specs[saved_basis_name(g.key)] = ((rank_of[m], g.d_in), dtype)
            specs[saved_coefficient_name(m)] = ((g.d_out, rank_of[m]), dtype)
        self.dtypes = {name: dt for name, (_, dt) in specs.items()}
        os.makedirs(self.output_dir, exist_ok=True)
        self.writer = SafetensorsStreamWriter(os.path.join(self.output_dir, "adapter_model.safetensors"), specs,
                                              {"format": "pt"})

    def write(self, module_name: str, group: Group, basis: torch.Tensor, coefficient: torch.Tensor) -> None:
        if self.writer is None:
            return
        try:
            for name, t in ((saved_basis_name(group.key), basis), (saved_coefficient_name(module_name), coefficient)):
                self.writer.write(name, t.detach().to(self.dtypes[name]))
        except BaseException:
            self.writer.abort()
            self.writer = None
            raise

    def finish(self, config, run, groups: list[Group], rank_of: dict[str, int], handler) -> list[dict]:
        if self.writer is not None:
            self.writer.close()
            config.dense_modules = sorted(getattr(handler, "dense", []))
            save_adapter_config(config, run, groups, [rank_of[g.members[0]] for g in groups], self.output_dir)
        return handler.report()

    def abort(self) -> None:
        if self.writer is not None:
            self.writer.abort()


class StatisticsSink:
    """Keeps the factors in a :class:`CalibrationStatistics` (``factors/basis/<group>``,
    ``factors/coefficient/<module>``; groups and ranks in its meta), which ``get_peft_model`` then injects
    as they are: what ``calibrate`` attaches for a config whose fit needs the layer-sequential pipeline."""

    def __init__(self):
        self.stats = CalibrationStatistics()

    def start(self, config, run, groups, rank_of) -> None:
        pass

    def write(self, module_name: str, group: Group, basis: torch.Tensor, coefficient: torch.Tensor) -> None:
        self.stats.extra[f"factors/basis/{group.key}"] = basis.detach().float().contiguous()
        self.stats.extra[f"factors/coefficient/{module_name}"] = coefficient.detach().float().contiguous()

    def finish(self, config, run, groups, rank_of, handler) -> CalibrationStatistics:
        dense = list(getattr(handler, "dense", []))
        self.stats.meta["factors"] = {"groups": {g.key: g.members for g in groups},
                                      "ranks": {g.key: rank_of[g.members[0]] for g in groups},
                                      "report": handler.report(), "refinement": handler.refinement, "dense": dense}
        self.stats.meta["pipeline"] = "sequential"
        # every target is covered (what calibrate checks of any statistics), by its factors or as kept dense
        for g in groups:
            for m in g.members:
                self.stats.sources[m] = f"factors/{g.key}"
        for m in dense:
            self.stats.sources[m] = "dense"
        return self.stats

    def abort(self) -> None:
        pass
