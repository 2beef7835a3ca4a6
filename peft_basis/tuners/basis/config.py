from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from ..._peft_type import add_peft_type
from ..base import BasisConfigBase

ALLOCATIONS = ("uniform", "eigen", "fisher")
TRAINABLE = ("core", "diagonal")


@dataclass
class BasisConfig(BasisConfigBase):
    """BASIS: fine-tune inside a calibration-aware subspace of every target Linear, with ranks spread
    over the model under one global parameter budget.

    Per target ``W`` (``d_out x d_in``) with calibration input covariance ``C = X^T X / N``:

    1. ``C = Q diag(lam) Q^T`` (robust eigh, eigenvalues clamped at ``damping * mean(lam)``), whitener
       ``S = diag(lam)^1/2 Q^T`` (``S^T S = C``).
    2. ``W S^T = U diag(sigma) V^T`` (SVD); ``R^T = V^T S^-T``, so ``W = U diag(sigma) R^T`` exactly, ``U`` has
       orthonormal columns and the input coordinates ``x R`` are white on the calibration data
       (``R^T C R = I``). ``sigma_i^2`` is direction ``i``'s share of ``tr(W C W^T)``, the module's mean
       squared output on the calibration data.
    3. The adapter keeps ``r`` directions (``U_r``, ``R_r``, frozen) and trains only a core:
       ``y = x W^T + ((x R_r) M^T) U_r^T``. ``M`` starts at zero, so the model starts exactly at the base
       model, the base weight is never modified, and training changes ``W`` only inside
       ``span(U_r) x span(R_r)``.

    Args:
        r: rank per module under ``"uniform"`` allocation. It also sets the global budget for the other
            allocations: the trainable parameters uniform ``r`` costs (``r^2`` per module for the core).
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
        trainable: the trainable shape inside the subspace. ``"core"``: a full ``r x r`` matrix (``r^2``
            parameters per module; any update of rank <= r inside the subspace). ``"diagonal"``: ``r``
            parameters, rescales the kept directions only (``U_r diag(m) R_r^T``). Either way the frozen
            ``U_r`` and ``R_r`` (``r (d_in + d_out)`` values) are stored in the adapter file so it is
            self-contained.
        rank_pattern: filled at creation (module -> rank), so ``PeftModel.from_pretrained`` rebuilds the
            exact shapes with no data. A ``rank_pattern`` given together with calibration statistics is
            used as the allocation.
        budget: filled at creation: the trainable parameters the allocation was allowed to spend.
    """

    r: int = field(default=16, metadata={"help": "Uniform rank; sets the global trainable-parameter budget."})
    rank_allocation: str = field(default="uniform", metadata={"help": "'uniform', 'eigen' or 'fisher'."})
    r_min: int = field(default=1, metadata={"help": "Lowest rank of a module (eigen/fisher allocation)."})
    r_max: Optional[int] = field(default=None, metadata={"help": "Highest rank of a module; None = 4 * r."})
    trainable: str = field(default="core", metadata={"help": "'core' (r x r) or 'diagonal' (r)."})
    fisher_power: float = field(
        default=0.5, metadata={"help": "Fisher allocation scores a direction by F_i ** fisher_power (0.5: RMS gradient)."}
    )
    budget: Optional[int] = field(default=None, metadata={"help": "Filled: the trainable-parameter budget."})

    def __post_init__(self):
        self.peft_type = add_peft_type("BASIS")
        super().__post_init__()
        if not (isinstance(self.r, int) and self.r >= 1):
            raise ValueError(f"r must be an int >= 1, got {self.r!r}")
        if self.rank_allocation not in ALLOCATIONS:
            raise ValueError(f"rank_allocation must be one of {ALLOCATIONS}, got {self.rank_allocation!r}")
        if self.trainable not in TRAINABLE:
            raise ValueError(f"trainable must be one of {TRAINABLE}, got {self.trainable!r}")
        if not self.fisher_power > 0:
            raise ValueError(f"fisher_power must be > 0, got {self.fisher_power!r}")
        if not (isinstance(self.r_min, int) and self.r_min >= 0):
            raise ValueError(f"r_min must be an int >= 0, got {self.r_min!r}")
        if self.r_max is not None and not (isinstance(self.r_max, int) and self.r_max >= max(self.r_min, 1)):
            raise ValueError(f"r_max must be an int >= max(r_min, 1) = {max(self.r_min, 1)}, got {self.r_max!r}")
        if self.rank_allocation != "uniform" and self.r_min > self.r:
            raise ValueError(
                f"r_min={self.r_min} is above r={self.r}: the budget (what uniform r costs) could not give every "
                "module its minimum rank. Lower r_min or raise r."
            )

    @property
    def max_rank(self) -> int:
        return self.r_max if self.r_max is not None else 4 * self.r

    def step_cost(self, i: int) -> int:
        """Trainable parameters of a module's ``i``-th direction (0-based)."""
        return 2 * i + 1 if self.trainable == "core" else 1

    def rank_cost(self, r: int) -> int:
        return r * r if self.trainable == "core" else r
