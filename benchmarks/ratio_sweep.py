"""What ``calibrate(..., dense_statistics=)`` saves when one anchored recipe is run at several ratios.

    python benchmarks/ratio_sweep.py --threads 2      # results/ratio_sweep.{json,md}

Protocol. SmolLM2-135M-Instruct (float32), the main job's recipe (``peft-basis``'s defaults: Basis Sharing
fitted anchored, ``anchor=0.25``, loss-aware ranks, output Fisher weights, modules at break-even kept dense),
calibrated on ``--calib-blocks`` x 512 Britannica tokens (batches of 4). In one process, each step timed
(calibrate + ``get_peft_model``) on a fresh copy of the dense model: the first ratio from scratch, every
further ratio twice, with the previous ratio's statistics as ``dense_statistics`` and from scratch; the two
must give bit-equal statistics (checked) and the same perplexity on 8 x 512 held-apart Britannica tokens.
The bare forward passes over the calibration tokens are timed too (the cost ratios' denominator). Runs
alternate, but the host's speed drifts: read the ratios. See docs/shared_basis.md.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import time
import warnings

from compression_quality import host_cpu

HERE = os.path.dirname(os.path.abspath(__file__))


def recipe(ratio: float):
    from peft_basis.cli import build_parser, run_config

    return run_config(build_parser().parse_args(["--ratio", str(ratio)]))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--calib-blocks", type=int, default=32)  # the main job's
    p.add_argument("--ratios", type=float, nargs="+", default=[0.2, 0.4])
    p.add_argument("--out", default=os.path.join(HERE, "results", "ratio_sweep"))
    args = p.parse_args(argv)
    import torch
    from peft import get_peft_model

    import peft_basis
    from peft_basis import calibrate
    from peft_basis.data import default_model_path, load_model, split_blocks
    from peft_basis.evaluation import perplexity
    from peft_basis.io import atomic_write_text

    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")
    base, tok = load_model(default_model_path())
    calib, held = split_blocks(tok, "britannica", 512, args.calib_blocks, 8)
    batches = [calib[i : i + 4] for i in range(0, calib.shape[0], 4)]
    with torch.inference_mode():
        t = time.perf_counter()
        for b in batches:
            base(input_ids=b, use_cache=False)
        bare = time.perf_counter() - t

    def run(ratio, dense=None):
        model, config = copy.deepcopy(base), recipe(ratio)
        t = time.perf_counter()
        stats = calibrate(model, config, batches, progress=False, dense_statistics=dense)
        peft_model = get_peft_model(model, config)
        seconds = time.perf_counter() - t
        return stats, seconds, perplexity(peft_model, held)

    rows = []
    previous, s, ppl = run(args.ratios[0])
    rows.append({"ratio": args.ratios[0], "from_scratch_s": s, "perplexity": ppl})
    for ratio in args.ratios[1:]:
        reused, s_reused, ppl_reused = run(ratio, previous)
        fresh, s_fresh, ppl_fresh = run(ratio)
        equal = (reused.extra.keys() == fresh.extra.keys()
                 and all(torch.equal(reused.extra[k], fresh.extra[k]) for k in fresh.extra))
        rows.append({"ratio": ratio, "from_scratch_s": s_fresh, "reused_s": s_reused, "perplexity": ppl_fresh,
                     "perplexity_reused": ppl_reused, "statistics_bit_equal": equal})
        previous = reused
    result = {"cpu": host_cpu(), "threads": args.threads, "torch": torch.__version__,
              "peft_basis_version": peft_basis.__version__, "calibration_tokens": int(calib.numel()),
              "bare_forward_s": bare, "rows": rows}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    atomic_write_text(args.out + ".json", json.dumps(result, indent=1))
    atomic_write_text(args.out + ".md", markdown(result))
    print(markdown(result))


def markdown(r: dict) -> str:
    bare = r["bare_forward_s"]
    lines = [
        "# A ratio sweep of the main job's recipe, with and without `dense_statistics` (`benchmarks/ratio_sweep.py`)",
        "",
        f"SmolLM2-135M-Instruct float32, {r['calibration_tokens']:,} Britannica calibration tokens, {r['threads']} "
        f"thread(s) of {r['cpu']}, torch {r['torch']}. Seconds of calibrate + `get_peft_model` (x the bare forward "
        f"passes over the same tokens, {bare:.1f} s); perplexity on 8 x 512 held-apart Britannica tokens.", "",
        "| ratio | from scratch | reusing the previous ratio's dense passes | saved | perplexity (scratch / reused) | "
        "statistics bit-equal |",
        "|---|---|---|---|---|---|",
    ]
    for row in r["rows"]:
        scratch = f"{row['from_scratch_s']:.0f} s ({row['from_scratch_s'] / bare:.1f}x)"
        if "reused_s" not in row:
            lines.append(f"| {row['ratio']:g} | {scratch} | (first ratio) | | {row['perplexity']:.2f} | |")
            continue
        saved = 1 - row["reused_s"] / row["from_scratch_s"]
        lines.append(f"| {row['ratio']:g} | {scratch} | {row['reused_s']:.0f} s ({row['reused_s'] / bare:.1f}x) | "
                     f"{100 * saved:.0f}% | {row['perplexity']:.2f} / {row['perplexity_reused']:.2f} | "
                     f"{'yes' if row['statistics_bit_equal'] else 'NO'} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
