"""``TaskVectorBasis``: T task vectors kept as M basis vectors; add tasks, negate one, recover one.

Storage: ``task_vector_basis.safetensors`` (``basis.<key>``: ``M x *shape`` per weight; PCA adds
``mean.<key>``; ``coefficients`` ``M x T``, ``mixing`` ``T x M``, ``gram`` ``T x T``) and
``task_vector_basis.json`` (method, hyperparameters, task order, keys, shapes, errors), both written
atomically.
"""

from __future__ import annotations

import copy
import json
import math
import os
import tempfile
import time
import uuid
from collections.abc import Callable

import torch
from torch import nn

from ..errors import TaskVectorError
from ..io import atomic_folder, atomic_write_text, save_streaming
from ..validation import all_finite
from .legacy import is_legacy_folder, read_legacy
from .methods import DEFAULT_CHUNK, accumulate_gram, ae_factors, build_bases, pca_factors
from .sources import DeltaReader, resolve_path

WEIGHTS_NAME = "task_vector_basis.safetensors"
CONFIG_NAME = "task_vector_basis.json"
FORMAT_VERSION = 1
METHODS = ("ae", "pca")
ALPHA_GRID = [i / 20 for i in range(21)]


class TaskVectorBasis:
    """M basis vectors for T named task vectors (see ``docs/task_vectors.md``)."""

    def __init__(self, method: str, task_names: list[str], bases: dict[str, torch.Tensor],
                 coefficients: torch.Tensor, mixing: torch.Tensor | None = None,
                 mean: dict[str, torch.Tensor] | None = None, gram: torch.Tensor | None = None,
                 hyperparameters: dict | None = None, info: dict | None = None):
        method = method.lower()
        if method not in METHODS:
            raise ValueError(f"Unknown method {method!r}; choose one of {METHODS}.")
        T = len(task_names)
        if coefficients.dim() != 2 or coefficients.shape[1] != T:
            raise TaskVectorError(f"coefficients have shape {tuple(coefficients.shape)} but there are {T} task names; "
                                  "expected (num_bases, num_tasks). The task order does not match the basis.")
        M = coefficients.shape[0]
        for k, b in bases.items():
            if b.shape[0] != M:
                raise TaskVectorError(f"Basis tensor {k!r} stacks {b.shape[0]} vectors but coefficients have {M} rows.")
        if mixing is not None and tuple(mixing.shape) != (T, M):
            raise TaskVectorError(f"mixing has shape {tuple(mixing.shape)}, expected ({T}, {M}).")
        if method == "pca":
            if mean is None:
                raise TaskVectorError("A PCA basis needs the mean task vector (mean.<key>); it is missing.")
            if set(mean) != set(bases):
                raise TaskVectorError("The PCA mean and the bases cover different weights.")
            for k in bases:
                if tuple(mean[k].shape) != tuple(bases[k].shape[1:]):
                    raise TaskVectorError(f"mean.{k} has shape {tuple(mean[k].shape)}, basis {tuple(bases[k].shape[1:])}.")
        self.method, self.task_names = method, list(task_names)
        self.bases, self.coefficients, self.mixing = bases, coefficients.double(), mixing
        self.mean, self.gram = mean, gram
        self.hyperparameters = dict(hyperparameters or {})
        self.info = dict(info or {})
        self.last_search: dict[float, float] | None = None

    # ---- building ---------------------------------------------------------------------------------
    @classmethod
    def from_models(cls, base_model, fine_tuned: list, method: str = "pca", num_bases: int | None = None,
                    task_names: list[str] | None = None, *, dtype: torch.dtype = torch.float32,
                    chunk_elements: int = DEFAULT_CHUNK, steps: int = 6000, lr: float = 0.01, tau: float = 5.0,
                    weight_decay: float = 1e-6, seed: int = 0) -> TaskVectorBasis:
        """Build from a base and T fine-tunes: each an ``nn.Module``, a state dict, a model folder, a
        PEFT adapter folder or a Hub repo id. ``num_bases`` defaults to ``T // 2`` (as published).

        Two streaming passes over the task vectors (Gram, then bases); peak task-vector memory is
        ``(T + 1) x chunk_elements`` floats on top of the output (see docs/task_vectors.md)."""
        method = method.lower()
        if method not in METHODS:
            raise ValueError(f"Unknown method {method!r}; choose one of {METHODS}.")
        T = len(fine_tuned)
        if T < 2:
            raise TaskVectorError(f"Need at least 2 fine-tunes to build a basis, got {T}.")
        task_names = list(task_names) if task_names is not None else [f"task_{i}" for i in range(T)]
        num_bases = num_bases if num_bases is not None else max(1, T // 2)
        limit = T if method == "ae" else T - 1
        if not 1 <= num_bases <= limit:
            raise TaskVectorError(f"num_bases={num_bases} with T={T} tasks: {method} needs 1 <= M <= {limit} "
                                  "(PCA of centred vectors has at most T-1 components).")
        t0 = time.perf_counter()
        reader = DeltaReader(base_model, fine_tuned, task_names)
        G = accumulate_gram(reader, chunk_elements)
        t_gram = time.perf_counter() - t0
        if method == "ae":
            hp = {"num_bases": num_bases, "steps": steps, "lr": lr, "tau": tau, "weight_decay": weight_decay, "seed": seed}
            P, C, info = ae_factors(G, num_bases, steps=steps, lr=lr, tau=tau, weight_decay=weight_decay, seed=seed)
            mixing_all = P
        else:
            hp = {"num_bases": num_bases}
            P, C, mean_w, info = pca_factors(G, num_bases)
            mixing_all = torch.cat([P, mean_w[:, None]], dim=1)
        stacked = build_bases(reader, mixing_all, dtype=dtype, chunk_elements=chunk_elements)
        mean = None
        if method == "pca":
            # views of one (M + 1) x D allocation, no copy
            mean = {k: v[-1] for k, v in stacked.items()}
            stacked = {k: v[:-1] for k, v in stacked.items()}
        info.update({"build_seconds": time.perf_counter() - t0, "gram_seconds": t_gram,
                     "num_params": reader.num_params, "sources": [s.name for s in reader.tasks]})
        return cls(method, task_names, stacked, C, mixing=P, mean=mean, gram=G, hyperparameters=hp, info=info)

    # ---- shapes and storage -----------------------------------------------------------------------
    @property
    def num_tasks(self) -> int:
        return len(self.task_names)

    @property
    def num_bases(self) -> int:
        return self.coefficients.shape[0]

    @property
    def keys(self) -> list[str]:
        return list(self.bases)

    def storage(self) -> dict:
        """Bytes of the stored vectors against keeping the T task vectors in the same dtype."""
        elem = next(iter(self.bases.values())).element_size() if self.bases else 4
        D = sum(b[0].numel() for b in self.bases.values())
        stored = sum(b.numel() for b in self.bases.values()) * elem
        if self.mean is not None:
            stored += sum(m.numel() for m in self.mean.values()) * elem
        small = self.coefficients.numel() * 4 + (self.mixing.numel() * 4 if self.mixing is not None else 0)
        full = self.num_tasks * D * elem
        return {"vector_bytes": stored, "small_bytes": small, "task_vectors_bytes": full,
                "ratio": (stored + small) / full if full else float("nan"), "num_params": D}

    # ---- the three operations ---------------------------------------------------------------------
    def _task_index(self, task) -> int:
        if isinstance(task, int):
            if not 0 <= task < self.num_tasks:
                raise IndexError(f"Task index {task} out of range for {self.num_tasks} tasks.")
            return task
        try:
            return self.task_names.index(task)
        except ValueError:
            raise KeyError(f"Unknown task {task!r}; this basis holds {self.task_names}.") from None

    def _combine(self, weights: torch.Tensor, mean_weight: float) -> dict[str, torch.Tensor]:
        """``mean_weight * mu + sum_m weights[m] s_m`` for every key (float32)."""
        w = weights.float()
        out = {}
        for k, b in self.bases.items():
            d = torch.tensordot(w, b.float(), dims=1)
            if self.mean is not None and mean_weight:
                d += mean_weight * self.mean[k].float()
            out[k] = d
        return out

    def recover(self, task) -> dict[str, torch.Tensor]:
        """The task vector of ``task`` (name or index) as a state dict of deltas: ``mu + sum_m C[m,t] s_m``."""
        t = self._task_index(task)
        return self._combine(self.coefficients[:, t], 1.0 if self.mean is not None else 0.0)

    def merged_delta(self, combine: str | None = None) -> dict[str, torch.Tensor]:
        """What ``add`` adds at ``alpha = 1``. ``combine="bases"``: ``sum_m s_m`` (the paper's addition);
        ``"tasks"``: the sum of the T recovered task vectors. Default: ``bases`` for AE, ``tasks`` for
        PCA (whose components are centred and of arbitrary sign, so their plain sum means little)."""
        combine = combine or ("bases" if self.method == "ae" else "tasks")
        if combine == "bases":
            return self._combine(torch.ones(self.num_bases, dtype=torch.float64), 0.0)
        if combine == "tasks":
            return self._combine(self.coefficients.sum(1), float(self.num_tasks) if self.mean is not None else 0.0)
        raise ValueError(f"combine must be 'bases' or 'tasks', got {combine!r}.")

    def add(self, base_model, alpha: float | None = 0.4, *, eval_fn: Callable | None = None,
            combine: str | None = None, grid: list[float] | None = None):
        """``theta_0 + alpha * merged_delta``; returns a new model (or state dict). With ``alpha=None``,
        ``eval_fn(model) -> score`` (higher is better) is run at 21 alphas in [0, 1] and the best kept;
        the scores are in ``self.last_search``."""
        return self._apply(base_model, self.merged_delta(combine), alpha, eval_fn, grid)

    def negate(self, base_model, task, alpha: float | None = 0.5, *, eval_fn: Callable | None = None,
               grid: list[float] | None = None):
        """``theta_0 - alpha * recover(task)``; ``alpha=None`` searches with ``eval_fn`` as in :meth:`add`
        (encode "hurt the target, keep the control" in the score)."""
        neg = {k: -v for k, v in self.recover(task).items()}
        return self._apply(base_model, neg, alpha, eval_fn, grid)

    def _apply(self, base_model, delta, alpha, eval_fn, grid):
        if alpha is not None:
            self.last_search = None
            return apply_delta(base_model, delta, alpha)
        if eval_fn is None:
            raise ValueError("alpha=None searches for the best scaling: pass eval_fn(model) -> score (higher is better).")
        grid = list(grid) if grid is not None else ALPHA_GRID
        model = apply_delta(base_model, delta, grid[0])
        scores, prev = {}, grid[0]
        for a in grid:
            if a != prev:
                apply_delta(model, delta, a - prev, inplace=True)
                prev = a
            scores[a] = float(eval_fn(model))
        best = max(scores, key=lambda a: scores[a])
        self.last_search = scores
        del model
        return apply_delta(base_model, delta, best)

    # ---- writing out -------------------------------------------------------------------------------
    def export_lora(self, base_model: nn.Module, save_directory: str, *, task=None, alpha: float = 1.0,
                    combine: str | None = None, negate: bool = False, tol: float = 1e-5) -> dict[str, int]:
        """Write ``alpha * delta`` (the merged delta, or ``recover(task)``; minus it with ``negate``) as a
        PEFT LoRA adapter, per Linear a truncated SVD of the delta at the smallest rank whose relative
        Frobenius error is <= ``tol``. Raises if a delta touches a non-Linear weight or is not low-rank
        enough to save storage. Returns the rank per module."""
        from .export import write_lora

        delta = self.recover(task) if task is not None else self.merged_delta(combine)
        scale = -alpha if negate else alpha
        return write_lora(base_model, {k: scale * v for k, v in delta.items()}, save_directory, tol=tol)

    # ---- save / load ------------------------------------------------------------------------------
    def save_pretrained(self, save_directory: str) -> None:
        """Write the two files into a temporary folder and swap it in (``peft_basis.io.atomic_folder``): the folder
        under ``save_directory`` always holds a matching pair (one ``content_id`` in both), never new vectors under
        old task names."""
        with atomic_folder(save_directory) as tmp:
            self._write(tmp)

    def _write(self, save_directory: str) -> None:
        content_id = uuid.uuid4().hex
        tensors = {f"basis.{k}": v.contiguous() for k, v in self.bases.items()}
        if self.mean is not None:
            tensors.update({f"mean.{k}": v.contiguous() for k, v in self.mean.items()})
        tensors["coefficients"] = self.coefficients.double().contiguous()
        if self.mixing is not None:
            tensors["mixing"] = self.mixing.double().contiguous()
        if self.gram is not None:
            tensors["gram"] = self.gram.double().contiguous()
        meta = {"format_version": FORMAT_VERSION, "method": self.method, "task_names": self.task_names,
                "num_tasks": self.num_tasks, "num_bases": self.num_bases, "hyperparameters": self.hyperparameters,
                "keys": self.keys, "shapes": {k: list(v.shape[1:]) for k, v in self.bases.items()},
                "dtype": str(next(iter(self.bases.values())).dtype).replace("torch.", ""),
                "storage": self.storage(), "info": _jsonable(self.info), "content_id": content_id}
        save_streaming(tensors, os.path.join(save_directory, WEIGHTS_NAME), {"format": "pt", "content_id": content_id})
        atomic_write_text(os.path.join(save_directory, CONFIG_NAME), json.dumps(meta, indent=2))

    @classmethod
    def from_pretrained(cls, path_or_repo_id: str, *, revision: str | None = None, subfolder: str | None = None,
                        token=None, cache_dir=None, local_files_only: bool = False) -> TaskVectorBasis:
        """A folder written by :meth:`save_pretrained`, a Hub repo id (``snapshot_download`` of the two
        files; ``revision``/``subfolder``/``token`` as usual), or a folder of the original repository's
        artifacts (converted on the fly, see :func:`from_legacy`)."""

        if os.path.isdir(path_or_repo_id):
            path = os.path.join(path_or_repo_id, subfolder) if subfolder else path_or_repo_id
        elif revision or subfolder or token or cache_dir or local_files_only:
            from ..io.hub_files import download_folder

            path = download_folder(path_or_repo_id, revision=revision, subfolder=subfolder, token=token,
                                   cache_dir=cache_dir, local_files_only=local_files_only)
        else:
            path = resolve_path(path_or_repo_id)
        cfg_path = os.path.join(path, CONFIG_NAME)
        if not os.path.exists(cfg_path):
            if is_legacy_folder(path):
                return from_legacy(path)
            raise FileNotFoundError(f"{path} holds no {CONFIG_NAME}; it was not written by TaskVectorBasis.save_pretrained "
                                    "(nor is it a folder of the original repo's basis_vectors.pt / method_info.json).")
        try:
            with open(cfg_path) as f:
                meta = json.load(f)
        except ValueError as e:
            raise TaskVectorError(f"{cfg_path} is not valid JSON ({e}): the file is damaged; save the basis again.") from None
        if meta.get("format_version", 0) > FORMAT_VERSION:
            raise ValueError(f"{path} was written by a newer peft-basis (format {meta['format_version']}); upgrade.")
        tensors = _read_checked(os.path.join(path, WEIGHTS_NAME), meta)
        bases = {k: tensors[f"basis.{k}"] for k in meta["keys"]}
        for k in meta["keys"]:
            if list(bases[k].shape[1:]) != meta["shapes"][k]:
                raise TaskVectorError(f"basis.{k} has shape {list(bases[k].shape[1:])}, the JSON says {meta['shapes'][k]}: "
                                      "the two files do not belong together.")
        mean = {k: tensors[f"mean.{k}"] for k in meta["keys"]} if meta["method"] == "pca" else None
        C = tensors["coefficients"]
        if tuple(C.shape) != (meta["num_bases"], meta["num_tasks"]) or len(meta["task_names"]) != meta["num_tasks"]:
            raise TaskVectorError(f"coefficients {tuple(C.shape)} do not match num_bases={meta['num_bases']}, "
                                  f"num_tasks={meta['num_tasks']} ({len(meta['task_names'])} task names).")
        return cls(meta["method"], meta["task_names"], bases, C, mixing=tensors.get("mixing"), mean=mean,
                   gram=tensors.get("gram"), hyperparameters=meta.get("hyperparameters"), info=meta.get("info"))

    def push_to_hub(self, repo_id: str, *, private: bool | None = None, token: str | None = None,
                    revision: str | None = None, subfolder: str | None = None,
                    commit_message: str = "Upload task vector basis") -> str:
        """Save to a temporary folder (with a short README) and upload it with ``HfApi.upload_folder``
        (creating the repo, and the branch for ``revision``); returns the commit URL."""
        from ..io.hub_files import upload_folder_to_hub

        with tempfile.TemporaryDirectory() as tmp:
            self.save_pretrained(tmp)
            readme = self._card()
            atomic_write_text(os.path.join(tmp, "README.md"), readme)
            info = upload_folder_to_hub(tmp, repo_id, private=private, token=token, revision=revision,
                                        subfolder=subfolder, commit_message=commit_message)
        return str(getattr(info, "commit_url", info))

    def _card(self) -> str:
        from .._version import __version__

        s = self.storage()
        return ("---\nlibrary_name: peft\ntags:\n- peft-basis\n- task-vector-basis\n---\n"
                f"# Task Vector Basis ({self.method}, {self.num_bases} bases for {self.num_tasks} tasks)\n\n"
                f"Tasks: {', '.join(self.task_names)}. {s['num_params']:,} parameters per vector; stored "
                f"{s['ratio']:.3f} of the task vectors' size. Written by peft-basis {__version__}.\n\n"
                "```python\nimport peft_basis\ntvb = peft_basis.TaskVectorBasis.from_pretrained(\"<this repo>\")\n"
                "model = tvb.add(base_model, alpha=0.4)\n```\n")

    def __repr__(self) -> str:
        s = self.storage()
        return (f"TaskVectorBasis(method={self.method!r}, tasks={self.task_names}, num_bases={self.num_bases}, "
                f"params={s['num_params']:,}, storage_ratio={s['ratio']:.3f})")


def from_legacy(run_dir: str) -> TaskVectorBasis:
    """Convert one run folder of the original repository (uiuctml/TaskVectorBasis) into a :class:`TaskVectorBasis`
    (every ``.pt`` read with ``weights_only=True``; see :mod:`peft_basis.task_vectors.legacy`)."""
    return TaskVectorBasis(**read_legacy(run_dir))


@torch.no_grad()
def apply_delta(model, delta: dict[str, torch.Tensor], alpha: float, inplace: bool = False):
    """``model + alpha * delta`` (an ``nn.Module`` or a state dict); a copy unless ``inplace``."""
    if not isinstance(model, nn.Module):
        sd = {k: (v if inplace else v.clone()) for k, v in model.items()}
        target = sd
    else:
        sd_model = model if inplace else copy.deepcopy(model)
        target = sd_model.state_dict(keep_vars=True)
    missing = [k for k in delta if k not in target]
    if missing:
        raise TaskVectorError(f"{len(missing)} weights of the task vectors are not in this model (e.g. {missing[:3]}); "
                              "apply it to the base model the basis was built from.")
    done = set()
    for k, d in delta.items():
        t = target[k]
        t = t.data if isinstance(t, nn.Parameter) else t
        if tuple(t.shape) != tuple(d.shape):
            raise TaskVectorError(f"Weight {k!r} is {tuple(t.shape)} in the model but {tuple(d.shape)} in the basis.")
        ptr = (t.untyped_storage().data_ptr(), t.storage_offset())
        if ptr in done:  # a tied alias of a weight already updated
            continue
        done.add(ptr)
        t.add_(d.to(t.dtype), alpha=alpha)
    return target if not isinstance(model, nn.Module) else sd_model


def _read_checked(file: str, meta: dict) -> dict[str, torch.Tensor]:
    """The weights file, refused when damaged, of another save than the JSON, incomplete, or not finite floats."""
    from safetensors import safe_open

    try:
        with safe_open(file, framework="pt") as f:
            file_id = (f.metadata() or {}).get("content_id")
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except FileNotFoundError:
        raise TaskVectorError(f"{file} is missing: the folder holds the JSON of a basis but not its vectors (an "
                              "interrupted copy). Copy or save the whole folder again.") from None
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error type for a damaged file
        raise TaskVectorError(f"{file} is damaged or truncated ({e}): save or download the basis again.") from e
    if file_id is not None and meta.get("content_id") is not None and file_id != meta["content_id"]:
        raise TaskVectorError(f"{file} and {CONFIG_NAME} come from two different saves (their content_id differ): the "
                              "vectors would be read under another save's task names. Save the basis again.")
    need = [f"basis.{k}" for k in meta["keys"]] + ([f"mean.{k}" for k in meta["keys"]] if meta["method"] == "pca" else [])
    missing = [k for k in need + ["coefficients"] if k not in tensors]
    if missing:
        raise TaskVectorError(f"{file} lacks {missing[:3]} that {CONFIG_NAME} lists: the files do not belong together "
                              "or the save was interrupted. Save the basis again.")
    for k, t in tensors.items():
        if not t.is_floating_point() or not all_finite(t):
            raise TaskVectorError(f"{file}: {k} is {'not finite' if t.is_floating_point() else t.dtype}; a basis holds "
                                  "finite floating-point tensors. The file is damaged: save the basis again.")
    return tensors


def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    return str(obj)
