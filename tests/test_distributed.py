"""Distributed calibration: two CPU processes (gloo) on two halves of the data give what one process gives
on all of it, through the real engine (`calibrate`, Grams and Fisher scores) and the layer-sequential
pipeline (`compress_sequential`, and `calibrate_sequential` with its layer-by-layer Fisher)."""

import json
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file

from peft_basis.calibration import CalibrationStatistics, calibrate
from peft_basis import calibrate_sequential, compress_sequential
from peft_basis.tuners.basis import BasisConfig
from peft_basis.tuners.shared_basis import SharedBasisConfig

from .models import tiny_llama, token_batches

WORLD = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _shard(batches, rank, world):
    return batches[rank::world]  # what a DistributedSampler does: every rank a disjoint part


def _fisher_config():
    return BasisConfig(r=2, rank_allocation="fisher")


def _anchored_config(**kw):
    # a fixed anchor and no held-apart batches: each rank's own split would differ from one process's
    return SharedBasisConfig(compression_ratio=0.3, group_size=1, inputs="anchored", anchor=0.25, holdout_fraction=0.0,
                             **kw)


def _worker(rank, port, checkpoint, out):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        data = _shard(token_batches(2), rank, WORLD)
        stats = calibrate(tiny_llama(layers=2), SharedBasisConfig(), data, progress=False)
        stats.save(os.path.join(out, f"stats_rank{rank}.safetensors"))  # every rank: all-reduced, so all equal
        compress_sequential(checkpoint, SharedBasisConfig(compression_ratio=0.3), data, os.path.join(out, "seq"),
                            progress=False)
        calibrate(tiny_llama(layers=2), _fisher_config(), data, progress=False).save(
            os.path.join(out, f"fisher_rank{rank}.safetensors"))
        calibrate_sequential(checkpoint, _fisher_config(), data, progress=False,
                             save_to=os.path.join(out, f"seq_fisher_rank{rank}.safetensors"))
        # the anchored fit: its statistics all-reduce too, and refinement steps with averaged gradients
        calibrate(tiny_llama(layers=2), _anchored_config(), data, progress=False).save(
            os.path.join(out, f"anchored_rank{rank}.safetensors"))
        calibrate(tiny_llama(layers=2), _anchored_config(refine_epochs=1, refine_lr=1e-3), data, progress=False).save(
            os.path.join(out, f"refined_rank{rank}.safetensors"))
        with open(os.path.join(out, f"done_rank{rank}"), "w") as f:
            f.write(str(dist.get_world_size()))
    finally:
        dist.destroy_process_group()


def test_two_gloo_ranks_equal_one_process(tmp_path):
    checkpoint = str(tmp_path / "base")
    tiny_llama(layers=2).save_pretrained(checkpoint)
    out = tmp_path / "dist"
    out.mkdir()
    mp.spawn(_worker, args=(_free_port(), checkpoint, str(out)), nprocs=WORLD, join=True)
    assert all((out / f"done_rank{r}").read_text() == "2" for r in range(WORLD))

    single = calibrate(tiny_llama(layers=2), SharedBasisConfig(), token_batches(2), progress=False)
    ranks = [CalibrationStatistics.load(str(out / f"stats_rank{r}.safetensors")) for r in range(WORLD)]
    for stats in ranks:
        assert stats.sources == single.sources
        assert stats.tokens == single.tokens  # 2 batches x 4 x 32 tokens, summed over the ranks
        assert set(stats.tokens.values()) == {2 * 4 * 32}
        for k, g in single.grams.items():
            torch.testing.assert_close(stats.grams[k], g, atol=1e-4, rtol=1e-5)
        streamed = [k for k in single.extra if k.startswith(("output_gram/", "input_trace/"))]  # down_proj's, by default
        assert len(streamed) == 2 * 2
        for k in streamed:
            torch.testing.assert_close(stats.extra[k].double(), single.extra[k].double(), atol=1e-4, rtol=1e-5)
    assert all(torch.equal(ranks[0].grams[k], ranks[1].grams[k]) for k in single.grams)  # identical on every rank

    # the layer-by-layer compression, run on two ranks, writes the single-process adapter (rank 0 alone writes)
    compress_sequential(checkpoint, SharedBasisConfig(compression_ratio=0.3), token_batches(2), str(tmp_path / "one"),
                        progress=False)
    a = load_file(tmp_path / "one" / "adapter_model.safetensors")
    b = load_file(out / "seq" / "adapter_model.safetensors")
    assert sorted(a) == sorted(b)
    # factors are defined up to the sign of each singular pair: compare the products coefficient @ basis
    ca = json.loads((tmp_path / "one" / "adapter_config.json").read_text())
    cb = json.loads((out / "seq" / "adapter_config.json").read_text())
    assert ca["rank_pattern"] == cb["rank_pattern"] and ca["groups"] == cb["groups"]
    for group, members in ca["groups"].items():
        for m in members:
            key = f"base_model.model.{m}.sb_coefficient"
            wa = a[key] @ a[f"base_model.sb_bases.{group}"]
            wb = b[key] @ b[f"base_model.sb_bases.{group}"]
            assert (wa - wb).abs().max() <= 1e-4 * wa.abs().max()

    # the anchored fit on two ranks equals one process on all the data; refinement keeps the ranks in step
    single_anchored = calibrate(tiny_llama(layers=2), _anchored_config(), token_batches(2), progress=False)
    for r in range(WORLD):
        stats = CalibrationStatistics.load(str(out / f"anchored_rank{r}.safetensors"))
        for k, v in single_anchored.extra.items():
            if k.startswith("factors/coefficient/"):
                group = next(g for g, ms in single_anchored.meta["factors"]["groups"].items() if ms == [k[20:]])
                wa = v @ single_anchored.extra[f"factors/basis/{group}"]
                wb = stats.extra[k] @ stats.extra[f"factors/basis/{group}"]
                assert (wa - wb).abs().max() <= 1e-3 * wa.abs().max(), k
    refined = [CalibrationStatistics.load(str(out / f"refined_rank{r}.safetensors")) for r in range(WORLD)]
    assert all(torch.equal(refined[0].extra[k], refined[1].extra[k]) for k in refined[0].extra)

    # Fisher scores: sums of squared per-sequence gradients and sequence counts all-reduce, on both pipelines
    single_fisher = calibrate(tiny_llama(layers=2), _fisher_config(), token_batches(2), progress=False)
    keys = [k for k in single_fisher.extra if k.startswith("fisher")]
    assert len(keys) == 14
    for name in ("fisher", "seq_fisher"):
        for r in range(WORLD):
            stats = CalibrationStatistics.load(str(out / f"{name}_rank{r}.safetensors"))
            assert stats.meta["fisher_output_sequences"] == 8
            for k in keys:
                torch.testing.assert_close(stats.extra[k], single_fisher.extra[k], atol=1e-6, rtol=1e-4)


def test_statistics_all_reduce_is_a_no_op_without_a_process_group():
    stats = calibrate(tiny_llama(layers=2), SharedBasisConfig(), token_batches(1), progress=False)
    before = {k: v.clone() for k, v in stats.grams.items()}
    assert not dist.is_initialized()
    stats.all_reduce()
    assert all(torch.equal(before[k], stats.grams[k]) for k in before)


if not dist.is_available():  # pragma: no cover - CPU builds of torch ship gloo
    pytest.skip("torch.distributed is not available in this build", allow_module_level=True)
