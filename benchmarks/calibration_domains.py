"""What the calibration text does to the compressed model on other text: one domain, another, or a mix.

    python benchmarks/calibration_domains.py --threads 2      # results/calibration_domains.{json,md}

Protocol. SmolLM2-135M-Instruct (float32), the main job's recipe (``peft-basis``'s defaults: Basis Sharing
fitted anchored, ``anchor=0.25``, loss-aware ranks, output Fisher weights, modules at break-even kept dense) at
``--ratio`` removed, calibrated on ``--calib-blocks`` x 512 tokens (batches of 4) of: Britannica alone, Python's
documentation (pydoc) alone, and half of each (the first blocks of both, the batches alternating). Every model,
the dense one too, is scored on the last 8 x 512 tokens of Britannica, pydoc and Hamlet: never calibration
tokens, and Hamlet is in no calibration set. Each row on a fresh copy of the dense model, in one process. See
docs/shared_basis.md.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import time
import warnings

from compression_quality import host_cpu
from ratio_sweep import recipe

HERE = os.path.dirname(os.path.abspath(__file__))
EVAL_DOMAINS = ("britannica", "pydoc", "hamlet")
CALIBRATIONS = {"britannica": ("britannica",), "pydoc": ("pydoc",), "britannica + pydoc": ("britannica", "pydoc")}
EVAL_BLOCKS, SEQ_LEN, BATCH = 8, 512, 4


def calibration_batches(blocks: dict, domains: tuple[str, ...], n: int) -> list:
    """``n`` blocks in batches of ``BATCH``, split evenly between ``domains`` (the first blocks of each), the
    batches taking the domains in turn."""
    per = [n // len(domains) + (i < n % len(domains)) for i in range(len(domains))]
    parts = [[blocks[d][i : i + BATCH] for i in range(0, k, BATCH)] for d, k in zip(domains, per)]
    return [b for group in zip(*parts) for b in group] + [b for p in parts for b in p[min(map(len, parts)):]]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--ratio", type=float, default=0.2)
    p.add_argument("--calib-blocks", type=int, default=32)  # the main job's
    p.add_argument("--layers", type=int, default=None, help="keep only the first N decoder layers (a smoke run)")
    p.add_argument("--out", default=os.path.join(HERE, "results", "calibration_domains"))
    args = p.parse_args(argv)
    import torch
    from peft import get_peft_model

    import peft_basis
    from peft_basis.data import default_model_path, load_model, load_text, token_blocks
    from peft_basis.evaluation import perplexity
    from peft_basis.io import atomic_write_text

    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")
    base, tok = load_model(default_model_path(), num_hidden_layers=args.layers)
    blocks = {d: token_blocks(tok, load_text(d), SEQ_LEN) for d in EVAL_DOMAINS}
    for d, b in blocks.items():
        if b.shape[0] < args.calib_blocks + EVAL_BLOCKS:
            raise SystemExit(f"{d} holds {b.shape[0]} blocks of {SEQ_LEN}; --calib-blocks {args.calib_blocks} is too many.")
    held = {d: b[-EVAL_BLOCKS:] for d, b in blocks.items()}

    def scores(model) -> dict:
        model.eval()
        return {d: perplexity(model, h) for d, h in held.items()}

    rows = [{"calibration": "none (dense)", **scores(base)}]
    print(rows[-1], flush=True)
    for name, domains in CALIBRATIONS.items():
        model = copy.deepcopy(base)
        config = recipe(args.ratio)
        t = time.perf_counter()
        peft_basis.calibrate(model, config, calibration_batches(blocks, domains, args.calib_blocks), progress=False)
        peft_model = get_peft_model(model, config)
        seconds = time.perf_counter() - t
        rows.append({"calibration": name, "seconds": seconds, **scores(peft_model)})
        print(rows[-1], flush=True)
        del model, peft_model
    for r in rows:
        r["geometric_mean"] = math.exp(sum(math.log(r[d]) for d in EVAL_DOMAINS) / len(EVAL_DOMAINS))
        r["over_dense"] = {d: r[d] / rows[0][d] for d in EVAL_DOMAINS}
    result = {"model": "SmolLM2-135M-Instruct", "layers": args.layers, "ratio": args.ratio,
              "calib_tokens": args.calib_blocks * SEQ_LEN, "eval_tokens_per_domain": EVAL_BLOCKS * SEQ_LEN,
              "threads": args.threads, "cpu": host_cpu(), "torch": torch.__version__,
              "peft_basis_version": peft_basis.__version__, "rows": rows}
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    atomic_write_text(args.out + ".json", json.dumps(result, indent=1))
    atomic_write_text(args.out + ".md", markdown(result))
    print(markdown(result))


def markdown(r: dict) -> str:
    cut = "" if r["layers"] is None else f" (its first {r['layers']} layers)"
    lines = [
        "# Calibration text (`benchmarks/calibration_domains.py`)",
        "",
        f"SmolLM2-135M-Instruct{cut}, "
        f"the main job's recipe at {r['ratio']:.0%} removed, {r['calib_tokens']:,} calibration tokens; perplexity on the "
        f"last {r['eval_tokens_per_domain']:,} tokens of each text (never calibrated on; Hamlet is in no calibration "
        f"set). {r['threads']} thread(s), CPU {r['cpu']}, peft-basis {r['peft_basis_version']}, torch {r['torch']}.",
        "",
        "| calibrated on | " + " | ".join(EVAL_DOMAINS) + " | geometric mean | x dense (" + " / ".join(EVAL_DOMAINS) + ") |",
        "|---|" + "---|" * (len(EVAL_DOMAINS) + 2),
    ]
    for row in r["rows"]:
        ratios = " / ".join(f"{row['over_dense'][d]:.2f}" for d in EVAL_DOMAINS)
        lines.append(f"| {row['calibration']} | " + " | ".join(f"{row[d]:.2f}" for d in EVAL_DOMAINS)
                     + f" | {row['geometric_mean']:.2f} | {ratios} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
