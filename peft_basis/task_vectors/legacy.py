"""Reading the original repository's artifacts (uiuctml/TaskVectorBasis) without running pickles.

A run folder holds ``method_info.json`` (method, hyperparameters, ``datasets`` = the task order),
``basis_vectors.pt`` (``{"basis_vectors": [M dicts key -> tensor], ...}``) and, for recovery,
``AWB.pt`` (``A``, ``W``, ``B``, ``metadata``) or ``pca_components.pt`` (``coefficients`` M x T,
``mean_vector`` flat D, ``keys_order``, ``param_shapes``, ...). Every ``.pt`` is read with
``torch.load(weights_only=True)``: a file that needs anything beyond tensors and plain containers is
refused, never executed. Task counts are checked, never truncated or padded (the original code
silently did both).
"""

from __future__ import annotations

import json
import os

import torch

from ..errors import TaskVectorError

_METHODS = {"AutoencoderBasisMethod": "ae", "PCABasisMethod": "pca"}


def is_legacy_folder(path: str) -> bool:
    return os.path.exists(os.path.join(path, "basis_vectors.pt")) and os.path.exists(os.path.join(path, "method_info.json"))


def _load(path: str):
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 -- UnpicklingError and friends
        raise TaskVectorError(f"{path} cannot be read safely with torch.load(weights_only=True) ({type(e).__name__}: "
                              f"{str(e)[:200]}). It holds more than tensors and plain containers; it is not "
                              "loaded, since unpickling it could run arbitrary code.") from e


def read_legacy(run_dir: str) -> dict:
    """The :class:`~peft_basis.task_vectors.TaskVectorBasis` arguments that one run folder of the original repo
    holds (``TaskVectorBasis.from_pretrained`` / :func:`~peft_basis.task_vectors.from_legacy` build it)."""
    with open(os.path.join(run_dir, "method_info.json")) as f:
        info = json.load(f)
    raw_method = info.get("method")
    if raw_method not in _METHODS:
        raise TaskVectorError(f"{run_dir}: method {raw_method!r} cannot be converted; only "
                              f"{sorted(_METHODS)} (AE and PCA) are supported.")
    method = _METHODS[raw_method]
    tasks = info.get("datasets")
    if not tasks:
        raise TaskVectorError(f"{run_dir}/method_info.json has no 'datasets' list: the task order is unknown.")
    data = _load(os.path.join(run_dir, "basis_vectors.pt"))
    vectors = data["basis_vectors"] if isinstance(data, dict) else data
    if not isinstance(vectors, (list, tuple)) or not vectors:
        raise TaskVectorError(f"{run_dir}/basis_vectors.pt holds no list of basis vectors.")
    keys = [k for k, v in vectors[0].items() if torch.is_tensor(v) and v.dtype.is_floating_point]
    for i, v in enumerate(vectors):
        if [k for k in keys if k not in v] or any(tuple(v[k].shape) != tuple(vectors[0][k].shape) for k in keys):
            raise TaskVectorError(f"Basis vector {i} in {run_dir} has other keys or shapes than basis vector 0.")
    bases = {k: torch.stack([v[k].float() for v in vectors]) for k in keys}
    M, T = len(vectors), len(tasks)
    mean = mixing = None
    hp = {k: v for k, v in info.items() if k not in ("datasets", "method")}
    if method == "ae":
        awb = _load(os.path.join(run_dir, "AWB.pt"))
        C, mixing = awb["W"].double(), awb.get("B")
        meta = awb.get("metadata", {})
        hp.update({k: meta[k] for k in ("steps", "lr", "tau_init", "weight_decay", "seed") if k in meta})
        if meta.get("datasets") and list(meta["datasets"]) != list(tasks):
            raise TaskVectorError(f"AWB.pt lists tasks {meta['datasets']} but method_info.json {tasks}.")
    else:
        pca = _load(os.path.join(run_dir, "pca_components.pt"))
        C = pca["coefficients"].double()
        order, shapes = list(pca["keys_order"]), pca["param_shapes"]
        flat = pca["mean_vector"].float()
        total = sum(int(torch.Size(shapes[k]).numel()) for k in order)
        if flat.numel() != total:
            raise TaskVectorError(f"pca_components.pt: mean_vector has {flat.numel()} entries, the parameter shapes "
                                  f"add up to {total}.")
        if set(order) != set(keys):
            raise TaskVectorError("pca_components.pt orders other keys than basis_vectors.pt holds.")
        mean, start = {}, 0
        for k in order:
            n = int(torch.Size(shapes[k]).numel())
            mean[k] = flat[start:start + n].reshape(tuple(shapes[k])).clone()
            start += n
    if tuple(C.shape) != (M, T):
        raise TaskVectorError(f"{run_dir}: coefficients have shape {tuple(C.shape)} but there are {M} basis vectors and "
                              f"{T} tasks in method_info.json. Refusing to truncate or pad (the original code did).")
    if mixing is not None and tuple(mixing.shape) != (T, M):
        raise TaskVectorError(f"{run_dir}: AWB.pt's B has shape {tuple(mixing.shape)}, expected ({T}, {M}).")
    return dict(method=method, task_names=list(tasks), bases=bases, coefficients=C,
                mixing=None if mixing is None else mixing.double(), mean=mean, hyperparameters=hp,
                info={"converted_from": os.path.abspath(run_dir)})
