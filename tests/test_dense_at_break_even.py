"""SharedBasisConfig(dense_at_break_even=True): a module allocated the rank at which factors stop saving parameters
keeps its dense weight; the budget still holds, and every way of saving and loading keeps it dense."""

import pytest
import torch
from peft import PeftModel, get_peft_model
from torch import nn

import peft_basis
from peft_basis import CompressedModel, SharedBasisConfig, load_lean, save_compressed
from peft_basis.budget import max_profitable_rank
from peft_basis.evaluation import count_parameters
from peft_basis.tuners.shared_basis.grouping import DENSE, Group, allocate_ranks, scored_rank

from .models import fresh_copy, tiny_llama, token_batches


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_allocation_keeps_a_module_at_break_even_dense_within_the_budget():
    groups = [Group(f"m{i}", [f"layers.{i}.mlp"], 64, 64) for i in range(4)]
    cap = max_profitable_rank(64, 64)
    flat = 1e-3 / torch.arange(1, 65, dtype=torch.float64)  # decaying: the rest of the budget spreads over them
    strong = torch.linspace(10, 9, 64, dtype=torch.float64)  # every direction worth more than any of the others'
    spectra = {"m0": strong, "m1": flat, "m2": flat, "m3": flat}
    config = SharedBasisConfig(compression_ratio=0.3, group_size=1, rank_allocation="global")
    ranks = allocate_ranks(groups, config, lambda g: spectra[g.key])
    assert ranks[0] == DENSE and all(0 < r < cap for r in ranks[1:]), ranks
    budget = int(0.7 * sum(g.dense_params for g in groups))
    spent = groups[0].dense_params + sum(r * g.cost for r, g in zip(ranks[1:], groups[1:]))
    assert spent <= budget and budget - spent < groups[1].cost  # exact within one rank step, dense weight counted
    off = SharedBasisConfig(compression_ratio=0.3, group_size=1, rank_allocation="global", dense_at_break_even=False)
    assert allocate_ranks(groups, off, lambda g: spectra[g.key])[0] == 64  # full rank, as factors: no saving
    assert scored_rank(groups[0]) == cap


@pytest.mark.parametrize("inputs", ["dense", "anchored"])
def test_modules_kept_dense_save_and_load_as_dense(inputs, tmp_path):
    base = tiny_llama(layers=2)
    data, ids = token_batches(4), token_batches(1, seed=5)[0]
    config = SharedBasisConfig(compression_ratio=0.3, group_size=1, inputs=inputs, rank_allocation="loss")
    model = fresh_copy(base)
    peft_basis.calibrate(model, config, data, progress=False)
    peft_model = get_peft_model(model, config)
    dense = config.dense_modules
    assert dense  # this tiny model puts some modules at break-even (else the test proves nothing)
    for name in dense:
        module = peft_model.base_model.model.get_submodule(name)
        assert type(module) is nn.Linear and torch.equal(module.weight, base.get_submodule(name).weight)
    report = peft_model.base_model.compression_report
    assert sorted(m for r in report if r.get("dense") for m in r["members"]) == sorted(dense)
    budget = int(0.7 * sum(r["dense_params"] for r in report))
    assert peft_model.base_model.stored_parameters() == sum(r["params"] for r in report) <= budget
    want = _logits(peft_model, ids)
    # PEFT's own save / load onto a fresh base, the lean load, and the standalone checkpoint
    peft_model.save_pretrained(str(tmp_path / "adapter"))
    reloaded = PeftModel.from_pretrained(fresh_copy(base), str(tmp_path / "adapter"))
    assert reloaded.peft_config["default"].dense_modules == dense
    assert torch.equal(_logits(reloaded, ids), want)
    base.save_pretrained(str(tmp_path / "base"))
    assert torch.equal(_logits(load_lean(str(tmp_path / "base"), str(tmp_path / "adapter")), ids), want)
    standalone = CompressedModel.from_pretrained(save_compressed(peft_model, str(tmp_path / "standalone")))
    assert torch.equal(_logits(standalone, ids), want)
    assert count_parameters(standalone) == count_parameters(peft_model)
