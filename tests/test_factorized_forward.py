"""The factorised forward (``factorized_forward``) and the row-aligned factors (``aligned_rows``): the same
values as two plain Linears on every path (few tokens, many tokens, bias, mixed dtypes, gradients), and
aligned coefficients that survive saving and reloading, as a PEFT adapter and as a standalone checkpoint,
for Linear (Llama) and GPT-2 ``Conv1D`` models."""

import os

import pytest
import torch
from peft import PeftModel, get_peft_model
from torch import nn

import peft_basis  # noqa: F401
from peft_basis import CompressedModel, SharedBasisConfig, calibrate, save_compressed
from peft_basis.evaluation import count_parameters
from peft_basis.standalone import LowRankLinear, pad_ranks
from peft_basis.tuners.factorized import (
    TRANSPOSED_MIN_TOKENS,
    aligned_rows,
    default_rank_multiple,
    factorized_forward,
    padded_view,
)
from peft_basis.tuners.shared_basis.layer import SharedBasisLayer

from .models import fresh_copy, tiny_gpt2, tiny_llama, token_batches


def reference(x, basis, coefficient, bias):
    """Two Linears in float64."""
    h = nn.functional.linear(x.double(), basis.double())
    return nn.functional.linear(h, coefficient.double(), None if bias is None else bias.double())


def factors(d_in=72, d_out=40, rank=13, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    basis = torch.randn(rank, d_in, generator=g).to(dtype)
    coefficient = torch.randn(d_out, rank, generator=g).to(dtype)
    bias = torch.randn(d_out, generator=g).to(dtype)
    return basis, coefficient, bias


@pytest.mark.parametrize("tokens", [1, TRANSPOSED_MIN_TOKENS - 1, TRANSPOSED_MIN_TOKENS, 300])
@pytest.mark.parametrize("with_bias", [False, True])
def test_forward_equals_two_linears(tokens, with_bias):
    basis, coefficient, bias = factors()
    x = torch.randn(1, tokens, basis.shape[1])
    y = factorized_forward(x, basis, coefficient, bias if with_bias else None)
    assert y.shape == (1, tokens, coefficient.shape[0]) and y.dtype == x.dtype
    want = reference(x, basis, coefficient, bias if with_bias else None)
    torch.testing.assert_close(y.double(), want, rtol=1e-5, atol=1e-4)


def test_forward_of_three_dim_batches_and_mixed_dtypes():
    basis, coefficient, bias = factors(dtype=torch.bfloat16)
    x = torch.randn(3, 20, basis.shape[1])  # 60 tokens: the transposed products, bfloat16 factors, float32 input
    y = factorized_forward(x, basis, coefficient, bias)
    assert y.dtype == torch.float32 and y.shape == (3, 20, coefficient.shape[0])
    # bfloat16 arithmetic: the same as the plain two Linears in bfloat16
    want = nn.functional.linear(nn.functional.linear(x.to(torch.bfloat16), basis), coefficient, bias).float()
    torch.testing.assert_close(y, want, rtol=2e-2, atol=2e-1)


def test_forward_of_a_non_contiguous_input():
    basis, coefficient, bias = factors()
    x = torch.randn(basis.shape[1], 50).T  # 50 tokens, transposed storage
    torch.testing.assert_close(factorized_forward(x, basis, coefficient, bias).double(),
                               reference(x, basis, coefficient, bias), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("tokens", [4, 64])
def test_gradients_equal_those_of_two_linears(tokens):
    basis, coefficient, bias = (nn.Parameter(t) for t in factors())
    x = torch.randn(2, tokens // 2, basis.shape[1], requires_grad=True)
    factorized_forward(x, basis, coefficient, bias).square().sum().backward()
    got = [t.grad.clone() for t in (x, basis, coefficient, bias)]
    for t in (x, basis, coefficient, bias):
        t.grad = None
    nn.functional.linear(nn.functional.linear(x, basis), coefficient, bias).square().sum().backward()
    for g, t in zip(got, (x, basis, coefficient, bias)):
        torch.testing.assert_close(g, t.grad, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype,step", [(torch.float32, 16), (torch.bfloat16, 32)])
def test_aligned_rows_keeps_values_and_aligns_rows(dtype, step):
    t = torch.randn(7, 13).to(dtype)
    a = aligned_rows(t)
    assert a.shape == t.shape and torch.equal(a, t)
    assert a.stride() == (step, 1) and a.data_ptr() % 64 == 0
    assert aligned_rows(a) is a  # already aligned: left as it is
    assert torch.equal(a.contiguous(), t)
    wide = torch.randn(3, step * 2).to(dtype)
    assert aligned_rows(wide) is wide
    row = torch.randn(1, 13)
    assert aligned_rows(row) is row  # one row: nothing to align
    # cast on the way in (the decomposition workers' float32 factors into the model's dtype): one copy
    source = torch.randn(7, 13)
    cast = aligned_rows(source, dtype)
    assert cast.dtype == dtype and torch.equal(cast, source.to(dtype)) and cast.data_ptr() % 64 == 0
    assert cast.stride() == ((step, 1) if dtype != torch.float32 else (16, 1))
    whole = aligned_rows(torch.randn(3, 64), dtype)
    assert whole.dtype == dtype and whole.is_contiguous() and whole.data_ptr() % 64 == 0


def _compressed(build):
    base = build(2, seed=0)
    dense = fresh_copy(base)
    config = SharedBasisConfig(compression_ratio=0.3, group_size=1)
    calibrate(base, config, token_batches(2), progress=False)
    return get_peft_model(base, config), dense


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("build", [tiny_llama, tiny_gpt2], ids=["llama", "gpt2_conv1d"])
def test_aligned_coefficients_survive_save_and_reload(build, tmp_path):
    peft_model, dense = _compressed(build)
    layers = [m for m in peft_model.modules() if isinstance(m, SharedBasisLayer)]
    coefficients = [m.sb_coefficient["default"] for m in layers]
    assert any(not c.is_contiguous() for c in coefficients)  # the tiny ranks are not multiples of 16
    assert all(c.stride(0) % 16 == 0 for c in coefficients)
    ids = torch.randint(0, 128, (2, 40), generator=torch.Generator().manual_seed(4))  # 80 tokens: transposed path
    short = ids[:1, :5]  # 5 tokens: the matrix-vector path
    want, want_short = _logits(peft_model, ids), _logits(peft_model, short)
    # the aligned coefficients compute exactly what contiguous copies of them compute
    for m in layers:
        m.sb_coefficient["default"].data = m.sb_coefficient["default"].data.contiguous()
    assert torch.equal(_logits(peft_model, ids), want) and torch.equal(_logits(peft_model, short), want_short)
    for m, c in zip(layers, coefficients):
        m.sb_coefficient["default"].data = c.data

    peft_model.save_pretrained(str(tmp_path / "adapter"))
    reloaded = PeftModel.from_pretrained(fresh_copy(dense), str(tmp_path / "adapter"))
    assert torch.equal(_logits(reloaded, ids), want)
    assert all(m.sb_coefficient["default"].stride(0) % 16 == 0
               for m in reloaded.modules() if isinstance(m, SharedBasisLayer))

    folder = save_compressed(peft_model, str(tmp_path / "standalone"))
    standalone = CompressedModel.from_pretrained(folder)
    assert count_parameters(standalone) == count_parameters(peft_model)
    assert torch.equal(_logits(standalone, ids), want) and torch.equal(_logits(standalone, short), want_short)
    low_rank = [m for m in standalone.modules() if isinstance(m, LowRankLinear)]
    assert low_rank and all(m.coefficient.stride(0) % 16 == 0 for m in low_rank)
    again = save_compressed(standalone, str(tmp_path / "again"))  # aligned views are written contiguous
    assert torch.equal(_logits(CompressedModel.from_pretrained(again), ids), want)


def _tensors(folder):
    from safetensors.torch import load_file

    out = {}
    for f in sorted(os.listdir(folder)):
        if f.endswith(".safetensors"):
            out.update(load_file(os.path.join(folder, f)))
    return out


@pytest.mark.parametrize("group_size", [1, 2], ids=["private_bases", "shared_bases"])
def test_bfloat16_ranks_padded_to_32_same_logits_parameters_and_files(group_size, tmp_path):
    base = tiny_llama(2, seed=0)
    config = SharedBasisConfig(compression_ratio=0.3, group_size=group_size)
    calibrate(base, config, token_batches(2), progress=False)
    peft_model = get_peft_model(base, config)
    folder = save_compressed(peft_model, str(tmp_path / "bf16"), dtype=torch.bfloat16)
    padded = CompressedModel.from_pretrained(folder)  # bfloat16: padded by default
    plain = CompressedModel.from_pretrained(folder, rank_multiple=1)
    low_rank = [m for m in padded.modules() if isinstance(m, LowRankLinear)]
    assert low_rank and all(m.rank % 32 for m in low_rank)  # the tiny ranks are not multiples of 32
    for m in low_rank:
        basis, coefficient = padded_view(m.basis), padded_view(m.coefficient)
        assert basis.shape == (-(-m.rank // 32) * 32, m.in_features) and coefficient.shape[1] == basis.shape[0]
        assert torch.equal(basis[: m.rank], m.basis) and not basis[m.rank :].any() and not coefficient[:, m.rank :].any()
        assert basis.data_ptr() == m.basis.data_ptr() and coefficient.data_ptr() == m.coefficient.data_ptr()
    if group_size > 1:  # a shared basis is padded once, and stays one Parameter
        shared = {}
        for m in low_rank:
            shared.setdefault(m.basis_name, set()).add((id(m.basis), m.basis.data_ptr()))
        assert all(len(v) == 1 for v in shared.values())
        assert len(shared) < len(low_rank)
    assert all(padded_view(m.basis) is None for m in plain.modules() if isinstance(m, LowRankLinear))
    assert count_parameters(padded) == count_parameters(plain) == count_parameters(peft_model)
    ids = torch.randint(0, 128, (2, 40), generator=torch.Generator().manual_seed(4))  # 80 tokens: padded products
    short = ids[:1, :5]  # decoding: the unpadded views
    torch.testing.assert_close(_logits(padded, ids), _logits(plain, ids), rtol=0, atol=1e-2)
    assert torch.equal(_logits(padded, short), _logits(plain, short))
    # saving again writes the unpadded factors: the same tensors as the checkpoint it was loaded from
    padded.save_pretrained(str(tmp_path / "again"))
    again = _tensors(str(tmp_path / "again"))
    first = _tensors(folder)
    assert again.keys() == first.keys() and all(torch.equal(again[k], first[k]) for k in first)
    # cast after loading: the padding no longer describes the factors and is not used; pad_ranks pads anew
    as_float = padded.float()
    m = low_rank[0]
    assert padded_view(m.basis) is None and padded_view(m.coefficient) is None
    torch.testing.assert_close(_logits(as_float, ids), _logits(plain.float(), ids), rtol=1e-5, atol=1e-5)
    assert pad_ranks(as_float, 32) > 0 and padded_view(m.basis).dtype == torch.float32
    torch.testing.assert_close(_logits(as_float, ids), _logits(plain.float(), ids), rtol=1e-5, atol=1e-5)


def test_rank_multiple_must_be_positive(tmp_path):
    peft_model, _ = _compressed(tiny_llama)
    folder = save_compressed(peft_model, str(tmp_path / "sa"))
    for bad in (0, -32, 2.5):
        with pytest.raises(ValueError, match=f"rank_multiple={bad}: use a positive integer"):
            CompressedModel.from_pretrained(folder, rank_multiple=bad)
    padded = CompressedModel.from_pretrained(folder)  # float32: padded to 16 by default
    plain = CompressedModel.from_pretrained(folder, rank_multiple=1)
    low_rank = [m for m in padded.modules() if isinstance(m, LowRankLinear)]
    assert any(m.rank % 16 for m in low_rank)
    assert all(padded_view(m.basis).shape[0] == -(-m.rank // 16) * 16 for m in low_rank if m.rank % 16)
    assert all(padded_view(m.basis) is None for m in plain.modules() if isinstance(m, LowRankLinear))
    ids = torch.randint(0, 128, (2, 40), generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(_logits(padded, ids), _logits(peft_model, ids), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(_logits(plain, ids), _logits(peft_model, ids), rtol=1e-5, atol=1e-5)


def test_default_rank_multiple_per_dtype_and_device():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert default_rank_multiple(torch.bfloat16, cpu) == default_rank_multiple(torch.bfloat16, cuda) == 32
    assert default_rank_multiple(torch.float16, cuda) == 32
    assert default_rank_multiple(torch.float32, cpu) == default_rank_multiple(torch.float32, cuda) == 16
    assert default_rank_multiple(torch.float16, cpu) == 16


@pytest.mark.parametrize("rank,transposed", [(13, True), (16, False), (48, False)])
def test_float32_product_order_follows_the_rank(rank, transposed, monkeypatch):
    """Many-token float32 products: the transposed order only for ranks that are not multiples of 16 (the
    padded ones run faster plain, see ``PLAIN_PRODUCT_RANK_MULTIPLE``); both give the two Linears' values."""
    calls = []
    real_mm = torch.mm
    monkeypatch.setattr(torch, "mm", lambda *a, **k: calls.append(1) or real_mm(*a, **k))
    basis, coefficient, bias = factors(rank=rank)
    x = torch.randn(2, TRANSPOSED_MIN_TOKENS, basis.shape[1])
    y = factorized_forward(x, basis, coefficient, None)
    assert bool(calls) == transposed
    torch.testing.assert_close(y.double(), reference(x, basis, coefficient, None), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("tokens,switched", [(1, True), (TRANSPOSED_MIN_TOKENS - 1, True), (TRANSPOSED_MIN_TOKENS, False),
                                             (300, False)])
def test_only_few_token_bfloat16_products_switch_onednn_off(tokens, switched, monkeypatch):
    calls = []
    real = torch._C._set_mkldnn_enabled
    monkeypatch.setattr(torch._C, "_set_mkldnn_enabled", lambda on: (calls.append(on), real(on))[1])
    basis, coefficient, bias = factors(dtype=torch.bfloat16)
    factorized_forward(torch.randn(1, tokens, basis.shape[1]).to(torch.bfloat16), basis, coefficient, bias)
    assert calls == ([False, torch._C._get_mkldnn_enabled()] if switched else [])
    calls.clear()
    f32 = factors()
    factorized_forward(torch.randn(1, tokens, f32[0].shape[1]), *f32)  # float32: never
    assert calls == []


def test_bfloat16_decoding_products_skip_onednn_and_restore_its_switch():
    basis, coefficient, bias = factors(dtype=torch.bfloat16)
    x = torch.randn(1, 1, basis.shape[1]).to(torch.bfloat16)  # one token: the matrix-vector path
    before = torch._C._get_mkldnn_enabled()
    y = factorized_forward(x, basis, coefficient, bias)
    assert torch._C._get_mkldnn_enabled() == before
    want = nn.functional.linear(nn.functional.linear(x, basis), coefficient, bias)  # with oneDNN where it applies
    torch.testing.assert_close(y.float(), want.float(), rtol=2e-2, atol=1e-1)
    with pytest.raises(RuntimeError):  # restored on errors too
        factorized_forward(torch.randn(1, 1, basis.shape[1] + 1).to(torch.bfloat16), basis, coefficient, bias)
    assert torch._C._get_mkldnn_enabled() == before
