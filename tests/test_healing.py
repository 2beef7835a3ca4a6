"""Healing (peft_basis.healing): the distillation loss, what trains, saving, the guards, and that it heals.

The teacher is a tiny Llama trained for a few seconds on Python's docs (character tokens), so it predicts
real text far better than chance and a strongly compressed copy of it is measurably worse."""

import copy
import math
import warnings

import pytest
import torch
from peft import PeftModel, get_peft_model
from torch import nn
from transformers import TrainerCallback

import peft_basis  # noqa: F401
from peft_basis import BaselConfig, SharedBasisConfig, calibrate
from peft_basis.data import load_text, token_blocks
from peft_basis.evaluation import perplexity
from peft_basis.healing import (
    DistillationTrainer,
    check_held_apart,
    distillation_kl,
    distillation_loss,
    factor_parameters,
    heal,
    load_healed,
)
from peft_basis.healing import distillation as distillation_module

from .models import char_tokenizer, tiny_llama

QUIET = dict(disable_tqdm=True, logging_steps=1000)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny matrices: one thread is several times faster than two on shared cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def world(one_thread):
    """A trained tiny teacher and three disjoint stretches of text: pre-training/calibration, healing, evaluation."""
    torch.manual_seed(0)
    blocks = token_blocks(char_tokenizer(), load_text("pydoc")[:64_000], 64)
    pre, healing, held = blocks[:-200], blocks[-200:-8], blocks[-8:]
    teacher = tiny_llama(layers=2).train()
    opt = torch.optim.AdamW(teacher.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(150):
        b = pre[torch.randint(0, pre.shape[0], (16,), generator=g)]
        teacher(input_ids=b, labels=b).loss.backward()
        opt.step()
        opt.zero_grad()
    return {"teacher": teacher.eval(), "calib": pre[:16], "heal": healing, "held": held}


def compressed(world, ratio=0.8):
    model = copy.deepcopy(world["teacher"])
    config = SharedBasisConfig(compression_ratio=ratio)
    calibrate(model, config, [world["calib"]], progress=False)
    return get_peft_model(model, config)


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def reference_loss(student, teacher, ids, mask, temperature, alpha):
    """Plain full-logits KL(p_t || p_s) and LM loss, by torch's own functions."""
    s = student(input_ids=ids, attention_mask=mask).logits.float()
    with torch.no_grad():
        t = teacher(input_ids=ids, attention_mask=mask).logits.float()
    kl = nn.functional.kl_div(torch.log_softmax(s / temperature, -1), torch.log_softmax(t / temperature, -1),
                              log_target=True, reduction="none").sum(-1)
    kl = kl[mask.bool()].mean()
    labels = ids.masked_fill(mask == 0, -100)
    lm = nn.functional.cross_entropy(s[:, :-1].reshape(-1, s.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100)
    return (1 - alpha) * temperature**2 * kl + alpha * lm, kl


@pytest.mark.parametrize("route", ["chunked head", "full logits"])
def test_loss_and_gradients_equal_an_independent_computation(world, route, monkeypatch):
    teacher, student = world["teacher"], compressed(world)
    if route == "full logits":
        monkeypatch.setattr(distillation_module, "_head_route", lambda model: None)
    ids = world["heal"][:3, :40]
    mask = torch.ones_like(ids)
    mask[1, 30:] = 0  # padding: never counted
    mask[2, 12:] = 0
    params = [p for p in student.parameters() if p.requires_grad]
    loss, stats = distillation_loss(student, teacher, {"input_ids": ids, "attention_mask": mask}, temperature=2.0,
                                    alpha=0.3, chunk_tokens=7)
    grads = torch.autograd.grad(loss, params)
    ref, ref_kl = reference_loss(student, teacher, ids, mask, 2.0, 0.3)
    ref_grads = torch.autograd.grad(ref, params)
    assert stats["tokens"] == int(mask.sum())
    assert stats["kl"] == pytest.approx(float(ref_kl.detach()), rel=1e-5)
    assert torch.allclose(loss, ref, rtol=1e-5, atol=1e-6)
    for g, r in zip(grads, ref_grads):
        assert torch.allclose(g, r, rtol=1e-3, atol=1e-6)


def test_kl_is_zero_and_gradients_vanish_for_a_copy_of_the_teacher(world):
    teacher = world["teacher"]
    student = copy.deepcopy(teacher)
    ids = world["heal"][:4]
    loss, stats = distillation_loss(student, teacher, {"input_ids": ids})
    grads = torch.autograd.grad(loss, list(student.parameters()))
    assert abs(float(loss.detach())) < 1e-6 and abs(stats["kl"]) < 1e-6
    assert max(float(g.abs().max()) for g in grads) < 1e-6


@pytest.mark.parametrize("train", ["factors", "lora"])
def test_a_few_steps_lower_the_held_apart_kl_and_perplexity(world, train):
    teacher, student = world["teacher"], compressed(world)
    held = world["held"]
    kl_before, ppl_before = distillation_kl(student, teacher, held), perplexity(student, held)
    result = heal(student, teacher, world["heal"], max_tokens=64 * 8 * 12, train=train, lr=1e-3, batch_size=8,
                  eval_blocks=held, eval_every_tokens=64 * 8 * 6, **QUIET)
    kl_after = distillation_kl(result.model, teacher, held)
    ppl = [h["perplexity"] for h in result.history]
    assert [h["tokens"] for h in result.history] == [0, 3072, 6144]
    assert kl_after < 0.85 * kl_before
    assert ppl[0] == pytest.approx(ppl_before) and ppl[-1] < 0.985 * ppl[0]
    assert result.tokens == 6144 and result.steps == 12 and not result.diverged


def _state(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_factors_mode_trains_only_the_factors_and_reloads_identically(world, tmp_path):
    teacher, student = world["teacher"], compressed(world)
    before, teacher_before = _state(student), _state(teacher)
    factors = set(factor_parameters(student))
    assert factors and all(".sb_bases." in n or ".sb_coefficient." in n for n in factors)
    result = heal(student, teacher, world["heal"], max_tokens=64 * 8 * 2, batch_size=8, lr=1e-3,
                  output_dir=str(tmp_path / "healed"), eval_blocks={"pydoc": world["held"]}, eval_at_tokens=[512],
                  evaluate_first=False, **QUIET)
    assert [h["tokens"] for h in result.history] == [512, 1024] and "pydoc" in result.history[0]["perplexity"]
    after = _state(result.model)
    assert {n for n in before if not torch.equal(before[n], after[n])} == factors
    assert all(torch.equal(teacher_before[n], p) and p.grad is None for n, p in teacher.named_parameters())
    assert not teacher.training
    ids = world["held"][:2]
    again = PeftModel.from_pretrained(copy.deepcopy(teacher), tmp_path / "healed")
    assert torch.equal(logits(again, ids), logits(result.model, ids))


def test_lora_mode_trains_only_the_lora_and_reloads_identically(world, tmp_path):
    teacher, student = world["teacher"], compressed(world)
    student.save_pretrained(tmp_path / "compressed")  # the adapter the LoRA is trained on
    before = {id(p): p.detach().clone() for p in student.parameters()}
    result = heal(student, teacher, world["heal"], max_tokens=64 * 8 * 2, train="lora", batch_size=8, lr=1e-3,
                  output_dir=str(tmp_path / "lora"), **QUIET)
    assert all(torch.equal(before[id(p)], p) for p in result.model.parameters() if id(p) in before)  # bitwise
    assert len(before) == len([p for p in result.model.parameters() if id(p) in before])
    lora = {n: p for n, p in result.model.named_parameters() if "lora_" in n}
    assert lora and all(p.abs().sum() > 0 for n, p in lora.items() if "lora_B" in n)  # trained away from 0
    cfg = result.model.peft_config["default"]
    assert (cfg.r, cfg.lora_alpha) == (8, 32)
    ids = world["held"][:2]
    again = load_healed(copy.deepcopy(teacher), tmp_path / "compressed", tmp_path / "lora")
    assert torch.equal(logits(again, ids), logits(result.model, ids))
    from safetensors.torch import load_file

    assert all("lora_" in k for k in load_file(tmp_path / "lora" / "adapter_model.safetensors"))


def test_basel_factorised_factors_heal(world):
    teacher = world["teacher"]
    model = copy.deepcopy(teacher)
    config = BaselConfig(keep_ratio=0.5, extra_rank=2)
    calibrate(model, config, [world["calib"]], progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = get_peft_model(model, config)
    with pytest.raises(ValueError, match="still in its training phase"):
        factor_parameters(pm)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # consolidated before the pruning schedule's end: above keep_ratio, fine here
        pm.base_model.consolidate()
    before = _state(pm)
    heal(pm, teacher, world["heal"], max_tokens=64 * 8, batch_size=8, lr=1e-3, **QUIET)
    changed = {n for n, p in pm.named_parameters() if not torch.equal(before[n], p)}
    assert changed == set(factor_parameters(pm)) and all(".basel_A." in n or ".basel_B." in n for n in changed)


def test_bad_inputs_give_clear_errors(world):
    teacher, student = world["teacher"], compressed(world)
    text, held = world["heal"], world["held"]
    kw = dict(max_tokens=64 * 8, batch_size=8)
    with pytest.raises(ValueError, match="pass `teacher=`"):
        heal(student, None, text, **kw)
    with pytest.raises(TypeError, match="must be a causal LM"):
        heal(student, "HuggingFaceTB/SmolLM2-135M", text, **kw)
    with pytest.raises(ValueError, match="The teacher IS the student"):
        heal(student, student, text, **kw)
    with pytest.raises(ValueError, match="The teacher IS the student"):  # get_peft_model edited it in place
        heal(student, student.base_model.model, text, **kw)
    other = tiny_llama(layers=1)
    other.resize_token_embeddings(96)
    with pytest.raises(ValueError, match="vocabulary has 96 tokens"):
        heal(student, other, text, **kw)
    with pytest.raises(ValueError, match="Healing text never contains the evaluation text"):
        heal(student, teacher, torch.cat([text, held[3:4]]), eval_blocks=held, **kw)
    with pytest.raises(ValueError, match="less than one batch"):
        heal(student, teacher, text, max_tokens=100, batch_size=8)
    with pytest.raises(ValueError, match="train must be one of"):
        heal(student, teacher, text, train="everything", **kw)
    with pytest.raises(ValueError, match="Use train='lora'"):
        heal(copy.deepcopy(teacher), teacher, text, **kw)
    with pytest.raises(ValueError, match="is empty"):
        heal(student, teacher, torch.zeros(0, 64, dtype=torch.long), **kw)


def test_held_apart_check_finds_evaluation_text_at_any_offset():
    g = torch.Generator().manual_seed(0)
    stream = torch.randint(0, 1000, (40 * 64,), generator=g)
    train = stream.view(40, 64)
    check_held_apart(train, torch.randint(0, 1000, (4, 64), generator=g))  # other text passes
    straddling = stream[100 : 100 + 64][None]  # across two training blocks
    with pytest.raises(ValueError, match="1 of 1 evaluation blocks"):
        check_held_apart(train, straddling)
    partly = torch.cat([torch.randint(0, 1000, (400,), generator=g), stream[500:564]])[None]
    with pytest.raises(ValueError, match="'pydoc' evaluation blocks"):
        check_held_apart(train, {"pydoc": partly})
    padded = {"input_ids": torch.cat([stream[:32], torch.zeros(32, dtype=torch.long)]),
              "attention_mask": torch.cat([torch.ones(32), torch.zeros(32)]).long()}
    with pytest.raises(ValueError):  # a short (padded) block counts whole
        check_held_apart(train, [padded])


class _Poison(TrainerCallback):
    """Writes a NaN into one factor after the second step: the next loss is not finite."""

    def __init__(self, param):
        self.param = param

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == 2:
            with torch.no_grad():
                self.param[(0,) * self.param.dim()] = float("nan")  # factors may be strided views (aligned rows)


def test_divergence_stops_restores_the_factors_and_says_so(world):
    teacher, student = world["teacher"], compressed(world)
    before = _state(student)
    victim = next(iter(factor_parameters(student).values()))
    with pytest.warns(RuntimeWarning, match="Healing diverged.*restored"):
        result = heal(student, teacher, world["heal"], max_tokens=64 * 8 * 6, batch_size=8, lr=1e-3,
                      callbacks=[_Poison(victim)], **QUIET)
    assert result.diverged and result.steps < 6
    assert all(torch.equal(before[n], p) for n, p in student.named_parameters())
    assert math.isfinite(perplexity(student, world["held"]))


def test_distillation_trainer_with_gradient_accumulation_matches_its_loss(world, tmp_path):
    from transformers import TrainingArguments

    teacher, student = world["teacher"], compressed(world)
    data = [{"input_ids": x} for x in world["heal"][:8]]
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=2, gradient_accumulation_steps=2,
                             max_steps=1, learning_rate=0.0, report_to="none", save_strategy="no", logging_steps=1,
                             disable_tqdm=True)
    trainer = DistillationTrainer(model=student, teacher=teacher, args=args, train_dataset=data)
    out = trainer.train()
    assert trainer.tokens_seen == 4 * 64
    logged = [h for h in trainer.state.log_history if "kl" in h][0]
    assert out.training_loss == pytest.approx(logged["kl"], rel=1e-3)  # a mean, not a sum over micro-batches


@pytest.mark.real_model
def test_command_heals_after_compression_on_held_apart_text(tmp_path):
    """`peft-basis --heal-tokens` on a 2-layer cut of the real model: heals on the blocks between calibration and
    evaluation, reports perplexity before/after healing, and saves the healed factors."""
    import json

    from peft_basis.cli import run
    from peft_basis.data import load_default_model

    model, tok = load_default_model(num_hidden_layers=2)
    model.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    out = tmp_path / "out"
    result = run(["--model", str(tmp_path / "model"), "--calib-blocks", "8", "--eval-blocks", "2", "--seq-len", "128",
                  "--output", str(out), "--eval-domain", "pydoc", "--calib-domain", "pydoc", "--group-size", "1",
                  "--heal-tokens", "1024", "--threads", "1"])
    healing = result["healing"]
    assert healing["tokens"] == 1024 and not healing["diverged"]
    assert healing["perplexity_after"] == pytest.approx(result["perplexity"]["compressed"], rel=1e-6)
    assert json.loads((out / "peft_basis_result.json").read_text())["healing"]["tokens"] == 1024
    reloaded = PeftModel.from_pretrained(load_default_model(num_hidden_layers=2)[0], str(out))
    from peft_basis.data import load_text, token_blocks

    held = token_blocks(tok, load_text("pydoc"), 128)[-2:]
    assert perplexity(reloaded, held) == pytest.approx(healing["perplexity_after"], rel=1e-5)
