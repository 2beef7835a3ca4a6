"""Where the time and the memory of a compression go: calibrate + compress of the real SmolLM2-135M, phase by
phase, with the process's resident memory sampled throughout.

    python benchmarks/profile_compression.py                     # the main job's config and the plain whitened fit
    python benchmarks/profile_compression.py --configs whitened --threads 2

Each config runs in a fresh process. A phase is one of the library's progress bars (they cover every long step);
time outside any bar is "between bars" (factorisation inside ``get_peft_model``, bookkeeping). Per phase: seconds,
the same as a multiple of the bare forward passes over the calibration batches, and the highest resident memory
while it ran, over the model's own size (the model counts 1.0). Writes benchmarks/results/profile_compression.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")
sys.path.insert(0, HERE)

from compression_quality import bare_forward_seconds, page_in, param_bytes, run_worker  # noqa: E402

CONFIGS = {
    "whitened": dict(group_size=1),
    "anchored + loss-aware ranks (the main job)": dict(group_size=1, inputs="anchored", rank_allocation="loss"),
}
SHORT = {"whitened": "whitened", "main": "anchored + loss-aware ranks (the main job)"}


class PhaseSampler:
    """Samples resident memory every ``interval`` seconds and attributes it, with the wall time, to the progress
    bar open at that moment (the innermost)."""

    def __init__(self, interval: float = 0.02):
        import tqdm.std

        self.interval, self.open, self.phases, self.order = interval, [], {}, []
        self._page = os.sysconf("SC_PAGE_SIZE")
        self._stop = threading.Event()
        sampler = self
        original_init, original_close = tqdm.std.tqdm.__init__, tqdm.std.tqdm.close

        def init(bar, *args, **kwargs):
            original_init(bar, *args, **kwargs)
            sampler.open.append(bar)

        def close(bar):
            sampler.open[:] = [b for b in sampler.open if b is not bar]  # by identity: bars compare by position
            return original_close(bar)

        tqdm.std.tqdm.__init__, tqdm.std.tqdm.close = init, close

    def rss(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self._page

    @staticmethod
    def anonymous() -> int:
        """Resident memory that is not mapped file pages (the checkpoint's mapped weights are file pages, which
        the kernel can drop and read again)."""
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("RssAnon:"))

    def _run(self) -> None:
        last = time.perf_counter()
        while not self._stop.is_set():
            time.sleep(self.interval)
            now = time.perf_counter()
            phase = (self.open[-1].desc or "unnamed bar").rstrip(": ") if self.open else "between bars"
            if phase not in self.phases:
                self.phases[phase] = {"seconds": 0.0, "peak_rss": 0, "peak_anon": 0}
                self.order.append(phase)
            p = self.phases[phase]
            p["seconds"] += now - last
            p["peak_rss"] = max(p["peak_rss"], self.rss())
            p["peak_anon"] = max(p["peak_anon"], self.anonymous())
            last = now

    def __enter__(self):
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def run_config(name: str, ratio: float, threads: int, calib_blocks: int) -> dict:
    import warnings

    import torch

    torch.set_num_threads(threads)
    warnings.simplefilter("ignore")
    import peft_basis
    from peft import get_peft_model
    from peft_basis.data import load_default_model, split_blocks

    model, tok = load_default_model()
    calib, _ = split_blocks(tok, "britannica", 512, calib_blocks, 8)
    batches = [calib[i : i + 4] for i in range(0, calib_blocks, 4)]
    model_bytes = param_bytes(model)
    forward = bare_forward_seconds(model, batches)
    page_in(model)
    config = peft_basis.SharedBasisConfig(compression_ratio=ratio, **CONFIGS[name])
    sampler = PhaseSampler()
    base, base_anon = sampler.rss(), sampler.anonymous()
    t0 = time.perf_counter()
    with sampler:
        peft_basis.calibrate(model, config, batches, progress=True)
        get_peft_model(model, config)
    seconds = time.perf_counter() - t0
    # resident memory before the run is the model and the interpreter; over the model's size it counts as 1.0
    over = lambda rss: (rss - base + model_bytes) / model_bytes  # noqa: E731
    # anonymous memory above the start: what the compression itself allocated (the model's weights are file pages)
    anon = lambda a: (a - base_anon) / model_bytes  # noqa: E731
    phases = [{"phase": ph, "seconds": sampler.phases[ph]["seconds"], "x_forward": sampler.phases[ph]["seconds"] / forward,
               "peak_over_model": over(sampler.phases[ph]["peak_rss"]),
               "allocated_over_model": anon(sampler.phases[ph]["peak_anon"])} for ph in sampler.order]
    return {"config": name, "ratio": ratio, "threads": threads, "calib_tokens": int(calib.numel()),
            "forward_seconds": forward, "seconds": seconds, "x_forward": seconds / forward,
            "peak_over_model": max(p["peak_over_model"] for p in phases),
            "allocated_over_model": max(p["allocated_over_model"] for p in phases), "model_mb": model_bytes / 2**20,
            "phases": phases}


def _md(result: dict) -> str:
    out = ["# Where a compression's time and memory go (SmolLM2-135M)", "",
           "Written by `benchmarks/profile_compression.py`: calibrate + `get_peft_model` in a fresh process, phase by "
           "phase (the library's progress bars), resident memory sampled every 20 ms. `x forward`: seconds over the "
           "bare forward passes of the decoder over the same calibration batches; `peak / model`: the highest resident "
           "memory during the phase over the model's own size (the model itself counts 1.0); `allocated / model`: the "
           "highest anonymous memory above the start (what the compression allocated: the model's weights are mapped file "
           "pages of its checkpoint), over the model's size.", ""]
    for r in result["runs"]:
        out += [f"## {r['config']}, {r['ratio']:.0%} removed", "",
                f"{r['calib_tokens']:,} calibration tokens, {r['threads']} thread(s); bare forward {r['forward_seconds']:.1f} s; "
                f"total {r['seconds']:.1f} s = {r['x_forward']:.1f}x the bare forward; peak {r['peak_over_model']:.2f}x "
                f"the model ({r['model_mb']:.0f} MB), of which allocated {r['allocated_over_model']:.2f}x.", "",
                "| phase | seconds | x forward | peak / model | allocated / model |", "|---|---|---|---|---|"]
        out += [f"| {p['phase']} | {p['seconds']:.1f} | {p['x_forward']:.2f} | {p['peak_over_model']:.2f} | "
                f"{p['allocated_over_model']:.2f} |" for p in r["phases"]]
        out.append("")
    return "\n".join(out)


def main(argv=None) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--configs", default="whitened,main")
    p.add_argument("--ratio", type=float, default=0.2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--calib-blocks", type=int, default=32)
    p.add_argument("--output", default=os.path.join(RESULTS, "profile_compression"))
    p.add_argument("--worker", nargs=1, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        out = run_config(args.worker[0], args.ratio, args.threads, args.calib_blocks)
        print("RESULT " + json.dumps(out), flush=True)
        return
    from peft_basis.io import atomic_write_text

    result = {"runs": []}
    for key in args.configs.split(","):
        name = SHORT.get(key, key)
        argv = [name, "--ratio", str(args.ratio), "--threads", str(args.threads), "--calib-blocks", str(args.calib_blocks)]
        result["runs"].append(run_worker(__file__, argv, name))
        print(_md({"runs": result["runs"][-1:]}), flush=True)
        atomic_write_text(args.output + ".json", json.dumps(result, indent=1))
        atomic_write_text(args.output + ".md", _md(result))


if __name__ == "__main__":
    main()
