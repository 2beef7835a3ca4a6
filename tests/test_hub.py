"""The Hub, over real HTTP: the real ``huggingface_hub`` client against a loopback Hub server
(tests/hub_server.py, started by the ``hub`` fixture). Upload here, download in a fresh process
into an empty cache, compare logits; offline from that cache; and the failures a user meets."""

import json
import os
import subprocess
import sys

import pytest
import torch
from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, RepositoryNotFoundError
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import save_file

import peft_basis  # noqa: F401
from peft_basis import BaselConfig, CalibrationStatistics, SharedBasisConfig, TaskVectorBasis, calibrate
from peft_basis.hub import AdapterTypeError, check_adapter_type, load_adapter

from .models import fresh_copy, tiny_llama, token_batches

IDS = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(3))
TOKEN = "hf_tester_write"
pytestmark = pytest.mark.filterwarnings("ignore:BaselConfig. no calibration statistics")


def logits(model):
    with torch.no_grad():
        return model(IDS).logits


def shared_basis_model():
    base = tiny_llama(2, seed=0)
    config = SharedBasisConfig(compression_ratio=0.3, group_size=2)
    calibrate(base, config, token_batches(2), progress=False)
    return get_peft_model(base, config), config


def basel_model():
    base = tiny_llama(2, seed=1)
    config = BaselConfig(keep_ratio=0.6, extra_rank=4, target_modules=["q_proj", "v_proj", "down_proj"])
    model = get_peft_model(base, config)
    with torch.no_grad():  # a "trained" state: non-zero extra bases
        for n, p in model.named_parameters():
            if "basel" in n and p.requires_grad:
                p.add_(0.01 * torch.randn_like(p))
    model.base_model.prune_to(int(0.6 * model.base_model.dense_parameters()))
    model.base_model.consolidate()
    return model


def basis_model():
    from peft_basis.tuners.basis import BasisConfig

    base = tiny_llama(2, seed=4)
    config = BasisConfig(r=4, rank_allocation="eigen", target_modules=["q_proj", "v_proj", "up_proj"])
    calibrate(base, config, token_batches(2), progress=False)
    model = get_peft_model(base, config)
    with torch.no_grad():  # a "trained" state: the core moved away from its zero start
        for n, p in model.named_parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    return model


def task_vector_basis():
    base = tiny_llama(1, seed=2)
    fts = []
    for i in range(3):
        ft = fresh_copy(base)
        with torch.no_grad():
            for p in ft.parameters():
                p.add_(0.01 * torch.randn(p.shape, generator=torch.Generator().manual_seed(10 + i)))
        fts.append(ft)
    return TaskVectorBasis.from_models(base, fts, method="pca", num_bases=2, task_names=["a", "b", "c"])


def cache_is_clean(cache_dir):
    """No partial downloads and every blob is a complete file that a pointer uses."""
    for root, _, files in os.walk(cache_dir):
        assert not any(f.endswith(".incomplete") for f in files), (root, files)


# ---- upload here, download in a fresh process (online, then offline) --------------------------------------
CHILD = r"""
import json, os, sys, torch
from safetensors.torch import load_file
import peft_basis
import peft_basis.tuners.basis  # registers BASIS until peft_basis/__init__ imports it
from peft import PeftModel
from peft_basis import CalibrationStatistics, TaskVectorBasis
from tests.models import tiny_llama
expected = load_file(sys.argv[1]); token = sys.argv[2]
ids = expected["ids"]
out = {}
def diff(model, key):
    with torch.no_grad():
        return float((model(ids).logits - expected[key]).abs().max())
m = PeftModel.from_pretrained(tiny_llama(2, seed=0), "tester/shared-basis"); out["shared_basis"] = diff(m, "shared_basis")
m = PeftModel.from_pretrained(tiny_llama(2, seed=4), "tester/basis"); out["basis"] = diff(m, "basis")
m = peft_basis.hub.load_adapter(tiny_llama(2, seed=1), "tester/basel", revision="v1", subfolder="run-1",
                                expected_type="BASEL")
out["basel_revision_subfolder"] = diff(m, "basel")
try:  # PEFT's own call; PEFT 0.21.2 cannot load a subfolder adapter offline (it doubles the subfolder)
    m = PeftModel.from_pretrained(tiny_llama(2, seed=1), "tester/basel", revision="v1", subfolder="run-1")
    out["basel_revision_subfolder_peft"] = diff(m, "basel")
except Exception as e:
    out["basel_revision_subfolder_peft"] = type(e).__name__
m = PeftModel.from_pretrained(tiny_llama(2, seed=1), "tester/private-basel", token=token); out["basel_private"] = diff(m, "basel")
s = CalibrationStatistics.from_pretrained("tester/stats", subfolder="calib")
out["stats"] = max(float((s.grams[k] - expected["gram/" + k]).abs().max()) for k in s.grams)
out["stats_sources"] = len(s.sources)
t = TaskVectorBasis.from_pretrained("tester/tvb", revision="v1")
out["tvb"] = max(float((t.recover("b")[k] - expected["tvb/" + k]).abs().max()) for k in t.keys)
out["tvb_names"] = t.task_names
try:
    PeftModel.from_pretrained(tiny_llama(2, seed=1), "tester/private-basel")
    out["private_without_token"] = "loaded"
except Exception as e:
    out["private_without_token"] = type(e).__name__ + " " + type(e.__cause__).__name__
print("RESULT " + json.dumps(out))
"""


def run_child(hub, hf_home, expected_path, **env):
    r = subprocess.run([sys.executable, "-c", CHILD, expected_path, TOKEN], env=hub.env(hf_home, **env),
                       cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))), capture_output=True,
                       text=True, timeout=300)
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")]
    assert r.returncode == 0 and lines, r.stdout[-3000:] + r.stderr[-5000:]
    return json.loads(lines[-1][7:])


def test_push_then_pull_in_fresh_process_online_and_offline(hub, tmp_path):
    expected = {"ids": IDS}
    sb, config = shared_basis_model()
    expected["shared_basis"] = logits(sb)
    sb.push_to_hub("tester/shared-basis", token=TOKEN)

    basis = basis_model()
    expected["basis"] = logits(basis)
    assert (expected["basis"] - logits(tiny_llama(2, seed=4))).abs().max() > 1e-3  # the adapter does something
    basis.push_to_hub("tester/basis", token=TOKEN)

    basel = basel_model()
    expected["basel"] = logits(basel)
    basel.push_to_hub("tester/basel", token=TOKEN, revision="v1", subfolder="run-1")
    basel.push_to_hub("tester/private-basel", token=TOKEN, private=True)

    stats = config.calibration_statistics
    stats.push_to_hub("tester/stats", token=TOKEN, subfolder="calib")
    expected.update({f"gram/{k}": v for k, v in stats.grams.items()})

    tvb = task_vector_basis()
    tvb.push_to_hub("tester/tvb", token=TOKEN, revision="v1")
    expected.update({f"tvb/{k}": v for k, v in tvb.recover("b").items()})

    # what landed on the server
    assert "adapter_model.safetensors" in hub.files("tester/shared-basis")
    assert "run-1/adapter_model.safetensors" in hub.files("tester/basel", "v1")
    assert "run-1/adapter_model.safetensors" not in hub.files("tester/basel", "main")
    assert hub.state.repos[("model", "tester/private-basel")].private
    assert {"task_vector_basis.json", "task_vector_basis.safetensors", "README.md"} <= set(hub.files("tester/tvb", "v1"))

    path = str(tmp_path / "expected.safetensors")
    save_file({k: v.contiguous() for k, v in expected.items()}, path)
    hf_home = str(tmp_path / "fresh_home")

    out = run_child(hub, hf_home, path)
    assert out["shared_basis"] < 1e-5 and out["basel_revision_subfolder"] < 1e-5 and out["basel_private"] < 1e-5
    assert out["basis"] < 1e-5
    assert b"- basis\n" in hub.file("tester/basis", "README.md")
    assert out["stats"] == 0 and out["stats_sources"] == len(stats.sources)
    assert out["tvb"] < 1e-6 and out["tvb_names"] == ["a", "b", "c"]
    assert "RepositoryNotFoundError" in out["private_without_token"], out
    assert out["basel_revision_subfolder_peft"] < 1e-5
    cache_is_clean(hf_home)

    # offline, from the cache the first process filled: same results, no request reaches the server
    n = len(hub.state.requests)
    out = run_child(hub, hf_home, path, HF_HUB_OFFLINE=1)
    assert out["shared_basis"] < 1e-5 and out["basel_revision_subfolder"] < 1e-5 and out["basel_private"] < 1e-5
    assert out["stats"] == 0 and out["tvb"] < 1e-6 and out["basis"] < 1e-5
    assert hub.state.requests[n:] == [r for r in hub.state.requests[n:] if r[1] == "/api/agent-harnesses"]


# ---- the model card and the install hint --------------------------------------------------------------------
def test_model_card_and_install_hint_on_the_hub(hub):
    model, _ = shared_basis_model()
    model.peft_config["default"].base_model_name_or_path = "org/tiny-llama"
    peft_basis.hub.record_quality(model, perplexity=31.4, dataset="held-out random tokens")
    info = model.push_to_hub("tester/card", token=TOKEN)
    assert "commit" in str(info.commit_url)
    card = hub.file("tester/card", "README.md").decode()
    meta = card.split("---")[1]
    assert "library_name: peft" in meta and "- peft-basis" in meta and "- basis-sharing" in meta
    assert "base_model: org/tiny-llama" in meta and "base_model:adapter:org/tiny-llama" in meta
    usage = card.split("```python\n")[1]
    assert usage.startswith("import peft_basis") and 'PeftModel.from_pretrained(base, "tester/card")' in usage
    assert "pip install peft-basis" in card and "compression_ratio" in card and "perplexity: 31.4" in card
    assert f"peft-basis {peft_basis.__version__}" in card and "- PEFT " in card
    assert "[More Information Needed]" not in card  # PEFT's empty template replaced
    cfg = json.loads(hub.file("tester/card", "adapter_config.json"))
    assert cfg["peft_type"] == "SHARED_BASIS" and "pip install peft-basis" in cfg["requires"]
    assert cfg["peft_basis_version"] == peft_basis.__version__

    # re-pushing keeps what a user wrote outside the generated block
    from huggingface_hub import HfApi

    edited = card + "\n## My notes\nkeep me\n"
    HfApi(token=TOKEN).upload_file(path_or_fileobj=edited.encode(), path_in_repo="README.md", repo_id="tester/card")
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        open(os.path.join(d, "README.md"), "w").write(edited)
        model.save_pretrained(d)
        again = open(os.path.join(d, "README.md")).read()
    assert "keep me" in again and again.count("peft-basis:begin") == 1


def test_unregistered_type_says_how_to_install(hub):
    cfg = {"peft_type": "BASIS", "requires": "This adapter was made with peft-basis: `pip install peft-basis` ..."}
    with pytest.raises(AdapterTypeError, match="pip install peft-basis. and .import peft_basis"):
        check_adapter_type(cfg, where="org/x") if "BASIS" not in _registered() else _raise_for(cfg)


def _registered():
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

    return {str(getattr(k, "value", k)) for k in PEFT_TYPE_TO_CONFIG_MAPPING}


def _raise_for(cfg):  # BASIS may be registered once that tuner lands: use a type nobody registers
    check_adapter_type(dict(cfg, peft_type="BASIS_NOT_REGISTERED"), where="org/x")


# ---- failures: clear errors, nothing corrupted ----------------------------------------------------------------
def test_wrong_repo_and_missing_file(hub):
    base = tiny_llama(2, seed=1)
    before = {k: v.clone() for k, v in base.state_dict().items()}
    with pytest.raises(ValueError, match="Can't find 'adapter_config.json' at 'tester/nope'") as e:
        PeftModel.from_pretrained(base, "tester/nope")
    assert isinstance(e.value.__context__, RepositoryNotFoundError)
    with pytest.raises(RepositoryNotFoundError):
        load_adapter(base, "tester/nope")
    with pytest.raises(RepositoryNotFoundError):
        CalibrationStatistics.from_pretrained("tester/nope")

    # a repo holding the config but not the weights
    model = basel_model()
    model.push_to_hub("tester/half", token=TOKEN)
    from huggingface_hub import HfApi

    HfApi(token=TOKEN).delete_file("adapter_model.safetensors", repo_id="tester/half")
    with pytest.raises((ValueError, EntryNotFoundError), match="adapter_model|Entry Not Found|Can't find weights"):
        PeftModel.from_pretrained(tiny_llama(2, seed=1), "tester/half")
    with pytest.raises(EntryNotFoundError):
        CalibrationStatistics.from_pretrained("tester/half")
    with pytest.raises(RevisionNotFound):
        PeftModel.from_pretrained(tiny_llama(2, seed=1), "tester/half", revision="no-such-branch")
    assert all(torch.equal(before[k], v) for k, v in base.state_dict().items())
    cache_is_clean(hub.cache_dir)


RevisionNotFound = (ValueError, HfHubHTTPError)


def test_interrupted_download_resumes_or_fails_cleanly(hub, tmp_path):
    from huggingface_hub import constants

    model = basel_model()
    want = logits(model)
    model.push_to_hub("tester/flaky", token=TOKEN)
    remote = hub.file("tester/flaky", "adapter_model.safetensors")

    # connection dropped mid-body, then the server errors on the resumed request: the client raises and
    # leaves neither a partial blob nor a snapshot entry behind
    hub.state.faults["adapter_model.safetensors"] = ["drop", "error"]
    with pytest.raises(HfHubHTTPError, match="500"):
        PeftModel.from_pretrained(tiny_llama(2, seed=1), "tester/flaky")
    cache_is_clean(hub.cache_dir)
    snapshots = os.path.join(hub.cache_dir, "models--tester--flaky", "snapshots")
    assert not any("adapter_model.safetensors" in f for _, _, fs in os.walk(snapshots) for f in fs)

    # dropped once: the client resumes with a Range request and the cached file is byte-identical
    hub.state.faults["adapter_model.safetensors"] = ["drop"]
    loaded = PeftModel.from_pretrained(tiny_llama(2, seed=1), "tester/flaky")
    assert torch.allclose(logits(loaded), want, atol=1e-5)
    assert not hub.state.faults["adapter_model.safetensors"]
    ranged = [r for r in hub.state.requests if r == ("GET", "/tester/flaky/resolve/main/adapter_model.safetensors")]
    assert len(ranged) == 4  # dropped + 500, then dropped + resumed
    from huggingface_hub import hf_hub_download

    cached = hf_hub_download("tester/flaky", "adapter_model.safetensors", local_files_only=True)
    assert open(cached, "rb").read() == remote
    assert constants.HF_HUB_CACHE == hub.cache_dir and cached.startswith(hub.cache_dir)
    cache_is_clean(hub.cache_dir)


def test_adapter_of_another_type(hub):
    base = tiny_llama(2, seed=1)
    lora = get_peft_model(tiny_llama(2, seed=1), LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
    lora.push_to_hub("tester/lora", token=TOKEN)
    basel = basel_model()
    want = logits(basel)
    basel.push_to_hub("tester/basel-2", token=TOKEN)
    # PEFT's README for a LoRA adapter is left alone (no peft-basis block)
    assert b"peft-basis" not in hub.file("tester/lora", "README.md")

    with pytest.raises(AdapterTypeError, match="tester/lora holds a LORA adapter .LoraConfig., not a BaselConfig"):
        BaselConfig.from_pretrained("tester/lora")
    with pytest.raises(AdapterTypeError, match="holds a LORA adapter, not BASEL"):
        load_adapter(base, "tester/lora", expected_type=BaselConfig)
    with pytest.raises(AdapterTypeError, match="holds a BASEL adapter, not LORA"):
        load_adapter(base, "tester/basel-2", expected_type="LORA")
    with pytest.raises(AdapterTypeError, match="holds a BASEL adapter .BaselConfig., not a SharedBasisConfig"):
        SharedBasisConfig.from_pretrained("tester/basel-2")
    assert not any(isinstance(m, torch.nn.Module) and "basel" in type(m).__name__.lower() for m in base.modules())

    # nothing corrupted: both still load and give what was pushed
    got = load_adapter(tiny_llama(2, seed=1), "tester/basel-2", expected_type="BASEL")
    assert torch.allclose(logits(got), want, atol=1e-5)
    assert isinstance(PeftModel.from_pretrained(tiny_llama(2, seed=1), "tester/lora"), PeftModel)
    cache_is_clean(hub.cache_dir)
