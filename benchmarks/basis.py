"""BASIS (uniform / eigen / fisher allocation) against PEFT's LoRA, EVA and CorDA on one domain-adaptation task.

Real SmolLM2-135M weights, cut to its first ``--layers`` decoder layers (the full 30-layer model is ~5x
slower per step on 2 CPU cores); every Linear of every kept layer is a target (7 per layer). Calibration
text (BASIS covariances and Fisher scores, EVA's and CorDA's statistics): ``--calib-domain``
(Britannica); training and held-apart evaluation text: ``--domain`` (Hamlet): the first blocks train,
then validation blocks (learning-rate choice), then test blocks (the reported loss), never overlapping.

1. Equal trainable parameters: every method at LoRA r=8's count (BASIS: budget = that count; uniform: the
   largest r whose cost fits it). Methods ``basis-<allocation>[-<trainable>]``: the trainable shape
   defaults to BasisConfig's (``"output"``); ``basis-eigen-core`` etc. measure the others. For each method the learning rate is chosen from ``--lrs`` by
   validation loss after ``--steps`` AdamW steps (same batches, same order, same seed for all).
2. Size to reach LoRA r=8's test loss: each method at smaller and larger sizes (its chosen learning rate),
   the trainable parameters interpolated in log scale where its curve crosses LoRA r=8's loss.
3. Cost: seconds per training step (median, after the first), and calibration/initialisation time
   (``calibrate`` + ``get_peft_model`` for BASIS; EVA's ``initialize_lora_eva_weights``; CorDA's
   ``preprocess_corda`` + ``get_peft_model``; LoRA: ``get_peft_model``).

    python benchmarks/basis.py                 # ~25 min on one thread
    python benchmarks/basis.py --quick         # smoke run (2 layers, 3 steps, one LR)
    python benchmarks/basis.py --update --methods basis-eigen   # rerun some methods, keep the others' runs
    python benchmarks/basis.py --timing        # re-measure s/step and init time, each method alone

Writes benchmarks/results/basis.json and benchmarks/results/basis.md after every run.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import statistics
import time
import warnings

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
METHODS = ["lora", "eva", "corda", "basis-uniform", "basis-eigen", "basis-fisher"]


def parse():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--domain", default="hamlet")
    p.add_argument("--calib-domain", default="britannica")
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--calib-blocks", type=int, default=16)
    p.add_argument("--val-blocks", type=int, default=12)
    p.add_argument("--test-blocks", type=int, default=24)
    p.add_argument("--lrs", type=float, nargs="+", default=[1e-3, 3e-3, 1e-2])
    p.add_argument("--sizes", type=float, nargs="*", default=[0.25, 2.0],
                   help="extra sizes, as multiples of LoRA r=8's trainable parameters")
    p.add_argument("--methods", nargs="+", default=METHODS)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--timing", action="store_true",
                   help="only re-measure s/step and init time of every method at equal parameters (quiet machine), "
                        "into the existing results file")
    p.add_argument("--timing-steps", type=int, default=12)
    p.add_argument("--update", action="store_true",
                   help="keep the other methods' runs from the existing results file; rerun only --methods")
    p.add_argument("--out", default=os.path.join(HERE, "results", "basis"))
    a = p.parse_args()
    if a.quick:
        a.layers, a.steps, a.lrs, a.sizes, a.val_blocks, a.test_blocks = 2, 3, [1e-3], [0.25], 4, 4
        a.out = a.out + "_quick"
    return a


def log(msg):
    print(time.strftime("%H:%M:%S"), msg, flush=True)


# ---- the methods -----------------------------------------------------------------------------------------
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def lora_params(model, r):
    total = 0
    for n, m in model.named_modules():
        if isinstance(m, torch.nn.Linear) and n.rsplit(".", 1)[-1] in TARGETS:
            total += r * (m.in_features + m.out_features)
    return total


def build(method, size, model, calib, args):
    """``size``: LoRA rank for lora/eva/corda, trainable-parameter budget for BASIS. Returns the PEFT model."""
    from peft import LoraConfig, get_peft_model

    import peft_basis
    from peft_basis.tuners.basis import BasisConfig

    batches = [calib[i : i + 4] for i in range(0, len(calib), 4)]
    if method == "lora":
        return get_peft_model(model, LoraConfig(r=size, lora_alpha=2 * size, target_modules=TARGETS))
    if method == "eva":
        from peft import EvaConfig
        from peft.tuners.lora.eva import initialize_lora_eva_weights

        config = LoraConfig(r=size, lora_alpha=2 * size, target_modules=TARGETS, init_lora_weights="eva",
                            eva_config=EvaConfig(rho=2.0))
        pm = get_peft_model(model, config)
        data = [{"input_ids": b, "attention_mask": torch.ones_like(b)} for b in batches]
        initialize_lora_eva_weights(pm, data, show_progress_bar=False)
        return pm
    if method == "corda":
        from peft.tuners.lora.config import CordaConfig
        from peft.tuners.lora.corda import preprocess_corda

        config = LoraConfig(r=size, lora_alpha=2 * size, target_modules=TARGETS, init_lora_weights="corda",
                            corda_config=CordaConfig(corda_method="ipm"))

        @torch.no_grad()
        def run_model():  # CorDA's hook expects one sequence per forward
            for seq in calib:
                model(input_ids=seq[None])

        preprocess_corda(model, config, run_model=run_model)
        return get_peft_model(model, config)
    parts = method.split("-")  # basis-<allocation>[-<trainable>]
    allocation, trainable = parts[1], (parts[2] if len(parts) > 2 else BasisConfig.trainable)
    config = BasisConfig(r=1, rank_allocation=allocation, trainable=trainable, target_modules=TARGETS)
    shapes = [(m.in_features, m.out_features) for n, m in model.named_modules()
              if isinstance(m, torch.nn.Linear) and n.rsplit(".", 1)[-1] in TARGETS]
    r = 1  # uniform: the largest r whose cost fits the budget; it also sets r_max = 4 r for the others
    while sum(config.rank_cost(r + 1, *s) for s in shapes) <= size:
        r += 1
    kw = {} if allocation == "uniform" else {"budget": int(size)}
    config = BasisConfig(r=r, rank_allocation=allocation, trainable=trainable, target_modules=TARGETS, **kw)
    peft_basis.calibrate(model, config, batches, progress=False)
    return get_peft_model(model, config)


@torch.no_grad()
def mean_loss(model, blocks, batch=4):
    model.eval()
    nll, count = 0.0, 0
    for i in range(0, len(blocks), batch):
        ids = blocks[i : i + batch]
        logits = model(input_ids=ids, use_cache=False).logits[:, :-1].float()
        nll += torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                                                 reduction="sum").item()
        count += ids[:, 1:].numel()
    model.train()
    return nll / count


def run_one(method, size, lr, base, data, args):
    model = copy.deepcopy(base)
    torch.manual_seed(0)
    t = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = build(method, size, model, data["calib"], args)
    init_s = time.perf_counter() - t
    trainable = sum(p.numel() for p in pm.parameters() if p.requires_grad)
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    pm.train()
    times, losses = [], []
    train = data["train"]
    for step in range(args.steps):
        b = train[(step * args.batch) % len(train):][: args.batch]
        t = time.perf_counter()
        loss = pm(input_ids=b, labels=b, use_cache=False).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t)
        losses.append(loss.item())
    val = mean_loss(pm, data["val"])
    test = mean_loss(pm, data["test"])
    return {"method": method, "size": size, "lr": lr, "trainable": trainable, "init_s": init_s,
            "step_s": statistics.median(times[1:] or times), "val_loss": val, "test_loss": test,
            "train_loss_last": losses[-1], "finite": all(math.isfinite(x) for x in losses)}


# ---- report -------------------------------------------------------------------------------------------------
def params_to_reach(runs, method, target):
    pts = sorted((r["trainable"], r["test_loss"]) for r in runs if r["method"] == method and r.get("sweep"))
    for (p0, l0), (p1, l1) in zip(pts, pts[1:]):
        if l0 > target >= l1:
            f = (l0 - target) / (l0 - l1)
            return math.exp(math.log(p0) + f * (math.log(p1) - math.log(p0)))
    if pts and pts[0][1] <= target:
        return f"<= {pts[0][0]}"
    return None


def write(results, args):
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    tmp = args.out + ".json.tmp"
    with open(tmp, "w") as f:
        json.dump(results, f, indent=1)
    os.replace(tmp, args.out + ".json")
    runs = results["runs"]
    ref_size = results["lora_r8_params"]
    lines = [f"# BASIS vs LoRA, EVA, CorDA on SmolLM2-135M (first {args.layers} layers), {args.domain}", "",
             f"Targets: all 7 Linears of decoder layers 0-{args.layers - 1}. Calibration: {args.calib_blocks} blocks x "
             f"{args.seq} tokens of {args.calib_domain}. Task: {args.steps} AdamW steps of {args.batch}x{args.seq} "
             f"tokens of {args.domain}; LR chosen from {args.lrs} on {args.val_blocks} validation blocks; test loss on "
             f"{args.test_blocks} further blocks (mean token NLL, nats). Threads: {args.threads}. Seed 0 for all.", "",
             f"Base model test loss (no training): {results['base_test_loss']:.4f}.", "",
             "## Equal trainable parameters (LoRA r=8's count)", "",
             "| method | trainable | best lr | val loss | test loss | s/step | init s |", "|---|---|---|---|---|---|---|"]
    best = results.get("best", {})
    order = [m for m in METHODS if m in best] + [m for m in best if m not in METHODS]  # other shapes last
    best = {m: best[m] for m in order}
    runs = sorted(runs, key=lambda r: order.index(r["method"]) if r["method"] in order else len(order))
    for m, r in best.items():
        lines.append(f"| {m} | {r['trainable']:,} | {r['lr']:g} | {r['val_loss']:.4f} | {r['test_loss']:.4f} | "
                     f"{r['step_s']:.3f} | {r['init_s']:.1f} |")
    lines += ["", "All learning rates:", "", "| method | lr | val loss | test loss |", "|---|---|---|---|"]
    for r in runs:
        if r.get("search"):
            lines.append(f"| {r['method']} | {r['lr']:g} | {r['val_loss']:.4f} | {r['test_loss']:.4f} |")
    if "lora" in best:
        target = best["lora"]["test_loss"]
        lora_step = best["lora"]["step_s"]
        lines += ["", f"## Trainable parameters needed to reach LoRA r=8's test loss ({target:.4f})", "",
                  "| method | sizes measured (trainable: test loss) | trainable to reach | vs LoRA r=8 |", "|---|---|---|---|"]
        for m in best:
            pts = sorted((r["trainable"], r["test_loss"]) for r in runs if r["method"] == m and r.get("sweep"))
            need = params_to_reach(runs, m, target)
            if isinstance(need, float):
                cell, ratio = f"{need:,.0f}", f"{need / ref_size:.2f}x"
            elif need is None:
                cell, ratio = "not reached in the measured range", "-"
            else:
                cell, ratio = need, "-"
            lines.append(f"| {m} | " + ", ".join(f"{p:,}: {l:.4f}" for p, l in pts) + f" | {cell} | {ratio} |")
        quiet = all("step_s_quiet" in r for r in best.values())
        key_s, key_i = ("step_s_quiet", "init_s_quiet") if quiet else ("step_s", "init_s")
        lora_step = best["lora"][key_s]
        how = (f"re-measured with each method alone on the machine ({results.get('timing_steps')} steps, median after the "
               "first)" if quiet else "from the runs above (other work on the machine can add noise)")
        lines += ["", "## Cost relative to LoRA r=8", "", f"Times {how}. Init: everything between the base model and "
                  "the first training step (BASIS: calibrate + get_peft_model; EVA: get_peft_model + "
                  "initialize_lora_eva_weights; CorDA: preprocess_corda + get_peft_model).", "",
                  "| method | s/step | step time / LoRA | init time (s) | init in LoRA steps |", "|---|---|---|---|---|"]
        for m, r in best.items():
            lines.append(f"| {m} | {r[key_s]:.3f} | {r[key_s] / lora_step:.2f} | {r[key_i]:.1f} | "
                         f"{r[key_i] / lora_step:.1f} |")
    with open(args.out + ".md.tmp", "w") as f:
        f.write("\n".join(lines) + "\n")
    os.replace(args.out + ".md.tmp", args.out + ".md")


def timing(args, base, data):
    """Step and init times, each method alone on the machine, ``--timing-steps`` steps at its chosen LR."""
    with open(args.out + ".json") as f:
        results = json.load(f)
    saved_steps = args.steps
    args.steps = 4
    run_one("lora", 8, 1e-3, base, data, args)  # warm-up: the first run in a process is slower (allocator, kernels)
    args.steps = args.timing_steps
    for m, best in results["best"].items():
        r = run_one(m, best["size"], best["lr"], base, data, args)
        best["step_s_quiet"], best["init_s_quiet"] = r["step_s"], r["init_s"]
        log(f"timing {m}: step {r['step_s']:.3f}s init {r['init_s']:.1f}s")
    args.steps = saved_steps
    results["timing_steps"] = args.timing_steps
    write(results, args)


def main():
    args = parse()
    torch.set_num_threads(args.threads)
    import peft_basis  # noqa: F401  (registers BASIS)
    from peft_basis.data import load_default_model, load_text, token_blocks

    base, tok = load_default_model(num_hidden_layers=args.layers)
    base.requires_grad_(False)
    calib = token_blocks(tok, load_text(args.calib_domain), args.seq, num_blocks=args.calib_blocks)
    task = token_blocks(tok, load_text(args.domain), args.seq)
    n_train = args.steps * args.batch
    need = n_train + args.val_blocks + args.test_blocks
    if len(task) < need:
        raise SystemExit(f"{args.domain} has {len(task)} blocks; {need} needed")
    data = {"calib": calib, "train": task[:n_train], "val": task[n_train : n_train + args.val_blocks],
            "test": task[n_train + args.val_blocks : need]}
    if args.timing:
        return timing(args, base, data)
    ref = lora_params(base, 8)
    results = {"args": vars(args), "lora_r8_params": ref, "base_test_loss": mean_loss(base, data["test"]), "runs": [],
               "best": {}}
    if args.update and os.path.exists(args.out + ".json"):
        with open(args.out + ".json") as f:
            old = json.load(f)
        results["runs"] = [r for r in old["runs"] if r["method"] not in args.methods]
        results["best"] = {m: r for m, r in old["best"].items() if m not in args.methods}
    log(f"base test loss {results['base_test_loss']:.4f}; LoRA r=8 trainable {ref:,}")

    def size_for(method, mult):
        if method in ("lora", "eva", "corda"):
            return max(1, round(8 * mult))
        return int(ref * mult)

    for m in args.methods:  # 1. learning-rate search at equal parameters
        for lr in args.lrs:
            r = run_one(m, size_for(m, 1.0), lr, base, data, args)
            r["search"] = r["sweep"] = True
            results["runs"].append(r)
            log(f"{m} lr={lr:g} trainable={r['trainable']:,} val={r['val_loss']:.4f} test={r['test_loss']:.4f} "
                f"step={r['step_s']:.3f}s init={r['init_s']:.1f}s")
            write(results, args)
        cands = [r for r in results["runs"] if r["method"] == m and r.get("search") and r["finite"]]
        results["best"][m] = min(cands, key=lambda r: r["val_loss"])
        for r in results["runs"]:  # only the chosen LR's run belongs to the size curve
            if r["method"] == m and r.get("search") and r is not results["best"][m]:
                r["sweep"] = False
        write(results, args)
    for mult in args.sizes:  # 2. other sizes at each method's chosen LR
        for m in args.methods:
            r = run_one(m, size_for(m, mult), results["best"][m]["lr"], base, data, args)
            r["sweep"], r["mult"] = True, mult
            results["runs"].append(r)
            log(f"{m} x{mult} trainable={r['trainable']:,} test={r['test_loss']:.4f}")
            write(results, args)
    log("done")


if __name__ == "__main__":
    main()
