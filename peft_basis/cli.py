"""``peft-basis``: compress the real default model and show before/after quality, size and speed.

    peft-basis                       # Basis Sharing, 20% removed, SmolLM2-135M, real text
    peft-basis --ratio 0.3 --group-size 2 --output out/sb30
    peft-basis --sequential --compressed-inputs      # one decoder layer in memory at a time (large models)
    peft-basis --model path/to/hf-model --eval-domain pydoc
    peft-basis --heal-tokens 100000                  # then heal the factors by distillation from the dense model

    peft-basis calibrate --method basis --rank-allocation fisher --sequential --output stats.safetensors
        # statistics for BASIS / Basel / Basis Sharing, saved for `peft_basis.use_statistics(config, path)`

    peft-basis eval --model out/shared_basis --tasks arc_easy,piqa --limit 200 --output results.json
        # lm-evaluation-harness benchmarks on an adapter (base read from its adapter_config.json, or --base)
        # or a model folder; your own task YAMLs with --include-path (needs `pip install 'peft-basis[eval]'`)
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch


def _mb(n_bytes: int) -> str:
    return f"{n_bytes / 2**20:.1f} MB"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="peft-basis", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ratio", type=float, default=0.2, help="fraction of the targeted parameters REMOVED (default 0.2)")
    p.add_argument("--group-size", default=None,
                   help="layers per shared basis, or 'auto' (default: 'auto', chosen per matrix type by the model's "
                        "loss; 1 with --sequential)")
    p.add_argument("--rank-allocation", default="uniform", choices=["uniform", "global"])
    p.add_argument("--calib-domain", default="britannica", help="text domain to calibrate on (peft_basis.data)")
    p.add_argument("--eval-domain", default="britannica", help="text domain to evaluate on (held-apart blocks)")
    p.add_argument("--calib-blocks", type=int, default=16, help="calibration blocks of --seq-len tokens")
    p.add_argument("--eval-blocks", type=int, default=16, help="evaluation blocks of --seq-len tokens")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--layers", type=int, default=None, help="keep only the first N decoder layers (quick runs)")
    p.add_argument("--statistics", default=None, help="reuse calibration statistics saved by an earlier run")
    p.add_argument("--output", default="out/shared_basis", help="where the adapter is saved")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    p.add_argument("--model", default=None, help="a local Hugging Face causal LM folder (default: SmolLM2-135M)")
    p.add_argument("--sequential", action="store_true",
                   help="compress layer by layer from the checkpoint's safetensors shards (peak memory: about one "
                        "decoder layer) and load the result leanly, without reading the replaced dense weights")
    p.add_argument("--compressed-inputs", action="store_true",
                   help="with --sequential and --group-size 1: calibrate every layer on the outputs of the "
                        "already-compressed layers before it (better quality, one more forward pass per layer)")
    p.add_argument("--heal-tokens", type=int, default=0,
                   help="after compression, heal the factors by distillation from the dense model on this many tokens "
                        "of --calib-domain text held apart from the evaluation blocks (peft_basis.healing)")
    return p


def _heal(args, peft_model, model_path: str, tok, held) -> dict:
    """Heal on the blocks after the calibration ones and (same domain) before the evaluation ones."""
    from peft_basis.data import load_model, load_text, token_blocks
    from peft_basis.healing import heal

    blocks = token_blocks(tok, load_text(args.calib_domain), args.seq_len, offset=args.calib_blocks)
    if args.calib_domain == args.eval_domain:
        blocks = blocks[: max(0, blocks.shape[0] - args.eval_blocks)]
    if blocks.shape[0] == 0:
        raise SystemExit(f"{args.calib_domain} holds no blocks between the calibration and the evaluation blocks.")
    blocks = blocks[: -(-args.heal_tokens // args.seq_len)]
    print(f"healing: {args.heal_tokens:,} tokens on {blocks.numel():,} held-apart tokens of {args.calib_domain}")
    teacher, _ = load_model(model_path, num_hidden_layers=args.layers)
    try:
        r = heal(peft_model, teacher, blocks, max_tokens=args.heal_tokens, eval_blocks=held)
    except ValueError as e:
        raise SystemExit(f"--heal-tokens: {e}") from None
    return {"tokens": r.tokens, "seconds": r.seconds, "tokens_per_second": r.tokens_per_second,
            "diverged": r.diverged, "perplexity_before": r.history[0]["perplexity"],
            "perplexity_after": r.history[-1]["perplexity"]}


def main(argv: list[str] | None = None) -> int:
    """The console entry point (returns the exit status; ``run`` returns the measurements)."""
    import sys

    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "calibrate":
        run_calibrate(argv[1:])
    elif argv and argv[0] == "eval":
        run_eval(argv[1:])
    else:
        run(argv)
    return 0


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
          + f"; {seconds:.1f} s, peak memory {_mb(result['peak_rss_bytes'])}")
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


def run(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from peft import get_peft_model

    import peft_basis
    from peft_basis.data import default_model_path, load_model, load_text, token_blocks
    from peft_basis.evaluation import count_parameters, perplexity, size_on_disk, tokens_per_second

    if args.sequential and args.layers is not None:
        raise SystemExit("--sequential compresses the checkpoint as stored; drop --layers (or run without --sequential).")
    if args.group_size is None:
        args.group_size = "1" if args.sequential else "auto"
    if args.sequential and args.statistics:
        raise SystemExit("--statistics applies to the whole-model path; --sequential streams its own.")
    if args.compressed_inputs and not args.sequential:
        raise SystemExit("--compressed-inputs needs --sequential (layers are compressed one after another).")
    if args.sequential and args.group_size == "auto":
        raise SystemExit("--sequential needs an integer --group-size (auto compares groupings with all Grams in memory).")
    model_path = args.model or default_model_path()
    model_name = os.path.basename(os.path.normpath(model_path))
    print(f"peft-basis {peft_basis.__version__}: Basis Sharing on {model_name}, {args.ratio:.0%} of the "
          "targeted parameters removed" + (", layer by layer" if args.sequential else ""))
    model, tok = load_model(model_path, num_hidden_layers=args.layers)
    if args.calib_domain == args.eval_domain:
        blocks = token_blocks(tok, load_text(args.calib_domain), args.seq_len)
        need = args.calib_blocks + args.eval_blocks
        if blocks.shape[0] < need:
            raise SystemExit(f"{args.calib_domain} holds {blocks.shape[0]} blocks of {args.seq_len} tokens; {need} needed.")
        calib, held = blocks[: args.calib_blocks], blocks[-args.eval_blocks:]
    else:
        calib = token_blocks(tok, load_text(args.calib_domain), args.seq_len, args.calib_blocks)
        held = token_blocks(tok, load_text(args.eval_domain), args.seq_len, args.eval_blocks)
    print(f"calibration: {calib.numel():,} tokens of {args.calib_domain}; evaluation: {held.numel():,} held-apart "
          f"tokens of {args.eval_domain}")

    dense_params = count_parameters(model)
    ppl_before = perplexity(model, held)
    tps_before = tokens_per_second(model)
    os.makedirs(args.output, exist_ok=True)
    dense_bytes = sum(p.numel() * p.element_size() for p in {id(p): p for p in model.parameters()}.values())

    group_size = args.group_size if args.group_size == "auto" else int(args.group_size)
    config = peft_basis.SharedBasisConfig(compression_ratio=args.ratio, group_size=group_size,
                                          rank_allocation=args.rank_allocation)
    batches = [calib[i : i + 4] for i in range(0, calib.shape[0], 4)]
    t0 = time.perf_counter()
    if args.sequential:
        del model  # the point of --sequential: the dense model is never in memory with the factors
        peft_basis.compress_sequential(model_path, config, batches, args.output,
                                       inputs="compressed" if args.compressed_inputs else "dense")
        t_calib = None  # calibration and factorisation interleave layer by layer
        peft_model = peft_basis.load_lean(model_path, args.output)
    else:
        peft_basis.calibrate(model, config, batches, statistics=args.statistics)
        t_calib = time.perf_counter() - t0
        peft_model = get_peft_model(model, config)
    t_total = time.perf_counter() - t0
    healing = _heal(args, peft_model, model_path, tok, held) if args.heal_tokens else None

    compressed_params = count_parameters(peft_model)
    ppl_after = perplexity(peft_model, held)
    tps_after = tokens_per_second(peft_model)
    peft_model.save_pretrained(args.output)
    adapter_bytes = size_on_disk(os.path.join(args.output, "adapter_model.safetensors"))
    compressed_bytes = sum(p.numel() * p.element_size() for p in {id(p): p for p in peft_model.parameters()}.values())

    result = {
        "perplexity": {"dense": ppl_before, "compressed": ppl_after},
        "parameters": {"dense": dense_params, "compressed": compressed_params},
        "bytes_in_memory": {"dense": dense_bytes, "compressed": compressed_bytes, "adapter_file": adapter_bytes},
        "tokens_per_second_8x256": {"dense": tps_before, "compressed": tps_after},
        "seconds": {"calibrate": t_calib, "calibrate_and_compress": t_total},
        "config": {"compression_ratio": args.ratio, "group_size": group_size, "rank_allocation": args.rank_allocation,
                   "model": model_path, "sequential": args.sequential},
        "healing": healing,
    }
    with open(os.path.join(args.output, "peft_basis_result.json"), "w") as f:
        json.dump(result, f, indent=2)
    rows = [
        ("perplexity (held-apart)", f"{ppl_before:.2f}", f"{ppl_after:.2f}"),
        ("parameters", f"{dense_params:,}", f"{compressed_params:,} ({compressed_params / dense_params:.1%})"),
        ("size in memory", _mb(dense_bytes), _mb(compressed_bytes)),
        ("tokens/s (batch 8 x 256)", f"{tps_before:,.0f}", f"{tps_after:,.0f}"),
    ]
    print(f"\n{'':28}{'dense':>16}{'compressed':>26}")
    for name, a, b in rows:
        print(f"{name:28}{a:>16}{b:>26}")
    print(f"\ncalibrate + compress: {t_total:.1f} s" + ("" if args.sequential else f" (calibration {t_calib:.1f} s)"))
    if healing:
        print(f"healing: {healing['tokens']:,} tokens in {healing['seconds']:.1f} s "
              f"({healing['tokens_per_second']:,.0f} tokens/s); perplexity {healing['perplexity_before']:.2f} before, "
              f"{healing['perplexity_after']:.2f} after" + (" (diverged: factors restored)" if healing["diverged"] else ""))
    print(f"adapter saved to {args.output}/ ({_mb(adapter_bytes)}); reload with:\n"
          f"  import peft_basis; from peft import PeftModel\n  PeftModel.from_pretrained(base_model, {args.output!r})")
    return result


if __name__ == "__main__":
    raise SystemExit(main())
