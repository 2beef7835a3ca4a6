"""Basis Sharing with each output's error weighted by the dense model's output Fisher (output_weights="fisher"):
the weighted closed forms, the output moments of both Fisher passes, and the config's paths and errors."""

import pytest
import torch
from peft import PeftModel, get_peft_model
from transformers import AutoModelForCausalLM

import peft_basis
from peft_basis import SharedBasisConfig
from peft_basis.calibration.fisher import output_fisher_key
from peft_basis.linalg import anchored_factorize, factorize_group

from .models import tiny_gpt2, tiny_llama, token_batches

IDS = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(7))


def _problem(d_out=12, d_in=20, n=300, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d_in, generator=g, dtype=torch.float64) * torch.logspace(0, -1, d_in, dtype=torch.float64)
    w = torch.randn(d_out, d_in, generator=g, dtype=torch.float64)
    s = torch.rand(d_out, generator=g, dtype=torch.float64) * 3 + 0.1
    return x, w, s


def _weighted_error(x, w, approx, s):
    return float((((x @ (w - approx).T) * s[None, :]) ** 2).sum())


def test_weighted_factorisation_minimises_the_weighted_error_exactly():
    x, w, s = _problem()
    gram, k = x.T @ x, 5
    f = factorize_group([w], gram, k, damping=1e-12, output_scales=[s])
    plain = factorize_group([w], gram, k, damping=1e-12)
    approx = f.coefficients[0].double() @ f.basis.double()
    best = _weighted_error(x, w, approx, s)
    # its weighted error is the weighted spectrum's tail, and no other rank-k fit does better on it
    assert abs(best - float(f.eigenvalues[k:].sum())) < 1e-6 * float(f.eigenvalues.sum())
    assert best < _weighted_error(x, w, plain.coefficients[0].double() @ plain.basis.double(), s)
    g = torch.Generator().manual_seed(3)
    for _ in range(10):
        noisy = (f.coefficients[0].double() + 1e-2 * torch.randn(12, k, generator=g, dtype=torch.float64)) @ f.basis.double()
        assert _weighted_error(x, w, noisy, s) >= best - 1e-9
    # a constant weight changes nothing
    same = factorize_group([w], gram, k, damping=1e-12, output_scales=[torch.full((12,), 2.5, dtype=torch.float64)])
    torch.testing.assert_close(same.coefficients[0] @ same.basis, plain.coefficients[0] @ plain.basis)


def test_weighted_anchored_fit_minimises_the_weighted_anchored_objective():
    x, w, s = _problem(seed=1)
    xs = x + 0.2 * torch.randn(x.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    b, k = 0.5, 6
    xb = b * x + (1 - b) * xs
    f = anchored_factorize([w], [xs.T @ xs], [x.T @ xs], k, b, damping=1e-12, output_scales=[s])
    plain = anchored_factorize([w], [xs.T @ xs], [x.T @ xs], k, b, damping=1e-12)

    def objective(approx):
        return float((((xb @ w.T - xs @ approx.T) * s[None, :]) ** 2).sum())

    best = objective(f.coefficients[0].double() @ f.basis.double())
    assert best < objective(plain.coefficients[0].double() @ plain.basis.double())
    g = torch.Generator().manual_seed(4)
    for _ in range(10):
        noisy = f.coefficients[0].double() + 1e-2 * torch.randn(12, k, generator=g, dtype=torch.float64)
        assert objective(noisy @ f.basis.double()) >= best - 1e-9


def _brute_force_output_fisher(model, data, names):
    """mean over labelled tokens of (dL_s/dy)^2 per output, L_s each sequence's mean NLL (autograd, no hooks' help)."""
    modules = {n: model.get_submodule(n) for n in names}
    total = {n: 0.0 for n in names}
    tokens = 0
    for batch in data:
        for seq in batch:
            outs = {}
            hs = [m.register_forward_hook(lambda mod, a, o, n=n: outs.__setitem__(n, o)) for n, m in modules.items()]
            logits = model(input_ids=seq[None]).logits
            for h in hs:
                h.remove()
            loss = torch.nn.functional.cross_entropy(logits[0, :-1], seq[1:])
            grads = torch.autograd.grad(loss, [outs[n] for n in names])
            for n, gr in zip(names, grads):
                total[n] = total[n] + gr.double().pow(2).reshape(-1, gr.shape[-1]).sum(0)
            tokens += len(seq) - 1
    return {n: (t / tokens).float() for n, t in total.items()}


def test_both_fisher_passes_give_the_output_fisher_of_the_loss(tmp_path):
    data = token_batches(2)
    model = tiny_llama(layers=2)
    config = SharedBasisConfig(compression_ratio=0.3, group_size=1, output_weights="fisher")
    stats = peft_basis.calibrate(model, config, data, progress=False)
    names = sorted(n for n in stats.sources)
    expected = _brute_force_output_fisher(model, data, names)
    for n in names:
        torch.testing.assert_close(stats.extra[output_fisher_key(n)], expected[n], rtol=1e-4, atol=1e-12)
    model.save_pretrained(tmp_path / "base", max_shard_size="60KB")
    sequential = peft_basis.calibrate_sequential(str(tmp_path / "base"), config, data, progress=False)
    for n in names:
        torch.testing.assert_close(sequential.extra[output_fisher_key(n)], expected[n], rtol=1e-4, atol=1e-12)
    # beside loss-aware ranks, the same pass gives both
    both = peft_basis.calibrate(tiny_llama(layers=2), SharedBasisConfig(compression_ratio=0.3, group_size=1,
                                                                         rank_allocation="loss", output_weights="fisher"),
                                data, progress=False)
    assert any(k.startswith("fisher/") for k in both.extra)
    torch.testing.assert_close(both.extra[output_fisher_key(names[0])], expected[names[0]], rtol=1e-4, atol=1e-12)


@pytest.mark.parametrize("build", [tiny_llama, tiny_gpt2])
def test_weighted_adapters_save_reload_and_fit_the_weighted_objective(build, tmp_path):
    data = token_batches(4)
    config = SharedBasisConfig(compression_ratio=0.3, group_size=1, output_weights="fisher", output_weight_power=1.0,
                               output_grams=False)  # the objective below reads input Grams
    model = build(layers=2)
    stats = peft_basis.calibrate(model, config, data, progress=False)
    peft_model = get_peft_model(model, config)
    peft_model.save_pretrained(tmp_path / "a")
    loaded = PeftModel.from_pretrained(build(layers=2), tmp_path / "a")
    with torch.no_grad():
        assert torch.equal(loaded(IDS).logits, peft_model(IDS).logits)
    assert loaded.peft_config["default"].output_weights == "fisher"
    # every module's factors are the weighted optimum: a lower weighted error than the unweighted fit
    plain_cfg = SharedBasisConfig(compression_ratio=0.3, group_size=1, output_grams=False)
    plain = get_peft_model(build(layers=2), _attach(plain_cfg, build, data))
    name = sorted(stats.sources)[0]
    gram = stats.gram(name).double()
    dense = build(layers=2)
    w = peft_basis.modules.linear_weight(dense.get_submodule(name)).double()
    s = stats.extra[output_fisher_key(name)].double().sqrt()

    def weighted(pm):
        layer = pm.base_model.model.get_submodule(name)
        approx = layer.effective_weight("default").detach().double()
        d = (w - approx) * s[:, None]
        return float(((d @ gram) * d).sum())

    assert weighted(peft_model) < weighted(plain)
    # the stored parameters are those of the unweighted fit (the same ranks)
    assert peft_model.base_model.stored_parameters() == plain.base_model.stored_parameters()


def _attach(config, build, data):
    peft_basis.calibrate(build(layers=2), config, data, progress=False)
    return config


def test_anchored_with_output_weights_in_memory_and_layer_by_layer(tmp_path):
    data = token_batches(4)
    model = tiny_llama(layers=3)
    model.save_pretrained(tmp_path / "base", max_shard_size="60KB")
    config = SharedBasisConfig(compression_ratio=0.3, group_size=1, inputs="anchored", output_weights="fisher")
    peft_basis.calibrate(model, config, data, progress=False)
    peft_model = get_peft_model(model, config)
    peft_basis.compress_sequential(str(tmp_path / "base"), SharedBasisConfig(
        compression_ratio=0.3, group_size=1, inputs="anchored", output_weights="fisher"), data, str(tmp_path / "seq"),
        progress=False)
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tmp_path / "base"), tmp_path / "seq")
    unweighted = SharedBasisConfig(compression_ratio=0.3, group_size=1, inputs="anchored")
    peft_basis.calibrate(tiny_llama(layers=3), unweighted, data, progress=False)
    plain = get_peft_model(tiny_llama(layers=3), unweighted)
    with torch.no_grad():
        ref = peft_model(IDS).logits
        torch.testing.assert_close(loaded(IDS).logits, ref, atol=1e-5, rtol=1e-4)
        assert not torch.allclose(plain(IDS).logits, ref)  # the weights changed the fit


def test_output_weight_settings_fail_with_the_fix(tmp_path):
    with pytest.raises(ValueError, match="output_weights must be one of 'none', 'fisher'"):
        SharedBasisConfig(output_weights="outputs")
    with pytest.raises(ValueError, match="output_weight_power"):
        SharedBasisConfig(output_weight_power=-1)
    model = tiny_llama(layers=2)
    model.save_pretrained(tmp_path / "base")
    with pytest.raises(ValueError, match="needs inputs='anchored'"):
        peft_basis.compress_sequential(str(tmp_path / "base"), SharedBasisConfig(group_size=1, output_weights="fisher"),
                                       token_batches(1), str(tmp_path / "out"), progress=False)
    assert not (tmp_path / "out").exists()
    # statistics without the output Fisher (calibrated for another config) are refused, with the fix
    config = SharedBasisConfig(compression_ratio=0.3, group_size=1)
    peft_basis.calibrate(model, config, token_batches(2), progress=False)
    weighted = SharedBasisConfig(compression_ratio=0.3, group_size=1, output_weights="fisher")
    weighted.attach_statistics(config.calibration_statistics)
    with pytest.raises(ValueError, match="output Fisher.*calibrate"):
        get_peft_model(tiny_llama(layers=2), weighted)
