"""The `peft-basis calibrate` and `peft-basis eval` subcommands (the main job is in :mod:`peft_basis.cli`),
and the argument checks both use."""

from __future__ import annotations

import argparse
import json
import os
import time

import torch


def mb(n_bytes: int) -> str:
    return f"{n_bytes / 2**20:.1f} MB"


def check_model_arg(model) -> None:
    if model is not None and not os.path.isfile(os.path.join(model, "config.json")):
        what = "does not exist" if not os.path.exists(model) else "holds no config.json"
        raise SystemExit(f"--model {model}: the folder {what}. Pass a local Hugging Face causal LM folder (what "
                         "`save_pretrained` writes), or leave --model out for SmolLM2-135M.")


def check_positive(args, *names) -> None:
    for name in names:
        value = getattr(args, name)
        if value is not None and value < 1:
            raise SystemExit(f"--{name.replace('_', '-')} {value}: must be a positive integer.")


CALIBRATE_CONFIGS = {"basis": "BasisConfig", "basel": "BaselConfig", "shared_basis": "SharedBasisConfig"}


def build_calibrate_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="peft-basis calibrate",
        description="Stream a method's calibration statistics over real text and save them (safetensors), for "
                    "`peft_basis.use_statistics(config, path)` before `get_peft_model(model, config)`. With "
                    "--sequential the model is never whole in memory: one decoder layer at a time is read from the "
                    "checkpoint's safetensors shards (BASIS's Fisher scores included, by a backward sweep).")
    p.add_argument("--method", choices=sorted(CALIBRATE_CONFIGS), default="basis")
    p.add_argument("--r", type=int, default=16, help="BASIS: rank (the budget is what uniform r costs)")
    p.add_argument("--rank-allocation", default=None,
                   help="BASIS: uniform | eigen | fisher (default fisher); Basis Sharing: uniform | global")
    p.add_argument("--trainable", default="output", help="BASIS: output | input | core | diagonal")
    p.add_argument("--model", default=None, help="a local Hugging Face causal LM folder (default: SmolLM2-135M)")
    p.add_argument("--domain", default="britannica", help="text domain to calibrate on (peft_basis.data)")
    p.add_argument("--blocks", type=int, default=16, help="calibration blocks of --seq-len tokens")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--sequential", action="store_true", help="one decoder layer in memory at a time")
    p.add_argument("--bases-only", action="store_true",
                   help="with --sequential and --method basis: keep each module's BASIS directions instead of its "
                        "Gram (flat memory with depth; the file then serves this --r / --rank-allocation)")
    p.add_argument("--output", default="out/statistics.safetensors")
    p.add_argument("--threads", type=int, default=None)
    return p


def _method_config(args):
    import peft_basis

    if args.method == "basis":
        allocation = args.rank_allocation or "fisher"
        return peft_basis.BasisConfig(r=args.r, rank_allocation=allocation, trainable=args.trainable)
    if args.method == "basel":
        return peft_basis.BaselConfig(init="whitened")
    return peft_basis.SharedBasisConfig(group_size=1 if args.sequential else 2,
                                        rank_allocation=args.rank_allocation or "uniform")


def run_calibrate(argv: list[str] | None = None) -> dict:
    """``peft-basis calibrate``: statistics for any method, whole-model or layer by layer, saved to a file."""
    args = build_calibrate_parser().parse_args(argv)
    check_model_arg(args.model)
    check_positive(args, "r", "blocks", "seq_len", "batch_size", "threads")
    if os.path.isdir(args.output):
        raise SystemExit(f"--output {args.output} is a folder; pass a file path such as "
                         f"{os.path.join(args.output, 'calibration_statistics.safetensors')}.")
    if args.threads:
        torch.set_num_threads(args.threads)
    from transformers import AutoTokenizer

    import peft_basis
    from peft_basis.calibration import calibrate_sequential
    from peft_basis.data import default_model_path, load_model, load_text, token_blocks
    from peft_basis.evaluation import peak_rss_bytes

    try:
        config = _method_config(args)
    except (TypeError, ValueError) as e:
        raise SystemExit(f"{CALIBRATE_CONFIGS[args.method]}: {e}") from None
    if args.bases_only and not (args.sequential and args.method == "basis"):
        raise SystemExit("--bases-only applies to --method basis with --sequential.")
    model_path = args.model or default_model_path()
    tok = AutoTokenizer.from_pretrained(model_path)
    blocks = token_blocks(tok, load_text(args.domain), args.seq_len, args.blocks)
    batches = [blocks[i : i + args.batch_size] for i in range(0, blocks.shape[0], args.batch_size)]
    fisher = getattr(config, "rank_allocation", None) == "fisher"
    how = "layer by layer" if args.sequential else "whole model"
    print(f"peft-basis {peft_basis.__version__}: {CALIBRATE_CONFIGS[args.method]} statistics of "
          f"{os.path.basename(os.path.normpath(model_path))} on {blocks.numel():,} tokens of {args.domain}, {how}"
          + (" (input Grams + Fisher scores)" if fisher else " (input Grams)"))
    t0 = time.perf_counter()
    if args.sequential:
        stats = calibrate_sequential(model_path, config, batches, save_to=args.output, keep_grams=not args.bases_only)
    else:
        model, _ = load_model(model_path)
        stats = peft_basis.calibrate(model, config, batches, save_to=args.output)
    seconds = time.perf_counter() - t0
    n_fisher = sum(k.startswith("fisher") for k in stats.extra)
    result = {"method": args.method, "sequential": args.sequential, "seconds": seconds,
              "peak_rss_bytes": peak_rss_bytes(), "modules": len(stats.sources), "grams": len(stats.grams),
              "fisher_modules": n_fisher, "tokens": blocks.numel(), "output": args.output}
    print(f"{len(stats.sources)} modules, " + (f"{len(stats.grams)} distinct inputs (Grams)" if stats.grams else
                                               "BASIS directions (no Grams)")
          + (f", Fisher scores for {n_fisher} modules" if n_fisher else "")
          + f"; {seconds:.1f} s, peak memory {mb(result['peak_rss_bytes'])}")
    print(f"saved to {args.output}; use with:\n  config = peft_basis.{CALIBRATE_CONFIGS[args.method]}(...)  # as above\n"
          f"  peft_basis.use_statistics(config, {args.output!r}); peft_model = get_peft_model(model, config)")
    return result


def build_eval_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="peft-basis eval",
        description="Run lm-evaluation-harness tasks on an adapter (PeftModel.from_pretrained onto its base model) "
                    "or a model folder (dense or merged), with lm-eval's own HFLM. Needs "
                    "`pip install 'peft-basis[eval]'`.")
    p.add_argument("--model", required=True,
                   help="an adapter folder (holding adapter_config.json) or a Hugging Face model folder")
    p.add_argument("--base", default=None,
                   help="with an adapter: the base model folder (default: the adapter's base_model_name_or_path)")
    p.add_argument("--tasks", required=True, help="comma-separated lm-eval task names, e.g. arc_easy,piqa")
    p.add_argument("--include-path", default=None, help="a folder of your own lm-eval task YAMLs")
    p.add_argument("--limit", type=float, default=None,
                   help="examples per task (quick runs; a fraction of each task if < 1)")
    p.add_argument("--num-fewshot", type=int, default=None, help="few-shot examples (default: each task's own)")
    p.add_argument("--batch-size", default="8", help="an integer, or 'auto' (lm-eval finds the largest that fits)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    p.add_argument("--output", default=None, help="write the metrics and lm-eval's results (without samples) to this JSON")
    p.add_argument("--threads", type=int, default=None)
    return p


def run_eval(argv: list[str] | None = None) -> dict:
    """``peft-basis eval``: lm-eval benchmarks on a saved adapter or model; returns ``evaluate_lm_eval``'s result."""
    args = build_eval_parser().parse_args(argv)
    from peft_basis.harness import eval_source, evaluate_lm_eval, load_for_eval, resolve_tasks

    if args.limit is not None and args.limit <= 0:
        raise SystemExit("--limit must be positive: a number of examples per task, or a fraction below 1.")
    limit = int(args.limit) if args.limit is not None and args.limit >= 1 else args.limit
    if not ((args.batch_size.isdigit() and int(args.batch_size) > 0) or args.batch_size.startswith("auto")):
        raise SystemExit(f"--batch-size {args.batch_size!r}: pass a positive integer or 'auto'.")
    batch_size = args.batch_size if args.batch_size.startswith("auto") else int(args.batch_size)
    # Everything checkable is checked before the model is loaded (which can take minutes).
    try:
        kind, base = eval_source(args.model, args.base)
        tasks, manager = resolve_tasks(args.tasks, args.include_path)
    except (FileNotFoundError, ValueError, ImportError) as e:
        raise SystemExit(str(e)) from None
    if args.output and os.path.dirname(args.output):
        os.makedirs(os.path.dirname(args.output), exist_ok=True)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"lm-eval {', '.join(tasks)} on {args.model}" + (f" (adapter on {base})" if kind == "adapter" else f" ({kind})"))
    model, tokenizer = load_for_eval(args.model, base)
    result = evaluate_lm_eval(model, tokenizer, tasks, num_fewshot=args.num_fewshot, limit=limit,
                              batch_size=batch_size, device=args.device, task_manager=manager)
    from lm_eval.utils import make_table

    print(make_table(result["lm_eval"]))
    if args.output:
        raw = {k: v for k, v in result["lm_eval"].items() if k != "samples"}
        with open(args.output, "w") as f:
            json.dump({"model": args.model, "base": base, "tasks": tasks, "metrics": result["metrics"],
                       "lm_eval": raw}, f, indent=2, default=str)
        print(f"results written to {args.output}")
    return result
