"""Task Vector Bases on the real SmolLM2-135M with T=4 real text domains as tasks, M=2.

Tasks (domains; first blocks train, next blocks validate the scaling alpha, last blocks test; the
same tokens for every method):
  pydoc (Python docs), britannica (encyclopedia), hamlet (modern spelling), folio (four comedies in
  the 1623 First Folio spelling). Each task: LoRA r=8 (alpha 16) on q,k,v,o,gate,up,down, AdamW,
  ``--steps`` steps of ``--batch`` x ``--seq`` tokens, 1 thread. Adapters are cached under
  $PEFT_BASIS_CACHE/task_vector_bench/ so a rerun skips training.

Measured, perplexity on the test blocks of every domain:
  (a) each fine-tune alone (on its own domain); (b) plain task arithmetic theta_0 + alpha sum_t v_t;
  (c) AE bases theta_0 + alpha sum_m s_m; (d) PCA bases (sum of recovered tasks = T mu, and the
  paper's sum_m s_m); alpha searched on the validation blocks (21 points in [0,1], best mean
  normalised score ppl_alone / ppl). Normalised = ppl_alone / ppl (1 = as good as the specialist).
  Negation of one task (exact vector, AE-recovered, PCA-recovered): alpha searched to raise the
  target's validation ppl most while the control's stays within 5% of the base's.
  Storage bytes, build time, peak memory of the build (fresh subprocess, RSS above the loaded model).

    python benchmarks/task_vectors.py                # ~18 min on 1 thread (~7 min with cached adapters)
    python benchmarks/task_vectors.py --steps 2 --smoke

Writes benchmarks/results/task_vectors.json and benchmarks/results/task_vectors.md.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import tempfile
import time

import torch

from peft_basis.data import _plays, cache_dir, load_default_model, load_text, token_blocks
from peft_basis.evaluation import peak_rss_bytes, perplexity, reset_peak_rss, rss_bytes, size_on_disk
from peft_basis.task_vectors import TaskVectorBasis

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
FOLIO = ["as_you_like_it_gut_f", "comedy_of_errours_gut_f", "twelfe-night_gut_f", "merry_wives_of_windsor_gut_f",
         "much_ado_about_nothing_gut_f", "taming_of_the_shrew_gut_f", "tempest_gut_f"]


def domain_text(name: str) -> str:
    if name == "hamlet":
        return _plays(["hamlet_gut.txt"])
    if name == "folio":
        try:
            return _plays(FOLIO)
        except FileNotFoundError:
            return _plays(["_gut_f"])
    return load_text(name)


def finetune(model, blocks, steps, batch, lr, seed, out_dir):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    peft_model = get_peft_model(copy.deepcopy(model), LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS,
                                                                 lora_dropout=0.0))
    opt = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    peft_model.train()
    g = torch.Generator().manual_seed(seed)
    t0, losses = time.perf_counter(), []
    for step in range(steps):
        idx = torch.randint(0, blocks.shape[0], (batch,), generator=g)
        ids = blocks[idx]
        loss = peft_model(input_ids=ids, labels=ids, use_cache=False).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    peft_model.save_pretrained(out_dir)
    return {"seconds": time.perf_counter() - t0, "first_loss": losses[0], "last_loss": sum(losses[-5:]) / len(losses[-5:])}


def measure_build(args):
    """Subprocess entry: build one basis from the cached adapters, print peak memory as JSON."""
    torch.set_num_threads(1)
    model, _ = load_default_model()
    before = rss_bytes()
    reset_peak_rss()
    t0 = time.perf_counter()
    tvb = TaskVectorBasis.from_models(model, args.adapters, method=args.measure_build, num_bases=args.num_bases,
                                      task_names=args.tasks, chunk_elements=args.chunk)
    seconds = time.perf_counter() - t0
    peak_build = peak_rss_bytes()
    tvb.save_pretrained(args.save_to)
    print(json.dumps({"seconds": seconds, "rss_before": before, "peak_rss": peak_rss_bytes(),
                      "peak_build_above_model": peak_build - before,
                      "peak_above_model": peak_rss_bytes() - before, "info": {k: v for k, v in tvb.info.items() if k != "sources"},
                      "storage": tvb.storage()}))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tasks", nargs="+", default=["pydoc", "britannica", "hamlet", "folio"])
    ap.add_argument("--num-bases", type=int, default=2)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--val-blocks", type=int, default=1)
    ap.add_argument("--test-blocks", type=int, default=4)
    ap.add_argument("--negate", default="hamlet")
    ap.add_argument("--control", default="britannica")
    ap.add_argument("--chunk", type=int, default=4_000_000)
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--measure-build", default=None)
    ap.add_argument("--adapters", nargs="*")
    ap.add_argument("--save-to", default=None)
    args = ap.parse_args()
    if args.measure_build:
        return measure_build(args)
    torch.set_num_threads(1)
    t_start = time.perf_counter()
    model, tok = load_default_model()
    T = len(args.tasks)

    def log(*a):
        print(f"[{time.perf_counter() - t_start:7.1f}s]", *a, flush=True)

    splits = {}
    for d in args.tasks:
        blocks = token_blocks(tok, domain_text(d), args.seq)
        n_test, n_val = args.test_blocks, args.val_blocks
        splits[d] = {"train": blocks[: blocks.shape[0] - n_test - n_val],
                     "val": blocks[-(n_test + n_val):-n_test], "test": blocks[-n_test:]}
    log("blocks", {d: {k: int(v.shape[0]) for k, v in s.items()} for d, s in splits.items()})

    # ---- fine-tunes (cached) ---------------------------------------------------------------------
    tag = f"s{args.steps}_b{args.batch}_q{args.seq}_lr{args.lr}"
    adapters, train_info = [], {}
    for i, d in enumerate(args.tasks):
        out = os.path.join(cache_dir(), "task_vector_bench", f"{d}_{tag}")
        if not os.path.exists(os.path.join(out, "adapter_model.safetensors")):
            train_info[d] = finetune(model, splits[d]["train"], args.steps, args.batch, args.lr, i, out)
            log("fine-tuned", d, train_info[d])
        adapters.append(out)

    def ppl(m, d, split="test"):
        return perplexity(m, splits[d][split], batch_size=4)

    results = {"config": vars(args) | {"adapters": adapters}, "train": train_info}
    base_test = {d: ppl(model, d) for d in args.tasks}
    base_val = {d: ppl(model, d, "val") for d in args.tasks}
    log("base", base_test)

    from peft import PeftModel

    alone_test, alone_val = {}, {}
    for d, a in zip(args.tasks, adapters):
        m = PeftModel.from_pretrained(copy.deepcopy(model), a).merge_and_unload()
        alone_test[d], alone_val[d] = ppl(m, d), ppl(m, d, "val")
        del m
    log("alone", alone_test)
    results["base"], results["alone"] = base_test, alone_test

    # ---- bases (each built in a fresh subprocess: peak memory) ------------------------------------
    tmp = tempfile.mkdtemp(prefix="tvb_bench_")
    builds = {}
    for method in ("ae", "pca"):
        folder = os.path.join(tmp, method)
        cmd = [sys.executable, __file__, "--measure-build", method, "--adapters", *adapters, "--tasks", *args.tasks,
               "--num-bases", str(args.num_bases), "--save-to", folder, "--chunk", str(args.chunk)]
        outp = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
        builds[method] = json.loads(outp) | {"disk_bytes": size_on_disk(folder)}
        log("built", method, {k: builds[method][k] for k in ("seconds", "peak_above_model")})
    # the exact T task vectors (M = T-1 PCA reconstructs them exactly; used for plain task arithmetic)
    exact = TaskVectorBasis.from_models(model, adapters, method="pca", num_bases=T - 1, task_names=args.tasks)
    log("exact basis rel error", exact.info["relative_error"])
    tvbs = {m: TaskVectorBasis.from_pretrained(os.path.join(tmp, m)) for m in ("ae", "pca")}

    # ---- addition --------------------------------------------------------------------------------
    def add_score(m):
        return sum(alone_val[d] / ppl(m, d, "val") for d in args.tasks) / T

    variants = {"task_arithmetic": (exact, "tasks"), "ae_bases": (tvbs["ae"], "bases"),
                "pca_tasks": (tvbs["pca"], "tasks"), "pca_bases": (tvbs["pca"], "bases")}
    if args.smoke:
        grid = [0.0, 0.5, 1.0]
    else:
        grid = None
    addition = {}
    for name, (tvb, combine) in variants.items():
        merged = tvb.add(model, alpha=None, eval_fn=add_score, combine=combine, grid=grid)
        best = max(tvb.last_search, key=tvb.last_search.get)
        test = {d: ppl(merged, d) for d in args.tasks}
        addition[name] = {"alpha": best, "val_score": tvb.last_search[best], "test_ppl": test,
                          "normalized": {d: alone_test[d] / test[d] for d in args.tasks},
                          "mean_normalized": sum(alone_test[d] / test[d] for d in args.tasks) / T,
                          "search": tvb.last_search}
        del merged
        log("add", name, addition[name]["alpha"], round(addition[name]["mean_normalized"], 4))
    results["addition"] = addition

    # ---- negation --------------------------------------------------------------------------------
    tgt, ctl = args.negate, args.control

    def neg_score(m):
        c = ppl(m, ctl, "val")
        if c > base_val[ctl] / 0.95:
            return -1e9 - c  # control lost more than 5%: not allowed
        return ppl(m, tgt, "val")

    negation = {}
    for name, tvb in {"exact": exact, "ae": tvbs["ae"], "pca": tvbs["pca"]}.items():
        neg = tvb.negate(model, tgt, alpha=None, eval_fn=neg_score, grid=grid)
        best = max(tvb.last_search, key=tvb.last_search.get)
        t_ppl, c_ppl = ppl(neg, tgt), ppl(neg, ctl)
        negation[name] = {"alpha": best, "target_ppl": t_ppl, "control_ppl": c_ppl,
                          "target_rise": t_ppl / base_test[tgt], "control_change": c_ppl / base_test[ctl] - 1}
        del neg
        log("negate", name, negation[name])
    results["negation"] = {"target": tgt, "control": ctl, **negation}
    # recovery error of the target task vector (relative Frobenius), from the stored bases
    v_true = exact.recover(tgt)
    vt2 = sum(float((v.double() ** 2).sum()) for v in v_true.values())
    rec_err = {}
    for name, tvb in tvbs.items():
        r = tvb.recover(tgt)
        rec_err[name] = (sum(float(((r[k].double() - v_true[k].double()) ** 2).sum()) for k in r) / vt2) ** 0.5
    results["recovery_error"] = rec_err

    # ---- storage -----------------------------------------------------------------------------------
    D = exact.storage()["num_params"]
    merged_lora = os.path.join(tmp, "merged_lora")
    ranks = tvbs["ae"].export_lora(model, merged_lora, alpha=addition["ae_bases"]["alpha"], tol=1e-4)
    results["storage"] = {
        "num_params_D": D, "dense_task_vectors_fp32": T * D * 4,
        "lora_adapters": sum(size_on_disk(os.path.join(a, "adapter_model.safetensors")) for a in adapters),
        "ae_basis_disk": builds["ae"]["disk_bytes"], "pca_basis_disk": builds["pca"]["disk_bytes"],
        "ae_merged_as_lora_disk": size_on_disk(merged_lora), "ae_merged_lora_max_rank": max(ranks.values()),
    }
    results["build"] = builds
    results["bound"] = {m: (args.num_bases + (m == "pca")) * D * 4 + (T + 1) * args.chunk * 4 for m in ("ae", "pca")}
    results["seconds"] = time.perf_counter() - t_start
    os.makedirs(RESULTS, exist_ok=True)
    suffix = "_smoke" if args.smoke else ""
    with open(os.path.join(RESULTS, f"task_vectors{suffix}.json"), "w") as f:
        json.dump(results, f, indent=2)
    with open(os.path.join(RESULTS, f"task_vectors{suffix}.md"), "w") as f:
        f.write(markdown(results, args))
    log("done")


def markdown(r, args) -> str:
    tasks = args.tasks
    lines = [f"# Task Vector Bases on SmolLM2-135M: T={len(tasks)} domains, M={args.num_bases}", "",
             f"LoRA r=8 fine-tunes, {args.steps} steps x {args.batch} x {args.seq} tokens; test ppl on "
             f"{args.test_blocks} x {args.seq} tokens per domain; alpha searched on {args.val_blocks} x {args.seq} "
             "validation tokens (21 points in [0,1]). Normalised = ppl(fine-tune alone) / ppl (1 = specialist).", "",
             "| model | alpha | " + " | ".join(tasks) + " | mean normalised |", "|---|---|" + "---|" * len(tasks) + "---|",
             "| base | - | " + " | ".join(f"{r['base'][d]:.2f}" for d in tasks) + " | " +
             f"{sum(r['alone'][d] / r['base'][d] for d in tasks) / len(tasks):.3f} |",
             "| (a) fine-tune alone (own domain) | - | " + " | ".join(f"{r['alone'][d]:.2f}" for d in tasks) + " | 1.000 |"]
    for name, a in r["addition"].items():
        lines.append(f"| {name} | {a['alpha']:.2f} | " + " | ".join(
            f"{a['test_ppl'][d]:.2f} ({a['normalized'][d]:.3f})" for d in tasks) + f" | {a['mean_normalized']:.3f} |")
    n = r["negation"]
    lines += ["", f"Negation of `{n['target']}` (control `{n['control']}`: ppl kept within 5% of the base on validation).", "",
              "| vector | alpha | target ppl | target rise | control ppl | control change |", "|---|---|---|---|---|---|"]
    for name in ("exact", "ae", "pca"):
        x = n[name]
        lines.append(f"| {name} | {x['alpha']:.2f} | {x['target_ppl']:.2f} | x{x['target_rise']:.3f} | "
                     f"{x['control_ppl']:.2f} | {100 * x['control_change']:+.2f}% |")
    s, b = r["storage"], r["build"]
    lines += ["", f"Recovery error of `{n['target']}` (relative Frobenius): AE {r['recovery_error']['ae']:.3f}, "
              f"PCA {r['recovery_error']['pca']:.3f}.", "",
              "| storage | bytes |", "|---|---|",
              f"| T dense task vectors (fp32, D={s['num_params_D']:,}) | {s['dense_task_vectors_fp32']:,} |",
              f"| the T LoRA adapters themselves | {s['lora_adapters']:,} |",
              f"| AE basis (safetensors + JSON) | {s['ae_basis_disk']:,} |",
              f"| PCA basis (incl. mean vector) | {s['pca_basis_disk']:,} |",
              f"| AE addition result exported as LoRA (max rank {s['ae_merged_lora_max_rank']}) | {s['ae_merged_as_lora_disk']:,} |",
              "", "| build | seconds | peak RSS above loaded model | bound (output + (T+1) chunks) |", "|---|---|---|---|"]
    for m in ("ae", "pca"):
        lines.append(f"| {m} | {b[m]['seconds']:.1f} | {b[m]['peak_above_model'] / 2**20:.0f} MiB | "
                     f"{r['bound'][m] / 2**20:.0f} MiB |")
    lines.append(f"\nTotal benchmark time {r['seconds'] / 60:.1f} min (1 thread).")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
