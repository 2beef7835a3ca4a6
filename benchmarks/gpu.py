"""The GPU check: what a factorised model costs and buys on a CUDA device, in one short run.

    python benchmarks/gpu.py                                  # on a CUDA machine: results/gpu.{json,md}
    python benchmarks/gpu.py --presets smollm2-135m,llama-1b,llama-8b
    python benchmarks/gpu.py --device cpu --presets tiny --repeats 1 --out /tmp/gpu_smoke   # smoke test (CPU)

Why random weights: a GPU machine here has no network and the working tree that travels to it is small, so
the real checkpoints cannot go with it. Speed, memory and the compression's cost depend on the shapes and
ranks alone, and the whitened path (``SharedBasisConfig(group_size=1)``) gives every module of a kind the
same rank whatever the weights, so a model built from a real architecture's config with seeded random
weights, calibrated on random token ids, is timed exactly as the real one would be. Quality is measured on
the CPU (docs/shared_basis.md), not here.

Per preset (an architecture's shapes: SmolLM2-135M, a Llama-3.2-1B-shaped and a Llama-3.1-8B-shaped model):

- compress: the dense model in ``--compress-dtype`` (default bfloat16) on the device, Basis Sharing at
  ``--ratio`` removed, ``group_size=1``; seconds of ``calibrate`` and of ``get_peft_model`` over the bare
  forward passes over the same batches (``--calib-blocks`` x 512 tokens in batches of 4), and the peak
  device memory over the model's size; then ``save_compressed`` (size on disk against the dense bytes).
- speed: the dense model (rebuilt from the same seed) and ``CompressedModel.from_pretrained`` of that
  checkpoint, in each of ``--dtypes``, alternating, ``--repeats`` times, median: forward tokens/s at batch
  8 x 256 and 32 x 512 (prefill, no cache), and batch-1 greedy decoding (64 new tokens after 32) in eager
  mode and, where ``--graphs``, with a static cache, for which transformers compiles the forward on a GPU
  (``torch.compile(mode="reduce-overhead")``, CUDA graphs: the launches the factorisation doubles are
  replayed, not issued; on a CPU it runs eager).
- rank multiple: the compressed model loaded with ``rank_multiple`` 1, 32, 64 and 128 in the first dtype,
  forward tokens/s at both shapes (the tensor cores work in tiles; which multiple they want is measured).

A part that fails is recorded with its error and the run goes on: a device's time is short, and one broken
step should not cost the others. See docs/performance.md ("On a GPU").
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import tempfile
import time
import traceback
import warnings

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # the repository's peft_basis, where it is not installed (the device)

LLAMA = dict(hidden_act="silu", rms_norm_eps=1e-5, max_position_embeddings=4096, bos_token_id=1, eos_token_id=2,
             pad_token_id=2)
PRESETS = {
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=16, vocab_size=512, tie_word_embeddings=True),
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, head_dim=64, vocab_size=49152, tie_word_embeddings=True),
    "llama-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                     num_key_value_heads=8, head_dim=64, vocab_size=128256, tie_word_embeddings=True),
    "llama-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                     num_key_value_heads=8, head_dim=128, vocab_size=128256, tie_word_embeddings=False),
}
FORWARD_SHAPES = ((8, 256), (32, 512))
RANK_MULTIPLES = (1, 32, 64, 128)
PROMPT_TOKENS = 32
MIN_SAMPLE_SECONDS = 0.1  # one forward sample repeats its call until this long


def build_dense(preset: str, dtype, device):
    """The preset's architecture with seeded random weights (the same weights on every call)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(**LLAMA, **PRESETS[preset])
    with torch.device(device):
        model = LlamaForCausalLM(config)
    return model.to(dtype).eval()


def sync(device) -> None:
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def seconds(fn, device) -> float:
    sync(device)
    t = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t


class PeakMemory:
    """Peak device memory (CUDA: allocated bytes; CPU: resident set) since ``reset``, above what was there then."""

    def __init__(self, device):
        import torch

        self.cuda = torch.device(device).type == "cuda"
        self.device = device
        self.reset()

    def _now(self) -> int:
        import torch

        from peft_basis.evaluation import peak_rss_bytes

        return torch.cuda.max_memory_allocated(self.device) if self.cuda else peak_rss_bytes()

    def reset(self) -> None:
        import torch

        from peft_basis.evaluation import reset_peak_rss

        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
        else:
            reset_peak_rss()
            self.base = self._now()

    def above_start(self) -> int:
        return self._now() - self.base


def attempt(results: dict, key: str, fn):
    """Run one part; on failure record its error (the run goes on) and return None."""
    try:
        results[key] = fn()
        return results[key]
    except Exception as e:  # noqa: BLE001 - a device run reports every failure instead of stopping at the first
        results[key] = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc(limit=8)}
        print(f"[gpu] {key} failed: {type(e).__name__}: {e}", flush=True)
        return None


def compress(preset: str, args, folder: str) -> dict:
    """Calibrate + compress on the device; write the standalone checkpoint to ``folder``."""
    import torch
    from peft import get_peft_model

    import peft_basis
    from peft_basis import SharedBasisConfig, save_compressed
    from compression_quality import param_bytes
    from peft_basis.evaluation import count_parameters

    dtype, device = getattr(torch, args.compress_dtype), args.device
    model = build_dense(preset, dtype, device)
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (args.calib_blocks, 512), generator=torch.Generator().manual_seed(1))
    batches = [ids[i : i + 4].to(device) for i in range(0, args.calib_blocks, 4)]

    def bare_forward():
        with torch.no_grad():
            for b in batches:
                model(input_ids=b, use_cache=False)

    bare_forward()  # warm-up (kernels chosen, memory pool grown)
    forward_s = seconds(bare_forward, device)
    dense_params, dense_bytes = count_parameters(model), param_bytes(model)
    config = SharedBasisConfig(compression_ratio=args.ratio, group_size=1)
    gc.collect()
    peak = PeakMemory(device)
    calibrate_s = seconds(lambda: peft_basis.calibrate(model, config, batches, progress=False), device)
    calibrate_peak = peak.above_start()
    peak.reset()
    holder = {}
    compress_s = seconds(lambda: holder.setdefault("m", get_peft_model(model, config)), device)
    compress_peak = peak.above_start()
    peft_model = holder["m"]
    save_s = seconds(lambda: save_compressed(peft_model, folder, dtype=dtype), device)
    from standalone import weights_bytes

    out = {"dtype": args.compress_dtype, "calib_tokens": int(ids.numel()), "forward_seconds": forward_s,
           "calibrate_seconds": calibrate_s, "compress_seconds": compress_s, "save_seconds": save_s,
           "calibrate_over_forward": calibrate_s / forward_s, "compress_over_forward": compress_s / forward_s,
           "total_over_forward": (calibrate_s + compress_s) / forward_s, "model_bytes": dense_bytes,
           "calibrate_peak_over_model": 1 + calibrate_peak / dense_bytes,
           "compress_peak_over_model": 1 + compress_peak / dense_bytes,
           "parameters": {"dense": dense_params, "compressed": count_parameters(peft_model)},
           "checkpoint_bytes": weights_bytes(folder), "dense_bytes_in_dtype": dense_bytes}
    del peft_model, model, holder
    free(device)
    return out


def free(device) -> None:
    import torch

    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


def forward_tokens_per_second(model, shape, device) -> float:
    import torch

    ids = torch.randint(0, model.config.vocab_size, shape, generator=torch.Generator().manual_seed(2)).to(device)
    calls, total = 0, 0.0
    with torch.no_grad():
        while calls == 0 or total < MIN_SAMPLE_SECONDS:  # a GPU forward of a small model is milliseconds
            total += seconds(lambda: model(input_ids=ids, use_cache=False), device)
            calls += 1
    return calls * shape[0] * shape[1] / total


def decode_tokens_per_second(model, new_tokens: int, device, static: bool = False) -> float:
    import torch

    prompt = torch.randint(3, model.config.vocab_size, (1, PROMPT_TOKENS), generator=torch.Generator().manual_seed(3))
    prompt = prompt.to(device)
    kwargs = dict(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens,
                  min_new_tokens=new_tokens, do_sample=False, use_cache=True, pad_token_id=0)
    if static:
        kwargs["cache_implementation"] = "static"
    holder = {}
    with torch.no_grad():
        s = seconds(lambda: holder.setdefault("out", model.generate(**kwargs)), device)
    assert holder["out"].shape[1] == PROMPT_TOKENS + new_tokens
    return new_tokens / s


def alternate(models: dict, measure, repeats: int) -> dict:
    """``measure(model)`` for each model in turn (one warm-up each), ``repeats`` rounds; samples and medians."""
    for m in models.values():
        measure(m)
    samples = {k: [] for k in models}
    for _ in range(repeats):
        for k, m in models.items():
            samples[k].append(measure(m))
    return {"samples": samples, "median": {k: statistics.median(v) for k, v in samples.items()}}


def speed(preset: str, dtype_name: str, args, folder: str) -> dict:
    import torch

    from peft_basis import CompressedModel

    dtype, device = getattr(torch, dtype_name), args.device
    models = {"dense": build_dense(preset, dtype, device),
              "compressed": CompressedModel.from_pretrained(folder, dtype=dtype, device=device)}
    out = {}
    for b, t in FORWARD_SHAPES:
        attempt(out, f"forward_{b}x{t}",
                lambda: alternate(models, lambda m: forward_tokens_per_second(m, (b, t), device), args.repeats))
    attempt(out, "decode_eager",
            lambda: alternate(models, lambda m: decode_tokens_per_second(m, args.new_tokens, device), args.repeats))
    if args.graphs:
        def static_cache():
            import torch._dynamo

            # transformers compiles the forward itself (``mode="reduce-overhead"``) when ``generate`` runs a static
            # cache on a GPU; the two models share its code, so each one's guards are recompiles of the same frame
            for name in ("recompile_limit", "cache_size_limit"):
                if hasattr(torch._dynamo.config, name):
                    setattr(torch._dynamo.config, name, max(getattr(torch._dynamo.config, name), 64))
            start = time.perf_counter()
            for m in models.values():  # compile and capture outside the timed rounds
                decode_tokens_per_second(m, args.new_tokens, device, static=True)
            warm = time.perf_counter() - start
            result = alternate(models, lambda m: decode_tokens_per_second(m, args.new_tokens, device, static=True),
                               args.repeats)
            result["first_call_seconds"] = warm
            return result

        attempt(out, "decode_graphs", static_cache)
    del models
    free(device)
    return out


def rank_multiples(preset: str, args, folder: str) -> dict:
    import torch

    from peft_basis import CompressedModel

    dtype, device = getattr(torch, args.dtypes[0]), args.device
    models = {f"multiple_{k}": CompressedModel.from_pretrained(folder, dtype=dtype, device=device, rank_multiple=k)
              for k in RANK_MULTIPLES}
    out = {"dtype": args.dtypes[0]}
    for b, t in FORWARD_SHAPES:
        attempt(out, f"forward_{b}x{t}",
                lambda: alternate(models, lambda m: forward_tokens_per_second(m, (b, t), device), args.repeats))
    del models
    free(device)
    return out


def environment(device) -> dict:
    import peft
    import torch
    import transformers

    env = {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
           "device": str(device)}
    if torch.device(device).type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    else:
        from compression_quality import host_cpu

        env["cpu"] = host_cpu()
    return env


def run(args) -> dict:
    results = {"args": {k: v for k, v in vars(args).items() if k != "out"}}
    attempt(results, "environment", lambda: environment(args.device))
    with tempfile.TemporaryDirectory() as work:
        for preset in args.presets:
            r = results[preset] = {}
            folder = os.path.join(work, preset)
            started = time.perf_counter()
            if attempt(r, "compress", lambda: compress(preset, args, folder)) is None:
                continue
            for dtype_name in args.dtypes:
                attempt(r, f"speed_{dtype_name}", lambda: speed(preset, dtype_name, args, folder))
            attempt(r, "rank_multiple", lambda: rank_multiples(preset, args, folder))
            r["wall_seconds"] = time.perf_counter() - started
            print(f"[gpu] {preset}: {r['wall_seconds']:.0f} s", flush=True)
            write(results, args.out)  # what is done so far survives a run cut off at its time limit
    return results


def write(results: dict, out: str) -> None:
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "gpu.json"), "w") as f:
        json.dump(results, f, indent=1)
    with open(os.path.join(out, "gpu.md"), "w") as f:
        f.write(markdown(results))


# ---- the report ---------------------------------------------------------------------------------------------
def _ratio(part: dict | None) -> str:
    """``dense -> compressed (speed-up)`` of an ``alternate`` result, or its error."""
    if not part:
        return "-"
    if "error" in part:
        return "failed: " + part["error"][:80].replace("|", "/")
    m = part["median"]
    d, c = m["dense"], m["compressed"]
    return f"{d:,.0f} -> {c:,.0f} ({c / d:.2f}x)"


def markdown(results: dict) -> str:
    env = results.get("environment", {})
    where = env.get("gpu") or env.get("cpu") or env.get("device", "?")
    a = results["args"]
    lines = ["# The GPU check (`benchmarks/gpu.py`)", "",
             f"{where}; torch {env.get('torch')}, transformers {env.get('transformers')}, peft {env.get('peft')}. "
             f"Basis Sharing, {a['ratio']:.0%} removed, `group_size=1` (whitened, uniform ranks), compressed in "
             f"{a['compress_dtype']} on the device from {a['calib_blocks']} x 512 random tokens; seeded random weights "
             "in the presets' shapes (speed and memory depend on the shapes and ranks alone). Medians of "
             f"{a['repeats']} alternating repeats.", ""]
    presets = [p for p in PRESETS if p in results]
    lines += ["## Cost of compressing on the device", "",
              "| model | parameters dense -> compressed | calibrate x fwd | compress x fwd | total x fwd | "
              "peak / model (calibrate, compress) | checkpoint / dense bytes |", "|---|---|---|---|---|---|---|"]
    for p in presets:
        c = results[p].get("compress", {})
        if "error" in c:
            lines.append(f"| {p} | failed: {c['error'][:100]} | | | | | |")
            continue
        n = c["parameters"]
        lines.append(f"| {p} | {n['dense']:,} -> {n['compressed']:,} | {c['calibrate_over_forward']:.2f} | "
                     f"{c['compress_over_forward']:.2f} | {c['total_over_forward']:.2f} | "
                     f"{c['calibrate_peak_over_model']:.2f}, {c['compress_peak_over_model']:.2f} | "
                     f"{c['checkpoint_bytes'] / c['dense_bytes_in_dtype']:.3f} |")
    shapes = [f"forward_{b}x{t}" for b, t in FORWARD_SHAPES]
    lines += ["", "## Speed: tokens/s, dense -> compressed (speed-up)", "",
              "| model | dtype | " + " | ".join(s.replace("forward_", "forward ") for s in shapes)
              + " | decode, eager | decode, static cache (CUDA graphs on a GPU) |", "|---|---|" + "---|" * (len(shapes) + 2)]
    for p in presets:
        for key, part in results[p].items():
            if not key.startswith("speed_"):
                continue
            if "error" in part:
                lines.append(f"| {p} | {key[6:]} | failed: {part['error'][:100]} |")
                continue
            cells = [_ratio(part.get(s)) for s in shapes] + [_ratio(part.get("decode_eager")),
                                                              _ratio(part.get("decode_graphs"))]
            lines.append(f"| {p} | {key[6:]} | " + " | ".join(cells) + " |")
    lines += ["", "## Rank multiple: tokens/s of the compressed model at each `rank_multiple`", "",
              "| model | dtype | shape | " + " | ".join(str(k) for k in RANK_MULTIPLES) + " |",
              "|---|---|---|" + "---|" * len(RANK_MULTIPLES)]
    for p in presets:
        r = results[p].get("rank_multiple")
        if not r or "error" in r:
            continue
        for s in shapes:
            part = r.get(s)
            if not part or "error" in part:
                continue
            lines.append(f"| {p} | {r['dtype']} | {s[8:]} | "
                         + " | ".join(f"{part['median'][f'multiple_{k}']:,.0f}" for k in RANK_MULTIPLES) + " |")
    errors = [(p, k) for p in presets for k, v in results[p].items() if isinstance(v, dict) and "error" in v]
    if errors:
        lines += ["", "Failed parts (tracebacks in gpu.json): " + ", ".join(f"{p}/{k}" for p, k in errors) + "."]
    return "\n".join(lines) + "\n"


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--presets", default="smollm2-135m,llama-1b", type=lambda s: s.split(","))
    p.add_argument("--dtypes", default="bfloat16,float16", type=lambda s: s.split(","))
    p.add_argument("--compress-dtype", default="bfloat16")
    p.add_argument("--ratio", type=float, default=0.2)
    p.add_argument("--calib-blocks", type=int, default=16)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--graphs", action=argparse.BooleanOptionalAction, default=True,
                   help="also decode with a static cache (compiled to CUDA graphs by transformers on a GPU)")
    p.add_argument("--out", default=os.path.join(HERE, "results"))
    args = p.parse_args(argv)
    unknown = [x for x in args.presets if x not in PRESETS]
    if unknown:
        p.error(f"--presets: unknown {unknown} (known: {', '.join(PRESETS)})")
    return args


def main(argv=None) -> None:
    warnings.simplefilter("ignore")
    sys.path.insert(0, HERE)
    args = parse(argv)
    if args.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise SystemExit("No CUDA device: run this on a GPU machine, or pass --device cpu for a smoke test.")
    write(run(args), args.out)
    print(f"[gpu] wrote {os.path.join(args.out, 'gpu.md')}", flush=True)


if __name__ == "__main__":
    main()
