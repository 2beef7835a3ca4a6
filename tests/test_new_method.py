"""A new method plugs into the pipelines through the protocol alone (tests/tiny_method: a tuner folder with
a layer handler; no pipeline code touched): its statistics come from either pipeline, its layer-by-layer
compressor runs inside `compress_sequential`, and PEFT loads what it wrote."""

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

import peft_basis
from peft_basis.linalg import factorize_group
from peft_basis.modules import linear_weight

from .models import tiny_llama, token_batches
from .tiny_method import TinyConfig


def test_a_new_method_compresses_layer_by_layer_through_its_own_handler(tmp_path):
    base = tiny_llama(layers=3)
    base.save_pretrained(tmp_path / "base", max_shard_size="60KB")
    data = token_batches(3)
    ranks = peft_basis.compress_sequential(str(tmp_path / "base"), TinyConfig(rank=8), data, str(tmp_path / "out"),
                                           progress=False)
    assert len(ranks) == 3 * 7 and set(ranks.values()) == {8}
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tmp_path / "base"), tmp_path / "out").eval()

    # reference, by hand on the model in memory: each layer's modules fitted on the inputs of the compressed
    # layers before it (the same statistics, computed by the whole-model pipeline one layer at a time)
    reference = tiny_llama(layers=3)
    for i in range(3):
        config = TinyConfig(rank=8, layers_to_transform=[i])
        stats = peft_basis.calibrate(reference, config, data, progress=False)
        for name in [n for n in stats.sources if f".{i}." in n]:
            module = reference.get_submodule(name)
            f = factorize_group([linear_weight(module)], stats.gram(name), 8, name=name)
            module.weight.data.copy_(f.coefficients[0] @ f.basis)
    ids = data[0][:2]
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, reference(ids).logits, atol=1e-4, rtol=1e-4)
        assert not torch.allclose(loaded(ids).logits, base(ids).logits, atol=1e-3)  # it did compress


def test_a_new_method_gets_the_same_statistics_from_both_pipelines():
    model = tiny_llama(layers=2)
    data = token_batches(2)
    whole = peft_basis.calibrate(model, TinyConfig(), data, progress=False)
    layered = peft_basis.calibrate(model, TinyConfig(), data, progress=False, pipeline="layer_sequential")
    assert set(whole.sources) == set(layered.sources) and len(whole.sources) == 14
    for name in whole.sources:
        torch.testing.assert_close(whole.gram(name), layered.gram(name), atol=1e-4, rtol=1e-5)
