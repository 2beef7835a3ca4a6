"""Compression quality on the real SmolLM2-135M: today's fits against anchored factorisation, block refinement
and loss-aware ranks, on two held-apart texts, with each stage's cost.

    python benchmarks/compression_quality.py                       # the default rows and ratios
    python benchmarks/compression_quality.py --rows anchored --ratios 0.2 --threads 2
    python benchmarks/compression_quality.py --update              # rerun the given rows, keep the others

Protocol (the same tokens for every row): calibration on the first ``--calib-blocks`` x 512 tokens of the
Britannica text (64 blocks by default, in batches of 4 sequences; rows that choose something hold the last
quarter of the batches apart for it and refit on all); perplexity on the last 8 x 512 Britannica tokens (held apart) and on the first 8 x 512 tokens of
Python's own documentation (pydoc: another domain, never calibrated on). Every row stores at most
``1 - ratio`` of the targeted parameters (stored fraction recorded). Each row runs in a fresh process:
seconds of calibrate + compress, the same over the bare forward passes over the calibration batches
(timed in that process), and peak memory (VmHWM) over the model's own size.

Writes benchmarks/results/compression_quality.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")

# row -> SharedBasisConfig kwargs ("pipeline": how it runs)
ROWS = {
    "whitened per layer (today, dense inputs)": dict(group_size=1),
    "compressed inputs (today, layer by layer)": dict(group_size=1, pipeline="compress_sequential_compressed"),
    "anchored": dict(group_size=1, inputs="anchored"),
    "anchored + block refinement": dict(group_size=1, inputs="anchored", refine_epochs=4, refine_lr=1e-4),
    # the loss-aware rows up to "..., every module factorised" were measured before dense_at_break_even existed:
    # they factorise every module (at most at its break-even rank)
    "anchored + loss-aware ranks": dict(group_size=1, inputs="anchored", rank_allocation="loss",
                                        dense_at_break_even=False),
    "anchored + refinement + loss-aware ranks": dict(group_size=1, inputs="anchored", refine_epochs=4, refine_lr=1e-4,
                                                     rank_allocation="loss", dense_at_break_even=False),
    "anchored, anchor chosen per sub-layer on held-apart batches": dict(group_size=1, inputs="anchored", anchor="auto"),
    "loss-aware ranks, dense inputs": dict(group_size=1, rank_allocation="loss", dense_at_break_even=False),
    "whitened + output Fisher weights": dict(group_size=1, output_weights="fisher"),
    "anchored + loss-aware ranks + output Fisher weights, every module factorised": dict(
        group_size=1, inputs="anchored", rank_allocation="loss", output_weights="fisher", dense_at_break_even=False),
    "anchored + loss-aware ranks + output Fisher weights, power 1": dict(
        group_size=1, inputs="anchored", rank_allocation="loss", output_weights="fisher", output_weight_power=1.0,
        dense_at_break_even=False),
    "anchored + loss-aware ranks + output Fisher weights (the main job's: modules at break-even kept dense)": dict(
        group_size=1, inputs="anchored", rank_allocation="loss", output_weights="fisher"),
    "group_size=2 (paper's sharing, dense inputs)": dict(group_size=2),
    "group_size=auto (chosen on held-apart tokens)": dict(group_size="auto"),
}
SHORT = {"whitened": "whitened per layer (today, dense inputs)", "compressed": "compressed inputs (today, layer by layer)",
         "anchored": "anchored", "refined": "anchored + block refinement", "anchored_loss": "anchored + loss-aware ranks",
         "anchored_auto": "anchored, anchor chosen per sub-layer on held-apart batches",
         "loss": "anchored + refinement + loss-aware ranks", "loss_dense": "loss-aware ranks, dense inputs",
         "whitened_ow": "whitened + output Fisher weights",
         "anchored_loss_ow": "anchored + loss-aware ranks + output Fisher weights, every module factorised",
         "main": "anchored + loss-aware ranks + output Fisher weights (the main job's: modules at break-even kept dense)",
         "anchored_loss_ow1": "anchored + loss-aware ranks + output Fisher weights, power 1",
         "g2": "group_size=2 (paper's sharing, dense inputs)", "auto": "group_size=auto (chosen on held-apart tokens)"}


def param_bytes(model) -> int:
    """Bytes of the model's distinct parameters (a tied embedding counted once)."""
    return sum(p.numel() * p.element_size() for p in {id(p): p for p in model.parameters()}.values())


def page_in(model) -> None:
    """Read every parameter once, so the model's mapped checkpoint pages are all resident before a peak-memory
    baseline (the forward alone leaves the embedding rows of unseen tokens on disk, and the calibration then pages
    them in: they would count as the compression's)."""
    import torch

    with torch.no_grad():
        for p in model.parameters():
            float(p.sum())


def bare_forward_seconds(model, batches) -> float:
    """The floor a calibration is measured against: the bare forward passes of the decoder stack (no LM head)
    over the same batches, after one warm-up pass."""
    import torch

    with torch.no_grad():
        model.model(input_ids=batches[0], use_cache=False)
        t0 = time.perf_counter()
        for b in batches:
            model.model(input_ids=b, use_cache=False)
        return time.perf_counter() - t0


def host_cpu() -> str:
    """The CPU the numbers come from, with the vector and matrix units the kernels choose by (speed-ups differ
    between an AVX2 host and an AVX-512 + AMX one: bfloat16 without AMX or AVX-512 BF16 runs emulated)."""
    import platform

    name, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name":
                    name = value.strip()
                elif key.strip() == "flags":
                    flags = set(value.split())
                    break
    except OSError:
        pass
    units = [u for u in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if u in flags]
    return f"{name} ({', '.join(units) or 'no AVX2'})"


def run_worker(script: str, argv: list[str], what: str) -> dict:
    """Run ``script --worker *argv`` in a fresh process (the repository first on its path) and return the
    dict it printed on its last ``RESULT `` line."""
    env = dict(os.environ, PYTHONPATH=os.path.dirname(HERE) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    done = subprocess.run([sys.executable, script, "--worker", *argv], env=env, capture_output=True, text=True)
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("RESULT ")]
    if done.returncode or not lines:
        raise RuntimeError(f"{what} failed:\n{done.stderr[-3000:]}")
    return json.loads(lines[-1][7:])


def run_row(name: str, ratio: float, threads: int, calib_blocks: int) -> dict:
    import tempfile
    import warnings

    import torch

    torch.set_num_threads(threads)
    warnings.simplefilter("ignore")
    import peft_basis
    from peft import get_peft_model
    from peft_basis.data import default_model_path, load_default_model, load_text, split_blocks, token_blocks
    from peft_basis.evaluation import peak_rss_bytes, perplexity, reset_peak_rss

    spec = dict(ROWS[name])
    pipeline = spec.pop("pipeline", "calibrate")
    model, tok = load_default_model()
    calib, held = split_blocks(tok, "britannica", 512, calib_blocks, 8)
    pydoc = token_blocks(tok, load_text("pydoc"), 512, 8)
    batches = [calib[i : i + 4] for i in range(0, calib_blocks, 4)]
    model_bytes = param_bytes(model)
    forward_seconds = bare_forward_seconds(model, batches)
    config = peft_basis.SharedBasisConfig(compression_ratio=ratio, **spec)
    reset_peak_rss()
    base_rss = peak_rss_bytes()
    t0 = time.perf_counter()
    if pipeline == "calibrate":
        stats = peft_basis.calibrate(model, config, batches, progress=False)
        compressed = get_peft_model(model, config)
        report = compressed.base_model.compression_report
        seconds = time.perf_counter() - t0
        peak = peak_rss_bytes()
        extra = {}
        if "factors" in stats.meta:
            report = stats.meta["factors"]["report"]
            anchors = [r["anchor"] for r in report if "anchor" in r]  # the modules kept dense have none
            extra["anchors"] = {str(a): anchors.count(a) for a in sorted(set(anchors))}
            if any(r.get("dense") for r in report):
                extra["dense_modules"] = sum(len(r["members"]) for r in report if r.get("dense"))
            refinement = stats.meta["factors"].get("refinement", {})
            if refinement:
                extra["layers_refined"] = sum(v["kept"] == "refined" for v in refinement.values())
        if config.group_size == "auto":
            extra["group_sizes"] = {r["group"].split("__")[0]: len(r["members"])
                                    for r in compressed.base_model.compression_report}
    else:
        del model
        with tempfile.TemporaryDirectory() as out:
            # a lean-loaded model has no report: the compressor returns it
            report = peft_basis.compress_sequential(default_model_path(), config, batches, out, progress=False,
                                                    inputs="compressed")
            seconds = time.perf_counter() - t0
            peak = peak_rss_bytes()
            compressed = peft_basis.load_lean(default_model_path(), out)
        extra = {}
    stored = sum(r["params"] for r in report)
    dense = sum(r["dense_params"] for r in report)
    return {"row": name, "ratio": ratio, "britannica": perplexity(compressed, held), "pydoc": perplexity(compressed, pydoc),
            "stored_fraction": stored / dense, "seconds": seconds, "forward_seconds": forward_seconds,
            "cost_over_forward": seconds / forward_seconds, "peak_over_model": (peak - base_rss + model_bytes) / model_bytes,
            "threads": threads, "calib_tokens": int(calib.numel()), **extra}


def dense_reference(threads: int) -> dict:
    import torch

    torch.set_num_threads(threads)
    from peft_basis.data import load_default_model, load_text, split_blocks, token_blocks
    from peft_basis.evaluation import perplexity

    model, tok = load_default_model()
    _, held = split_blocks(tok, "britannica", 512, 16, 8)
    return {"britannica": perplexity(model, held), "pydoc": perplexity(model, token_blocks(tok, load_text("pydoc"), 512, 8))}


def _md(result: dict) -> str:
    ratios = sorted({r["ratio"] for r in result["rows"]})
    d = result["dense"]
    lines = [f"# Compression quality on SmolLM2-135M\n\nWritten by `benchmarks/compression_quality.py`. Dense perplexity: "
             f"Britannica {d['britannica']:.2f}, pydoc {d['pydoc']:.2f}. Calibration: "
             f"{', '.join(f'{t:,}' for t in sorted({r['calib_tokens'] for r in result['rows']}))} Britannica tokens "
             f"(the first 512-token blocks, the same for every row); "
             "evaluation: 8 x 512 held-apart Britannica tokens and 8 x 512 pydoc tokens (another domain).\n",
             "Perplexity, Britannica / pydoc, by fraction of the targeted parameters removed:\n",
             "| row | " + " | ".join(f"{r:.0%}" for r in ratios) + " |", "|---|" + "---|" * len(ratios)]
    by = {(r["row"], r["ratio"]): r for r in result["rows"]}
    for name in ROWS:
        if not any((name, q) in by for q in ratios):
            continue
        cells = [f"{by[(name, q)]['britannica']:.2f} / {by[(name, q)]['pydoc']:.2f}" if (name, q) in by else "-"
                 for q in ratios]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "Cost of calibrate + compress (at each row's ratios): seconds, as a multiple of the bare forward passes "
              "over the calibration batches, and peak memory over the model's size:\n",
              "| row | ratio | seconds | x bare forward | peak / model | stored fraction | notes |", "|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        notes = ", ".join(f"{k}: {r[k]}" for k in ("anchors", "layers_refined", "dense_modules", "group_sizes", "note")
                          if k in r)
        lines.append(f"| {r['row']} | {r['ratio']:.0%} | {r['seconds']:.0f} | {r['cost_over_forward']:.1f} | "
                     f"{r['peak_over_model']:.2f} | {r['stored_fraction']:.4f} | {notes} |")
    return "\n".join(lines) + "\n"


def plot(result: dict, path: str) -> None:
    """Perplexity against the fraction removed, a line per row, one panel per text (log scale)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 5.5))
    for ax, text in zip(axes, ("britannica", "pydoc")):
        for name in ROWS:
            pts = sorted((r["ratio"], r[text]) for r in result["rows"] if r["row"] == name)
            if pts:
                ax.plot([100 * q for q, _ in pts], [v for _, v in pts], marker="o", label=name)
        healed = _healed_points(text)
        if healed:
            ax.plot([100 * q for q, _ in healed], [v for _, v in healed], marker="*", markersize=10, linestyle=":",
                    label="anchored + loss-aware ranks, then healed (benchmarks/healing.py, its own calibration)")
        ax.axhline(result["dense"][text], color="black", linestyle="--", label="dense")
        ax.set(yscale="log", xlabel="% of the targeted parameters removed", ylabel="perplexity (held apart)",
               title=f"{text} (dense {result['dense'][text]:.2f})")
        ax.grid(alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=3, fontsize=7, frameon=False)  # below: off the lines
    fig.tight_layout(rect=(0, 0.16, 1, 1))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fig.savefig(path, dpi=110)


def _healed_points(text: str) -> list[tuple[float, float]]:
    """(ratio, perplexity) at the end of the largest healing run from the anchored fit, per ratio."""
    path = os.path.join(RESULTS, "healing.json")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        runs = [r for r in json.load(f)["runs"] if r.get("compression") == "anchored" and r["train"] == "factors"]
    best = {}
    for r in runs:
        if r["ratio"] not in best or r["tokens"] > best[r["ratio"]]["tokens"]:
            best[r["ratio"]] = r
    return sorted((q, r["history"][-1]["perplexity"][text]) for q, r in best.items())


PLOT = os.path.join(os.path.dirname(HERE), "docs", "img", "compression_quality.png")


def main(argv=None) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rows", default="whitened,compressed,anchored,refined,loss,loss_dense,g2,auto")
    p.add_argument("--ratios", default="0.1,0.2,0.3,0.4")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--calib-blocks", type=int, default=64)
    p.add_argument("--anchor", type=float, default=None, help="the anchored rows' anchor (default: the config's)")
    p.add_argument("--update", action="store_true", help="keep the rows already in the results file")
    p.add_argument("--plot-only", action="store_true", help="rewrite the markdown and the plot from the JSON")
    p.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        name, ratio = args.worker
        if args.anchor is not None:
            for spec in ROWS.values():
                if spec.get("inputs") == "anchored" and spec.get("anchor") != "auto":
                    spec["anchor"] = args.anchor
        out = dense_reference(args.threads) if name == "dense" else run_row(name, float(ratio), args.threads,
                                                                            args.calib_blocks)
        print("RESULT " + json.dumps(out), flush=True)
        return
    path = os.path.join(RESULTS, "compression_quality")
    result = {"rows": []}
    if (args.update or args.plot_only) and os.path.exists(path + ".json"):
        with open(path + ".json") as f:
            result = json.load(f)
    if args.plot_only:
        from peft_basis.io import atomic_write_text

        atomic_write_text(path + ".md", _md(result))
        plot(result, PLOT)
        return
    def worker(name: str, ratio: float) -> dict:
        argv = [name, str(ratio), "--threads", str(args.threads), "--calib-blocks", str(args.calib_blocks)]
        argv += [] if args.anchor is None else ["--anchor", str(args.anchor)]
        return run_worker(__file__, argv, f"{name} at {ratio}")

    if "dense" not in result:
        result["dense"] = worker("dense", 0.0)
    from peft_basis.io import atomic_write_text

    for key in args.rows.split(","):
        name = SHORT.get(key, key)
        for ratio in [float(r) for r in args.ratios.split(",")]:
            try:
                row = worker(name, ratio)
            except RuntimeError as e:  # one failed row is reported; the others still run
                print(f"FAILED {name} at {ratio}: {e}", file=sys.stderr, flush=True)
                continue
            result["rows"] = [r for r in result["rows"] if (r["row"], r["ratio"]) != (name, ratio)] + [row]
            print(json.dumps(row), flush=True)
            atomic_write_text(path + ".json", json.dumps(result, indent=1))
            atomic_write_text(path + ".md", _md(result))
    plot(result, PLOT)


if __name__ == "__main__":
    main()
