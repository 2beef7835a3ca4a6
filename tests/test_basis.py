"""BASIS: calibration-aware bases, streamed Fisher scores, global allocation, in-subspace training,
merge/unmerge/disable, several adapters, save/reload, Trainer with checkpointing and resume, errors."""

import math
import os
import warnings

import pytest
import torch
from peft import PeftModel, get_peft_model
from transformers.pytorch_utils import Conv1D

import peft_basis
from peft_basis.calibration import CalibrationStatistics
from peft_basis.calibration.fisher import fisher_key
from peft_basis.calibration.pipelines.whole_model import collect_fisher
from peft_basis.errors import CalibrationError
from peft_basis.modules import in_out_features, linear_weight
from peft_basis.tuners.basis import BasisConfig, BasisLayer, basis_allocation, module_bases

from .models import BUILDERS, fresh_copy, tiny_gpt2, tiny_llama, token_batches

IDS = torch.randint(0, 128, (2, 20), generator=torch.Generator().manual_seed(3))


def _basis(model, calibrate=True, data=None, **kw):
    config = BasisConfig(**kw)
    if calibrate:
        peft_basis.calibrate(model, config, data if data is not None else token_batches(2), progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return get_peft_model(model, config), config


def _logits(model, ids=IDS):
    with torch.no_grad():
        return model(input_ids=ids).logits


def _train(pm, steps=3, lr=1e-2, seed=3):
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=lr)
    losses = []
    for b in token_batches(steps, seed=seed):
        loss = pm(input_ids=b, labels=b).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


# ---- the bases -----------------------------------------------------------------------------------------
def test_bases_reconstruct_the_weight_and_whiten_the_inputs():
    model = tiny_llama(layers=1)
    config = BasisConfig(r=4)
    stats = peft_basis.calibrate(model, config, token_batches(4), progress=False)
    names = [n for n in stats.sources]
    bases = module_bases(model, names, stats, config.damping, 10_000)
    modules = dict(model.named_modules())
    for n in names:
        b = bases[n]
        w = linear_weight(modules[n]).double()
        recon = (b.U.double() * b.sigma2.sqrt()) @ b.R.double()
        assert (recon - w).abs().max() < 1e-4 * w.abs().max(), n
        eye = torch.eye(b.U.shape[1], dtype=torch.float64)
        assert (b.U.double().T @ b.U.double() - eye).abs().max() < 1e-5
        cov = stats.covariance(n).double()
        assert (b.R.double() @ cov @ b.R.double().T - eye).abs().max() < 1e-3  # x R^T is white
        assert torch.all(b.sigma2[:-1] >= b.sigma2[1:])


def test_singular_covariance_does_not_fail():
    model = tiny_llama(layers=1)
    one_token = [torch.full((1, 2), 5)]  # two identical tokens: a rank-1 covariance of a 64-wide input
    config = BasisConfig(r=2)
    peft_basis.calibrate(model, config, one_token, progress=False)
    with pytest.warns(UserWarning, match="span only"):
        pm = get_peft_model(model, config)
    assert torch.equal(_logits(pm), _logits(tiny_llama(layers=1)))


# ---- the Fisher engine ---------------------------------------------------------------------------------
def _explicit_fisher(model, name, U, R, batches):
    """Per-sequence weight gradients by autograd (what the engine must equal without forming them)."""
    module = dict(model.named_modules())[name]
    w = module.weight
    for p in model.parameters():
        p.requires_grad_(False)
    w.requires_grad_(True)
    diag, full, n = 0, 0, 0
    for b in batches:
        for seq in b:
            labels = seq.clone()
            out = model(input_ids=seq[None]).logits[0, :-1]
            loss = torch.nn.functional.cross_entropy(out, labels[1:])
            (g,) = torch.autograd.grad(loss, w)
            g = g.T if isinstance(module, Conv1D) else g  # Conv1D stores d_in x d_out
            proj = U.double().T @ g.double() @ R.double().T
            diag = diag + proj.diagonal() ** 2
            full = full + g.double() ** 2
            n += 1
    w.requires_grad_(False)
    return diag / n, full / n


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_streamed_fisher_equals_per_sequence_autograd(arch):
    model = BUILDERS[arch](layers=2)
    config = BasisConfig(r=4)
    data = token_batches(2, batch=3, seq=12)
    stats = peft_basis.calibrate(model, config, data, progress=False)
    name = sorted(stats.sources)[1]
    b = module_bases(model, [name], stats, config.damping, 6)[name]
    scores = collect_fisher(model, {name: (b.U, b.R)}, data, progress=False)[name]
    full = collect_fisher(model, {name: (None, None)}, data, mode="full", progress=False)[name]
    ref_diag, ref_full = _explicit_fisher(model, name, b.U, b.R, data)
    torch.testing.assert_close(scores.double(), ref_diag, rtol=1e-3, atol=1e-9)
    torch.testing.assert_close(full.double(), ref_full, rtol=1e-3, atol=1e-9)
    assert all(not p.requires_grad for p in model.parameters())  # flags restored (all frozen before)
    assert all(p.grad is None for p in model.parameters())  # no weight gradient was formed


def test_fisher_scores_are_saved_and_loaded_with_the_statistics(tmp_path):
    model = tiny_llama(layers=1)
    config = BasisConfig(r=2, rank_allocation="fisher")
    stats = peft_basis.calibrate(model, config, token_batches(2), progress=False,
                                 save_to=str(tmp_path / "s.safetensors"))
    loaded = CalibrationStatistics.load(str(tmp_path / "s.safetensors"))
    keys = [k for k in stats.extra if k.startswith("fisher_output/")]  # the default trainable="output"'s scores
    assert len(keys) == 7 and all(torch.equal(loaded.extra[k], stats.extra[k]) for k in keys)
    assert all(loaded.extra[k].dim() == 1 for k in keys)  # one score per direction (summed over the column)
    assert loaded.meta["fisher_output_sequences"] == 8
    config2 = BasisConfig(r=2, rank_allocation="fisher")
    peft_basis.use_statistics(config2, str(tmp_path / "s.safetensors"))
    assert basis_allocation(model, config2).ranks == basis_allocation(model, config).ranks


def test_labels_all_masked_is_refused():
    model = tiny_llama(layers=1)
    ids = token_batches(1)[0]
    data = [{"input_ids": ids, "labels": torch.full_like(ids, -100)}]
    with pytest.raises(CalibrationError, match="every label in the calibration data is masked"):
        peft_basis.calibrate(model, BasisConfig(r=2, rank_allocation="fisher"), data, progress=False)


def test_labels_mask_what_the_fisher_scores_see():
    model = tiny_llama(layers=1)
    ids = token_batches(1)[0]
    half = ids.clone()
    half[:, :16] = -100
    a = BasisConfig(r=2, rank_allocation="fisher")
    b = BasisConfig(r=2, rank_allocation="fisher")
    sa = peft_basis.calibrate(model, a, [{"input_ids": ids}], progress=False)
    sb = peft_basis.calibrate(model, b, [{"input_ids": ids, "labels": half}], progress=False)
    k = next(k for k in sa.extra if k.startswith("fisher_output/"))
    assert not torch.allclose(sa.extra[k], sb.extra[k])
    assert sb.meta["fisher_output_tokens"] == 4 * 16


# ---- allocation ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("allocation, trainable", [("eigen", "core"), ("fisher", "core"), ("eigen", "output"),
                                                    ("fisher", "output")])
def test_allocation_respects_the_budget_and_bounds(allocation, trainable):
    model = tiny_llama(layers=2)
    config = BasisConfig(r=6, rank_allocation=allocation, r_min=2, r_max=20, trainable=trainable)
    peft_basis.calibrate(model, config, token_batches(2), progress=False)
    alloc = basis_allocation(model, config)
    modules = dict(model.named_modules())
    d_out = {n: in_out_features(modules[n])[1] for n in alloc.ranks}
    if trainable == "core":
        budget = 14 * 36  # what uniform r=6 costs: 14 modules x 6^2
        assert alloc.spent == sum(r * r for r in alloc.ranks.values()) <= budget
        assert budget - alloc.spent < 2 * 20 + 1  # within one (largest) step
    else:
        budget = 6 * sum(d_out.values())  # uniform r=6: 6 columns of d_out per module
        assert alloc.spent == sum(r * d_out[n] for n, r in alloc.ranks.items()) <= budget
        assert budget - alloc.spent < max(d_out.values())
    assert alloc.budget == budget
    assert all(2 <= r <= 20 for r in alloc.ranks.values())
    assert len(set(alloc.ranks.values())) > 1  # not uniform
    pm = get_peft_model(model, config)
    assert config.rank_pattern == alloc.ranks == pm.base_model.ranks()
    n_trainable = sum(p.numel() for p in pm.parameters() if p.requires_grad)
    assert n_trainable == alloc.spent == pm.base_model.trainable_parameters()
    table = alloc.by_type()
    assert set(table) == {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                          "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"}
    assert all(set(v) == {0, 1} for v in table.values())


def test_explicit_budget_and_diagonal_core():
    model = tiny_llama(layers=2)
    config = BasisConfig(r=4, rank_allocation="eigen", trainable="diagonal", budget=100, r_max=32)
    pm, _ = _basis(model, **{k: getattr(config, k) for k in ("r", "rank_allocation", "trainable", "budget", "r_max")})
    cfg = pm.peft_config["default"]
    assert sum(cfg.rank_pattern.values()) == 100 == sum(p.numel() for p in pm.parameters() if p.requires_grad)
    assert all(m.basis_core["default"].dim() == 1 for m in pm.base_model.basis_layers().values())


@pytest.mark.parametrize("trainable, key", [("core", "fisher"), ("output", "fisher_output")])
def test_fisher_keeps_each_modules_top_fisher_directions(trainable, key):
    model = tiny_llama(layers=1)
    config = BasisConfig(r=3, rank_allocation="fisher", r_max=12, trainable=trainable)
    stats = peft_basis.calibrate(model, config, token_batches(2), progress=False)
    alloc = basis_allocation(model, config)
    for n, idx in alloc.selected.items():
        f = stats.extra[fisher_key(n, key)][:12]
        kept = f[idx]
        if len(idx) < len(f):
            dropped = torch.ones_like(f, dtype=torch.bool)
            dropped[idx] = False
            assert kept.min() >= f[dropped].max()


# ---- errors ----------------------------------------------------------------------------------------------
def test_calibration_without_tokens_is_refused():
    model = tiny_llama(layers=1)
    ids = token_batches(1)[0]
    with pytest.raises(CalibrationError, match="no calibration tokens|no tokens"):
        peft_basis.calibrate(model, BasisConfig(), [{"input_ids": ids, "attention_mask": torch.zeros_like(ids)}],
                             progress=False)
    with pytest.raises(CalibrationError, match="no batches"):
        peft_basis.calibrate(model, BasisConfig(), [], progress=False)


def test_budget_too_small_for_r_min_is_refused():
    model = tiny_llama(layers=1)
    with pytest.raises(ValueError, match=r"cannot give every one of the 7 modules its r_min=3 \(that needs 63\)"):
        _basis(model, r=4, rank_allocation="eigen", r_min=3, budget=50, trainable="core")
    with pytest.raises(ValueError, match="r_min=5 is above r=4"):
        BasisConfig(r=4, rank_allocation="eigen", r_min=5)


def test_rank_above_a_modules_size_is_refused():
    model = tiny_llama(layers=1)  # k_proj/v_proj are 64 -> 32: at most rank 32
    with pytest.raises(ValueError, match=r"r=40 is above the size of model.layers.0.self_attn.k_proj .*at most rank 32"):
        _basis(model, r=40)
    config = BasisConfig(rank_pattern={"model.layers.0.self_attn.k_proj": 33})
    with pytest.raises(ValueError, match="rank 33, above its size"):
        get_peft_model(tiny_llama(layers=1), config)


def test_fisher_without_backward_statistics_says_how_to_get_them(tmp_path):
    model = tiny_llama(layers=1)
    stats = peft_basis.calibrate(model, BasisConfig(r=2), token_batches(1), progress=False)  # uniform: no Fisher
    config = BasisConfig(r=2, rank_allocation="fisher")
    peft_basis.use_statistics(config, stats)
    with pytest.raises(CalibrationError, match="needs Fisher scores"):
        get_peft_model(model, config)
    with pytest.raises(CalibrationError, match="needs Fisher scores"):
        get_peft_model(tiny_llama(layers=1), BasisConfig(r=2, rank_allocation="fisher"))


@pytest.mark.parametrize("kw, match", [
    ({"r": 0}, "r must be"), ({"rank_allocation": "pca"}, "rank_allocation must be"),
    ({"trainable": "full"}, "trainable must be"), ({"r_min": -1}, "r_min must be"), ({"r_max": 0}, "r_max must be"), ({"alpha": 0}, "alpha must be"),
])
def test_bad_settings_are_refused(kw, match):
    with pytest.raises(ValueError, match=match):
        BasisConfig(**kw)


# ---- in-subspace training, merge, disable -----------------------------------------------------------------
@pytest.mark.parametrize("arch, trainable", [(a, "output") for a in sorted(BUILDERS)] + [("llama", "input"),
                                                                                        ("llama", "core")])
def test_starts_exact_trains_inside_the_subspace_and_merges(arch, trainable):
    base = BUILDERS[arch](layers=2)
    pm, config = _basis(fresh_copy(base), r=3, rank_allocation="eigen", trainable=trainable)
    ref = _logits(base)
    assert torch.equal(_logits(pm), ref)  # zero core: exactly the base model
    before = {n: m.base_layer.weight.detach().clone() for n, m in pm.base_model.basis_layers().items()}
    losses = _train(pm, steps=4)
    assert all(math.isfinite(x) for x in losses)
    tuned = _logits(pm)
    assert not torch.allclose(tuned, ref)
    for n, m in pm.base_model.basis_layers().items():
        assert torch.equal(m.base_layer.weight, before[n])  # base weight untouched
        delta = m.delta_weight("default").double()
        scale = delta.abs().max().clamp_min(1e-12)
        assert ("default" in m.basis_U) == (trainable != "output") and ("default" in m.basis_R) == (trainable != "input")
        assert m.basis_scaling["default"] == (16 / m.rank("default") if trainable in ("output", "input") else 1.0)
        if trainable != "output":  # columns of Delta W inside span(U)
            U = m.basis_U["default"].double()
            assert (delta - U @ (U.T @ delta)).abs().max() < 1e-5 * scale
        if trainable != "input":  # rows of Delta W inside span(R)
            R = m.basis_R["default"].double()
            assert (delta - delta @ (R.T @ torch.linalg.solve(R @ R.T, R))).abs().max() < 1e-5 * scale
    with pm.disable_adapter():
        assert torch.allclose(_logits(pm), ref, atol=1e-6)
    pm.base_model.merge_adapter()
    assert (_logits(pm) - tuned).abs().max() < 1e-4
    pm.base_model.unmerge_adapter()
    assert (_logits(pm) - tuned).abs().max() < 1e-4
    for n, m in pm.base_model.basis_layers().items():
        assert (m.base_layer.weight - before[n]).abs().max() < 1e-6
    merged = pm.merge_and_unload()
    assert not any(isinstance(m, BasisLayer) for m in merged.modules())
    assert (_logits(merged) - tuned).abs().max() < 1e-4
    assert sum(p.numel() for p in merged.parameters()) == sum(p.numel() for p in base.parameters())


@pytest.mark.parametrize("trainable", ["output", "input", "core", "diagonal"])
def test_trainable_parameters_are_exactly_the_cores(trainable):
    pm, config = _basis(tiny_llama(layers=2), r=5, trainable=trainable)
    trainable_params = {n: p for n, p in pm.named_parameters() if p.requires_grad}
    assert all(".basis_core." in n for n in trainable_params)
    shapes = [in_out_features(m.base_layer) for m in pm.base_model.basis_layers().values()]
    expected = sum({"output": 5 * d_out, "input": 5 * d_in, "core": 25, "diagonal": 5}[trainable]
                   for d_in, d_out in shapes)
    assert sum(p.numel() for p in trainable_params.values()) == expected == pm.base_model.trainable_parameters()
    frozen = sum({"output": 5 * d_in, "input": 5 * d_out}.get(trainable, 5 * (d_in + d_out)) for d_in, d_out in shapes)
    assert pm.base_model.stored_parameters() == expected + frozen


def test_several_adapters_switch_with_set_adapter(tmp_path):
    base = tiny_llama(layers=2)
    pm, _ = _basis(fresh_copy(base), r=3)
    _train(pm, steps=2)
    out_a = _logits(pm)
    config_b = BasisConfig(r=2, rank_allocation="eigen", target_modules=["q_proj", "v_proj"])
    peft_basis.calibrate(fresh_copy(base), config_b, token_batches(2, seed=9), progress=False)
    pm.add_adapter("other", config_b)
    pm.set_adapter("other")
    assert torch.equal(_logits(pm), _logits(base))  # b starts at zero
    assert {n.split(".basis_core.")[-1].split(".")[0] for n, p in pm.named_parameters() if p.requires_grad} == {"other"}
    _train(pm, steps=2, seed=11)
    out_b = _logits(pm)
    assert not torch.allclose(out_a, out_b)
    pm.set_adapter("default")
    assert torch.equal(_logits(pm), out_a)
    pm.save_pretrained(tmp_path)
    reloaded = PeftModel.from_pretrained(fresh_copy(base), tmp_path)
    reloaded.load_adapter(tmp_path / "other", adapter_name="other")
    assert torch.equal(_logits(reloaded), out_a)
    reloaded.set_adapter("other")
    assert torch.equal(_logits(reloaded), out_b)


# ---- save / reload -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("allocation, low_mem, trainable", [("uniform", True, "output"), ("eigen", False, "output"),
                                                            ("fisher", True, "output"), ("eigen", True, "input"),
                                                            ("fisher", False, "core")])
def test_reload_without_data_gives_identical_logits(allocation, low_mem, trainable, tmp_path):
    base = tiny_llama(layers=2)
    pm, config = _basis(fresh_copy(base), r=3, rank_allocation=allocation, trainable=trainable)
    _train(pm, steps=2)
    pm.save_pretrained(tmp_path)
    reloaded = PeftModel.from_pretrained(fresh_copy(base), tmp_path, low_cpu_mem_usage=low_mem)
    assert torch.equal(_logits(reloaded), _logits(pm))
    assert reloaded.base_model.ranks() == pm.base_model.ranks()
    assert reloaded.peft_config["default"].rank_pattern == config.rank_pattern


def test_gpt2_conv1d_merges_saves_and_reloads(tmp_path):
    base = tiny_gpt2(layers=2)
    pm, _ = _basis(fresh_copy(base), r=3, rank_allocation="fisher")
    _train(pm, steps=2)
    tuned = _logits(pm)
    pm.save_pretrained(tmp_path)
    reloaded = PeftModel.from_pretrained(fresh_copy(base), tmp_path)
    assert torch.equal(_logits(reloaded), tuned)
    assert (_logits(reloaded.merge_and_unload()) - tuned).abs().max() < 1e-4


def test_statistics_from_calibrate_sequential_build_the_same_adapter(tmp_path):
    from peft_basis.calibration import calibrate_sequential

    base = tiny_llama(layers=2)
    base.save_pretrained(tmp_path / "ckpt")
    whole = BasisConfig(r=3, rank_allocation="eigen")
    peft_basis.calibrate(fresh_copy(base), whole, token_batches(2), progress=False)
    seq = BasisConfig(r=3, rank_allocation="eigen")
    seq_stats = calibrate_sequential(str(tmp_path / "ckpt"), seq, token_batches(2), progress=False)
    a, b = get_peft_model(fresh_copy(base), whole), get_peft_model(fresh_copy(base), seq)
    assert whole.rank_pattern == seq.rank_pattern
    for (n, la), lb in zip(a.base_model.basis_layers().items(), b.base_model.basis_layers().values()):
        assert (la.basis_R["default"] - lb.basis_R["default"]).abs().max() < 1e-3 * la.basis_R["default"].abs().max()
    # Fisher needs backward passes: added to the sequential statistics by `calibrate` on the whole model
    fisher = BasisConfig(r=3, rank_allocation="fisher")
    peft_basis.use_statistics(fisher, seq_stats)
    with pytest.raises(CalibrationError, match="calibrate_sequential"):
        basis_allocation(base, fisher)
    peft_basis.calibrate(fresh_copy(base), fisher, token_batches(2), statistics=seq_stats, progress=False)
    assert any(k.startswith("fisher_output/") for k in seq_stats.extra)
    get_peft_model(fresh_copy(base), fisher)


# ---- Trainer ----------------------------------------------------------------------------------------------
def test_trainer_with_gradient_checkpointing_checkpoints_and_resumes(tmp_path):
    from transformers import Trainer, TrainingArguments

    data = [{"input_ids": t, "labels": t} for t in torch.cat(token_batches(4, batch=4, seq=32, seed=3))]
    base = tiny_llama(layers=2)

    def run(max_steps, resume=None, out="run"):
        pm, _ = _basis(fresh_copy(base), r=4, rank_allocation="fisher")
        args = TrainingArguments(output_dir=str(tmp_path / out), max_steps=max_steps, per_device_train_batch_size=4,
                                 learning_rate=1e-2, report_to=[], save_strategy="steps", save_steps=2,
                                 logging_strategy="no", disable_tqdm=True, use_cpu=True, gradient_checkpointing=True,
                                 seed=0, data_seed=0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer = Trainer(model=pm, args=args, train_dataset=data)
            trainer.train(resume_from_checkpoint=resume)
        return pm

    full = run(4, out="full")
    assert os.path.exists(tmp_path / "full" / "checkpoint-2" / "adapter_model.safetensors")
    resumed = run(4, resume=str(tmp_path / "full" / "checkpoint-2"), out="resumed")
    assert (_logits(resumed) - _logits(full)).abs().max() < 1e-5
    assert not torch.allclose(_logits(full), _logits(base))


# ---- the real model ---------------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.real_model
def test_real_smollm2_two_layers_fisher_basis_trains():
    from peft_basis.data import load_default_model, load_text, token_blocks

    torch.manual_seed(0)
    model, tok = load_default_model(num_hidden_layers=2)
    calib = token_blocks(tok, load_text("pydoc")[:40_000], 64, num_blocks=8)
    train = token_blocks(tok, load_text("hamlet")[:60_000], 64, num_blocks=12)
    config = BasisConfig(r=8, rank_allocation="fisher")
    peft_basis.calibrate(model, config, [calib[i : i + 4] for i in range(0, 8, 4)], progress=False)
    ref = _logits(model, train[8:10])
    pm = get_peft_model(model, config)
    assert torch.equal(_logits(pm, train[8:10]), ref)
    d_outs = [in_out_features(m.base_layer)[1] for m in pm.base_model.basis_layers().values()]
    assert sum(p.numel() for p in pm.parameters() if p.requires_grad) <= 8 * sum(d_outs)  # uniform r=8's cost
    with torch.no_grad():
        before = pm(input_ids=train[8:12], labels=train[8:12]).loss.item()
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=3e-3)
    for step in range(6):
        b = train[(step % 2) * 4 : (step % 2) * 4 + 4]
        pm(input_ids=b, labels=b).loss.backward()
        opt.step()
        opt.zero_grad()
    with torch.no_grad():
        after = pm(input_ids=train[8:12], labels=train[8:12]).loss.item()
    assert after < before
