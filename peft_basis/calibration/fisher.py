"""Streaming empirical Fisher of per-module directions, from backward passes over calibration data.

For a target Linear ``y = x W^T`` and one calibration *sequence* ``s`` with loss ``L_s`` (the mean
token NLL of that sequence), the weight gradient is ``G_s = sum_t delta_t x_t^T`` (``delta_t =
dL_s/dy_t``). Given an output direction ``u`` (``d_out``) and an input direction ``r`` (``d_in``),
the gradient of ``L_s`` along the rank-one direction ``u r^T`` of weight space is

    g_s(u, r) = u^T G_s r = sum_t (u . delta_t) (r . x_t)

so it is computed from two projections of the module's output gradient and input, never from
``G_s`` itself. The score of the direction is the empirical Fisher ``F(u, r) = mean_s g_s(u, r)^2``
(for BASIS it is exactly the empirical Fisher of the diagonal entry ``M_ii`` of its core).

Two modes, per module, for ``U`` (``d_out x k``) and ``R`` (``k x d_in``, rows are input directions):

- ``"diagonal"``: ``k`` scores ``F(U[:, i], R[i])``; memory ``O(k)`` per module, arithmetic two
  ``tokens x d x k`` projections per module per batch.
- ``"full"``: the ``k_out x k_in`` matrix ``mean_s (U^T G_s R^T)^2``. ``U=None`` / ``R=None`` mean the
  identity, so ``full`` with both ``None`` is the elementwise empirical Fisher of ``W`` (it forms one
  ``d_out x d_in`` gradient per sequence: use it only where that is cheap).
- ``"outputs"``: no directions, only the output moments below.

With ``output_moments`` (any mode) each module also accumulates ``mean_t delta_t^2`` per output dimension
(``d_out`` floats): how much the loss cares about each of its outputs, for methods that weight their fit's
output error by it (stored under :func:`output_fisher_key`).

This module holds the arithmetic (hooks and accumulators); the pipelines run the backward passes:
the whole-model one (:func:`~peft_basis.calibration.pipelines.whole_model.collect_fisher`: one forward
AND one backward pass per batch, about 3x the forward-only Gram pass) and the layer-sequential one
(its backward sweep, :mod:`peft_basis.calibration.pipelines.backward`). No parameter gradient is formed,
and each hooked module keeps its projected inputs ``tokens x k`` until its backward runs. Under
``torch.distributed`` each rank passes its own shard and the scores are all-reduced.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import CalibrationError
from ..modules import in_out_features
from .statistics import CalibrationStatistics

__all__ = ["FisherPlan", "accumulators", "batch_labels", "finish_fisher", "fisher_key", "output_fisher_key",
           "sequence_loss"]

MODES = ("diagonal", "full", "outputs")


def fisher_key(module_name: str, key: str = "fisher") -> str:
    """Where the Fisher passes store a module's scores in ``CalibrationStatistics.extra``."""
    return f"{key}/{module_name}"


def output_fisher_key(module_name: str) -> str:
    """Where they store a module's output moments ``mean_t delta_t^2`` (``d_out``), with ``output_moments``."""
    return f"output_fisher/{module_name}"


@dataclass
class FisherPlan:
    """What a method wants Fisher scores of: ``directions`` (``name -> (U, R)``), the ``mode``, the ``key``
    they are stored under, and whether to sum a ``"full"`` score matrix over one dimension before storing
    (``reduce_dim``). ``extra``: tensors stored beside the scores (e.g. the directions' singular values). A
    tuner's ``fisher_plan`` returns one; both pipelines (whole model and layer by layer) run it the same way."""

    directions: dict[str, tuple[torch.Tensor | None, torch.Tensor | None]]
    mode: str
    key: str = "fisher"
    reduce_dim: int | None = None
    meta: dict = field(default_factory=dict)
    extra: dict[str, torch.Tensor] = field(default_factory=dict)
    output_moments: bool = False

    def store(self, stats: CalibrationStatistics, scores: dict[str, torch.Tensor]) -> None:
        for n, f in scores.items():
            stats.extra[fisher_key(n, self.key)] = f if self.reduce_dim is None else f.sum(self.reduce_dim)
        stats.extra.update(self.extra)
        stats.meta.update(self.meta)


class _Accumulator:
    """One module's running sum of squared per-sequence directional gradients."""

    def __init__(self, U: torch.Tensor | None, R: torch.Tensor | None, mode: str, output_moments: bool = False):
        self.U, self.R, self.mode = U, R, mode
        self.scores: torch.Tensor | None = None
        self.output_moments = output_moments
        self.moments: torch.Tensor | None = None  # sum over tokens of delta_t^2, per output

    def hook(self, module, args, output) -> None:
        """Forward hook: project the input now (``tokens x k``), finish when the output's gradient arrives."""
        if not isinstance(output, torch.Tensor) or not output.requires_grad:
            return
        b = None
        if self.mode != "outputs":
            x = args[0].detach().float()
            b = x if self.R is None else x @ self.R.T
            b = b.reshape(output.shape[0], -1, b.shape[-1])

        def grad_hook(grad: torch.Tensor) -> None:
            if self.output_moments:  # padded tokens carry no loss, so their gradient is zero
                m = grad.detach().double().pow(2).reshape(-1, grad.shape[-1]).sum(0)
                self.moments = m if self.moments is None else self.moments + m
            if b is None:
                return
            a = grad.float() if self.U is None else grad.float() @ self.U
            a = a.reshape(b.shape[0], -1, a.shape[-1])
            g = (a * b).sum(1) if self.mode == "diagonal" else torch.einsum("btk,btj->bkj", a, b)
            contrib = (g.double() ** 2).sum(0)  # sum over the batch's sequences of g_s^2
            self.scores = contrib if self.scores is None else self.scores + contrib

        output.register_hook(grad_hook)


def accumulators(directions: dict, mode: str, device, output_moments: bool = False) -> dict[str, _Accumulator]:
    """One checked :class:`_Accumulator` per module of ``directions`` (``name -> (U, R)``)."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    for n, (U, R) in directions.items():
        if mode == "diagonal" and (U is None or R is None or U.shape[1] != R.shape[0]):
            raise ValueError(f"{n}: the diagonal mode needs U (d_out x k) and R (k x d_in) with the same k.")
    return {n: _Accumulator(None if U is None else U.detach().float().to(device),
                            None if R is None else R.detach().float().to(device), mode, output_moments)
            for n, (U, R) in directions.items()}


def _seq_losses(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sequence mean NLL of next-token prediction, and how many labelled tokens each has."""
    shift_logits = logits[:, :-1].float()
    shift_labels = labels[:, 1:]
    nll = nn.functional.cross_entropy(shift_logits.reshape(-1, shift_logits.shape[-1]), shift_labels.reshape(-1),
                                      ignore_index=-100, reduction="none").view(shift_labels.shape)
    counts = (shift_labels != -100).sum(1)
    return nll.sum(1), counts


def batch_labels(kwargs: dict) -> torch.Tensor | None:
    """Pop the batch's ``labels`` (or derive them from ``input_ids``, padding masked); None when the batch
    has no labelled token after the first position (it adds nothing to the Fisher)."""
    labels = kwargs.pop("labels", None)
    ids = kwargs["input_ids"]
    if ids.numel() == 0:
        return None
    if labels is None:
        labels = ids.clone()
        if "attention_mask" in kwargs:
            labels = labels.masked_fill(kwargs["attention_mask"] == 0, -100)
    return labels if int((labels[:, 1:] != -100).sum()) > 0 else None


def sequence_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int, int]:
    """The loss whose per-sequence gradients the Fisher squares: the sum over sequences of each one's mean NLL
    (a sequence without labelled tokens adds nothing); and how many sequences and labelled tokens count."""
    nll_sum, cnt = _seq_losses(logits, labels.to(logits.device))
    return (nll_sum / cnt.clamp_min(1)).sum(), int((cnt > 0).sum()), int(cnt.sum())


def finish_fisher(accs: dict[str, _Accumulator], directions, modules: dict[str, nn.Module], mode: str, n_seqs: int,
                  n_labelled_tokens: int, device, stats: CalibrationStatistics | None, key: str) -> dict[str, torch.Tensor]:
    """All-reduce the accumulated squares and sequence counts across ``torch.distributed`` ranks, divide, store."""
    counts_t = torch.tensor([float(n_seqs), float(n_labelled_tokens)], dtype=torch.float64)
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    if distributed:
        counts_t = counts_t.to(device)
        torch.distributed.all_reduce(counts_t)
    n_seqs_all = int(counts_t[0])
    if n_seqs_all == 0:
        raise CalibrationError(
            "Fisher scores need labelled tokens, but every label in the calibration data is masked (-100), or every "
            "sequence is shorter than 2 tokens. Pass `labels` with at least one unmasked token after the first "
            "position, or leave `labels` out to predict the `input_ids`."
        )
    result = {}
    for n in sorted(accs):
        acc = accs[n]
        if acc.output_moments:
            if acc.moments is None:
                if not distributed:
                    raise CalibrationError(f"Fisher scores: {n} received no gradient (it does not influence the loss).")
                acc.moments = torch.zeros(in_out_features(modules[n])[1], dtype=torch.float64, device=device)
            if distributed:
                torch.distributed.all_reduce(acc.moments)
            if stats is not None:
                stats.extra[output_fisher_key(n)] = (acc.moments / max(int(counts_t[1]), 1)).float().cpu()
        if acc.mode == "outputs":
            continue
        if acc.scores is None:
            U, R = directions[n]
            d_in, d_out = in_out_features(modules[n])
            k_out = U.shape[1] if U is not None else d_out
            k_in = R.shape[0] if R is not None else d_in
            shape = (k_out,) if mode == "diagonal" else (k_out, k_in)
            if not distributed:
                raise CalibrationError(f"Fisher scores: {n} received no gradient (it does not influence the loss).")
            acc.scores = torch.zeros(shape, dtype=torch.float64, device=device)
        scores = acc.scores
        if distributed:
            torch.distributed.all_reduce(scores)
        result[n] = (scores / n_seqs_all).float().cpu()
    if stats is not None:
        for n, s in result.items():
            stats.extra[fisher_key(n, key)] = s
        stats.meta[f"{key}_sequences"] = n_seqs_all
        stats.meta[f"{key}_tokens"] = int(counts_t[1])
    return result
