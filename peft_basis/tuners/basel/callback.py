"""Basel inside ``transformers.Trainer``: a callback that prunes on the schedule and factorises at the end."""

from __future__ import annotations

from transformers import TrainerCallback

from .config import BaselConfig
from .model import BaselModel
from .schedule import BaselSchedule

__all__ = ["BaselCallback", "find_basel_model"]


def find_basel_model(model):
    """The :class:`BaselModel` inside a PeftModel (or the tuner itself)."""
    seen = model
    for _ in range(4):
        if isinstance(seen, BaselModel):
            return seen
        seen = getattr(seen, "base_model", None) or getattr(seen, "module", None)
        if seen is None:
            break
    raise TypeError(
        f"No Basel adapter in {type(model).__name__}: wrap the model with get_peft_model(model, BaselConfig(...)) "
        "before training with BaselCallback."
    )


class BaselCallback(TrainerCallback):
    """Prunes on the schedule inside ``transformers.Trainer`` and factorises at the end of training.

    ``Trainer(model=peft_model, ..., callbacks=[BaselCallback()])``. It reads the total number of steps
    from the trainer state, checks the schedule fits before the first step, slices the optimizer's
    state along with the pruned bases, and calls ``consolidate()`` in ``on_train_end`` so that
    ``save_pretrained`` afterwards writes the factorised model.
    """

    def __init__(self, config: BaselConfig | None = None, adapter_name: str = "default"):
        self.adapter_name = adapter_name
        self.config = config  # optional; the adapter's own config (in the model) drives the schedule

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        tuner = find_basel_model(model)
        BaselSchedule.from_config(tuner.peft_config[self.adapter_name], state.max_steps)

    def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        find_basel_model(model).basel_step(state.global_step, state.max_steps, optimizer=optimizer,
                                           adapter_name=self.adapter_name)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        find_basel_model(model).consolidate(self.adapter_name)
