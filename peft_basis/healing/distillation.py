"""The distillation loss (``KL(p_teacher || p_student)`` per real token, optionally at a temperature and
mixed with the LM loss) and :class:`DistillationTrainer`, the ``transformers.Trainer`` that minimises it.

Full-vocabulary logits are never held for a whole batch where the model is "decoder, then a Linear head"
(checked numerically once per model): the head runs on chunks of tokens and each chunk's gradient is formed
at once (:class:`_ChunkedDistillation`); other models go through their full logits.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn
from transformers import Trainer, TrainerCallback

# ---- the loss ----------------------------------------------------------------------------------------
class _ChunkedDistillation(torch.autograd.Function):
    """Loss of student hidden states ``h_s`` (``n x d``) against teacher hidden states ``h_t`` through their
    heads (``w``: ``V x d``; ``None``: the inputs already are logits), chunk by chunk of tokens. The gradient
    w.r.t. the student's logits is closed-form (``T (q - p)`` for the KL, ``q - onehot`` for the LM loss), so
    each chunk's logits live only inside its loop step. Returns ``(loss, kl_sum, lm_sum)``."""

    @staticmethod
    def forward(ctx, h_s, w_s, b_s, h_t, w_t, b_t, targets, kl_scale, lm_scale, temperature, chunk):
        needs_h, needs_w, needs_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        grad_h = torch.zeros_like(h_s) if needs_h else None
        grad_w = torch.zeros_like(w_s, dtype=torch.float32) if needs_w else None
        grad_b = torch.zeros_like(b_s, dtype=torch.float32) if needs_b else None
        kl_sum = h_s.new_zeros((), dtype=torch.float64)
        lm_sum = h_s.new_zeros((), dtype=torch.float64)
        for i in range(0, h_s.shape[0], chunk):
            hs = h_s[i : i + chunk]
            zs = (hs if w_s is None else nn.functional.linear(hs, w_s, b_s)).float()
            zt = (h_t[i : i + chunk] if w_t is None else nn.functional.linear(h_t[i : i + chunk], w_t, b_t)).float()
            log_p = torch.log_softmax(zt / temperature, -1)
            log_q = torch.log_softmax(zs / temperature, -1)
            p = log_p.exp()
            kl_sum += (p * (log_p - log_q)).sum().double()
            g = (log_q.exp() - p).mul_(kl_scale * temperature)
            if lm_scale:
                tgt = targets[i : i + chunk]
                real = tgt != -100
                lm_sum += nn.functional.cross_entropy(zs, tgt, ignore_index=-100, reduction="sum").double()
                if real.any():
                    q1 = torch.softmax(zs[real], -1)
                    q1[torch.arange(q1.shape[0]), tgt[real]] -= 1
                    g[real] += q1.mul_(lm_scale)
            del zs, zt, log_p, log_q, p
            if needs_h:
                grad_h[i : i + chunk] = (g if w_s is None else g.to(w_s.dtype) @ w_s).to(h_s.dtype)
            if needs_w:
                grad_w += g.T @ hs.float()
            if needs_b:
                grad_b += g.sum(0)
        ctx.save_for_backward(grad_h, None if grad_w is None else grad_w.to(w_s.dtype),
                              None if grad_b is None else grad_b.to(b_s.dtype))
        ctx.mark_non_differentiable(kl_sum, lm_sum)
        loss = (kl_sum * (kl_scale * temperature**2) + lm_sum * lm_scale).to(torch.float32)
        return loss, kl_sum, lm_sum

    @staticmethod
    def backward(ctx, grad_loss, _kl, _lm):
        grads = [None if g is None else g * grad_loss.to(g.dtype) for g in ctx.saved_tensors]
        return (*grads, None, None, None, None, None, None, None, None)


def _head_route(model: nn.Module):
    """``(decoder, head)`` when ``model``'s logits are exactly ``head(decoder(...).last_hidden_state)`` (checked
    on 8 tokens once; cached on the model); ``None`` otherwise (soft-capped or scaled logits, a wrapped head):
    then the full logits are used."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    cached = getattr(base, "_peft_basis_head_route", False)
    if cached is not False:
        return cached
    route = None
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    decoder = base.get_decoder() if hasattr(base, "get_decoder") else None
    if type(head) is nn.Linear and decoder is not None and decoder is not base:
        device = head.weight.device
        ids = torch.arange(8, device=device)[None] % max(1, head.out_features)
        was_training = base.training
        base.eval()
        try:
            with torch.no_grad():
                full = base(input_ids=ids, use_cache=False).logits.float()
                split = head(decoder(input_ids=ids, use_cache=False).last_hidden_state).float()
            if full.shape == split.shape and torch.allclose(full, split, rtol=1e-4, atol=1e-4):
                route = (decoder, head)
        except Exception:  # any model we cannot split is served by the full-logits route
            route = None
        finally:
            base.train(was_training)
    object.__setattr__(base, "_peft_basis_head_route", route)
    return route


def _hidden_and_head(model, input_ids, attention_mask, rows):
    """What the loss needs of one model: the real tokens' hidden states and its head's weight and bias
    (or the real tokens' logits and no head)."""
    route = _head_route(model)
    if route is None:
        logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
        return logits[rows], None, None
    decoder, head = route
    hidden = decoder(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
    return hidden[rows], head.weight, head.bias


def distillation_loss(student: nn.Module, teacher: nn.Module, inputs: dict, *, temperature: float = 1.0,
                      alpha: float = 0.0, chunk_tokens: int = 512) -> tuple[torch.Tensor, dict]:
    """``(loss, stats)`` on one batch: ``(1 - alpha) * T^2 * KL(p_teacher || p_student) + alpha * LM``, each
    averaged over the real tokens (``attention_mask == 1``; the LM term over real tokens followed by a real
    target). ``stats``: ``kl`` and ``lm`` (means, floats) and ``tokens`` (real input tokens)."""
    ids = inputs["input_ids"]
    mask = inputs.get("attention_mask")
    real = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.bool()
    labels = inputs.get("labels")
    labels = ids.masked_fill(~real, -100) if labels is None else labels
    targets = torch.full_like(ids, -100)
    targets[:, :-1] = labels[:, 1:]
    rows = real.nonzero(as_tuple=True)
    n_kl = int(real.sum())
    tgt = targets[rows]
    n_lm = int((tgt != -100).sum())
    with torch.no_grad():
        h_t, w_t, b_t = _hidden_and_head(teacher, ids, mask, rows)
    h_s, w_s, b_s = _hidden_and_head(student, ids, mask, rows)
    vocab_t = h_t.shape[-1] if w_t is None else w_t.shape[0]
    vocab_s = h_s.shape[-1] if w_s is None else w_s.shape[0]
    if vocab_t != vocab_s:
        raise ValueError(f"The teacher predicts over {vocab_t} tokens, the student over {vocab_s}: distil from the "
                         "dense model the student was compressed from (same tokenizer).")
    kl_scale = (1.0 - alpha) / max(n_kl, 1)
    lm_scale = alpha / max(n_lm, 1) if alpha else 0.0
    loss, kl_sum, lm_sum = _ChunkedDistillation.apply(h_s, w_s, b_s, h_t, w_t, b_t, tgt, kl_scale, lm_scale,
                                                      float(temperature), int(chunk_tokens))
    return loss, {"kl": float(kl_sum) / max(n_kl, 1), "lm": float(lm_sum) / max(n_lm, 1) if alpha else None,
                  "tokens": n_kl}


@torch.no_grad()
def distillation_kl(student: nn.Module, teacher: nn.Module, blocks: torch.Tensor, batch_size: int = 4) -> float:
    """Mean ``KL(p_teacher || p_student)`` per token over ``blocks`` (``n x seq_len`` ids): the held-apart
    distance that healing shrinks."""
    modes = student.training, teacher.training
    student.eval(), teacher.eval()
    device = next(p.device for p in student.parameters() if p.device.type != "meta")
    total, count = 0.0, 0
    for i in range(0, blocks.shape[0], batch_size):
        _, stats = distillation_loss(student, teacher, {"input_ids": blocks[i : i + batch_size].to(device)})
        total += stats["kl"] * stats["tokens"]
        count += stats["tokens"]
    student.train(modes[0]), teacher.train(modes[1])
    return total / max(count, 1)


# ---- the trainer -------------------------------------------------------------------------------------
def _parameter_ids(model: nn.Module) -> set[int]:
    return {id(p) for p in model.parameters()}


def check_teacher(student: nn.Module, teacher) -> None:
    """Refuse a teacher that cannot teach this student: none, not a model, the student itself (or sharing
    its weights), or another vocabulary size."""
    if teacher is None:
        raise ValueError("Healing distils from the dense model: pass `teacher=` (the model before compression; "
                         "keep a copy, e.g. `copy.deepcopy(model)`, before `get_peft_model`, which edits it in place).")
    if not isinstance(teacher, nn.Module) or not callable(getattr(teacher, "forward", None)):
        raise TypeError(f"The teacher must be a causal LM (a torch nn.Module returning logits), got "
                        f"{type(teacher).__name__}.")
    if teacher is student or (_parameter_ids(teacher) & _parameter_ids(student)):
        raise ValueError(
            "The teacher IS the student (or shares its weights): get_peft_model compresses the model in place, so "
            "the model passed to it is the compressed one now. Load the dense model again (or deepcopy it before "
            "compression) and pass that as teacher.")
    vocab = lambda m: getattr(getattr(m, "config", None), "vocab_size", None)  # noqa: E731
    if vocab(teacher) is not None and vocab(student) is not None and vocab(teacher) != vocab(student):
        raise ValueError(f"The teacher's vocabulary has {vocab(teacher)} tokens, the student's {vocab(student)}: "
                         "distil from the dense model the student was compressed from (same tokenizer).")


class DistillationTrainer(Trainer):
    """``transformers.Trainer`` whose loss is :func:`distillation_loss` against ``teacher`` (run alongside
    under ``torch.no_grad()``, in eval mode, never trained). Logs ``kl`` and ``tokens`` (real input tokens
    spent) with the loss; a non-finite loss stops training and sets ``diverged``.

    ``DistillationTrainer(model=student, teacher=dense, args=TrainingArguments(...), train_dataset=...)``;
    it also hosts :class:`~peft_basis.BaselCallback` (prune while distilling)."""

    def __init__(self, *args, teacher: nn.Module = None, temperature: float = 1.0, alpha: float = 0.0,
                 chunk_tokens: int = 512, **kwargs):
        super().__init__(*args, **kwargs)
        check_teacher(self.model, teacher)
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature!r}")
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha (the LM loss's share) must be in [0, 1], got {alpha!r}")
        self.teacher = teacher.to(self.args.device).eval()
        self.temperature, self.alpha, self.chunk_tokens = temperature, alpha, chunk_tokens
        self.loss_is_scaled_for_ga = False  # our loss is a per-batch mean: Trainer divides by accumulation steps
        self.tokens_seen, self.diverged = 0, False
        self._window = [0.0, 0]  # kl * tokens, tokens since the last log
        self.add_callback(_StopOnDivergence(self))

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self.teacher.training:
            self.teacher.eval()
        loss, stats = distillation_loss(model, self.teacher, inputs, temperature=self.temperature, alpha=self.alpha,
                                        chunk_tokens=self.chunk_tokens)
        if model.training:
            self.tokens_seen += stats["tokens"]
            self._window[0] += stats["kl"] * stats["tokens"]
            self._window[1] += stats["tokens"]
            if not torch.isfinite(loss):
                self.diverged = True
        return (loss, None) if return_outputs else loss

    def log(self, logs: dict, start_time: Optional[float] = None) -> None:
        logs["tokens"] = self.tokens_seen
        if self._window[1]:
            logs["kl"] = round(self._window[0] / self._window[1], 5)
            self._window = [0.0, 0]
        super().log(logs, start_time)


class _StopOnDivergence(TrainerCallback):
    def __init__(self, trainer):
        self.trainer = trainer

    def on_step_end(self, args, state, control, **kwargs):
        if self.trainer.diverged:
            control.should_training_stop = True
