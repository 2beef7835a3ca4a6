"""The PEFT layers' zero-padded factors (``pad_factors``, ``factorized_forward(pad=True)``): padded at the first
many-token forward without gradients, the same Parameters, values, counts and saved files, the same logits
as the unpadded products, still trainable afterwards (also when padded under ``torch.inference_mode``), and
dropped (then redone) when a cast changes the factors."""

import pytest
import torch
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file

import peft_basis  # noqa: F401
from peft_basis import CompressedModel, SharedBasisConfig, calibrate, save_compressed
from peft_basis.evaluation import count_parameters
from peft_basis.tuners.factorized import TRANSPOSED_MIN_TOKENS, pad_factor, padded_view
from peft_basis.tuners.shared_basis.layer import SharedBasisLayer

from .models import fresh_copy, tiny_gpt2, tiny_llama, token_batches

IDS = torch.randint(0, 128, (2, 40), generator=torch.Generator().manual_seed(4))  # 80 tokens: padded products


def _compressed(build, group_size):
    base = build(2, seed=0)
    dense = fresh_copy(base)
    config = SharedBasisConfig(compression_ratio=0.3, group_size=group_size)
    calibrate(base, config, token_batches(2), progress=False)
    return get_peft_model(base, config), dense


def _layers(model):
    return [m for m in model.modules() if isinstance(m, SharedBasisLayer)]


def _logits(model, ids=IDS):
    with torch.no_grad():
        return model(ids).logits


def _unpadded_logits(model, ids=IDS):
    """The adapter's factors require gradients: with gradients enabled the unpadded products run."""
    assert all(m.sb_coefficient["default"].requires_grad for m in _layers(model))
    return model(ids).logits.detach()


@pytest.mark.parametrize("build,group_size", [(tiny_llama, 1), (tiny_llama, 2), (tiny_gpt2, 1)],
                         ids=["llama_private", "llama_shared", "gpt2_conv1d"])
def test_peft_layers_pad_at_the_first_many_token_forward_and_keep_values(build, group_size, tmp_path):
    peft_model, dense = _compressed(build, group_size)
    layers = _layers(peft_model)
    assert any(m.sb_rank["default"] % 16 for m in layers)  # the tiny ranks are not multiples of 16
    peft_model.save_pretrained(str(tmp_path / "plain"))  # before any padding
    before = {k: v.clone() for k, v in peft_model.state_dict().items()}
    params = count_parameters(peft_model)
    want = _unpadded_logits(peft_model)
    assert all(padded_view(m.sb_coefficient["default"]) is None for m in layers)
    _logits(peft_model, IDS[:1, : TRANSPOSED_MIN_TOKENS - 1])  # decoding-sized: nothing padded
    assert all(padded_view(m.sb_coefficient["default"]) is None for m in layers)

    got = _logits(peft_model)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for m in layers:
        rank = m.sb_rank["default"]
        basis, coefficient = padded_view(m.basis("default")), padded_view(m.sb_coefficient["default"])
        if rank % 16 == 0:
            continue
        assert basis.shape == (-(-rank // 16) * 16, m.in_features) and coefficient.shape == (m.out_features, basis.shape[0])
        assert not basis[rank:].any() and not coefficient[:, rank:].any()
        assert basis.data_ptr() == m.basis("default").data_ptr()  # the Parameter is a view of it
    if group_size > 1:  # one shared basis, padded once: every member sees the same storage
        by_group = {}
        for m in layers:
            by_group.setdefault(m.sb_group["default"], set()).add(m.basis("default").data_ptr())
        assert all(len(v) == 1 for v in by_group.values()) and len(by_group) < len(layers)
    assert count_parameters(peft_model) == params
    after = peft_model.state_dict()
    assert after.keys() == before.keys() and all(
        after[k].shape == v.shape and torch.equal(after[k], v) for k, v in before.items())

    # saved files hold the unpadded factors: what an unpadded model saves
    peft_model.save_pretrained(str(tmp_path / "padded"))
    reloaded = PeftModel.from_pretrained(fresh_copy(dense), str(tmp_path / "padded"))
    saved, plain = (load_file(str(tmp_path / d / "adapter_model.safetensors")) for d in ("padded", "plain"))
    assert saved.keys() == plain.keys() and all(torch.equal(saved[k], plain[k]) for k in plain)
    assert torch.equal(_logits(reloaded), got)  # the reloaded adapter pads the same way: bitwise equal
    standalone = CompressedModel.from_pretrained(save_compressed(peft_model, str(tmp_path / "standalone")))
    assert torch.equal(_logits(standalone), got)


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
def test_padded_factors_still_train_and_keep_zero_padding(mode):
    peft_model, _ = _compressed(tiny_llama, 1)
    with (torch.no_grad() if mode == "no_grad" else torch.inference_mode()):
        peft_model(IDS)
    layers = [m for m in _layers(peft_model) if padded_view(m.sb_coefficient["default"]) is not None]
    assert layers
    params = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    for _ in range(2):
        optimizer.zero_grad()
        peft_model(IDS, labels=IDS).loss.backward()
        optimizer.step()
    for m in layers:
        coefficient = m.sb_coefficient["default"]
        assert coefficient.grad is not None and coefficient.grad.shape == coefficient.shape
        padded = padded_view(coefficient)  # the optimiser's in-place steps leave the padding zero
        assert padded is not None and not padded[:, m.sb_rank["default"]:].any()
    want = _unpadded_logits(peft_model)
    torch.testing.assert_close(_logits(peft_model), want, rtol=1e-5, atol=1e-5)


def test_a_cast_drops_the_padding_and_the_next_forward_pads_again():
    peft_model, _ = _compressed(tiny_llama, 1)
    _logits(peft_model)
    m = next(m for m in _layers(peft_model) if m.sb_rank["default"] % 16)
    assert padded_view(m.sb_coefficient["default"]).dtype == torch.float32
    peft_model.double()
    assert padded_view(m.sb_coefficient["default"]) is None and padded_view(m.basis("default")) is None
    got = _logits(peft_model)
    assert got.dtype == torch.float64 and padded_view(m.sb_coefficient["default"]).dtype == torch.float64
    torch.testing.assert_close(got, _unpadded_logits(peft_model), rtol=1e-9, atol=1e-9)
    # data assigned (a tensor of the same shape): the record no longer describes it
    m.sb_coefficient["default"].data = m.sb_coefficient["default"].data.clone()
    assert padded_view(m.sb_coefficient["default"]) is None


def test_pad_factor_rounds_the_rank_and_aligns_coefficient_rows():
    basis = torch.nn.Parameter(torch.randn(13, 72))
    coefficient = torch.nn.Parameter(torch.randn(40, 13).to(torch.float16))
    values = basis.detach().clone(), coefficient.detach().clone()
    assert pad_factor(basis, 0, 16) == 3 * 72 and padded_view(basis).shape == (16, 72)
    assert pad_factor(coefficient, 1, 16) == 40 * (32 - 13)  # float16 rows padded to 64 bytes
    assert padded_view(coefficient).shape == (40, 16) and coefficient.stride() == (32, 1)
    assert torch.equal(basis, values[0]) and torch.equal(coefficient, values[1])
    assert pad_factor(basis, 0, 16) == 0 and pad_factor(basis, 0, 8) == 0  # padded already to a multiple
    assert pad_factor(basis, 0, 32) == (32 - 13) * 72 and padded_view(basis).shape == (32, 72)  # to a larger multiple
    assert torch.equal(basis, values[0]) and not padded_view(basis)[13:].any()
    exact = torch.nn.Parameter(torch.randn(32, 8))
    assert pad_factor(exact, 0, 16) == 0 and padded_view(exact) is None
