"""When Basel prunes and how far (the Trainer callback that follows it: :mod:`.callback`).

The schedule: ``warm`` steps of training at full rank, then ``pruning_steps`` pruning events spread
evenly until ``end``; event ``i`` shrinks the stored factors to the fraction

    f_i = keep + (f_0 - keep) * (1 - i / n)^3          (f_0: stored fraction at creation)

of the targeted dense parameters (cubic, as AdaLoRA's budget: big cuts while the bases that matter
least go, small ones near the target). Event ``n`` lands exactly on ``keep_ratio`` at step ``end``,
whatever the number of steps: the events are a function of ``step / total_steps``, and several fall
on one step when there are fewer steps than events. Each event spends the budget greedily on the bases
with the highest relative relearned energy per parameter, so it is also an energy threshold: the
smallest relative energy kept is recorded per event in ``BaselModel.history``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .config import BaselConfig


@dataclass
class BaselSchedule:
    warm: int
    end: int
    total: int
    events: int

    @classmethod
    def from_config(cls, config: BaselConfig, total_steps: int) -> "BaselSchedule":
        if not (isinstance(total_steps, int) and total_steps >= 1):
            raise ValueError(f"Basel needs the total number of training steps (>= 1), got {total_steps!r}.")
        warm = config.warmup_steps if config.warmup_steps is not None else int(round(config.warmup_ratio * total_steps))
        if config.prune_end_step is not None:
            end = config.prune_end_step
        else:
            end = max(warm + 1, int(round(config.prune_end_ratio * total_steps)))
        if end > total_steps or warm >= total_steps:
            raise ValueError(
                f"The Basel schedule is longer than training: pruning would end at step {end} (warm-up {warm}) but "
                f"training has {total_steps} steps, so the model would never reach keep_ratio={config.keep_ratio}. "
                "Lower `prune_end_step`/`warmup_steps` (or use prune_end_ratio/warmup_ratio, which scale with "
                "training), or train for more steps."
            )
        return cls(warm=warm, end=end, total=total_steps, events=config.pruning_steps)

    def events_done(self, step: int) -> int:
        """Pruning events due once ``step`` optimizer steps have completed."""
        if step <= self.warm:
            return 0
        if step >= self.end:
            return self.events
        return min(self.events, math.floor((step - self.warm) * self.events / (self.end - self.warm)))

    @staticmethod
    def target_fraction(event: int, events: int, initial: float, keep: float) -> float:
        if initial <= keep:
            return keep
        return keep + (initial - keep) * (1 - event / events) ** 3
