"""The shared foundation: enum registration, the calibration engine, the linear algebra, budgets."""

import math
import warnings

import pytest
import torch
from peft.utils import PeftType

import peft_basis  # noqa: F401
from peft_basis import CalibrationError, CalibrationStatistics, SharedBasisConfig, calibrate
from peft_basis._peft_type import add_peft_type, register
from peft_basis.budget import greedy_allocate, max_profitable_rank, rank_for_ratio
from peft_basis.calibration import accumulate_gram, symmetrize
from peft_basis.linalg import factorize_group, member_error, robust_eigh, whitened_svd

from .models import tiny_gpt2, tiny_llama, token_batches


# ---- enum ---------------------------------------------------------------------------------------
def test_peft_type_member_behaves_like_builtin_members():
    member = add_peft_type("shared_basis")
    assert member is PeftType.SHARED_BASIS is PeftType("SHARED_BASIS") is PeftType["SHARED_BASIS"]
    assert "SHARED_BASIS" in list(PeftType) and member == "SHARED_BASIS" and member.value == "SHARED_BASIS"
    assert add_peft_type("shared_basis") is member  # idempotent
    assert PeftType.LORA.value == "LORA"  # built-ins untouched


def test_register_is_idempotent_and_refuses_prefix_collisions():
    from peft_basis.tuners.shared_basis import SharedBasisModel

    assert register("shared_basis", SharedBasisConfig, SharedBasisModel, "sb_") is PeftType.SHARED_BASIS
    with pytest.raises(KeyError, match="collides"):
        register("peft_basis_test_dummy", SharedBasisConfig, type("M", (), {"prefix": "lora_x"}), "lora_")


# ---- Gram arithmetic ----------------------------------------------------------------------------
@pytest.mark.parametrize("d", [7, 600])
def test_blocked_gram_equals_full_gram(d):
    x = torch.randn(50, d)
    g = torch.zeros(d, d)
    accumulate_gram(g, x[:20])
    accumulate_gram(g, x[20:])
    torch.testing.assert_close(symmetrize(g), x.T @ x, rtol=1e-4, atol=1e-3)


def test_engine_shares_one_gram_between_linears_reading_the_same_input():
    model = tiny_llama(layers=2)
    config = SharedBasisConfig(output_grams=False)  # input Grams everywhere
    stats = calibrate(model, config, token_batches(2), progress=False)
    src = stats.sources
    assert src["model.layers.0.self_attn.k_proj"] == src["model.layers.0.self_attn.v_proj"] == "model.layers.0.self_attn.q_proj"
    assert src["model.layers.1.mlp.up_proj"] == "model.layers.1.mlp.gate_proj"
    assert src["model.layers.0.self_attn.o_proj"] == "model.layers.0.self_attn.o_proj"
    assert len(stats.grams) == 2 * 4  # 4 distinct inputs per Llama layer
    assert all(n == 2 * 4 * 32 for n in stats.tokens.values())


def test_engine_gram_equals_explicit_sum_and_ignores_padding():
    model = tiny_llama(layers=1)
    ids = token_batches(1, batch=2, seq=16)[0]
    mask = torch.ones_like(ids)
    mask[1, 10:] = 0
    captured = []
    h = model.model.layers[0].mlp.down_proj.register_forward_pre_hook(lambda m, a: captured.append(a[0].detach()))
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
    h.remove()
    x = captured[0].reshape(-1, captured[0].shape[-1])[mask.reshape(-1).bool()]
    stats = calibrate(model, SharedBasisConfig(output_grams=False), [{"input_ids": ids, "attention_mask": mask}], progress=False)
    name = "model.layers.0.mlp.down_proj"
    assert stats.num_tokens(name) == 26
    torch.testing.assert_close(stats.gram(name), x.T @ x, rtol=1e-4, atol=1e-4)


def test_grams_are_laid_out_before_the_first_batch_and_count_only_its_tokens():
    # (on the CPU)
    from peft_basis.calibration.pipelines.whole_model import _LAYOUT_TOKENS, collect_grams

    model = tiny_llama(layers=2)
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and "layers" in n]
    stats = CalibrationStatistics()
    seen = []  # (input rows and tokens, how many Grams exist) at each forward of the first decoder layer
    h = model.model.layers[0].register_forward_pre_hook(lambda m, a: seen.append((tuple(a[0].shape[:2]), len(stats.grams))))
    collect_grams(model, names, token_batches(2, batch=2), progress=False, stats=stats)
    h.remove()
    assert seen == [((1, _LAYOUT_TOKENS), 0)] + [((1, 32), 2 * 4)] * 4  # then each batch a sequence at a time
    assert set(stats.tokens.values()) == {2 * 2 * 32}


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2])
def test_the_gram_pass_stops_after_the_last_targeted_layer(make):
    """Targets in layers 0-1 of 4: layers 2-3 never run, the Grams equal the full forward's; a target in the last
    layer (or outside the layers) runs them all."""
    from peft_basis.calibration.grams import last_targeted_layer
    from peft_basis.calibration.pipelines.whole_model import collect_grams

    model = make(layers=4)
    layers = model.model.layers if make is tiny_llama else model.transformer.h
    prefix = "model.layers" if make is tiny_llama else "transformer.h"
    linears = [n for n, m in model.named_modules() if n.startswith(prefix + ".") and type(m).__name__ in
               ("Linear", "Conv1D")]
    early = [n for n in linears if n.startswith((f"{prefix}.0.", f"{prefix}.1."))]
    assert last_targeted_layer(model, early) is layers[1]
    assert last_targeted_layer(model, linears) is None and last_targeted_layer(model, early + ["lm_head"]) is None
    ran = []
    handles = [layer.register_forward_pre_hook(lambda m, a, i=i: ran.append(i)) for i, layer in enumerate(layers)]
    data = token_batches(2, batch=2)
    full = collect_grams(model, linears, data, progress=False)
    assert set(ran) == {0, 1, 2, 3}
    ran.clear()
    part = collect_grams(model, early, data, progress=False)
    assert set(ran) == {0, 1}
    for h in handles:
        h.remove()
    assert set(part.grams) == {g for g in full.grams if g.startswith(tuple(early))}
    for g in part.grams:
        assert part.tokens[g] == full.tokens[g]
        torch.testing.assert_close(part.grams[g], full.grams[g], rtol=0, atol=0)


def test_statistics_save_load_roundtrip(tmp_path):
    model = tiny_gpt2(layers=2)
    config = SharedBasisConfig()
    stats = calibrate(model, config, token_batches(2), progress=False, save_to=str(tmp_path / "s.safetensors"))
    loaded = CalibrationStatistics.load(str(tmp_path / "s.safetensors"))
    assert loaded.sources == stats.sources and loaded.tokens == stats.tokens
    for k in stats.grams:
        assert torch.equal(loaded.grams[k], stats.grams[k])
    (tmp_path / "bad.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CalibrationError, match="not a readable safetensors"):
        CalibrationStatistics.load(str(tmp_path / "bad.safetensors"))


def test_calibration_errors_are_clear():
    model = tiny_llama(layers=1)
    with pytest.raises(CalibrationError, match="no batches"):
        calibrate(model, SharedBasisConfig(), [], progress=False)
    with pytest.raises(CalibrationError, match="no calibration tokens"):
        calibrate(model, SharedBasisConfig(), [{"input_ids": torch.zeros(1, 4, dtype=torch.long),
                                               "attention_mask": torch.zeros(1, 4, dtype=torch.long)}], progress=False)
    with pytest.raises(ValueError, match="matched no Linear layer.*Linear layers in this model"):
        calibrate(model, SharedBasisConfig(target_modules=["nonexistent"]), token_batches(1), progress=False)
    with pytest.raises(ValueError, match="only factorises nn.Linear"):
        calibrate(model, SharedBasisConfig(target_modules=["input_layernorm"]), token_batches(1), progress=False)
    nan = torch.full((8, 8), float("nan"))
    with pytest.raises(CalibrationError, match="NaN"):
        robust_eigh(nan)


# ---- linear algebra -----------------------------------------------------------------------------
def test_whitening_survives_rank_deficient_and_dead_feature_grams():
    torch.manual_seed(0)
    x = torch.randn(5, 32)  # 5 tokens: rank 5 of 32
    x[:, 3] = 0  # a dead feature
    gram = x.T @ x
    w = robust_eigh(gram)
    assert w.clamped >= 32 - 5
    s, s_inv = w.matrix, w.inverse
    torch.testing.assert_close(s @ s_inv, torch.eye(32, dtype=torch.float64), atol=1e-6, rtol=0)
    weight = torch.randn(16, 32)
    f = factorize_group([weight], gram, rank=5)  # rank = data rank: the calibration outputs are reproduced exactly
    assert member_error(weight, f.coefficients[0], f.basis, gram) < 1e-6
    assert torch.isfinite(f.coefficients[0] @ f.basis).all()
    # the single-weight whitened SVD (BASIS, Basel): W = U diag(s) R exactly, U orthonormal, R G R^T = I
    u, sv, r = whitened_svd(weight, w)
    torch.testing.assert_close(u @ torch.diag(sv) @ r, weight.double(), atol=1e-8, rtol=0)
    torch.testing.assert_close(u.T @ u, torch.eye(16, dtype=torch.float64), atol=1e-8, rtol=0)
    damped = w.eigenvectors @ torch.diag(w.eigenvalues) @ w.eigenvectors.T
    torch.testing.assert_close(r @ damped @ r.T, torch.eye(16, dtype=torch.float64), atol=1e-6, rtol=0)


def test_whitened_factorisation_beats_plain_svd_on_calibration_outputs():
    torch.manual_seed(0)
    mix = torch.randn(32, 32) * torch.logspace(0, -2, 32)  # anisotropic inputs, like real activations
    x = torch.randn(400, 32) @ mix
    gram = x.T @ x
    weight = torch.randn(24, 32)
    white = factorize_group([weight], gram, rank=8)
    plain = factorize_group([weight], None, rank=8)
    e_white = member_error(weight, white.coefficients[0], white.basis, gram)
    e_plain = member_error(weight, plain.coefficients[0], plain.basis, gram)
    assert e_white < 0.5 * e_plain


def test_rank_formulas():
    assert rank_for_ratio(576, 576, 0.2) == math.floor(576 * 576 * 0.8 / 1152)
    assert rank_for_ratio(576, 1536, 0.2, n=2) == math.floor(2 * 576 * 1536 * 0.8 / (576 + 2 * 1536))
    assert max_profitable_rank(576, 576) == 287 and max_profitable_rank(576, 1536) == 418


def test_greedy_allocate_respects_budget_and_bounds():
    scores = [torch.tensor([9.0, 4.0, 1.0]), torch.tensor([8.0, 7.0, 6.0, 5.0])]
    ranks = greedy_allocate(scores, [10, 10], budget=45, r_min=1)
    assert ranks == [1, 3]  # 7 and 6 beat 4: the best scores per parameter win
    # per parameter, not per rank: 5 for 10 params beats 6 for 20
    assert greedy_allocate([torch.tensor([9.0, 5.0]), torch.tensor([8.0, 6.0])], [10, 20], budget=40, r_min=1) == [2, 1]
    with pytest.raises(ValueError, match="minimum rank"):
        greedy_allocate(scores, [10, 10], budget=15, r_min=1)
    assert greedy_allocate(scores, [10, 10], budget=1000, r_max=2) == [2, 2]


@pytest.mark.parametrize("make_config", [lambda: peft_basis.BaselConfig(keep_ratio=0.5),
                                         lambda: peft_basis.BasisConfig(r=2)], ids=["basel", "basis"])
def test_loading_an_adapter_onto_another_model_names_the_missing_targets(make_config, tmp_path):
    from peft import PeftModel, get_peft_model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # no calibration: data-free init warns
        get_peft_model(tiny_llama(layers=2), make_config()).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"made for another model: \['model\.layers\.1\."):
        PeftModel.from_pretrained(tiny_llama(layers=1), str(tmp_path))
