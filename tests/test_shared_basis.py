"""SharedBasisConfig (Basis Sharing) through PEFT's own calls, on every architecture we support."""

import json
import warnings

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file

import peft_basis  # noqa: F401
from peft_basis import SharedBasisConfig, calibrate
from peft_basis.evaluation import count_parameters
from peft_basis.modules import linear_weight
from peft_basis.tuners.shared_basis.auto import selection_batches

from .models import BUILDERS, fresh_copy, tiny_llama, token_batches

IDS = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(7))


def relative_output_error(weight, approx, gram) -> float:
    """tr((W - W') G (W - W')^T) / tr(W G W^T): the calibration output error of an approximation."""
    d, w, g = (weight - approx).double(), weight.double(), gram.double()
    return float(((d @ g) * d).sum() / ((w @ g) * w).sum())


def compress(model, data=None, **kwargs):
    config = SharedBasisConfig(**kwargs)
    stats = calibrate(model, config, data or token_batches(4), progress=False)
    peft_model = get_peft_model(model, config)
    return peft_model, config, stats


@pytest.mark.parametrize("arch", ["llama", "mistral", "opt", "gpt2"])
@pytest.mark.parametrize("ratio", [0.2, 0.4])
def test_compress_save_reload_merge(arch, ratio, tmp_path):
    base = BUILDERS[arch]()
    dense_state = {k: v.clone() for k, v in base.state_dict().items()}
    dense_total = count_parameters(base)
    shapes = {n: tuple(linear_weight(m).shape) for n, m in base.named_modules() if hasattr(m, "weight") and
              type(m).__name__ in ("Linear", "Conv1D")}
    peft_model, config, _ = compress(base, compression_ratio=ratio, group_size=2)

    # exact ratio: stored <= (1 - ratio) of the targeted dense parameters, within one rank step of it
    members = [m for ms in config.groups.values() for m in ms]
    dense = sum(shapes[m][0] * shapes[m][1] for m in members)
    stored = peft_model.base_model.stored_parameters()
    step = max(shapes[ms[0]][1] + len(ms) * shapes[ms[0]][0] for ms in config.groups.values())
    assert stored <= (1 - ratio) * dense
    assert stored > (1 - ratio) * dense - step
    # the model really is smaller, by exactly what was removed (tied embeddings stay tied)
    assert count_parameters(peft_model) == dense_total - dense + stored
    report = peft_model.base_model.compression_report
    assert {m: r["rank"] for r in report for m in r["members"]} == config.rank_pattern

    with torch.no_grad():
        out = peft_model(IDS).logits
    peft_model.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "adapter_model.safetensors")
    basis_keys = [k for k in saved if ".sb_bases." in k]
    assert len(basis_keys) == len(config.groups)  # each shared basis stored once
    assert sum(".sb_coefficient" in k for k in saved) == len(members)
    cfg_json = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg_json["peft_type"] == "SHARED_BASIS" and "import peft_basis" in cfg_json["requires"]

    fresh = BUILDERS[arch]()
    fresh.load_state_dict(dense_state)
    reloaded = PeftModel.from_pretrained(fresh, tmp_path)
    with torch.no_grad():
        assert torch.equal(reloaded(IDS).logits, out)
    merged = reloaded.merge_and_unload()
    assert type(merged).__name__ == type(base).__name__
    with torch.no_grad():
        torch.testing.assert_close(merged(IDS).logits, out, atol=1e-4, rtol=1e-4)


def test_shared_bases_are_one_tensor_for_the_whole_group():
    peft_model, config, _ = compress(tiny_llama(), compression_ratio=0.3, group_size=2)
    layers = peft_model.base_model.model.model.layers
    assert layers[0].self_attn.q_proj.basis("default") is layers[1].self_attn.q_proj.basis("default")
    assert layers[0].self_attn.o_proj.basis("default") is not layers[1].self_attn.o_proj.basis("default")  # private
    assert config.groups["self_attn_q_proj__0-1"] == ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"]


def test_whitened_factors_beat_plain_svd_on_calibration_inputs():
    data = token_batches(6)
    base = tiny_llama()
    weights = {n: linear_weight(m).detach().clone() for n, m in base.named_modules() if type(m).__name__ == "Linear"}
    white, config, stats = compress(fresh_copy(base), data, compression_ratio=0.4, group_size=1, output_grams=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plain = get_peft_model(fresh_copy(base), SharedBasisConfig(compression_ratio=0.4, group_size=1))
    wins = 0
    for name in config.groups.values():
        name = name[0]
        mw = white.base_model.model.get_submodule(name)
        mp = plain.base_model.model.get_submodule(name)
        e_w = relative_output_error(weights[name], mw.effective_weight("default"), stats.gram(name))
        e_p = relative_output_error(weights[name], mp.effective_weight("default"), stats.gram(name))
        assert e_w <= e_p + 1e-9
        wins += e_w < 0.99 * e_p
    assert wins >= len(config.groups) // 2


def test_without_calibration_warns_and_still_works():
    with pytest.warns(UserWarning, match="no calibration statistics"):
        pm = get_peft_model(tiny_llama(), SharedBasisConfig(compression_ratio=0.2))
    assert torch.isfinite(pm(IDS).logits).all()


def test_loading_never_runs_an_svd(tmp_path, monkeypatch):
    base = tiny_llama()
    state = {k: v.clone() for k, v in base.state_dict().items()}
    pm, _, _ = compress(base, compression_ratio=0.3)
    with torch.no_grad():
        out = pm(IDS).logits
    pm.save_pretrained(tmp_path)

    def no_svd(*a, **k):
        raise AssertionError("an SVD ran while loading")

    monkeypatch.setattr(torch.linalg, "svd", no_svd)
    monkeypatch.setattr(torch.linalg, "eigh", no_svd)
    for low_mem in (False, True):
        fresh = tiny_llama()
        fresh.load_state_dict(state)
        re = PeftModel.from_pretrained(fresh, tmp_path, low_cpu_mem_usage=low_mem)
        with torch.no_grad():
            assert torch.equal(re(IDS).logits, out)


def test_loading_onto_another_model_is_a_clear_error(tmp_path):
    pm, _, _ = compress(tiny_llama(layers=4), compression_ratio=0.3)
    pm.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="made for another model"):
        PeftModel.from_pretrained(tiny_llama(layers=6), tmp_path)


def test_bad_inputs_give_clear_errors():
    with pytest.raises(ValueError, match="fraction of parameters removed"):
        SharedBasisConfig(compression_ratio=1.5)
    with pytest.raises(ValueError, match="group_size"):
        SharedBasisConfig(group_size=0)
    pm, _, _ = compress(tiny_llama(), compression_ratio=0.2)
    with pytest.raises(ValueError, match="one Basis Sharing adapter"):
        pm.add_adapter("second", SharedBasisConfig())
    with pytest.raises(RuntimeError, match="dense weights were dropped"):
        with pm.disable_adapter():
            pm(IDS)


def test_keep_dense_weight_allows_disable():
    base = tiny_llama()
    with torch.no_grad():
        dense = base(IDS).logits
    pm, _, _ = compress(base, compression_ratio=0.2, keep_dense_weight=True)
    with torch.no_grad(), pm.disable_adapter():
        assert torch.equal(pm(IDS).logits, dense)


def test_auto_group_size_never_worse_than_private_in_calibration_error():
    data = token_batches(6)
    base = tiny_llama()
    # auto_selection_tokens=0: choose by calibration output error alone (no data kept for a loss)
    auto, cfg_auto, stats = compress(fresh_copy(base), data, compression_ratio=0.3, group_size="auto",
                                     auto_selection_tokens=0)
    private, cfg_priv, _ = compress(fresh_copy(base), data, compression_ratio=0.3, group_size=1)
    weights = {n: linear_weight(m).detach() for n, m in base.named_modules() if type(m).__name__ == "Linear"}

    def total_error(pm, config):
        err = 0.0
        for members in config.groups.values():
            for name in members:
                g = stats.gram(name).double()
                d = weights[name].double() - pm.base_model.model.get_submodule(name).effective_weight("default").detach().double()
                err += float(torch.einsum("oi,ij,oj->", d, g, d))
        return err

    assert total_error(auto, cfg_auto) <= total_error(private, cfg_priv) * (1 + 1e-6)
    assert auto.base_model.stored_parameters() <= 0.7 * sum(w.numel() for n, w in weights.items() if "layers" in n)


def test_auto_group_size_chooses_by_model_loss_on_held_apart_calibration_tokens():
    data = token_batches(6)
    base = tiny_llama()
    auto, cfg, stats = compress(fresh_copy(base), data, compression_ratio=0.3, group_size="auto",
                                auto_selection_tokens=40)
    kept = [k for k in stats.extra if k.startswith("selection/")]
    assert kept and sum(stats.extra[k].numel() for k in kept if k.endswith("input_ids")) >= 40
    scores = auto.base_model.auto_selection
    assert set(scores) == {"model.layers.*.self_attn.q_proj", "model.layers.*.self_attn.k_proj",
                           "model.layers.*.self_attn.v_proj", "model.layers.*.self_attn.o_proj",
                           "model.layers.*.mlp.gate_proj", "model.layers.*.mlp.up_proj", "model.layers.*.mlp.down_proj"}
    # every matrix type kept the grouping with the lowest loss (ties keep private factors)
    for type_name, by_size in scores.items():
        size = len(next(m for k, m in cfg.groups.items() if k.startswith(type_name.split("*.")[1].replace(".", "_"))))
        assert by_size[size] == min(by_size.values()), type_name
    # it chose on batches the Grams never saw (the last quarter), not on the tokens it fitted
    held = stats.meta["held_apart_batches"]
    assert held == [4, 5]
    batches = selection_batches(stats)
    assert torch.equal(batches[0]["input_ids"], data[4])
    # the first type's private candidate is scored exactly as that model: q_proj alone compressed per layer,
    # fitted on the other batches
    only_q, _, _ = compress(fresh_copy(base), data[:4], compression_ratio=0.3, group_size=1, target_modules=["q_proj"])
    with torch.no_grad():
        losses = [(float(only_q(**b).loss), int((b["labels"][:, 1:] != -100).sum())) for b in batches]
    expected = sum(l * n for l, n in losses) / sum(n for _, n in losses)
    assert abs(scores["model.layers.*.self_attn.q_proj"][1] - expected) < 1e-5


def test_trains_in_trainer_and_a_lora_stacks_on_the_compressed_model(tmp_path):
    from transformers import Trainer, TrainingArguments

    base = tiny_llama()
    state = {k: v.clone() for k, v in base.state_dict().items()}
    pm, _, _ = compress(base, compression_ratio=0.3)
    trainable = [n for n, p in pm.named_parameters() if p.requires_grad]
    assert any("sb_bases" in n for n in trainable) and any("sb_coefficient" in n for n in trainable)
    before = {n: p.detach().clone() for n, p in pm.named_parameters() if p.requires_grad}
    train = [{"input_ids": x, "labels": x} for x in torch.randint(0, 128, (16, 24), generator=torch.Generator().manual_seed(3))]
    args = TrainingArguments(output_dir=str(tmp_path / "run"), per_device_train_batch_size=4, max_steps=4,
                             learning_rate=1e-3, report_to=[], save_strategy="no", use_cpu=True, logging_steps=1)
    result = Trainer(model=pm, args=args, train_dataset=train).train()
    assert result.global_step == 4 and torch.isfinite(torch.tensor(result.training_loss))
    changed = [n for n, p in pm.named_parameters() if p.requires_grad and not torch.equal(p, before[n])]
    assert len(changed) == len(before)
    pm.save_pretrained(tmp_path / "sb")

    # the paper's recovery step: a LoRA on the compressed model, saved and reloaded on top of it
    def compressed_base():
        fresh = tiny_llama()
        fresh.load_state_dict(state)
        return PeftModel.from_pretrained(fresh, tmp_path / "sb").merge_and_unload()

    lora = get_peft_model(compressed_base(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    with torch.no_grad():
        out = lora(IDS).logits
    lora.save_pretrained(tmp_path / "lora")
    again = PeftModel.from_pretrained(compressed_base(), tmp_path / "lora")
    with torch.no_grad():
        assert torch.equal(again(IDS).logits, out)
