"""The layer-sequential pipeline and lean loading, against the whole-model path on tiny checkpoints on disk."""

import json
import os

import pytest
import torch
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import peft_basis  # noqa: F401
from peft_basis.calibration import calibrate
from peft_basis import compress_sequential
from peft_basis.calibration.pipelines import LayerHandler, LayerSequentialPipeline
from peft_basis.io import SafetensorsStreamWriter, ShardedCheckpoint
from peft_basis.evaluation import count_parameters
from peft_basis.lean import load_lean
from peft_basis.tuners.shared_basis import SharedBasisConfig, SharedBasisModel

from .models import BUILDERS, tiny_llama, token_batches

IDS = torch.randint(0, 128, (2, 20), generator=torch.Generator().manual_seed(3))


def save_checkpoint(model, path, shard=True):
    # small shards: the pipeline must follow model.safetensors.index.json across files
    model.save_pretrained(path, max_shard_size="60KB" if shard else "10GB")
    return str(path)


def whole_model_adapter(model, config, data, path):
    calibrate(model, config, data, progress=False)
    peft_model = get_peft_model(model, config)
    peft_model.save_pretrained(path)
    return peft_model


def assert_same_adapter(whole_dir, seq_dir, atol=1e-4):  # float32 eigh of Grams summed in another order: 6e-5 on AVX2
    a = load_file(os.path.join(whole_dir, "adapter_model.safetensors"))
    b = load_file(os.path.join(seq_dir, "adapter_model.safetensors"))
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].shape == b[k].shape and a[k].dtype == b[k].dtype, k
        assert (a[k] - b[k]).abs().max().item() <= atol * max(1.0, a[k].abs().max().item()), k
    ja = json.loads(open(os.path.join(whole_dir, "adapter_config.json")).read())
    jb = json.loads(open(os.path.join(seq_dir, "adapter_config.json")).read())
    ja.pop("base_model_name_or_path"), jb.pop("base_model_name_or_path")
    assert ja == jb


SLOW = pytest.mark.slow


def layer_events(path, config, data):
    """What a LayerHandler is handed per layer, recorded (stats, targets, index, and whether the layer was real)."""

    class Record(LayerHandler):
        def __init__(self):
            self.items = []

        def on_layer_calibrated(self, layer):
            assert all(p.device.type != "meta" for p in layer.layer.parameters())  # onloaded while handed over
            self.items.append(layer)

        def on_end(self):
            return self.items

    pipeline = LayerSequentialPipeline(path, lambda m: SharedBasisModel.resolve_target_names(m, config), data,
                                       progress=False)
    return pipeline.run(Record())


@pytest.mark.parametrize("arch,allocation", [("llama", "uniform"), pytest.param("llama", "global", marks=SLOW),
                                             pytest.param("gpt2", "uniform", marks=SLOW),
                                             pytest.param("opt", "global", marks=SLOW),
                                             pytest.param("mistral", "uniform", marks=SLOW)])
def test_same_adapter_as_whole_model_path(arch, allocation, tmp_path):
    base = BUILDERS[arch](layers=3)
    path = save_checkpoint(base, tmp_path / "base")
    data = token_batches(3)
    # a global budget on a random tiny model lands some module a rank from break-even: which side it falls on (kept
    # dense or factorised, the budget then reallocated) turns on the Grams' rounding, which the paths do not share
    # (on the CPU the whole-model pass runs a batch a sequence at a time)
    kwargs = dict(compression_ratio=0.3, rank_allocation=allocation, dense_at_break_even=allocation == "uniform")
    whole = whole_model_adapter(base, SharedBasisConfig(**kwargs), data, tmp_path / "whole")
    report = compress_sequential(path, SharedBasisConfig(**kwargs), data, str(tmp_path / "seq"), progress=False)
    assert_same_adapter(tmp_path / "whole", tmp_path / "seq")
    assert sorted(os.listdir(tmp_path / "seq")) == ["adapter_config.json", "adapter_model.safetensors"]  # scratch gone
    # the report matches the tuner's, error for error
    ref = {r["group"]: r for r in whole.base_model.compression_report}
    assert {r["group"] for r in report} == set(ref)
    for r in report:
        assert r["rank"] == ref[r["group"]]["rank"] and r["params"] == ref[r["group"]]["params"]
        assert abs(r["relative_error"] - ref[r["group"]]["relative_error"]) < 1e-6
    # and it loads onto the base model with PEFT's own call, giving the whole path's logits
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(path), tmp_path / "seq").eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(IDS).logits, whole(IDS).logits, atol=1e-5, rtol=1e-5)


def test_layer_grams_equal_whole_model_grams_and_qkv_share_one(tmp_path):
    base = tiny_llama(layers=3)
    path = save_checkpoint(base, tmp_path / "base")
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(0, 128, (2, 16), generator=g)
    mask = torch.ones_like(ids)
    mask[0, 11:] = 0  # right padding: padded tokens must not enter the Grams
    data = [{"input_ids": ids, "attention_mask": mask}, {"input_ids": ids.flip(0), "attention_mask": mask.flip(0)}]
    config = SharedBasisConfig(output_grams=False)  # input Grams everywhere, as the layer pipeline streams
    whole = calibrate(base, config, data, progress=False)
    seen_layers = []
    for item in layer_events(path, SharedBasisConfig(), data):
        seen_layers.append(item.index)  # (layer_events checks the handed layer was real, the others meta)
        s = item.stats
        q, k, v = (f"model.layers.{item.index}.self_attn.{n}_proj" for n in "qkv")
        assert s.sources[k] == s.sources[q] == s.sources[v] == q  # q/k/v read one tensor: one Gram
        up = f"model.layers.{item.index}.mlp.up_proj"
        assert s.sources[up] == f"model.layers.{item.index}.mlp.gate_proj"
        for name in item.targets:
            assert s.num_tokens(name) == whole.num_tokens(name) == 2 * (11 + 16)  # real tokens only
            torch.testing.assert_close(s.gram(name), whole.gram(name), atol=1e-4, rtol=1e-5)
    assert seen_layers == [0, 1, 2]


def test_only_the_current_layer_is_materialised(tmp_path):
    path = save_checkpoint(tiny_llama(layers=4), tmp_path / "base")

    class Check(LayerHandler):
        def on_start(self, run):
            self.model, self.seen = run.model, []

        def on_layer_calibrated(self, layer):
            model = self.model
            real = {i for i, lay in enumerate(model.model.layers) if any(p.device.type != "meta" for p in lay.parameters())}
            assert real == {layer.index}
            assert model.model.embed_tokens.weight.device.type == "meta"  # embeddings freed after the first pass
            self.seen.append(layer.index)

        def on_end(self):
            return self.model, self.seen

    config = SharedBasisConfig()
    pipeline = LayerSequentialPipeline(path, lambda m: SharedBasisModel.resolve_target_names(m, config),
                                       token_batches(1), progress=False)
    model, seen = pipeline.run(Check())
    assert seen == [0, 1, 2, 3]
    assert all(p.device.type == "meta" for p in model.parameters())


def test_the_sweep_ends_with_the_last_targeted_layer(tmp_path):
    """Layers past the last target are never read or run, unless a handler asks for them or needs the loss; the
    adapter and the Fisher scores equal the whole-model path's."""
    from peft_basis.calibration import calibrate_sequential
    from peft_basis.tuners.basis import BasisConfig

    base = tiny_llama(layers=4)
    path = save_checkpoint(base, tmp_path / "base")
    data = token_batches(2)
    config = SharedBasisConfig(compression_ratio=0.3, layers_to_transform=[0, 1])

    def sweep(**attrs):
        class Record(LayerHandler):
            def on_start(self, run):
                self.seen = []

            def on_layer_calibrated(self, layer):
                self.seen.append(layer.index)

            def on_end(self):
                return self.seen

        for k, v in attrs.items():
            setattr(Record, k, v)
        pipeline = LayerSequentialPipeline(path, lambda m: SharedBasisModel.resolve_target_names(m, config), data,
                                           progress=False)
        onloaded, onload = [], pipeline.source.onload_layer
        pipeline.source.onload_layer = lambda layer, prefix: (onloaded.append(prefix), onload(layer, prefix))
        return pipeline.run(Record()), onloaded

    assert sweep() == ([0, 1], ["model.layers.0.", "model.layers.1."])
    assert sweep(needs_all_layers=True)[0] == [0, 1, 2, 3]
    # the same adapter as the whole-model path
    whole_model_adapter(base, SharedBasisConfig(compression_ratio=0.3, layers_to_transform=[0, 1]), data,
                        tmp_path / "whole")
    compress_sequential(path, SharedBasisConfig(compression_ratio=0.3, layers_to_transform=[0, 1]), data,
                        str(tmp_path / "seq"), progress=False)
    assert_same_adapter(tmp_path / "whole", tmp_path / "seq")
    # the Fisher scores need the loss: every layer runs, and the scores equal the whole-model ones
    fisher = dict(r=2, rank_allocation="fisher", layers_to_transform=[0])
    ws = calibrate(AutoModelForCausalLM.from_pretrained(path), BasisConfig(**fisher), data, progress=False)
    ss = calibrate_sequential(path, BasisConfig(**fisher), data, progress=False)
    keys = sorted(k for k in ws.extra if k.startswith("fisher"))
    assert keys and keys == sorted(k for k in ss.extra if k.startswith("fisher"))
    for k in keys:
        assert ws.extra[k].abs().max() > 0
        torch.testing.assert_close(ss.extra[k], ws.extra[k], rtol=1e-4, atol=1e-7)


def test_unsupported_settings_fail_with_the_fix(tmp_path):
    path = save_checkpoint(tiny_llama(layers=2), tmp_path / "base", shard=False)
    with pytest.raises(ValueError, match="group_size='auto'.*integer group_size"):
        compress_sequential(path, SharedBasisConfig(group_size="auto"), token_batches(1), str(tmp_path / "o"))
    from peft import LoraConfig

    with pytest.raises(TypeError, match="not a peft-basis method"):
        compress_sequential(path, LoraConfig(), token_batches(1), str(tmp_path / "o"))
    with pytest.raises(FileNotFoundError, match="safetensors"):
        ShardedCheckpoint(str(tmp_path))
    with pytest.raises(Exception, match="no batches"):
        compress_sequential(path, SharedBasisConfig(), [], str(tmp_path / "o"), progress=False)


def test_stream_writer_round_trip_and_order(tmp_path):
    specs = {"b": ((3, 2), torch.float32), "a": ((4,), torch.bfloat16), "c": ((2, 2), torch.float16)}
    values = {"b": torch.randn(3, 2), "a": torch.randn(4).to(torch.bfloat16), "c": torch.randn(2, 2).half()}
    w = SafetensorsStreamWriter(str(tmp_path / "x.safetensors"), specs, {"format": "pt"})
    for k in specs:
        w.write(k, values[k])
    w.close()
    loaded = load_file(tmp_path / "x.safetensors")
    assert all(torch.equal(loaded[k], values[k]) for k in values)
    w = SafetensorsStreamWriter(str(tmp_path / "y.safetensors"), specs)
    with pytest.raises(RuntimeError, match="declaration order"):
        w.write("a", values["a"])
    w.abort()
    assert not (tmp_path / "y.safetensors").exists() and not [f for f in os.listdir(tmp_path) if f.startswith(".tmp")]


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_lean_loading_never_reads_replaced_weights(arch, tmp_path, monkeypatch):
    base = BUILDERS[arch](layers=3)
    path = save_checkpoint(base, tmp_path / "base")
    compress_sequential(path, SharedBasisConfig(compression_ratio=0.3), token_batches(2), str(tmp_path / "seq"),
                        progress=False)
    dense = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(path), tmp_path / "seq").eval()
    read = []
    original = ShardedCheckpoint.get

    def spy(self, key, dtype=None):
        read.append(key)
        return original(self, key, dtype)

    monkeypatch.setattr(ShardedCheckpoint, "get", spy)
    monkeypatch.setattr("peft_basis.lean.CHUNK_BYTES", 1)  # one adapter tensor per chunk: the chunked path
    lean = load_lean(path, str(tmp_path / "seq"))
    assert not any(p.requires_grad for p in lean.parameters())  # inference, as PeftModel.from_pretrained
    replaced = {f"{m}.weight" for ms in lean.peft_config["default"].groups.values() for m in ms}
    assert replaced and not replaced & set(read)
    with torch.no_grad():
        assert torch.equal(lean(IDS).logits, dense(IDS).logits)
    assert count_parameters(lean) == count_parameters(dense)
    assert not [n for n, p in lean.named_parameters() if p.device.type == "meta"]
    assert sum(p.numel() * p.element_size() for p in lean.parameters()) < sum(
        p.numel() * p.element_size() for p in base.parameters())


def test_calibrate_sequential_attaches_the_whole_model_statistics(tmp_path):
    from peft_basis.calibration import CalibrationStatistics
    from peft_basis.calibration import calibrate_sequential

    base = tiny_llama(layers=2)
    path = save_checkpoint(base, tmp_path / "base")
    data = token_batches(2)
    whole = calibrate(base, SharedBasisConfig(), data, progress=False)
    config = SharedBasisConfig()
    stats = calibrate_sequential(path, config, data, progress=False, save_to=str(tmp_path / "stats.safetensors"))
    assert config.calibration_statistics is stats
    assert stats.sources == whole.sources and stats.tokens == whole.tokens
    for k, g in whole.grams.items():
        torch.testing.assert_close(stats.grams[k], g, atol=1e-4, rtol=1e-5)
    reloaded = CalibrationStatistics.load(str(tmp_path / "stats.safetensors"))
    assert all(torch.equal(reloaded.grams[k], stats.grams[k]) for k in stats.grams)
    # the statistics drive get_peft_model exactly as calibrate's do
    a = get_peft_model(tiny_llama(layers=2), config)
    config2 = SharedBasisConfig()
    calibrate(tiny_llama(layers=2), config2, data, progress=False)
    b = get_peft_model(tiny_llama(layers=2), config2)
    assert config.rank_pattern == config2.rank_pattern
    with torch.no_grad():
        torch.testing.assert_close(a(IDS).logits, b(IDS).logits, atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_sequential_on_cuda_matches_the_cpu_whole_model_path(tmp_path):
    base = tiny_llama(layers=3)
    path = save_checkpoint(base, tmp_path / "base")
    data = token_batches(3)
    whole_model_adapter(base, SharedBasisConfig(compression_ratio=0.3), data, tmp_path / "whole")
    compress_sequential(path, SharedBasisConfig(compression_ratio=0.3), data, str(tmp_path / "seq"), progress=False,
                        device="cuda")
    a = load_file(tmp_path / "whole" / "adapter_model.safetensors")
    b = load_file(tmp_path / "seq" / "adapter_model.safetensors")
    ca = json.loads((tmp_path / "whole" / "adapter_config.json").read_text())
    cb = json.loads((tmp_path / "seq" / "adapter_config.json").read_text())
    assert ca["rank_pattern"] == cb["rank_pattern"]
    for group, members in ca["groups"].items():  # GPU kernels round differently: compare the products
        for m in members:
            wa = a[f"base_model.model.{m}.sb_coefficient"] @ a[f"base_model.sb_bases.{group}"]
            wb = b[f"base_model.model.{m}.sb_coefficient"] @ b[f"base_model.sb_bases.{group}"]
            assert (wa - wb).abs().max() <= 1e-3 * wa.abs().max()


def test_calibrate_sequential_feeds_basel_whitened_init(tmp_path):
    basel = pytest.importorskip("peft_basis.tuners.basel")
    from peft_basis.calibration import calibrate_sequential

    base = tiny_llama(layers=2)
    path = save_checkpoint(base, tmp_path / "base")
    data = token_batches(2)
    whole_config = basel.BaselConfig(init="whitened")
    calibrate(base, whole_config, data, progress=False)
    whole = get_peft_model(base, whole_config)
    seq_config = basel.BaselConfig(init="whitened")
    calibrate_sequential(path, seq_config, data, progress=False)
    seq = get_peft_model(tiny_llama(layers=2), seq_config)
    with torch.no_grad():
        torch.testing.assert_close(seq(IDS).logits, whole(IDS).logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ["llama", pytest.param("gpt2", marks=SLOW)])
def test_compressed_inputs_calibrate_each_layer_on_the_compressed_layers_before_it(arch, tmp_path):
    """inputs='compressed': layer 0's factors are the whole-model ones (same inputs); layer 1's equal those
    of the whole-model path run on a model whose layer 0 was already replaced by its factors."""
    base = BUILDERS[arch](layers=2)
    path = save_checkpoint(base, tmp_path / "base")
    data = token_batches(3)
    cfg = dict(compression_ratio=0.3, group_size=1)
    report = compress_sequential(path, SharedBasisConfig(**cfg), data, str(tmp_path / "seq"), progress=False,
                                 inputs="compressed")
    seq = load_file(str(tmp_path / "seq" / "adapter_model.safetensors"))

    # reference: the dense model with layer 0 replaced by the sequential factors, compressed whole-model
    dense = AutoModelForCausalLM.from_pretrained(path)
    half = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(path), str(tmp_path / "seq")).merge_and_unload()
    half_state = half.state_dict()
    layer1 = {k for k in half_state if ".1." in k}
    half.load_state_dict({**half_state, **{k: v for k, v in dense.state_dict().items() if k in layer1}})
    whole_model_adapter(dense, SharedBasisConfig(**cfg, layers_to_transform=[0]), data, tmp_path / "ref0")
    whole_model_adapter(half, SharedBasisConfig(**cfg, layers_to_transform=[1]), data, tmp_path / "ref1")
    ref = {**load_file(str(tmp_path / "ref0" / "adapter_model.safetensors")),
           **load_file(str(tmp_path / "ref1" / "adapter_model.safetensors"))}
    assert sorted(seq) == sorted(ref)
    for k in seq:
        # the whole-model path may top a group up by one rank (uniform's leftover); the leading directions agree
        r = ref[k][: seq[k].shape[0]] if "sb_bases" in k else ref[k][:, : seq[k].shape[1]]
        assert seq[k].shape == r.shape, k
        assert (seq[k] - r).abs().max().item() <= 1e-4 * max(1.0, r.abs().max().item()), k
    # the ranks are each module's own ratio's rank; the adapter loads with PEFT's own call
    assert all(r["params"] <= (1 - 0.3) * r["dense_params"] for r in report)
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(path), str(tmp_path / "seq"))
    assert loaded.base_model.stored_parameters() == sum(r["params"] for r in report)


def test_compressed_inputs_refuse_what_needs_later_layers(tmp_path):
    path = save_checkpoint(tiny_llama(layers=2), tmp_path / "base", shard=False)
    with pytest.raises(ValueError, match="group_size=1"):
        compress_sequential(path, SharedBasisConfig(group_size=2), token_batches(1), str(tmp_path / "o"),
                            inputs="compressed", progress=False)
    with pytest.raises(ValueError, match="rank_allocation='uniform'"):
        compress_sequential(path, SharedBasisConfig(group_size=1, rank_allocation="global"), token_batches(1),
                            str(tmp_path / "o"), inputs="compressed", progress=False)


@pytest.mark.parametrize("arch,trainable,activations", [("llama", "output", "disk"), ("gpt2", "core", "memory"),
                                                        pytest.param("opt", "input", "disk", marks=SLOW)])
def test_layer_by_layer_fisher_equals_the_whole_model_fisher(tmp_path, arch, trainable, activations):
    from peft_basis.calibration import calibrate_sequential
    from peft_basis.tuners.basis import BasisConfig, basis_allocation

    base = BUILDERS[arch](layers=3)
    path = save_checkpoint(base, tmp_path / "ckpt")
    data = token_batches(3, batch=2, seq=16)
    # padding in one batch, and labels with a masked prompt in another
    data[0] = {"input_ids": data[0], "attention_mask": torch.ones_like(data[0]).index_fill_(1, torch.tensor([14, 15]), 0)}
    labels = data[1].clone()
    labels[:, :5] = -100
    data[1] = {"input_ids": data[1], "labels": labels}
    whole = BasisConfig(r=2, rank_allocation="fisher", trainable=trainable)
    ws = calibrate(AutoModelForCausalLM.from_pretrained(path), whole, data, progress=False)
    seq = BasisConfig(r=2, rank_allocation="fisher", trainable=trainable)
    ss = calibrate_sequential(path, seq, data, progress=False, activations=activations,
                              scratch_dir=str(tmp_path / "scratch"))
    keys = sorted(k for k in ws.extra if k.startswith("fisher"))
    assert keys and keys == sorted(k for k in ss.extra if k.startswith("fisher"))
    for k in keys:
        assert ws.extra[k].abs().max() > 0
        torch.testing.assert_close(ss.extra[k], ws.extra[k], rtol=1e-4, atol=1e-7)
    assert {k: v for k, v in ss.meta.items() if k != "pipeline"} == ws.meta
    if activations == "disk":
        assert os.listdir(tmp_path / "scratch") == []  # the stored activations are removed
    model = AutoModelForCausalLM.from_pretrained(path)
    assert basis_allocation(model, seq).ranks == basis_allocation(model, whole).ranks


def test_layer_by_layer_fisher_errors(tmp_path):
    from peft_basis.calibration import calibrate_sequential
    from peft_basis.errors import CalibrationError
    from peft_basis.tuners.basis import BasisConfig

    path = save_checkpoint(tiny_llama(layers=2), tmp_path / "ckpt")
    ids = token_batches(1)[0]
    with pytest.raises(CalibrationError, match="every label"):
        calibrate_sequential(path, BasisConfig(r=2, rank_allocation="fisher"),
                             [{"input_ids": ids, "labels": torch.full_like(ids, -100)}], progress=False)
    with pytest.raises(ValueError, match="activations must be one of"):
        calibrate_sequential(path, BasisConfig(r=2, rank_allocation="fisher"), [ids], progress=False,
                             activations="gpu")


@pytest.mark.parametrize("consolidated", [False, True], ids=["training-phase", "consolidated"])
def test_lean_loading_of_basel_never_reads_replaced_weights(consolidated, tmp_path, monkeypatch):
    from peft_basis.tuners.basel import BaselConfig

    base = tiny_llama(layers=2)
    path = save_checkpoint(base, tmp_path / "base")
    config = BaselConfig(init="whitened", keep_ratio=0.6)
    calibrate(base, config, token_batches(2), progress=False)
    pm = get_peft_model(AutoModelForCausalLM.from_pretrained(path), config)
    torch.manual_seed(0)
    for p in pm.parameters():  # move away from the initialisation, as training would
        if p.requires_grad:
            p.data.add_(0.01 * torch.randn_like(p))
    if consolidated:
        budget = int(0.6 * pm.base_model.dense_parameters())
        pm.base_model.prune_to(budget)
        pm.base_model.consolidate()
    pm.save_pretrained(tmp_path / "basel")
    dense = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(path), tmp_path / "basel").eval()
    read = []
    original = ShardedCheckpoint.get
    monkeypatch.setattr(ShardedCheckpoint, "get", lambda self, key, dtype=None: read.append(key) or original(self, key, dtype))
    lean = load_lean(path, str(tmp_path / "basel"))
    replaced = {f"{m}.weight" for m in lean.peft_config["default"].rank_pattern}
    assert len(replaced) == 14 and not replaced & set(read)
    with torch.no_grad():
        assert torch.equal(lean(IDS).logits, dense(IDS).logits)
    assert count_parameters(lean) == count_parameters(dense)


def test_lean_loading_refuses_an_adapter_that_replaces_nothing(tmp_path):
    from peft_basis.tuners.basis import BasisConfig

    base = tiny_llama(layers=2)
    path = save_checkpoint(base, tmp_path / "base")
    with pytest.warns(UserWarning):
        get_peft_model(base, BasisConfig(r=2)).save_pretrained(tmp_path / "basis")
    with pytest.raises(ValueError, match="replaces no dense weight.*PeftModel.from_pretrained"):
        load_lean(path, str(tmp_path / "basis"))


@pytest.mark.parametrize("allocation", ["eigen", "fisher"])
def test_basis_statistics_without_grams_build_the_whole_model_adapter(allocation, tmp_path):
    """keep_grams=False: each layer's Grams become BASIS's directions while the layer is loaded; the adapter
    built from them equals the one built from calibrate's Grams, and a config needing more directions is told."""
    from peft_basis.calibration import calibrate_sequential
    from peft_basis.errors import CalibrationError
    from peft_basis.tuners.basis import BasisConfig

    base = tiny_llama(layers=2)
    path = save_checkpoint(base, tmp_path / "ckpt")
    data = token_batches(2)
    whole = BasisConfig(r=3, rank_allocation=allocation)
    calibrate(AutoModelForCausalLM.from_pretrained(path), whole, data, progress=False)
    seq = BasisConfig(r=3, rank_allocation=allocation)
    stats = calibrate_sequential(path, seq, data, progress=False, keep_grams=False,
                                 save_to=str(tmp_path / "bases.safetensors"))
    assert not stats.grams and len([k for k in stats.extra if k.startswith("basis_R/")]) == 14
    a = get_peft_model(AutoModelForCausalLM.from_pretrained(path), whole)
    b = get_peft_model(AutoModelForCausalLM.from_pretrained(path), seq)
    assert whole.rank_pattern == seq.rank_pattern
    sa, sb = a.state_dict(), b.state_dict()
    assert sorted(sa) == sorted(sb)
    for k in sa:
        torch.testing.assert_close(sb[k], sa[k], rtol=1e-4, atol=1e-5)
    # the saved file serves the same config; one that needs more directions than were kept is told how to fix it
    again = BasisConfig(r=3, rank_allocation=allocation)
    peft_basis.use_statistics(again, str(tmp_path / "bases.safetensors"))
    get_peft_model(AutoModelForCausalLM.from_pretrained(path), again)
    assert again.rank_pattern == whole.rank_pattern
    bigger = BasisConfig(r=3, rank_allocation=allocation, r_max=20)
    peft_basis.use_statistics(bigger, stats)
    if allocation == "eigen":
        with pytest.raises(CalibrationError, match="keep_grams=True"):
            get_peft_model(AutoModelForCausalLM.from_pretrained(path), bigger)
    with pytest.raises(ValueError, match="keep them"):
        calibrate_sequential(path, SharedBasisConfig(), data, progress=False, keep_grams=False)
