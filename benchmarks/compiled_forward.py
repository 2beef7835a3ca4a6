"""Does ``torch.compile`` make the compressed model's forward faster, or its speed-up over dense larger?

    python benchmarks/compiled_forward.py --threads 2      # results/compiled_forward.{json,md}

Protocol. SmolLM2-135M dense (float32) and its Basis Sharing compression (20% of the targeted parameters
removed, ``group_size=1``, calibrated on 16 x 512 Britannica tokens, saved with ``save_compressed`` in float32
and loaded with ``CompressedModel.from_pretrained``; ``--compressed DIR`` takes such a folder instead, e.g. the
shipping benchmark's ``WORK/standalone-float32``). One process: each model eager and compiled
(``torch.compile``, default inductor backend), forward of 8 x 256 random ids with ``use_cache=False`` (the
KV cache's object breaks the graph and recompiles) under ``torch.inference_mode``; the compile time is the
first compiled call's. Then ``--repeats`` rounds, each timing dense eager, compressed eager, dense compiled,
compressed compiled once (alternating: the host's speed drifts); medians, and each round's speed-up.
The compiled logits are checked against the eager ones. See docs/performance.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
import warnings

from compression_quality import host_cpu

HERE = os.path.dirname(os.path.abspath(__file__))
BATCH, SEQ = 8, 256


def compressed_folder(work: str, calib_blocks: int) -> str:
    from peft import get_peft_model

    import peft_basis
    from peft_basis import SharedBasisConfig, save_compressed
    from peft_basis.data import default_model_path, load_model, split_blocks

    model, tok = load_model(default_model_path())
    calib, _ = split_blocks(tok, "britannica", 512, calib_blocks, 8)
    config = SharedBasisConfig(compression_ratio=0.2, group_size=1)
    peft_basis.calibrate(model, config, [calib[i : i + 4] for i in range(0, calib.shape[0], 4)])
    return save_compressed(get_peft_model(model, config), os.path.join(work, "standalone-float32"))


def seconds(model, ids) -> float:
    import torch

    with torch.inference_mode():
        t = time.perf_counter()
        model(input_ids=ids, use_cache=False)
        return time.perf_counter() - t


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--calib-blocks", type=int, default=16)
    p.add_argument("--compressed", default=None, help="a save_compressed float32 folder (default: compress now)")
    p.add_argument("--out", default=os.path.join(HERE, "results", "compiled_forward"))
    args = p.parse_args(argv)
    import torch
    from transformers import AutoModelForCausalLM

    import peft_basis
    from peft_basis import CompressedModel
    from peft_basis.data import default_model_path
    from peft_basis.io import atomic_write_text

    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")
    with tempfile.TemporaryDirectory() as work:
        folder = args.compressed or compressed_folder(work, args.calib_blocks)
        eager = {"dense": AutoModelForCausalLM.from_pretrained(default_model_path(), dtype=torch.float32).eval(),
                 "compressed": CompressedModel.from_pretrained(folder)}
        ids = torch.randint(0, eager["dense"].config.vocab_size, (BATCH, SEQ), generator=torch.Generator().manual_seed(0))
        compiled, compile_seconds, logit_diff = {}, {}, {}
        for name, m in eager.items():
            seconds(m, ids)  # warm-up
            compiled[name] = torch.compile(m)
            compile_seconds[name] = seconds(compiled[name], ids)
            with torch.inference_mode():
                want, got = m(input_ids=ids, use_cache=False).logits, compiled[name](input_ids=ids, use_cache=False).logits
            logit_diff[name] = float((want - got).abs().max())
        runs = {f"{name}_{how}": [] for how in ("eager", "compiled") for name in eager}
        for _ in range(args.repeats):
            for how, models in (("eager", eager), ("compiled", compiled)):
                for name, m in models.items():
                    runs[f"{name}_{how}"].append(seconds(m, ids))
    median = {k: statistics.median(v) for k, v in runs.items()}
    ratio = {how: [d / c for d, c in zip(runs[f"dense_{how}"], runs[f"compressed_{how}"])] for how in ("eager", "compiled")}
    result = {"cpu": host_cpu(), "threads": args.threads, "repeats": args.repeats, "batch": [BATCH, SEQ],
              "torch": torch.__version__,
              "peft_basis_version": peft_basis.__version__, "compile_seconds": compile_seconds,
              "max_logit_diff_compiled_vs_eager": logit_diff, "seconds": runs, "median_seconds": median,
              "speedup_per_repeat": ratio,
              "median_speedup": {how: median[f"dense_{how}"] / median[f"compressed_{how}"] for how in ratio}}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    atomic_write_text(args.out + ".json", json.dumps(result, indent=1))
    atomic_write_text(args.out + ".md", markdown(result))
    print(markdown(result))


def markdown(r: dict) -> str:
    tps = {k: r["batch"][0] * r["batch"][1] / v for k, v in r["median_seconds"].items()}
    lines = [
        "# `torch.compile` and the compressed model's forward (`benchmarks/compiled_forward.py`)", "",
        f"SmolLM2-135M-Instruct float32, dense vs Basis Sharing 20% removed (`group_size=1`, standalone), forward of "
        f"{r['batch'][0]} x {r['batch'][1]} random ids, `use_cache=False`, inference mode, {r['threads']} thread(s) of "
        f"{r['cpu']}, "
        f"torch {r['torch']}; median of {r['repeats']} alternating repeats.", "",
        "| | dense tokens/s | compressed tokens/s | speed-up (median) | speed-up per repeat | compile s (dense, compressed) |",
        "|---|---|---|---|---|---|",
    ]
    for how in ("eager", "compiled"):
        per = r["speedup_per_repeat"][how]
        compile_s = (f"{r['compile_seconds']['dense']:.0f}, {r['compile_seconds']['compressed']:.0f}"
                     if how == "compiled" else "")
        lines.append(f"| {how} | {tps['dense_' + how]:,.0f} | {tps['compressed_' + how]:,.0f} | "
                     f"{r['median_speedup'][how]:.3f}x | {min(per):.2f}x-{max(per):.2f}x | {compile_s} |")
    d = r["max_logit_diff_compiled_vs_eager"]
    lines += ["", f"Compiled logits against eager: max abs difference {d['dense']:.1e} (dense), "
              f"{d['compressed']:.1e} (compressed)."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
