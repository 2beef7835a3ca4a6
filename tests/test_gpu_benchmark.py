"""The GPU check (benchmarks/gpu.py) runs end to end on the CPU, so that the short device runs it is made for
find a script that works: every part completes, the counts are exact, the report is written."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "gpu.py")


def _run(*argv, check=True):
    return subprocess.run([sys.executable, SCRIPT, *argv], capture_output=True, text=True, check=check, cwd=ROOT,
                          timeout=600)


def test_the_gpu_check_runs_every_part_on_the_cpu(tmp_path):
    _run("--device", "cpu", "--presets", "tiny", "--repeats", "2", "--new-tokens", "4", "--calib-blocks", "4",
         "--dtypes", "float32", "--compress-dtype", "float32", "--out", str(tmp_path))
    results = json.loads((tmp_path / "gpu.json").read_text())
    tiny = results["tiny"]

    def errors(d, path=""):
        for k, v in d.items():
            if isinstance(v, dict):
                if "error" in v:
                    yield f"{path}{k}: {v['error']}"
                yield from errors(v, f"{path}{k}/")

    assert list(errors(results)) == []
    c = tiny["compress"]
    # tiny: hidden 64, intermediate 128, 2 layers, kv 32 (head_dim 16 x 2), vocab 512, tied head. Uniform ranks at
    # 20% removed: the stored fraction of the targeted parameters is 0.8 up to each module's rounding of its rank.
    assert c["parameters"]["dense"] == 512 * 64 + 2 * (64 * 64 * 2 + 32 * 64 * 2 + 3 * 64 * 128 + 2 * 64) + 64
    removed = c["parameters"]["dense"] - c["parameters"]["compressed"]
    targeted = 2 * (64 * 64 * 2 + 32 * 64 * 2 + 3 * 64 * 128)
    assert abs(removed / targeted - 0.2) < 0.02
    # the standalone checkpoint holds the compressed parameters once, in float32 (plus the safetensors header)
    assert 0 <= c["checkpoint_bytes"] - 4 * c["parameters"]["compressed"] < 0.02 * c["checkpoint_bytes"]
    assert c["calibrate_seconds"] > 0 and c["forward_seconds"] > 0 and c["calibrate_peak_over_model"] >= 1
    speed = tiny["speed_float32"]
    for part in ("forward_8x256", "forward_32x512", "decode_eager", "decode_graphs"):
        assert set(speed[part]["median"]) == {"dense", "compressed"}
        assert all(len(s) == 2 and min(s) > 0 for s in speed[part]["samples"].values())
    multiples = tiny["rank_multiple"]["forward_8x256"]["median"]
    assert set(multiples) == {"multiple_1", "multiple_32", "multiple_64", "multiple_128"}
    report = (tmp_path / "gpu.md").read_text()
    assert "| tiny | 106,816 -> " in report and "| tiny | float32 | " in report and "failed" not in report


def test_the_gpu_check_says_what_to_do_without_a_gpu_or_with_an_unknown_preset(tmp_path):
    bad = _run("--device", "cpu", "--presets", "tiny,llama-70b", "--out", str(tmp_path), check=False)
    assert bad.returncode == 2 and "unknown ['llama-70b']" in bad.stderr and "smollm2-135m" in bad.stderr
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    none = _run("--presets", "tiny", "--out", str(tmp_path), check=False)
    assert none.returncode == 1 and "No CUDA device" in none.stderr and "--device cpu" in none.stderr
    assert not (tmp_path / "gpu.json").exists()
