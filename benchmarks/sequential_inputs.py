"""Per-layer whitened SVD (Basis Sharing, group_size=1) calibrated on dense inputs vs on the compressed
model's inputs (``compress_sequential(..., inputs="compressed")``), real SmolLM2-135M, same tokens.

Protocol = benchmarks/shared_basis.py: calibration on the first 16 x 512 tokens of the Britannica text,
perplexity on its last 8 x 512 tokens (held apart). Both variants use the same base ranks (each module at
its own ratio's rank; the dense-inputs run also spends uniform's leftover, at most one rank per
module, so it stores slightly more: the comparison is conservative), both run layer by layer from the checkpoint and load with
``load_lean``. Writes benchmarks/results/sequential_inputs.{json,md}.

    python benchmarks/sequential_inputs.py [--ratios 0.1,0.2,0.3,0.4] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--ratios", default="0.1,0.2,0.3,0.4")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--calib-blocks", type=int, default=16)
    p.add_argument("--eval-blocks", type=int, default=8)
    p.add_argument("--output", default=os.path.join(HERE, "results", "sequential_inputs"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    import peft_basis
    from peft_basis.data import default_model_path, load_default_model, split_blocks
    from peft_basis.evaluation import perplexity

    path = default_model_path()
    dense, tok = load_default_model()
    calib, held = split_blocks(tok, "britannica", 512, args.calib_blocks, args.eval_blocks)
    batches = [calib[i : i + 4] for i in range(0, calib.shape[0], 4)]
    dense_ppl = perplexity(dense, held)
    del dense
    rows = []
    for ratio in [float(r) for r in args.ratios.split(",")]:
        row = {"ratio": ratio}
        for inputs in ("dense", "compressed"):
            cfg = peft_basis.SharedBasisConfig(compression_ratio=ratio, group_size=1)
            with tempfile.TemporaryDirectory() as out:
                t0 = time.perf_counter()
                report = peft_basis.compress_sequential(path, cfg, batches, out, inputs=inputs, progress=False)
                seconds = time.perf_counter() - t0
                model = peft_basis.load_lean(path, out)
                row[inputs] = {"ppl": perplexity(model, held), "seconds": seconds,
                               "params": sum(r["params"] for r in report),
                               "dense_params": sum(r["dense_params"] for r in report)}
                del model
            print(ratio, inputs, row[inputs], flush=True)
        rows.append(row)
    result = {"model": "SmolLM2-135M-Instruct", "dense_ppl": dense_ppl, "calib_tokens": calib.numel(),
              "eval_tokens": held.numel(), "threads": args.threads, "rows": rows}
    os.makedirs(os.path.dirname(args.output), exist_ok=True)
    with open(args.output + ".json", "w") as f:
        json.dump(result, f, indent=2)
    lines = [
        "# Dense vs compressed calibration inputs (per-layer whitened SVD, SmolLM2-135M)",
        "",
        f"Calibration {calib.numel():,} Britannica tokens, evaluation {held.numel():,} held-apart tokens; dense "
        f"perplexity {dense_ppl:.2f}. Layer by layer (`compress_sequential`), {args.threads} thread(s).",
        "",
        "| removed | stored / dense (targeted) | ppl, dense inputs | ppl, compressed inputs | change | s, dense | s, compressed |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        d, c = r["dense"], r["compressed"]
        lines.append(f"| {r['ratio']:.0%} | {d['params'] / d['dense_params']:.3f} / {c['params'] / c['dense_params']:.3f} | "
                     f"{d['ppl']:.2f} | {c['ppl']:.2f} | {100 * (c['ppl'] / d['ppl'] - 1):+.1f}% | {d['seconds']:.0f} | "
                     f"{c['seconds']:.0f} |")
    with open(args.output + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
