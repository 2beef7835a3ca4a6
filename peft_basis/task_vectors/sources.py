"""Where task vectors come from, read tensor by tensor so that T of them are never dense in RAM.

A *source* yields the tensors of one model (``keys()``, ``shape(key)``, ``get(key, rows)``); a
task vector is ``fine_tuned.get(k) - base.get(k)``, read one key (or one block of rows) at a time.

- :class:`StateDictSource`: an ``nn.Module`` or a state dict already in memory (views, no copies).
- :class:`FolderSource`: a model folder of ``*.safetensors`` (read lazily with ``safe_open``, rows
  sliced on disk) or ``*.bin`` (``torch.load(weights_only=True, mmap=True)``).
- :class:`AdapterDeltaSource`: PEFT adapters of any type (ours included), whose delta
  ``merged - base`` is computed module by module: ``get_delta_weight`` where the layer has one,
  else merge / read / restore. All adapters share one copy of the base model.
"""

from __future__ import annotations

import copy
import glob
import json
import os

import torch
from torch import nn

from ..errors import TaskVectorError

ADAPTER_CONFIG = "adapter_config.json"



def _load_bin(path: str) -> dict:
    """A ``*.bin`` state dict read with ``torch.load(weights_only=True)``; anything beyond tensors is refused plainly."""
    import pickle

    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as e:
        from ..errors import TaskVectorError

        raise TaskVectorError(
            f"{path} cannot be read safely with torch.load(weights_only=True) ({type(e).__name__}: {str(e)[:160]}). "
            "It holds more than tensors (or is damaged); it is not loaded, since unpickling it could run arbitrary "
            "code. If you trust it, load it yourself and save the model with save_pretrained (safetensors)."
        ) from e


def _is_float(t: torch.Tensor) -> bool:
    return t.dtype.is_floating_point


class Source:
    """One model's tensors. ``implicit_zero``: keys it lacks are unchanged (a zero delta), as for
    adapters that touch only some modules."""

    implicit_zero = False
    name = "source"

    def keys(self) -> list[str]:
        raise NotImplementedError

    def shape(self, key: str) -> tuple[int, ...]:
        raise NotImplementedError

    def get(self, key: str, rows: slice | None = None) -> torch.Tensor:
        raise NotImplementedError


class StateDictSource(Source):
    def __init__(self, obj, name: str = "state dict"):
        self.name = name
        sd = obj.state_dict() if isinstance(obj, nn.Module) else dict(obj)
        seen, self._sd = set(), {}
        for k, v in sd.items():
            if not isinstance(v, torch.Tensor) or not _is_float(v) or v.device.type == "meta":
                continue
            ptr = (v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape)) if v.numel() else None
            if ptr is not None and ptr in seen:  # tied weights (lm_head = embed_tokens): one key only
                continue
            seen.add(ptr)
            self._sd[k] = v
        self._order = list(self._sd)

    def keys(self):
        return list(self._order)

    def shape(self, key):
        return tuple(self._sd[key].shape)

    def get(self, key, rows=None):
        t = self._sd[key].detach()
        return t if rows is None or t.dim() == 0 else t[rows]


class FolderSource(Source):
    """A model folder (``save_pretrained`` output): safetensors shards read lazily."""

    def __init__(self, path: str):
        from safetensors import safe_open

        self.name = path
        files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
        self._handles, self._where, self._tensors = [], {}, {}
        if files:
            for f in files:
                h = safe_open(f, framework="pt")
                self._handles.append(h)
                for k in h.keys():
                    sl = h.get_slice(k)
                    if sl.get_dtype() in ("F16", "BF16", "F32", "F64", "F8_E4M3", "F8_E5M2"):
                        self._where[k] = h
        else:
            bins = sorted(glob.glob(os.path.join(path, "*.bin")))
            if not bins:
                raise FileNotFoundError(
                    f"{path} holds no *.safetensors or *.bin weights; pass a folder written by save_pretrained.")
            for f in bins:
                sd = _load_bin(f)
                self._tensors.update({k: v for k, v in sd.items() if isinstance(v, torch.Tensor) and _is_float(v)})

    def keys(self):
        return list(self._where) + list(self._tensors)

    def shape(self, key):
        if key in self._tensors:
            return tuple(self._tensors[key].shape)
        return tuple(self._where[key].get_slice(key).get_shape())

    def get(self, key, rows=None):
        if key in self._tensors:
            t = self._tensors[key]
            return t if rows is None or t.dim() == 0 else t[rows]
        sl = self._where[key].get_slice(key)
        if rows is None or len(sl.get_shape()) == 0:
            return self._where[key].get_tensor(key)
        return sl[rows]


def _tuner_layers(peft_model):
    from peft.tuners.tuners_utils import BaseTunerLayer

    prefix = "base_model.model."
    for name, module in peft_model.named_modules():
        if isinstance(module, BaseTunerLayer) and hasattr(module, "base_layer") and \
                not isinstance(module.base_layer, BaseTunerLayer):
            yield (name[len(prefix):] if name.startswith(prefix) else name), module


@torch.no_grad()
def adapter_delta(layer, adapter_name: str) -> torch.Tensor:
    """``merged - base`` weight of one tuner layer for one adapter, in the base weight's layout."""
    base = layer.get_base_layer()
    if hasattr(layer, "get_delta_weight"):
        try:
            return layer.get_delta_weight(adapter_name).detach().to(base.weight.dtype).clone()
        except (NotImplementedError, TypeError, KeyError):
            pass
    w0 = base.weight.detach().clone()
    try:
        layer.merge(adapter_names=[adapter_name])
    except NotImplementedError as e:
        raise TaskVectorError(f"The adapter layer {type(layer).__name__} can neither give its delta "
                              "(get_delta_weight) nor merge; merge it into the model yourself and pass the "
                              "merged model as a fine-tune.") from e
    delta = base.weight.detach() - w0
    base.weight.data.copy_(w0)  # restore exactly (unmerge can leave rounding error)
    if hasattr(layer, "merged_adapters"):
        layer.merged_adapters.clear()
    return delta


def _structural_copy(model: nn.Module) -> nn.Module:
    """A copy of the module tree that shares every parameter and buffer with ``model`` (no weight
    memory): PEFT injects its layers into the copy, the caller's model keeps its own modules. Weights
    are only read (``get_delta_weight``) or, for the merge fallback, changed and restored bit-exactly."""
    memo = {id(t): t for t in list(model.parameters()) + list(model.buffers())}
    return copy.deepcopy(model, memo)


class _AdapterHost:
    """One copy of the base model carrying every adapter (by name); deltas computed on demand."""

    def __init__(self, base_model: nn.Module | None, peft_model=None):
        self.base = base_model
        self.peft_model = peft_model
        self._layers: dict[str, object] = {}
        if peft_model is not None:  # a PeftModel the caller already holds: read its layers in place
            self._layers = dict(_tuner_layers(peft_model))

    def keys_of(self, adapter_name: str) -> set[str]:
        return {f"{n}.weight" for n, layer in self._layers.items() if adapter_name in _layer_adapters(layer)}

    def add(self, path: str, adapter_name: str) -> set[str]:
        from peft import PeftModel

        flags = {id(p): p.requires_grad for p in self.base.parameters()}
        if self.peft_model is None:
            self.peft_model = PeftModel.from_pretrained(_structural_copy(self.base), path, adapter_name=adapter_name)
        else:
            self.peft_model.load_adapter(path, adapter_name=adapter_name)
        self.peft_model.eval()
        for p in self.base.parameters():  # PEFT freezes the (shared) base weights: give the caller's flags back
            p.requires_grad_(flags[id(p)])
        keys = set()
        for name, layer in _tuner_layers(self.peft_model):
            self._layers[name] = layer
            if adapter_name in _layer_adapters(layer):
                keys.add(f"{name}.weight")
        return keys


def _layer_adapters(layer) -> set[str]:
    out = set()
    for attr in list(getattr(layer, "adapter_layer_names", ())) + list(getattr(layer, "other_param_names", ())):
        container = getattr(layer, attr, None)
        if isinstance(container, (dict, nn.ModuleDict, nn.ParameterDict)):
            out |= set(container.keys())
    return out


class AdapterDeltaSource(Source):
    """The task vector of one PEFT adapter: non-zero only on the modules it adapts."""

    implicit_zero = True

    def __init__(self, host: _AdapterHost, path: str | None, adapter_name: str):
        self.host, self.adapter_name, self.name = host, adapter_name, path or adapter_name
        self._keys = sorted(host.add(path, adapter_name) if path is not None else host.keys_of(adapter_name))
        if not self._keys:
            raise TaskVectorError(f"The adapter at {path} adapts no weight this code can read a delta from.")

    def keys(self):
        return list(self._keys)

    def shape(self, key):
        return tuple(self.host._layers[key[: -len(".weight")]].get_base_layer().weight.shape)

    def get(self, key, rows=None):
        d = adapter_delta(self.host._layers[key[: -len(".weight")]], self.adapter_name)
        return d if rows is None else d[rows]


def resolve_path(item: str) -> str:
    """A local folder, or a Hub repo id fetched with ``huggingface_hub.snapshot_download``."""
    if os.path.isdir(item):
        return item
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(item)
    except Exception as e:  # noqa: BLE001
        raise FileNotFoundError(f"{item!r} is neither a local folder nor a Hub repo id that could be downloaded "
                                f"({type(e).__name__}: {e}).") from e


def is_adapter_folder(path: str) -> bool:
    return os.path.exists(os.path.join(path, ADAPTER_CONFIG))


def adapter_base_name(path: str) -> str | None:
    with open(os.path.join(path, ADAPTER_CONFIG)) as f:
        return json.load(f).get("base_model_name_or_path")


def as_source(obj, name: str = "model") -> Source:
    if isinstance(obj, Source):
        return obj
    if isinstance(obj, str):
        path = resolve_path(obj)
        if is_adapter_folder(path):
            raise TaskVectorError(f"{obj} is a PEFT adapter, not a full model; pass it as a fine-tune.")
        return FolderSource(path)
    if isinstance(obj, (nn.Module, dict)):
        return StateDictSource(obj, name=name)
    raise TypeError(f"Cannot read weights from {type(obj).__name__}; pass an nn.Module, a state dict, a model "
                    "folder, a PEFT adapter folder or a Hub repo id.")


class DeltaReader:
    """Reads the T task vectors key by key (and row block by row block): ``block(key, rows)`` is a
    ``T x n`` float32 matrix, the only task-vector memory held at any time."""

    def __init__(self, base, fine_tunes: list, task_names: list[str]):
        if len(fine_tunes) != len(task_names):
            raise TaskVectorError(f"{len(fine_tunes)} fine-tunes but {len(task_names)} task names; give one name "
                                  "per fine-tune, in the same order.")
        if len(set(task_names)) != len(task_names):
            raise TaskVectorError(f"Task names must be unique, got {task_names}.")
        base_module = base if isinstance(base, nn.Module) else None
        self.base = as_source(base, "base")
        host = None
        self.tasks: list[Source] = []
        from peft import PeftModel

        for i, (ft, tname) in enumerate(zip(fine_tunes, task_names)):
            if isinstance(ft, PeftModel):
                self.tasks.append(AdapterDeltaSource(_AdapterHost(None, ft), None, ft.active_adapter))
                continue
            if isinstance(ft, str):
                path = resolve_path(ft)
                if is_adapter_folder(path):
                    if base_module is None:
                        raise TaskVectorError(f"Task {tname!r} is a PEFT adapter ({ft}): pass the base model as an "
                                              "nn.Module so the adapter's delta can be computed.")
                    host = host or _AdapterHost(base_module)
                    self.tasks.append(AdapterDeltaSource(host, path, f"task_{i}"))
                    continue
            self.tasks.append(_Difference(as_source(ft, tname), self.base))
        self.task_names = list(task_names)
        self._check()

    def _check(self):
        base_keys = set(self.base.keys())
        full = [s for s in self.tasks if not s.implicit_zero]
        keys: list[str] = []
        if full:
            ref = full[0].keys()
            for s, n in zip(self.tasks, self.task_names):
                if s.implicit_zero:
                    continue
                ks = set(s.keys())
                if ks != set(ref):
                    extra, missing = sorted(ks - set(ref))[:3], sorted(set(ref) - ks)[:3]
                    raise TaskVectorError(f"Task {n!r} has other weights than task {self.task_names[0]!r} "
                                          f"(extra {extra}, missing {missing}); all fine-tunes must share one "
                                          "architecture.")
            keys = list(ref)
        seen = set(keys)
        for s in self.tasks:
            if s.implicit_zero:
                for k in s.keys():
                    if k not in seen:
                        seen.add(k)
                        keys.append(k)
        for k in keys:
            if k not in base_keys:
                raise TaskVectorError(f"Weight {k!r} of a fine-tune is not in the base model; the fine-tunes were "
                                      "made from another base (or another architecture).")
            shape = self.base.shape(k)
            for s, n in zip(self.tasks, self.task_names):
                if k in s.keys() and tuple(s.shape(k)) != tuple(shape):
                    raise TaskVectorError(f"Weight {k!r} has shape {tuple(s.shape(k))} in task {n!r} but {shape} in "
                                          "the base model; task vectors need fine-tunes of the same base.")
        self.keys = keys
        self.shapes = {k: tuple(self.base.shape(k)) for k in keys}

    @property
    def num_params(self) -> int:
        return sum(_numel(s) for s in self.shapes.values())

    @torch.no_grad()
    def block(self, key: str, rows: slice | None = None) -> torch.Tensor:
        shape = self.shapes[key]
        n_rows = (rows.stop - rows.start) if rows is not None else (shape[0] if shape else 1)
        width = _numel(shape[1:]) if len(shape) > 1 else 1
        out = torch.zeros(len(self.tasks), n_rows * width if shape else 1)
        for i, s in enumerate(self.tasks):
            if key in s.keys():
                out[i] = s.get(key, rows).reshape(-1).float()
        return out


class _Difference(Source):
    def __init__(self, ft: Source, base: Source):
        self.ft, self.base, self.name = ft, base, ft.name

    def keys(self):
        return self.ft.keys()

    def shape(self, key):
        return self.ft.shape(key)

    def get(self, key, rows=None):
        return self.ft.get(key, rows).float() - self.base.get(key, rows).float()


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def row_blocks(shape: tuple[int, ...], max_elements: int):
    """Row slices of a tensor so that each block holds at most ``max_elements`` (at least one row)."""
    if len(shape) == 0:
        yield None
        return
    width = max(1, _numel(shape[1:]))
    step = max(1, max_elements // width)
    for start in range(0, shape[0], step):
        yield slice(start, min(shape[0], start + step))
