"""Healing: recovery training of a compressed model by distillation from the dense model.

``heal(peft_model, teacher, train_blocks, max_tokens=...)`` trains either the compressed model's own factors
(``train="factors"``: Basis Sharing's shared bases and coefficients, a factorised Basel adapter's ``A``/``B``)
or a LoRA on top of it (``train="lora"``, the Basis Sharing paper's step) to match the dense model's
next-token distributions, through :class:`DistillationTrainer` (a ``transformers.Trainer``).

The loss is ``KL(p_teacher || p_student)`` per real (non-padding) token, averaged, at a temperature ``T``
(scaled by ``T^2`` so gradients keep their size), optionally mixed with the plain LM loss:
``(1 - alpha) * T^2 * KL + alpha * LM``. Full-vocabulary logits are never held for a whole batch where
the model is "decoder, then a Linear head" (checked numerically once per model): the head runs on chunks
of tokens and each chunk's gradient is formed at once (:class:`_ChunkedDistillation`).
"""

from .distillation import DistillationTrainer, check_teacher, distillation_kl, distillation_loss
from .recovery import TRAIN_MODES, HealingResult, factor_parameters, heal, load_healed, stack_lora
from .text import LEAK_WINDOW, check_held_apart

__all__ = ["DistillationTrainer", "HealingResult", "LEAK_WINDOW", "TRAIN_MODES", "check_held_apart", "check_teacher",
           "distillation_kl", "distillation_loss", "factor_parameters", "heal", "load_healed", "stack_lora"]
