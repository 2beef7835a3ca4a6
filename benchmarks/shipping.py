"""What shipping a compressed SmolLM2-135M costs and buys: checkpoint sizes, load time and memory, speed
against the dense model (and against what the FLOPs allow), and what compressing it costs.

    python benchmarks/shipping.py --threads 2                    # on a quiet machine
    python benchmarks/shipping.py --layers 2 --calib-blocks 4 --threads 1 --repeats 1 --out /tmp/shipping_smoke

Protocol. Basis Sharing at ``--ratio`` (default 0.2) of the targeted parameters removed, ``group_size=1``
(whitened, uniform ranks), calibrated on the first ``--calib-blocks`` x 512 Britannica tokens in batches
of 4 (``--layers N``: the model cut to its first N decoder layers, dense checkpoint included). Every
measurement runs in a fresh process:

- compress (one per ``--configs`` entry; the whitened one ``--cost-repeats`` times, median): seconds of
  ``calibrate`` and of ``get_peft_model`` (the factorisation, for the whitened path; the anchored path fits
  inside ``calibrate``), each over the bare forward passes over the same batches timed in that process (the
  mean of one before and one after the calibration), and peak memory (VmHWM) over the model's size (the
  model's pages all resident before the baseline). The whitened run also writes the artifacts: the dense checkpoint (a cut one with ``--layers``),
  the PEFT adapter, ``save_compressed`` in float32, bfloat16, bfloat16 with int8 factors. ``anchored`` is
  the main job's config (``peft-basis``'s defaults: anchored inputs, loss-aware ranks, output Fisher weights, no refinement).
- load (one per way of loading): seconds and peak memory above the imports, for the dense model,
  ``PeftModel.from_pretrained`` onto the dense base, ``peft_basis.load_lean`` and
  ``CompressedModel.from_pretrained``; the files are in the page cache (just written), so this is the
  CPU side of loading, not the disk.
- speed (one process holding the dense model, the standalone compressed one and the lean-loaded PEFT
  one): forward tokens/s at batch 8 x 256 (``peft_basis.evaluation.tokens_per_second``, one warm-up
  pass before each timed one) and batch-1 greedy decoding (``generate``, 64 new tokens after a 32-token
  prompt, KV cache on, prefill included), the models alternating, ``--repeats`` times, median. Beside it
  the FLOP limit: the dense model's FLOPs (targeted Linears + LM head + attention) over the compressed one's.

Writes benchmarks/results/shipping.{json,md} (``--out`` elsewhere). See docs/performance.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
import warnings

from compression_quality import bare_forward_seconds, host_cpu, page_in, param_bytes, run_worker
from standalone import weights_bytes

HERE = os.path.dirname(os.path.abspath(__file__))
MB = 1e6
STANDALONE = {"standalone-float32": ("float32", "float"), "standalone-bfloat16": ("bfloat16", "float"),
              "standalone-bfloat16-int8": ("bfloat16", "int8")}
MAIN_JOB_STANDALONE = "standalone-main-job-float32"
LOADS = ("dense", "peft", "lean", "standalone-float32", "standalone-bfloat16-int8")
LOAD_NAMES = {"dense": "dense model (`AutoModelForCausalLM.from_pretrained`)",
              "peft": "`PeftModel.from_pretrained` on the dense base", "lean": "`peft_basis.load_lean`",
              "standalone-float32": "`CompressedModel.from_pretrained`, float32",
              "standalone-bfloat16-int8": "`CompressedModel.from_pretrained`, bfloat16 + int8 factors"}
PROMPT_TOKENS, NEW_TOKENS = 32, 64
DENSE_OF = {"compressed_bf16": "dense_bf16"}  # the dense model each compressed one is compared with (else "dense")


def _setup(args):
    import torch

    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")


def dense_path(args) -> str:
    from peft_basis.data import default_model_path

    return default_model_path() if args.layers is None else os.path.join(args.work, "dense")


def config_for(name: str, ratio: float):
    """``whitened``: SharedBasisConfig(ratio, group_size=1); ``anchored``: the main job's (``peft-basis``) config."""
    from peft_basis import SharedBasisConfig
    from peft_basis.cli import build_parser, run_config

    if name == "whitened":
        return SharedBasisConfig(compression_ratio=ratio, group_size=1)
    if name == "anchored":
        return run_config(build_parser().parse_args(["--ratio", str(ratio)]))
    raise SystemExit(f"--configs: unknown {name!r} (whitened, anchored)")


# ---- workers (one per fresh process) ----------------------------------------------------------------------
def work_compress(name: str, args) -> dict:
    """Cost of calibrate + compress on the whole-model path; the whitened run also writes the artifacts."""
    _setup(args)
    from peft import get_peft_model

    import peft_basis
    from peft_basis.data import default_model_path, load_model, split_blocks
    from peft_basis.evaluation import count_parameters, peak_rss_bytes, reset_peak_rss, size_on_disk
    from peft_basis.memory import trim_memory

    artifacts = name == "whitened"  # "whitened-again": a repeat of the cost row alone
    name = name.removesuffix("-again")
    model, tok = load_model(default_model_path(), num_hidden_layers=args.layers)
    if artifacts and args.layers is not None:  # the cut model is the dense checkpoint everything else loads
        model.save_pretrained(dense_path(args))
        tok.save_pretrained(dense_path(args))
    calib, _ = split_blocks(tok, "britannica", 512, args.calib_blocks, 8)
    batches = [calib[i : i + 4] for i in range(0, calib.shape[0], 4)]
    model_bytes, dense_params = param_bytes(model), count_parameters(model)
    forward_seconds = bare_forward_seconds(model, batches)
    page_in(model)
    config = config_for(name, args.ratio)
    # the bare forward's freed activations go back to the system first: left in the heap they would be counted
    # in the baseline, and the calibration reusing them would hide its own memory (peaks from 1.0x to 2.2x)
    trim_memory()
    reset_peak_rss()
    base_rss = peak_rss_bytes()
    t0 = time.perf_counter()
    peft_basis.calibrate(model, config, batches, progress=False)
    t1 = time.perf_counter()
    calibrate_peak = peak_rss_bytes()
    # the bare forward again, the model still dense (the host's speed drifts: the ratio uses both), outside the
    # peak: its activations are not the compression's, and the heap they leave is returned before compressing
    forward_after = bare_forward_seconds(model, batches)
    forward_seconds = (forward_seconds + forward_after) / 2
    trim_memory()
    reset_peak_rss()
    t_after = time.perf_counter()
    peft_model = get_peft_model(model, config)
    t2 = time.perf_counter() - (t_after - t1)
    compress_peak = peak_rss_bytes()
    peak = max(calibrate_peak, compress_peak)
    report = peft_model.base_model.compression_report
    out = {"config": name, "calib_tokens": int(calib.numel()), "forward_seconds": forward_seconds,
           "calibrate_seconds": t1 - t0, "compress_seconds": t2 - t1,
           "calibrate_over_forward": (t1 - t0) / forward_seconds, "compress_over_forward": (t2 - t1) / forward_seconds,
           "total_over_forward": (t2 - t0) / forward_seconds, "forward_after_seconds": forward_after,
           "peak_over_model": (peak - base_rss + model_bytes) / model_bytes, "model_bytes": model_bytes,
           "calibrate_peak_over_model": (calibrate_peak - base_rss + model_bytes) / model_bytes,
           "compress_peak_over_model": (compress_peak - base_rss + model_bytes) / model_bytes,
           "stored_fraction": sum(r["params"] for r in report) / sum(r["dense_params"] for r in report),
           "config_kwargs": {k: getattr(config, k) for k in ("inputs", "anchor", "refine_epochs", "rank_allocation",
                                                             "group_size", "output_weights")}}
    import torch

    from peft_basis import save_compressed

    if not artifacts:  # the main job's model, for the speed measurement beside the whitened one
        save_compressed(peft_model, os.path.join(args.work, MAIN_JOB_STANDALONE), dtype=torch.float32)
        return out

    w = args.work
    peft_model.save_pretrained(os.path.join(w, "adapter"))
    for folder, (dtype, factors) in STANDALONE.items():
        save_compressed(peft_model, os.path.join(w, folder), dtype=getattr(torch, dtype), factors=factors,
                        tokenizer=tok)
    bf16 = os.path.join(w, "dense-bfloat16")
    load_model(dense_path(args), dtype=torch.bfloat16)[0].save_pretrained(bf16)
    out["sizes"] = {"dense-float32": weights_bytes(dense_path(args)), "dense-bfloat16": weights_bytes(bf16),
                    "adapter": size_on_disk(os.path.join(w, "adapter", "adapter_model.safetensors")),
                    **{f: weights_bytes(os.path.join(w, f)) for f in STANDALONE}}
    shutil.rmtree(bf16)
    out["parameters"] = {"dense": dense_params, "compressed": count_parameters(peft_model)}
    return out


def work_load(kind: str, args) -> dict:
    """Seconds and peak memory of one way of loading, above what the imports take."""
    _setup(args)
    import torch
    from peft import PeftModel
    from transformers import MODEL_FOR_CAUSAL_LM_MAPPING, AutoConfig, AutoModelForCausalLM

    from peft_basis import CompressedModel, load_lean
    from peft_basis.evaluation import peak_rss_bytes, reset_peak_rss

    dense, adapter = dense_path(args), os.path.join(args.work, "adapter")
    MODEL_FOR_CAUSAL_LM_MAPPING[type(AutoConfig.from_pretrained(dense))]  # the modeling module imported, untimed
    reset_peak_rss()
    base_rss = peak_rss_bytes()
    t0 = time.perf_counter()
    if kind == "dense":
        model = AutoModelForCausalLM.from_pretrained(dense, dtype=torch.float32)
    elif kind == "peft":
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(dense, dtype=torch.float32), adapter)
    elif kind == "lean":
        model = load_lean(dense, adapter)
    else:
        model = CompressedModel.from_pretrained(os.path.join(args.work, kind))
    seconds = time.perf_counter() - t0
    loaded_peak = peak_rss_bytes()
    # A first 16-token forward, timed and inside the peak: transformers maps the safetensors files and reads a
    # weight's pages only when it is first used, so "loaded" is not yet "in memory". Its logits compare the
    # ways of loading (the compressed ones should agree bitwise).
    t1 = time.perf_counter()
    with torch.no_grad():
        logits = model.eval()(input_ids=torch.arange(16)[None] * 97, use_cache=False).logits
    first_forward = time.perf_counter() - t1
    peak = peak_rss_bytes()
    torch.save(logits, os.path.join(args.work, f"logits-{kind}.pt"))
    return {"kind": kind, "seconds": seconds, "first_forward_seconds": first_forward,
            "peak_above_imports": peak - base_rss, "peak_above_imports_at_load": loaded_peak - base_rss,
            "vmhwm": peak, "model_bytes": param_bytes(model)}


def decode_tokens_per_second(model, prompt, new_tokens: int = NEW_TOKENS) -> float:
    """Batch-1 greedy decoding with the KV cache: ``new_tokens`` new tokens over the seconds of ``generate``
    (prefill of ``prompt`` included)."""
    import torch

    with torch.no_grad():
        t = time.perf_counter()
        out = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, do_sample=False, use_cache=True, pad_token_id=0)
        seconds = time.perf_counter() - t
    assert out.shape[1] == prompt.shape[1] + new_tokens
    return new_tokens / seconds


def work_speed(args) -> dict:
    """Dense, standalone compressed and lean-loaded PEFT in one process, alternating; medians and FLOP limits."""
    _setup(args)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from peft_basis import CompressedModel, load_lean
    from peft_basis.data import load_text
    from peft_basis.evaluation import tokens_per_second

    dense_dir = dense_path(args)
    models = {"dense": AutoModelForCausalLM.from_pretrained(dense_dir, dtype=torch.float32).eval(),
              "compressed": CompressedModel.from_pretrained(os.path.join(args.work, "standalone-float32")),
              "peft": load_lean(dense_dir, os.path.join(args.work, "adapter"))}
    if os.path.isdir(os.path.join(args.work, MAIN_JOB_STANDALONE)):  # loss-aware ranks: another rank profile
        models["main_job"] = CompressedModel.from_pretrained(os.path.join(args.work, MAIN_JOB_STANDALONE))
    # bfloat16 (the smaller checkpoint; on CPUs with AMX its own kernels), against the dense model in bfloat16
    models["dense_bf16"] = AutoModelForCausalLM.from_pretrained(dense_dir, dtype=torch.bfloat16).eval()
    models["compressed_bf16"] = CompressedModel.from_pretrained(os.path.join(args.work, "standalone-bfloat16"))
    tok = AutoTokenizer.from_pretrained(dense_dir)
    prompt = tok(load_text("britannica")[:4000], return_tensors="pt")["input_ids"][:, :PROMPT_TOKENS]
    for m in models.values():
        decode_tokens_per_second(m, prompt, 4)  # warm-up
    samples = {"forward": {k: [] for k in models}, "decode": {k: [] for k in models}}
    for _ in range(args.repeats):
        for name, m in models.items():
            samples["forward"][name].append(tokens_per_second(m, batch_size=8, seq_len=256, repeats=1))
        for name, m in models.items():
            samples["decode"][name].append(decode_tokens_per_second(m, prompt))
    medians = {kind: {k: statistics.median(v) for k, v in s.items()} for kind, s in samples.items()}
    out = {"samples": samples, "median": medians, "flops": flop_limits(models["dense"], models["compressed"])}
    if "main_job" in models:
        out["flops_main_job"] = flop_limits(models["dense"], models["main_job"])
    # where the forward's time goes: separate passes with a timer around every Linear (the hooks cost a little,
    # so these passes are not the ones above), alternating, median per module
    ids = torch.randint(0, models["dense"].config.vocab_size, (8, 256), generator=torch.Generator().manual_seed(0))
    timed = {k: [] for k in models if k != "peft"}
    for _ in range(args.repeats):
        for name in timed:
            timed[name].append(module_seconds(models[name], ids))
    seconds = {k: {m: statistics.median(r[m] for r in runs) for m in runs[0]} for k, runs in timed.items()}
    out["time_split"] = {k: time_split(models[DENSE_OF.get(k, "dense")], seconds[DENSE_OF.get(k, "dense")], models[k],
                                       seconds[k]) for k in seconds if not k.startswith("dense")}
    return out


def module_seconds(model, ids) -> dict[str, float]:
    """Seconds of one forward of ``ids`` (``"total"``) and of each Linear in it, by module name."""
    import torch
    from torch import nn

    from peft_basis.standalone import LowRankLinear

    out, start = {}, {}
    modules = {n: m for n, m in model.named_modules() if isinstance(m, (nn.Linear, LowRankLinear))}

    def pre(name):
        return lambda m, a: start.__setitem__(name, time.perf_counter())

    def post(name):
        return lambda m, a, o: out.__setitem__(name, out.get(name, 0.0) + time.perf_counter() - start[name])

    handles = [m.register_forward_pre_hook(pre(n)) for n, m in modules.items()]
    handles += [m.register_forward_hook(post(n)) for n, m in modules.items()]
    try:
        with torch.no_grad():
            t = time.perf_counter()
            model(input_ids=ids, use_cache=False)
            out["total"] = time.perf_counter() - t
    finally:
        for h in handles:
            h.remove()
    return out


def time_split(dense, dense_seconds: dict, compressed, seconds: dict) -> dict:
    """The forward's time in the decoder's Linears, the LM head and the rest (attention, norms, activations),
    dense and compressed, and the speed-up the whole forward would reach if every compressed Linear took its
    dense time times its FLOP ratio (the kernels at the dense GEMM's FLOP rate, the rest unchanged)."""
    head = next(n for n, m in dense.named_modules() if m is dense.get_output_embeddings())
    fd, fc = linear_flops(dense), linear_flops(compressed)
    body = [n for n in fd if n != head]
    ideal = dense_seconds["total"] - sum(dense_seconds[n] * (1 - fc[n] / fd[n]) for n in body)

    def split(s):
        linears = sum(s[n] for n in body)
        return {"total": s["total"], "linears": linears, "head": s[head], "rest": s["total"] - linears - s[head]}

    d, c = split(dense_seconds), split(seconds)
    return {"dense": d, "compressed": c, "linear_flop_ratio": sum(fd[n] for n in body) / sum(fc[n] for n in body),
            "linear_speedup": d["linears"] / c["linears"], "time_limit": dense_seconds["total"] / ideal}


# ---- what the FLOPs allow ---------------------------------------------------------------------------------
def linear_flops(model) -> dict[str, int]:
    """FLOPs per token of every Linear: 2 d_in d_out, or 2 k (d_in + d_out) for a factorised one."""
    from torch import nn

    from peft_basis.standalone import LowRankLinear

    out = {}
    for name, m in model.named_modules():
        if isinstance(m, LowRankLinear):
            out[name] = 2 * m.rank * (m.in_features + m.out_features)
        elif isinstance(m, nn.Linear) and m.weight.numel():
            out[name] = 2 * m.in_features * m.out_features
    return out


def flop_limits(dense, compressed) -> dict:
    """FLOPs of the dense and the compressed model for the two measurements, and their ratio (the speed-up a
    FLOP-bound run could reach). Attention: 4 c H per token and layer at context c (QK^T and AV, H = heads x
    head dim), causal (c averages (L+1)/2 over a sequence). ``generate`` computes the LM head on the last
    position only (``logits_to_keep=1``)."""
    from peft_basis.standalone import LowRankLinear

    targeted = {n for n, m in compressed.named_modules() if isinstance(m, LowRankLinear)}
    head = {n for n, m in dense.named_modules() if m is dense.get_output_embeddings()}
    cfg = dense.config
    width = cfg.num_attention_heads * (getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads)

    def attention(contexts: int) -> int:  # summed over the positions' contexts
        return 4 * width * cfg.num_hidden_layers * contexts

    out = {}
    for which, model in (("dense", dense), ("compressed", compressed)):
        f = linear_flops(model)
        t, h = sum(f[n] for n in targeted), sum(f[n] for n in head)
        body = sum(f.values()) - h  # every Linear but the LM head, per token
        b, L, P, N = 8, 256, PROMPT_TOKENS, NEW_TOKENS
        out[which] = {"targeted_per_token": t, "rest_linear_per_token": sum(f.values()) - t,
                      "forward_8x256": b * L * (body + h) + b * attention(L * (L + 1) // 2),
                      "decode": P * body + h + (N - 1) * (body + h) + attention(sum(range(1, P + N)))}
    out["limit"] = {k: out["dense"][k] / out["compressed"][k] for k in ("forward_8x256", "decode")}
    return out


# ---- orchestration ----------------------------------------------------------------------------------------
def _common(args) -> list[str]:
    return ["--threads", str(args.threads), "--calib-blocks", str(args.calib_blocks), "--ratio", str(args.ratio),
            "--repeats", str(args.repeats), "--work", args.work] + ([] if args.layers is None else
                                                                    ["--layers", str(args.layers)])


def log(msg: str) -> None:
    print(time.strftime("%H:%M:%S"), msg, flush=True)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--calib-blocks", type=int, default=16, help="calibration blocks of 512 Britannica tokens")
    p.add_argument("--ratio", type=float, default=0.2, help="fraction of the targeted parameters removed")
    p.add_argument("--layers", type=int, default=None, help="keep only the first N decoder layers (smoke tests)")
    p.add_argument("--repeats", type=int, default=5, help="alternating speed repeats (median)")
    p.add_argument("--configs", default="whitened,anchored", help="compress-cost rows: whitened, anchored")
    p.add_argument("--cost-repeats", type=int, default=3, help="fresh-process runs of the whitened cost row (median)")
    p.add_argument("--out", default=os.path.join(HERE, "results", "shipping"), help="writes OUT.json and OUT.md")
    p.add_argument("--work", default=None, help="folder for the checkpoints (default: a temporary one, removed)")
    p.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        what, *rest = args.worker
        fn = {"compress": work_compress, "load": work_load}.get(what)
        out = fn(rest[0], args) if fn else work_speed(args)
        print("RESULT " + json.dumps(out), flush=True)
        return
    import torch

    import peft_basis
    from peft_basis.io import atomic_write_text

    configs = args.configs.split(",")
    for name in configs:
        config_for(name, args.ratio)
    keep = args.work is not None
    args.work = args.work or tempfile.mkdtemp(prefix="shipping_")
    os.makedirs(args.work, exist_ok=True)
    result = {"model": "SmolLM2-135M-Instruct", "layers": args.layers, "threads": args.threads, "ratio": args.ratio,
              "repeats": args.repeats, "peft_basis_version": peft_basis.__version__, "torch": torch.__version__,
              "cpu": host_cpu(), "cost": [], "load": []}

    def save() -> None:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        atomic_write_text(args.out + ".json", json.dumps(result, indent=1))
        atomic_write_text(args.out + ".md", markdown(result))

    def step(what: list[str], label: str) -> dict:
        t = time.perf_counter()
        r = run_worker(os.path.abspath(__file__), what + _common(args), label)
        log(f"{label}: {time.perf_counter() - t:.0f} s")
        return r

    try:
        first = step(["compress", "whitened"], "compress whitened (+ artifacts)")
        result["sizes"], result["parameters"] = first.pop("sizes"), first.pop("parameters")
        result["calib_tokens"] = first["calib_tokens"]
        result["cost"].append(first)
        for i in range(1, args.cost_repeats):
            result["cost"].append(step(["compress", "whitened-again"], f"compress whitened, repeat {i + 1}"))
        save()
        for kind in LOADS:
            result["load"].append(step(["load", kind], f"load {kind}"))
        ref = torch.load(os.path.join(args.work, "logits-peft.pt"))
        for r in result["load"]:
            if r["kind"] != "dense":
                logits = torch.load(os.path.join(args.work, f"logits-{r['kind']}.pt"))
                r["max_logit_diff_vs_peft"] = float((logits.float() - ref).abs().max())
        save()
        for name in configs:  # before the speed step: the anchored run writes the main job's model it times too
            if name != "whitened":
                result["cost"].append(step(["compress", name], f"compress {name}"))
                save()
        result["speed"] = step(["speed"], "speed")
        save()
    finally:
        if not keep:
            shutil.rmtree(args.work, ignore_errors=True)
    log(f"wrote {args.out}.json and .md")


def _peak_split(c: dict) -> str:
    """`` (1.41, 1.50)``: the calibrate and compress peaks, where the run recorded them apart."""
    if "calibrate_peak_over_model" not in c:
        return ""
    return f" ({c['calibrate_peak_over_model']:.2f}, {c['compress_peak_over_model']:.2f})"


def markdown(r: dict) -> str:
    cut = f", cut to its first {r['layers']} decoder layers" if r["layers"] is not None else ""
    lines = ["# Shipping a compressed model (`benchmarks/shipping.py`)\n",
             f"{r['model']}{cut}, Basis Sharing {r['ratio']:.0%} of the targeted parameters removed, group_size=1, "
             f"whitened, uniform ranks; calibrated on {r.get('calib_tokens', 0):,} Britannica tokens. "
             f"{r['threads']} torch thread(s), CPU {r.get('cpu', '(not recorded)')}, peft-basis {r['peft_basis_version']}, torch {r['torch']}. "
             "Method and caveats: docs/performance.md.\n"]
    if "sizes" in r:
        s, d = r["sizes"], r["sizes"]["dense-float32"]
        pr = r["parameters"]
        lines += [f"Parameters: dense {pr['dense']:,}, compressed {pr['compressed']:,} "
                  f"({pr['compressed'] / pr['dense']:.1%}).\n",
                  "| checkpoint | weights on disk | x dense fp32 |", "|---|---|---|",
                  f"| dense, float32 | {d / MB:.1f} MB | 1.00 |",
                  f"| dense, bfloat16 | {s['dense-bfloat16'] / MB:.1f} MB | {s['dense-bfloat16'] / d:.2f} |",
                  f"| PEFT adapter, float32 (+ the dense base it needs) | {s['adapter'] / MB:.1f} MB "
                  f"(+ {d / MB:.1f}) | {(s['adapter'] + d) / d:.2f} |"]
        for f, (dtype, factors) in STANDALONE.items():
            lines.append(f"| standalone (`save_compressed`), {dtype}" + (", int8 factors" if factors == "int8" else "")
                         + f" | {s[f] / MB:.1f} MB | {s[f] / d:.2f} |")
        lines.append("")
    if r["load"]:
        lines += ["Loading (a fresh process each; files in the page cache): seconds to load and of a first "
                  "16-token forward (which reads the pages of mapped weights), peak memory (VmHWM) above the imports "
                  "through both, and that over the loaded model's parameter bytes:\n",
                  "| how | load s | first forward s | peak above imports | x model bytes | max logit diff vs "
                  "PeftModel |", "|---|---|---|---|---|---|"]
        for x in r["load"]:
            diff = x.get("max_logit_diff_vs_peft")
            lines.append(f"| {LOAD_NAMES[x['kind']]} | {x['seconds']:.2f} | {x['first_forward_seconds']:.2f} | "
                         f"{x['peak_above_imports'] / MB:.0f} MB | "
                         f"{x['peak_above_imports'] / x['model_bytes']:.2f} | "
                         + ("" if diff is None else f"{diff:.3g}") + " |")
        lines.append("")
    if "speed" in r:
        sp, lim = r["speed"]["median"], r["speed"]["flops"]["limit"]
        lines += [f"Speed (one process, the models alternating, median of {r['repeats']}): tokens/s.\n",
                  "| measurement | dense | compressed (standalone) | compressed (PEFT, load_lean) | speed-up "
                  "(standalone) | FLOP limit | measured / limit |", "|---|---|---|---|---|---|---|"]
        rows = [("compressed", "whitened, uniform ranks", lim)]
        if "main_job" in sp["forward"]:
            rows.append(("main_job", "the main job's model (loss-aware ranks)", r["speed"]["flops_main_job"]["limit"]))
        if "compressed_bf16" in sp["forward"]:
            rows.append(("compressed_bf16", "whitened, bfloat16 (dense: bfloat16 too)", lim))
        for kind, label, key in (("forward", "forward, batch 8 x 256", "forward_8x256"),
                                 ("decode", f"greedy decoding, batch 1, {NEW_TOKENS} new tokens", "decode")):
            m = sp[kind]
            for model_key, what, limit in rows:
                dense = m[DENSE_OF.get(model_key, "dense")]
                up = m[model_key] / dense
                peft = f"{m['peft']:,.0f}" if model_key == "compressed" else "-"
                lines.append(f"| {label}, {what} | {dense:,.0f} | {m[model_key]:,.0f} | {peft} | {up:.2f}x | "
                             f"{limit[key]:.2f}x | "
                             f"{(up - 1) / (limit[key] - 1) if limit[key] > 1 else float('nan'):.0%} |")
        spread = []
        for kind in ("forward", "decode"):
            for model_key, what, _ in rows:
                dense = r["speed"]["samples"][kind][DENSE_OF.get(model_key, "dense")]
                ups = [c / d for c, d in zip(r["speed"]["samples"][kind][model_key], dense)]
                spread.append(f"{kind} {what}: {min(ups):.2f}x-{max(ups):.2f}x")
        lines += ["", "Speed-up of each repeat (the dense and the compressed pass next to each other), lowest-highest: "
                  + "; ".join(spread) + "."]
        f = r["speed"]["flops"]
        lines += ["", f"FLOPs per token of the Linears: targeted {f['dense']['targeted_per_token'] / 1e6:.1f} M dense, "
                  f"{f['compressed']['targeted_per_token'] / 1e6:.1f} M compressed; the rest (LM head, untargeted) "
                  f"{f['dense']['rest_linear_per_token'] / 1e6:.1f} M in both; attention on top. 'measured / limit': "
                  "the share of the possible gain (limit - 1) the measured speed-up (- 1) reaches.", ""]
        names = {"compressed": "whitened, uniform ranks", "main_job": "the main job's model",
                 "compressed_bf16": "whitened, bfloat16"}
        if "time_split" in r["speed"]:
            lines += ["Where the forward's time goes (batch 8 x 256; separate passes timing every Linear, median of "
                      f"{r['repeats']}): seconds in the decoder's Linears, the LM head and the rest (attention, norms, "
                      "activations); the Linears' speed-up against their FLOP ratio; and the time limit, the speed-up "
                      "of the whole forward if every factorised Linear ran at its dense counterpart's FLOP rate:\n",
                      "| model | total s | Linears s | LM head s | rest s | Linears' speed-up | their FLOP ratio | "
                      "time limit |", "|---|---|---|---|---|---|---|---|"]
            shown = set()
            for k, t in r["speed"]["time_split"].items():
                d, dense_name = t["dense"], DENSE_OF.get(k, "dense")
                if dense_name not in shown:
                    shown.add(dense_name)
                    lines.append(f"| {dense_name.replace('_bf16', ', bfloat16')} | {d['total']:.3f} | {d['linears']:.3f} | "
                                 f"{d['head']:.3f} | {d['rest']:.3f} | | | |")
                c = t["compressed"]
                lines.append(f"| {names.get(k, k)} | {c['total']:.3f} | {c['linears']:.3f} | {c['head']:.3f} | "
                             f"{c['rest']:.3f} | {t['linear_speedup']:.3f}x | {t['linear_flop_ratio']:.3f}x | "
                             f"{t['time_limit']:.3f}x |")
            lines.append("")
    if r["cost"]:
        lines += ["Cost of compressing on the whole-model path (a fresh process each): seconds, and over the bare "
                  "forward passes over the same calibration batches; peak memory over the model's size:\n",
                  "| config | calibrate s | compress s | bare forward s | calibrate x fwd | compress x fwd | "
                  "total x fwd | peak / model (calibrate, compress) | stored fraction |", "|---|---|---|---|---|---|---|---|---|"]
        whitened = [c for c in r["cost"] if c["config"] == "whitened"]
        for c in r["cost"]:
            kw = c["config_kwargs"]
            name = ("whitened, uniform ranks" if c["config"] == "whitened" else
                    f"anchored (b={kw['anchor']}), {kw['refine_epochs']} refinement epochs, {kw['rank_allocation']} "
                    "ranks (the main job)")
            lines.append(f"| {name} | {c['calibrate_seconds']:.1f} | {c['compress_seconds']:.1f} | "
                         f"{c['forward_seconds']:.1f} | {c['calibrate_over_forward']:.1f} | "
                         f"{c['compress_over_forward']:.1f} | {c['total_over_forward']:.1f} | "
                         f"{c['peak_over_model']:.2f}{_peak_split(c)} | {c['stored_fraction']:.4f} |")
        if len(whitened) > 1:
            med = lambda k: statistics.median(c[k] for c in whitened)  # noqa: E731
            totals = sorted(c["total_over_forward"] for c in whitened)
            peaks = sorted(c["peak_over_model"] for c in whitened)
            lines += ["", f"Whitened, median of {len(whitened)} fresh processes: calibrate {med('calibrate_over_forward'):.2f}x "
                      f"+ compress {med('compress_over_forward'):.2f}x, total **{med('total_over_forward'):.2f}x** the bare "
                      f"forward (single runs {totals[0]:.2f}x-{totals[-1]:.2f}x), peak **{med('peak_over_model'):.2f}x** the "
                      f"model (single runs {peaks[0]:.2f}x-{peaks[-1]:.2f}x). Each run's bare forward is the mean of one "
                      "timed before and one after its calibration."]
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
