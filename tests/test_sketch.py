"""Tests for h1bkv_lite.sketch: SimHash codes against a bit-by-bit definition, Hamming forms, statistics."""

from __future__ import annotations

import math

import pytest
import torch

from h1bkv_lite import SimHashSketcher
from h1bkv_lite.sketch import pack_bits, unpack_bits

CUDA = torch.cuda.is_available()
DTYPES = [torch.float16, torch.bfloat16, torch.float32]
SKETCH_BITS = [8, 24, 64, 256, 1024]
LEADING = [(), (3,), (2, 5, 7)]


# ---------------------------------------------------------------------------------------------------------
# Brute-force definitions, written from the module docstring only (Python ints, one bit at a time).


def brute_bits(x: torch.Tensor, R: torch.Tensor) -> tuple[list[list[bool]], list[list[float]]]:
    """Per vector of ``x [..., d]``: bit i is True iff ``(x @ R)[i] >= 0``, projections in float64."""
    proj = (x.double().reshape(-1, R.shape[0]) @ R.double()).tolist()
    return [[p >= 0 for p in row] for row in proj], proj


def brute_pack(bits: list[bool]) -> list[int]:
    """Bit i goes to bit position i % 8 (LSB = 0) of byte i // 8."""
    out = [0] * (len(bits) // 8)
    for i, bit in enumerate(bits):
        if bit:
            out[i // 8] |= 1 << (i % 8)
    return out


def brute_unpack(code: list[int]) -> list[bool]:
    return [bool((code[i // 8] >> (i % 8)) & 1) for i in range(8 * len(code))]


def brute_hamming(a: list[int], b: list[int]) -> int:
    return sum(bin(x ^ y).count("1") for x, y in zip(a, b))


def random_codes(shape, nbytes: int, gen: torch.Generator) -> torch.Tensor:
    return torch.randint(0, 256, (*shape, nbytes), generator=gen, dtype=torch.uint8)


def vectors(shape, dtype, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=gen).to(dtype)


# ---------------------------------------------------------------------------------------------------------
# The projection R


@pytest.mark.parametrize("seed", [0, 7, 123456])
def test_projection_is_deterministic_per_seed(seed):
    a = SimHashSketcher(48, 256, seed)
    torch.manual_seed(seed + 1)  # the global RNG must play no part
    b = SimHashSketcher(48, 256, seed)
    assert a.projection.shape == (48, 256) and a.projection.dtype == torch.float32, f"seed={seed}"
    assert torch.equal(a.projection, b.projection), f"seed={seed}: same seed gave different R"
    x = vectors((5, 48), torch.float32, seed)
    assert torch.equal(a.sketch(x), b.sketch(x)), f"seed={seed}"


def test_projection_does_not_touch_global_rng():
    torch.manual_seed(99)
    expected = torch.rand(4)
    torch.manual_seed(99)
    SimHashSketcher(64, 512, seed=3)
    assert torch.equal(torch.rand(4), expected)


@pytest.mark.parametrize("seeds", [(0, 1), (5, 6), (42, 4242)])
def test_different_seeds_give_different_projections(seeds):
    a, b = (SimHashSketcher(32, 64, s) for s in seeds)
    assert not torch.equal(a.projection, b.projection), f"seeds={seeds}"
    x = vectors((20, 32), torch.float32, sum(seeds))
    assert not torch.equal(a.sketch(x), b.sketch(x)), f"seeds={seeds}"


@pytest.mark.parametrize("seed", [2, 31, 777])
def test_projection_is_standard_gaussian(seed):
    R = SimHashSketcher(64, 4096, seed).projection
    assert abs(R.mean().item()) < 5 / math.sqrt(R.numel()), f"seed={seed}"
    assert abs(R.std().item() - 1) < 0.01, f"seed={seed}"


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("seed", [0, 1234])
def test_projection_and_codes_survive_device_move(seed):
    s = SimHashSketcher(64, 1024, seed)
    cuda_r = s.projection_on("cuda")
    assert cuda_r.device.type == "cuda"
    assert torch.equal(cuda_r.cpu(), s.projection), f"seed={seed}"
    assert torch.equal(SimHashSketcher(64, 1024, seed).projection_on(torch.device("cuda")).cpu(), s.projection)
    x = vectors((3, 17, 64), torch.float32, seed)
    cpu_codes, cuda_codes = s.sketch(x), s.sketch(x.cuda())
    assert cuda_codes.device.type == "cuda" and cuda_codes.dtype == torch.uint8
    # Bits may only differ where the float32 projection is within rounding of 0 (matmul order differs).
    differ = s.unpack(cpu_codes) != s.unpack(cuda_codes.cpu())
    near_zero = (x.double() @ s.projection.double()).abs() < 1e-4
    assert not (differ & ~near_zero).any(), f"seed={seed}"


# ---------------------------------------------------------------------------------------------------------
# sketch() against the bit-by-bit definition


@pytest.mark.parametrize("leading", LEADING, ids=str)
@pytest.mark.parametrize("bits", SKETCH_BITS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_sketch_matches_brute_force(dtype, bits, leading):
    seed = 1000 + bits + len(leading)
    head_dim = 37  # odd on purpose
    s = SimHashSketcher(head_dim, bits, seed)
    x = vectors((*leading, head_dim), dtype, seed)
    codes = s.sketch(x)
    assert codes.shape == (*leading, bits // 8) and codes.dtype == torch.uint8
    expected_bits, proj = brute_bits(x, s.projection)
    got = codes.reshape(-1, bits // 8).tolist()
    for row, (want, p, code) in enumerate(zip(expected_bits, proj, got)):
        got_bits = brute_unpack(code)
        # float32 (library) and float64 (here) projections may disagree only within rounding of 0.
        bad = [i for i in range(bits) if got_bits[i] != want[i] and abs(p[i]) > 1e-4]
        assert not bad, f"seed={seed} dtype={dtype} bits={bits} vector {row}: wrong bits {bad[:10]}"
        if all(abs(v) > 1e-4 for v in p):
            assert code == brute_pack(want), f"seed={seed} vector {row}: packing differs"


@pytest.mark.parametrize("leading", LEADING, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_sign_of_zero_is_plus_one(dtype, leading):
    s = SimHashSketcher(16, 64, seed=5)
    for zeros in (torch.zeros(*leading, 16, dtype=dtype), -torch.zeros(*leading, 16, dtype=dtype)):
        codes = s.sketch(zeros)
        assert codes.shape == (*leading, 8)
        assert (codes == 255).all(), "x = 0 must sketch to all-ones (sign(0) = +1)"
        assert (s.signs(codes) == 1).all()


@pytest.mark.parametrize("seed", [3, 17, 2718])
def test_sketch_is_scale_invariant_and_odd(seed):
    s = SimHashSketcher(64, 256, seed)
    x = vectors((10, 64), torch.float32, seed)
    codes = s.sketch(x)
    assert torch.equal(s.sketch(4 * x), codes), f"seed={seed}: power-of-two scaling is exact"
    assert torch.equal(s.sketch(-x), 255 - codes), f"seed={seed}: negation must flip every bit"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_project_is_float32_x_at_r(dtype):
    s = SimHashSketcher(24, 64, seed=8)
    x = vectors((2, 3, 24), dtype, 8)
    p = s.project(x)
    assert p.dtype == torch.float32 and p.shape == (2, 3, 64)
    torch.testing.assert_close(p.double(), x.double() @ s.projection.double(), atol=1e-5, rtol=1e-5)
    assert torch.equal(s.unpack(s.sketch(x)), p >= 0)


# ---------------------------------------------------------------------------------------------------------
# pack / unpack


@pytest.mark.parametrize("shape", [(8,), (3, 24), (2, 5, 1024)], ids=str)
def test_unpack_pack_roundtrip(shape):
    gen = torch.Generator().manual_seed(len(shape))
    bits = torch.rand(shape, generator=gen) < 0.5
    codes = pack_bits(bits)
    assert codes.dtype == torch.uint8 and codes.shape == (*shape[:-1], shape[-1] // 8)
    assert torch.equal(unpack_bits(codes), bits)
    assert codes.reshape(-1, shape[-1] // 8).tolist() == [brute_pack(r) for r in bits.reshape(-1, shape[-1]).tolist()]
    assert torch.equal(pack_bits(unpack_bits(codes)), codes)


@pytest.mark.parametrize("bits", SKETCH_BITS)
def test_sketcher_unpack_and_signs_match_brute_force(bits):
    s = SimHashSketcher(8, bits, seed=bits)
    codes = random_codes((4, 3), bits // 8, torch.Generator().manual_seed(bits))
    unpacked = s.unpack(codes)
    assert unpacked.dtype == torch.bool and unpacked.shape == (4, 3, bits)
    assert unpacked.reshape(-1, bits).tolist() == [brute_unpack(c) for c in codes.reshape(-1, bits // 8).tolist()]
    signs = s.signs(codes)
    assert signs.dtype == torch.float32
    assert torch.equal(signs, torch.where(unpacked, 1.0, -1.0))
    assert torch.equal(pack_bits(unpacked), codes)


def test_pack_bits_rejects_partial_bytes():
    with pytest.raises(ValueError, match="bits"):
        pack_bits(torch.zeros(3, 12, dtype=torch.bool))


# ---------------------------------------------------------------------------------------------------------
# Hamming distance and the estimators built on it


def brute_hamming_matrix(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a [H, Na, B] against b [Hb, Nb, B] with Hb in {1, H}: one popcount loop per pair."""
    H = max(a.shape[0], b.shape[0])
    out = torch.zeros(H, a.shape[1], b.shape[1], dtype=torch.int32)
    al, bl = a.tolist(), b.tolist()
    for h in range(H):
        for i in range(a.shape[1]):
            for j in range(b.shape[1]):
                out[h, i, j] = brute_hamming(al[h % len(al)][i], bl[h % len(bl)][j])
    return out


@pytest.mark.parametrize("bits", SKETCH_BITS)
@pytest.mark.parametrize("seed", [0, 99])
def test_hamming_forms_agree_with_brute_force(bits, seed):
    s = SimHashSketcher(16, bits, seed)
    gen = torch.Generator().manual_seed(seed * 10_000 + bits)
    a = random_codes((3, 5), bits // 8, gen)  # [H, Na, B]
    b = random_codes((1, 7), bits // 8, gen)  # [1, Nb, B], broadcast over H
    b[0, 0] = 0
    b[0, 1] = 255
    a[0, 0] = b[0, 2]
    want = brute_hamming_matrix(a, b)
    for method in ("matmul", "xor"):
        got = s.hamming(a, b, method=method)
        assert got.dtype == torch.int32 and got.shape == (3, 5, 7), f"method={method}"
        assert torch.equal(got, want), f"seed={seed} bits={bits} method={method}"
    assert want[0, 0, 2] == 0
    got_swapped = s.hamming(b, a)  # broadcasting the other way round
    assert torch.equal(got_swapped, want.transpose(-1, -2)), f"seed={seed} bits={bits}"


def test_hamming_broadcasts_leading_dims():
    s = SimHashSketcher(16, 64, seed=1)
    gen = torch.Generator().manual_seed(1)
    a = random_codes((2, 1, 4), 8, gen)  # [B, 1, Na, bytes]
    b = random_codes((3, 6), 8, gen)  # [H, Nb, bytes]
    got = s.hamming(a, b, method="xor")
    assert got.shape == (2, 3, 4, 6)
    assert torch.equal(got, s.hamming(a, b, method="matmul"))
    for i in range(2):
        assert torch.equal(got[i], brute_hamming_matrix(a[i].expand(3, 4, 8), b))
    # plain 2-D codes
    assert torch.equal(s.hamming(a[0, 0], b[1]), brute_hamming_matrix(a[0], b[1:2])[0])


@pytest.mark.parametrize("bits", [8, 64, 1024])
def test_hamming_extremes(bits):
    s = SimHashSketcher(16, bits, seed=4)
    a = random_codes((1, 6), bits // 8, torch.Generator().manual_seed(bits))
    same = s.hamming(a, a)
    assert (same.diagonal(dim1=-2, dim2=-1) == 0).all()
    assert (s.hamming(a, 255 - a).diagonal(dim1=-2, dim2=-1) == bits).all()
    assert torch.equal(same, same.transpose(-1, -2))


@pytest.mark.parametrize("bits", SKETCH_BITS)
def test_cosine_and_score_are_functions_of_hamming(bits):
    s = SimHashSketcher(16, bits, seed=bits + 1)
    gen = torch.Generator().manual_seed(bits)
    a, b = random_codes((2, 4), bits // 8, gen), random_codes((2, 5), bits // 8, gen)
    h = brute_hamming_matrix(a, b).double()
    cos, score = s.cosine(a, b), s.score(a, b)
    assert cos.dtype == torch.float32 and score.dtype == torch.float32
    torch.testing.assert_close(cos.double(), torch.cos(math.pi * h / bits), atol=1e-6, rtol=0)
    torch.testing.assert_close(score.double(), 1 - 2 * h / bits, atol=1e-7, rtol=0)
    assert s.score(a, a).diagonal(dim1=-2, dim2=-1).eq(1).all()
    assert s.score(a, 255 - a).diagonal(dim1=-2, dim2=-1).eq(-1).all()
    torch.testing.assert_close(s.cosine(a, 255 - a).diagonal(dim1=-2, dim2=-1), -torch.ones(2, 4))


# ---------------------------------------------------------------------------------------------------------
# SimHash statistics: h ~ Binomial(bits, theta / pi)


def pairs_at_angle(theta: float, n: int, d: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """n random pairs (x, y) of unit vectors in R^d at exactly angle theta (Gram-Schmidt in float64)."""
    x = torch.randn(n, d, generator=gen, dtype=torch.float64)
    x = x / x.norm(dim=-1, keepdim=True)
    u = torch.randn(n, d, generator=gen, dtype=torch.float64)
    u = u - (u * x).sum(-1, keepdim=True) * x
    u = u / u.norm(dim=-1, keepdim=True)
    y = math.cos(theta) * x + math.sin(theta) * u
    return x.float(), y.float()


@pytest.mark.parametrize("theta", [0.2, 0.8, 1.5, 2.5])
@pytest.mark.parametrize("seed", [101, 2025, 90210])
def test_normalized_hamming_estimates_angle(seed, theta):
    bits, n, d = 1024, 2000, 64
    s = SimHashSketcher(d, bits, seed)
    x, y = pairs_at_angle(theta, n, d, torch.Generator().manual_seed(seed + int(1000 * theta)))
    codes = s.sketch(torch.stack([x, y]).unsqueeze(-2))  # [2, n, 1, B]: each pair compared on its own
    h = s.hamming(codes[0], codes[1], method="xor").reshape(n).double()
    p = theta / math.pi
    se = math.sqrt(p * (1 - p) / (bits * n))  # Binomial standard error of the mean of h / bits
    mean = (h / bits).mean().item()
    assert abs(mean - p) < 3 * se, f"seed={seed} theta={theta}: E[h/b]={mean:.5f}, theta/pi={p:.5f}, se={se:.2e}"
    spread = (h / bits).std().item() / math.sqrt(p * (1 - p) / bits)  # ~1 if the bits of a pair are independent
    assert 0.9 < spread < 1.1, f"seed={seed} theta={theta}: std(h/b) is {spread:.3f} x the Binomial one"
    # cosine() = cos(pi h / b) is checked exactly above; here only that it lands near cos(theta).
    cos = torch.cos(math.pi * h / bits).mean().item()
    assert abs(cos - math.cos(theta)) < 0.01, f"seed={seed} theta={theta}: E[cos estimate]={cos:.4f}"


# ---------------------------------------------------------------------------------------------------------
# Bad input


@pytest.mark.parametrize(
    "bits, error",
    [(12, ValueError), (0, ValueError), (4, ValueError), (-8, ValueError), (4104, ValueError), (4097, ValueError),
     (8.0, TypeError), ("64", TypeError), (True, TypeError), (None, TypeError)],
    ids=str,
)
def test_bad_sketch_bits(bits, error):
    with pytest.raises(error, match="bits"):
        SimHashSketcher(64, bits)


@pytest.mark.parametrize("bits", [8, 4096])
def test_sketch_bits_limits_are_inclusive(bits):
    assert SimHashSketcher(4, bits).nbytes_per_code == bits // 8


@pytest.mark.parametrize("head_dim, error", [(0, ValueError), (-3, ValueError), (64.0, TypeError)], ids=str)
def test_bad_head_dim(head_dim, error):
    with pytest.raises(error, match="head_dim"):
        SimHashSketcher(head_dim, 64)


@pytest.mark.parametrize("seed, error", [(-1, ValueError), (1.5, TypeError), ("0", TypeError)], ids=str)
def test_bad_seed(seed, error):
    with pytest.raises(error, match="seed"):
        SimHashSketcher(16, 64, seed)


@pytest.fixture
def sk():
    return SimHashSketcher(16, 64, seed=0)


@pytest.mark.parametrize("method", ["sketch", "project"])
def test_sketch_rejects_bad_vectors(sk, method):
    fn = getattr(sk, method)
    with pytest.raises(ValueError, match="head_dim"):
        fn(torch.randn(3, 15))
    for dtype in (torch.float64, torch.int32, torch.int64, torch.bool):
        with pytest.raises(TypeError, match=r"\bx\b.*dtype"):
            fn(torch.zeros(3, 16, dtype=dtype))
    for bad in (float("nan"), float("inf"), -float("inf")):
        x = torch.randn(3, 16)
        x[1, 2] = bad
        with pytest.raises(ValueError, match=r"\bx\b.*NaN or Inf"):
            fn(x)
    with pytest.raises(ValueError, match=r"\bx\b.*empty"):
        fn(torch.empty(0, 16))
    with pytest.raises(ValueError, match=r"\bx\b"):
        fn(torch.tensor(1.0))
    with pytest.raises(TypeError, match=r"\bx\b"):
        fn([0.0] * 16)


def test_hamming_rejects_bad_codes(sk):
    good = torch.zeros(2, 8, dtype=torch.uint8)
    with pytest.raises(ValueError, match=r"\ba\b.*bytes"):
        sk.hamming(torch.zeros(2, 7, dtype=torch.uint8), good)
    with pytest.raises(ValueError, match=r"\bb\b.*bytes"):
        sk.hamming(good, torch.zeros(2, 9, dtype=torch.uint8))
    for dtype in (torch.int8, torch.int32, torch.float32, torch.bool):
        with pytest.raises(TypeError, match=r"\ba\b.*dtype"):
            sk.hamming(good.to(dtype), good)
        with pytest.raises(TypeError, match=r"\bb\b.*dtype"):
            sk.hamming(good, good.to(dtype))
    with pytest.raises(ValueError, match=r"\ba\b"):
        sk.hamming(good[0], good)  # codes need a [N, B] matrix at least
    with pytest.raises(ValueError, match=r"\bb\b.*empty"):
        sk.hamming(good, good[:0])
    with pytest.raises(ValueError, match="method"):
        sk.hamming(good, good, method="popcount")
    for fn in (sk.cosine, sk.score):
        with pytest.raises(ValueError, match=r"\ba\b.*bytes"):
            fn(torch.zeros(2, 4, dtype=torch.uint8), good)
    with pytest.raises(ValueError, match="codes.*bytes"):
        sk.unpack(torch.zeros(3, dtype=torch.uint8))
    with pytest.raises(TypeError, match="codes.*dtype"):
        sk.signs(torch.zeros(8, dtype=torch.int16))


def test_hamming_rejects_codes_on_two_devices(sk):
    other = "cuda" if CUDA else "meta"  # uint8 codes skip the finiteness check, so 'meta' reaches the device check
    a = torch.zeros(2, 8, dtype=torch.uint8)
    b = torch.zeros(2, 8, dtype=torch.uint8, device=other)
    with pytest.raises(ValueError, match=r"one device.*\ba on cpu.*\bb on"):
        sk.hamming(a, b)


# ---------------------------------------------------------------------------------------------------------
# Inputs are never mutated


def test_no_public_function_mutates_its_inputs():
    s = SimHashSketcher(16, 64, seed=11)
    for dtype in DTYPES:
        x = vectors((2, 3, 16), dtype, 11)
        x_before = x.clone()
        s.sketch(x)
        s.project(x)
        assert torch.equal(x, x_before), f"dtype={dtype}"
    gen = torch.Generator().manual_seed(11)
    a, b = random_codes((2, 3), 8, gen), random_codes((1, 4), 8, gen)
    a_before, b_before = a.clone(), b.clone()
    for method in ("matmul", "xor"):
        s.hamming(a, b, method=method)
    s.cosine(a, b)
    s.score(a, b)
    s.unpack(a)
    s.signs(b)
    unpack_bits(a)
    bits = unpack_bits(b)
    bits_before = bits.clone()
    pack_bits(bits)
    assert torch.equal(a, a_before) and torch.equal(b, b_before) and torch.equal(bits, bits_before)
    r_before = s.projection.clone()
    s.projection_on("cpu")
    assert torch.equal(s.projection, r_before)
