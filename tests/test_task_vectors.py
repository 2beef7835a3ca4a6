"""Task Vector Bases: streaming Gram, AE / PCA bases, add / negate / recover, storage, sources, errors."""

import json
import os

import pytest
import torch
from peft import IA3Config, LoraConfig, PeftModel, get_peft_model

from peft_basis.data import load_default_model
from peft_basis.task_vectors import TaskVectorBasis, TaskVectorError, apply_delta, from_legacy
from peft_basis.task_vectors.methods import accumulate_gram
from peft_basis.task_vectors.sources import DeltaReader

from .models import fresh_copy, tiny_gpt2, tiny_llama

IDS = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(3))
NAMES = ["docs", "bible", "drama", "news"]


def perturbed(base, seed, scale=0.02):
    m = fresh_copy(base)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return m


@pytest.fixture(scope="module")
def setup():
    base = tiny_llama(2)
    fts = [perturbed(base, i) for i in range(4)]
    b = base.state_dict()
    keys = [k for k in b if k != "lm_head.weight"]  # tied to embed_tokens: one key
    V = torch.stack([torch.cat([(f.state_dict()[k] - b[k]).flatten() for k in keys]) for f in fts], 1).double()
    return base, fts, keys, V


def logits(model):
    with torch.no_grad():
        return model(IDS).logits


def test_streamed_gram_equals_dense(setup):
    base, fts, keys, V = setup
    reader = DeltaReader(base, fts, NAMES)
    assert reader.keys == keys and reader.num_params == V.shape[0]
    sizes = []
    orig = reader.block
    reader.block = lambda k, rows=None: (lambda X: (sizes.append(X.numel()), X)[1])(orig(k, rows))
    G = accumulate_gram(reader, chunk_elements=300)
    dense = V.T @ V
    assert torch.allclose(G, dense, rtol=1e-6, atol=0)
    # never more than T x (chunk rounded up to one row) task-vector elements at once
    widest = max(int(torch.tensor(s[1:]).prod()) if len(s) > 1 else 1 for s in reader.shapes.values())
    assert max(sizes) <= 4 * max(300, widest)
    assert max(sizes) < V.numel() / 20


def test_pca_matches_dense_svd_and_is_exact_at_t_minus_1(setup):
    base, fts, keys, V = setup
    mu = V.mean(1, keepdim=True)
    U, S, Vh = torch.linalg.svd(V - mu, full_matrices=False)
    tvb = TaskVectorBasis.from_models(base, fts, method="pca", num_bases=2, task_names=NAMES, chunk_elements=500)
    # reconstruction equals the dense rank-2 PCA reconstruction (original code's D x T route)
    ref = mu + U[:, :2] @ torch.diag(S[:2]) @ Vh[:2]
    for t, name in enumerate(NAMES):
        r = tvb.recover(name)
        flat = torch.cat([r[k].flatten().double() for k in keys])
        assert (flat - ref[:, t]).abs().max() < 1e-6
    assert tvb.info["singular_values"] == pytest.approx(S[:2].tolist(), rel=1e-6)
    rel = float((ref - V).norm() / V.norm())
    assert tvb.info["relative_error"] == pytest.approx(rel, rel=1e-5)
    exact = TaskVectorBasis.from_models(base, fts, method="pca", num_bases=3, task_names=NAMES)
    b = base.state_dict()
    for t, name in enumerate(NAMES):
        r = exact.recover(name)
        assert max(float((r[k] - (fts[t].state_dict()[k] - b[k])).abs().max()) for k in keys) < 1e-6


def test_ae_basis_is_softmax_mixture_and_error_matches_dense(setup):
    base, fts, keys, V = setup
    tvb = TaskVectorBasis.from_models(base, fts, method="ae", num_bases=2, task_names=NAMES, steps=1500)
    P = tvb.mixing
    assert torch.allclose(P.sum(0), torch.ones(2, dtype=P.dtype), atol=1e-6) and (P >= 0).all()
    S = torch.stack([torch.cat([tvb.bases[k][m].flatten().double() for k in keys]) for m in range(2)], 1)
    assert (S - V @ P).abs().max() < 1e-6
    rec = S @ tvb.coefficients
    rel = float((rec - V).norm() / V.norm())
    assert tvb.info["relative_error"] == pytest.approx(rel, rel=1e-4)
    # optimum for 4 independent random vectors of equal norm with M=2 is sqrt(2/4); AE gets near it
    evals = torch.linalg.eigvalsh(V.T @ V).flip(0)
    bound = float((evals[2:].sum() / evals.sum()).sqrt())
    assert bound - 1e-6 <= rel < bound + 0.05
    assert tvb.storage()["vector_bytes"] == 2 * V.shape[0] * 4
    assert tvb.storage()["task_vectors_bytes"] == 4 * V.shape[0] * 4


def test_save_load_roundtrip_and_add(setup, tmp_path):
    base, fts, keys, V = setup
    for method in ("ae", "pca"):
        tvb = TaskVectorBasis.from_models(base, fts, method=method, num_bases=2, task_names=NAMES, steps=200)
        tvb.save_pretrained(str(tmp_path / method))
        files = sorted(os.listdir(tmp_path / method))
        assert files == ["task_vector_basis.json", "task_vector_basis.safetensors"]  # no temp files left
        meta = json.loads((tmp_path / method / "task_vector_basis.json").read_text())
        assert meta["method"] == method and meta["task_names"] == NAMES and meta["num_bases"] == 2
        again = TaskVectorBasis.from_pretrained(str(tmp_path / method))
        for name in NAMES:
            a, b = tvb.recover(name), again.recover(name)
            assert all(torch.equal(a[k], b[k]) for k in a)
        assert torch.equal(logits(tvb.add(base, 0.3)), logits(again.add(base, 0.3)))
        # add = base + alpha * merged delta, by hand
        delta = tvb.merged_delta()
        manual = fresh_copy(base)
        sd = manual.state_dict()
        with torch.no_grad():
            for k in keys:
                sd[k].add_(0.3 * delta[k])
        assert (logits(manual) - logits(tvb.add(base, 0.3))).abs().max() < 1e-6
    # PCA "tasks" addition = sum of all task vectors (exact, whatever M): plain task arithmetic
    d = TaskVectorBasis.from_models(base, fts, method="pca", num_bases=1, task_names=NAMES).merged_delta("tasks")
    total = V.sum(1)
    assert (torch.cat([d[k].flatten().double() for k in keys]) - total).abs().max() < 1e-5


def test_alpha_grid_search_and_negate(setup):
    base, fts, keys, V = setup
    tvb = TaskVectorBasis.from_models(base, fts, method="pca", num_bases=3, task_names=NAMES)
    k = keys[3]
    w0, d = base.state_dict()[k].clone(), tvb.merged_delta()[k]
    target = 0.35

    def score(model):  # best when the model sits at alpha = 0.35
        return -float((model.state_dict()[k] - (w0 + target * d)).abs().max())

    merged = tvb.add(base, alpha=None, eval_fn=score)
    assert len(tvb.last_search) == 21 and max(tvb.last_search, key=tvb.last_search.get) == pytest.approx(target)
    assert torch.allclose(merged.state_dict()[k], w0 + target * d, atol=1e-6)
    assert torch.equal(base.state_dict()[k], w0)  # the base is never modified
    neg = tvb.negate(base, "bible", alpha=0.5)
    want = base.state_dict()[k] - 0.5 * (fts[1].state_dict()[k] - base.state_dict()[k])
    assert (neg.state_dict()[k] - want).abs().max() < 1e-6
    with pytest.raises(KeyError, match="Unknown task 'poetry'"):
        tvb.recover("poetry")
    with pytest.raises(ValueError, match="eval_fn"):
        tvb.add(base, alpha=None)


def lora_folders(base, tmp_path, n=4, targets=("q_proj", "v_proj", "up_proj"), cls=LoraConfig, **kw):
    out = []
    for i in range(n):
        torch.manual_seed(10 + i)
        cfg = cls(target_modules=list(targets), **kw)
        pm = get_peft_model(fresh_copy(base), cfg)
        with torch.no_grad():
            for name, p in pm.named_parameters():
                if p.requires_grad:
                    p.add_(0.05 * torch.randn_like(p))
        pm.save_pretrained(str(tmp_path / f"a{i}"))
        out.append(str(tmp_path / f"a{i}"))
    return out


@pytest.mark.parametrize("builder", [tiny_llama, tiny_gpt2])
def test_lora_adapters_in_and_out(builder, tmp_path):
    base = builder(2)
    targets = ("q_proj", "v_proj", "up_proj") if builder is tiny_llama else ("c_attn", "c_fc")
    folders = lora_folders(base, tmp_path, targets=targets, r=4, init_lora_weights=False,
                           fan_in_fan_out=builder is tiny_gpt2)
    tvb = TaskVectorBasis.from_models(base, folders, method="pca", num_bases=3, task_names=NAMES)
    n_mod = 2 * len(targets)
    assert len(tvb.keys) == n_mod
    for i in (0, 2):
        ref = PeftModel.from_pretrained(fresh_copy(base), folders[i]).merge_and_unload()
        got = apply_delta(base, tvb.recover(NAMES[i]), 1.0)
        assert (logits(ref) - logits(got)).abs().max() < 1e-5
        out = str(tmp_path / f"export{i}")
        ranks = tvb.export_lora(base, out, task=NAMES[i], tol=1e-5)
        assert len(ranks) == n_mod and set(ranks.values()) == {4}
        exported = PeftModel.from_pretrained(fresh_copy(base), out)
        assert (logits(exported) - logits(ref)).abs().max() < 1e-5
    # a PeftModel in memory is read in place (its active adapter), same deltas as from its folder
    held = PeftModel.from_pretrained(fresh_copy(base), folders[3])
    mixed = TaskVectorBasis.from_models(base, folders[:3] + [held], method="pca", num_bases=3, task_names=NAMES)
    assert torch.allclose(mixed.gram, tvb.gram, rtol=1e-9)
    # the sum of 4 rank-4 deltas is rank <= 16 per module: still an adapter
    ranks = tvb.export_lora(base, str(tmp_path / "sum"), combine="tasks", alpha=0.5)
    assert max(ranks.values()) == 16
    added = PeftModel.from_pretrained(fresh_copy(base), str(tmp_path / "sum"))
    assert (logits(added) - logits(tvb.add(base, 0.5, combine="tasks"))).abs().max() < 1e-5


def test_ia3_adapter_delta_by_merging(tmp_path):
    base = tiny_llama(2)
    folders = lora_folders(base, tmp_path, n=2, targets=("k_proj", "down_proj"), cls=IA3Config,
                           feedforward_modules=["down_proj"])
    before = {k: v.clone() for k, v in base.state_dict().items()}
    tvb = TaskVectorBasis.from_models(base, folders, method="ae", num_bases=2, task_names=["x", "y"], steps=1500)
    # the adapters were read on a structural copy sharing the base's weights: merged, read, restored exactly
    assert all(torch.equal(before[k], v) for k, v in base.state_dict().items())
    assert all(p.requires_grad for p in base.parameters())
    assert not any("lora" in n or "ia3" in n for n, _ in base.named_modules())
    exact = TaskVectorBasis.from_models(base, folders, method="pca", num_bases=1, task_names=["x", "y"])
    ref = PeftModel.from_pretrained(fresh_copy(base), folders[1]).merge_and_unload()
    assert (logits(apply_delta(base, exact.recover("y"), 1.0)) - logits(ref)).abs().max() < 1e-5
    assert tvb.info["relative_error"] < 1e-2  # M = T: AE can reconstruct exactly


def test_folder_sources_equal_module_sources(setup, tmp_path):
    base, fts, keys, V = setup
    base.save_pretrained(str(tmp_path / "base"))
    for i, f in enumerate(fts):
        f.save_pretrained(str(tmp_path / f"ft{i}"))
    a = TaskVectorBasis.from_models(base, fts, method="pca", num_bases=2, task_names=NAMES)
    b = TaskVectorBasis.from_models(str(tmp_path / "base"), [str(tmp_path / f"ft{i}") for i in range(4)],
                                    method="pca", num_bases=2, task_names=NAMES, chunk_elements=1000)
    assert set(a.keys) == set(b.keys)
    assert torch.allclose(a.gram, b.gram, rtol=1e-9)
    assert max(float((a.bases[k] - b.bases[k]).abs().max()) for k in a.keys) < 1e-6


def test_mismatches_are_clear_errors(setup, tmp_path):
    base, fts, keys, V = setup
    with pytest.raises(TaskVectorError, match="task names"):
        TaskVectorBasis.from_models(base, fts, task_names=NAMES[:3])
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(**{**base.config.to_dict(), "intermediate_size": 96})
    with pytest.raises(TaskVectorError, match="shape"):
        TaskVectorBasis.from_models(base, [fts[0], LlamaForCausalLM(cfg)], task_names=["a", "b"])
    deeper = tiny_llama(3)
    with pytest.raises(TaskVectorError, match="other weights"):
        TaskVectorBasis.from_models(base, [fts[0], deeper], task_names=["a", "b"])
    with pytest.raises(TaskVectorError, match="M <= 3"):
        TaskVectorBasis.from_models(base, fts, method="pca", num_bases=4)
    tvb = TaskVectorBasis.from_models(base, fts, method="pca", num_bases=2, task_names=NAMES)
    with pytest.raises(TaskVectorError, match="num_tasks"):
        TaskVectorBasis(tvb.method, NAMES[:3], tvb.bases, tvb.coefficients, mean=tvb.mean)
    with pytest.raises(TaskVectorError, match="not in this model"):
        tvb.add(tiny_llama(1), 0.1)
    # full fine-tunes are not low-rank: exporting them as LoRA is refused, naming the fix
    with pytest.raises(TaskVectorError, match="full model"):
        tvb.export_lora(base, str(tmp_path / "x"), task="docs")


def _write_legacy(folder, tvb, keys, method, T_in_info=None):
    os.makedirs(folder, exist_ok=True)
    vectors = [{k: tvb.bases[k][m].clone() for k in keys} for m in range(tvb.num_bases)]
    names = tvb.task_names if T_in_info is None else tvb.task_names[:T_in_info]
    raw = {"ae": "AutoencoderBasisMethod", "pca": "PCABasisMethod"}[method]
    json.dump({"method": raw, "M": tvb.num_bases, "seed": 0, "datasets": names}, open(f"{folder}/method_info.json", "w"))
    torch.save({"basis_vectors": vectors, "num_basis": len(vectors), "method": raw}, f"{folder}/basis_vectors.pt")
    if method == "ae":
        torch.save({"A": torch.zeros(4, 2), "W": tvb.coefficients.float(), "B": tvb.mixing.float(),
                    "metadata": {"M": 2, "steps": 10, "lr": 0.01, "tau_init": 5.0, "weight_decay": 1e-6, "seed": 0,
                                 "datasets": names}}, f"{folder}/AWB.pt")
    else:
        torch.save({"coefficients": tvb.coefficients.float(),
                    "mean_vector": torch.cat([tvb.mean[k].flatten() for k in keys]),
                    "singular_values": torch.ones(2), "M_actual": 2, "total_dim": 1,
                    "keys_order": keys, "param_shapes": {k: torch.Size(tvb.mean[k].shape) for k in keys},
                    "dataset_names": names}, f"{folder}/pca_components.pt")


class Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


@pytest.mark.parametrize("method", ["ae", "pca"])
def test_legacy_artifacts_convert(setup, tmp_path, method):
    base, fts, keys, V = setup
    tvb = TaskVectorBasis.from_models(base, fts, method=method, num_bases=2, task_names=NAMES, steps=200)
    _write_legacy(str(tmp_path / "run"), tvb, keys, method)
    conv = TaskVectorBasis.from_pretrained(str(tmp_path / "run"))
    assert conv.method == method and conv.task_names == NAMES
    for n in NAMES:
        a, b = tvb.recover(n), conv.recover(n)
        assert max(float((a[k] - b[k]).abs().max()) for k in keys) < 1e-6
    conv.save_pretrained(str(tmp_path / "converted"))
    assert TaskVectorBasis.from_pretrained(str(tmp_path / "converted")).task_names == NAMES
    _write_legacy(str(tmp_path / "bad"), tvb, keys, method, T_in_info=3)
    with pytest.raises(TaskVectorError, match="truncate or pad|lists tasks"):
        from_legacy(str(tmp_path / "bad"))
    torch.save({"basis_vectors": [Evil()]}, str(tmp_path / "run" / "basis_vectors.pt"))
    with pytest.raises(TaskVectorError, match="weights_only=True"):
        from_legacy(str(tmp_path / "run"))


@pytest.mark.slow  # ~20 s on 1 thread
@pytest.mark.real_model
def test_real_smollm2_two_layers(tmp_path):
    base, _ = load_default_model(num_hidden_layers=2)
    folders = lora_folders(base, tmp_path, n=4, targets=("q_proj", "down_proj"), r=2, init_lora_weights=False)
    ids = torch.randint(0, base.config.vocab_size, (1, 32), generator=torch.Generator().manual_seed(0))
    for method in ("ae", "pca"):
        tvb = TaskVectorBasis.from_models(base, folders, method=method, num_bases=2, task_names=NAMES, steps=1000)
        assert tvb.storage()["vector_bytes"] == (2 + (method == "pca")) * tvb.storage()["num_params"] * 4
        tvb.save_pretrained(str(tmp_path / method))
        again = TaskVectorBasis.from_pretrained(str(tmp_path / method))
        with torch.no_grad():
            a = tvb.negate(base, "drama", 0.5)(ids).logits
            b = again.negate(base, "drama", 0.5)(ids).logits
        assert torch.equal(a, b)
        out = str(tmp_path / f"lora_{method}")
        ranks = tvb.export_lora(base, out, alpha=0.5)
        assert max(ranks.values()) <= 8  # 4 adapters of rank 2
        with torch.no_grad():
            exported = PeftModel.from_pretrained(fresh_copy(base), out)(ids).logits
            added = tvb.add(base, 0.5)(ids).logits
        assert (exported - added).abs().max() < 1e-4
