"""Basel against per-layer whitened SVD and the anchored fit, every method trained by the same distillation from
the dense model, at equal stored parameters, on one target domain (issue 13, item 5).

Real SmolLM2-135M. The task text is one domain (Hamlet by default): its first ``--train-blocks`` blocks are the
calibration and training text, the next ``--val-blocks`` choose each method's learning rate, its last
``--eval-blocks`` are the held-apart evaluation text; a second domain (Britannica) is held apart too, to see what
the task training costs elsewhere. For every keep ratio (fraction of the targeted dense parameters stored):

- ``sb1``: per-layer whitened SVD (``SharedBasisConfig(group_size=1)``), calibrated on the training text, then its
  factors trained by distillation (what ``peft_basis.healing.heal(train="factors")`` runs);
- ``anchored``: the anchored fit (``SharedBasisConfig(group_size=1, inputs="anchored")``), then the same training;
- ``basel``: ``BaselConfig(init="whitened")``, trained by the same distillation while ``BaselCallback`` prunes it
  to the keep ratio and consolidates it (``w`` and the extra bases train; Basel's part 1);
- ``basel_anchored``: ``BaselConfig(init="anchored")`` (the anchored fit at ``initial_keep``), likewise;
- ``basel_anchored+ft``: the same, with Basel's part 2: pruning in the first ``--part1`` of the steps (at
  ``basel_anchored``'s learning rate), then the consolidated factors train for the rest (the same total steps).

Every run: ``DistillationTrainer`` (KL from the dense model, temperature 1), the same ``--steps`` steps on the same
batches in the same order, AdamW with a cosine schedule; the learning rate of each method is chosen among its grid
(``--factor-lrs`` for factor training, Basel's part 2 included; ``--basel-lrs`` for Basel's part 1) by perplexity
on the validation blocks at the first keep ratio, then kept.

    python benchmarks/basel.py                                    # ~1-2 h on 2 shared CPU cores
    python benchmarks/basel.py --keep 0.4 --append                # one more keep ratio, the chosen learning rates
    python benchmarks/basel.py --keep 0.5 --steps 4 --layers 28 29 --factor-lrs 3e-5 --basel-lrs 1e-3   # smoke

Writes benchmarks/results/basel.json and benchmarks/results/basel.md after every run.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import tempfile
import time
import warnings

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
METHODS = ["sb1", "anchored", "basel", "basel_anchored", "basel_anchored+ft"]
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def parse():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--domain", default="hamlet")
    p.add_argument("--other-domain", default="britannica")
    p.add_argument("--keep", type=float, nargs="+", default=[0.5, 0.4, 0.6, 0.8])
    p.add_argument("--layers", type=int, nargs="+", default=[14, 15, 16, 17],
                   help="decoder layers whose Linears are compressed (all 7 per layer)")
    p.add_argument("--steps", type=int, default=24)
    p.add_argument("--part1", type=float, default=0.5, help="basel_anchored+ft: share of the steps Basel prunes in")
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--train-blocks", type=int, default=48)
    p.add_argument("--val-blocks", type=int, default=16)
    p.add_argument("--eval-blocks", type=int, default=32)
    p.add_argument("--factor-lrs", type=float, nargs="+", default=[1e-4, 3e-4, 1e-3])
    p.add_argument("--basel-lrs", type=float, nargs="+", default=[1e-3, 3e-3, 1e-2])
    p.add_argument("--initial-keep", type=float, default=None,
                   help="basel_anchored's initial_keep (default: BaselConfig's, min(1, 1.5 x keep))")
    p.add_argument("--extra-rank", type=int, default=32)
    p.add_argument("--rank-allocation", default="global", choices=["global", "uniform"], help="Basel's pruning")
    p.add_argument("--anchored-fit", type=json.loads, default={},
                   help="options of the anchored fit (anchored, basel_anchored*) as JSON, e.g. "
                        "'{\"rank_allocation\": \"loss\", \"output_weights\": \"fisher\"}' (BaselConfig.anchored_fit)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    p.add_argument("--out", default=os.path.join(HERE, "results", "basel"))
    p.add_argument("--append", action="store_true",
                   help="add to --out's JSON (same setup otherwise): its runs of the keep ratios and methods run now "
                        "are replaced, the learning rates it chose for the others are reused, not chosen again")
    return p.parse_args()


def log(msg):
    print(time.strftime("%H:%M:%S"), msg, flush=True)


class InOrder(torch.utils.data.IterableDataset):
    """The training blocks in their order, from ``start``, cycling: every method sees the same batches in the same
    order (Trainer does not shuffle an iterable dataset), and a second phase continues where the first stopped."""

    def __init__(self, blocks, start=0):
        self.blocks, self.start = blocks, start

    def __iter__(self):
        i = self.start
        while True:
            yield {"input_ids": self.blocks[i % len(self.blocks)]}
            i += 1


def distil(pm, teacher, train_blocks, steps, batch, lr, callbacks=(), trainable=None, start=0):
    """``steps`` steps of ``DistillationTrainer`` (heal()'s settings) on the blocks from ``start``; ``trainable``: the
    parameters that train (None: those that already require grad). Returns the seconds of every step (Basel's
    pruning and consolidation included)."""
    from transformers import TrainerCallback, TrainingArguments

    from peft_basis.healing import DistillationTrainer

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.times, self.t = [], None

        def on_step_begin(self, args, state, control, **kwargs):
            self.t = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.times.append(time.perf_counter() - self.t)

    if trainable is not None:
        keep = {id(p) for p in trainable.values()}
        for p in pm.parameters():
            p.requires_grad_(id(p) in keep)
    timer = StepTimer()
    with tempfile.TemporaryDirectory(prefix="basel_bench_") as scratch:
        args = TrainingArguments(
            output_dir=scratch, max_steps=steps, per_device_train_batch_size=batch, learning_rate=lr,
            lr_scheduler_type="cosine", warmup_steps=min(0.05, 20 / steps) if steps > 1 else 0, weight_decay=0.0,
            report_to="none", save_strategy="no", logging_strategy="no", seed=0, data_seed=0,
            remove_unused_columns=False, dataloader_num_workers=0, label_names=[], use_cpu=True, disable_tqdm=True)
        trainer = DistillationTrainer(model=pm, teacher=teacher, args=args,
                                      train_dataset=InOrder(train_blocks, start),
                                      callbacks=[*callbacks, timer])
        trainer.train()
    if trainer.diverged:
        raise RuntimeError("distillation diverged (non-finite loss); lower the learning rate")
    pm.eval()
    return timer.times


def write_markdown(res, path):
    s = res["setup"]
    lines = [f"# Basel vs whitened SVD vs the anchored fit, all trained by distillation (SmolLM2-135M, {s['domain']})",
             "",
             f"Targets: all 7 Linears of decoder layers {s['layers'][0]}-{s['layers'][-1]} "
             f"({s['target_dense_params']:,} dense parameters). {s['domain']}: {s['train_tokens']:,} calibration/"
             f"training tokens, {s['val_tokens']:,} validation tokens (learning rate choice), {s['eval_tokens']:,} "
             f"held-apart evaluation tokens; {s['other_domain']}: {s['other_tokens']:,} held-apart tokens. Every run: "
             f"{s['steps']} steps of DistillationTrainer (KL from the dense model) on the same batches "
             f"({s['batch']}x{s['seq']}), AdamW, cosine schedule. Threads: {s['threads']}."
             + (f" Anchored fit options (anchored, basel_anchored*): `{json.dumps(s['anchored_fit'])}`."
                if s.get("anchored_fit") else ""),
             "",
             f"Dense model perplexity: {s['domain']} {res['dense']['ppl']:.2f}, {s['other_domain']} "
             f"{res['dense']['ppl_other']:.2f}.",
             "",
             f"| keep | method | lr | stored params | ppl before training | {s['domain']} ppl | {s['other_domain']} ppl "
             f"| s/step (median) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in res["runs"]:
        if not r.get("chosen"):
            continue
        before = "-" if r.get("ppl_before") is None else f"{r['ppl_before']:.2f}"
        lr = f"{r['part1_lr']:g}, then {r['lr']:g}" if "part1_lr" in r else f"{r['lr']:g}"
        lines.append(f"| {r['keep']} | {r['method']} | {lr} | {r['stored_params']:,} | {before} | "
                     f"{r['ppl']:.2f} | {r['ppl_other']:.2f} | {r['sec_per_step']:.2f} |")
    lines += ["", "Learning rate choice (validation perplexity at the first keep ratio; the chosen one is used "
              "everywhere):", "", "| method | lr | val ppl |", "|---|---|---|"]
    for r in res["runs"]:
        if r.get("lr_trial"):
            lines.append(f"| {r['method']} | {r['lr']:g} | {r['ppl_val']:.2f}{' (chosen)' if r.get('chosen') else ''} |")
    lines += ["", "Basel (anchored start) minus whitened SVD + the same training, at equal parameters (negative: Basel "
              "better):", "", f"| keep | {s['domain']} | {s['other_domain']} |", "|---|---|---|"]
    for keep in s["keep"]:
        rows = {r["method"]: r for r in res["runs"] if r["keep"] == keep and r.get("chosen")}
        if "sb1" not in rows:
            continue
        for m in ("basel_anchored", "basel_anchored+ft"):
            if m in rows:
                lines.append(f"| {keep} ({m}) | {rows[m]['ppl'] - rows['sb1']['ppl']:+.2f} | "
                             f"{rows[m]['ppl_other'] - rows['sb1']['ppl_other']:+.2f} |")
    if res.get("starts"):
        lines += ["", "Basel's starts (perplexity on the task's evaluation text, no training):", "",
                  "| start | stored fraction | ppl |", "|---|---|---|"]
        for row in res["starts"]:
            lines.append(f"| {row['what']} | {row['fraction']:.3f} | {row['ppl']:.2f} |")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def main():
    args = parse()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    warnings.filterwarnings("ignore")
    from peft import get_peft_model

    import peft_basis
    from peft_basis.data import load_default_model, load_text, token_blocks
    from peft_basis.evaluation import perplexity
    from peft_basis.healing import check_held_apart, factor_parameters
    from peft_basis.io import atomic_write_text
    from peft_basis.tuners.basel import BaselCallback, BaselConfig, BaselModel
    from peft_basis.tuners.shared_basis import SharedBasisConfig

    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    model, tok = load_default_model()
    for p in model.parameters():
        p.requires_grad_(False)
    blocks = token_blocks(tok, load_text(args.domain), args.seq)
    train_blocks = blocks[: args.train_blocks]
    val_blocks = blocks[args.train_blocks : args.train_blocks + args.val_blocks]
    eval_blocks = blocks[-args.eval_blocks :]
    other_blocks = token_blocks(tok, load_text(args.other_domain), args.seq)[-args.eval_blocks :]
    check_held_apart(train_blocks, {"validation": val_blocks, "evaluation": eval_blocks, "other": other_blocks})
    targets = dict(layers_to_transform=args.layers, target_modules=TARGETS)
    calib = [train_blocks[i : i + 4] for i in range(0, train_blocks.shape[0], 4)]
    res = {"setup": {**vars(args), "train_tokens": train_blocks.numel(), "val_tokens": val_blocks.numel(),
                     "eval_tokens": eval_blocks.numel(), "other_tokens": other_blocks.numel()},
           "runs": [], "starts": []}
    chosen: dict[str, float] = {}
    if args.append and os.path.exists(args.out + ".json"):
        with open(args.out + ".json") as f:
            old = json.load(f)
        same = ("domain", "other_domain", "layers", "steps", "part1", "seq", "batch", "train_blocks", "val_blocks",
                "eval_blocks", "initial_keep", "extra_rank", "rank_allocation", "anchored_fit")
        differ = [k for k in same if old["setup"].get(k) != res["setup"][k]]
        if differ:
            raise SystemExit(f"--append: {args.out}.json was run with other settings ({differ}); use another --out")
        rerun = {(k, m) for k in args.keep for m in args.methods}
        res["runs"] = [r for r in old["runs"] if (r["keep"], r["method"]) not in rerun]
        res["starts"] = old.get("starts", [])
        chosen = {r["method"]: r["lr"] for r in res["runs"] if r.get("chosen") and r.get("lr_trial")}
        res["setup"]["keep"] = old["setup"]["keep"] + [k for k in args.keep if k not in old["setup"]["keep"]]

    def save():
        order = res["setup"]["keep"]
        res["runs"].sort(key=lambda r: (order.index(r["keep"]), METHODS.index(r["method"])))  # stable: lr order kept
        atomic_write_text(args.out + ".json", json.dumps(res, indent=1))
        write_markdown(res, args.out + ".md")

    def evaluate(pm):
        return {"ppl": perplexity(pm, eval_blocks), "ppl_val": perplexity(pm, val_blocks),
                "ppl_other": perplexity(pm, other_blocks)}

    names = BaselModel.resolve_target_names(model, BaselConfig(**targets))
    res["setup"]["target_dense_params"] = sum(model.get_submodule(n).weight.numel() for n in names)
    res["dense"] = evaluate(model)
    log(f"dense {res['dense']}")

    # The task's dense-input Grams, once: per-layer whitened SVD and Basel's whitened init use them.
    grams_cfg = BaselConfig(init="whitened", **targets)
    grams = peft_basis.calibrate(model, grams_cfg, calib, progress=False)
    cache: dict = {}

    def basel_start(init, keep, initial_keep=None):
        """A trained-nothing Basel model (one SVD pass per start, copied per run)."""
        key = (init, initial_keep)
        if key not in cache:
            t = time.perf_counter()
            if init == "whitened":
                cfg = BaselConfig(init="whitened", extra_rank=args.extra_rank, rank_allocation=args.rank_allocation,
                                  **targets)
                cfg.attach_statistics(grams)
            else:
                cfg = BaselConfig(init="anchored", keep_ratio=min(keep, initial_keep), initial_keep=initial_keep,
                                  extra_rank=args.extra_rank, rank_allocation=args.rank_allocation,
                                  anchored_fit=args.anchored_fit, **targets)
                peft_basis.calibrate(model, cfg, calib, progress=False)
            pm = get_peft_model(copy.deepcopy(model), cfg)
            seconds = time.perf_counter() - t
            ppl = perplexity(pm, eval_blocks)
            what = f"basel init={init}" + (f", initial_keep {initial_keep:g}" if initial_keep else "")
            res["starts"] = [row for row in res["starts"] if row["what"] != what]  # --append: the same start again
            res["starts"].append({"what": what, "fraction": cfg.initial_fraction, "ppl": ppl, "seconds": seconds})
            log(f"start {key}: fraction {cfg.initial_fraction:.3f} ppl {ppl:.2f} ({seconds:.0f}s)")
            cache[key] = pm
        return copy.deepcopy(cache[key])

    for keep in args.keep:
        anchored_stats = None
        for method in args.methods:
            lr_grid = args.basel_lrs if method in ("basel", "basel_anchored") else args.factor_lrs
            trial = method not in chosen
            trials = []
            for lr in (lr_grid if trial else [chosen[method]]):
                t0 = time.perf_counter()
                before, extra = None, {}
                if method in ("sb1", "anchored"):
                    cfg = SharedBasisConfig(compression_ratio=1 - keep, group_size=1,
                                            inputs="anchored" if method == "anchored" else "dense",
                                            **(args.anchored_fit if method == "anchored" else {}), **targets)
                    if method == "sb1":
                        cfg.attach_statistics(grams)
                    else:
                        if anchored_stats is None:
                            anchored_stats = peft_basis.calibrate(model, cfg, calib, progress=False)
                        cfg.attach_statistics(anchored_stats)
                    pm = get_peft_model(copy.deepcopy(model), cfg)
                    stored = pm.base_model.stored_parameters()
                    before = perplexity(pm, eval_blocks)
                    times = distil(pm, model, train_blocks, args.steps, args.batch, lr,
                                   trainable=factor_parameters(pm))
                else:
                    initial_keep = None
                    if method != "basel":
                        initial_keep = args.initial_keep or BaselConfig(keep_ratio=keep, init="anchored").starting_keep()
                    pm = basel_start("whitened" if method == "basel" else "anchored", keep, initial_keep)
                    tuner = pm.base_model
                    tuner.peft_config["default"].keep_ratio = keep
                    config = tuner.peft_config["default"]
                    part1, part1_lr = args.steps, lr
                    if method == "basel_anchored+ft":  # `lr` is part 2's; part 1 runs at basel_anchored's
                        part1 = max(2, round(args.part1 * args.steps))
                        part1_lr = chosen.get("basel_anchored", args.basel_lrs[0])
                        extra.update(part1_steps=part1, part1_lr=part1_lr)
                    times = distil(pm, model, train_blocks, part1, args.batch, part1_lr,
                                   callbacks=[BaselCallback(config)])
                    if part1 < args.steps:  # Basel's part 2: the consolidated factors train on the next batches
                        times += distil(pm, model, train_blocks, args.steps - part1, args.batch, lr,
                                        trainable=factor_parameters(pm), start=part1 * args.batch)
                    stored = tuner.kept_parameters()
                    extra.update(initial_keep=initial_keep, initial_fraction=config.initial_fraction,
                                 ranks_min_max=[min(tuner.ranks().values()), max(tuner.ranks().values())],
                                 history=tuner.history)
                run = {"keep": keep, "method": method, "lr": lr, "stored_params": stored,
                       "stored_fraction": stored / res["setup"]["target_dense_params"], "ppl_before": before,
                       **evaluate(pm), "sec_per_step": statistics.median(times), "step_times": times,
                       "wall_seconds": time.perf_counter() - t0, "lr_trial": trial, **extra}
                res["runs"].append(run)
                trials.append(run)
                log(f"keep {keep} {method} lr {lr:g}: params {stored:,} ({run['stored_fraction']:.3f}) ppl "
                    f"{'' if before is None else f'{before:.2f} -> '}{run['ppl']:.2f} (val {run['ppl_val']:.2f}, "
                    f"{args.other_domain} {run['ppl_other']:.2f}) {run['sec_per_step']:.2f}s/step")
                del pm
                save()
            best = min(trials, key=lambda r: r["ppl_val"])
            best["chosen"] = True
            chosen[method] = best["lr"]
            save()
    log("done")


if __name__ == "__main__":
    main()
