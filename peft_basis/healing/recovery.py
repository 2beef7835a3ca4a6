"""``heal``: distil the dense model into a compressed one, its own factors or a LoRA on top, on a token budget."""

from __future__ import annotations

import os
import tempfile
import time
import warnings
from dataclasses import dataclass, field, fields
from typing import Optional, Union

import torch
from torch import nn
from transformers import TrainerCallback, TrainingArguments

from ..evaluation import perplexity
from .distillation import DistillationTrainer, check_teacher
from .text import _as_examples, _collate, _real_ids, check_held_apart

TRAIN_MODES = ("factors", "lora")


# ---- what trains ---------------------------------------------------------------------------------------
def factor_parameters(peft_model: nn.Module) -> dict[str, nn.Parameter]:
    """The compressed model's own factors: Basis Sharing's shared bases and coefficients, or a factorised Basel
    adapter's ``A`` and ``B``."""
    from ..tuners.basel.layer import BaselLayer
    from ..tuners.basel.model import BaselModel
    from ..tuners.shared_basis.model import SharedBasisModel

    tuner = getattr(peft_model, "base_model", None)
    if isinstance(tuner, SharedBasisModel):
        keys = (".sb_bases.", ".sb_coefficient.")
    elif isinstance(tuner, BaselModel):
        if any(p == "train" for m in tuner.modules() if isinstance(m, BaselLayer) for p in m.basel_phase.values()):
            raise ValueError("This Basel adapter is still in its training phase (bases being pruned): finish it with "
                             "BaselCallback (DistillationTrainer hosts it) or `consolidate()`, then heal its factors.")
        keys = (".basel_A.", ".basel_B.")
    else:
        raise ValueError(f"train='factors' heals a compressed model's own factors (a Basis Sharing or factorised Basel "
                         f"PeftModel); got {type(peft_model).__name__}. Use train='lora' for a LoRA on top of it.")
    return {n: p for n, p in peft_model.named_parameters() if any(k in n for k in keys)}


_STACKING_WARNINGS = ("You are trying to modify a model with PEFT for a second time",
                      "Already found a `peft_config` attribute in the model")


def _quietly_stacked(fn):
    """Stacking a LoRA on a compressed model's inner model is intended here: PEFT's two warnings about a
    second PEFT call on one model say nothing to the user."""
    with warnings.catch_warnings():
        for message in _STACKING_WARNINGS:
            warnings.filterwarnings("ignore", message=message)
        return fn()


def stack_lora(compressed: nn.Module, r: int = 8, lora_alpha: int = 32, target_modules=None, lora_dropout: float = 0.0):
    """A LoRA on top of the compressed model, in place: on its inner transformers model, each compressed module
    (a peft-basis layer) becomes a LoRA layer's base layer, so the model stays factorised. ``target_modules``
    defaults to every module the compression replaced (``"all-linear"`` for a plain model)."""
    from peft import LoraConfig, PeftModel, get_peft_model
    from peft.tuners.tuners_utils import BaseTunerLayer

    inner = compressed.base_model.model if isinstance(compressed, PeftModel) else compressed
    if target_modules is None:
        replaced = {n.rsplit(".", 1)[-1] for n, m in inner.named_modules() if isinstance(m, BaseTunerLayer)}
        target_modules = sorted(replaced) or "all-linear"
    config = LoraConfig(r=r, lora_alpha=lora_alpha, target_modules=target_modules, lora_dropout=lora_dropout)
    return _adopt_shared_state(_quietly_stacked(lambda: get_peft_model(inner, config)), compressed)


def _adopt_shared_state(lora_model, compressed):
    """Tensors the compression keeps on its tuner, outside the inner model (Basis Sharing's shared bases), become
    a (frozen, unsaved) submodule of the LoRA model too, so ``lora_model.to(device)`` moves them with it."""
    tuner = getattr(compressed, "base_model", None)
    if tuner is not None and tuner is not compressed:
        shared = {n: m for n, m in tuner.named_children() if m is not getattr(tuner, "model", None)}
        if shared:
            lora_model.add_module("compressed_shared_state", nn.ModuleDict(shared))
    return lora_model


def load_healed(base_model: nn.Module, compressed_path: str, lora_path: Optional[str] = None):
    """The healed model from disk: the compressed adapter (healed factors, or the one the LoRA was trained on)
    onto ``base_model``, then the healing LoRA on top, if any (PEFT's own ``from_pretrained`` twice)."""
    from peft import PeftModel

    compressed = PeftModel.from_pretrained(base_model, compressed_path)
    if lora_path is None:
        return compressed
    lora = _quietly_stacked(lambda: PeftModel.from_pretrained(compressed.base_model.model, lora_path))
    return _adopt_shared_state(lora, compressed)


# ---- heal -----------------------------------------------------------------------------------------------
@dataclass
class HealingResult:
    """``model``: the healed model (``train="lora"``: the LoRA PeftModel around the compressed model).
    ``history``: ``{"tokens", "seconds", "perplexity"}`` at each evaluation (``perplexity`` a float, or a dict
    when ``eval_blocks`` was a dict); ``seconds`` counts training only."""

    model: nn.Module
    train: str
    tokens: int = 0
    steps: int = 0
    seconds: float = 0.0
    diverged: bool = False
    history: list = field(default_factory=list)

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds else float("nan")

    def save_pretrained(self, path: str) -> None:
        """``"factors"``: the compressed adapter with its healed factors (``PeftModel.from_pretrained(base, path)``).
        ``"lora"``: the LoRA alone (``load_healed(base, compressed_path, path)``); PEFT would also write the
        compressed layers' frozen coefficients into it, so only the LoRA's own tensors are passed."""
        if self.train == "factors":
            self.model.save_pretrained(path)
            return
        own = {k: v for k, v in self.model.state_dict().items() if "lora_" in k}
        self.model.save_pretrained(path, state_dict=own)


class _Checkpoints(TrainerCallback):
    """Perplexity on the evaluation blocks every ``every`` tokens; the time it takes is not training time."""

    def __init__(self, trainer, model, eval_sets, every, result):
        self.trainer, self.model, self.sets, self.every, self.result = trainer, model, eval_sets, every, result
        self.next = every
        self.paused = 0.0
        self.t0 = time.perf_counter()

    def evaluate(self):
        t = time.perf_counter()
        ppl = {name: perplexity(self.model, blocks) for name, blocks in self.sets.items()}
        entry = {"tokens": self.trainer.tokens_seen, "seconds": round(t - self.t0 - self.paused, 2),
                 "perplexity": ppl.get(None, ppl)}
        self.result.history.append(entry)
        self.paused += time.perf_counter() - t
        shown = ", ".join(f"{k or 'perplexity'} {v:.2f}" for k, v in ppl.items())
        print(f"[heal] {entry['tokens']:,} tokens, {entry['seconds']:.0f} s: {shown}", flush=True)

    def on_step_end(self, args, state, control, **kwargs):
        if self.every and not self.trainer.diverged and self.trainer.tokens_seen >= self.next:
            self.evaluate()
            while self.next <= self.trainer.tokens_seen:
                self.next += self.every


def heal(peft_model: nn.Module, teacher: nn.Module, train_blocks, *, max_tokens: int, train: str = "factors",
         lora_r: int = 8, lora_alpha: int = 32, lora_target_modules=None, lr: Optional[float] = None,
         batch_size: int = 4, temperature: float = 1.0, alpha: float = 0.0,
         eval_blocks: Union[torch.Tensor, dict, None] = None, eval_every_tokens: Optional[int] = None,
         output_dir: Optional[str] = None, seed: int = 0, chunk_tokens: int = 512, **trainer_kwargs) -> HealingResult:
    """Distil ``teacher`` (the dense model) into the compressed ``peft_model`` on ``max_tokens`` tokens of
    ``train_blocks`` (repeated if shorter). Returns a :class:`HealingResult`.

    ``train="factors"``: the compressed model's factors train (:func:`factor_parameters`), all else frozen;
    ``lr`` defaults to 5e-5. ``train="lora"``: a LoRA (``lora_r``, ``lora_alpha``) on every compressed module
    (:func:`stack_lora`), only the LoRA trains; ``lr`` defaults to 1e-4 (the Basis Sharing paper's recovery).
    ``eval_blocks`` (a tensor or a dict name -> tensor): perplexity before, every ``eval_every_tokens`` and
    after, and the guarantee that the healing text holds none of it (:func:`check_held_apart`).
    ``output_dir``: the healed artifact is saved there (:meth:`HealingResult.save_pretrained`).
    ``trainer_kwargs``: ``TrainingArguments`` fields (they override the defaults) or ``Trainer`` arguments
    (``callbacks=...``). A non-finite loss stops training, restores the pre-healing weights and warns.
    """
    if train not in TRAIN_MODES:
        raise ValueError(f"train must be one of {TRAIN_MODES}, got {train!r}")
    check_teacher(peft_model, teacher)
    examples = _as_examples(train_blocks, "train_blocks")
    eval_sets = None if eval_blocks is None else (dict(eval_blocks) if isinstance(eval_blocks, dict)
                                                  else {None: eval_blocks})
    if eval_sets is not None:
        check_held_apart(examples, {k or "evaluation": v for k, v in eval_sets.items()})
    arg_names = {f.name for f in fields(TrainingArguments)}
    accumulation = int(trainer_kwargs.get("gradient_accumulation_steps", 1))
    seq_len = max(e["input_ids"].numel() for e in examples)
    per_step = batch_size * seq_len * accumulation
    if not (isinstance(max_tokens, int) and max_tokens >= per_step):
        raise ValueError(f"max_tokens={max_tokens!r} is less than one batch ({batch_size} x {seq_len} tokens"
                         + (f" x {accumulation} accumulation steps" if accumulation > 1 else "")
                         + f" = {per_step:,}): raise max_tokens or lower batch_size.")
    steps = max_tokens // per_step
    text_tokens = sum(_real_ids(e).numel() for e in examples)
    if steps * per_step > text_tokens:
        print(f"[heal] the healing text holds {text_tokens:,} tokens; {steps * per_step:,} tokens repeat it "
              f"{steps * per_step / text_tokens:.1f} times", flush=True)

    torch.manual_seed(seed)
    student = stack_lora(peft_model, lora_r, lora_alpha, lora_target_modules) if train == "lora" else peft_model
    flags = {n: p.requires_grad for n, p in student.named_parameters()}
    trained = (factor_parameters(student) if train == "factors"
               else {n: p for n, p in student.named_parameters() if "lora_" in n})
    for n, p in student.named_parameters():
        p.requires_grad_(n in trained)
    snapshot = {n: p.detach().clone() for n, p in trained.items()}
    lr = lr if lr is not None else (5e-5 if train == "factors" else 1e-4)

    scratch = None
    if output_dir is None:
        scratch = tempfile.TemporaryDirectory(prefix="peft_basis_heal_")
    defaults = dict(output_dir=scratch.name if scratch else os.path.join(output_dir, "checkpoints"),
                    per_device_train_batch_size=batch_size, max_steps=steps, learning_rate=lr,
                    lr_scheduler_type="cosine", warmup_steps=min(0.05, 20 / steps) if steps > 1 else 0,
                    weight_decay=0.0, logging_steps=max(1, min(10, steps // 20)), report_to="none",
                    save_strategy="no", seed=seed, data_seed=seed, remove_unused_columns=False,
                    dataloader_num_workers=0, dataloader_pin_memory=torch.cuda.is_available(), label_names=[])
    defaults.update({k: v for k, v in trainer_kwargs.items() if k in arg_names})
    extra = {k: v for k, v in trainer_kwargs.items() if k not in arg_names}
    result = HealingResult(model=student, train=train)
    was_training = student.training
    trainer = DistillationTrainer(model=student, teacher=teacher, args=TrainingArguments(**defaults),
                                  train_dataset=examples, data_collator=_collate, temperature=temperature,
                                  alpha=alpha, chunk_tokens=chunk_tokens, **extra)
    checkpoints = None
    if eval_sets is not None:
        checkpoints = _Checkpoints(trainer, student, eval_sets, eval_every_tokens, result)
        trainer.add_callback(checkpoints)
        checkpoints.evaluate()
    print(f"[heal] {train}: {sum(p.numel() for p in trained.values()):,} trainable parameters, {steps} steps of "
          f"{per_step:,} tokens, lr {lr:g}", flush=True)
    t0 = time.perf_counter()
    try:
        out = trainer.train()
    finally:
        if scratch is not None:
            scratch.cleanup()
    result.seconds = time.perf_counter() - t0 - (checkpoints.paused if checkpoints else 0.0)
    result.tokens, result.steps = trainer.tokens_seen, out.global_step
    if trainer.diverged:
        with torch.no_grad():
            for n, p in trained.items():
                p.copy_(snapshot[n])
        result.diverged = True
        warnings.warn(f"Healing diverged: the loss became non-finite by step {out.global_step} "
                      f"({trainer.tokens_seen:,} tokens). Training stopped and the pre-healing "
                      f"{'factors' if train == 'factors' else 'LoRA (identity)'} were restored; lower lr (was {lr:g}).",
                      RuntimeWarning, stacklevel=2)
    elif checkpoints is not None and (not result.history or result.history[-1]["tokens"] != trainer.tokens_seen):
        checkpoints.evaluate()
    for n, p in student.named_parameters():
        p.requires_grad_(flags.get(n, p.requires_grad))
    student.train(was_training)
    print(f"[heal] {result.tokens:,} tokens in {result.seconds:.0f} s ({result.tokens_per_second:,.0f} tokens/s)",
          flush=True)
    if output_dir is not None:
        result.save_pretrained(output_dir)
    return result
