"""Basis Sharing fitted to the dense model (inputs="anchored"): the closed form, the layer pipeline's two
streams, block refinement, and loss-aware ranks."""

import copy
import warnings

import pytest
import torch
from peft import PeftModel, get_peft_model
from transformers import AutoModelForCausalLM

import peft_basis
from peft_basis import SharedBasisConfig
from peft_basis.linalg import anchored_error, anchored_factorize, anchored_target, factorize_group

from .models import tiny_gpt2, tiny_llama, token_batches

IDS = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(7))


def _inputs(n=400, d=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64) @ (torch.randn(d, d, generator=g, dtype=torch.float64)
                                                             * torch.logspace(0, -1, d, dtype=torch.float64))
    xs = x + 0.3 * torch.randn(n, d, generator=g, dtype=torch.float64)  # the compressed model's inputs: shifted
    return x, xs


# ---- the closed form --------------------------------------------------------------------------------
def test_full_rank_anchored_fit_is_the_least_squares_solution():
    x, xs = _inputs()
    w = torch.randn(16, 24, dtype=torch.float64)
    for b in (0.0, 0.25, 1.0):
        xb = b * x + (1 - b) * xs
        lstsq = torch.linalg.lstsq(xs, xb @ w.T).solution.T  # min ||Xs W'^T - X_b W^T||
        fitted = anchored_target(w, xs.T @ xs, x.T @ xs, b, damping=1e-12)
        torch.testing.assert_close(fitted, lstsq, atol=1e-6, rtol=1e-6)
    assert torch.equal(anchored_target(w, xs.T @ xs, x.T @ xs, 0.0), w)  # b = 0: the dense weights


def test_rank_k_anchored_fit_beats_every_other_rank_k_weight_on_its_objective():
    x, xs = _inputs()
    w = torch.randn(16, 24, dtype=torch.float64)
    b, k = 0.5, 6
    xb = b * x + (1 - b) * xs
    f = anchored_factorize([w], [xs.T @ xs], [x.T @ xs], k, b, damping=1e-12)
    best = ((xs @ (f.coefficients[0].double() @ f.basis.double()).T - xb @ w.T) ** 2).sum()
    g = torch.Generator().manual_seed(1)
    # truncating W* plainly, or other rank-k weights near the optimum, all do worse
    others = [factorize_group([anchored_target(w, xs.T @ xs, x.T @ xs, b)], None, k)]
    for _ in range(20):
        noise = 1e-2 * torch.randn(16, k, generator=g, dtype=torch.float64)
        others.append((f.coefficients[0].double() + noise, f.basis.double()))
    for o in others:
        approx = o.coefficients[0].double() @ o.basis.double() if hasattr(o, "basis") else o[0] @ o[1]
        assert ((xs @ approx.T - xb @ w.T) ** 2).sum() >= best - 1e-9
    # and its error against the dense outputs is what anchored_error computes from the statistics alone
    approx = f.coefficients[0].double() @ f.basis.double()
    direct = ((x @ w.T - xs @ approx.T) ** 2).sum() / ((x @ w.T) ** 2).sum()
    stat = anchored_error(w, f.coefficients[0], f.basis, x.T @ x, x.T @ xs, xs.T @ xs)
    assert abs(stat - float(direct)) < 1e-9


def test_shared_basis_generalisation_refits_each_member_exactly():
    (x1, xs1), (x2, xs2) = _inputs(seed=0), _inputs(seed=3)
    w1, w2 = torch.randn(16, 24, dtype=torch.float64), torch.randn(16, 24, dtype=torch.float64)
    b, k = 0.25, 8
    f = anchored_factorize([w1, w2], [xs1.T @ xs1, xs2.T @ xs2], [x1.T @ xs1, x2.T @ xs2], k, b, damping=1e-12)

    def objective(c1, c2, basis):
        total = 0.0
        for w, x, xs, c in ((w1, x1, xs1, c1), (w2, x2, xs2, c2)):
            total += float(((xs @ (c @ basis).T - (b * x + (1 - b) * xs) @ w.T) ** 2).sum())
        return total

    basis = f.basis.double()
    refit = objective(f.coefficients[0].double(), f.coefficients[1].double(), basis)
    # the coefficients that came with the stacked factorisation (the "natural first candidate") are worse
    stacked = factorize_group([anchored_target(w, xs.T @ xs, x.T @ xs, b) for w, x, xs in ((w1, x1, xs1), (w2, x2, xs2))],
                              xs1.T @ xs1 + xs2.T @ xs2, k)
    assert refit <= objective(stacked.coefficients[0].double(), stacked.coefficients[1].double(),
                              stacked.basis.double()) + 1e-9
    # and each member's coefficient is its own least-squares optimum for the shared basis
    for c, w, x, xs in ((f.coefficients[0], w1, x1, xs1), (f.coefficients[1], w2, x2, xs2)):
        z = xs @ basis.T
        best = torch.linalg.lstsq(z, (b * x + (1 - b) * xs) @ w.T).solution.T
        torch.testing.assert_close(c.double(), best, atol=1e-4, rtol=1e-4)


# ---- through the pipeline ------------------------------------------------------------------------------
def _anchored(**kw):
    return SharedBasisConfig(compression_ratio=0.3, group_size=1, inputs="anchored", **kw)


@pytest.mark.parametrize("build", [tiny_llama, tiny_gpt2])
def test_in_memory_and_layer_by_layer_give_the_same_adapter(build, tmp_path):
    data = token_batches(4)
    model = build(layers=3)
    model.save_pretrained(tmp_path / "base", max_shard_size="60KB")
    config = _anchored(refine_epochs=2, refine_lr=1e-3)
    stats = peft_basis.calibrate(model, config, data, progress=False)
    assert stats.meta["factors"]["refinement"]  # every layer was refined (or kept its closed form, recorded)
    peft_model = get_peft_model(model, config)
    report = peft_basis.compress_sequential(str(tmp_path / "base"), _anchored(refine_epochs=2, refine_lr=1e-3), data,
                                            str(tmp_path / "seq"), progress=False)
    assert {r["group"] for r in report} == {r["group"] for r in peft_model.base_model.compression_report}
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tmp_path / "base"), tmp_path / "seq")
    peft_model.save_pretrained(tmp_path / "mem")
    reloaded = PeftModel.from_pretrained(build(layers=3), tmp_path / "mem")
    with torch.no_grad():
        ref = peft_model(IDS).logits
        assert torch.equal(loaded(IDS).logits, ref)
        assert torch.equal(reloaded(IDS).logits, ref)
    stored = peft_model.base_model.stored_parameters()
    dense = sum(r["dense_params"] for r in report)
    assert stored <= 0.7 * dense  # the exact budget: every module at its own ratio's rank
    # the model calibrate ran on is left as it was (the pipeline unpatches every module)
    assert not any("forward" in vars(m) for m in build(layers=3).modules())


def test_first_sublayer_of_the_first_layer_is_todays_whitened_factorisation():
    # the first modules of layer 0 see the embeddings in both streams (X = Xs): any anchor gives the dense fit
    data = token_batches(4)
    model = tiny_llama(layers=2)
    dense_cfg = SharedBasisConfig(compression_ratio=0.3, group_size=1)
    dense_stats = peft_basis.calibrate(model, dense_cfg, data, progress=False)
    stats = peft_basis.calibrate(model, _anchored(anchor=1.0, holdout_fraction=0.0), data, progress=False)
    name = "model.layers.0.self_attn.q_proj"
    rank = stats.extra[f"factors/coefficient/{name}"].shape[1]
    w = model.get_submodule(name).weight
    f = factorize_group([w], dense_stats.gram(name), rank)
    (key,) = [k for k, members in stats.meta["factors"]["groups"].items() if members == [name]]
    got = stats.extra[f"factors/coefficient/{name}"] @ stats.extra[f"factors/basis/{key}"]
    torch.testing.assert_close(got, f.coefficients[0] @ f.basis, atol=1e-4, rtol=1e-3)


def test_auto_anchor_is_chosen_on_held_apart_batches_and_recorded():
    model = tiny_llama(layers=2)
    stats = peft_basis.calibrate(model, _anchored(), token_batches(4), progress=False)
    anchors = {r["anchor"] for r in stats.meta["factors"]["report"]}
    assert anchors <= set(SharedBasisConfig().anchor_candidates)
    errs = [r["relative_error"] for r in stats.meta["factors"]["report"]]
    assert all(e is not None and 0 <= e < 1 for e in errs)  # held-apart error against the dense outputs


def test_refinement_that_diverges_keeps_the_closed_form_and_says_so():
    data = token_batches(4)
    closed = peft_basis.calibrate(tiny_llama(layers=2), _anchored(anchor=0.5), data, progress=False)
    with pytest.warns(UserWarning, match="closed-form factors are kept"):
        wild = peft_basis.calibrate(tiny_llama(layers=2), _anchored(anchor=0.5, refine_epochs=2, refine_lr=1e4), data,
                                    progress=False)
    assert all(v["kept"] == "closed form" for v in wild.meta["factors"]["refinement"].values())
    for k, v in closed.extra.items():
        assert torch.equal(v, wild.extra[k]), k


def test_loss_aware_ranks_spend_the_exact_budget_by_fisher_scores():
    data = token_batches(4)
    model = tiny_llama(layers=2)
    config = SharedBasisConfig(compression_ratio=0.3, group_size=1, rank_allocation="loss")
    stats = peft_basis.calibrate(model, config, data, progress=False)
    assert any(k.startswith("fisher/") for k in stats.extra) and any(k.startswith("sigma2/") for k in stats.extra)
    peft_model = get_peft_model(model, config)
    report = peft_model.base_model.compression_report
    budget = int(0.7 * sum(r["dense_params"] for r in report))
    spent = sum(r["params"] for r in report)
    assert spent <= budget and budget - spent < max(r["params"] // r["rank"] for r in report)
    uniform = get_peft_model(tiny_llama(layers=2), _with_stats(SharedBasisConfig(compression_ratio=0.3, group_size=1),
                                                               data)).base_model.compression_report
    assert [r["rank"] for r in report] != [r["rank"] for r in uniform]
    # anchored with loss-aware ranks: the same ranks, fitted anchored
    anchored = peft_basis.calibrate(tiny_llama(layers=2), _anchored(rank_allocation="loss"), data, progress=False)
    factors = anchored.meta["factors"]
    assert factors["ranks"] == {r["group"]: r["rank"] for r in report if not r.get("dense")}
    assert factors["dense"] == [m for r in report if r.get("dense") for m in r["members"]]


def _with_stats(config, data):
    peft_basis.calibrate(tiny_llama(layers=2), config, data, progress=False)
    return config


def test_anchored_settings_fail_with_the_fix():
    with pytest.raises(ValueError, match="group_size=1"):
        peft_basis.calibrate(tiny_llama(layers=2), SharedBasisConfig(group_size=2, inputs="anchored"), token_batches(1),
                             progress=False)
    with pytest.raises(ValueError, match="inputs must be one of 'dense', 'anchored'"):
        SharedBasisConfig(inputs="shifted")
    with pytest.raises(ValueError, match="anchor.*must be"):
        SharedBasisConfig(anchor=2.0)
    with pytest.raises(ValueError, match="rank_allocation='uniform' or 'loss'"):
        peft_basis.calibrate(tiny_llama(layers=2), _anchored(rank_allocation="global"), token_batches(1), progress=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        peft_basis.calibrate(tiny_llama(layers=2), _anchored(), [torch.randint(0, 128, (1, 8)) for _ in range(2)],
                             progress=False)
    assert any("calibration tokens are fitted" in str(w.message) and "at least" in str(w.message) for w in caught)


@pytest.mark.parametrize("kw", [{}, dict(rank_allocation="loss", output_weights="fisher")])
def test_anchored_statistics_save_and_reload_into_the_same_adapter(kw, tmp_path):
    data = token_batches(4)
    config = _anchored(**kw)
    stats = peft_basis.calibrate(tiny_llama(layers=2), config, data, progress=False,
                                 save_to=str(tmp_path / "s.safetensors"))
    assert bool(stats.meta["factors"]["dense"]) == bool(kw)  # modules kept dense (no factors) reload too
    direct = get_peft_model(tiny_llama(layers=2), config)
    again = _anchored(**kw)
    peft_basis.use_statistics(again, str(tmp_path / "s.safetensors"))
    reloaded = get_peft_model(tiny_llama(layers=2), again)
    with torch.no_grad():
        assert torch.equal(direct(IDS).logits, reloaded(IDS).logits)


def test_a_ratio_sweep_reuses_the_dense_passes(tmp_path, monkeypatch):
    """dense_statistics: the second ratio runs neither the dense Gram pass nor the Fisher pass, and its statistics
    (and adapter) equal a fresh calibration's; from memory or a file, and from a generator of batches too."""
    from peft_basis.calibration.pipelines import whole_model

    data = token_batches(4)
    def make(ratio):
        return SharedBasisConfig(compression_ratio=ratio, group_size=1, inputs="anchored", rank_allocation="loss",
                                 output_weights="fisher")

    first = peft_basis.calibrate(tiny_llama(layers=2), make(0.3), data, progress=False,
                                 save_to=str(tmp_path / "s.safetensors"))
    fresh_config = make(0.5)
    fresh = peft_basis.calibrate(tiny_llama(layers=2), fresh_config, (b for b in data), progress=False)
    passes = []
    for name in ("collect_grams", "collect_fisher"):
        real = getattr(whole_model, name)
        monkeypatch.setattr(whole_model, name, lambda *a, _real=real, _name=name, **k: passes.append(_name) or _real(*a, **k))
    for given in (first, str(tmp_path / "s.safetensors")):
        config = make(0.5)
        reused = peft_basis.calibrate(tiny_llama(layers=2), config, data, progress=False, dense_statistics=given)
        assert passes == []
        assert reused.extra.keys() == fresh.extra.keys() and reused.meta.keys() == fresh.meta.keys()
        assert all(torch.equal(reused.extra[k], fresh.extra[k]) for k in fresh.extra)
        assert reused.meta["factors"] == fresh.meta["factors"] != first.meta["factors"]
        with torch.no_grad():
            assert torch.equal(get_peft_model(tiny_llama(layers=2), config)(IDS).logits,
                               get_peft_model(tiny_llama(layers=2), copy.deepcopy(fresh_config))(IDS).logits)


def test_dense_statistics_that_do_not_fit_are_refused():
    from peft_basis.errors import BaseModelMismatchError

    data = token_batches(4)
    loss = dict(rank_allocation="loss")
    first = peft_basis.calibrate(tiny_llama(layers=2), _anchored(**loss), data, progress=False)
    with pytest.raises(ValueError, match="reads none.*remove `dense_statistics`"):
        peft_basis.calibrate(tiny_llama(layers=2), _anchored(), data, progress=False, dense_statistics=first)
    with pytest.raises(ValueError, match="reads none"):
        peft_basis.calibrate(tiny_llama(layers=2), SharedBasisConfig(compression_ratio=0.3), data, progress=False,
                             dense_statistics=first)
    plain = peft_basis.calibrate(tiny_llama(layers=2), SharedBasisConfig(compression_ratio=0.3), data, progress=False)
    with pytest.raises(ValueError, match="hold no dense-model Fisher scores"):
        peft_basis.calibrate(tiny_llama(layers=2), _anchored(**loss), data, progress=False, dense_statistics=plain)
    other = tiny_llama(layers=2)
    with torch.no_grad():
        other.model.embed_tokens.weight.mul_(1.5)  # the fingerprint reads the tensors compression keeps
    with pytest.raises(BaseModelMismatchError, match="dense_statistics"):
        peft_basis.calibrate(other, _anchored(**loss), data, progress=False, dense_statistics=first)
    with pytest.raises(ValueError, match="damping=.*the scored directions depend on it"):
        peft_basis.calibrate(tiny_llama(layers=2), _anchored(damping=1e-2, **loss), data, progress=False,
                             dense_statistics=first)
    with pytest.warns(UserWarning, match="other calibration batches"):
        peft_basis.calibrate(tiny_llama(layers=2), _anchored(**loss), token_batches(4, seq=24), progress=False,
                             dense_statistics=first)


def test_one_anchored_calibration_gives_independent_adapters():
    # the injected factors are copies: training one adapter leaves the statistics, and the next adapter, as fitted
    data = token_batches(4)
    config = _anchored()
    stats = peft_basis.calibrate(tiny_llama(layers=2), config, data, progress=False)
    before = {k: v.clone() for k, v in stats.extra.items()}
    first = get_peft_model(tiny_llama(layers=2), config)
    with torch.no_grad():
        ref = first(IDS).logits
        for p in first.parameters():
            if p.requires_grad:
                p.add_(1.0)
    assert all(torch.equal(stats.extra[k], v) for k, v in before.items())
    again = _anchored()
    again.attach_statistics(stats)
    with torch.no_grad():
        assert torch.equal(get_peft_model(tiny_llama(layers=2), again)(IDS).logits, ref)


def test_anchored_fit_stays_finite_when_the_gram_is_not_positive_definite():
    # fewer compressed-input tokens than dimensions, and fp32 rounding: Cholesky of the damped Gs fails
    x, xs = _inputs(n=10, d=24)
    gs = (xs.T @ xs).float()
    gs[0, 0] = -float(gs.diagonal().mean())  # a negative eigenvalue, below the damping floor (trace still > 0)
    w = torch.randn(16, 24, dtype=torch.float64)
    cross = (x.T @ xs).float()
    fitted = anchored_target(w, gs, cross, 0.5)
    assert torch.isfinite(fitted).all()
    # W C Gs^-1 through the clamped eigendecomposition (a non-triangular factor given to cholesky_solve is wrong)
    from peft_basis.linalg import DEFAULT_DAMPING, robust_eigh

    g = gs.double()
    g = g + DEFAULT_DAMPING * float(g.diagonal().sum()) / g.shape[0] * torch.eye(24, dtype=torch.float64)
    eig = robust_eigh(g, DEFAULT_DAMPING)
    inverse = eig.eigenvectors @ torch.diag(1 / eig.eigenvalues) @ eig.eigenvectors.T
    torch.testing.assert_close(fitted, 0.5 * w + 0.5 * w @ cross.double() @ inverse, rtol=1e-6, atol=1e-8)
    f = anchored_factorize([w], [gs], [(x.T @ xs).float()], 4, 0.5)
    assert torch.isfinite(f.basis).all() and torch.isfinite(f.coefficients[0]).all()
