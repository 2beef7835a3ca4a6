"""Task Vector Bases (arXiv 2502.01015) for any model: T task vectors (full fine-tunes or PEFT
adapters) compressed into M basis vectors that can be added, negated and recovered.

    from peft_basis.task_vectors import TaskVectorBasis
    tvb = TaskVectorBasis.from_models(base, [ft_1, ft_2, ...], method="pca", num_bases=2, task_names=[...])
"""

from ..errors import TaskVectorError
from .basis import ALPHA_GRID, TaskVectorBasis, apply_delta, from_legacy
from .export import lowrank_factors, write_lora

__all__ = ["ALPHA_GRID", "TaskVectorBasis", "TaskVectorError", "apply_delta", "from_legacy", "lowrank_factors",
           "write_lora"]
