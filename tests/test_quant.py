"""Tests for h1bkv_lite.quant: error bound, packing, constant groups and byte counts of value quantization."""

from __future__ import annotations

import pytest
import torch

from h1bkv_lite import QuantizedTensor, quantize_values
from h1bkv_lite.quant import pack_codes, unpack_codes

DTYPES = [torch.float16, torch.bfloat16, torch.float32]
VALUE_BITS = [2, 4, 8]
GROUP_SIZES = [None, 8, 16, 32, 64]
LEADING = [(), (3,), (2, 5, 7)]
HEAD_DIM = 64


def values(shape, dtype=torch.float32, seed: int = 0, scale: float = 1.0, offset: float = 0.0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=gen) * scale + offset).to(dtype)


def brute_pack(codes: list[int], bits: int) -> list[int]:
    """Element j sits in bits [(j % per_byte) * bits, ...) of byte j // per_byte, LSB first."""
    per_byte = 8 // bits
    out = [0] * (len(codes) // per_byte)
    for j, c in enumerate(codes):
        out[j // per_byte] |= c << ((j % per_byte) * bits)
    return out


def grouped(x: torch.Tensor, group_size: int) -> torch.Tensor:
    """[..., n] -> float64 [..., n // group_size, group_size]."""
    return x.double().reshape(*x.shape[:-1], x.shape[-1] // group_size, group_size)


def check_error_bound(v: torch.Tensor, qt: QuantizedTensor, context: str) -> None:
    """Every element is within scale / 2 of its reconstruction, up to float slack (see below)."""
    gs, levels = qt.group_size, (1 << qt.bits) - 1
    deq = qt.dequantize()
    err = (grouped(v, gs) - grouped(deq, gs)).abs()  # [..., groups, gs]
    scale, zero = qt.scale.double().unsqueeze(-1), qt.zero.double().unsqueeze(-1)
    # The bound is exact on the *stored* scale (fp16, rounded up, so the grid covers the group's range).
    # The library evaluates (v - zero) / scale and zero + q * scale in float32, each step rounding by at
    # most 2**-24 (6e-8) of the operands' magnitude: allow 4 such roundings of |zero| + levels * scale.
    slack = 2.4e-7 * (zero.abs() + levels * scale)
    # dequantize() returns the input's dtype, which rounds once more (half an ulp of the value).
    if v.dtype != torch.float32:
        slack = slack + grouped(deq, gs).abs() * torch.finfo(v.dtype).eps / 2 + torch.finfo(v.dtype).tiny
    excess = err - (scale / 2 + slack)
    worst = excess.max().item()
    assert worst <= 0, f"{context}: error exceeds scale/2 by {worst:.3g}"


# ---------------------------------------------------------------------------------------------------------
# Accuracy


@pytest.mark.parametrize("leading", LEADING, ids=str)
@pytest.mark.parametrize("group_size", GROUP_SIZES)
@pytest.mark.parametrize("bits", VALUE_BITS)
def test_error_within_half_scale(bits, group_size, leading):
    seed = bits * 100 + (group_size or 0) + len(leading)
    v = values((*leading, HEAD_DIM), seed=seed, scale=2.0, offset=0.5)
    qt = quantize_values(v, bits, group_size)
    gs = group_size or HEAD_DIM
    assert qt.bits == bits and qt.group_size == gs
    assert qt.scale.dtype == torch.float16 and qt.zero.dtype == torch.float16
    assert qt.scale.shape == qt.zero.shape == (*leading, HEAD_DIM // gs)
    check_error_bound(v, qt, f"seed={seed} bits={bits} group_size={group_size} leading={leading}")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("group_size", [None, 16])
@pytest.mark.parametrize("bits", VALUE_BITS)
def test_error_within_half_scale_half_precision(bits, group_size, dtype):
    v = values((4, 3, HEAD_DIM), dtype, seed=bits, scale=3.0)
    check_error_bound(v, quantize_values(v, bits, group_size), f"dtype={dtype} bits={bits} group_size={group_size}")


@pytest.mark.parametrize("bits", VALUE_BITS)
def test_error_bound_with_outliers_and_tiny_ranges(bits):
    v = values((6, HEAD_DIM), seed=bits)
    v[0, 3] = 3000.0  # one outlier stretches its group
    v[1] = 1.0 + 1e-6 * v[1]  # a range far below fp16 resolution
    v[2] = -20000.0 + v[2]  # large offset, fp16 ulp 16 there
    v[3] = 1e-5 * v[3]  # fp16 subnormal territory
    for group_size in (None, 8):
        check_error_bound(v, quantize_values(v, bits, group_size), f"bits={bits} group_size={group_size}")


@pytest.mark.parametrize("group_size", GROUP_SIZES)
@pytest.mark.parametrize("bits", VALUE_BITS)
def test_grid_covers_each_group(bits, group_size):
    """zero is at or below the group minimum, zero + levels * scale at or above the maximum."""
    v = values((5, 2, HEAD_DIM), seed=bits, scale=0.7, offset=-0.2)
    qt = quantize_values(v, bits, group_size)
    g = grouped(v, qt.group_size)
    zero, scale = qt.zero.double(), qt.scale.double()
    assert (scale >= 0).all()
    assert (zero <= g.amin(-1)).all()
    # top of the grid: float32 evaluation of (hi - zero) / levels may sit one float32 ulp low.
    assert (zero + ((1 << bits) - 1) * scale >= g.amax(-1) * (1 - 1e-6) - 1e-6).all()


@pytest.mark.parametrize("group_size", [None, 16])
def test_more_bits_less_error(group_size):
    v = values((64, HEAD_DIM), seed=3)
    mse = {b: (quantize_values(v, b, group_size).dequantize() - v).pow(2).mean().item() for b in VALUE_BITS}
    assert mse[8] < mse[4] < mse[2], f"group_size={group_size}: mse {mse}"
    # each extra bit roughly halves the step: 2 -> 4 bits cuts the MSE by ~5x (3 -> 15 levels)
    assert mse[4] < mse[2] / 10 and mse[8] < mse[4] / 100, f"group_size={group_size}: mse {mse}"


@pytest.mark.parametrize("bits", VALUE_BITS)
def test_smaller_groups_do_not_hurt(bits):
    v = values((64, HEAD_DIM), seed=bits, scale=1.5)
    err = {g: (quantize_values(v, bits, g).dequantize() - v).abs().mean().item() for g in (None, 32, 8)}
    assert err[8] <= err[32] <= err[None], f"bits={bits}: {err}"


# ---------------------------------------------------------------------------------------------------------
# Codes and packing


@pytest.mark.parametrize("leading", LEADING, ids=str)
@pytest.mark.parametrize("group_size", [None, 16])
@pytest.mark.parametrize("bits", VALUE_BITS)
def test_codes_and_packing_match_brute_force(bits, group_size, leading):
    v = values((*leading, HEAD_DIM), seed=bits + len(leading))
    qt = quantize_values(v, bits, group_size)
    codes = qt.codes()
    assert codes.dtype == torch.uint8 and codes.shape == v.shape
    assert int(codes.max()) < 2**bits
    assert int(codes.max()) == 2**bits - 1 and int(codes.min()) == 0, "the group extremes use the grid ends"
    assert qt.data.dtype == torch.uint8 and qt.data.shape == (*leading, HEAD_DIM * bits // 8)
    flat_codes = codes.reshape(-1, HEAD_DIM).tolist()
    assert qt.data.reshape(-1, HEAD_DIM * bits // 8).tolist() == [brute_pack(c, bits) for c in flat_codes]
    # reconstruction is zero + code * scale, group by group
    gs = qt.group_size
    want = qt.zero.double().unsqueeze(-1) + grouped(codes, gs) * qt.scale.double().unsqueeze(-1)
    torch.testing.assert_close(qt.dequantize().double(), want.reshape(v.shape), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("bits", VALUE_BITS)
def test_pack_unpack_roundtrip(bits):
    gen = torch.Generator().manual_seed(bits)
    q = torch.randint(0, 2**bits, (3, 4, 32), generator=gen, dtype=torch.uint8)
    data = pack_codes(q, bits)
    assert data.shape == (3, 4, 32 * bits // 8) and data.dtype == torch.uint8
    assert data.reshape(-1, data.shape[-1]).tolist() == [brute_pack(c, bits) for c in q.reshape(-1, 32).tolist()]
    assert torch.equal(unpack_codes(data, bits), q)
    raw = torch.randint(0, 256, (5, 8), generator=gen, dtype=torch.uint8)
    assert torch.equal(pack_codes(unpack_codes(raw, bits), bits), raw)


# ---------------------------------------------------------------------------------------------------------
# Constant groups

FP16_CONSTANTS = [0.0, -0.0, float(torch.tensor(0.3, dtype=torch.float16)), -2.5, 1000.0, 2.0**-24, 32752.0]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("group_size", [None, 16])
@pytest.mark.parametrize("bits", VALUE_BITS)
def test_fp16_representable_constants_roundtrip_exactly(bits, group_size, dtype):
    for c in FP16_CONSTANTS:
        if dtype == torch.bfloat16 and float(torch.tensor(c).to(dtype)) != c:
            continue  # not representable in the input dtype itself
        v = torch.full((3, HEAD_DIM), c, dtype=dtype)
        qt = quantize_values(v, bits, group_size)
        deq = qt.dequantize()
        assert not deq.isnan().any() and not qt.scale.isnan().any(), f"c={c} bits={bits}"
        assert (qt.scale == 0).all(), f"c={c}: a constant group needs no step"
        assert torch.equal(deq, v), f"c={c} bits={bits} group_size={group_size} dtype={dtype}"


@pytest.mark.parametrize("bits", VALUE_BITS)
def test_constant_groups_next_to_varying_ones(bits):
    v = values((4, HEAD_DIM), seed=bits)
    v[:, :16] = 0.0
    v[1, 16:32] = 0.5
    qt = quantize_values(v, bits, group_size=16)
    deq = qt.dequantize()
    assert torch.equal(deq[:, :16], v[:, :16]) and torch.equal(deq[1, 16:32], v[1, 16:32])
    check_error_bound(v, qt, f"bits={bits}")


@pytest.mark.parametrize("bits", VALUE_BITS)
@pytest.mark.parametrize("c", [0.1, -1e-3, 12345.678])
def test_constants_outside_fp16_stay_finite_and_close(bits, c):
    v = torch.full((2, HEAD_DIM), c, dtype=torch.float32)
    qt = quantize_values(v, bits)
    assert torch.isfinite(qt.dequantize()).all() and torch.isfinite(qt.scale).all(), f"c={c}"
    check_error_bound(v, qt, f"c={c} bits={bits}")


# ---------------------------------------------------------------------------------------------------------
# Bytes, dtype, shape, no mutation


@pytest.mark.parametrize("leading", LEADING, ids=str)
@pytest.mark.parametrize("group_size", GROUP_SIZES)
@pytest.mark.parametrize("bits", VALUE_BITS)
def test_nbytes(bits, group_size, leading):
    v = values((*leading, HEAD_DIM), dtype=torch.float16, seed=1)
    qt = quantize_values(v, bits, group_size)
    parts = qt.data.numel() + 2 * qt.scale.numel() + 2 * qt.zero.numel()  # uint8 codes + fp16 scale + fp16 zero
    groups = HEAD_DIM // (group_size or HEAD_DIM)
    n_vectors = v.numel() // HEAD_DIM
    assert qt.nbytes == parts == n_vectors * (HEAD_DIM * bits // 8 + 4 * groups)


@pytest.mark.parametrize("leading", LEADING, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_dequantize_keeps_dtype_and_shape_and_input(dtype, leading):
    v = values((*leading, HEAD_DIM), dtype, seed=2)
    before = v.clone()
    for bits in VALUE_BITS:
        for group_size in GROUP_SIZES:
            qt = quantize_values(v, bits, group_size)
            data_before = qt.data.clone()
            deq = qt.dequantize()
            qt.codes()
            assert deq.dtype == dtype and deq.shape == v.shape, f"bits={bits} group_size={group_size}"
            assert qt.dtype == dtype and qt.shape == v.shape
            assert torch.equal(qt.data, data_before)
            assert torch.equal(v, before), f"bits={bits} group_size={group_size}: input was modified"
    q = torch.randint(0, 4, (2, 8), dtype=torch.uint8)
    q_before = q.clone()
    data = pack_codes(q, 2)
    data_before = data.clone()
    unpack_codes(data, 2)
    assert torch.equal(q, q_before) and torch.equal(data, data_before)


def test_quantized_tensor_is_frozen():
    qt = quantize_values(values((2, 8)), 4)
    with pytest.raises(AttributeError):
        qt.bits = 8


# ---------------------------------------------------------------------------------------------------------
# Bad input


@pytest.mark.parametrize("bits", [3, 1, 0, 16, -4])
def test_bad_value_bits(bits):
    with pytest.raises(ValueError, match="bits"):
        quantize_values(values((2, HEAD_DIM)), bits)


def test_float_value_bits_named():
    # 4.0 == 4 passes a membership test; it must still be refused by name, not crash inside the shift
    with pytest.raises(TypeError, match="bits"):
        quantize_values(values((2, HEAD_DIM)), 4.0)


@pytest.mark.parametrize(
    "group_size, error", [(7, ValueError), (48, ValueError), (0, ValueError), (-8, ValueError), (128, ValueError),
                          (8.0, TypeError), ("16", TypeError)], ids=str,
)
def test_bad_group_size(group_size, error):
    with pytest.raises(error, match="group_size"):
        quantize_values(values((2, HEAD_DIM)), 4, group_size)


@pytest.mark.parametrize("dtype", [torch.float64, torch.int32, torch.int64, torch.uint8, torch.bool], ids=str)
def test_bad_dtype(dtype):
    with pytest.raises(TypeError, match=r"\bv\b.*dtype"):
        quantize_values(torch.zeros(2, HEAD_DIM, dtype=dtype), 4)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_non_finite_input(bad, dtype):
    v = values((3, HEAD_DIM), dtype)
    v[2, 5] = bad
    with pytest.raises(ValueError, match=r"\bv\b.*NaN or Inf"):
        quantize_values(v, 4)


def test_other_bad_inputs():
    with pytest.raises(ValueError, match=r"\bv\b.*empty"):
        quantize_values(torch.empty(0, HEAD_DIM), 4)
    with pytest.raises(ValueError, match=r"\bv\b"):
        quantize_values(torch.tensor(1.0), 4)
    with pytest.raises(TypeError, match=r"\bv\b"):
        quantize_values([1.0] * 8, 4)
    with pytest.raises(ValueError, match=r"\bv\b.*fp16"):
        quantize_values(torch.full((2, 8), 40000.0), 4)
    with pytest.raises(ValueError, match="bits"):
        quantize_values(torch.zeros(2, 3), 2)  # 3 elements * 2 bits do not fill a byte
