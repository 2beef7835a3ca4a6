"""Output Grams: a private whitened module whose output is narrower than its input (Llama's down_proj, GPT-2's
mlp.c_proj) is calibrated on ``Y^T Y`` (d_out^2 numbers) instead of ``X^T X`` (d_in^2), for the same factors."""

import pytest
import torch
from peft import get_peft_model

from peft_basis import CalibrationError, CalibrationStatistics, SharedBasisConfig, calibrate
from peft_basis.calibration.statistics import INPUT_TRACE, OUTPUT_GRAM

from .models import fresh_copy, tiny_gpt2, tiny_llama, token_batches

IDS = token_batches(1, batch=2, seq=16, seed=9)[0]


def _captured(model, name, ids, mask):
    """The module's real inputs and outputs (bias removed) on the unpadded tokens."""
    module = model.get_submodule(name)
    seen = {}
    h = module.register_forward_hook(lambda m, a, out: seen.update(x=a[0].detach(), y=out.detach()))
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
    h.remove()
    keep = mask.reshape(-1).bool()
    x = seen["x"].reshape(-1, seen["x"].shape[-1])[keep]
    y = seen["y"].reshape(-1, seen["y"].shape[-1])[keep] - module.bias.detach()
    return x, y


@pytest.mark.parametrize("build, name", [(tiny_llama, "model.layers.0.mlp.down_proj"),
                                         (tiny_gpt2, "transformer.h.0.mlp.c_proj")])
def test_output_gram_is_the_outputs_gram_without_bias_or_padding(build, name):
    model = build(layers=1)
    module = model.get_submodule(name)
    if module.bias is None:
        module.bias = torch.nn.Parameter(torch.zeros(module.weight.shape[0]))  # Llama has none: a zero one is a no-op
    with torch.no_grad():
        module.bias.normal_()  # a real bias, which the statistic must not see
    ids = token_batches(1, batch=2, seq=16)[0]
    mask = torch.ones_like(ids)
    mask[1, 10:] = 0
    stats = calibrate(model, SharedBasisConfig(group_size=1), [{"input_ids": ids, "attention_mask": mask}],
                      progress=False)
    x, y = _captured(model, name, ids, mask)
    assert name not in stats.grams and stats.num_tokens(name) == 26
    torch.testing.assert_close(stats.extra[OUTPUT_GRAM + name], y.T @ y, rtol=1e-4, atol=1e-4)
    assert float(stats.extra[INPUT_TRACE + name]) == pytest.approx(float((x * x).sum()), rel=1e-5)
    # only where it is smaller and the input is the module's alone: q/k/v and gate/up keep their shared input Gram
    assert sum(k.startswith(OUTPUT_GRAM) for k in stats.extra) == 1
    with pytest.raises(CalibrationError, match="output Gram.*output_grams=False"):
        stats.gram(name)


@pytest.mark.parametrize("allocation", ["uniform", "global", "loss"])
def test_the_same_factors_as_from_input_grams(allocation):
    base = tiny_llama(layers=2)
    data = token_batches(3)
    models = {}
    for output_grams in (False, True):
        config = SharedBasisConfig(compression_ratio=0.3, group_size=1, rank_allocation=allocation,
                                   output_grams=output_grams, decomposition_dtype="float64")
        stats = calibrate(fresh_copy(base), config, data, progress=False)
        assert any(k.startswith(OUTPUT_GRAM) for k in stats.extra) == output_grams
        models[output_grams] = (get_peft_model(fresh_copy(base), config), config)
    (a, ca), (b, cb) = models[False], models[True]
    assert ca.rank_pattern == cb.rank_pattern and ca.dense_modules == cb.dense_modules
    for r, s in zip(a.base_model.compression_report, b.base_model.compression_report):
        assert r["params"] == s["params"] and r["relative_error"] == pytest.approx(s["relative_error"], rel=1e-4, abs=1e-7)
    with torch.no_grad():
        torch.testing.assert_close(a(IDS).logits, b(IDS).logits, rtol=1e-4, atol=1e-4)


def test_output_gram_statistics_reload_and_refuse_a_config_that_needs_input_grams(tmp_path):
    base = tiny_llama(layers=2)
    path = str(tmp_path / "s.safetensors")
    config = SharedBasisConfig(group_size=1)
    calibrate(base, config, token_batches(2), progress=False, save_to=path)
    loaded = CalibrationStatistics.load(path)
    for k in [k for k in loaded.extra if k.startswith((OUTPUT_GRAM, INPUT_TRACE))]:
        assert torch.equal(loaded.extra[k], config.calibration_statistics.extra[k])
    reused = SharedBasisConfig(group_size=1)
    calibrate(base, reused, statistics=path, progress=False)
    with torch.no_grad():
        expected = get_peft_model(fresh_copy(base), config)(IDS).logits
        assert torch.equal(get_peft_model(fresh_copy(base), reused)(IDS).logits, expected)
    # down_proj shared across layers needs its input Grams: a clear error, the model untouched
    shared = SharedBasisConfig(group_size=2, shared_modules=["down_proj"])
    calibrate(base, shared, statistics=path, progress=False)
    before = {k: v.clone() for k, v in base.state_dict().items()}
    with pytest.raises(CalibrationError, match="output Gram.*output_grams=False"):
        get_peft_model(base, shared)
    assert all(torch.equal(before[k], v) for k, v in base.state_dict().items())
