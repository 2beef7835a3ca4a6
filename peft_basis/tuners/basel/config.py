from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from ..._peft_type import add_peft_type
from ...errors import ConfigError
from ...validation import choice, number
from ..base import PeftBasisConfig

PHASES = ("train", "factorized")
RANK_ALLOCATIONS = ("global", "uniform")
INITS = ("auto", "svd", "whitened", "anchored")
# What BaselConfig.anchored_fit may set: the options of the anchored fit (SharedBasisConfig's fields of the same names)
ANCHORED_FIT_OPTIONS = ("anchor", "anchor_candidates", "holdout_fraction", "refine_epochs", "refine_lr",
                        "rank_allocation", "output_weights", "output_weight_power")


@dataclass
class BaselConfig(PeftBasisConfig):
    """Basel (TMLR 2025; arXiv 2405.15877): re-learn the importance of every target weight's SVD bases on
    one task, prune the unimportant ones on a schedule during training, and end with a factorised model
    that stores ``keep_ratio`` of the targeted dense parameters.

    Training phase, per target Linear (``W = U diag(s) Vh``, directions with ``s < svd_threshold * mean(s)``
    dropped)::

        W_eff = U diag(w^2) Vh + U_add Vh_add        # U, Vh frozen; w = sqrt(s), U_add = 0, Vh_add random

    Pruning physically removes bases (rows of ``Vh``, columns of ``U``, entries of ``w``), so pruned
    bases cost neither memory nor compute. At the end of training (``basel_step`` at the last step, or
    :class:`BaselCallback` ``on_train_end``, or ``consolidate()``) every target is re-factorised to its
    final rank ``r``: ``W_eff ~ B A`` with ``A`` ``r x d_in`` and ``B`` ``d_out x r``. That is what
    ``save_pretrained`` writes; ``rank_pattern`` records every final rank, so ``PeftModel.from_pretrained``
    rebuilds the exact shapes without data.

    Args:
        keep_ratio: fraction of the targeted modules' dense parameters that the final factors hold,
            ``sum_l r_l (d_in + d_out) <= keep_ratio * sum_l d_in d_out``, within one rank step. In (0, 1].
        extra_rank: rank of the trainable extra bases ``U_add Vh_add`` (the paper's ``r_add``, 32).
        warmup_ratio / warmup_steps: training before the first pruning (the paper's ``keeping_epoch``);
            ``warmup_steps`` (absolute) overrides the ratio.
        prune_end_ratio / prune_end_step: where the last pruning happens; the final ranks are reached
            exactly there, and the remaining steps train at those ranks. ``prune_end_step`` overrides.
        pruning_steps: number of pruning events between warm-up and the end (the paper's
            ``shrinking_steps``, 50). With fewer training steps than events, several fall on one step.
        init: ``"svd"`` (the paper: plain SVD of ``W``), ``"whitened"`` (SVD of ``W S^T`` with
            ``S^T S`` the task's input Gram from ``peft_basis.calibrate``, so the initial importances
            ``w^2`` measure each basis' contribution to the task's outputs), ``"anchored"`` (start from Basis
            Sharing's anchored factorisation, ``SharedBasisConfig(group_size=1, inputs="anchored")``, at the ranks
            of ``initial_keep``: ``peft_basis.calibrate`` then runs that layer-by-layer fit on the task's data, and
            each module's rank-``k`` factors ``C B`` are turned into ``U diag(w^2) R``, the SVD of ``C B`` whitened
            by the Gram of the inputs the module sees in the anchored model, so training starts exactly at the
            anchored model and ``w^2`` is each basis' share of its output there), or ``"auto"``: anchored when
            the attached statistics hold anchored factors, whitened when they hold Grams, plain SVD otherwise.
        initial_keep: with ``init="anchored"``, the stored fraction the anchored fit starts at (its ranks are those
            of ``compression_ratio = 1 - initial_keep``), in ``[keep_ratio, 1]``; the schedule prunes from there to
            ``keep_ratio``. ``None``: ``min(1, 1.5 * keep_ratio)``.
        anchored_fit: with ``init="anchored"``, options of the anchored fit passed to its ``SharedBasisConfig``
            (``anchor``, ``anchor_candidates``, ``holdout_fraction``, ``refine_epochs``, ``refine_lr``,
            ``rank_allocation``, ``output_weights``, ``output_weight_power``); the defaults are Basis Sharing's.
            ``rank_allocation="loss"`` or ``output_weights="fisher"`` add the dense model's Fisher pass (a backward
            per calibration batch) before the fit, as for Basis Sharing.
        svd_threshold: directions with singular value below ``svd_threshold * mean`` are dropped at
            export (consolidation, on ``W_eff``'s own spectrum) and, with the plain-SVD init, at initialisation
            (the paper's rule, 1e-3). The whitened init keeps every direction so the model starts exact.
        rank_allocation: how each pruning event spends its budget across modules: ``"global"`` (the bases with the
            highest relative relearned energy per parameter, wherever they are) or ``"uniform"`` (every module keeps
            the same fraction of its dense parameters, by its own energies; the leftover buys at most one rank more
            per module).
        min_rank: no module is pruned below this rank.
        keep_dense_weight: keep the dense weights in memory (for ``disable_adapter()``); off by default.
        rank_pattern / phase / initial_fraction: filled by the tuner (current ranks, ``"train"`` or
            ``"factorized"``, stored fraction at creation), so a checkpoint or the final adapter reloads
            with exact shapes and the schedule resumes where it was.
    """

    keep_ratio: float = field(default=0.5, metadata={"help": "Fraction of targeted dense parameters kept."})
    extra_rank: int = field(default=32, metadata={"help": "Rank of the trainable extra bases."})
    warmup_ratio: float = field(default=0.1, metadata={"help": "Fraction of training before pruning starts."})
    warmup_steps: Optional[int] = field(default=None, metadata={"help": "Absolute warm-up steps (overrides)."})
    prune_end_ratio: float = field(default=0.7, metadata={"help": "Fraction of training where pruning ends."})
    prune_end_step: Optional[int] = field(default=None, metadata={"help": "Absolute last pruning step (overrides)."})
    pruning_steps: int = field(default=50, metadata={"help": "Number of pruning events."})
    init: str = field(default="auto", metadata={"help": "'auto', 'svd', 'whitened' or 'anchored'."})
    initial_keep: Optional[float] = field(
        default=None, metadata={"help": "init='anchored': stored fraction the anchored fit starts at (None: 1.5x keep)."}
    )
    anchored_fit: dict = field(default_factory=dict, metadata={"help": "init='anchored': options of the anchored fit."})
    svd_threshold: float = field(default=1e-3, metadata={"help": "Drop singular values below this * mean."})
    rank_allocation: str = field(default="global", metadata={"help": "'global' or 'uniform' pruning budget."})
    min_rank: int = field(default=1, metadata={"help": "Lowest rank any module is pruned to."})
    keep_dense_weight: bool = field(default=False, metadata={"help": "Keep dense weights (for disable_adapter)."})
    phase: str = field(default="train", metadata={"help": "Filled: 'train' or 'factorized'."})
    initial_fraction: Optional[float] = field(default=None, metadata={"help": "Filled: stored fraction at creation."})

    filled_fields = PeftBasisConfig.filled_fields + ("phase", "initial_fraction")

    def starting_keep(self) -> float:
        """The stored fraction ``init="anchored"`` starts at: ``initial_keep``, or ``min(1.5 * keep_ratio,
        (1 + keep_ratio) / 2)`` (room to prune, and always below 1: the anchored fit needs something removed)."""
        if self.initial_keep is not None:
            return self.initial_keep
        return min(1.5 * self.keep_ratio, (1 + self.keep_ratio) / 2)

    def replaced_modules(self) -> list[str]:
        """The modules whose dense weight this adapter replaces (what lean loading never reads): every target
        of a saved adapter, unless ``keep_dense_weight``."""
        return [] if self.keep_dense_weight else sorted(self.rank_pattern)

    def __post_init__(self):
        self.peft_type = add_peft_type("BASEL")
        super().__post_init__()
        number(self, "keep_ratio", low=0, high=1, low_open=True,
               meaning="the fraction of the targeted parameters the factors keep", hint="keep_ratio=0.5 halves them.")
        number(self, "extra_rank", low=0, integer=True, hint="The rank of the trainable extra bases (the paper's 32).")
        number(self, "warmup_ratio", low=0, high=1)
        number(self, "prune_end_ratio", low=0, high=1)
        if not self.warmup_ratio < self.prune_end_ratio:
            raise ConfigError(
                f"Need 0 <= warmup_ratio < prune_end_ratio <= 1; got warmup_ratio={self.warmup_ratio}, "
                f"prune_end_ratio={self.prune_end_ratio}."
            )
        number(self, "warmup_steps", low=0, integer=True, optional=True)
        number(self, "prune_end_step", low=1, integer=True, optional=True)
        if self.warmup_steps is not None and self.prune_end_step is not None and self.warmup_steps >= self.prune_end_step:
            raise ConfigError(
                f"warmup_steps={self.warmup_steps} must be smaller than prune_end_step={self.prune_end_step}."
            )
        number(self, "pruning_steps", low=1, integer=True, hint="The number of pruning events (the paper's 50).")
        choice(self, "init", INITS)
        choice(self, "phase", PHASES, hint="`phase` is filled by the tuner; leave it at its default.")
        number(self, "svd_threshold", low=0)
        number(self, "min_rank", low=1, integer=True)
        number(self, "initial_fraction", low=0, optional=True)
        choice(self, "rank_allocation", RANK_ALLOCATIONS)
        if self.initial_keep is not None and not (
            isinstance(self.initial_keep, (int, float)) and self.keep_ratio <= self.initial_keep < 1
        ):
            raise ConfigError(
                f"initial_keep is the stored fraction the anchored init starts at and must be in [keep_ratio, 1) = "
                f"[{self.keep_ratio}, 1); got {self.initial_keep!r}. (The schedule prunes from it down to keep_ratio; "
                "the anchored fit needs something removed.)"
            )
        unknown = sorted(set(self.anchored_fit or {}) - set(ANCHORED_FIT_OPTIONS))
        if unknown:
            raise ConfigError(f"anchored_fit takes {list(ANCHORED_FIT_OPTIONS)}; got {unknown}.")
        if (self.initial_keep is not None or self.anchored_fit) and self.init not in ("anchored", "auto"):
            raise ConfigError(f"initial_keep and anchored_fit configure init='anchored'; this config has "
                              f"init={self.init!r}. Pass init='anchored', or drop them.")
