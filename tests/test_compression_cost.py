"""What makes calibrate + compress cheaper keeps its results: the decompositions side by side in threads
(``map_decompositions``) give the factors of the sequential run, in order, with errors raised and the thread
count restored; the one-reduction finiteness check of a Gram still catches every NaN and inf."""

import threading

import pytest
import torch
from peft import get_peft_model

import peft_basis  # noqa: F401
from peft_basis import SharedBasisConfig, calibrate
from peft_basis.errors import CalibrationError
from peft_basis.linalg import check_finite_gram
from peft_basis.parallel import decomposition_workers, map_decompositions

from .models import fresh_copy, tiny_gpt2, tiny_llama, token_batches


def test_map_decompositions_keeps_order_and_runs_side_by_side(monkeypatch):
    monkeypatch.setenv("PEFT_BASIS_DECOMPOSITION_WORKERS", "3")
    assert decomposition_workers() == 3
    threads_before = torch.get_num_threads()
    seen = []

    def work(i):
        seen.append((threading.current_thread().name, torch.get_num_threads()))
        return i * i

    assert list(map_decompositions(work, iter(range(20)))) == [i * i for i in range(20)]
    assert all(name.startswith("peft-basis-decomposition") and n == 1 for name, n in seen)  # single-threaded
    assert torch.get_num_threads() == threads_before


def test_map_decompositions_reads_items_in_the_calling_thread_a_few_ahead(monkeypatch):
    monkeypatch.setenv("PEFT_BASIS_DECOMPOSITION_WORKERS", "2")
    caller, read = threading.current_thread(), []

    def items():
        for i in range(10):
            assert threading.current_thread() is caller
            read.append(i)
            yield i

    for i, result in enumerate(map_decompositions(lambda x: x, items())):
        assert result == i and len(read) <= i + 1 + 2 * 2  # never more than 2 * workers ahead


def test_map_decompositions_raises_the_first_error_and_restores_threads(monkeypatch):
    monkeypatch.setenv("PEFT_BASIS_DECOMPOSITION_WORKERS", "2")
    before = torch.get_num_threads()

    def work(i):
        if i == 3:
            raise CalibrationError("broken Gram 3")
        return i

    out = []
    with pytest.raises(CalibrationError, match="broken Gram 3"):
        for r in map_decompositions(work, range(8)):
            out.append(r)
    assert out == [0, 1, 2] and torch.get_num_threads() == before


def test_one_worker_is_the_plain_loop(monkeypatch):
    monkeypatch.setenv("PEFT_BASIS_DECOMPOSITION_WORKERS", "1")
    names = []
    assert list(map_decompositions(lambda i: names.append(threading.current_thread().name) or i, range(3))) == [0, 1, 2]
    assert set(names) == {threading.current_thread().name}


@pytest.mark.parametrize("build,allocation", [(tiny_llama, "uniform"), (tiny_gpt2, "global")], ids=["llama", "gpt2"])
def test_factors_from_parallel_decompositions_equal_the_sequential_ones(build, allocation, monkeypatch):
    base = build(2, seed=0)
    config = SharedBasisConfig(compression_ratio=0.3, group_size=1, rank_allocation=allocation)
    stats = calibrate(base, config, token_batches(2), progress=False)
    states = {}
    for workers in ("1", "3"):
        monkeypatch.setenv("PEFT_BASIS_DECOMPOSITION_WORKERS", workers)
        cfg = SharedBasisConfig(compression_ratio=0.3, group_size=1, rank_allocation=allocation)
        calibrate(fresh_copy(base), cfg, statistics=stats, progress=False)
        model = get_peft_model(fresh_copy(base), cfg)
        states[workers] = ({k: v for k, v in model.state_dict().items() if "sb_" in k}, cfg.rank_pattern,
                           model.base_model.compression_report)
    (a, ranks_a, report_a), (b, ranks_b, report_b) = states["1"], states["3"]
    assert ranks_a == ranks_b and report_a == report_b
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_finiteness_check_catches_every_non_finite_entry(bad, dtype):
    g = torch.eye(6, dtype=dtype)
    g[2, 4] = bad
    with pytest.raises(CalibrationError, match="NaN or Inf"):
        check_finite_gram(g, "layer.q_proj")


def test_finiteness_check_accepts_finite_grams_whose_sum_overflows():
    check_finite_gram(torch.full((8, 8), 3e38))  # finite entries; only their float32 sum is inf


@pytest.mark.parametrize("rank_allocation", ["uniform", "global"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_layers_hold_the_factors_the_workers_made(monkeypatch, rank_allocation, dtype):
    # glibc keeps a heap per thread: a copy of the factors made in the main thread (a cast, a truncation,
    # aligned rows) grows its heap while the originals' memory stays with the worker's, which was the last
    # fifth of the compress peak on SmolLM2. The layers must hold the workers' own storage, in the right layout.
    import peft_basis.tuners.shared_basis.model as shared_basis_model

    monkeypatch.setenv("PEFT_BASIS_DECOMPOSITION_WORKERS", "2")
    made, lay_out = {}, shared_basis_model.in_layer_layout

    def recorded(f, dtype):
        out = lay_out(f, dtype)
        assert threading.current_thread().name.startswith("peft-basis-decomposition")
        made.update({c.untyped_storage().data_ptr(): threading.current_thread().name for c in out.coefficients})
        made.update({out.basis.untyped_storage().data_ptr(): threading.current_thread().name})
        return out

    monkeypatch.setattr(shared_basis_model, "in_layer_layout", recorded)
    model = tiny_llama(2).to(dtype)
    config = SharedBasisConfig(compression_ratio=0.3, group_size=1, rank_allocation=rank_allocation)
    calibrate(model, config, token_batches(4), progress=False)
    peft_model = get_peft_model(model, config)
    layers = [m for m in peft_model.modules() if hasattr(m, "sb_coefficient")]
    assert len(layers) + len(config.dense_modules) == 2 * 7 and layers  # (global: a few may stay dense)
    for layer in layers:
        coefficient, basis = layer.sb_coefficient["default"], layer.basis("default")
        assert coefficient.dtype == basis.dtype == dtype
        assert coefficient.untyped_storage().data_ptr() in made and basis.untyped_storage().data_ptr() in made
        assert (coefficient.stride(0) * coefficient.element_size()) % 64 == 0  # rows on cache lines
        assert coefficient.shape[1] == basis.shape[0] == layer.sb_rank["default"]
