"""Basis Sharing on the real SmolLM2-135M (2 layers, real weights) and real text."""

import pytest
import torch
from peft import PeftModel, get_peft_model

import peft_basis
pytestmark = pytest.mark.real_model  # skipped where the model is not installed (tests/conftest.py)


def test_real_two_layer_smollm2_compresses_reloads_and_whitening_pays(tmp_path):
    from peft_basis.data import load_default_model, load_text, token_blocks

    model, tok = load_default_model(num_hidden_layers=2)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    blocks = token_blocks(tok, load_text("pydoc"), 128)
    calib, held = blocks[:16], blocks[-8:]
    # A 2-layer cut of the model is no language model (perplexity in the millions), so compare what
    # the compressed layers compute: the final hidden states on held-apart text.
    def hidden(m):
        with torch.no_grad():
            return m(input_ids=held, output_hidden_states=True).hidden_states[-1]

    dense_h = hidden(model)

    def rel_err(m):
        return float((hidden(m) - dense_h).norm() / dense_h.norm())

    def compressed(calibrated: bool):
        m, _ = load_default_model(num_hidden_layers=2)
        config = peft_basis.SharedBasisConfig(compression_ratio=0.2, group_size=1)
        if calibrated:
            peft_basis.calibrate(m, config, [calib[i : i + 4] for i in range(0, 16, 4)], progress=False)
        else:
            with pytest.warns(UserWarning, match="no calibration"):
                return get_peft_model(m, config)
        return get_peft_model(m, config)

    white = compressed(True)
    plain = compressed(False)
    e_white, e_plain = rel_err(white), rel_err(plain)
    assert 0 < e_white < 0.5 * e_plain, (e_white, e_plain)  # whitening costs much less than plain SVD
    assert e_white < 0.35  # measured 0.26 (plain SVD: 0.88) at 20% removed

    white.save_pretrained(tmp_path)
    fresh, _ = load_default_model(num_hidden_layers=2)
    fresh.load_state_dict(state)
    reloaded = PeftModel.from_pretrained(fresh, tmp_path)
    ids = held[:2]
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, white(ids).logits)
    # tied embeddings stay tied through compression and reload
    base = reloaded.base_model.model
    assert base.lm_head.weight is base.model.embed_tokens.weight


MAIN_JOB_ARGS = {
    "anchored": ["--refine-epochs", "1"],  # the default pipeline (anchored fit, loss-aware ranks) + one refinement epoch
    "anchored-sequential": ["--refine-epochs", "1", "--sequential"],
    "compressed-inputs-sequential": ["--sequential", "--inputs", "dense", "--rank-allocation", "uniform",
                                     "--compressed-inputs"],
}


@pytest.mark.parametrize("case", sorted(MAIN_JOB_ARGS))
def test_command_compresses_a_model_folder(tmp_path, case):
    """The `peft-basis` command on a 2-layer cut of the real model saved as a folder (what `--model`
    accepts): the adapter it writes holds at most 80% of the targeted parameters and reloads."""
    import json

    from peft_basis.cli import run
    from peft_basis.data import load_default_model

    model, tok = load_default_model(num_hidden_layers=2)
    model.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    out = tmp_path / "out"
    args = ["--model", str(tmp_path / "model"), "--calib-blocks", "8", "--eval-blocks", "2", "--seq-len", "128",
            "--output", str(out), "--eval-domain", "pydoc", "--calib-domain", "pydoc"]
    sequential = "--sequential" in MAIN_JOB_ARGS[case]
    result = run(args + MAIN_JOB_ARGS[case])
    written = json.loads((out / "peft_basis_result.json").read_text())["config"]
    assert written["sequential"] is sequential and written["inputs"] == ("dense" if "dense" in MAIN_JOB_ARGS[case] else "anchored")
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "SHARED_BASIS"
    dense_targeted = 2 * (576 * 576 * 2 + 576 * 192 * 2 + 576 * 1536 * 3)  # q,o + k,v + gate,up,down per layer
    removed = result["parameters"]["dense"] - result["parameters"]["compressed"]
    assert 0.2 * dense_targeted <= removed <= 0.2 * dense_targeted + 2 * (576 + 2 * 1536) * 7
    reloaded = PeftModel.from_pretrained(load_default_model(num_hidden_layers=2)[0], str(out))
    assert reloaded.base_model.stored_parameters() == dense_targeted - removed


@pytest.mark.parametrize("method", ["basis", "basel"])
def test_calibrate_command_saves_statistics_whole_or_layer_by_layer(tmp_path, method):
    """`peft-basis calibrate` on a 2-layer cut of the real model: the layer-by-layer statistics (with BASIS's
    Fisher scores, from the backward sweep) equal the whole-model ones and build the same adapter."""
    from peft_basis.calibration import CalibrationStatistics
    from peft_basis.cli import main
    from peft_basis.data import load_default_model

    model, tok = load_default_model(num_hidden_layers=2)
    model.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    common = ["calibrate", "--method", method, "--model", str(tmp_path / "model"), "--blocks", "4", "--seq-len", "64",
              "--batch-size", "2", "--r", "4"]
    assert main(common + ["--output", str(tmp_path / "whole.safetensors")]) == 0
    assert main(common + ["--sequential", "--output", str(tmp_path / "seq.safetensors")]) == 0
    if method == "basis":  # directions instead of Grams: the same adapter
        assert main(common + ["--sequential", "--bases-only", "--output", str(tmp_path / "bases.safetensors")]) == 0
    whole = CalibrationStatistics.load(str(tmp_path / "whole.safetensors"))
    seq = CalibrationStatistics.load(str(tmp_path / "seq.safetensors"))
    assert whole.sources == seq.sources and len(whole.sources) == 14
    for k in whole.grams:
        torch.testing.assert_close(seq.grams[k], whole.grams[k], rtol=1e-5, atol=1e-5)
    fisher = sorted(k for k in whole.extra if k.startswith("fisher"))
    assert len(fisher) == (14 if method == "basis" else 0)
    assert fisher == sorted(k for k in seq.extra if k.startswith("fisher"))
    for k in fisher:
        torch.testing.assert_close(seq.extra[k], whole.extra[k], rtol=1e-4, atol=1e-8)
    if method == "basis":
        configs = [peft_basis.BasisConfig(r=4, rank_allocation="fisher") for _ in range(3)]
        models = []
        for config, path in zip(configs, ["whole", "seq", "bases"]):
            peft_basis.use_statistics(config, str(tmp_path / f"{path}.safetensors"))
            models.append(get_peft_model(load_default_model(num_hidden_layers=2)[0], config))
        assert configs[0].rank_pattern == configs[1].rank_pattern == configs[2].rank_pattern
        assert not CalibrationStatistics.load(str(tmp_path / "bases.safetensors")).grams
        ref = models[0].state_dict()
        for m in models[1:]:  # (the whole-model Grams are summed a sequence at a time: another rounding)
            for k, v in m.state_dict().items():  # atol on the tensor's scale: o_proj's basis_R reaches 25
                scale = max(1.0, float(ref[k].abs().max()))
                torch.testing.assert_close(v, ref[k], rtol=1e-4, atol=3e-5 * scale)
