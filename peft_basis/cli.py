"""``peft-basis``: compress the real default model and show before/after quality, size and speed.

    peft-basis                       # Basis Sharing, 20% removed, SmolLM2-135M, real text: anchored fit, loss-aware ranks
    peft-basis --refine-epochs 2 --calib-blocks 64   # + block refinement, more calibration tokens (slower, better)
    peft-basis --inputs dense --ratio 0.3 --group-size 2 --output out/sb30   # the paper's whitened, shared bases
    peft-basis --sequential                          # one decoder layer in memory at a time (large models)
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

from peft_basis.subcommands import check_model_arg, check_positive, mb


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="peft-basis", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ratio", type=float, default=0.2, help="fraction of the targeted parameters REMOVED (default 0.2)")
    p.add_argument("--inputs", default="anchored", choices=["anchored", "dense"],
                   help="anchored (default): fit each layer to the dense model's outputs from the compressed model's "
                        "inputs, layer by layer; dense: whitened SVD on the dense model's inputs (the paper)")
    p.add_argument("--anchor", type=float, default=0.25, help="with --inputs anchored: the target interpolation b")
    p.add_argument("--refine-epochs", type=int, default=0,
                   help="with --inputs anchored: block refinement epochs after each layer is fitted (default 0: off; "
                        "each epoch costs about three more passes over the calibration tokens per layer)")
    p.add_argument("--group-size", default=None,
                   help="layers per shared basis, or 'auto' (default 1: private factors; sharing needs --inputs dense)")
    p.add_argument("--rank-allocation", default="loss", choices=["uniform", "global", "loss"],
                   help="loss (default): ranks by each direction's estimated loss increase (one backward pass over "
                        "the calibration data); uniform: every module at the ratio's rank")
    p.add_argument("--output-weights", default=None, choices=["fisher", "none"],
                   help="fisher (the default, except for --sequential --inputs dense, which cannot): weight each "
                        "output's error in the fit by the dense model's output Fisher (the same backward pass as "
                        "--rank-allocation loss); none: every output alike")
    p.add_argument("--calib-domain", default="britannica", help="text domain to calibrate on (peft_basis.data)")
    p.add_argument("--eval-domain", default="britannica", help="text domain to evaluate on (held-apart blocks)")
    p.add_argument("--calib-blocks", type=int, default=32, help="calibration blocks of --seq-len tokens")
    p.add_argument("--eval-blocks", type=int, default=16, help="evaluation blocks of --seq-len tokens")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--layers", type=int, default=None, help="keep only the first N decoder layers (quick runs)")
    p.add_argument("--statistics", default=None, help="reuse calibration statistics saved by an earlier run")
    p.add_argument("--output", default="out/shared_basis", help="where the adapter is saved")
    p.add_argument("--standalone", default=None,
                   help="also save the compressed model as a standalone checkpoint here (no dense base needed)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    p.add_argument("--model", default=None, help="a local Hugging Face causal LM folder (default: SmolLM2-135M)")
    p.add_argument("--sequential", action="store_true",
                   help="compress layer by layer from the checkpoint's safetensors shards (peak memory: about one "
                        "decoder layer) and load the result leanly, without reading the replaced dense weights")
    p.add_argument("--compressed-inputs", action="store_true",
                   help="with --sequential --inputs dense --group-size 1: calibrate every layer on the outputs of the "
                        "already-compressed layers before it")
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


def check_run_args(args) -> None:
    """Every argument of the main job, checked before any work (loading the model, measuring perplexity)."""
    check_model_arg(args.model)
    check_positive(args, "seq_len", "calib_blocks", "eval_blocks", "layers", "threads")
    group_size = args.group_size or "1"
    if group_size != "auto" and not group_size.isdigit():
        raise SystemExit(f"--group-size {group_size}: pass a positive integer (layers per shared basis) or 'auto'.")
    if args.inputs == "anchored" and group_size != "1":
        raise SystemExit(f"--group-size {group_size} needs --inputs dense: the anchored fit gives every module private "
                         "factors (a shared basis would need later layers' statistics).")
    if args.compressed_inputs and (not args.sequential or args.inputs != "dense"):
        raise SystemExit("--compressed-inputs needs --sequential --inputs dense.")
    if args.inputs == "dense" and args.refine_epochs:
        raise SystemExit("--refine-epochs applies to --inputs anchored.")
    if args.heal_tokens < 0:
        raise SystemExit(f"--heal-tokens {args.heal_tokens}: pass 0 (no healing) or a number of tokens.")
    if args.refine_epochs < 0:
        raise SystemExit(f"--refine-epochs {args.refine_epochs}: pass 0 (off) or more.")
    try:
        run_config(args)
    except ValueError as e:
        raise SystemExit(f"--ratio / --group-size / --anchor / --rank-allocation / --output-weights: {e}") from None
    if args.sequential and args.inputs == "dense" and output_weights(args) != "none":
        raise SystemExit("--output-weights fisher with --sequential needs --inputs anchored (or pass --output-weights "
                         "none).")
    if args.statistics is not None and not os.path.isfile(args.statistics):
        raise SystemExit(f"--statistics {args.statistics}: no such file (a file saved by `peft-basis calibrate`).")
    if os.path.isfile(args.output):
        raise SystemExit(f"--output {args.output} is a file; pass a folder for the adapter.")


def output_weights(args) -> str:
    """--output-weights, or its default: the output Fisher wherever the pipeline supports it."""
    if args.output_weights is not None:
        return args.output_weights
    return "none" if args.sequential and args.inputs == "dense" else "fisher"


def run_config(args):
    """The SharedBasisConfig the main job's arguments describe."""
    from peft_basis import SharedBasisConfig

    group_size = args.group_size or "1"
    kw = dict(compression_ratio=args.ratio, group_size=group_size if group_size == "auto" else int(group_size),
              rank_allocation=args.rank_allocation, output_weights=output_weights(args))
    if args.inputs == "anchored":
        kw.update(inputs="anchored", anchor=args.anchor,
                  refine_epochs=args.refine_epochs)
    return SharedBasisConfig(**kw)


def main(argv: list[str] | None = None) -> int:
    """The console entry point (returns the exit status; ``run`` returns the measurements)."""
    import sys
    import warnings

    # PEFT reads transformers' deprecated `is_gradient_checkpointing` in PeftModel.__init__: not the user's to fix
    warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("calibrate", "eval"):
        from peft_basis import subcommands

        (subcommands.run_calibrate if argv[0] == "calibrate" else subcommands.run_eval)(argv[1:])
    else:
        run(argv)
    return 0


def run(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    check_run_args(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    from peft import get_peft_model

    import peft_basis
    from peft_basis.data import default_model_path, load_model, load_text, token_blocks
    from peft_basis.evaluation import count_parameters, perplexity, size_on_disk, tokens_per_second
    from peft_basis.io import atomic_write_text

    if args.sequential and args.layers is not None:
        raise SystemExit("--sequential compresses the checkpoint as stored; drop --layers (or run without --sequential).")
    if args.sequential and args.statistics:
        raise SystemExit("--statistics applies to the whole-model path; --sequential streams its own.")
    if args.sequential and args.group_size == "auto":
        raise SystemExit("--sequential needs an integer --group-size (auto compares groupings with all Grams in memory).")
    config = run_config(args)
    model_path = args.model or default_model_path()
    model_name = os.path.basename(os.path.normpath(model_path))
    how = ("fitted to the dense model layer by layer (anchored, b=%g%s)" % (
        config.anchor, f", {config.refine_epochs} refinement epochs" if config.refine_epochs else "")
        if args.inputs == "anchored" else "whitened on the dense model's inputs")
    print(f"peft-basis {peft_basis.__version__}: Basis Sharing on {model_name}, {args.ratio:.0%} of the targeted "
          f"parameters removed, {how}, ranks {args.rank_allocation}"
          + (", outputs weighted by the loss's Fisher" if config.output_weights == "fisher" else "") + (", from the checkpoint's shards" if args.sequential
                                                                      else ""))
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
    ppl_before = perplexity(model, held, progress="dense perplexity")
    print("measuring dense speed (batch 8 x 256) ...", flush=True)
    tps_before = tokens_per_second(model)
    os.makedirs(args.output, exist_ok=True)
    dense_bytes = sum(p.numel() * p.element_size() for p in {id(p): p for p in model.parameters()}.values())

    batches = [calib[i : i + 4] for i in range(0, calib.shape[0], 4)]
    t0 = time.perf_counter()
    if args.sequential:
        del model  # the point of --sequential: the dense model is never in memory with the factors
        inputs = args.inputs if not args.compressed_inputs else "compressed"
        peft_basis.compress_sequential(model_path, config, batches, args.output, inputs=inputs)
        t_calib = None  # calibration and factorisation interleave layer by layer
        peft_model = peft_basis.load_lean(model_path, args.output)
    else:
        peft_basis.calibrate(model, config, batches, statistics=args.statistics)
        t_calib = time.perf_counter() - t0
        peft_model = get_peft_model(model, config)
    t_total = time.perf_counter() - t0
    healing = _heal(args, peft_model, model_path, tok, held) if args.heal_tokens else None

    compressed_params = count_parameters(peft_model)
    ppl_after = perplexity(peft_model, held, progress="compressed perplexity")
    print("measuring compressed speed (batch 8 x 256) ...", flush=True)
    tps_after = tokens_per_second(peft_model)
    peft_model.save_pretrained(args.output)
    adapter_bytes = size_on_disk(os.path.join(args.output, "adapter_model.safetensors"))
    compressed_bytes = sum(p.numel() * p.element_size() for p in {id(p): p for p in peft_model.parameters()}.values())

    made = peft_model.peft_config["default"]  # as filled by get_peft_model
    dense_modules = list(made.dense_modules)
    result = {
        "perplexity": {"dense": ppl_before, "compressed": ppl_after},
        "parameters": {"dense": dense_params, "compressed": compressed_params},
        "bytes_in_memory": {"dense": dense_bytes, "compressed": compressed_bytes, "adapter_file": adapter_bytes},
        "tokens_per_second_8x256": {"dense": tps_before, "compressed": tps_after},
        "seconds": {"calibrate": t_calib, "calibrate_and_compress": t_total},
        "config": {"compression_ratio": args.ratio, "group_size": config.group_size, "inputs": config.inputs,
                   "anchor": config.anchor, "refine_epochs": config.refine_epochs,
                   "rank_allocation": args.rank_allocation, "output_weights": config.output_weights,
                   "model": model_path, "sequential": args.sequential,
                   "dense_modules": dense_modules,
                   "calibration_tokens": int(calib.numel())},
        "healing": healing,
    }
    if args.standalone:
        from peft_basis.standalone import save_compressed

        save_compressed(peft_model, args.standalone, tokenizer=tok)
        result["bytes_on_disk"] = {"dense_checkpoint": size_on_disk(model_path) if os.path.isdir(model_path) else None,
                                   "standalone": size_on_disk(args.standalone)}
    atomic_write_text(os.path.join(args.output, "peft_basis_result.json"), json.dumps(result, indent=2))
    rows = [
        ("perplexity (held-apart)", f"{ppl_before:.2f}", f"{ppl_after:.2f}"),
        ("parameters", f"{dense_params:,}", f"{compressed_params:,} ({compressed_params / dense_params:.1%})"),
        ("size in memory", mb(dense_bytes), mb(compressed_bytes)),
        ("tokens/s (batch 8 x 256)", f"{tps_before:,.0f}", f"{tps_after:,.0f}"),
    ]
    print(f"\n{'':28}{'dense':>16}{'compressed':>26}")
    for name, a, b in rows:
        print(f"{name:28}{a:>16}{b:>26}")
    if dense_modules:  # dense_at_break_even: the allocation gave them the rank where factors stop saving parameters
        print(f"\n{len(dense_modules)} of {len(made.rank_pattern) + len(dense_modules)} targeted Linears kept dense "
              "(allocated the rank at which factors would no longer save parameters)")
    print(f"\ncalibrate + compress: {t_total:.1f} s" + ("" if args.sequential else f" (calibration {t_calib:.1f} s)"))
    if args.standalone:
        print(f"standalone compressed checkpoint: {args.standalone}/ ({mb(result['bytes_on_disk']['standalone'])}; "
              "load with peft_basis.CompressedModel.from_pretrained, no dense base needed)")
    if healing:
        print(f"healing: {healing['tokens']:,} tokens in {healing['seconds']:.1f} s "
              f"({healing['tokens_per_second']:,.0f} tokens/s); perplexity {healing['perplexity_before']:.2f} before, "
              f"{healing['perplexity_after']:.2f} after"
              + (" (diverged: factors restored)" if healing["diverged"] else ""))
    print(f"adapter saved to {args.output}/ ({mb(adapter_bytes)}); reload with:\n"
          f"  import peft_basis; from peft import PeftModel\n  PeftModel.from_pretrained(base_model, {args.output!r})")
    return result


if __name__ == "__main__":
    raise SystemExit(main())
