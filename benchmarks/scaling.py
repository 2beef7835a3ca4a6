"""Peak memory of compressing layer by layer vs the whole-model path, growth with depth, lean loading.

Every measurement runs in a fresh subprocess (peak RSS = that process's ``VmHWM``, not ``ru_maxrss``, which a child inherits from its parent); the same
calibration tokens (real text, SmolLM2's tokenizer) are used by every run. Writes
``benchmarks/results/scaling.json`` and ``benchmarks/results/scaling.md``.

    python benchmarks/scaling.py                 # SmolLM2-135M (30 layers) + random 2x / 4x depth
    python benchmarks/scaling.py --depths 1      # the real model only
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")
WORK = os.environ.get("PEFT_BASIS_SCALING_DIR", "/tmp/peft_basis_scaling")
GiB = 1024**3


# ---- workers (one per subprocess) -------------------------------------------------------------------------
def worker(mode: str, model: str, out: str, ratio: float, data_file: str) -> dict:
    torch.set_num_threads(int(os.environ.get("SCALING_THREADS", "1")))
    from peft_basis.evaluation import peak_rss_bytes, rss_bytes
    from peft import PeftModel, get_peft_model
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    import peft_basis  # noqa: F401
    from peft_basis.calibration import calibrate
    from peft_basis import compress_sequential
    from peft_basis.lean import load_lean
    from peft_basis.tuners.shared_basis import SharedBasisConfig

    blocks = load_file(data_file)["blocks"]
    batches = [blocks[i : i + 2] for i in range(0, blocks.shape[0], 2)]
    baseline = rss_bytes()  # interpreter + torch + transformers + peft, before any model
    t = time.perf_counter()
    result: dict = {"mode": mode, "model": model}
    if mode == "whole":
        m = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
        config = SharedBasisConfig(compression_ratio=ratio)
        calibrate(m, config, batches, progress=False)
        pm = get_peft_model(m, config)
        pm.save_pretrained(out)
    elif mode == "sequential":
        compress_sequential(model, SharedBasisConfig(compression_ratio=ratio), batches, out, progress=False)
    elif mode in ("fisher_whole", "fisher_sequential", "fisher_sequential_bases"):  # BASIS: Grams + Fisher scores
        from peft_basis.calibration import calibrate_sequential
        from peft_basis.tuners.basis import BasisConfig

        config = BasisConfig(r=16, rank_allocation="fisher")
        target = os.path.join(out, f"{mode}.safetensors")
        os.makedirs(out, exist_ok=True)
        if mode == "fisher_whole":
            calibrate(AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32), config, batches,
                      progress=False, save_to=target)
        else:
            calibrate_sequential(model, config, batches, progress=False, save_to=target,
                                 keep_grams=mode == "fisher_sequential")
    elif mode in ("dense_load", "lean_load"):
        if mode == "dense_load":
            pm = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32), out)
        else:
            pm = load_lean(model, out)
        result["load_seconds"] = time.perf_counter() - t
        with torch.no_grad():
            logits = pm.eval()(input_ids=blocks[:1, :64]).logits
        torch.save({"logits": logits}, os.path.join(out, f"logits_{mode}.pt"))
        result["parameter_bytes"] = sum(p.numel() * p.element_size() for p in pm.parameters())
    result.update(seconds=time.perf_counter() - t, baseline_rss=baseline, peak_rss=peak_rss_bytes())
    result["working_rss"] = result["peak_rss"] - baseline
    return result


def run_worker(mode, model, out, ratio, data_file) -> dict:
    cmd = [sys.executable, __file__, "--worker", mode, "--model", model, "--out", out, "--ratio", str(ratio),
           "--data", data_file]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{mode} on {model} failed:\n{proc.stderr[-3000:]}")
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")][-1]
    r = json.loads(line[len("RESULT "):])
    print(f"  {mode:11s} {os.path.basename(model):28s} peak {r['peak_rss'] / GiB:6.2f} GiB  above imports "
          f"{r['working_rss'] / GiB:6.2f} GiB  {r['seconds']:7.1f} s", flush=True)
    return r


# ---- random deep checkpoints, written layer by layer (never the whole model in memory) ---------------------
def deep_checkpoint(real_path: str, factor: int) -> str:
    from transformers import AutoConfig

    from peft_basis.io import SafetensorsStreamWriter, meta_model

    config = AutoConfig.from_pretrained(real_path)
    layers = config.num_hidden_layers * factor
    path = os.path.join(WORK, f"smollm2-arch-{layers}-layers-random")
    if os.path.exists(os.path.join(path, "model.safetensors.index.json")):
        return path
    os.makedirs(path, exist_ok=True)
    config.num_hidden_layers = layers
    config.save_pretrained(path)
    model = meta_model(path)
    g = torch.Generator().manual_seed(factor)
    shards: dict[str, list[tuple[str, torch.Tensor]]] = {}
    for name, p in model.state_dict().items():
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        idx = name.split(".")[2] if name.startswith("model.layers.") else "rest"
        shards.setdefault(idx, []).append((name, p))
    weight_map = {}
    for idx, items in shards.items():
        file = f"model-{idx}.safetensors"
        specs = {n: (tuple(p.shape), torch.float32) for n, p in items}
        w = SafetensorsStreamWriter(os.path.join(path, file), specs, {"format": "pt"})
        for n, p in items:
            value = torch.ones(p.shape) if n.endswith("norm.weight") else torch.randn(p.shape, generator=g) * 0.02
            w.write(n, value)
            weight_map[n] = file
        w.close()
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)
    return path


def checkpoint_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path) if f.endswith(".safetensors"))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--worker")
    ap.add_argument("--model")
    ap.add_argument("--out")
    ap.add_argument("--data")
    ap.add_argument("--ratio", type=float, default=0.2)
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--depths", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--domain", default="britannica")
    ap.add_argument("--whole-max-depth", type=int, default=2,
                    help="run the whole-model path only up to this depth factor (it is the slow, memory-hungry one)")
    ap.add_argument("--fisher-only", action="store_true",
                    help="re-measure only the BASIS Fisher rows, into the existing results")
    ap.add_argument("--lean-only", action="store_true",
                    help="re-measure only the loading rows, from the adapter an earlier full run left in the work dir")
    args = ap.parse_args()
    if args.worker:
        print("RESULT " + json.dumps(worker(args.worker, args.model, args.out, args.ratio, args.data)))
        return
    if args.fisher_only:
        from peft_basis.data import default_model_path

        with open(os.path.join(RESULTS, "scaling.json")) as f:
            results = json.load(f)
        results["fisher"] = {}
        _measure_fisher(results, default_model_path(), args.ratio, os.path.join(WORK, "calibration_blocks.safetensors"))
        _write(results)
        return
    if args.lean_only:
        from peft_basis.data import default_model_path

        with open(os.path.join(RESULTS, "scaling.json")) as f:
            results = json.load(f)
        _measure_loading(results, default_model_path(), os.path.join(WORK, "adapter-sequential-30"), args.ratio,
                         os.path.join(WORK, "calibration_blocks.safetensors"))
        _write(results)
        return

    from safetensors.torch import load_file, save_file

    from peft_basis.data import default_model_path, token_blocks
    from transformers import AutoTokenizer

    os.makedirs(WORK, exist_ok=True)
    real = default_model_path()
    tok = AutoTokenizer.from_pretrained(real)
    from peft_basis.data import load_text

    blocks = token_blocks(tok, load_text(args.domain), args.seq_len, args.tokens // args.seq_len)
    data_file = os.path.join(WORK, "calibration_blocks.safetensors")
    save_file({"blocks": blocks.contiguous()}, data_file)
    results = {"settings": {"ratio": args.ratio, "tokens": int(blocks.numel()), "seq_len": args.seq_len,
                            "domain": args.domain, "threads": int(os.environ.get("SCALING_THREADS", "1")),
                            "torch": torch.__version__},
               "depth": [], "lean": {}, "equivalence": {}, "fisher": {}}
    for factor in args.depths:
        path = real if factor == 1 else deep_checkpoint(real, factor)
        from transformers import AutoConfig

        n_layers = AutoConfig.from_pretrained(path).num_hidden_layers
        print(f"{n_layers} layers ({checkpoint_bytes(path) / GiB:.2f} GiB on disk)", flush=True)
        row = {"layers": n_layers, "random_weights": factor != 1, "checkpoint_bytes": checkpoint_bytes(path)}
        for mode in ("sequential", "whole") if factor <= args.whole_max_depth else ("sequential",):
            out = os.path.join(WORK, f"adapter-{mode}-{n_layers}")
            row[mode] = run_worker(mode, path, out, args.ratio, data_file)
        results["depth"].append(row)
        if factor == 1:
            a = load_file(os.path.join(WORK, "adapter-whole-30", "adapter_model.safetensors"))
            b = load_file(os.path.join(WORK, "adapter-sequential-30", "adapter_model.safetensors"))
            results["equivalence"] = {
                "same_keys": sorted(a) == sorted(b),
                "max_abs_diff": max(float((a[k] - b[k]).abs().max()) for k in a),
                "max_abs_value": max(float(a[k].abs().max()) for k in a),
                "adapter_bytes": os.path.getsize(os.path.join(WORK, "adapter-sequential-30", "adapter_model.safetensors")),
            }
            _measure_loading(results, real, os.path.join(WORK, "adapter-sequential-30"), args.ratio, data_file)
            _measure_fisher(results, real, args.ratio, data_file)
        _write(results)
    _write(results)


def _measure_loading(results, real, adapter, ratio, data_file) -> None:
    for mode in ("dense_load", "lean_load"):
        results["lean"][mode] = run_worker(mode, real, adapter, ratio, data_file)
    la = torch.load(os.path.join(adapter, "logits_dense_load.pt"), weights_only=True)["logits"]
    lb = torch.load(os.path.join(adapter, "logits_lean_load.pt"), weights_only=True)["logits"]
    results["lean"]["logits_equal"] = bool(torch.equal(la, lb))


def _measure_fisher(results, real, ratio, data_file) -> None:
    from peft_basis.calibration import CalibrationStatistics

    out = os.path.join(WORK, "fisher")
    for mode in ("fisher_sequential", "fisher_sequential_bases", "fisher_whole"):
        results["fisher"][mode] = run_worker(mode, real, out, ratio, data_file)
    a = CalibrationStatistics.load(os.path.join(out, "fisher_whole.safetensors"))
    keys = [k for k in a.extra if k.startswith("fisher")]
    results["fisher"]["modules"] = len(keys)
    results["fisher"]["max_relative_diff"] = max(
        float((a.extra[k] - b.extra[k]).abs().max() / a.extra[k].abs().max())
        for name in ("fisher_sequential", "fisher_sequential_bases")
        for b in [CalibrationStatistics.load(os.path.join(out, f"{name}.safetensors"))] for k in keys)


def _write(results: dict) -> None:
    from peft_basis.io import atomic_write

    os.makedirs(RESULTS, exist_ok=True)

    def dump(tmp):
        with open(tmp, "w") as f:
            json.dump(results, f, indent=2)

    atomic_write(os.path.join(RESULTS, "scaling.json"), dump)
    g = lambda b: f"{b / GiB:.2f}"  # noqa: E731
    lines = [
        f"Settings: compression_ratio {results['settings']['ratio']}, {results['settings']['tokens']} calibration "
        f"tokens ({results['settings']['domain']}, seq_len {results['settings']['seq_len']}), "
        f"{results['settings']['threads']} thread(s), torch {results['settings']['torch']}, fp32.",
        "",
        "| layers | weights | checkpoint GiB | sequential peak GiB | (above imports) | whole-model peak GiB | (above imports) "
        "| sequential s | whole s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results["depth"]:
        s, w = r["sequential"], r.get("whole")
        whole = f"{g(w['peak_rss'])} | {g(w['working_rss'])}" if w else "not run | not run"
        lines.append(
            f"| {r['layers']} | {'random' if r['random_weights'] else 'SmolLM2-135M'} | {g(r['checkpoint_bytes'])} | "
            f"{g(s['peak_rss'])} | {g(s['working_rss'])} | {whole} | "
            f"{s['seconds']:.0f} | {w['seconds'] if w else float('nan'):.0f} |"
        )
    if results["lean"].get("lean_load"):
        d, l_ = results["lean"]["dense_load"], results["lean"]["lean_load"]
        lines += [
            "",
            "| loading the compressed SmolLM2-135M | peak GiB | (above imports) | parameter GiB | seconds |",
            "|---|---|---|---|---|",
            f"| dense base + PeftModel.from_pretrained | {g(d['peak_rss'])} | {g(d['working_rss'])} | "
            f"{g(d['parameter_bytes'])} | {d['load_seconds']:.1f} |",
            f"| peft_basis.lean.load_lean | {g(l_['peak_rss'])} | {g(l_['working_rss'])} | {g(l_['parameter_bytes'])} | "
            f"{l_['load_seconds']:.1f} |",
            "",
            f"Logits of the two loads identical: {results['lean']['logits_equal']}.",
        ]
    if results.get("fisher"):
        f = results["fisher"]
        sq, wh = f["fisher_sequential"], f["fisher_whole"]
        lines += [
            "",
            "| BASIS statistics (Grams + Fisher, r=16) of SmolLM2-135M | peak GiB | (above imports) | seconds |",
            "|---|---|---|---|",
            f"| layer by layer (`calibrate_sequential`) | {g(sq['peak_rss'])} | {g(sq['working_rss'])} | "
            f"{sq['seconds']:.0f} |",
            f"| whole model (`calibrate`) | {g(wh['peak_rss'])} | {g(wh['working_rss'])} | {wh['seconds']:.0f} |",
        ]
        if "fisher_sequential_bases" in f:
            sb = f["fisher_sequential_bases"]
            lines.insert(-1, f"| layer by layer, directions instead of Grams (`keep_grams=False`) | {g(sb['peak_rss'])} | "
                             f"{g(sb['working_rss'])} | {sb['seconds']:.0f} |")
        lines += [
            "",
            f"Fisher scores of the {f['modules']} modules: largest relative difference {f['max_relative_diff']:.2g}.",
        ]
    if results["equivalence"]:
        e = results["equivalence"]
        lines += ["", f"Sequential vs whole-model adapter on SmolLM2-135M: same tensors {e['same_keys']}, max |diff| "
                      f"{e['max_abs_diff']:.3g} (largest |value| {e['max_abs_value']:.3g}); adapter file "
                      f"{g(e['adapter_bytes'])} GiB."]

    def dump_md(tmp):
        with open(tmp, "w") as f:
            f.write("\n".join(lines) + "\n")

    atomic_write(os.path.join(RESULTS, "scaling.md"), dump_md)


if __name__ == "__main__":
    main()
