"""What half precision costs Basis Sharing on the real SmolLM2-135M.

    python benchmarks/half_precision.py           # ~5 min on 2 CPU cores

Protocol: ``calib, held = split_blocks(tok, "britannica", 512, 16, 8)``; calibrate on
``[calib[i:i+4] for i in range(0, 16, 4)]``; Basis Sharing ``group_size=1`` at 20% of the targeted
parameters removed; ``peft_basis.evaluation.perplexity(model, held)`` (held-apart tokens). Rows:

- fp32: the model loaded in float32, calibrated and compressed in float32 (factors fp32);
- bf16 model: the model loaded in bfloat16 (``load_default_model(dtype=torch.bfloat16)``), calibrated
  (statistics accumulate in fp32) and compressed on it (factors bf16), evaluated in bf16;
- bf16 factors from fp32: the fp32 adapter saved and loaded onto the bfloat16 model (factors cast to bf16);
- fp16 model / fp16 factors from fp32: the same two in float16;
- and each dtype's dense perplexity.

Writes benchmarks/results/half_precision.json and benchmarks/results/half_precision.md.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
import warnings

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")
RATIO = 0.2


def main() -> None:
    import peft_basis
    from peft import PeftModel, get_peft_model
    from peft_basis import SharedBasisConfig, calibrate
    from peft_basis.data import load_default_model, split_blocks
    from peft_basis.evaluation import perplexity

    warnings.simplefilter("ignore")
    torch.manual_seed(0)
    rows, t0 = [], time.perf_counter()

    def row(name, dtype, factors, ppl):
        rows.append({"setting": name, "model dtype": dtype, "factors": factors, "perplexity": ppl})
        print(f"{name:42s} {ppl:9.2f}   ({time.perf_counter() - t0:.0f} s)", flush=True)

    _, tok = load_default_model()
    calib, held = split_blocks(tok, "britannica", 512, 16, 8)
    batches = [calib[i : i + 4] for i in range(0, 16, 4)]

    with tempfile.TemporaryDirectory() as tmp:
        model, _ = load_default_model()
        row("dense fp32", "fp32", "-", perplexity(model, held))
        config = SharedBasisConfig(compression_ratio=RATIO, group_size=1)
        calibrate(model, config, batches, progress=False)
        fp32 = get_peft_model(model, config)
        row("Basis Sharing, fp32", "fp32", "fp32", perplexity(fp32, held))
        fp32.save_pretrained(tmp)
        del fp32, model
        for dtype, label in ((torch.bfloat16, "bf16"), (torch.float16, "fp16")):
            model, _ = load_default_model(dtype=dtype)
            row(f"dense {label}", label, "-", perplexity(model, held))
            config = SharedBasisConfig(compression_ratio=RATIO, group_size=1)
            calibrate(model, config, batches, progress=False)
            half = get_peft_model(model, config)
            row(f"Basis Sharing, {label} model", label, label, perplexity(half, held))
            del half, model
            base, _ = load_default_model(dtype=dtype)
            cast = PeftModel.from_pretrained(base, tmp)  # the fp32 adapter onto the half-precision model
            row(f"Basis Sharing, {label} factors from fp32", label, label, perplexity(cast, held))
            del cast, base

    os.makedirs(RESULTS, exist_ok=True)
    meta = {"model": "SmolLM2-135M-Instruct", "compression_ratio": RATIO, "group_size": 1,
            "calibration_tokens": int(calib.numel()), "eval_tokens": int(held.numel()), "torch": torch.__version__,
            "peft_basis": peft_basis.__version__, "seconds": time.perf_counter() - t0}
    with open(os.path.join(RESULTS, "half_precision.json"), "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=2)
    fp32_ppl = next(r["perplexity"] for r in rows if r["setting"] == "Basis Sharing, fp32")
    lines = [f"Settings: SmolLM2-135M-Instruct, Basis Sharing group_size=1, {RATIO:.0%} of the targeted parameters "
             f"removed, calibrated on {meta['calibration_tokens']:,} Britannica tokens, perplexity on "
             f"{meta['eval_tokens']:,} held-apart tokens; torch {torch.__version__}, CPU.", "",
             "| setting | model dtype | factors | perplexity | vs fp32 compressed |", "|---|---|---|---|---|"]
    for r in rows:
        rel = "" if r["factors"] == "-" else f"{(r['perplexity'] / fp32_ppl - 1):+.2%}"
        lines.append(f"| {r['setting']} | {r['model dtype']} | {r['factors']} | {r['perplexity']:.2f} | {rel} |")
    with open(os.path.join(RESULTS, "half_precision.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
