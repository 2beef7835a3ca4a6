"""Standalone compressed checkpoints of the real SmolLM2-135M: size on disk and perplexity.

Basis Sharing, 20% of the targeted parameters removed, ``group_size=1``, calibrated on 16 Britannica
blocks of 512 tokens (batches of 4), scored on 8 held-apart blocks. The adapter model is saved with
``save_compressed`` in float32, bfloat16 and float16, with float and int8 factors, each reloaded with
``CompressedModel.from_pretrained`` (no dense base) and scored on the same tokens. Sizes are the
safetensors weight files; "expected" is the dense checkpoint of that dtype minus the removed
parameters' bytes. The dense model is also scored in bfloat16 and float16 (what the dtype alone costs).

    python benchmarks/standalone.py          # ~5-10 min on 2 CPU threads

Writes benchmarks/results/standalone.json and benchmarks/results/standalone.md.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
import warnings

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
MB = 1e6


def parse():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ratio", type=float, default=0.2)
    p.add_argument("--group-size", type=int, default=1)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=os.path.join(HERE, "results", "standalone"))
    return p.parse_args()


def log(msg):
    print(time.strftime("%H:%M:%S"), msg, flush=True)


def weights_bytes(folder: str) -> int:
    return sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder) if f.endswith(".safetensors"))


def main():
    args = parse()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    from peft import get_peft_model

    import peft_basis
    from peft_basis import CompressedModel, SharedBasisConfig, calibrate, save_compressed
    from peft_basis.data import default_model_path, load_default_model, split_blocks
    from peft_basis.evaluation import count_parameters, perplexity, size_on_disk

    model, tok = load_default_model()
    calib, held = split_blocks(tok, "britannica", 512, 16, 8)
    dense_params = count_parameters(model)
    log("dense perplexity")
    dense_ppl = perplexity(model, held)
    config = SharedBasisConfig(compression_ratio=args.ratio, group_size=args.group_size)
    log("calibrating")
    calibrate(model, config, [calib[i : i + 4] for i in range(0, 16, 4)], progress=False)
    peft_model = get_peft_model(model, config)
    compressed_params = count_parameters(peft_model)
    removed = dense_params - compressed_params
    log("adapter perplexity")
    adapter_ppl = perplexity(peft_model, held)
    with torch.no_grad():
        adapter_logits = peft_model(held[:1]).logits

    result = {"model": "SmolLM2-135M-Instruct", "method": "Basis Sharing", "compression_ratio": args.ratio,
              "group_size": args.group_size, "peft_basis_version": peft_basis.__version__,
              "torch": torch.__version__, "dense_parameters": dense_params,
              "compressed_parameters": compressed_params, "removed_parameters": removed,
              "dense_perplexity": dense_ppl, "adapter_perplexity": adapter_ppl, "rows": []}
    with tempfile.TemporaryDirectory() as tmp:
        dense_bytes = {"float32": weights_bytes(default_model_path())}
        result["dense_perplexity_by_dtype"] = {"float32": dense_ppl}
        for half in (torch.bfloat16, torch.float16):  # the dense model in that dtype: what the dtype alone costs
            name = str(half).removeprefix("torch.")
            dense_half = load_default_model(dtype=half)[0]
            dense_half.save_pretrained(os.path.join(tmp, f"dense-{name}"))
            dense_bytes[name] = weights_bytes(os.path.join(tmp, f"dense-{name}"))
            log(f"dense perplexity {name}")
            result["dense_perplexity_by_dtype"][name] = perplexity(dense_half, held)
            del dense_half
        peft_model.save_pretrained(os.path.join(tmp, "adapter"))
        result["adapter_bytes"] = size_on_disk(os.path.join(tmp, "adapter", "adapter_model.safetensors"))
        result["dense_bytes"] = dense_bytes
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            for factors in ("float", "int8"):
                name = str(dtype).removeprefix("torch.")
                folder = os.path.join(tmp, f"{name}-{factors}")
                log(f"save_compressed {name} {factors}")
                t = time.perf_counter()
                save_compressed(peft_model, folder, dtype=dtype, factors=factors, tokenizer=tok)
                save_s = time.perf_counter() - t
                t = time.perf_counter()
                loaded = CompressedModel.from_pretrained(folder)
                load_s = time.perf_counter() - t
                log(f"perplexity {name} {factors}")
                ppl = perplexity(loaded, held)
                with torch.no_grad():
                    diff = float((loaded(held[:1]).logits.float() - adapter_logits).abs().max())
                size = weights_bytes(folder)
                expected = dense_bytes[name] - removed * dtype.itemsize
                result["rows"].append({
                    "dtype": name, "factors": factors, "weights_bytes": size, "folder_bytes": size_on_disk(folder),
                    "expected_bytes": expected, "deviation_from_expected": size / expected - 1,
                    "fraction_of_dense_fp32": size / dense_bytes["float32"], "perplexity": ppl,
                    "max_logit_difference_vs_adapter": diff, "parameters": count_parameters(loaded),
                    "save_seconds": save_s, "load_seconds": load_s,
                })
                log(json.dumps(result["rows"][-1]))
                del loaded
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out + ".json", "w") as f:
        json.dump(result, f, indent=2)
    with open(args.out + ".md", "w") as f:
        f.write(markdown(result))
    log(f"wrote {args.out}.json and .md")


def markdown(r: dict) -> str:
    d = r["dense_bytes"]
    lines = [
        "# Standalone compressed checkpoints (`benchmarks/standalone.py`)", "",
        f"{r['model']}, {r['method']} {r['compression_ratio']:.0%} removed, group_size={r['group_size']}; "
        "calibrated on 16 x 512 Britannica tokens, perplexity on 8 held-apart blocks of 512. "
        f"peft-basis {r['peft_basis_version']}, torch {r['torch']}, CPU.", "",
        f"Parameters: dense {r['dense_parameters']:,}, compressed {r['compressed_parameters']:,} "
        f"({r['removed_parameters']:,} removed). Dense perplexity {r['dense_perplexity']:.2f}, the PEFT adapter "
        f"model's {r['adapter_perplexity']:.2f}.", "",
        "| artifact | weights on disk | x dense fp32 | expected (dense - removed) | deviation | perplexity | "
        "max logit diff vs adapter model | save / load s |",
        "|---|---|---|---|---|---|---|---|",
        f"| dense checkpoint, float32 | {d['float32'] / MB:.1f} MB | 1.00 | | | {r['dense_perplexity']:.2f} | | |",
        *(f"| dense checkpoint, {name} | {d[name] / MB:.1f} MB | {d[name] / d['float32']:.2f} | | | "
          f"{r.get('dense_perplexity_by_dtype', {}).get(name, float('nan')):.2f} | | |" for name in ("bfloat16", "float16") if name in d),
        f"| PEFT adapter (float32), needs the dense base too | {r['adapter_bytes'] / MB:.1f} MB "
        f"(+ {d['float32'] / MB:.1f} = {(r['adapter_bytes'] + d['float32']) / MB:.1f}) | "
        f"{(r['adapter_bytes'] + d['float32']) / d['float32']:.2f} | | | {r['adapter_perplexity']:.2f} | 0 | |",
    ]
    for row in r["rows"]:
        lines.append(
            f"| standalone, {row['dtype']}, {row['factors']} factors | {row['weights_bytes'] / MB:.1f} MB | "
            f"{row['fraction_of_dense_fp32']:.2f} | "
            + (f"{row['expected_bytes'] / MB:.1f} MB | {row['deviation_from_expected']:+.2%}" if row["factors"] == "float"
               else "| ")
            + f" | {row['perplexity']:.2f} | {row['max_logit_difference_vs_adapter']:.3g} | "
            f"{row['save_seconds']:.1f} / {row['load_seconds']:.1f} |"
        )
    lines += ["", "int8 rows: only the factors are int8 (one float32 scale per output row); embeddings, norms and "
              "untargeted tensors stay in the row's dtype, so 'expected' does not apply. Seconds: 2 threads on a "
              "2-core machine shared with other work (noisy).", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
