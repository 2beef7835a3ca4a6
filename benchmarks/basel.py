"""Basel against plain truncated SVD and Basis Sharing (group 1 and 2) at the same size, on one target task.

Real SmolLM2-135M, one text domain as the task: its first blocks are the training (and calibration)
text, its last blocks the held-apart evaluation text, the same tokens for every method. For every keep
ratio (fraction of the targeted dense parameters the factors hold):

- basel: BaselConfig(keep_ratio) calibrated on the training text, trained ``--steps`` steps while the
  schedule prunes to the keep ratio, then consolidated;
- svd:   plain truncated SVD (SharedBasisConfig, group_size=1, no calibration), then ``--steps`` steps of
  fine-tuning of the factors;
- sb1 / sb2: SharedBasisConfig(group_size=1 / 2) calibrated on the training text, then the same fine-tuning.

Every run uses the same batches in the same order, AdamW at ``--lr``. Also measured: time per training
step against LoRA (r=8, same targets), and Basel + int8 factors (torch.ao dynamic quantisation).

    python benchmarks/basel.py                       # ~20-30 min on 2 CPU threads
    python benchmarks/basel.py --keep 0.5 --steps 4 --layers 28 29   # smoke run

Writes benchmarks/results/basel.json and benchmarks/results/basel.md (after every keep ratio).
"""

from __future__ import annotations

import argparse
import copy
import io
import json
import math
import os
import time
import warnings

import torch

HERE = os.path.dirname(os.path.abspath(__file__))


def parse():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--domain", default="hamlet")
    p.add_argument("--keep", type=float, nargs="+", default=[0.8, 0.6, 0.5, 0.4])
    p.add_argument("--layers", type=int, nargs="+", default=list(range(10, 20)),
                   help="decoder layers whose Linears are compressed (all 7 per layer)")
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--train-blocks", type=int, default=16)
    p.add_argument("--eval-blocks", type=int, default=12)
    p.add_argument("--lr", type=float, default=3e-4, help="Basel's training (w and the extra bases, LoRA-like)")
    p.add_argument("--ft-lr", type=float, default=1e-5,
                   help="fine-tuning of the baselines' factors (3e-5 and above made them worse in a smoke run)")
    p.add_argument("--extra-rank", type=int, default=32)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--methods", nargs="+", default=["basel", "svd", "sb1", "sb2"])
    p.add_argument("--out", default=os.path.join(HERE, "results", "basel"))
    return p.parse_args()


def log(msg):
    print(time.strftime("%H:%M:%S"), msg, flush=True)


def train(model, train_blocks, steps, batch, lr, on_step=None):
    """``steps`` AdamW steps on the training blocks in a fixed order; returns seconds per step."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    model.train()
    n = train_blocks.shape[0]
    times = []
    for step in range(1, steps + 1):
        i = ((step - 1) * batch) % n
        ids = train_blocks[i : i + batch]
        t = time.perf_counter()
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if on_step is not None:
            on_step(step, steps, opt)
        times.append(time.perf_counter() - t)
    model.eval()
    return times


def factor_bytes(model, names):
    """Bytes of the given modules' state (torch.save of their tensors): what storing them costs."""
    buf = io.BytesIO()
    state = {k: v for k, v in model.state_dict().items() if any(k.startswith(n + ".") for n in names)}
    torch.save(state, buf)
    return buf.getbuffer().nbytes


def equal_quality_ratio(basel_points, other_points):
    """For each Basel point (keep, ppl), the keep ratio at which the other method reaches the same perplexity
    (linear interpolation of log-ppl over keep ratio); None where the other never gets that good."""
    out = []
    pts = sorted(other_points)
    for keep, ppl in sorted(basel_points):
        target = math.log(ppl)
        match = None
        for (k0, p0), (k1, p1) in zip(pts, pts[1:]):
            l0, l1 = math.log(p0), math.log(p1)
            if min(l0, l1) <= target <= max(l0, l1) and l0 != l1:
                match = k0 + (target - l0) * (k1 - k0) / (l1 - l0)
        if match is None and pts and math.log(pts[0][1]) <= target:
            match = pts[0][0] if math.log(pts[0][1]) == target else None
        out.append({"basel_keep": keep, "basel_ppl": ppl, "other_keep": match,
                    "size_ratio": None if match is None else match / keep})
    return out


def write_markdown(res, path):
    lines = [f"# Basel vs truncated SVD vs Basis Sharing on SmolLM2-135M ({res['setup']['domain']})", ""]
    s = res["setup"]
    lines += [
        f"Targets: all 7 Linears of decoder layers {s['layers'][0]}-{s['layers'][-1]} "
        f"({s['target_dense_params']:,} dense parameters). Task text: {s['train_tokens']:,} training/calibration "
        f"tokens, {s['eval_tokens']:,} held-apart evaluation tokens (same for all). {s['steps']} AdamW steps per run "
        f"on the same batches (batch {s['batch']}x{s['seq']}): Basel's training at lr {s['lr']}, the baselines' factor "
        f"fine-tuning at lr {s['ft_lr']}. Threads: {s['threads']}.",
        "",
        f"Dense model perplexity: {res['dense_ppl']:.2f}.",
        "",
        "| keep | method | stored params | ppl before FT | ppl after FT | s/step |",
        "|---|---|---|---|---|---|",
    ]
    for r in res["runs"]:
        before = "-" if r.get("ppl_before") is None else f"{r['ppl_before']:.2f}"
        lines.append(f"| {r['keep']} | {r['method']} | {r['stored_params']:,} | {before} | {r['ppl']:.2f} | "
                     f"{r['sec_per_step']:.2f} |")
    if res.get("equal_quality"):
        lines += ["", "Size at equal quality (keep ratio the other method needs for Basel's perplexity; the other "
                  "method at the better of its before/after fine-tuning perplexities):", "",
                  "| vs | Basel keep | Basel ppl | other keep | size ratio |", "|---|---|---|---|---|"]
        for other, rows in res["equal_quality"].items():
            for q in rows:
                ok = "not reached in the measured range" if q["other_keep"] is None else f"{q['other_keep']:.3f}"
                ratio = "-" if q["size_ratio"] is None else f"{q['size_ratio']:.2f}x"
                lines.append(f"| {other} | {q['basel_keep']} | {q['basel_ppl']:.2f} | {ok} | {ratio} |")
    if res.get("timing"):
        t = res["timing"]
        lines += ["", "Training time per step (same batch shape):", "", "| what | s/step |", "|---|---|"]
        for k, v in t.items():
            lines.append(f"| {k} | {v:.2f} |")
    if res.get("int8"):
        q = res["int8"]
        lines += ["", f"Int8 factors (torch.ao dynamic quantisation), Basel keep {q['keep']}:", "",
                  "| model | target bytes | ppl |", "|---|---|---|"]
        for row in q["rows"]:
            lines.append(f"| {row['what']} | {row['bytes']:,} | {row['ppl']:.2f} |")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def main():
    args = parse()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    warnings.filterwarnings("ignore")
    from peft import LoraConfig, get_peft_model

    import peft_basis  # noqa: F401
    from peft_basis.io import atomic_write_text
    from peft_basis.data import load_default_model, split_blocks
    from peft_basis.evaluation import perplexity
    from peft_basis.tuners.basel import BaselConfig, export_factorized, quantize_factors_8bit
    from peft_basis.tuners.shared_basis import SharedBasisConfig

    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    model, tok = load_default_model()
    for p in model.parameters():
        p.requires_grad_(False)
    train_blocks, eval_blocks = split_blocks(tok, args.domain, args.seq, args.train_blocks, args.eval_blocks)
    targets = dict(layers_to_transform=args.layers,
                   target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    calib = [train_blocks[i : i + 4] for i in range(0, train_blocks.shape[0], 4)]
    res = {"setup": {**vars(args), "train_tokens": train_blocks.numel(), "eval_tokens": eval_blocks.numel()},
           "runs": []}

    def save():
        atomic_write_text(args.out + ".json", json.dumps(res, indent=1))
        write_markdown(res, args.out + ".md")

    res["dense_ppl"] = perplexity(model, eval_blocks)
    log(f"dense ppl {res['dense_ppl']:.2f}")

    # Calibrate once on the task's training text; every calibrated method reuses these Grams.
    base_cfg = BaselConfig(keep_ratio=args.keep[0], extra_rank=args.extra_rank, **targets)
    stats = peft_basis.calibrate(model, base_cfg, calib, progress=False)
    t = time.perf_counter()
    basel_init = get_peft_model(copy.deepcopy(model), base_cfg)  # one SVD pass, copied per keep ratio
    res["setup"]["basel_init_seconds"] = time.perf_counter() - t
    res["setup"]["target_dense_params"] = basel_init.base_model.dense_parameters()
    log(f"basel init {res['setup']['basel_init_seconds']:.1f}s; initial fraction {base_cfg.initial_fraction:.3f}")

    for keep in args.keep:
        for method in args.methods:
            t0 = time.perf_counter()
            before = None
            if method == "basel":
                pm = copy.deepcopy(basel_init)
                pm.base_model.peft_config["default"].keep_ratio = keep
                tuner = pm.base_model
                times = train(pm, train_blocks, args.steps, args.batch, args.lr, on_step=tuner.basel_step)
                stored = tuner.kept_parameters()
                extra = {"ranks_min_max": [min(tuner.ranks().values()), max(tuner.ranks().values())],
                         "history": tuner.history}
            else:
                cfg = SharedBasisConfig(compression_ratio=1 - keep, group_size=2 if method == "sb2" else 1, **targets)
                if method != "svd":
                    cfg.attach_statistics(stats)
                pm = get_peft_model(copy.deepcopy(model), cfg)
                stored = pm.base_model.stored_parameters()
                before = perplexity(pm, eval_blocks)
                times = train(pm, train_blocks, args.steps, args.batch, args.ft_lr)
                extra = {}
            ppl = perplexity(pm, eval_blocks)
            run = {"keep": keep, "method": method, "stored_params": stored,
                   "stored_fraction": stored / res["setup"]["target_dense_params"], "ppl_before": before, "ppl": ppl,
                   "sec_per_step": sum(times) / len(times), "step_times": times,
                   "wall_seconds": time.perf_counter() - t0, **extra}
            res["runs"].append(run)
            log(f"keep {keep} {method}: params {stored:,} ({run['stored_fraction']:.3f}) ppl "
                f"{'' if before is None else f'{before:.2f} -> '}{ppl:.2f}  {run['sec_per_step']:.2f}s/step")
            if method == "basel" and abs(keep - 0.5) < 1e-9:
                res["int8"] = int8_report(pm, keep, model, eval_blocks, targets, export_factorized,
                                          quantize_factors_8bit, perplexity)
                log(f"int8: {res['int8']}")
            del pm
            save()
        basel_pts = [(r["keep"], r["ppl"]) for r in res["runs"] if r["method"] == "basel"]
        res["equal_quality"] = {
            m: equal_quality_ratio(basel_pts, [(r["keep"], min(r["ppl"], r["ppl_before"] or math.inf))
                                               for r in res["runs"] if r["method"] == m])
            for m in args.methods if m != "basel"
        }
        save()

    # Time per step: LoRA (r=8, same targets) and Basel at the start of training (full rank) on the same batch.
    lora = get_peft_model(copy.deepcopy(model), LoraConfig(r=8, lora_alpha=16, **targets))
    lora_t = train(lora, train_blocks, 4, args.batch, args.lr)
    del lora
    b = copy.deepcopy(basel_init)
    basel_t = train(b, train_blocks, 4, args.batch, args.lr)  # no pruning: the full-rank training phase
    del b
    basel_runs = [r for r in res["runs"] if r["method"] == "basel"]
    ft_runs = [r for r in res["runs"] if r["method"] == "sb1"]
    res["timing"] = {
        "LoRA r=8 (dense base)": min(lora_t[1:]),
        "Basel training phase, full rank (before pruning)": min(basel_t[1:]),
    }
    for r in basel_runs:
        res["timing"][f"Basel training phase, last step at keep {r['keep']}"] = r["step_times"][-1]
    for r in ft_runs:
        res["timing"][f"fine-tuning factorised model (sb1) at keep {r['keep']}"] = min(r["step_times"][1:])
    save()
    log("done")


def int8_report(pm, keep, dense_model, eval_blocks, targets, export_factorized, quantize_factors_8bit, perplexity):
    from peft_basis.tuners.basel import FactorizedLinear

    fp = export_factorized(copy.deepcopy(pm))
    names = [n for n, m in fp.named_modules() if isinstance(m, FactorizedLinear)]
    q = quantize_factors_8bit(fp)
    rows = [
        {"what": f"Basel factors fp32 (keep {keep})", "bytes": factor_bytes(fp, names), "ppl": perplexity(fp, eval_blocks)},
        {"what": f"Basel factors int8 (keep {keep})", "bytes": factor_bytes(q, names), "ppl": perplexity(q, eval_blocks)},
    ]
    # Reference: the dense targets in int8 with the same quantiser.
    from torch.ao.quantization import quantize_dynamic

    from peft_basis.tuners.basel import BaselModel  # noqa: F401  (import side effects already done)

    dense_names = [n for n in names]
    dq = quantize_dynamic(copy.deepcopy(dense_model), qconfig_spec=set(dense_names), dtype=torch.qint8)
    rows.append({"what": "dense targets fp32", "bytes": factor_bytes(dense_model, dense_names),
                 "ppl": perplexity(dense_model, eval_blocks)})
    rows.append({"what": "dense targets int8", "bytes": factor_bytes(dq, dense_names), "ppl": perplexity(dq, eval_blocks)})
    return {"keep": keep, "rows": rows}


if __name__ == "__main__":
    main()
