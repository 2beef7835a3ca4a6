"""Basis Sharing: grouping, the rank budget, and the joint whitened factorisation of each group.

The factorisation of a group (:func:`factorize_group`) works on the SMALL side of the problem. With
``W`` the members' weights stacked (``m x d_in``, ``m = n * d_out``) and ``G`` the group's input Gram,
the whitened SVD of Basis Sharing / SVD-LLM (``W S^T = U Sigma V^T`` with ``S^T S = G``) has left
singular vectors ``U`` that are the eigenvectors of ``W G W^T`` and the optimal rank-``k``
approximation is the projection ``U_k U_k^T W``. So:

- ``m <= d_in``: one ``eigh`` of ``W G W^T`` (``m x m``); no whitener, no inverse.
- ``m > d_in``: a Cholesky factor ``G = L L^T`` (damped; robust eigendecomposition if Cholesky still
  fails), one ``eigh`` of ``(W L)^T (W L)`` (``d_in x d_in``), ``U_k`` = orthonormalised ``W L V_k``.

Either way the shared basis is ``U_k^T W`` (``k x d_in``, carries the scale) and each layer's
coefficient is its block of rows of ``U_k`` (orthonormal columns over the group). Compared with an
eigendecomposition of every Gram plus an SVD of every stacked weight (twice: once for the spectrum,
once for the factors), this is 4-5x less arithmetic, and each group is factorised once: ranks are
capped (uniform allocation) or spectra come from ``eigvalsh`` alone (global allocation).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from ...budget import greedy_allocate, rank_for_ratio
from ...linalg import DEFAULT_DAMPING, check_finite_gram, decomposition_threads, robust_eigh
from ...modules import in_out_features, layer_index, linear_weight, module_type
from ..base import BasisTunerBase, warn_no_calibration
from ..factorized import dense_is_dropped, drop_dense_weight, factorized_forward
from .config import DEFAULT_SHARED_MODULES, SharedBasisConfig
from .layer import SharedBasisLayer

# Global allocation: every group first gets this fraction of its uniform rank, so that no module is
# starved (a module with a flat whitened spectrum scores low per parameter everywhere, yet a
# rank-1 o_proj breaks the model); the rest of the budget goes where it removes most relative error.
GLOBAL_MIN_FRACTION = 0.25


@dataclass
class Group:
    key: str
    members: list[str]
    d_in: int
    d_out: int  # per member

    @property
    def cost(self) -> int:  # parameters per rank step
        return self.d_in + len(self.members) * self.d_out

    @property
    def dense_params(self) -> int:
        return len(self.members) * self.d_in * self.d_out


def _group_key(type_name: str, members: list[str]) -> str:
    leaf = type_name.split("*.", 1)[-1].replace(".", "_")
    first, last = layer_index(members[0]), layer_index(members[-1])
    return f"{leaf}__{first}" if first == last else f"{leaf}__{first}-{last}"


def _by_type(names: list[str]) -> dict[str, list[str]]:
    types: dict[str, list[str]] = {}
    for n in names:
        types.setdefault(module_type(n), []).append(n)
    for members in types.values():
        members.sort(key=lambda n: layer_index(n) or 0)
    return types


def _chunk(type_name: str, members: list[str], n: int, shapes: dict) -> list[Group]:
    groups = []
    for i in range(0, len(members), n):
        chunk = members[i : i + n]
        d_in, d_out = shapes[chunk[0]]
        groups.append(Group(_group_key(type_name, chunk), chunk, d_in, d_out))
    return groups


def plan_groups(model_type: str | None, types: dict[str, list[str]], config: SharedBasisConfig,
                shapes: dict) -> list[Group]:
    """The groups for an integer ``group_size``: shared matrix types in chunks of ``group_size``
    consecutive layers, the others private (one layer each). Used by the whole-model and the
    layer-sequential paths alike, so both form the same groups in the same order."""
    shared = config.shared_modules
    if shared is None:
        shared = DEFAULT_SHARED_MODULES.get(model_type, [])
    groups = []
    for type_name, members in types.items():
        is_shared = any(type_name == s or type_name.endswith("." + s) for s in shared)
        groups += _chunk(type_name, members, config.group_size if is_shared else 1, shapes)
    return groups


def group_gram(stats, members: list[str]) -> torch.Tensor:
    """The input Gram of a group: its members' distinct inputs (q/k/v of one layer share one), summed once."""
    keys = tuple(sorted({stats.sources[m] for m in members}))
    return stats.grams[keys[0]] if len(keys) == 1 else sum(stats.grams[k] for k in keys)


def normalised_spectrum(eigenvalues: torch.Tensor) -> torch.Tensor:
    """The relative calibration error each direction removes (the whitened spectrum summing to 1)."""
    return eigenvalues / eigenvalues.sum().clamp_min(1e-300)


# ---- the factorisation of one group ---------------------------------------------------------------
@dataclass
class GroupFactors:
    """``W_i ~ coefficients[i] @ basis`` for every member. ``eigenvalues``: the whole whitened spectrum
    (squared singular values of ``W S^T``, descending, float64), for rank decisions and errors."""

    basis: torch.Tensor  # k x d_in, float32
    coefficients: list[torch.Tensor]  # d_out_i x k, float32
    eigenvalues: torch.Tensor

    def truncate(self, rank: int) -> "GroupFactors":
        if rank == self.basis.shape[0]:
            return self
        return GroupFactors(self.basis[:rank].contiguous(), [c[:, :rank].contiguous() for c in self.coefficients],
                            self.eigenvalues)


def _damped_gram(gram: torch.Tensor, damping: float, name: str) -> torch.Tensor:
    """``G + damping * mean(eigenvalue) * I`` in float64 (the mean eigenvalue is ``trace / d``)."""
    check_finite_gram(gram, name)
    g = gram.detach().to(torch.float64)  # symmetric: the engine mirrors the triangle it accumulates
    if g is gram:
        g = g.clone()
    floor = damping * float(g.diagonal().sum()) / g.shape[0]
    if floor <= 0:
        from ...linalg import CalibrationError

        raise CalibrationError(
            f"The calibration Gram of {name} is all zeros: no calibration token reached it. Check that the dataloader "
            "yields non-empty `input_ids` and that the module is used in the forward pass."
        )
    g.diagonal().add_(floor)
    return g


def _input_factor(gram64: torch.Tensor, damping: float, name: str) -> torch.Tensor:
    """``L`` with ``L L^T = G`` (damped): Cholesky, or the robust eigendecomposition where Cholesky fails
    (fp32 accumulation can leave eigenvalues below the damping floor negative)."""
    with decomposition_threads():
        chol, info = torch.linalg.cholesky_ex(gram64)
    if int(info) == 0:
        return chol
    w = robust_eigh(gram64, damping, name=name)
    return w.eigenvectors * w.eigenvalues.sqrt()[None, :]  # Q diag(sqrt(lam)): L L^T = G (clamped)


def _small_side(stacked: torch.Tensor, gram: torch.Tensor | None, damping: float, name: str):
    """(side, matrix, L): the symmetric matrix whose eigenvectors give the factors."""
    m, d = stacked.shape
    if gram is None:  # data-free: plain SVD of the stacked weights
        return ("out", stacked @ stacked.T, None) if m <= d else ("in", stacked.T @ stacked, None)
    g = _damped_gram(gram, damping, name)
    if m <= d:
        return "out", (stacked @ g) @ stacked.T, None
    L = _input_factor(g, damping, name)
    t = stacked @ L
    return "in", t.T @ t, t


def group_spectrum(weights: list[torch.Tensor], gram: torch.Tensor | None, damping: float = DEFAULT_DAMPING,
                   name: str = "module") -> torch.Tensor:
    """The whitened spectrum of a group (squared singular values of ``[W_1; ...; W_n] S^T``, descending,
    float64), from ``eigvalsh`` alone."""
    stacked = torch.cat([w.detach().to(torch.float64) for w in weights], dim=0)
    _, mat, _ = _small_side(stacked, gram, damping, name)
    with decomposition_threads():
        return torch.linalg.eigvalsh(mat).flip(0).clamp_min(0)


def factorize_group(weights: list[torch.Tensor], gram: torch.Tensor | None, rank: int,
                    damping: float = DEFAULT_DAMPING, name: str = "module") -> GroupFactors:
    """Rank-``rank`` factors with one input-side basis shared by ``weights`` (each ``d_out x d_in``),
    minimising ``sum_i ||(W_i - C_i B) X^T||_F^2`` where ``X^T X = gram`` (the group's summed input
    Gram; ``None``: plain SVD). Deterministic signs (each basis direction's largest coefficient entry is
    positive), so the same inputs give the same tensors on any path (whole model or layer by layer)."""
    stacked = torch.cat([w.detach().to(torch.float64) for w in weights], dim=0)
    max_rank = min(stacked.shape)
    if not 0 < rank <= max_rank:
        raise ValueError(f"rank {rank} is outside [1, {max_rank}] for a stacked weight of shape {tuple(stacked.shape)}")
    side, mat, t = _small_side(stacked, gram, damping, name)
    with decomposition_threads():
        lam, vec = torch.linalg.eigh(mat)  # reads one triangle: no symmetrising needed
    lam, vec = lam.flip(0).clamp_min(0), vec.flip(1)
    if side == "out":
        u = vec[:, :rank]
    else:
        # U_k Sigma_k = (W L) V_k; directions with sigma ~ 0 carry nothing and get a zero column
        sigma = lam[:rank].sqrt()
        keep = sigma > sigma[0] * 1e-12 if rank else sigma > 0
        u = ((stacked if t is None else t) @ vec[:, :rank]) / torch.where(keep, sigma, torch.ones_like(sigma))
        u = u * keep
    # canonical signs: the largest-magnitude entry of every direction positive
    idx = u.abs().argmax(dim=0)
    sign = torch.sign(u[idx, torch.arange(rank)])
    sign[sign == 0] = 1
    u = u * sign[None, :]
    basis = u.T @ stacked
    coefficients = torch.split(u, [w.shape[0] for w in weights], dim=0)
    return GroupFactors(basis.to(torch.float32), [c.to(torch.float32).contiguous() for c in coefficients], lam)


def member_error(weight: torch.Tensor, coefficient: torch.Tensor, basis: torch.Tensor, gram: torch.Tensor,
                 relative: bool = True) -> float:
    """Calibration output error ``tr(D G D^T)`` of one member (``D = W - C B``), relative to ``tr(W G W^T)``."""
    w = weight.detach().to(torch.float64)
    g = gram.detach().to(torch.float64)
    d = w - coefficient.to(torch.float64) @ basis.to(torch.float64)
    num = float(((d @ g) * d).sum())
    if not relative:
        return num
    return num / max(float(((w @ g) * w).sum()), 1e-300)


def member_errors(weight: torch.Tensor, coefficient: torch.Tensor, basis: torch.Tensor, gram: torch.Tensor | None,
                  ranks: list[int]) -> tuple[list[float], float]:
    """Absolute calibration output errors ``tr(D_k G D_k^T)`` of one member at each rank ``k`` in ``ranks``
    (``D_k = W - C[:, :k] B[:k]``; ``gram=None``: Frobenius), and the reference ``tr(W G W^T)``. One
    ``D G`` product at the lowest rank; each further direction is a rank-one update."""
    w = weight.detach().to(torch.float64)
    c, b = coefficient.to(torch.float64), basis.to(torch.float64)
    g = None if gram is None else gram.detach().to(torch.float64)
    lo = min(ranks)
    wg = w if g is None else w @ g
    bg = b[:lo] if g is None else b[:lo] @ g
    dg = wg - c[:, :lo] @ bg  # (W - C B) G without a second d_out x d_in x d_in product
    d = w - c[:, :lo] @ b[:lo]
    err = float((dg * d).sum())
    out = {lo: err}
    for k in range(lo, max(ranks)):
        u, v = c[:, k], b[k]
        vg = v if g is None else g @ v
        # D' = D - u v^T: tr(D' G D'^T) = tr(D G D^T) - 2 u^T D G v + |u|^2 v^T G v;  D' G = D G - u (G v)^T
        err = err - 2 * float(u @ (dg @ v)) + float(u @ u) * float(v @ vg)
        dg = dg - torch.outer(u, vg)
        out[k + 1] = err
    ref = float((wg * w).sum())
    return [max(out[k], 0.0) for k in ranks], ref


class SharedBasisModel(BasisTunerBase):
    """PEFT tuner for :class:`SharedBasisConfig`. After creation ``compression_report`` lists every
    group: members, rank, stored parameters and relative calibration output error."""

    prefix = "sb_"
    tuner_layer_cls = SharedBasisLayer
    uses_shared_state = True

    def _check_new_adapter_config(self, config) -> None:
        super()._check_new_adapter_config(config)
        if sum(isinstance(c, SharedBasisConfig) for c in self.peft_config.values()) > 1:
            raise ValueError(
                "A model holds one Basis Sharing adapter: it replaces the dense weights. To compare settings, compress "
                "fresh copies of the base model; to fine-tune the compressed model, stack a LoRA on the merged model."
            )

    # ---- calibration: what group_size="auto" scores on ---------------------------------------------------
    @classmethod
    def extra_calibration(cls, model, config: SharedBasisConfig, stats, dataloader, *, max_batches=None,
                          progress=True):
        """Called by ``calibrate`` after the Gram pass: for ``group_size="auto"``, keep the first
        ``auto_selection_tokens`` calibration tokens (ids only, a few KB) so the grouping can be chosen by
        the model's loss. Under ``torch.distributed`` every rank takes rank 0's, so all choose alike."""
        if config.group_size != "auto" or config.auto_selection_tokens <= 0:
            return
        from ...calibration.engine import batch_to_kwargs

        kept, seen = [], 0
        for i, batch in enumerate(dataloader):
            if (max_batches is not None and i >= max_batches) or seen >= config.auto_selection_tokens:
                break
            kw = batch_to_kwargs(batch, "cpu")
            mask = kw.get("attention_mask")
            kept.append((kw["input_ids"], mask))
            seen += int(mask.sum()) if mask is not None else kw["input_ids"].numel()
        dist = torch.distributed
        if dist.is_available() and dist.is_initialized():
            box = [kept]
            dist.broadcast_object_list(box, src=0)
            kept = box[0]
        for i, (ids, mask) in enumerate(kept):
            stats.extra[f"selection/{i}/input_ids"] = ids
            if mask is not None:
                stats.extra[f"selection/{i}/attention_mask"] = mask

    @staticmethod
    def _selection_batches(stats) -> list[dict]:
        if stats is None:
            return []
        batches = []
        while f"selection/{len(batches)}/input_ids" in stats.extra:
            i = len(batches)
            ids = stats.extra[f"selection/{i}/input_ids"].long()
            mask = stats.extra.get(f"selection/{i}/attention_mask")
            labels = ids if mask is None else ids.masked_fill(mask == 0, -100)
            batches.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
        return batches

    def _model_loss(self, modules: dict, overrides: dict, batches: list[dict]) -> float:
        """Mean token loss of the model on ``batches`` with the modules in ``overrides``
        (name -> (basis, coefficient)) computing through those factors instead of their dense weights."""
        model = self.model
        device = next(p.device for p in model.parameters() if p.numel() > 0)
        patched = []
        was_training = model.training
        total, count = 0.0, 0
        try:
            for m, (basis, coef) in overrides.items():
                mod = modules[m]
                bias = getattr(mod, "bias", None)
                mod.forward = (lambda x, b=basis, c=coef, bb=bias: factorized_forward(x, b, c, bb))
                patched.append(mod)
            model.eval()
            with torch.no_grad():
                for b in batches:
                    kw = {k: v.to(device) for k, v in b.items() if v is not None}
                    n = int((kw["labels"][:, 1:] != -100).sum())
                    total += float(model(**kw, use_cache=False).loss) * n
                    count += n
        finally:
            for mod in patched:
                del mod.forward
            model.train(was_training)
        return total / max(count, 1)

    # ---- building the factors --------------------------------------------------------------------
    def _pre_injection_hook(self, model: nn.Module, config: SharedBasisConfig, adapter_name: str) -> None:
        if not hasattr(self, "sb_bases"):
            self.sb_bases = nn.ModuleDict()
        names = self.resolve_target_names(model, config)
        modules = dict(model.named_modules())
        shapes = {n: in_out_features(modules[n]) for n in names}
        self._pending: dict[str, torch.Tensor] = {}
        self._member_group: dict[str, str] = {}
        bases = nn.ParameterDict()
        if config.groups:  # loading: shapes from the config, values from the checkpoint; no SVD
            missing = [n for n in names if not any(n in m for m in config.groups.values())]
            if missing:
                raise ValueError(
                    f"This Basis Sharing adapter was made for another model: it has no factors for {missing[:3]}. Load "
                    "it onto the base model it was created from."
                )
            for key, members in config.groups.items():
                rank = config.rank_pattern[members[0]]
                d_in, d_out = shapes[members[0]]
                dtype = modules[members[0]].weight.dtype
                bases[key] = nn.Parameter(torch.zeros(rank, d_in, dtype=dtype))
                for m in members:
                    self._member_group[m] = key
                    self._pending[m] = torch.zeros(d_out, rank, dtype=dtype)
        else:
            self.compression_report = self._compress(modules, names, shapes, config, bases)
        self.sb_bases[adapter_name] = bases

    def _plan(self, types: dict, config: SharedBasisConfig, shapes: dict) -> list[Group]:
        return plan_groups(getattr(getattr(self.model, "config", None), "model_type", None), types, config, shapes)

    def _compress(self, modules, names, shapes, config: SharedBasisConfig, bases: nn.ParameterDict) -> list[dict]:
        stats = config.calibration_statistics
        if stats is None:
            warn_no_calibration("SharedBasisConfig")
        warned: set = set()

        def weights(g: Group) -> list[torch.Tensor]:
            return [linear_weight(modules[m]).detach() for m in g.members]

        def gram(members: list[str]) -> torch.Tensor | None:
            if stats is None:
                return None
            keys = tuple(sorted({stats.sources[m] for m in members}))
            tokens = sum(stats.tokens[k] for k in keys)
            d = stats.grams[keys[0]].shape[0]
            if tokens < d // 2 and keys not in warned:
                warned.add(keys)
                warnings.warn(
                    f"{members[0]}: the calibration inputs span at most {tokens} of {d} dimensions ({tokens} tokens). "
                    f"The factors will be fitted to too little data and generalise poorly; calibrate on more tokens "
                    f"(at least {4 * d} for this module).",
                    stacklevel=4,
                )
            return group_gram(stats, members)

        def own_gram(m: str) -> torch.Tensor | None:
            return None if stats is None else stats.gram(m)

        def factorise(g: Group, rank: int, eval_ranks: list[int], f: GroupFactors | None = None):
            """Factors at ``rank`` and the absolute member errors at each of ``eval_ranks``
            (each member on its OWN Gram: the summed group Gram would flatter sharing)."""
            if f is None:
                f = factorize_group(weights(g), gram(g.members), rank, config.damping, g.members[0])
            errs: dict[int, list[float]] = {k: [] for k in eval_ranks}
            refs = []
            if len(g.members) == 1:  # the member's Gram is the group's: errors are the discarded spectrum
                tail = torch.cat([f.eigenvalues.flip(0).cumsum(0).flip(0), f.eigenvalues.new_zeros(1)])
                for k in eval_ranks:
                    errs[k].append(float(tail[k]))
                refs.append(float(tail[0]))
            else:
                for m, coef in zip(g.members, f.coefficients):
                    e, ref = member_errors(linear_weight(modules[m]), coef, f.basis, own_gram(m), eval_ranks)
                    for k, v in zip(eval_ranks, e):
                        errs[k].append(v)
                    refs.append(ref)
            return f, errs, refs

        def release(g: Group) -> None:
            # The dense weights are not needed once a group's factors are final: drop them now, so the peak
            # memory is not the dense model plus all the factors. (Conv1D keeps its weight until injection:
            # its shape is read from the weight.)
            if config.keep_dense_weight:
                return
            for m in g.members:
                mod = modules[m]
                if isinstance(mod, nn.Linear) and not dense_is_dropped(mod):
                    drop_dense_weight(mod)

        types = _by_type(names)
        factors: dict[str, GroupFactors] = {}
        errors: dict[str, dict[int, list[float]]] = {}
        refs: dict[str, list[float]] = {}
        spectra: dict[str, torch.Tensor] = {}

        if config.group_size == "auto":
            groups, ranks = [], []
            selection = self._selection_batches(stats)
            chosen_factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # member -> (basis, coefficient)
            self.auto_selection = {}
            for type_name, members in tqdm(types.items(), desc="choosing groups", unit="type"):
                candidates = sorted({n for n in config.auto_group_sizes if n <= len(members)} | {1})
                best = None
                for n in candidates:
                    plan = _chunk(type_name, members, n, shapes)
                    _, caps = self._bounds(plan, config)
                    pre: dict[str, GroupFactors] = {}
                    for g, cap in zip(plan, caps):
                        if config.rank_allocation == "uniform":  # ranks <= cap: factorise once, at the cap
                            pre[g.key] = factorize_group(weights(g), gram(g.members), cap, config.damping, g.members[0])
                            spectra[g.key] = normalised_spectrum(pre[g.key].eigenvalues)
                        elif g.key not in spectra:
                            lam = group_spectrum(weights(g), gram(g.members), config.damping)
                            spectra[g.key] = normalised_spectrum(lam)
                    plan_ranks = self._allocate(plan, config, lambda g: spectra[g.key])
                    total, found = 0.0, {}
                    for g, r, cap in zip(plan, plan_ranks, caps):
                        stored = cap if g.key in pre else min(r + 1, cap)  # headroom for the final top-up
                        f, errs, rf = factorise(g, stored, sorted({r, stored}), pre.pop(g.key, None))
                        found[g.key] = (f, errs, rf)
                        total += sum(errs[r])
                    if selection:  # end to end: the model's loss with this type compressed this way
                        trial = {m: (found[g.key][0].basis[:r], c[:, :r]) for g, r in zip(plan, plan_ranks)
                                 for m, c in zip(g.members, found[g.key][0].coefficients)}
                        total = self._model_loss(modules, {**chosen_factors, **trial}, selection)
                    self.auto_selection.setdefault(type_name, {})[n] = total
                    if best is None or total < best[0]:
                        best = (total, plan, plan_ranks, found)
                _, plan, plan_ranks, found = best
                for g, r in zip(plan, plan_ranks):
                    factors[g.key], errors[g.key], refs[g.key] = found[g.key]
                    for m, c in zip(g.members, factors[g.key].coefficients):
                        chosen_factors[m] = (factors[g.key].basis[:r], c[:, :r])
                    release(g)
                groups += plan
                ranks += plan_ranks
            # what the per-type plans left of the budget (less than one rank step per type) is spent here,
            # by the same score; never below any plan's rank, so never worse than the plans compared
            budget, _ = self._bounds(groups, config)
            scores = [spectra[g.key] * len(g.members) for g in groups]
            stored = [factors[g.key].basis.shape[0] for g in groups]
            ranks = greedy_allocate(scores, [g.cost for g in groups], budget, r_min=ranks, r_max=stored)
        else:
            groups = self._plan(types, config, shapes)
            budget, caps = self._bounds(groups, config)  # raises before any work if the ratio is impossible
            if config.rank_allocation == "uniform":
                # one pass: ranks are floor or floor + 1, so factorise at the cap and truncate after allocation
                for g, cap in zip(tqdm(groups, desc="factorising", unit="group"), caps):
                    floor = self._floor(g, config)
                    f, errs, rf = factorise(g, cap, sorted({min(floor, cap), cap}))
                    factors[g.key], errors[g.key], refs[g.key] = f, errs, rf
                    spectra[g.key] = normalised_spectrum(f.eigenvalues)
                    release(g)
                ranks = self._allocate(groups, config, lambda g: spectra[g.key])
            else:
                for g in tqdm(groups, desc="spectra", unit="group"):
                    spectra[g.key] = normalised_spectrum(group_spectrum(weights(g), gram(g.members), config.damping))
                ranks = self._allocate(groups, config, lambda g: spectra[g.key])
                for g, r in zip(tqdm(groups, desc="factorising", unit="group"), ranks):
                    factors[g.key], errors[g.key], refs[g.key] = factorise(g, r, [r])
                    release(g)

        report = []
        for g, rank in zip(groups, ranks):
            f = factors.pop(g.key).truncate(rank)
            dtype = modules[g.members[0]].weight.dtype
            bases[g.key] = nn.Parameter(f.basis.to(dtype))
            for m, coef in zip(g.members, f.coefficients):
                self._member_group[m] = g.key
                self._pending[m] = coef.to(dtype)
            config.groups[g.key] = g.members
            # keyed by module, as PEFT expects of rank_pattern (it warns about keys matching no target)
            config.rank_pattern.update({m: rank for m in g.members})
            rel = [e / max(r, 1e-300) for e, r in zip(errors[g.key][rank], refs[g.key])]
            report.append(
                {
                    "group": g.key,
                    "members": g.members,
                    "rank": rank,
                    "params": rank * g.cost,
                    "dense_params": g.dense_params,
                    "relative_error": sum(rel) / len(rel) if stats is not None else None,
                }
            )
        return report

    # ---- rank budget ---------------------------------------------------------------------------------
    @staticmethod
    def _floor(g: Group, config: SharedBasisConfig) -> int:
        r_max = min(g.d_in, len(g.members) * g.d_out)
        return max(1, min(rank_for_ratio(g.d_in, g.d_out, config.compression_ratio, len(g.members)), r_max))

    @classmethod
    def _bounds(cls, groups: list[Group], config: SharedBasisConfig) -> tuple[int, list[int]]:
        """The budget, and the largest rank each group may get (uniform: its own ratio's rank + 1)."""
        budget = int((1 - config.compression_ratio) * sum(g.dense_params for g in groups))
        floors = [cls._floor(g, config) for g in groups]
        if sum(f * g.cost for f, g in zip(floors, groups)) > budget:
            worst = min(groups, key=lambda g: g.dense_params)
            raise ValueError(
                f"compression_ratio={config.compression_ratio} leaves less than one rank for {worst.members[0]} "
                f"({worst.d_out}x{worst.d_in}); lower the ratio or exclude the smallest modules."
            )
        r_max = [min(g.d_in, len(g.members) * g.d_out) for g in groups]
        if config.rank_allocation == "uniform":
            return budget, [min(f + 1, m) for f, m in zip(floors, r_max)]
        return budget, r_max

    @classmethod
    def _allocate(cls, groups: list[Group], config: SharedBasisConfig, spectrum) -> list[int]:
        """Ranks within ``(1 - ratio)`` of the targeted dense parameters and within one rank step of it.

        ``spectrum(group)``: the group's whitened spectrum normalised to sum 1 (the relative error each
        direction removes). ``uniform``: every group at its own ratio's rank, plus at most one step where
        the leftover removes most error. ``global``: every group gets at least ``GLOBAL_MIN_FRACTION`` of
        its uniform rank; the rest goes to the directions removing the most relative error per parameter,
        a group counting once per member (so a shared group's error weighs as much as its members')."""
        budget, caps = cls._bounds(groups, config)
        floors = [cls._floor(g, config) for g in groups]
        if config.rank_allocation == "uniform":
            r_min = floors
        else:
            r_min = [max(1, int(GLOBAL_MIN_FRACTION * f)) for f in floors]
        scores = [spectrum(g) * len(g.members) for g in groups]
        return greedy_allocate(scores, [g.cost for g in groups], budget, r_min=r_min, r_max=caps)

    # ---- injection --------------------------------------------------------------------------------
    def _create_and_replace(self, config, adapter_name, target, target_name, parent, current_key, **kwargs):
        if isinstance(target, SharedBasisLayer):
            raise ValueError(f"{current_key} already carries a Basis Sharing adapter.")
        group = self._member_group.get(current_key)
        if group is None:
            return
        layer = SharedBasisLayer(target, keep_dense_weight=config.keep_dense_weight)
        layer.update_layer(adapter_name, self.sb_bases[adapter_name], group, self._pending.pop(current_key))
        self._replace_module(parent, target_name, layer, target)

    def _post_injection_hook(self, model, config, adapter_name) -> None:
        self._pending = {}
        device = next((p.device for p in model.parameters() if p.device.type != "meta"), None)
        bases = self.sb_bases[adapter_name]
        if device is not None and not any(p.device.type == "meta" for p in bases.parameters()):
            bases.to(device)

    # ---- sizes -------------------------------------------------------------------------------------
    def stored_parameters(self, adapter_name: str = "default") -> int:
        """Parameters stored for the targeted modules (shared bases once, coefficients per layer)."""
        n = sum(p.numel() for p in self.sb_bases[adapter_name].values())
        for m in self.model.modules():
            if isinstance(m, SharedBasisLayer) and adapter_name in m.sb_coefficient:
                n += m.sb_coefficient[adapter_name].numel()
        return n
