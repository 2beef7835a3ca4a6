"""Standalone compressed checkpoints (peft_basis.standalone): save -> load without the dense base, same
logits and parameters, the size the removed parameters predict, int8 factors, the Hub, atomic writes,
and a clear error for every broken checkpoint a user can meet."""

import copy
import json
import os
import subprocess
import sys

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

import peft_basis  # noqa: F401
from peft_basis import BaselConfig, CompressedModel, SharedBasisConfig, calibrate, save_compressed
from peft_basis.evaluation import count_parameters, size_on_disk
from peft_basis.standalone import CompressedCheckpointError, LowRankLinear
from peft_basis.standalone.checkpoint import COMPRESSION_CONFIG, INDEX, SCALE_SUFFIX, dequantize_rows_int8

from .models import fresh_copy, tiny_gpt2, tiny_llama, token_batches

IDS = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(3))
TOKEN = "hf_tester_write"
pytestmark = pytest.mark.filterwarnings("ignore:BaselConfig. no calibration statistics")


def logits(model):
    with torch.no_grad():
        return model(IDS).logits


def shared_basis(build=tiny_llama, **kw):
    base = build(2, seed=0, **kw)
    dense = fresh_copy(base)
    base.name_or_path = "/home/someone/models/tiny-llama"  # a local path: must not be recorded
    config = SharedBasisConfig(compression_ratio=0.3, group_size=2)
    calibrate(base, config, token_batches(2), progress=False)
    return get_peft_model(base, config), dense


def basel(build=tiny_llama):
    base = build(2, seed=1)
    dense = fresh_copy(base)
    model = get_peft_model(base, BaselConfig(keep_ratio=0.6, extra_rank=4, target_modules=["q_proj", "v_proj", "down_proj"]))
    with torch.no_grad():  # a "trained" state: non-zero extra bases
        for n, p in model.named_parameters():
            if "basel" in n and p.requires_grad:
                p.add_(0.01 * torch.randn_like(p))
    model.base_model.prune_to(int(0.6 * model.base_model.dense_parameters()))
    model.base_model.consolidate()
    return model, dense


def weights_size(folder):
    return sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder) if f.endswith(".safetensors"))


def dense_size(dense, path, dtype=torch.float32):
    dense = copy.deepcopy(dense).to(dtype)
    dense.save_pretrained(path)
    return weights_size(path)


CASES = {
    "shared_basis_llama_tied": lambda: shared_basis(),
    "shared_basis_llama_untied": lambda: shared_basis(tie=False),
    "shared_basis_gpt2_conv1d": lambda: shared_basis(tiny_gpt2),
    "basel_llama": lambda: basel(),
}


@pytest.mark.parametrize("case", list(CASES))
def test_save_load_same_logits_parameters_and_size(case, tmp_path):
    peft_model, dense = CASES[case]()
    want = logits(peft_model)
    out = save_compressed(peft_model, str(tmp_path / "sa"), max_shard_size="100KB")  # several shards
    assert len([f for f in os.listdir(out) if f.endswith(".safetensors")]) > 1
    model = CompressedModel.from_pretrained(out)
    assert isinstance(model, type(dense)) and not model.training
    assert torch.equal(logits(model), want)  # the same forward, bitwise
    assert any(isinstance(m, LowRankLinear) for m in model.modules())
    assert not any("base_layer" in n or "sb_" in n or "basel_" in n for n, _ in model.named_parameters())
    # parameters: exactly the adapter model's, i.e. dense minus what the factorisation removed
    assert count_parameters(model) == count_parameters(peft_model)
    removed = count_parameters(dense) - count_parameters(model)
    assert removed > 0
    compression = json.load(open(os.path.join(out, COMPRESSION_CONFIG)))
    assert compression["parameters"] == count_parameters(model)
    if dense.config.tie_word_embeddings:
        assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
        assert compression["tied_weights"]
    # size on disk: the dense checkpoint minus the removed parameters' bytes, within 1%
    expected = dense_size(dense, tmp_path / "dense") - 4 * removed
    assert abs(weights_size(out) - expected) / expected < 0.01, (weights_size(out), expected)
    # bf16: half of that, and the same logits as the adapter model with its parameters cast to bf16 (buffers such
    # as rotary frequencies stay float32, as a bf16 checkpoint loads them)
    out16 = save_compressed(peft_model, str(tmp_path / "sa16"), dtype=torch.bfloat16)
    model16 = CompressedModel.from_pretrained(out16)
    assert model16.dtype == torch.bfloat16 and json.load(open(os.path.join(out16, "config.json")))["dtype"] == "bfloat16"
    peft16 = copy.deepcopy(peft_model)
    for p in peft16.parameters():
        p.data = p.data.to(torch.bfloat16)
    assert torch.equal(logits(model16), logits(peft16))
    expected16 = dense_size(dense, tmp_path / "dense16", torch.bfloat16) - 2 * removed
    assert abs(weights_size(out16) - expected16) / expected16 < 0.01


def test_compression_config_records_how_it_was_made(tmp_path):
    peft_model, _ = shared_basis()
    out = save_compressed(peft_model, str(tmp_path / "sa"))
    c = json.load(open(os.path.join(out, COMPRESSION_CONFIG)))
    assert c["format_version"] == 1 and c["peft_basis_version"] == peft_basis.__version__
    assert c["method"] == "Basis Sharing" and c["peft_type"] == "SHARED_BASIS"
    assert c["dtype"] == "float32" and c["factors"] == "float"
    assert c["adapter_config"]["groups"] and c["adapter_config"]["rank_pattern"]
    assert c["adapter_config"]["compression_ratio"] == 0.3
    assert c["base_model"] == "tiny-llama"
    text = "".join(open(os.path.join(out, f)).read() for f in os.listdir(out) if f.endswith((".json", ".md")))
    assert "/home/someone" not in text
    # each shared basis once
    weight_map = json.load(open(os.path.join(out, INDEX)))["weight_map"]
    shared = [k for k in weight_map if k.startswith("shared_bases.")]
    assert len(shared) == len(c["adapter_config"]["groups"])
    assert {v["basis"] for v in c["factorized_modules"].values()} == set(shared)
    # transformers cannot mistake it for a dense checkpoint (it would random-initialise the factorised Linears)
    with pytest.raises(OSError):
        AutoModelForCausalLM.from_pretrained(out)


@pytest.mark.parametrize("build", [shared_basis, basel])
def test_int8_factors_roundtrip_error_bounded_and_smaller(build, tmp_path):
    peft_model, _ = build()
    want = logits(peft_model)
    f32 = save_compressed(peft_model, str(tmp_path / "f32"))
    q8 = save_compressed(peft_model, str(tmp_path / "q8"), factors="int8")
    model = CompressedModel.from_pretrained(q8)
    assert model.dtype == torch.float32 and count_parameters(model) == count_parameters(peft_model)
    # every factor within half a quantisation step (max |row| / 254) of the float one
    reference = CompressedModel.from_pretrained(f32)
    ref_modules = dict(reference.named_modules())
    for name, m in model.named_modules():
        if isinstance(m, LowRankLinear):
            for attr in ("basis", "coefficient"):
                a, b = getattr(m, attr), getattr(ref_modules[name], attr)
                step = b.abs().amax(dim=1, keepdim=True) / 127
                assert ((a - b).abs() <= step / 2 + 1e-7).all(), (name, attr)
    rel = (logits(model) - want).norm() / want.norm()
    assert 0 < rel < 0.02, rel
    # the factors take a byte per entry (plus a float32 scale per row); everything else stays float32
    weight_map = json.load(open(os.path.join(q8, INDEX)))["weight_map"]
    factors = {k for k in weight_map if k.endswith((".coefficient", ".basis")) or k.startswith("shared_bases.")}
    factors = {k for k in factors if not k.endswith(SCALE_SUFFIX)}
    from safetensors import safe_open

    n_factor = n_rows = 0
    for k in factors:
        with safe_open(os.path.join(q8, weight_map[k]), "pt") as f:
            t = f.get_tensor(k)
            assert t.dtype == torch.int8
            n_factor += t.numel()
            n_rows += t.shape[0]
    assert weights_size(f32) - weights_size(q8) == pytest.approx(3 * n_factor - 4 * n_rows, abs=4096)
    # saved again from the loaded model (the bound save_pretrained): the same format and factors
    again = model.save_pretrained(str(tmp_path / "again"))
    assert json.load(open(os.path.join(again, COMPRESSION_CONFIG)))["factors"] == "int8"
    assert torch.equal(logits(CompressedModel.from_pretrained(again)), logits(model))


@pytest.mark.parametrize("capability,warns", [("AVX2", True), ("NO AVX", True), ("AVX512", False)])
def test_sixteen_bit_on_a_cpu_without_avx512_warns_once_with_the_fix(tmp_path, monkeypatch, capability, warns):
    import platform
    import warnings

    peft_model, _ = shared_basis()
    folder = save_compressed(peft_model, str(tmp_path / "bf16"), dtype=torch.bfloat16)
    monkeypatch.setattr(platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        CompressedModel.from_pretrained(folder)  # computes in the saved bfloat16
        CompressedModel.from_pretrained(folder, dtype=torch.float32)  # float32: never warned
    emulated = [str(w.message) for w in caught if "emulated" in str(w.message)]
    assert len(emulated) == (1 if warns else 0)
    if warns:
        assert "bfloat16" in emulated[0] and "dtype=torch.float32" in emulated[0] and capability in emulated[0]
    monkeypatch.setattr(platform, "machine", lambda: "aarch64")  # not x86: nothing measured, no warning
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        CompressedModel.from_pretrained(folder)
    assert not [w for w in caught if "emulated" in str(w.message)]


def test_int8_dequantises_to_the_compute_dtype(tmp_path):
    peft_model, _ = shared_basis()
    q8 = save_compressed(peft_model, str(tmp_path / "q8"), dtype=torch.bfloat16, factors="int8")
    model = CompressedModel.from_pretrained(q8)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    as_f32 = CompressedModel.from_pretrained(q8, dtype=torch.float32)
    assert {p.dtype for p in as_f32.parameters()} == {torch.float32}
    # each factor is read once into its final layout: the view of its zero-padded copy, the dequantised values
    from peft_basis.tuners.factorized import padded_view

    plain = CompressedModel.from_pretrained(q8, rank_multiple=1)
    for m, p in zip(model.modules(), plain.modules()):
        if isinstance(m, LowRankLinear) and m.rank % 32:
            for factor, unpadded in ((m.basis, p.basis), (m.coefficient, p.coefficient)):
                padded = padded_view(factor)
                assert padded is not None and padded.data_ptr() == factor.data_ptr() and torch.equal(factor, unpadded)
    from peft_basis.validation import all_finite

    assert all_finite(torch.full((4,), 3e38)) and all_finite(torch.full((4,), 6e4, dtype=torch.float16))  # sums overflow
    assert all_finite(torch.empty(0, dtype=torch.bfloat16)) and all_finite(torch.arange(3))
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for bad in (float("inf"), -float("inf"), float("nan")):
            t = torch.ones(5000, 3, dtype=dtype)
            t[4321, 1] = bad
            assert not all_finite(t) and not all_finite(t.T), (dtype, bad)
    q = torch.tensor([[127, -127, 0]], dtype=torch.int8)
    assert torch.equal(dequantize_rows_int8(q, torch.tensor([0.5]), torch.float32), torch.tensor([[63.5, -63.5, 0.0]]))


def test_int8_refuses_factors_it_cannot_quantise(tmp_path):
    peft_model, _ = shared_basis()
    layer = peft_model.base_model.model.model.layers[0].self_attn.o_proj
    coefficient = layer.sb_coefficient["default"]
    with torch.no_grad():
        coefficient[0, 0] = float("nan")
    with pytest.raises(CompressedCheckpointError, match=r"o_proj.coefficient holds NaN or inf, which int8 cannot"):
        save_compressed(peft_model, str(tmp_path / "q8"), factors="int8")
    with pytest.raises(CompressedCheckpointError, match=r"o_proj.coefficient holds NaN or inf; refusing to save"):
        save_compressed(peft_model, str(tmp_path / "f32"))
    layer.sb_coefficient["default"] = torch.nn.Parameter(torch.zeros(coefficient.shape, dtype=torch.int32),
                                                         requires_grad=False)
    with pytest.raises(CompressedCheckpointError, match=r"o_proj.coefficient is a int32 tensor, not float: int8 "
                                                        r"quantises float factors\. Save this model with factors='float'"):
        save_compressed(peft_model, str(tmp_path / "q8"), factors="int8")
    assert not os.path.exists(tmp_path / "q8") and not os.path.exists(tmp_path / "f32")
    assert os.listdir(tmp_path) == []  # no temporary folder left behind


def test_what_cannot_be_saved_says_what_to_do(tmp_path):
    lora = get_peft_model(tiny_llama(2), LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="holds a .*LoraLayer|holds a Linear.*merge_and_unload"):
        save_compressed(lora, str(tmp_path / "a"))
    training = get_peft_model(tiny_llama(2), BaselConfig(keep_ratio=0.6, extra_rank=2, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match=r"training phase.*consolidate\(\)"):
        save_compressed(training, str(tmp_path / "b"))
    with pytest.raises(TypeError, match="takes a PeftModel"):
        save_compressed(tiny_llama(2), str(tmp_path / "c"))
    peft_model, _ = shared_basis()
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="holds files but no compressed checkpoint"):
        save_compressed(peft_model, str(tmp_path / "mine"))
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
    with pytest.raises(ValueError, match="factors must be one of"):
        save_compressed(peft_model, str(tmp_path / "d"), factors="int4")


# ---- atomic writes, permissions -------------------------------------------------------------------------
def test_failed_save_leaves_the_previous_checkpoint_loadable(tmp_path, monkeypatch):
    old_model, _ = shared_basis()
    target = str(tmp_path / "sa")
    save_compressed(old_model, target, max_shard_size="100KB")
    old_logits = logits(CompressedModel.from_pretrained(target))
    before = sorted(os.listdir(target))

    new_model, _ = basel()
    from peft_basis.standalone import save as save_module

    real_close, closed = save_module.SafetensorsStreamWriter.close, []

    def close_then_fail(self):
        real_close(self)
        closed.append(self.path)
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(save_module.SafetensorsStreamWriter, "close", close_then_fail)
    with pytest.raises(OSError, match="disk full"):
        save_compressed(new_model, target, max_shard_size="100KB")
    assert len(closed) == 1  # it failed after writing the first file
    monkeypatch.undo()
    assert sorted(os.listdir(target)) == before and os.listdir(tmp_path) == ["sa"]  # no temporary folder left
    assert torch.equal(logits(CompressedModel.from_pretrained(target)), old_logits)
    # a successful save replaces the old checkpoint whole (no stale shard of the old one stays)
    save_compressed(new_model, target)
    assert torch.equal(logits(CompressedModel.from_pretrained(target)), logits(new_model))
    assert len([f for f in os.listdir(target) if f.endswith(".safetensors")]) == 1
    assert os.listdir(tmp_path) == ["sa"]


def test_files_get_normal_permissions(tmp_path):
    peft_model, _ = shared_basis()
    old = os.umask(0o027)
    try:
        out = save_compressed(peft_model, str(tmp_path / "sa"))
    finally:
        os.umask(old)
    assert os.stat(out).st_mode & 0o777 == 0o750
    assert {os.stat(os.path.join(out, f)).st_mode & 0o777 for f in os.listdir(out)} == {0o640}


# ---- broken checkpoints: one clear error each ------------------------------------------------------------
@pytest.fixture
def saved(tmp_path):
    peft_model, _ = shared_basis()
    return save_compressed(peft_model, str(tmp_path / "sa"), max_shard_size="100KB")


def shard_files(folder):
    return sorted(f for f in os.listdir(folder) if f.endswith(".safetensors"))


def test_missing_shard(saved):
    os.remove(os.path.join(saved, shard_files(saved)[1]))
    with pytest.raises(CompressedCheckpointError, match=r"is incomplete: shard compressed_model-00002-of-000\d\d"
                                                        r"\.safetensors is missing .*Download the checkpoint again"):
        CompressedModel.from_pretrained(saved)


def test_truncated_shard(saved):
    path = os.path.join(saved, shard_files(saved)[0])
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) - 1000])
    with pytest.raises(CompressedCheckpointError, match=r"compressed_model-00001-of-\d+\.safetensors .* is truncated "
                                                        r"or damaged .*header declares .*interrupted"):
        CompressedModel.from_pretrained(saved)
    open(path, "wb").write(data[:5])
    with pytest.raises(CompressedCheckpointError, match="truncated or damaged .*no readable header"):
        CompressedModel.from_pretrained(saved)


def test_future_format_version(saved):
    path = os.path.join(saved, COMPRESSION_CONFIG)
    c = json.load(open(path))
    c["format_version"], c["peft_basis_version"] = 2, "9.0.0"
    json.dump(c, open(path, "w"))
    with pytest.raises(CompressedCheckpointError, match=r"format version 2 \(by peft-basis 9\.0\.0\); this peft-basis "
                                                        r".* reads format version 1 and older\. Upgrade: `pip install -U"):
        CompressedModel.from_pretrained(saved)


def test_not_a_compressed_checkpoint(tmp_path):
    peft_model, dense = shared_basis()
    peft_model.save_pretrained(str(tmp_path / "adapter"))
    with pytest.raises(CompressedCheckpointError, match="no compression_config.json. It holds a PEFT adapter"):
        CompressedModel.from_pretrained(str(tmp_path / "adapter"))
    dense.save_pretrained(str(tmp_path / "dense"))
    with pytest.raises(CompressedCheckpointError, match="dense transformers checkpoint"):
        CompressedModel.from_pretrained(str(tmp_path / "dense"))


def _rewrite_shard(folder, file, edit):
    """Rewrite one shard with ``edit(tensors)`` applied (safetensors' own writer), keeping the index in step."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(os.path.join(folder, file))
    edit(tensors)
    save_file(tensors, os.path.join(folder, file), metadata={"format": "pt"})
    index = json.load(open(os.path.join(folder, INDEX)))
    index["weight_map"] = {k: v for k, v in index["weight_map"].items() if v != file or k in tensors}
    json.dump(index, open(os.path.join(folder, INDEX), "w"))


def test_tensor_missing(saved):
    index = json.load(open(os.path.join(saved, INDEX)))
    name = "model.layers.1.mlp.down_proj.coefficient"
    _rewrite_shard(saved, index["weight_map"][name], lambda t: t.pop(name))
    with pytest.raises(CompressedCheckpointError, match=rf"{name} is not in the compressed checkpoint .* need it: "
                                                        r"the checkpoint is incomplete"):
        CompressedModel.from_pretrained(saved)


def test_nan_in_a_tensor(saved):
    index = json.load(open(os.path.join(saved, INDEX)))
    name = "model.norm.weight"

    def poison(t):
        t[name][3] = float("nan")

    _rewrite_shard(saved, index["weight_map"][name], poison)
    with pytest.raises(CompressedCheckpointError, match=rf"Tensor {name} in shard .* holds NaN or inf: the checkpoint "
                                                        r"is corrupt"):
        CompressedModel.from_pretrained(saved)


def test_shard_disagrees_with_index(saved):
    files = shard_files(saved)
    index = json.load(open(os.path.join(saved, INDEX)))
    moved = next(k for k, v in index["weight_map"].items() if v == files[0])
    index["weight_map"][moved] = files[1]
    json.dump(index, open(os.path.join(saved, INDEX), "w"))
    with pytest.raises(CompressedCheckpointError, match="lacks .* which compressed_model.safetensors.index.json places"):
        CompressedModel.from_pretrained(saved)


# ---- the Hub: push here, pull in a fresh process -----------------------------------------------------------
CHILD = r"""
import json, sys, torch
from safetensors.torch import load_file
from peft_basis import CompressedModel
expected = load_file(sys.argv[1])
out = {}
for key, repo, kw in [("float", "tester/sa", {}), ("int8", "tester/sa", {"revision": "int8"}),
                      ("private", "tester/sa-private", {"token": sys.argv[2]})]:
    m = CompressedModel.from_pretrained(repo, **kw)
    with torch.no_grad():
        out[key] = float((m(expected["ids"]).logits - expected[key]).abs().max())
out["type"] = type(m).__name__
print("RESULT " + json.dumps(out))
"""


def test_push_then_pull_in_a_fresh_process(hub, tmp_path):
    from safetensors.torch import save_file

    peft_model, _ = shared_basis()
    expected = {"ids": IDS, "float": logits(peft_model)}
    peft_basis.standalone.push_compressed_to_hub(peft_model, "tester/sa", token=TOKEN)
    peft_basis.standalone.push_compressed_to_hub(peft_model, "tester/sa", token=TOKEN, factors="int8", revision="int8")
    peft_basis.standalone.push_compressed_to_hub(peft_model, "tester/sa-private", token=TOKEN, private=True)
    files = hub.files("tester/sa")
    assert {COMPRESSION_CONFIG, INDEX, "config.json", "README.md"} <= set(files)
    assert b"CompressedModel.from_pretrained" in files["README.md"]
    assert json.loads(hub.file("tester/sa", COMPRESSION_CONFIG, "int8"))["factors"] == "int8"
    expected["int8"] = logits(CompressedModel.from_pretrained("tester/sa", revision="int8"))
    expected["private"] = expected["float"].clone()
    path = str(tmp_path / "expected.safetensors")
    save_file({k: v.contiguous() for k, v in expected.items()}, path)

    def run(**env):
        r = subprocess.run([sys.executable, "-c", CHILD, path, TOKEN], env=hub.env(str(tmp_path / "fresh"), **env),
                           cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))), capture_output=True,
                           text=True, timeout=300)
        lines = [ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")]
        assert r.returncode == 0 and lines, r.stdout[-3000:] + r.stderr[-5000:]
        return json.loads(lines[-1][7:])

    out = run()
    assert out == {"float": 0.0, "int8": 0.0, "private": 0.0, "type": "LlamaForCausalLM"}
    assert run(HF_HUB_OFFLINE=1) == out  # from the cache the first process filled


def test_config_from_another_model(saved):
    path = os.path.join(saved, "config.json")
    config = json.load(open(path))
    json.dump(dict(config, intermediate_size=96), open(path, "w"))
    with pytest.raises(CompressedCheckpointError, match=r"gate_proj: factors .* do not make the 96 x 64 weight "
                                                        r"config.json describes; the files come from different models"):
        CompressedModel.from_pretrained(saved)
    json.dump(dict(config, num_hidden_layers=1), open(path, "w"))
    with pytest.raises(CompressedCheckpointError, match=r"names model.layers.1.self_attn.q_proj as factorised, but the "
                                                        r"model built from config.json has no such module"):
        CompressedModel.from_pretrained(saved)
