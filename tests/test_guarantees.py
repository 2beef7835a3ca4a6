"""What peft-basis guarantees (docs/guarantees.md), one test per item of issue 14: nothing lost, nothing silently
wrong, half precision everywhere, and a clear error (naming the problem and the fix) for every bad input."""

from __future__ import annotations

import json
import os
import shutil
import warnings

import pytest
import torch
from peft import PeftModel, get_peft_model

import peft_basis
from peft_basis import BaselConfig, BasisConfig, CalibrationStatistics, SharedBasisConfig, TaskVectorBasis, calibrate
from peft_basis.errors import BaseModelMismatchError, CalibrationError, CheckpointError, ConfigError, TaskVectorError

from .models import tiny_llama, token_batches

IDS = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(11))
DATA = token_batches(2, batch=4, seq=32)
CONFIGS = {
    "shared_basis": lambda: SharedBasisConfig(compression_ratio=0.3, group_size=2),
    "basel": lambda: BaselConfig(keep_ratio=0.5),
    "basis": lambda: BasisConfig(r=4),
}


def logits(model, ids=IDS):
    with torch.no_grad():
        return model(ids).logits


def make(base, kind="shared_basis", data=DATA, config=None):
    config = config or CONFIGS[kind]()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        calibrate(base, config, data, progress=False)
        return get_peft_model(base, config), config


def state(model) -> dict:
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A Basis Sharing adapter of tiny_llama(2), saved: (folder, its logits)."""
    folder = tmp_path_factory.mktemp("adapter")
    pm, _ = make(tiny_llama(2))
    pm.save_pretrained(folder)
    return str(folder), logits(pm)


def copy_of(folder, tmp_path, name="copy") -> str:
    dst = tmp_path / name
    shutil.copytree(folder, dst)
    return str(dst)


# ==== data loss and silent wrong results ======================================================================
@pytest.mark.parametrize("kind", ["shared_basis", "basel"])
def test_one_config_object_compresses_a_second_model_too(kind):
    config = CONFIGS[kind]()
    first, _ = make(tiny_llama(2, seed=0), config=config)
    second, _ = make(tiny_llama(2, seed=1), config=config)  # the same object again
    reference, _ = make(tiny_llama(2, seed=1), kind)  # a fresh config with the same settings
    assert torch.equal(logits(second), logits(reference))
    assert first.peft_config["default"] is config and second.peft_config["default"] is not config


def _break_safetensors_save(monkeypatch):
    import peft.peft_model

    def half_written(tensors, path, metadata=None):
        with open(path, "wb") as f:
            f.write(b"\x00" * 40)  # a crash midway: a truncated file
        raise OSError("disk full")

    monkeypatch.setattr(peft.peft_model, "safe_save_file", half_written)


def test_a_failed_save_over_a_good_adapter_keeps_it(saved, tmp_path, monkeypatch):
    folder, expected = saved
    target = copy_of(folder, tmp_path)
    with open(os.path.join(target, "notes.txt"), "w") as f:
        f.write("mine")
    pm, _ = make(tiny_llama(2), config=SharedBasisConfig(compression_ratio=0.5, group_size=1))
    _break_safetensors_save(monkeypatch)
    with pytest.raises(OSError, match="disk full"):
        pm.save_pretrained(target)
    monkeypatch.undo()
    assert torch.equal(logits(PeftModel.from_pretrained(tiny_llama(2), target)), expected)
    assert sorted(os.listdir(tmp_path)) == ["copy"]  # no temporary folder left beside it
    pm.save_pretrained(target)  # a save that succeeds replaces it whole, and keeps the user's files
    assert torch.equal(logits(PeftModel.from_pretrained(tiny_llama(2), target)), logits(pm))
    assert open(os.path.join(target, "notes.txt")).read() == "mine"


def test_a_failed_card_write_keeps_the_old_folder(saved, tmp_path, monkeypatch):
    folder, expected = saved
    target = copy_of(folder, tmp_path)
    before = {f: open(os.path.join(target, f), "rb").read() for f in os.listdir(target)}
    pm, _ = make(tiny_llama(2), config=SharedBasisConfig(compression_ratio=0.5, group_size=1))
    monkeypatch.setattr(peft_basis.hub, "write_model_card", lambda *a, **k: (_ for _ in ()).throw(OSError("boom")))
    with pytest.raises(OSError, match="boom"):
        pm.save_pretrained(target)
    assert {f: open(os.path.join(target, f), "rb").read() for f in os.listdir(target)} == before


def test_a_failed_statistics_save_keeps_the_old_file(tmp_path, monkeypatch):
    base = tiny_llama(2)
    path = str(tmp_path / "stats.safetensors")
    good = calibrate(base, SharedBasisConfig(), DATA, progress=False, save_to=path)
    import peft_basis.calibration.statistics as statistics

    def half_written(tensors, file, metadata=None):
        open(file, "wb").write(b"\x01" * 10)
        raise OSError("disk full")

    monkeypatch.setattr(statistics, "save_file", half_written)
    with pytest.raises(OSError):
        good.save(path)
    monkeypatch.undo()
    again = CalibrationStatistics.load(path)
    assert all(torch.equal(again.grams[k], good.grams[k]) for k in good.grams)


def _two_task_bases():
    base = tiny_llama(1, seed=0)
    tunes = [tiny_llama(1, seed=s) for s in (1, 2, 3)]
    a = TaskVectorBasis.from_models(base, tunes, method="pca", num_bases=1, task_names=["a", "b", "c"])
    b = TaskVectorBasis.from_models(base, tunes[::-1], method="pca", num_bases=2, task_names=["x", "y", "z"])
    return a, b


def test_task_vector_basis_save_is_one_step(tmp_path, monkeypatch):
    old, new = _two_task_bases()
    folder = str(tmp_path / "tvb")
    old.save_pretrained(folder)
    import peft_basis.task_vectors.basis as tvb

    # a crash after the vectors are written and before the JSON: the folder must still hold the old pair
    monkeypatch.setattr(tvb, "atomic_write_text", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        new.save_pretrained(folder)
    monkeypatch.undo()
    back = TaskVectorBasis.from_pretrained(folder)
    assert back.task_names == ["a", "b", "c"] and back.num_bases == 1
    assert all(torch.equal(back.bases[k], old.bases[k]) for k in old.keys)
    # files of two different saves side by side are refused, not read under each other's names
    new.save_pretrained(str(tmp_path / "other"))
    shutil.copy(tmp_path / "other" / tvb.WEIGHTS_NAME, tmp_path / "tvb" / tvb.WEIGHTS_NAME)
    with pytest.raises(TaskVectorError, match="two different saves"):
        TaskVectorBasis.from_pretrained(folder)


@pytest.mark.parametrize("kind", ["shared_basis", "basel", "basis"])
def test_saving_after_merge_and_unload_is_refused(kind, tmp_path):
    pm, _ = make(tiny_llama(2), kind)
    pm.merge_and_unload()
    with pytest.raises(CheckpointError, match=r"merge_and_unload\(\).*merged.save_pretrained"):
        pm.save_pretrained(tmp_path / "out")
    assert not os.path.exists(tmp_path / "out")


def test_a_failed_get_peft_model_leaves_the_model_as_it_was(monkeypatch):
    base = tiny_llama(2)
    before, out = state(base), logits(base)
    config = SharedBasisConfig(compression_ratio=0.96, group_size="auto")
    calibrate(base, config, DATA, progress=False)
    with pytest.raises(ValueError, match="lower the ratio"):
        get_peft_model(base, config)
    # a failure deep inside (here: the 5th factorisation) as well
    import peft_basis.tuners.shared_basis.model as sb_model

    calls = {"n": 0}
    real = sb_model.factorize_group

    def failing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:
            raise RuntimeError("out of memory")
        return real(*args, **kwargs)

    monkeypatch.setattr(sb_model, "factorize_group", failing)
    config = SharedBasisConfig(compression_ratio=0.3, group_size=1)
    calibrate(base, config, DATA, progress=False)
    with pytest.raises(RuntimeError, match="out of memory"):
        get_peft_model(base, config)
    after = state(base)
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    assert torch.equal(logits(base), out)
    assert not config.groups and not config.rank_pattern  # nothing half-filled: the next call creates
    monkeypatch.undo()
    pm = get_peft_model(base, config)
    assert torch.isfinite(logits(pm)).all()


@pytest.mark.parametrize("kind", ["shared_basis", "basel", "basis"])
def test_a_safe_merge_of_non_finite_factors_is_refused_and_changes_nothing(kind):
    pm, _ = make(tiny_llama(2), kind)
    out = logits(pm)
    last = [m for m in pm.modules() if hasattr(m, "merge") and hasattr(m, "base_layer")][-1]
    param = next(p for n, p in last.named_parameters() if "base_layer" not in n)
    good = param[(0,) * param.dim()].item()
    with torch.no_grad():
        param[(0,) * param.dim()] = float("nan")
    before = state(pm)
    # the last module is bad: PEFT merges module by module, so every module is checked before any is merged
    for merge in (lambda: pm.merge_and_unload(safe_merge=True), lambda: pm.base_model.merge_adapter(safe_merge=True)):
        with pytest.raises(ValueError, match=r"1 modules .*refusing to merge, and nothing was merged"):
            merge()
        after = state(pm)
        assert after.keys() == before.keys()
        for k in before:  # not one module merged
            torch.testing.assert_close(after[k], before[k], rtol=0, atol=0, equal_nan=True)
        assert not any(getattr(m, "merged", False) for m in pm.modules())
    with torch.no_grad():
        param[(0,) * param.dim()] = good
    merged = pm.merge_and_unload(safe_merge=True)  # finite: merges
    torch.testing.assert_close(logits(merged), out, atol=1e-4, rtol=1e-4)


# ---- loading checks what it loads ----------------------------------------------------------------------------
def _edit_tensors(folder, edit):
    from safetensors.torch import load_file, save_file

    path = os.path.join(folder, "adapter_model.safetensors")
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def _first_coefficient(tensors):
    return next(k for k in sorted(tensors) if k.endswith("sb_coefficient"))


@pytest.mark.parametrize("damage,message", [
    (lambda t: t[_first_coefficient(t)].view(-1)[:3].fill_(float("nan")), "NaN/Inf"),
    (lambda t: t.__setitem__(_first_coefficient(t), t[_first_coefficient(t)].to(torch.int32)), "stored as torch.int32"),
    (lambda t: t.pop(_first_coefficient(t)), "lacks 1 of the"),
])
def test_loading_refuses_damaged_tensors(saved, tmp_path, damage, message):
    folder = copy_of(saved[0], tmp_path)
    _edit_tensors(folder, damage)
    with pytest.raises(CheckpointError, match=message):
        PeftModel.from_pretrained(tiny_llama(2), folder)


def test_loading_refuses_a_peft_type_edited_to_another_method(saved, tmp_path):
    folder = copy_of(saved[0], tmp_path)
    path = os.path.join(folder, "adapter_config.json")
    cfg = json.load(open(path))
    cfg["peft_type"] = "BASEL"
    json.dump(cfg, open(path, "w"))
    with warnings.catch_warnings(), pytest.raises(CheckpointError, match="says this is a Basel adapter.*Basis Sharing"):
        warnings.simplefilter("ignore")
        PeftModel.from_pretrained(tiny_llama(2), folder)


def test_an_adapter_of_a_model_with_other_weights_is_refused(saved):
    with pytest.raises(BaseModelMismatchError, match="another base model.*Load it onto the base model"):
        PeftModel.from_pretrained(tiny_llama(2, seed=5), saved[0])  # same architecture, other weights


def test_statistics_of_a_model_with_other_weights_are_refused():
    stats = calibrate(tiny_llama(2, seed=5), SharedBasisConfig(), DATA, progress=False)
    config = SharedBasisConfig()
    config.attach_statistics(stats)
    model = tiny_llama(2)
    before = state(model)
    with pytest.raises(BaseModelMismatchError, match="calibration statistics.*Calibrate this model"):
        get_peft_model(model, config)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_statistics_files_are_checked_on_load(tmp_path):
    from safetensors.torch import load_file, save_file
    from safetensors import safe_open

    path = str(tmp_path / "s.safetensors")
    calibrate(tiny_llama(2), SharedBasisConfig(), DATA, progress=False, save_to=path)
    with safe_open(path, framework="pt") as f:
        metadata = f.metadata()
    tensors = load_file(path)
    # an input Gram, an output Gram (down_proj's, streamed by default), the input trace beside it
    firsts = [min(k for k in tensors if k.startswith(p)) for p in ("gram/", "extra/output_gram/", "extra/input_trace/")]
    for first in firsts:
        for edit, message in ((lambda t: t.__setitem__(first, t[first].int()), "stored as torch.int32"),
                              (lambda t: t.pop(first), "incomplete"),
                              (lambda t: t[first].view(-1)[0].fill_(float("nan")), "NaN or Inf")):
            damaged = {k: v.clone() for k, v in tensors.items()}
            edit(damaged)
            save_file(damaged, str(tmp_path / "d.safetensors"), metadata=metadata)
            with pytest.raises(CalibrationError, match=message):
                CalibrationStatistics.load(str(tmp_path / "d.safetensors"))


def test_the_live_config_passed_to_from_pretrained_loads(saved, tmp_path):
    pm, config = make(tiny_llama(2))
    pm.save_pretrained(tmp_path)
    assert torch.equal(logits(PeftModel.from_pretrained(tiny_llama(2), tmp_path, config=config)), logits(pm))


def test_fp32_adapter_loads_onto_a_half_precision_base(saved):
    folder, expected = saved
    for dtype in (torch.float16, torch.bfloat16):
        reloaded = PeftModel.from_pretrained(tiny_llama(2).to(dtype), folder)
        assert {p.dtype for p in reloaded.base_model.sb_bases.parameters()} == {dtype}
        torch.testing.assert_close(logits(reloaded).float(), expected, atol=0.15, rtol=0.05)


# ---- silent wrong results at creation ------------------------------------------------------------------------
def test_nan_weight_is_refused_before_compression():
    base = tiny_llama(2)
    base.model.layers[1].mlp.down_proj.weight.data[0, 0] = float("nan")
    config = SharedBasisConfig(group_size=1, output_grams=False)
    calibrate(base, config, DATA, progress=False)
    with pytest.raises(ValueError, match=r"down_proj.weight holds 1 NaN.*reload it"):
        get_peft_model(base, config)
    # with its output Gram streamed (the default), the NaN shows there: refused at calibration, by the same message
    with pytest.raises(ValueError, match=r"down_proj.weight holds 1 NaN.*reload it"):
        calibrate(base, SharedBasisConfig(group_size=1), DATA, progress=False)


def test_every_calibration_pass_sees_the_batches_of_a_one_shot_iterator():
    """group_size="auto" keeps selection tokens and BASIS's Fisher allocation runs backward passes, both after the Gram
    pass: from a generator they saw nothing, and "auto" silently fell back to the error-based choice."""
    for make_config in (lambda: SharedBasisConfig(group_size="auto"), lambda: BasisConfig(r=4, rank_allocation="fisher")):
        kept = [calibrate(tiny_llama(2), make_config(), data, progress=False).extra
                for data in (list(DATA), (b for b in DATA))]
        assert kept[0] and kept[1].keys() == kept[0].keys()
        assert all(torch.allclose(kept[0][k].float(), kept[1][k].float()) for k in kept[0])


def test_compression_ratio_zero_and_shared_modules_naming_nothing_are_refused():
    with pytest.raises(ConfigError, match="fraction of parameters removed.*do not compress"):
        SharedBasisConfig(compression_ratio=0)
    config = SharedBasisConfig(group_size=2, shared_modules=["qproj"])
    with pytest.raises(ConfigError, match=r"\['qproj'\] name no targeted matrix.*self_attn.q_proj"):
        calibrate(tiny_llama(2), config, DATA, progress=False)  # before any work
    with pytest.raises(ConfigError, match=r"\['qproj'\] name no targeted matrix.*self_attn.q_proj"):
        get_peft_model(tiny_llama(2), config)
    with pytest.raises(ConfigError, match="would be ignored"):
        SharedBasisConfig(group_size="auto", shared_modules=["q_proj"])


# ==== files a user gets ========================================================================================
def test_every_saved_file_gets_the_umask_mode(tmp_path):
    old = os.umask(0o027)
    try:
        pm, _ = make(tiny_llama(2))
        pm.save_pretrained(tmp_path / "adapter")
        pm.save_pretrained(tmp_path / "adapter")  # over an existing folder too
        CalibrationStatistics.save(pm.peft_config["default"].calibration_statistics, str(tmp_path / "s.safetensors"))
        _two_task_bases()[0].save_pretrained(str(tmp_path / "tvb"))
        peft_basis.compress_sequential(tiny_llama(2), SharedBasisConfig(group_size=1), DATA, str(tmp_path / "seq"),
                                       progress=False)
    finally:
        os.umask(old)
    files = [tmp_path / "s.safetensors"] + [p for d in ("adapter", "tvb", "seq") for p in (tmp_path / d).iterdir()]
    assert {"README.md", "adapter_model.safetensors", "adapter_config.json"} <= {p.name for p in files}
    assert {p.name: oct(p.stat().st_mode & 0o777) for p in files} == {p.name: "0o640" for p in files}
    assert {oct((tmp_path / d).stat().st_mode & 0o777) for d in ("adapter", "tvb", "seq")} == {"0o750"}


def test_model_card_names_the_hub_id_never_a_local_path(tmp_path):
    from peft_basis.data import DEFAULT_MODEL_HUB_ID, cache_dir
    from peft_basis.hub import card_base_model

    local = tmp_path / "hub" / "models--org--tiny" / "snapshots" / "abc123"
    local.mkdir(parents=True)
    base = tiny_llama(2)
    base.name_or_path = str(local)
    pm, _ = make(base)
    pm.save_pretrained(tmp_path / "out")
    card = open(tmp_path / "out" / "README.md").read()
    assert "base_model: org/tiny" in card and str(tmp_path) not in card
    assert card_base_model(os.path.join(cache_dir(), "SmolLM2-135M-Instruct")) == DEFAULT_MODEL_HUB_ID
    assert card_base_model(str(tmp_path / "my-model")) == "my-model"
    assert card_base_model("org/name") == "org/name"


# ==== half precision ===========================================================================================
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("kind", ["shared_basis", "basel", "basis"])
def test_every_method_works_in_half_precision(kind, dtype, tmp_path):
    base = tiny_llama(2).to(dtype)
    pm, config = make(base, kind)
    stats = pm.peft_config["default"].calibration_statistics
    assert {g.dtype for g in stats.grams.values()} == {torch.float32}  # statistics accumulate in fp32
    if kind == "basel":
        pm.base_model.consolidate()
    out = logits(pm)
    assert out.dtype == dtype and torch.isfinite(out).all()
    if kind != "basis":  # compression: the factors are the model's weights, in its dtype
        factors = {p.dtype for n, p in pm.named_parameters() if any(s in n for s in ("sb_", "basel_"))}
        assert factors == {dtype}
    pm.save_pretrained(tmp_path)
    reloaded = PeftModel.from_pretrained(tiny_llama(2).to(dtype), tmp_path)
    assert torch.equal(logits(reloaded), out)
    merged = reloaded.merge_and_unload()
    torch.testing.assert_close(logits(merged).float(), out.float(), atol=0.05, rtol=0.02)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_layer_by_layer_and_lean_loading_in_half_precision(dtype, tmp_path):
    base = tiny_llama(2)
    base.save_pretrained(tmp_path / "base")
    config = SharedBasisConfig(compression_ratio=0.3, group_size=2)
    peft_basis.compress_sequential(str(tmp_path / "base"), config, DATA, str(tmp_path / "seq"), dtype=dtype,
                                   progress=False)
    lean = peft_basis.load_lean(str(tmp_path / "base"), str(tmp_path / "seq"), dtype=dtype)
    assert {p.dtype for p in lean.parameters()} == {dtype}
    from transformers import AutoModelForCausalLM

    full = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tmp_path / "base", dtype=dtype),
                                     str(tmp_path / "seq"))
    out = logits(lean)
    assert torch.isfinite(out).all() and torch.equal(out, logits(full))
    basel, _ = make(tiny_llama(2), "basel")  # an fp32 Basel adapter, consolidated, leanly onto the half model
    basel.base_model.consolidate()
    basel.save_pretrained(tmp_path / "basel")
    lean = peft_basis.load_lean(str(tmp_path / "base"), str(tmp_path / "basel"), dtype=dtype)
    assert {p.dtype for p in lean.parameters()} == {dtype}
    torch.testing.assert_close(logits(lean).float(), logits(basel), atol=0.15, rtol=0.05)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_trainer_trains_every_method_in_half_precision(dtype, tmp_path):
    from transformers import Trainer, TrainingArguments

    data = [{"input_ids": t, "labels": t} for t in torch.cat(DATA)]
    for kind in CONFIGS:
        pm, _ = make(tiny_llama(2).to(dtype), kind)
        args = TrainingArguments(output_dir=str(tmp_path / kind), max_steps=1, per_device_train_batch_size=4,
                                 learning_rate=1e-3, report_to=[], save_strategy="steps", save_steps=1,
                                 logging_strategy="no", disable_tqdm=True, use_cpu=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            Trainer(model=pm, args=args, train_dataset=data).train()
        assert torch.isfinite(logits(pm)).all()
        assert os.path.exists(tmp_path / kind / "checkpoint-1" / "adapter_model.safetensors")


# ==== obscure errors made clear ================================================================================
@pytest.mark.parametrize("make_config,message", [
    (lambda: SharedBasisConfig(compression_ratio="abc"), r"compression_ratio.*must be in \(0, 1\) \(a number\), not str"),
    (lambda: SharedBasisConfig(damping="x"), r"damping must be > 0 \(a number\), not str"),
    (lambda: SharedBasisConfig(auto_group_sizes=[0]), r"auto_group_sizes must be a non-empty list of ints >= 1"),
    (lambda: SharedBasisConfig(group_size="two"), r"group_size must be >= 1 \(an int\).*or 'auto'"),
    (lambda: BaselConfig(keep_ratio="half"), r"keep_ratio.*must be in \(0, 1\] \(a number\), not str"),
    (lambda: BaselConfig(pruning_steps=2.5), r"pruning_steps must be >= 1 \(an int\)"),
    (lambda: BasisConfig(r="8"), r"r must be >= 1 \(an int\), not str"),
    (lambda: BasisConfig(alpha=None), r"alpha must be > 0 \(a number\), not NoneType"),
])
def test_config_fields_of_the_wrong_type_are_named(make_config, message):
    with pytest.raises(ConfigError, match=message):
        make_config()


@pytest.mark.parametrize("batch,message", [
    (torch.tensor([[1, 2, 500]]), r"token id 500 is outside this model's vocabulary \[0, 128\)"),
    (torch.tensor([[1, -1, 2]]), r"token id -1 is outside"),
    ({"input_ids": torch.ones(2, 8, dtype=torch.long), "attention_mask": torch.ones(2, 5)},
     r"attention_mask has shape \(2, 5\) but input_ids \(2, 8\)"),
])
def test_bad_token_batches_are_named(batch, message):
    with pytest.raises(CalibrationError, match=message):
        calibrate(tiny_llama(2), SharedBasisConfig(), [batch], progress=False)
    with pytest.raises(CalibrationError, match=message):
        peft_basis.calibrate_sequential(tiny_llama(2), SharedBasisConfig(), [batch], progress=False)


def test_missing_or_damaged_adapter_files_are_named(saved, tmp_path):
    folder = copy_of(saved[0], tmp_path)
    weights = os.path.join(folder, "adapter_model.safetensors")
    data = open(weights, "rb").read()
    open(weights, "wb").write(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="damaged or truncated.*save or download it again"):
        PeftModel.from_pretrained(tiny_llama(2), folder)
    os.remove(weights)
    with pytest.raises(CheckpointError, match="no adapter_model.safetensors.*Save the adapter again"):
        PeftModel.from_pretrained(tiny_llama(2), folder)
    with pytest.raises(FileNotFoundError, match="No adapter folder at /nonexistent/adapter"):
        PeftModel.from_pretrained(tiny_llama(2), "/nonexistent/adapter")
    cfg = os.path.join(folder, "adapter_config.json")
    open(cfg, "w").write('{"peft_type": "SHARED_BASIS", ')
    with pytest.raises(CheckpointError, match="adapter_config.json is not valid JSON"):
        PeftModel.from_pretrained(tiny_llama(2), folder)
    open(cfg, "w").write('{"peft_type": "NO_SUCH_METHOD"}')
    with pytest.raises(ValueError, match="peft_type 'NO_SUCH_METHOD', which no installed package registered"):
        PeftModel.from_pretrained(tiny_llama(2), folder)


def test_an_adapter_onto_a_model_of_other_sizes_is_named(saved):
    with pytest.raises(ValueError, match="made for another model.*Load it onto the base model"):
        PeftModel.from_pretrained(tiny_llama(1), saved[0])  # fewer layers
    from transformers import LlamaConfig, LlamaForCausalLM

    wider = LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=96, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2)).eval()
    with pytest.raises((CheckpointError, BaseModelMismatchError), match="other sizes|another base model"):
        PeftModel.from_pretrained(wider, saved[0])


def test_statistics_of_a_model_of_other_shapes_and_save_to_a_folder_are_named(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    other = LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2)).eval()
    stats = calibrate(other, SharedBasisConfig(), DATA, progress=False)
    stats.meta.pop("base_model_fingerprint")  # shapes alone must be caught too
    config = SharedBasisConfig()
    config.attach_statistics(stats)
    with pytest.raises(CalibrationError, match=r"Gram of model.layers.0.self_attn.q_proj is 32x32.*takes 64 inputs"):
        get_peft_model(tiny_llama(2), config)
    with pytest.raises(CalibrationError, match="is a folder; statistics are one file"):
        calibrate(tiny_llama(2), SharedBasisConfig(), DATA, progress=False, save_to=str(tmp_path))


class _Evil:
    def __reduce__(self):
        return (print, ("this ran",))


def test_malicious_pickles_are_refused_plainly(saved, tmp_path):
    folder = copy_of(saved[0], tmp_path)
    os.remove(os.path.join(folder, "adapter_model.safetensors"))
    torch.save({"x": _Evil()}, os.path.join(folder, "adapter_model.bin"))
    with pytest.raises(CheckpointError, match=r"torch.load\(weights_only=True\) refuses it"):
        PeftModel.from_pretrained(tiny_llama(2), folder)
    tune = tmp_path / "fine_tune"
    tune.mkdir()
    torch.save({"model.embed_tokens.weight": _Evil()}, tune / "pytorch_model.bin")
    with pytest.raises(TaskVectorError, match=r"cannot be read safely with torch.load\(weights_only=True\)"):
        TaskVectorBasis.from_models(tiny_llama(1), [str(tune), str(tune)], num_bases=1)


@pytest.mark.parametrize("argv,message", [
    (["--model", "/nonexistent"], "--model /nonexistent: the folder does not exist"),
    (["--group-size", "foo"], "--group-size foo: pass a positive integer"),
    (["--seq-len", "0"], "--seq-len 0: must be a positive integer"),
    (["--ratio", "1.5"], r"compression_ratio.*must be in \(0, 1\)"),
])
def test_command_line_arguments_are_checked_before_any_work(argv, message, monkeypatch):
    import peft_basis.data
    from peft_basis import cli

    monkeypatch.setattr(peft_basis.data, "load_model", lambda *a, **k: pytest.fail("loaded the model first"))
    with pytest.raises(SystemExit, match=message):
        cli.run(argv)


def test_no_unsafe_load_anywhere():
    """Every torch.load in the package reads with weights_only=True."""
    import ast

    package = os.path.dirname(peft_basis.__file__)
    for root, _, files in os.walk(package):
        for f in files:
            if not f.endswith(".py"):
                continue
            tree = ast.parse(open(os.path.join(root, f)).read())
            for node in ast.walk(tree):
                if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "load" and \
                        getattr(node.func.value, "id", None) == "torch":
                    kw = {k.arg: k.value for k in node.keywords}
                    assert "weights_only" in kw and getattr(kw["weights_only"], "value", None) is True, f"{f}:{node.lineno}"
