from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from ..._peft_type import add_peft_type
from ...errors import ConfigError
from ...validation import choice, number
from ..base import PeftBasisConfig

ALLOCATIONS = ("uniform", "eigen", "fisher")
TRAINABLE = ("output", "input", "core", "diagonal")


@dataclass
class BasisConfig(PeftBasisConfig):
    """BASIS: fine-tune inside a calibration-aware subspace of every target Linear, with ranks spread
    over the model under one global parameter budget.

    Per target ``W`` (``d_out x d_in``) with calibration input covariance ``C = X^T X / N``:

    1. ``C = Q diag(lam) Q^T`` (robust eigh, eigenvalues clamped at ``damping * mean(lam)``), whitener
       ``S = diag(lam)^1/2 Q^T`` (``S^T S = C``).
    2. ``W S^T = U diag(sigma) V^T`` (SVD); ``R^T = V^T S^-T``, so ``W = U diag(sigma) R^T`` exactly, ``U`` has
       orthonormal columns and the input coordinates ``x R`` are white on the calibration data
       (``R^T C R = I``). ``sigma_i^2`` is direction ``i``'s share of ``tr(W C W^T)``, the module's mean
       squared output on the calibration data.
    3. The adapter keeps ``r`` directions and trains one zero-initialised tensor ``M`` inside them (see
       ``trainable``); the model starts exactly at the base model, the base weight is never modified, and
       training changes ``W`` only inside the chosen subspace. Default (``trainable="output"``):
       ``Delta W = M R_r`` with ``R_r`` frozen and ``M`` (``d_out x r``) trained, so every row of ``W`` moves
       only along the ``r`` calibration-aware input directions.

    Args:
        r: rank per module under ``"uniform"`` allocation. It also sets the global budget for the other
            allocations: the trainable parameters uniform ``r`` costs (``r * d_out`` per module for ``"output"``).
        rank_allocation: ``"uniform"`` (``r`` everywhere, leading directions), ``"eigen"`` (the budget goes
            to the directions with the largest share of their module's calibration output energy,
            ``sigma_i^2 / sum_j sigma_j^2``, per trainable parameter, as EVA does with explained variance)
            or ``"fisher"`` (the directions with the largest empirical Fisher score per trainable parameter,
            ``mean_s (u_i^T G_s r_i)^2`` over calibration sequences, which needs backward passes in
            ``calibrate``; each module keeps its top-Fisher directions, not necessarily the leading ones).
        fisher_power: the ``"fisher"`` allocation scores direction ``i`` by ``F_i ** fisher_power``. ``0.5`` (default)
            is the RMS gradient of the core entry: Adam moves every trainable entry by about the learning rate,
            so the first-order loss decrease an entry buys is proportional to ``E|g|``, not to ``E[g^2]``.
            ``1.0`` is the raw empirical Fisher (concentrates the budget in the few most sensitive modules).
        r_min / r_max: per-module rank bounds for ``"eigen"``/``"fisher"``. ``r_max=None`` means ``4 * r``
            (capped at the module's size). ``r_min=0`` lets a module go unadapted.
        trainable: the trainable shape inside the subspace, per module of size ``d_out x d_in`` at rank ``r``:

            - ``"output"`` (default): ``Delta W = M R_r``, ``M`` ``d_out x r`` trained, the input directions
              ``R_r`` (``r x d_in``) frozen. ``r * d_out`` trainable parameters; stores ``R_r`` too. At LoRA r=8's
              budget this gives rank ``8 (d_in + d_out) / d_out`` (16 on a square module), and on the benchmark
              (``docs/basis.md``) it is the only shape that matches LoRA/EVA.
            - ``"input"``: ``Delta W = U_r M``, ``M`` ``r x d_in`` trained, ``U_r`` frozen. ``r * d_in``
              parameters; stores ``U_r``.
            - ``"core"``: ``Delta W = U_r M R_r``, ``M`` ``r x r``. ``r^2`` parameters (any update of rank <= r
              inside ``span(U_r) x span(R_r)``); stores ``U_r`` and ``R_r``.
            - ``"diagonal"``: ``U_r diag(m) R_r^T``, ``r`` parameters; rescales the kept directions only.

            ``"fisher"`` allocation scores each direction by the Fisher of what is trained along it: the core's
            diagonal entry (core/diagonal), the whole column ``M[:, i]`` (output) or row ``M[i]`` (input).
        alpha: the ``"output"`` and ``"input"`` shapes multiply the update by ``alpha / r`` (``r`` the module's rank),
            as LoRA does, so the size of an Adam step on the model's outputs does not grow with the rank and one
            learning rate serves every budget (without it, doubling the budget at the same learning rate took the
            benchmark's test loss from 6.88 to 8.36; with it 6.99). ``16`` makes ``r=16`` unscaled.
        rank_pattern: filled at creation (module -> rank), so ``PeftModel.from_pretrained`` rebuilds the
            exact shapes with no data. A ``rank_pattern`` given together with calibration statistics is
            used as the allocation.
        budget: filled at creation: the trainable parameters the allocation was allowed to spend.
    """

    r: int = field(default=16, metadata={"help": "Uniform rank; sets the global trainable-parameter budget."})
    rank_allocation: str = field(default="uniform", metadata={"help": "'uniform', 'eigen' or 'fisher'."})
    r_min: int = field(default=1, metadata={"help": "Lowest rank of a module (eigen/fisher allocation)."})
    r_max: Optional[int] = field(default=None, metadata={"help": "Highest rank of a module; None = 4 * r."})
    trainable: str = field(
        default="output", metadata={"help": "'output' (d_out x r), 'input' (r x d_in), 'core' (r x r) or 'diagonal' (r)."}
    )
    alpha: float = field(
        default=16.0, metadata={"help": "'output'/'input' shapes scale the update by alpha / r (as LoRA's alpha)."}
    )
    fisher_power: float = field(
        default=0.5, metadata={"help": "Fisher allocation scores a direction by F_i ** fisher_power (0.5: RMS gradient)."}
    )
    budget: Optional[int] = field(default=None, metadata={"help": "Filled: the trainable-parameter budget."})

    filled_fields = PeftBasisConfig.filled_fields + ("budget",)

    def __post_init__(self):
        self.peft_type = add_peft_type("BASIS")
        super().__post_init__()
        number(self, "r", low=1, integer=True, hint="The rank per module (it also sets the trainable-parameter budget).")
        choice(self, "rank_allocation", ALLOCATIONS)
        choice(self, "trainable", TRAINABLE)
        number(self, "alpha", low=0, low_open=True, hint="The update is scaled by alpha / r, as LoRA's alpha.")
        number(self, "fisher_power", low=0, low_open=True)
        number(self, "r_min", low=0, integer=True)
        number(self, "r_max", low=max(self.r_min, 1), integer=True, optional=True)
        number(self, "budget", low=1, integer=True, optional=True)
        if self.rank_allocation != "uniform" and self.r_min > self.r:
            raise ConfigError(
                f"r_min={self.r_min} is above r={self.r}: the budget (what uniform r costs) could not give every "
                "module its minimum rank. Lower r_min or raise r."
            )

    @property
    def max_rank(self) -> int:
        return self.r_max if self.r_max is not None else 4 * self.r

    def step_cost(self, i: int, d_in: int, d_out: int) -> int:
        """Trainable parameters of the ``i``-th direction (0-based) of a ``d_out x d_in`` module."""
        return {"output": d_out, "input": d_in, "core": 2 * i + 1, "diagonal": 1}[self.trainable]

    def rank_cost(self, r: int, d_in: int, d_out: int) -> int:
        """Trainable parameters of a ``d_out x d_in`` module at rank ``r``."""
        return {"output": r * d_out, "input": r * d_in, "core": r * r, "diagonal": r}[self.trainable]
