"""Basel: reparametrisation, schedule to an exact keep ratio, factorised save/reload, decompress, 8-bit."""

import json
import math
import warnings

import pytest
import torch
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file

import peft_basis
from peft_basis.evaluation import count_parameters
from peft_basis.tuners.basel import (
    BaselCallback,
    BaselConfig,
    BaselLayer,
    BaselSchedule,
    export_factorized,
    quantize_factors_8bit,
)

from .models import BUILDERS, fresh_copy, tiny_llama, token_batches


def _basel(model, calibrate=True, **kw):
    kw.setdefault("extra_rank", 4)
    config = BaselConfig(**kw)
    if calibrate:
        peft_basis.calibrate(model, config, token_batches(2), progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return get_peft_model(model, config), config


def _train(pm, steps, lr=1e-3, seed=0, call_step=True, start=1, total=None, opt=None):
    total = total or steps
    opt = opt or torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=lr)
    batches = token_batches(4, seed=seed + 7)
    losses = []
    for step in range(start, start + steps):
        b = batches[step % len(batches)]
        loss = pm(input_ids=b, labels=b).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
        if call_step:
            pm.base_model.basel_step(step, total, opt)
    return losses, opt


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def _max_rank_step(tuner):
    return max(m.in_features + m.out_features for m in tuner.basel_layers().values())


# ---- config and errors ----------------------------------------------------------------------------
@pytest.mark.parametrize("keep", [0, -0.2, 1.01, 2])
def test_keep_ratio_outside_unit_interval_is_refused(keep):
    with pytest.raises(ValueError, match=r"keep_ratio .* must be in \(0, 1\]"):
        BaselConfig(keep_ratio=keep)


def test_schedule_longer_than_training_is_refused():
    model = tiny_llama(layers=1)
    pm, config = _basel(model, keep_ratio=0.5, prune_end_step=20)
    with pytest.raises(ValueError, match="longer than training.*20.*10 steps"):
        pm.base_model.basel_step(1, 10)
    with pytest.raises(ValueError, match="warmup_ratio < prune_end_ratio"):
        BaselConfig(warmup_ratio=0.8, prune_end_ratio=0.5)


def test_targets_too_small_to_factorise_are_named():
    model = tiny_llama(layers=1)  # 64x64 and 64x128 weights
    with pytest.raises(ValueError, match=r"No target can be factorised profitably at keep_ratio=0.01.*d_in \+ d_out"):
        _basel(model, calibrate=False, keep_ratio=0.01)


def test_mixed_sizes_leave_the_small_targets_dense_with_a_warning():
    model = tiny_llama(layers=1)
    # At keep 0.04: k/v (32x64 with 2 KV heads) get 0.04 * 2048 = 82 parameters, one rank costs 96 -> dense;
    # q/o (64x64: 164 >= 128) and the MLP (64x128: 328 >= 192) fit.
    config = BaselConfig(keep_ratio=0.04, extra_rank=2, init="svd")
    with pytest.warns(UserWarning, match="leaves .* targets dense"):
        pm = get_peft_model(model, config)
    assert set(n.rsplit(".", 1)[-1] for n in pm.base_model.basel_layers()) == {"q_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


# ---- the reparametrisation --------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["llama", "gpt2", "opt"])
@pytest.mark.parametrize("init", ["svd", "whitened"])
def test_reparametrisation_reproduces_the_model(arch, init):
    model = BUILDERS[arch](layers=2)
    ids = token_batches(1)[0]
    ref = _logits(model, ids)
    pm, config = _basel(fresh_copy(model), calibrate=init == "whitened", keep_ratio=0.5, init=init)
    assert (_logits(pm, ids) - ref).abs().max() < 1e-4
    layers = pm.base_model.basel_layers()
    assert layers and all(m.base_layer.weight.numel() == 0 for m in layers.values())  # dense dropped
    trainable = {n.rsplit(".", 2)[-2] for n, p in pm.named_parameters() if p.requires_grad}
    assert trainable == {"basel_w", "basel_A_add", "basel_B_add"}  # the SVD bases are frozen
    assert config.initial_fraction == pytest.approx(pm.base_model.kept_fraction())


# ---- the schedule -----------------------------------------------------------------------------------
@pytest.mark.parametrize("total", [2, 7, 23])
def test_schedule_reaches_keep_ratio_exactly_whatever_the_number_of_steps(total):
    model = tiny_llama(layers=2)
    pm, config = _basel(model, keep_ratio=0.4, pruning_steps=50, warmup_ratio=0.0, prune_end_ratio=0.5)
    tuner = pm.base_model
    dense = tuner.dense_parameters()
    _train(pm, total)
    assert config.phase == "factorized"
    kept = tuner.kept_parameters()
    assert kept <= 0.4 * dense and 0.4 * dense - kept < _max_rank_step(tuner)
    fractions = [h["kept_fraction"] for h in tuner.history]
    assert fractions == sorted(fractions, reverse=True)  # monotone: ranks only go down
    assert tuner.history[-1]["step"] == BaselSchedule.from_config(config, total).end


def test_uniform_allocation_gives_every_module_its_share():
    model = tiny_llama(layers=2)
    pm, config = _basel(model, keep_ratio=0.4, pruning_steps=5, rank_allocation="uniform")
    tuner = pm.base_model
    _train(pm, 6)
    dense = tuner.dense_parameters()
    assert tuner.kept_parameters() <= 0.4 * dense and 0.4 * dense - tuner.kept_parameters() < _max_rank_step(tuner)
    for m in tuner.basel_layers().values():
        cost, share = m.in_features + m.out_features, 0.4 * m.in_features * m.out_features
        assert share - cost < m.rank("default") * cost <= share + cost
    with pytest.raises(ValueError, match="rank_allocation must be one of"):
        BaselConfig(rank_allocation="loss")


def test_schedule_events_are_spread_between_warmup_and_end():
    config = BaselConfig(warmup_ratio=0.1, prune_end_ratio=0.7, pruning_steps=5)
    s = BaselSchedule.from_config(config, 100)
    assert (s.warm, s.end) == (10, 70)
    assert [s.events_done(t) for t in (0, 10, 22, 34, 69, 70, 100)] == [0, 0, 1, 2, 4, 5, 5]
    f = [BaselSchedule.target_fraction(i, 5, 2.0, 0.5) for i in range(6)]
    assert f[0] == 2.0 and f[-1] == 0.5 and all(a > b for a, b in zip(f, f[1:]))


def test_pruned_bases_are_removed_from_parameters_and_optimizer_state():
    model = tiny_llama(layers=2)
    pm, _ = _basel(model, keep_ratio=0.5)
    tuner = pm.base_model
    _, opt = _train(pm, 2, call_step=False)
    before = count_parameters(pm)
    ranks0 = tuner.ranks()
    tuner.prune_to(int(0.7 * tuner.dense_parameters()), optimizer=opt)
    ranks1 = tuner.ranks()
    # every removed basis frees one row of A, one column of B and one w: exactly d_in + d_out + 1 parameters
    freed = sum((ranks0[n] - ranks1[n]) * (m.in_features + m.out_features + 1) for n, m in tuner.basel_layers().items())
    assert freed > 0 and count_parameters(pm) == before - freed
    layer = max(tuner.basel_layers().values(), key=lambda m: ranks0 and m.rank("default") < 64)
    r1 = layer.rank("default")
    assert layer.basel_A["default"].shape[0] == layer.basel_B["default"].shape[1] == layer.basel_w["default"].numel() == r1
    w = layer.basel_w["default"]
    assert any(p is w for g in opt.param_groups for p in g["params"])  # the optimizer trains the shrunk tensor
    assert opt.state[w]["exp_avg"].shape == w.shape
    losses, _ = _train(pm, 2, call_step=False, opt=opt)
    assert all(math.isfinite(x) for x in losses)


# ---- save / reload / decompress ---------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_saved_adapter_holds_only_final_factors_and_reloads_identically(arch, tmp_path):
    base = BUILDERS[arch](layers=2)
    pm, config = _basel(fresh_copy(base), keep_ratio=0.5, pruning_steps=4)
    _train(pm, 6)
    tuner = pm.base_model
    ranks = tuner.ranks()
    for m in tuner.basel_layers().values():  # each direction's norm split evenly: one lr trains both (part 2)
        A, B = m.basel_A["default"], m.basel_B["default"]
        assert torch.allclose(A.norm(dim=1), B.norm(dim=0), rtol=1e-4)
    pm.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["phase"] == "factorized" and saved["rank_pattern"] == ranks
    tensors = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert all(".basel_A" in k or ".basel_B" in k for k in tensors)
    assert sum(t.numel() for t in tensors.values()) == tuner.kept_parameters() <= 0.5 * tuner.dense_parameters()
    ids = token_batches(1, seed=5)[0]
    ref = _logits(pm, ids)
    for low_mem in (False, True):
        reloaded = PeftModel.from_pretrained(fresh_copy(base), tmp_path, low_cpu_mem_usage=low_mem)
        assert torch.equal(_logits(reloaded, ids), ref)
    dense = reloaded.merge_and_unload()  # decompress
    assert not any(isinstance(m, BaselLayer) for m in dense.modules())
    assert count_parameters(dense) == count_parameters(base)
    assert (_logits(dense, ids) - ref).abs().max() < 1e-5


def test_training_checkpoint_reloads_and_resumes_the_schedule(tmp_path):
    base = tiny_llama(layers=2)
    pm, config = _basel(fresh_copy(base), keep_ratio=0.5, pruning_steps=4, warmup_ratio=0.0, prune_end_ratio=0.8)
    _, opt = _train(pm, 4, total=10)  # mid-schedule
    assert config.phase == "train"
    pm.save_pretrained(tmp_path)
    ids = token_batches(1, seed=5)[0]
    reloaded = PeftModel.from_pretrained(fresh_copy(base), tmp_path, is_trainable=True)
    assert torch.equal(_logits(reloaded, ids), _logits(pm, ids))
    assert reloaded.base_model.ranks() == pm.base_model.ranks()
    _train(reloaded, 6, start=5, total=10)
    tuner = reloaded.base_model
    assert tuner.peft_config["default"].phase == "factorized"
    assert tuner.kept_parameters() <= 0.5 * tuner.dense_parameters()
    assert 0.5 * tuner.dense_parameters() - tuner.kept_parameters() < _max_rank_step(tuner)


def test_factorised_model_fine_tunes_further_and_saves_again(tmp_path):
    base = tiny_llama(layers=2)
    pm, _ = _basel(fresh_copy(base), keep_ratio=0.5, pruning_steps=3)
    _train(pm, 4)
    pm.save_pretrained(tmp_path / "a")
    part2 = PeftModel.from_pretrained(fresh_copy(base), tmp_path / "a", is_trainable=True)
    trainable = {n.rsplit(".", 2)[-2] for n, p in part2.named_parameters() if p.requires_grad}
    assert trainable == {"basel_A", "basel_B"}
    n_trainable = sum(p.numel() for p in part2.parameters() if p.requires_grad)
    assert n_trainable == part2.base_model.kept_parameters()
    ids = token_batches(1, seed=5)[0]
    before = _logits(part2, ids)
    losses, _ = _train(part2, 3, call_step=False)
    after = _logits(part2, ids)
    assert not torch.equal(before, after) and all(math.isfinite(x) for x in losses)
    part2.save_pretrained(tmp_path / "b")
    again = PeftModel.from_pretrained(fresh_copy(base), tmp_path / "b")
    assert torch.equal(_logits(again, ids), after)


def test_trainer_with_callback_prunes_and_factorises(tmp_path):
    from torch.utils.data import Dataset
    from transformers import Trainer, TrainingArguments

    class Blocks(Dataset):
        def __init__(self):
            self.ids = torch.cat(token_batches(4, batch=4, seq=32, seed=3))

        def __len__(self):
            return len(self.ids)

        def __getitem__(self, i):
            return {"input_ids": self.ids[i], "labels": self.ids[i]}

    base = tiny_llama(layers=2)
    pm, config = _basel(fresh_copy(base), keep_ratio=0.6, pruning_steps=10)
    args = TrainingArguments(output_dir=str(tmp_path / "run"), max_steps=9, per_device_train_batch_size=4,
                             learning_rate=1e-3, report_to=[], save_strategy="no", logging_strategy="no",
                             disable_tqdm=True, use_cpu=True)
    trainer = Trainer(model=pm, args=args, train_dataset=Blocks(), callbacks=[BaselCallback(config)])
    trainer.train()
    tuner = pm.base_model
    assert config.phase == "factorized"
    assert tuner.kept_parameters() <= 0.6 * tuner.dense_parameters()
    assert 0.6 * tuner.dense_parameters() - tuner.kept_parameters() < _max_rank_step(tuner)
    assert len(tuner.history) >= 2
    pm.save_pretrained(tmp_path / "out")
    ids = token_batches(1, seed=5)[0]
    reloaded = PeftModel.from_pretrained(fresh_copy(base), tmp_path / "out")
    assert torch.equal(_logits(reloaded, ids), _logits(pm, ids))


def test_trainer_callback_refuses_a_schedule_longer_than_training(tmp_path):
    from transformers import Trainer, TrainingArguments

    pm, config = _basel(tiny_llama(layers=1), keep_ratio=0.5, prune_end_step=50)
    data = [{"input_ids": t, "labels": t} for t in token_batches(1, batch=8, seq=16)[0]]
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=5, per_device_train_batch_size=2, report_to=[],
                             save_strategy="no", disable_tqdm=True, use_cpu=True)
    trainer = Trainer(model=pm, args=args, train_dataset=data, callbacks=[BaselCallback(config)])
    with pytest.raises(ValueError, match="longer than training"):
        trainer.train()


# ---- 8-bit ------------------------------------------------------------------------------------------
def test_8bit_factors_are_smaller_and_close():
    import io

    base = tiny_llama(layers=2)
    pm, _ = _basel(fresh_copy(base), keep_ratio=0.5, pruning_steps=2)
    _train(pm, 3)
    ids = token_batches(1, seed=5)[0]
    ref = _logits(pm, ids)
    fp = export_factorized(pm)
    assert torch.equal(_logits(fp, ids), ref)
    q = quantize_factors_8bit(fp)

    def factor_bytes(model):
        buf = io.BytesIO()
        torch.save({k: v for k, v in model.state_dict().items() if ".layers." in k and "norm" not in k}, buf)
        return buf.getbuffer().nbytes

    assert factor_bytes(q) < 0.45 * factor_bytes(fp)
    out = _logits(q, ids)
    rel = (out - ref).norm() / ref.norm()
    assert rel < 0.05
    with pytest.raises(ValueError, match="export_factorized"):
        quantize_factors_8bit(tiny_llama(layers=1))


# ---- the real model ---------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.real_model
def test_real_smollm2_two_layers_prunes_to_keep_ratio():
    from peft_basis.data import load_default_model, load_text, token_blocks

    torch.manual_seed(0)
    model, tok = load_default_model(num_hidden_layers=2)
    blocks = token_blocks(tok, load_text("pydoc")[:60_000], 64, num_blocks=12)
    config = BaselConfig(keep_ratio=0.5, extra_rank=8, pruning_steps=4)
    peft_basis.calibrate(model, config, [blocks[i : i + 4] for i in range(0, 8, 4)], progress=False)
    ref = _logits(model, blocks[8:10])
    with torch.no_grad():
        dense_loss = model(input_ids=blocks[8:12], labels=blocks[8:12]).loss.item()
    pm = get_peft_model(model, config)
    assert (_logits(pm, blocks[8:10]) - ref).abs().max() < 1e-3
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-4)
    for step in range(1, 5):
        b = blocks[(step % 2) * 4 : (step % 2) * 4 + 4]
        pm(input_ids=b, labels=b).loss.backward()
        opt.step()
        opt.zero_grad()
        pm.base_model.basel_step(step, 4, opt)
    tuner = pm.base_model
    assert config.phase == "factorized"
    assert 0.5 * tuner.dense_parameters() - _max_rank_step(tuner) < tuner.kept_parameters() <= 0.5 * tuner.dense_parameters()
    loss = pm(input_ids=blocks[8:12], labels=blocks[8:12]).loss.item()
    # (a 2-layer cut of the 30-layer model: its dense loss is high, ~18; halving its weights costs ~1.3 nats)
    assert math.isfinite(loss) and loss < dense_loss + 2.0


# ---- init="anchored": the anchored factorisation as the start, distillation as the loss -------------------
def _anchored_basel(model, data=None, **kw):
    kw.setdefault("extra_rank", 4)
    kw.setdefault("anchored_fit", {"anchor": 0.25})
    config = BaselConfig(init="anchored", **kw)
    peft_basis.calibrate(model, config, data or token_batches(6), progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return get_peft_model(model, config), config


@pytest.mark.parametrize("fit", [{}, {"rank_allocation": "loss", "output_weights": "fisher"}])
def test_anchored_init_starts_exactly_at_the_anchored_model(fit):
    from peft_basis import SharedBasisConfig

    base = tiny_llama(layers=3)
    ids = token_batches(1, seed=9)[0]
    pm, config = _anchored_basel(fresh_copy(base), keep_ratio=0.4, initial_keep=0.7, layers_to_transform=[1, 2],
                                 anchored_fit={"anchor": 0.25, **fit})
    # the same fit by Basis Sharing, calibrated on its own (with fit's options: the same Fisher pass first; every
    # module factorised, as Basel reparametrises them all)
    sb_config = SharedBasisConfig(compression_ratio=0.3, group_size=1, inputs="anchored", anchor=0.25,
                                  layers_to_transform=[1, 2], dense_at_break_even=False, **fit)
    sb_model = fresh_copy(base)
    peft_basis.calibrate(sb_model, sb_config, token_batches(6), progress=False)
    sb = get_peft_model(sb_model, sb_config)
    anchored, basel, dense = _logits(sb, ids), _logits(pm, ids), _logits(base, ids)
    assert (basel - anchored).abs().max() < 1e-4 < (basel - dense).abs().max()
    tuner = pm.base_model
    assert tuner.ranks() == {n: r for n, r in sb_config.rank_pattern.items()}
    assert config.initial_fraction == pytest.approx(sb.base_model.stored_parameters() / tuner.dense_parameters())
    assert {n.rsplit(".", 2)[-2] for n, p in pm.named_parameters() if p.requires_grad} == {
        "basel_w", "basel_A_add", "basel_B_add"}
    # w^2 is each basis' output share in the anchored model: B orthonormal, A orthonormal in the covariance of the
    # module's inputs there
    stats = config.calibration_statistics
    name, layer = next(iter(tuner.basel_layers().items()))
    A, B = layer.basel_A["default"].double(), layer.basel_B["default"].double()
    eye = torch.eye(A.shape[0], dtype=torch.float64)
    assert torch.allclose(B.T @ B, eye, atol=1e-5)
    gram = stats.covariance(name).double()
    white = A @ (gram + 1e-6 * gram.diagonal().mean() * torch.eye(gram.shape[0], dtype=torch.float64)) @ A.T
    assert torch.allclose(white, eye, atol=1e-3)
    w2 = layer.basel_w["default"].double() ** 2
    assert torch.all(w2[:-1] >= w2[1:])


def test_anchored_init_default_starts_at_one_and_a_half_times_the_keep_ratio():
    pm, config = _anchored_basel(tiny_llama(layers=2), keep_ratio=0.4)
    assert config.starting_keep() == pytest.approx(0.6)
    assert 0.55 < config.initial_fraction <= 0.6
    assert BaselConfig(keep_ratio=0.7, init="anchored").starting_keep() == pytest.approx(0.85)  # below 1: a fit
    pm, config = _anchored_basel(tiny_llama(layers=2), keep_ratio=0.8)  # crashed with a start of 1.0 before
    assert config.starting_keep() == pytest.approx(0.9)
    with pytest.raises(ValueError, match=r"initial_keep.*\[0.8, 1\)"):
        BaselConfig(keep_ratio=0.8, init="anchored", initial_keep=1.0)


def _distil(pm, teacher, tmp_path, steps, callbacks, lr=1e-3):
    from peft_basis.healing import DistillationTrainer
    from transformers import TrainingArguments

    examples = [{"input_ids": t} for t in torch.cat(token_batches(4, batch=4, seq=32, seed=3))]
    args = TrainingArguments(output_dir=str(tmp_path / "run"), max_steps=steps, per_device_train_batch_size=4,
                             learning_rate=lr, report_to=[], save_strategy="no", logging_strategy="no",
                             disable_tqdm=True, use_cpu=True, remove_unused_columns=False, label_names=[])
    trainer = DistillationTrainer(model=pm, teacher=teacher, args=args, train_dataset=examples, callbacks=callbacks)
    trainer.train()
    return trainer


@pytest.mark.parametrize("init", ["anchored", "whitened"])
def test_distillation_trainer_hosts_the_callback_prunes_and_factorises(init, tmp_path):
    base = tiny_llama(layers=2)
    if init == "anchored":
        pm, config = _anchored_basel(fresh_copy(base), keep_ratio=0.4, pruning_steps=6)
    else:
        pm, config = _basel(fresh_copy(base), keep_ratio=0.4, pruning_steps=6, init="whitened")
    tuner = pm.base_model
    start = tuner.kept_fraction()
    ids = token_batches(1, seed=5)[0]
    trainer = _distil(pm, fresh_copy(base), tmp_path, 6, [BaselCallback(config)])
    assert trainer.tokens_seen == 6 * 4 * 32 and not trainer.diverged
    assert config.phase == "factorized"
    assert len(tuner.history) >= 2 and tuner.history[0]["kept_fraction"] < start
    assert 0.4 * tuner.dense_parameters() - _max_rank_step(tuner) < tuner.kept_parameters() <= 0.4 * tuner.dense_parameters()
    assert 0 < _kl(base, pm, ids) < 1
    pm.save_pretrained(tmp_path / "out")
    saved = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert saved["init"] == init and saved["phase"] == "factorized"
    reloaded = PeftModel.from_pretrained(fresh_copy(base), tmp_path / "out")
    assert torch.equal(_logits(reloaded, ids), _logits(pm, ids))


def _kl(teacher, student, ids):
    with torch.no_grad():
        p = torch.log_softmax(teacher(input_ids=ids).logits, -1)
        q = torch.log_softmax(student(input_ids=ids).logits, -1)
    return float((p.exp() * (p - q)).sum(-1).mean())


def test_anchored_init_refuses_missing_or_wrong_statistics():
    from peft_basis import SharedBasisConfig

    model = tiny_llama(layers=2)
    with pytest.raises(ValueError, match=r"init='anchored'.*no statistics are attached.*peft_basis.calibrate"):
        get_peft_model(fresh_copy(model), BaselConfig(keep_ratio=0.5, init="anchored"))
    grams = BaselConfig(keep_ratio=0.5, init="whitened")
    peft_basis.calibrate(model, grams, token_batches(2), progress=False)
    config = BaselConfig(keep_ratio=0.5, init="anchored")
    config.attach_statistics(grams.calibration_statistics)
    with pytest.raises(ValueError, match="hold Grams but no anchored factors"):
        get_peft_model(fresh_copy(model), config)
    sb = SharedBasisConfig(compression_ratio=0.5, group_size=1, inputs="anchored", anchor=0.25)
    peft_basis.calibrate(model, sb, token_batches(6), progress=False)
    config = BaselConfig(keep_ratio=0.5, init="anchored")
    config.attach_statistics(sb.calibration_statistics)
    with pytest.raises(ValueError, match="without the Grams of the anchored model's inputs"):
        get_peft_model(fresh_copy(model), config)


def test_anchored_settings_are_checked():
    with pytest.raises(ValueError, match=r"initial_keep .* must be in \[keep_ratio, 1\)"):
        BaselConfig(keep_ratio=0.5, init="anchored", initial_keep=0.4)
    with pytest.raises(ValueError, match=r"initial_keep .* must be in \[keep_ratio, 1\)"):
        BaselConfig(keep_ratio=0.5, init="anchored", initial_keep=1.2)
    with pytest.raises(ValueError, match="anchored_fit takes"):
        BaselConfig(init="anchored", anchored_fit={"ancor": 0.5})
    with pytest.raises(ValueError, match="configure init='anchored'"):
        BaselConfig(init="whitened", initial_keep=0.8)
