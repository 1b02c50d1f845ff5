"""Each Triton kernel against its plain-torch reference, plus the references against the core library.

Runs on the CPU through Triton's interpreter (see conftest.py) and, marked ``gpu``, on CUDA.

Tolerances, and why:
- Codes, Hamming distances, quantized value bytes and fp16 scales/zeros are compared bit-exactly.
  The one allowed difference: a key code bit whose projection is a near-tie, ``|x @ R| < 1e-5 |x| |R_i|``
  (an fp32 dot of <= 128 terms is off by at most ~1e-6 of ``|x| |R_i|``, so only such bits can flip under a
  different summation order). Mismatches are asserted to lie only there, and counted (~0 on random data).
- Decode outputs: both sides compute in fp32 and differ only by summation order, so fp32 outputs get
  ``rtol=1e-4, atol=1e-5`` -- except GQA's tensor-core value products, fp16 by default (or tf32), whose
  rounded operands get TF32_TOL (a config may choose tf32x3 or ieee dots, ~1e-6 relative). fp16/bf16 outputs are those fp32 values rounded once to the output
  dtype, which can land one ulp apart: ``rtol = atol = 2 ulp`` (2**-9, 2**-6).
- Query codes are computed by the kernel, so a query projection that is a near-tie could flip one query bit
  and move a whole row of logits by ``2 / bits / T``: such queries (probability ~1e-5 per bit) are redrawn.
"""
import inspect
import math

import pytest
import torch

from h1bkv_lite import SimHashSketcher, h1b_attention, quantize_values
from h1bkv_lite.kernels import (
    h1b_decode_attention,
    h1b_decode_attention_reference,
    hamming_scores,
    hamming_scores_reference,
    sketch_pack,
    sketch_pack_quantize,
    sketch_pack_quantize_into,
)
from h1bkv_lite.kernels._common import is_interpreted, popcount, tl, triton, use_triton
from h1bkv_lite.kernels.decode_attention import (
    _decode_split_kernel, _default_config, _nibbles_to_half, _round_to_tf32,
)
from h1bkv_lite.sketch import unpack_bits

_CUDA = torch.cuda.is_available()
DEVICES = [
    "cpu",
    pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not _CUDA, reason="needs CUDA")]),
]
NEAR_TIE = 1e-5
# GQA's value products run on tensor cores. In fp16 (the default): weights p (<= 256) and values rounded to fp16,
# 2**-11 relative each, round to nearest, fp32 accumulation (4-bit per-token values, ``half2_unpack``: (code - 8) *
# scale rounded once, zero + 8 * scale added in fp32; otherwise zero + code * scale rounded); the interpreter rounds
# the same way, then multiplies in fp32. In tf32 (``config={"precision": "tf32"}``): the kernel rounds the weights
# p * scale (and per-group values) to nearest tf32 itself (10 mantissa bits: <= 2**-11, either sign). Either way an
# output moves by <= ~2**-10 of the attended values' range (~2-5 for unit-variance values), on average far less
# since the errors have both signs. Before the rounding the tf32 MMA's truncation (0 to 2**-10, one-signed) passed
# this same bound on CUDA; values of a larger range would need a wider one.
TF32_TOL = dict(rtol=2**-9, atol=2**-9)
OUT_TOL = {
    torch.float32: dict(rtol=1e-4, atol=1e-5),
    torch.float16: dict(rtol=2**-9, atol=2**-9),
    torch.bfloat16: dict(rtol=2**-6, atol=2**-6),
}


@pytest.fixture(params=DEVICES)
def device(request):
    if request.param == "cpu" and not is_interpreted(_decode_split_kernel):
        pytest.skip("Triton kernels are compiled for CUDA here; run with TRITON_INTERPRET=1 for the CPU cases")
    return torch.device(request.param)


def fresh_seed() -> int:
    """A new seed per test (drawn from torch's global RNG, itself unseeded), printed on failure."""
    return int(torch.randint(0, 2**31 - 1, (1,)).item())


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(*shape, gen, device, dtype=torch.float32, scale=1.0):
    return (torch.randn(*shape, generator=gen) * scale).to(device=device, dtype=dtype)


def _near_ties(x: torch.Tensor, projection: torch.Tensor) -> torch.Tensor:
    """bool ``[..., bits]``: projections within NEAR_TIE of zero, relative to ``|x| |R_i|``."""
    xf = x.double().cpu()
    r = projection.double().cpu()
    return (xf @ r).abs() < NEAR_TIE * xf.norm(dim=-1, keepdim=True) * r.norm(dim=0)


def _assert_codes_match(got: torch.Tensor, x: torch.Tensor, projection: torch.Tensor, msg: str) -> int:
    """Codes equal the reference except at near-tie bits; return how many near-tie bits differ."""
    want = (x.float().cpu() @ projection.cpu()) >= 0
    got_bits = unpack_bits(got.cpu())
    wrong = got_bits != want
    ties = _near_ties(x, projection)
    assert not bool((wrong & ~ties).any()), f"{msg}: {int((wrong & ~ties).sum())} code bits differ away from ties"
    return int(wrong.sum())


# ---------------------------------------------------------------------------------------------------
# sketch_pack


@pytest.mark.parametrize("d,bits", [(64, 64), (64, 256), (128, 128), (128, 512), (96, 40)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_sketch_pack_matches_sketcher(device, d, bits, dtype):
    seed = fresh_seed()
    gen = _gen(seed)
    sk = SimHashSketcher(d, bits, seed=seed % 1000)
    x = _randn(3, 37, d, gen=gen, device=device, dtype=dtype)
    x_before = x.clone()
    got = sketch_pack(x, sk.projection_on(device), backend="triton")
    assert got.dtype == torch.uint8 and got.shape == (3, 37, bits // 8) and got.device.type == device.type
    assert torch.equal(x, x_before), "sketch_pack modified x"
    flips = _assert_codes_match(got, x, sk.projection, f"seed={seed}")
    assert flips <= 2, f"seed={seed}: {flips} near-tie flips (expected ~0)"
    ref = sk.sketch(x)
    assert int((got != ref).sum()) <= flips, f"seed={seed}: differs from SimHashSketcher.sketch"


def test_sketch_pack_sign_of_zero_is_plus(device):
    sk = SimHashSketcher(64, 128, seed=3)
    x = torch.zeros(5, 64, device=device)
    x[1] = -0.0
    got = sketch_pack(x, sk.projection_on(device), backend="triton")
    assert bool((got == 0xFF).all()), "sign(0) must be +1 (all bits set)"
    assert torch.equal(got, sk.sketch(x))


# ---------------------------------------------------------------------------------------------------
# sketch_pack_quantize


def _quantize_on_cpu(v, value_bits, group_size):
    """quantize_values computed on the CPU, moved to v's device. (Its fp16 round-up/down steps use
    torch.nextafter on fp16, which is exact on the CPU; the CPU result is the specification.)"""
    ref = quantize_values(v.cpu(), value_bits, group_size)
    return type(ref)(ref.data.to(v.device), ref.scale.to(v.device), ref.zero.to(v.device), ref.bits,
                     ref.group_size, ref.shape, ref.dtype)


@pytest.mark.parametrize(
    "d,bits,n,value_bits,group_size",
    [(64, 128, 64, 4, None), (128, 256, 128, 4, 32), (64, 64, 64, 2, 16), (128, 512, 128, 8, None),
     (64, 128, 96, 4, None), (64, 128, 64, 4, 2)],
)
def test_sketch_pack_quantize_matches_references(device, d, bits, n, value_bits, group_size):
    seed = fresh_seed()
    gen = _gen(seed)
    sk = SimHashSketcher(d, bits, seed=seed % 1000)
    k = _randn(2, 3, 37, d, gen=gen, device=device, dtype=torch.float16)
    v = _randn(2, 3, 37, n, gen=gen, device=device, scale=3.0) + 0.5
    v[0, 0, 0] = 1.25  # a constant vector: scale 0, codes 0
    k_before, v_before = k.clone(), v.clone()
    codes, qt = sketch_pack_quantize(k, v, sk.projection_on(device), value_bits, group_size, backend="triton")
    assert torch.equal(k, k_before) and torch.equal(v, v_before), "inputs modified"
    ref = _quantize_on_cpu(v, value_bits, group_size)
    msg = f"seed={seed}"
    assert torch.equal(qt.data, ref.data), f"{msg}: {int((qt.data != ref.data).sum())} value bytes differ"
    assert torch.equal(qt.scale.view(torch.int16), ref.scale.view(torch.int16)), f"{msg}: fp16 scales differ"
    assert torch.equal(qt.zero.view(torch.int16), ref.zero.view(torch.int16)), f"{msg}: fp16 zeros differ"
    assert (qt.bits, qt.group_size, qt.shape, qt.dtype) == (ref.bits, ref.group_size, ref.shape, ref.dtype)
    flips = _assert_codes_match(codes, k, sk.projection, msg)
    assert flips <= 2, f"{msg}: {flips} near-tie flips (expected ~0)"


def test_sketch_pack_quantize_rounding_edges(device):
    """Half-way codes round to even, fp16 zero rounds down / scale rounds up on non-representable ranges."""
    sk = SimHashSketcher(16, 32, seed=0)
    k = torch.ones(4, 16, device=device)
    v = torch.zeros(4, 16)
    v[0] = torch.tensor([0, 15, 0.5, 1.5, 2.5, 3.5, 7.5, 14.5, 4, 5, 6, 7, 8, 9, 10, 11.5])  # scale exactly 1
    v[1] = torch.linspace(-1 / 3, 1e-3 / 7, 16)  # zero and scale not representable in fp16
    v[2] = torch.full((16,), 2.0 / 3.0)  # constant: scale 0
    v[3] = torch.linspace(1000.1, 1000.2, 16)  # range below fp16 resolution at this magnitude
    v = v.to(device)
    _, qt = sketch_pack_quantize(k, v, sk.projection_on(device), 4, None, backend="triton")
    ref = _quantize_on_cpu(v, 4, None)
    assert torch.equal(qt.data, ref.data)
    assert torch.equal(qt.scale.view(torch.int16), ref.scale.view(torch.int16))
    assert torch.equal(qt.zero.view(torch.int16), ref.zero.view(torch.int16))
    assert qt.codes()[0, 2:8].tolist() == [0, 2, 2, 4, 8, 14]


@pytest.mark.parametrize("where", ["slice", "device pos", "host start"])
@pytest.mark.parametrize("value_bits,group_size", [(4, None), (2, 16), (8, 32)])
def test_sketch_pack_quantize_into_writes_store_slots(device, value_bits, group_size, where):
    """The cache's in-place append: strided inputs (k transposed as the model makes it), outputs written
    into slots [L, L + m) of larger buffers, given as slices of them, or as the whole buffers and L on the device
    (a static-capacity store) or as a host int (a growing store); everything else in the buffers is left
    untouched."""
    seed = fresh_seed()
    gen = _gen(seed)
    B, H, m, D, bits, cap, L = 2, 3, 5, 64, 96, 17, 7
    sk = SimHashSketcher(D, bits, seed=seed % 1000)
    k = _randn(B, m, H, D, gen=gen, device=device, dtype=torch.float16).transpose(1, 2)  # non-contiguous
    v = _randn(B, m, H, D, gen=gen, device=device, scale=2.0).transpose(1, 2)
    gs = group_size or D
    bufs = {"codes": torch.full((B, H, cap, bits // 8), 7, dtype=torch.uint8, device=device),
            "data": torch.full((B, H, cap, D * value_bits // 8), 7, dtype=torch.uint8, device=device),
            "scale": torch.full((B, H, cap, D // gs), 7.0, dtype=torch.float16, device=device),
            "zero": torch.full((B, H, cap, D // gs), 7.0, dtype=torch.float16, device=device)}
    before = {name: t.clone() for name, t in bufs.items()}
    if where == "slice":
        sketch_pack_quantize_into(k, v, sk.projection_on(device), value_bits=value_bits, group_size=gs,
                                  **{name: t[:, :, L:L + m] for name, t in bufs.items()})
    elif where == "host start":
        sketch_pack_quantize_into(k, v, sk.projection_on(device), value_bits=value_bits, group_size=gs, start=L,
                                  **bufs)
    else:
        pos = torch.tensor([L], dtype=torch.int32, device=device)
        sketch_pack_quantize_into(k, v, sk.projection_on(device), value_bits=value_bits, group_size=gs, pos=pos,
                                  **bufs)
        assert int(pos) == L  # the position is read, not advanced
    ref = _quantize_on_cpu(v, value_bits, group_size)
    msg = f"seed={seed}"
    assert torch.equal(bufs["data"][:, :, L:L + m], ref.data), msg
    assert torch.equal(bufs["scale"][:, :, L:L + m].view(torch.int16), ref.scale.view(torch.int16)), msg
    assert torch.equal(bufs["zero"][:, :, L:L + m].view(torch.int16), ref.zero.view(torch.int16)), msg
    _assert_codes_match(bufs["codes"][:, :, L:L + m], k, sk.projection, msg)
    for name, t in bufs.items():
        outside = torch.ones(cap, dtype=torch.bool)
        outside[L:L + m] = False
        assert torch.equal(t[:, :, outside.to(device)], before[name][:, :, outside.to(device)]), f"{msg}: {name}"


def test_sketch_pack_quantize_into_refuses_both_fill_levels_and_a_bad_start():
    k = v = torch.zeros(1, 1, 1, 32)
    out = dict(codes=torch.zeros(1, 1, 4, 4, dtype=torch.uint8), data=torch.zeros(1, 1, 4, 16, dtype=torch.uint8),
               scale=torch.zeros(1, 1, 4, 1, dtype=torch.float16), zero=torch.zeros(1, 1, 4, 1, dtype=torch.float16))
    R = torch.randn(32, 32)
    with pytest.raises(ValueError, match="not both"):
        sketch_pack_quantize_into(k, v, R, value_bits=4, group_size=32, pos=torch.zeros(1, dtype=torch.int32),
                                  start=0, **out)
    for bad in (-1, 1.0, True):
        with pytest.raises(ValueError, match="start must be an int >= 0"):
            sketch_pack_quantize_into(k, v, R, value_bits=4, group_size=32, start=bad, **out)


def test_sketch_pack_quantize_into_clamps_like_the_torch_path(device):
    """Values beyond the fp16 scale range are clamped by both paths (the checked entry point raises)."""
    from h1bkv_lite.quant import quantize_values_unchecked

    D = 32
    k = torch.randn(1, 1, 2, D, device=device)
    v = torch.randn(1, 1, 2, D, device=device)
    v[0, 0, 0, 3] = 1e6
    v[0, 0, 1, 5] = -1e6
    out = {"codes": torch.empty(1, 1, 2, 4, dtype=torch.uint8, device=device),
           "data": torch.empty(1, 1, 2, D // 2, dtype=torch.uint8, device=device),
           "scale": torch.empty(1, 1, 2, 1, dtype=torch.float16, device=device),
           "zero": torch.empty(1, 1, 2, 1, dtype=torch.float16, device=device)}
    sketch_pack_quantize_into(k, v, torch.randn(D, 32, device=device), value_bits=4, group_size=D, **out)
    ref = quantize_values_unchecked(v.cpu(), 4, D)
    assert torch.equal(out["data"].cpu(), ref.data) and torch.equal(out["scale"].cpu(), ref.scale)
    assert bool(torch.isfinite(out["scale"]).all() & torch.isfinite(out["zero"]).all())
    with pytest.raises(ValueError, match="magnitudes"):
        sketch_pack_quantize(k, v, torch.randn(D, 32, device=device), backend="triton")


# ---------------------------------------------------------------------------------------------------
# hamming_scores


@pytest.mark.parametrize("bits", [40, 64, 128, 256, 512])
def test_hamming_scores_exact(device, bits):
    seed = fresh_seed()
    gen = _gen(seed)
    sk = SimHashSketcher(32, bits, seed=1)
    qc = sk.sketch(_randn(2, 3, 7, 32, gen=gen, device=device))
    kc = sk.sketch(_randn(2, 1, 75, 32, gen=gen, device=device))  # broadcast over the head dim
    before = (qc.clone(), kc.clone())
    got = hamming_scores(qc, kc, backend="triton")
    assert torch.equal(qc, before[0]) and torch.equal(kc, before[1]), "inputs modified"
    assert got.dtype == torch.int32 and got.shape == (2, 3, 7, 75)
    assert torch.equal(got, sk.hamming(qc, kc)), f"seed={seed}"
    assert torch.equal(got, sk.hamming(qc, kc, method="xor")), f"seed={seed}"
    assert torch.equal(hamming_scores_reference(qc, kc), got)


def test_hamming_scores_extremes(device):
    a = torch.zeros(1, 4, 16, dtype=torch.uint8, device=device)
    a[0, 1] = 0xFF
    a[0, 2, ::2] = 0x0F
    a[0, 3] = torch.arange(16, dtype=torch.uint8) * 17
    got = hamming_scores(a, a, backend="triton")
    assert torch.equal(got, hamming_scores_reference(a, a))
    assert got[0, 0, 1].item() == 128 and got.diagonal(dim1=-2, dim2=-1).abs().sum().item() == 0


# ---------------------------------------------------------------------------------------------------
# decode attention


def _no_tie_queries(q: torch.Tensor, projection: torch.Tensor, gen) -> torch.Tensor:
    """Redraw the query rows that have a near-tie projection (see module docstring)."""
    for _ in range(100):
        bad = _near_ties(q, projection).any(-1)
        if not bool(bad.any()):
            return q
        q = torch.where(bad.to(q.device).unsqueeze(-1), _randn(*q.shape, gen=gen, device=q.device, dtype=q.dtype), q)
    raise AssertionError("could not draw tie-free queries")


def make_cache(*, seed, device, B, Hq, Hkv, N, W, D, bits, value_bits=4, groups=1, score="hamming",
               dtype=torch.float32, per_head_t=True):
    """Random keys/values compressed the way the cache stores them; returns (args, kwargs, raw tensors)."""
    gen = _gen(seed)
    sk = SimHashSketcher(D, bits, seed=seed % 997)
    R = sk.projection_on(device)
    k = _randn(B, Hkv, N + W, D, gen=gen, device=device, dtype=dtype)
    v = _randn(B, Hkv, N + W, D, gen=gen, device=device, dtype=dtype)
    q = _no_tie_queries(_randn(B, Hq, D, gen=gen, device=device, dtype=dtype, scale=1.5), R, gen)
    if N:
        codes = sk.sketch(k[:, :, :N])
        qt = quantize_values(v[:, :, :N], value_bits, D // groups)
        data, scale, zero = qt.data, qt.scale, qt.zero
    else:
        codes = torch.zeros(B, Hkv, 0, bits // 8, dtype=torch.uint8, device=device)
        data = torch.zeros(B, Hkv, 0, D * value_bits // 8, dtype=torch.uint8, device=device)
        scale = zero = torch.zeros(B, Hkv, 0, groups, dtype=torch.float16, device=device)
    kwargs = dict(projection=R, score=score, value_bits=value_bits, window_k=k[:, :, N:], window_v=v[:, :, N:])
    if score == "hamming":
        kwargs["temperature"] = (torch.rand(Hq, generator=gen) * 0.3 + 0.05).to(device) if per_head_t else 0.1
    else:
        kwargs["key_norms"] = k[:, :, :N].float().norm(dim=-1).half()
    return (q, codes, data, scale, zero), kwargs, dict(q=q, k=k, v=v, sketcher=sk)


def _check_decode(args, kwargs, seed, **launch):
    before = [a.clone() for a in args] + [t.clone() for t in kwargs.values() if isinstance(t, torch.Tensor)]
    got = h1b_decode_attention(*args, backend="triton", **kwargs, **launch)
    ref = h1b_decode_attention_reference(*args, **kwargs)
    after = list(args) + [t for t in kwargs.values() if isinstance(t, torch.Tensor)]
    assert all(torch.equal(a, b) for a, b in zip(before, after)), "an input was modified"
    q = args[0]
    assert got.shape == q.shape and got.dtype == q.dtype and got.device == q.device
    assert bool(torch.isfinite(got).all()), f"seed={seed}: non-finite output"
    err = (got.float() - ref.float()).abs().max().item()
    tol = OUT_TOL[q.dtype]
    config = {**_default_config(kwargs["score"], q.shape[1] // args[1].shape[1], q.device), **launch.get("config", {})}
    if config["use_dot"] and config["precision"] in ("tf32", "fp16"):
        tol = max(tol, TF32_TOL, key=lambda t: t["rtol"])
    torch.testing.assert_close(got, ref, **tol, msg=lambda m: f"seed={seed}, max err {err:.3g}\n{m}")


@triton.jit
def _apply_round_to_tf32(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(out_ptr + i, _round_to_tf32(tl.load(x_ptr + i, mask=i < n)), mask=i < n)


def _round_to_tf32_on(x: torch.Tensor) -> torch.Tensor:
    """The kernel's ``_round_to_tf32`` applied to ``x`` (float32, 1-D)."""
    out = torch.empty_like(x)
    _apply_round_to_tf32[(triton.cdiv(x.numel(), 256),)](x, out, x.numel(), BLOCK=256)
    return out


def test_round_to_tf32_is_round_to_nearest(device):
    """The GQA kernel's tf32 operands: 10 mantissa bits kept (the MMA then drops nothing), the nearest such
    value (error <= half a tf32 ulp = 2**-11 relative), both signs, ties away from zero, exact values kept."""
    seed = fresh_seed()
    gen = _gen(seed)
    x = torch.randn(4099, generator=gen) * torch.exp2(torch.randint(-20, 20, (4099,), generator=gen).float())
    mant, expo = torch.frexp(x)  # x = mant * 2**expo, 0.5 <= |mant| < 1
    exact = torch.ldexp(torch.round(mant * 2**11) / 2**11, expo)  # already 11 significant bits (10 stored)
    tie = torch.ldexp((torch.floor(mant.abs() * 2**11) + 0.5) / 2**11 * mant.sign(), expo)
    x = torch.cat([x, exact[:64], tie[:64], torch.tensor([0.0, -0.0, 1.0, -1.0])]).to(device)
    got = _round_to_tf32_on(x).cpu()
    x = x.cpu()
    assert torch.equal(got.view(torch.int32) & 0x1FFF, torch.zeros_like(got, dtype=torch.int32)), f"seed={seed}"
    ulp = torch.ldexp(torch.ones_like(x), torch.frexp(x)[1] - 11)  # tf32 ulp at |x|: 2**(e - 11)
    err = (got - x).abs()
    assert bool((err <= ulp / 2).all()), f"seed={seed}: max error {(err / ulp).max():.3g} ulp"
    assert bool((got.sign() == x.sign()).all() | (x == 0).all()), f"seed={seed}"
    n = 4099
    assert torch.equal(got[n:n + 64], x[n:n + 64]), f"seed={seed}: exact tf32 values must be kept"
    ties = got[n + 64:n + 128]
    assert bool((ties.abs() > x[n + 64:n + 128].abs()).all()), f"seed={seed}: ties round away from zero"


_DTYPES = [torch.float32, torch.float16, torch.bfloat16]
_SHAPES = [(1, 0), (37, 0), (300, 0), (1, 5), (37, 5), (300, 5)]  # (N compressed, W window)
DECODE_CASES = [
    pytest.param(score, gqa, N, W, id=f"{score}-gqa{gqa}-N{N}-W{W}")
    for score in ("hamming", "cos", "asym") for gqa in (1, 3, 4, 6, 8) for N, W in _SHAPES
]  # GQA groups 3 and 6 (not powers of two: the program's padded query rows are masked), e.g. SmolLM2's 9q/3kv


@pytest.mark.parametrize("score,gqa,N,W", DECODE_CASES)
def test_decode_matches_reference(device, score, gqa, N, W):
    seed = fresh_seed()
    i = seed % 24  # cycle head_dim, bits, batch and dtype through the grid
    D, bits = (64, 128)[i % 2], (64, 128, 256, 512)[i % 4]
    B, Hkv = (1, 2)[i % 2], (2, 1)[i % 2]
    dtype = _DTYPES[i % 3] if N != 300 else torch.float32
    args, kwargs, _ = make_cache(seed=seed, device=device, B=B, Hq=Hkv * gqa, Hkv=Hkv, N=N, W=W, D=D,
                                 bits=bits, score=score, dtype=dtype)
    _check_decode(args, kwargs, f"{seed} (D={D}, bits={bits}, B={B}, dtype={dtype})")


@pytest.mark.parametrize("gqa", [1, 3, 4])
def test_decode_per_sequence_temperature(device, gqa):
    """A ``[B, Hq]`` temperature (the cache's per-sequence calibration) scales each sequence's logits."""
    seed = fresh_seed()
    B, Hkv = 3, 2
    args, kwargs, _ = make_cache(seed=seed, device=device, B=B, Hq=Hkv * gqa, Hkv=Hkv, N=45, W=3, D=64, bits=128)
    kwargs["temperature"] = (torch.rand(B, Hkv * gqa, generator=_gen(seed + 1)) * 0.3 + 0.05).to(device)
    _check_decode(args, kwargs, seed)
    for b in range(B):  # each sequence alone with its own row of temperatures
        one = h1b_decode_attention(*(a[b:b + 1] for a in args), backend="triton",
                                   **{**kwargs, "temperature": kwargs["temperature"][b],
                                      "window_k": kwargs["window_k"][b:b + 1], "window_v": kwargs["window_v"][b:b + 1]})
        both = h1b_decode_attention(*args, backend="triton", **kwargs)[b:b + 1]
        torch.testing.assert_close(one, both, **OUT_TOL[torch.float32])


@pytest.mark.parametrize("hq,hkv", [(9, 3), (12, 2)])
@pytest.mark.parametrize("bits", [64, 128])
def test_decode_non_power_of_two_groups_long_context(device, hq, hkv, bits):
    """SmolLM2-135M's shape (9 query / 3 kv heads: GQA group 3, head_dim 64) and group 6, over ~1.1k compressed
    tokens with realistic per-head temperatures (0.05-0.3): one split (the output written directly), several
    splits, and a window. Every query head is checked (a wrong head-to-kv-head mapping or temperature index
    would move whole rows)."""
    seed = fresh_seed()
    for N, W, split_k in ((1100, 0, None), (1030, 7, 4)):
        args, kwargs, _ = make_cache(seed=seed, device=device, B=1, Hq=hq, Hkv=hkv, N=N, W=W, D=64, bits=bits)
        _check_decode(args, kwargs, f"{seed} (N={N}, W={W}, split_k={split_k})", split_k=split_k)


@pytest.mark.parametrize("value_bits,groups", [(2, 1), (8, 1), (4, 4), (2, 2), (8, 8)])
@pytest.mark.parametrize("score", ["hamming", "asym"])
def test_decode_value_formats(device, value_bits, groups, score):
    seed = fresh_seed()
    args, kwargs, _ = make_cache(seed=seed, device=device, B=2, Hq=4, Hkv=2, N=70, W=3, D=64, bits=128,
                                 value_bits=value_bits, groups=groups, score=score)
    _check_decode(args, kwargs, seed)


@pytest.mark.parametrize("W", [0, 5])
@pytest.mark.parametrize("split_k", [1, 3, 1000])
def test_decode_split_counts(device, split_k, W):
    """One split (without a window: the output written by the split kernel, no combine), a few, and more
    than the context has blocks (the combine loops over > 32 partials)."""
    seed = fresh_seed()
    for score, gqa in (("cos", 4), ("hamming", 1)):
        args, kwargs, _ = make_cache(seed=seed, device=device, B=1, Hq=2 * gqa, Hkv=2, N=700, W=W, D=64, bits=64,
                                     score=score)
        _check_decode(args, kwargs, seed, split_k=split_k, config={"block_n": 16})


@pytest.mark.parametrize("score", ["hamming", "cos"])
def test_decode_sketches_the_query_once_per_call(device, score, monkeypatch):
    """A row that is one split without a window sketches its query inside the split kernel (one launch);
    split rows read the code words (and |q|^2) the prep kernel wrote once per call (past ``query_in_split_max_n``
    tokens, here set to 0) -- sketching in every split program made B = 1, 32k MHA decode 1.5x slower on an H200.
    Both forms give the same output, within
    the tf32 tolerance (GQA's tf32 weights are rounded relative to each split's own maximum).
    96 bits: three code words, padded to four in the kernel."""
    from h1bkv_lite.kernels import decode_attention as da

    prep = _CountingLaunches(da._query_prep_kernel)
    launches = prep.grids
    monkeypatch.setattr(da, "_query_prep_kernel", prep)
    seed = fresh_seed()
    args, kwargs, _ = make_cache(seed=seed, device=device, B=2, Hq=8, Hkv=2, N=300, W=0, D=64, bits=96,
                                 score=score)
    one = h1b_decode_attention(*args, backend="triton", split_k=1, **kwargs)
    assert launches == [], f"seed={seed}: a one-split call launched the query prep kernel"
    split = h1b_decode_attention(*args, backend="triton", split_k=4, config={"query_in_split_max_n": 0}, **kwargs)
    assert len(launches) == 1, f"seed={seed}: {len(launches)} prep launches for one split call"
    torch.testing.assert_close(split, one, **TF32_TOL, msg=lambda m: f"seed={seed}\n{m}")
    _check_decode(args, kwargs, seed, split_k=4)


@pytest.mark.parametrize("score,gqa,W", [("hamming", 1, 0), ("cos", 4, 3), ("hamming", 8, 2), ("asym", 2, 0)])
def test_decode_sketches_the_query_in_split_programs_up_to_query_in_split_max_n(device, score, gqa, W, monkeypatch):
    """``query_in_split_max_n``: eager split calls of up to that many compressed tokens sketch the query inside each
    split program (one launch with the fused combine: no query prep); longer contexts, and "asym" (which reads
    ``R^T q`` from memory), still launch the prep. The forms differ only in where the query's code words (and
    ``|q|^2``) are computed: ``make_cache``'s queries have no near-zero projection, so the words are equal and
    "hamming" gives the prep form's output exactly; "cos" within the output tolerance (``|q|^2`` summed in another
    order: one fp32 rounding); both match the reference. 96 bits: three code words, padded to four in the kernel."""
    from h1bkv_lite.kernels import decode_attention as da

    prep = _CountingLaunches(da._query_prep_kernel)
    monkeypatch.setattr(da, "_query_prep_kernel", prep)
    seed = fresh_seed()
    args, kwargs, _ = make_cache(seed=seed, device=device, B=2, Hq=2 * gqa, Hkv=2, N=333, W=W, D=64, bits=96,
                                 score=score)
    base = {"block_n": 16, "single_split_max_n": 0, "query_in_split_max_n": 0}
    prepared = h1b_decode_attention(*args, backend="triton", split_k=3, config=base, **kwargs)
    assert len(prep.grids) == 1, f"seed={seed}: {len(prep.grids)} prep launches with query_in_split_max_n = 0"
    here = {**base, "query_in_split_max_n": 333}
    in_split = h1b_decode_attention(*args, backend="triton", split_k=3, config=here, **kwargs)
    launches = len(prep.grids) - 1
    assert launches == (1 if score == "asym" else 0), f"seed={seed}: {launches} prep launches, score={score!r}"
    tol = OUT_TOL[args[0].dtype] if score == "cos" else dict(rtol=0, atol=0)
    torch.testing.assert_close(in_split, prepared, **tol, msg=lambda m: f"seed={seed}\n{m}")
    _check_decode(args, kwargs, seed, split_k=3, config=here)
    before = len(prep.grids)
    longer = h1b_decode_attention(*args, backend="triton", split_k=3, config={**here, "query_in_split_max_n": 332},
                                  **kwargs)
    assert len(prep.grids) - before == 1, f"seed={seed}: a context past the limit skipped the prep"
    torch.testing.assert_close(longer, prepared, rtol=0, atol=0, msg=lambda m: f"seed={seed}\n{m}")


@pytest.mark.parametrize("score,gqa", [("hamming", 1), ("cos", 4)])
def test_decode_under_capture_splits_prepares_the_query_and_combines(device, score, gqa, monkeypatch):
    """While a CUDA graph is captured (faked here: ``_capturing`` is what ``_launch`` asks) every context is split,
    however short, the query prep runs (no ``QUERY_HERE``, whatever ``query_in_split_max_n`` says) and the combine
    kernel merges the partials (no fused combine: nothing is allocated mid-capture). The output still matches the
    reference."""
    from h1bkv_lite.kernels import decode_attention as da

    prep, combine = _CountingLaunches(da._query_prep_kernel), _CountingLaunches(da._decode_combine_kernel)
    monkeypatch.setattr(da, "_query_prep_kernel", prep)
    monkeypatch.setattr(da, "_decode_combine_kernel", combine)
    monkeypatch.setattr(da, "_capturing", lambda dev: True)
    seed = fresh_seed()
    args, kwargs, _ = make_cache(seed=seed, device=device, B=2, Hq=2 * gqa, Hkv=2, N=200, W=0, D=64, bits=64,
                                 score=score)
    config = {"block_n": 16, "single_split_max_n": 1 << 40, "query_in_split_max_n": 1 << 40}
    _check_decode(args, kwargs, seed, config=config)
    assert len(prep.grids) == 1 and len(combine.grids) == 1, (
        f"seed={seed}: {len(prep.grids)} prep and {len(combine.grids)} combine launches under capture")


def test_decode_plans_one_split_for_short_contexts():
    """Up to ``single_split_max_n`` compressed tokens a row is one split (one launch); longer contexts split
    to fill the GPU; an explicit split_k wins."""
    from h1bkv_lite.kernels.decode_attention import _plan_splits

    cpu = torch.device("cpu")
    assert _plan_splits(2048, 32, cpu, 128, None, 4, 2048) == (1, 2048)
    splits, chunk = _plan_splits(2049, 1, cpu, 128, None, 4, 2048)
    assert splits > 1 and splits * chunk >= 2049 and (splits - 1) * chunk < 2049
    assert _plan_splits(100, 1, cpu, 16, 3, 4, 2048) == (3, 48)
    assert _plan_splits(0, 1, cpu, 16, None, 4, 2048) == (0, 16)


class _CountingLaunches:
    """Stands in for a Triton kernel: records each launch's grid, then launches the real kernel."""

    def __init__(self, real):
        self.real, self.grids = real, []

    def __getitem__(self, grid):
        self.grids.append(grid)
        return self.real[grid]


@pytest.mark.parametrize("gqa,W,split_k", [(1, 0, 5), (4, 3, 3), (8, 0, 40), (3, 2, None)])
def test_decode_fused_combine_equals_the_combine_kernel(device, gqa, W, split_k, monkeypatch):
    """With ``fused_combine`` (the default) the last program of each (sequence, kv head) row to finish merges the
    row's partials inside the split kernel: no combine launch, and the row's arrival counter is zero again after
    the call. The separate combine kernel (what a CUDA graph capture runs) gives the same output: the same fp32
    operations in the same order, so equal up to one fp32 rounding of the output (the compiler may contract a
    multiply-add differently in the two kernels). 40 splits: more partials than one 32-wide block of the combine.
    Both match the reference."""
    from h1bkv_lite.kernels import decode_attention as da

    seed = fresh_seed()
    args, kwargs, _ = make_cache(seed=seed, device=device, B=2, Hq=2 * gqa, Hkv=2, N=650, W=W, D=64, bits=128,
                                 score="hamming" if gqa != 3 else "cos")
    combine = _CountingLaunches(da._decode_combine_kernel)
    monkeypatch.setattr(da, "_decode_combine_kernel", combine)
    fused = h1b_decode_attention(*args, backend="triton", split_k=split_k, config={"block_n": 16}, **kwargs)
    assert combine.grids == [], f"seed={seed}: the fused call launched the combine kernel"
    counters = da._combine_counters(args[0].device, 4)
    assert int(counters.abs().sum()) == 0, f"seed={seed}: arrival counters not reset: {counters[:4].tolist()}"
    separate = h1b_decode_attention(*args, backend="triton", split_k=split_k,
                                    config={"block_n": 16, "fused_combine": False}, **kwargs)
    assert len(combine.grids) == 1, f"seed={seed}: {len(combine.grids)} combine launches without fused_combine"
    torch.testing.assert_close(fused, separate, rtol=2**-22, atol=2**-22 * float(separate.abs().max()),
                               msg=lambda m: f"seed={seed}\n{m}")
    _check_decode(args, kwargs, seed, split_k=split_k, config={"block_n": 16})


@pytest.mark.gpu
@pytest.mark.skipif(not _CUDA, reason="needs CUDA")
def test_decode_fused_combine_on_streams_and_under_graph_capture(monkeypatch):
    """On the GPU, where the split programs of a row run concurrently: the fused combine equals the combine kernel
    on the default stream and on a side stream (each with its own counters), many calls in a row (a counter left
    non-zero would stop the next call's rows from being combined); a CUDA graph captures the combine kernel
    (nothing is allocated mid-capture; every context is split there) and its replays equal the eager calls."""
    from h1bkv_lite.kernels import decode_attention as da

    seed = fresh_seed()
    device = torch.device("cuda")
    args, kwargs, _ = make_cache(seed=seed, device=device, B=3, Hq=32, Hkv=8, N=2000, W=0, D=128, bits=128,
                                 dtype=torch.float16)

    def call(**config):  # split (eagerly too: 2000 tokens would be one split by default)
        return h1b_decode_attention(*args, backend="triton", config={"single_split_max_n": 0, **config}, **kwargs)

    separate = call(fused_combine=False)
    tol = dict(rtol=2**-10, atol=2**-10 * float(separate.abs().max()))  # fp16 outputs: one rounding apart
    for _ in range(20):
        torch.testing.assert_close(call(), separate, **tol, msg=lambda m: f"seed={seed}\n{m}")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        on_side = [call() for _ in range(5)]
    torch.cuda.current_stream().wait_stream(side)
    for out in on_side:
        torch.testing.assert_close(out, separate, **tol, msg=lambda m: f"seed={seed}\n{m}")
    combine = _CountingLaunches(da._decode_combine_kernel)
    monkeypatch.setattr(da, "_decode_combine_kernel", combine)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = h1b_decode_attention(*args, backend="triton", **kwargs)  # the defaults: one split eagerly
    assert len(combine.grids) == 1, "the captured call did not launch the combine kernel"
    graph.replay()
    torch.testing.assert_close(captured, separate, **tol, msg=lambda m: f"seed={seed}\n{m}")


@pytest.mark.gpu
@pytest.mark.skipif(not _CUDA, reason="needs CUDA")
@pytest.mark.parametrize("score,gqa,W", [("hamming", 1, 0), ("hamming", 4, 3), ("asym", 4, 5)])
def test_decode_cached_launch_equals_tritons_own_launch(score, gqa, W):
    """The eager hot path relaunches kept compiled kernels (``kernels._launcher``): the launch forms -- one split
    (default at these sizes), prep + split + the combine kernel (the query prep and combine launches), and the
    query sketched in the splits with the fused combine -- on a context that grows between calls (the loose ``N``),
    and a device-side ``n_valid``, give bit-identical outputs to Triton's own launch (``cached_launch=False``): the
    same compiled kernel on the same arguments. The kept kernels are the ones launched (the cache is not silently
    bypassed), through their loaded launchers. (Few forms: each compiles in seconds.)"""
    from h1bkv_lite.kernels import _launcher
    from h1bkv_lite.kernels import decode_attention as da
    from h1bkv_lite.kernels.decode_attention import h1b_decode_attention_unchecked

    seed = fresh_seed()
    device = torch.device("cuda")
    _launcher.clear()
    forms = [{}, {"single_split_max_n": 0, "query_in_split_max_n": 0, "fused_combine": False},
             {"single_split_max_n": 0}]
    for N in (700, 1999):
        args, kwargs, _ = make_cache(seed=seed + N, device=device, B=2, Hq=4 * gqa, Hkv=4, N=N, W=W, D=128,
                                     bits=128, score=score, dtype=torch.float16)
        n_valid = torch.tensor([N - 3], dtype=torch.int32, device=device)
        for form, nv in [(form, None) for form in forms] + [({}, n_valid)]:
            def call(cached, form=form, nv=nv):
                return h1b_decode_attention_unchecked(
                    *args, projection=kwargs["projection"], score=score, temperature=kwargs.get("temperature"),
                    key_norms=kwargs.get("key_norms"), window_k=kwargs["window_k"], window_v=kwargs["window_v"],
                    value_bits=4, n_valid=nv, config={**form, "cached_launch": cached})
            plain = call(False)
            for _ in range(2):  # the first call of a key binds through Triton, the second relaunches it
                assert torch.equal(call(True), plain), f"seed={seed}, N={N}, form={form}, n_valid={nv}"
    for kernel in (da._decode_split_kernel, da._query_prep_kernel, da._decode_combine_kernel):
        kept = _launcher._LAUNCHES[id(kernel)].compiled
        assert kept, f"no compiled {kernel.fn.__name__} was kept"
        # relaunched through its loaded launcher (no launch hooks are set here), not compiled[grid]
        assert not _launcher._launch_hooks_set()
        assert all(direct is not None for _, _, direct in kept.values()), kernel.fn.__name__


@pytest.mark.parametrize("score,gqa,W", [("hamming", 1, 0), ("hamming", 4, 3), ("asym", 2, 0), ("cos", 1, 2)])
def test_decode_length_on_whole_buffers_equals_the_call_on_slices(device, score, gqa, W):
    """``length``: a growing store passes its whole buffers (spare slots past the fill level hold garbage) and the
    fill level as a host int; the output is bit-identical to the call on the filled slices, on every launch form
    the fill levels reach (one split, query in the splits, prepared query)."""
    from h1bkv_lite.kernels.decode_attention import h1b_decode_attention_unchecked

    seed = fresh_seed()
    cap = 333
    args, kwargs, _ = make_cache(seed=seed, device=device, B=2, Hq=2 * gqa, Hkv=2, N=cap, W=W, D=64, bits=96,
                                 score=score, dtype=torch.float16)
    q, *stored = args
    norms = kwargs.get("key_norms")
    for length in (1, 77, cap - 5):
        for form in ({}, {"single_split_max_n": 0}, {"single_split_max_n": 0, "query_in_split_max_n": 0}):
            common = dict(projection=kwargs["projection"], score=score, temperature=kwargs.get("temperature"),
                          window_k=kwargs["window_k"], window_v=kwargs["window_v"], value_bits=4, config=form)
            sliced = h1b_decode_attention_unchecked(
                q, *(t[:, :, :length] for t in stored), key_norms=None if norms is None else norms[:, :, :length],
                **common)
            whole = h1b_decode_attention_unchecked(q, *stored, key_norms=norms, length=length, **common)
            assert torch.equal(whole, sliced), f"seed={seed}, length={length}, form={form}"


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_decode_on_a_device_that_is_not_current():
    """Triton launches on the current device: a call on ``cuda:1`` while ``cuda:0`` is current runs on cuda:1."""
    seed = fresh_seed()
    args, kwargs, _ = make_cache(seed=seed, device=torch.device("cuda:1"), B=1, Hq=8, Hkv=2, N=300, W=3, D=64,
                                 bits=128)
    with torch.cuda.device(0):
        _check_decode(args, kwargs, seed)


def test_combine_counters_are_zeroed_cached_and_grown():
    """One int32 buffer per device (and CUDA stream), zero when handed out, reused while big enough, replaced by a
    zeroed one twice the asked size when a call has more rows."""
    from h1bkv_lite.kernels import decode_attention as da

    cpu = torch.device("cpu")
    da._COUNTERS.pop((cpu, 0), None)
    first = da._combine_counters(cpu, 10)
    assert first.dtype == torch.int32 and first.numel() >= 10 and int(first.abs().sum()) == 0
    assert da._combine_counters(cpu, first.numel()) is first
    grown = da._combine_counters(cpu, first.numel() + 1)
    assert grown is not first and grown.numel() == 2 * (first.numel() + 1) and int(grown.abs().sum()) == 0


def test_partials_are_kept_per_stream_and_thread_and_fresh_under_capture(monkeypatch):
    """The split programs' fp32 partials (row max, log-sum-exp, output rows): one kept set per device, stream and
    thread for eager calls, of the last size asked for (another size replaces it); a capture gets its own every
    call; past ``MAX_PARTIALS`` sets all are dropped; ``release_kept_buffers`` drops them and the counters."""
    import threading

    from h1bkv_lite.kernels import decode_attention as da

    monkeypatch.setattr(da, "_PARTIALS", {})
    monkeypatch.setattr(da, "_COUNTERS", {})
    cpu = torch.device("cpu")
    m, lse, acc = da._partials(cpu, 12, 64, False)
    assert (m.shape, lse.shape, acc.shape) == ((12,), (12,), (12, 64))
    assert all(t.dtype == torch.float32 for t in (m, lse, acc))
    assert all(a is b for a, b in zip(da._partials(cpu, 12, 64, False), (m, lse, acc)))
    assert da._partials(cpu, 12, 64, True)[0] is not m and da._partials(cpu, 12, 64, True)[0] is not m
    assert len(da._PARTIALS) == 1
    other = []
    thread = threading.Thread(target=lambda: other.append(da._partials(cpu, 12, 64, False)[0]))
    thread.start()
    thread.join()
    assert other[0] is not m and len(da._PARTIALS) == 2
    resized = da._partials(cpu, 13, 64, False)
    assert resized[0].shape == (13,) and len(da._PARTIALS) == 2  # replaced, not added
    assert da._partials(cpu, 13, 128, False)[2].shape == (13, 128)
    assert da._partials(cpu, 12, 64, False)[0] is not m
    monkeypatch.setattr(da, "MAX_PARTIALS", len(da._PARTIALS))
    monkeypatch.setattr(da, "_stream_id", lambda device: 7)  # a new stream: a new set, past the bound
    da._partials(cpu, 12, 64, False)
    assert len(da._PARTIALS) == 1
    da._combine_counters(cpu, 4)
    da.release_kept_buffers()
    assert not da._PARTIALS and not da._COUNTERS


@pytest.mark.parametrize("fused", [True, False])
def test_decode_calls_reusing_partials_stay_independent(device, fused):
    """Two calls of one shape (one kept set of partials) on different caches: each equals its reference, the first
    call's output is not changed by the second (the partials are the only buffers the calls share), and repeating
    the first call after the second gives the same output bit for bit."""
    seed = fresh_seed()
    config = {"block_n": 16, "fused_combine": fused}
    first_args, first_kwargs, _ = make_cache(seed=seed, device=device, B=1, Hq=4, Hkv=2, N=333, W=2, D=64, bits=64)
    second_args, second_kwargs, _ = make_cache(seed=seed + 1, device=device, B=1, Hq=4, Hkv=2, N=333, W=2, D=64,
                                               bits=64)
    first = h1b_decode_attention(*first_args, backend="triton", split_k=4, config=config, **first_kwargs)
    kept = first.clone()
    _check_decode(second_args, second_kwargs, seed + 1, split_k=4, config=config)
    assert torch.equal(first, kept), f"seed={seed}: the second call changed the first call's output"
    again = h1b_decode_attention(*first_args, backend="triton", split_k=4, config=config, **first_kwargs)
    assert torch.equal(first, again), f"seed={seed}: the same call gave another output after a second cache's call"
    _check_decode(first_args, first_kwargs, seed, split_k=4, config=config)


@pytest.mark.parametrize("use_dot,precision,stages", [(False, "ieee", 1), (True, "ieee", 1), (True, "tf32x3", 1),
                                                       (False, "ieee", 2)])
def test_decode_matmul_forms(device, use_dot, precision, stages):
    """The fp32 multiply-add and the tl.dot forms (fp32, or three tf32 passes) agree with the reference, with the
    next tile's loads issued by hand (1 stage) or by Triton's pipeliner (2)."""
    seed = fresh_seed()
    for gqa, score in ((1, "asym"), (3, "hamming"), (4, "hamming"), (6, "asym"), (8, "cos")):
        args, kwargs, _ = make_cache(seed=seed, device=device, B=1, Hq=2 * gqa, Hkv=2, N=90, W=2, D=64,
                                     bits=128, score=score)
        _check_decode(args, kwargs, seed, config={"use_dot": use_dot, "precision": precision, "block_n": 32,
                                                  "num_stages": stages})


TENSOR_CORE_FORMS = [
    pytest.param({"score_dot": True}, id="scores-mma"),
    pytest.param({"use_dot": True, "precision": "fp16"}, id="values-fp16"),
    pytest.param({"use_dot": True, "precision": "fp16", "half2_unpack": False}, id="values-fp16-fp32-unpack"),
    pytest.param({"use_dot": True, "precision": "fp16", "num_stages": 3}, id="values-fp16-pipelined"),
    pytest.param({"use_dot": True, "precision": "fp16", "score_dot": True}, id="both"),
]


@pytest.mark.parametrize("form", TENSOR_CORE_FORMS)
@pytest.mark.parametrize("score", ["hamming", "cos", "asym"])
def test_decode_tensor_core_forms(device, form, score):
    """The query-key products as an fp16 MMA of sign matrices (``score_dot``: exact for "hamming"/"cos",
    two fp16 parts of ``R^T q`` for "asym") and the value products in fp16 (``precision="fp16"``: weights
    and dequantized values rounded to fp16, 2**-11 relative each, fp32 accumulation -- flash attention's
    precision; the tf32 tolerance, 2**-9, covers it): groups 1, 3 (padded rows), 4 and 8; 96 bits (a padding
    word), 128 and 256; one split written directly, several splits with a window, per-group values."""
    seed = fresh_seed()
    for i, (gqa, bits, N, W, split_k, groups) in enumerate(
            ((1, 128, 70, 0, None, 1), (3, 96, 300, 4, 3, 1), (4, 256, 130, 0, 1, 2), (8, 128, 300, 2, 2, 1))):
        args, kwargs, _ = make_cache(seed=seed + i, device=device, B=2, Hq=2 * gqa, Hkv=2, N=N, W=W, D=64,
                                     bits=bits, score=score, groups=groups)
        _check_decode(args, kwargs, f"{seed + i} (group {gqa}, bits {bits})", split_k=split_k,
                      config={**form, "block_n": 32})


@triton.jit
def _apply_nibbles_to_half(v_ptr, sc_ptr, lo_ptr, hi_ptr, N, C: tl.constexpr, BLOCK_N: tl.constexpr,
                           ASM: tl.constexpr):
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    c = tl.arange(0, C)
    mask = (n < N)[:, None]
    v = tl.load(v_ptr + n[:, None] * C + c[None, :], mask=mask, other=0)
    sc = tl.load(sc_ptr + n, mask=n < N, other=0.0)
    lo, hi = _nibbles_to_half(v, sc[:, None], ASM)
    tl.store(lo_ptr + n[:, None] * C + c[None, :], lo, mask=mask)
    tl.store(hi_ptr + n[:, None] * C + c[None, :], hi, mask=mask)


def test_nibbles_to_half_is_centred_code_times_scale_rounded_once(device):
    """The 4-bit value unpack of the fp16 tensor-core form: every byte value (low nibble = even column), scales
    from fp16's smallest normals to its largest usable, each ``(code - 8) * scale`` rounded once to fp16 -- exactly
    what torch's fp32 product (exact for a 4-bit code) rounded to fp16 gives. On the GPU this runs the PTX
    (packed fp16 pairs), in the interpreter the fp32 fallback."""
    gen = _gen(fresh_seed())
    N, C = 37, 256
    data = torch.arange(256, dtype=torch.uint8).repeat(N, 1)[:, torch.randperm(256, generator=gen)]
    exps = torch.randint(-14, 12, (N,), generator=gen).float()
    sc = ((1 + torch.rand(N, generator=gen)) * 2.0 ** exps).half()
    sc[:3] = torch.tensor([6.1035e-05, 1.0, 4095.0]).half()  # smallest normal, one, 8 * 4095 < 65504
    data, sc = data.to(device), sc.to(device)
    lo, hi = (torch.empty(N, C, dtype=torch.float16, device=device) for _ in range(2))
    asm = device.type == "cuda"
    _apply_nibbles_to_half[(triton.cdiv(N, 16),)](data, sc, lo, hi, N, C=C, BLOCK_N=16, ASM=asm)
    d = data.long()
    assert torch.equal(lo, (((d & 15) - 8).float() * sc.float()[:, None]).half())
    assert torch.equal(hi, (((d >> 4) - 8).float() * sc.float()[:, None]).half())


@triton.jit
def _apply_popcount(x_ptr, out_ptr, n, BLOCK: tl.constexpr, PTX: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(out_ptr + i, popcount(tl.load(x_ptr + i, mask=i < n, other=0), PTX), mask=i < n)


def test_popcount_counts_every_bit(device):
    """The decode kernel's popcount: the ``popc`` instruction on the GPU, SWAR in the interpreter; words with the
    sign bit set, zero, all ones, single bits and random ones, against torch's bit count."""
    gen = _gen(fresh_seed())
    words = torch.cat([torch.tensor([0, -1, -2**31, 2**31 - 1, 1]), 1 << torch.arange(31),
                       torch.randint(-2**31, 2**31 - 1, (1000,), generator=gen)]).to(torch.int32)
    expected = ((words.long() & 0xFFFFFFFF)[:, None] >> torch.arange(32)).bitwise_and(1).sum(-1).to(torch.int32)
    x = words.to(device)
    out = torch.empty_like(x)
    _apply_popcount[(triton.cdiv(x.numel(), 256),)](x, out, x.numel(), BLOCK=256, PTX=device.type == "cuda")
    assert torch.equal(out.cpu(), expected)


@pytest.mark.gpu
@pytest.mark.skipif(not _CUDA, reason="the PTX runs on CUDA only")
def test_decode_half2_unpack_ptx_equals_its_fallback(monkeypatch):
    """On the GPU, the decode kernel with the PTX unpack gives bit for bit the output of the same kernel compiled
    with the fp32 fallback (what the CPU interpreter runs): MHA and GQA, split and direct, with a window."""
    import h1bkv_lite.kernels.decode_attention as da

    seed = fresh_seed()
    cuda = torch.device("cuda")
    for i, (gqa, N, W, split_k) in enumerate(((1, 333, 0, None), (4, 1000, 3, 5), (8, 77, 0, 1))):
        args, kwargs, _ = make_cache(seed=seed + i, device=cuda, B=2, Hq=2 * gqa, Hkv=2, N=N, W=W, D=128,
                                     bits=128, dtype=torch.float16)
        config = {"use_dot": True, "precision": "fp16", "half2_unpack": True, "block_n": 64}
        ptx = h1b_decode_attention(*args, **kwargs, split_k=split_k, config=config)
        monkeypatch.setattr(da, "_RUNS_PTX", False)
        fallback = h1b_decode_attention(*args, **kwargs, split_k=split_k, config=config)
        monkeypatch.setattr(da, "_RUNS_PTX", True)
        assert torch.equal(ptx, fallback), f"seed={seed + i}, group {gqa}: max diff {(ptx - fallback).abs().max()}"


def test_decode_config_is_checked(device):
    args, kwargs, _ = make_cache(seed=fresh_seed(), device=device, B=1, Hq=4, Hkv=2, N=20, W=0, D=64, bits=64)
    with pytest.raises(ValueError, match="unknown keys"):
        h1b_decode_attention(*args, **kwargs, backend="triton", config={"blockn": 32})
    with pytest.raises(ValueError, match="precision"):
        h1b_decode_attention(*args, **kwargs, backend="triton", config={"precision": "fp8"})
    with pytest.raises(ValueError, match="needs use_dot=True"):
        h1b_decode_attention(*args, **kwargs, backend="triton", config={"precision": "fp16", "use_dot": False})
    with pytest.raises(ValueError, match="power of two"):
        h1b_decode_attention(*args, **kwargs, backend="triton", config={"block_n": 48})
    with pytest.raises(ValueError, match=r"config\['maxnreg'\] must be in \[1, inf\]"):
        h1b_decode_attention(*args, **kwargs, backend="triton", config={"maxnreg": 0})
    with pytest.raises(TypeError, match=r"config\['score_dot'\] must be a bool"):
        h1b_decode_attention(*args, **kwargs, backend="triton", config={"score_dot": "no"})
    with pytest.raises(TypeError, match=r"config\['cached_launch'\] must be a bool"):
        h1b_decode_attention(*args, **kwargs, backend="triton", config={"cached_launch": 1})
    with pytest.raises(ValueError, match=r"config\['single_split_max_n'\] must be in \[0, inf\]"):
        h1b_decode_attention(*args, **kwargs, backend="triton", config={"single_split_max_n": -5})
    with pytest.raises(ValueError, match=r"config\['query_in_split_max_n'\] must be in \[0, inf\]"):
        h1b_decode_attention(*args, **kwargs, backend="triton", config={"query_in_split_max_n": -1})
    with pytest.raises(ValueError, match=r"config\['num_warps'\] must be a power of two"):
        h1b_decode_attention(*args, **kwargs, backend="triton", config={"num_warps": 3})
    with pytest.raises(ValueError, match=r"must be >= 16 with use_dot=True"):  # GQA: tl.dot by default
        h1b_decode_attention(*args, **kwargs, backend="triton", config={"block_n": 8})
    mha_args = (args[0][:, :2], *args[1:])  # one query head per kv head: no tl.dot by default
    with pytest.raises(ValueError, match=r"precision='tf32' is a tensor-core \(tl.dot\) form"):
        h1b_decode_attention(*mha_args, **{**kwargs, "temperature": 0.1}, backend="triton",
                             config={"precision": "tf32"})
    for backend in ("torch", "triton"):  # checked whichever path runs
        with pytest.raises(ValueError, match="needs use_dot=True"):
            h1b_decode_attention(*args, **kwargs, backend=backend, config={"precision": "fp16", "use_dot": False})
    # GQA with tl.dot turned off and no precision named: the fp32 multiply-adds ("ieee"), as before fp16 existed
    exact = h1b_decode_attention(*args, **kwargs, backend="triton", config={"use_dot": False})
    torch.testing.assert_close(exact, h1b_decode_attention_reference(*args, **kwargs), **OUT_TOL[args[0].dtype])


def test_launch_configs_are_shared_and_never_written():
    """The launch path reads the defaults (and the split kernel's constexprs) from caches, shared between calls:
    overrides make a new dict and leave the defaults as ``_default_config`` gives them."""
    from h1bkv_lite.kernels import decode_attention as da

    cpu = torch.device("cpu")
    shared = da._merged_config("hamming", 4, cpu, None)
    assert shared is da._merged_config("hamming", 4, cpu, {}) and shared == _default_config("hamming", 4, cpu)
    merged = da._merged_config("hamming", 4, cpu, {"use_dot": False, "block_n": 32})
    assert merged is not shared and merged["precision"] == "ieee" and merged["block_n"] == 32
    assert shared == _default_config("hamming", 4, cpu), "an override changed the shared defaults"
    # the kept constexprs follow what they are computed from, the PTX switch included (a test turns it off)
    meta = dict(D=128, bits=128, group=4, value_groups=1, value_bits=4, score_id=0, per_head_t=True, n_on_device=False,
                direct=False, query_here=True, fused=True, block_n=64, use_dot=True, precision="fp16", score_dot=False,
                half2=True, num_stages=3, num_warps=4, maxnreg=None)
    assert da._split_meta(**meta, asm=True)[0]["ASM"] is True and da._split_meta(**meta, asm=False)[0]["ASM"] is False


@pytest.mark.parametrize("precision", ["fp16", "tf32"])
def test_decode_tensor_core_products_round_to_nearest(device, precision):
    """GQA's tensor-core value products, fp16 (the default) and tf32, round their operands to nearest (the
    interpreter too, which then multiplies in fp32): the fp32 output differs from the exact "ieee" form's, by
    no more than TF32_TOL, and is unbiased."""
    seed = fresh_seed()
    assert _default_config("hamming", 8, device)["precision"] == "fp16"
    args, kwargs, _ = make_cache(seed=seed, device=device, B=2, Hq=16, Hkv=2, N=700, W=0, D=64, bits=128)
    args = (args[0].float(), *args[1:])
    rounded = h1b_decode_attention(*args, backend="triton", **kwargs, config={"precision": precision})
    exact = h1b_decode_attention(*args, backend="triton", **kwargs, config={"precision": "ieee"})
    assert not torch.equal(rounded, exact), f"seed={seed}: the {precision} operands were not rounded"
    torch.testing.assert_close(rounded, exact, **TF32_TOL, msg=lambda m: f"seed={seed}\n{m}")
    # unbiased: each head's columns share its weights' errors, so count heads. Truncation moved every head the
    # same way (all 32 negative); round-to-nearest leaves ~half of them positive (P(<= 3 or >= 29) ~ 3e-6).
    positive = int(((rounded - exact).mean(-1) > 0).sum())
    assert 4 <= positive <= 28, f"seed={seed}: {positive} of 32 heads moved up (one-signed error)"


@pytest.mark.parametrize("split_k", [None, 3, 7])
@pytest.mark.parametrize("gqa,score,W,stages", [(1, "hamming", 0, 1), (4, "hamming", 0, 1), (3, "asym", 4, 1),
                                                (2, "cos", 0, 1), (4, "hamming", 0, 3), (8, "hamming", 5, 3),
                                                (6, "asym", 2, 3)])
def test_decode_n_valid_reads_only_the_filled_slots(device, split_k, gqa, score, W, stages):
    """A static-capacity cache: N slots, the first n_valid (a device int) hold tokens and the rest garbage. The
    output equals the reference over the first n_valid slots (and the checked call with only those slots),
    whatever the split plan over N; one compiled kernel serves every n_valid (a CUDA graph replays it). With the
    tile loop pipelined (3 stages: Triton's asynchronous copies) too: its loads run ahead of the tiles it
    processes, and must not read past n_valid either."""
    seed = fresh_seed()
    gen = _gen(seed)
    N, n = 300, int(torch.randint(1, 300, (1,), generator=gen))
    args, kwargs, _ = make_cache(seed=seed, device=device, B=2, Hq=2 * gqa, Hkv=2, N=N, W=W, D=64, bits=128,
                                 score=score)
    q, codes, data, scale, zero = args
    junk = torch.randint(0, 256, codes[:, :, n:].shape, generator=gen, dtype=torch.uint8).to(device)
    codes[:, :, n:] = junk  # what a later decode step would write there: must not be read
    data[:, :, n:] = 255
    scale[:, :, n:] = 1e4
    n_valid = torch.tensor([n], dtype=torch.int32, device=device)
    got = h1b_decode_attention(*args, backend="triton", split_k=split_k, n_valid=n_valid,
                               config={"num_stages": stages}, **kwargs)
    short = {k: (v[:, :, :n] if k == "key_norms" else v) for k, v in kwargs.items()}
    ref = h1b_decode_attention_reference(q, codes[:, :, :n], data[:, :, :n], scale[:, :, :n], zero[:, :, :n],
                                         **short)
    tol = OUT_TOL[q.dtype]
    if _default_config(score, gqa, device)["use_dot"]:
        tol = max(tol, TF32_TOL, key=lambda t: t["rtol"])
    torch.testing.assert_close(got, ref, **tol, msg=lambda m: f"seed={seed}, n={n}\n{m}")
    assert torch.equal(h1b_decode_attention_reference(*args, n_valid=n_valid, **kwargs), ref)


def test_decode_n_valid_is_checked(device):
    args, kwargs, _ = make_cache(seed=fresh_seed(), device=device, B=1, Hq=2, Hkv=2, N=20, W=0, D=64, bits=64)
    with pytest.raises(TypeError, match="n_valid must be a torch.Tensor"):
        h1b_decode_attention(*args, **kwargs, n_valid=5)
    with pytest.raises(ValueError, match="n_valid must be one int32 element"):
        h1b_decode_attention(*args, **kwargs, n_valid=torch.tensor([5, 6], dtype=torch.int32, device=device))
    with pytest.raises(TypeError, match=r"n_valid must have dtype in \(int32\)"):
        h1b_decode_attention(*args, **kwargs, n_valid=torch.tensor([5], device=device))


@pytest.mark.parametrize("trend", ["rising", "falling"])
def test_decode_rebases_running_max(device, trend):
    """Logits that climb across the context force the lazily moved softmax maximum to re-base many times."""
    seed = fresh_seed()
    for gqa in (1, 4):
        args, kwargs, _ = make_cache(seed=seed, device=device, B=1, Hq=2 * gqa, Hkv=2, N=300, W=0, D=64, bits=128,
                                     score="cos")
        ramp = torch.linspace(0.1, 60.0, 300, device=device)
        kwargs["key_norms"] = (ramp if trend == "rising" else ramp.flip(0)).half().expand(1, 2, 300).contiguous()
        _check_decode(args, kwargs, seed, config={"block_n": 16})


def test_decode_window_only_and_scalar_temperature(device):
    seed = fresh_seed()
    args, kwargs, _ = make_cache(seed=seed, device=device, B=2, Hq=4, Hkv=2, N=0, W=6, D=64, bits=64,
                                 per_head_t=False)
    _check_decode(args, kwargs, seed)
    args, kwargs, _ = make_cache(seed=seed, device=device, B=2, Hq=4, Hkv=2, N=20, W=6, D=64, bits=64)
    for t in (0.1, torch.tensor(0.1), torch.tensor([0.1], device=device)):  # one temperature for all heads
        _check_decode(args, {**kwargs, "temperature": t}, seed)


@pytest.mark.parametrize("score", ["hamming", "cos", "asym"])
@pytest.mark.parametrize("n, w", [(0, 6), (20, 0), (20, 6)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_decode_unused_arguments_have_the_dtypes_the_kernel_reads(monkeypatch, device, score, n, w, dtype):
    """The split kernel's compressed-key branch is compiled even where it does not run (N = 0 with a window), so
    every pointer it may read has the dtype it reads: int32 query words, float32 norms and projections. (A
    window-only call once passed the fp16 query as the words: the interpreter never ran that branch, the
    compiler refused it on the GPU.) Checked on the launch arguments, so the CPU cases catch it too."""
    import h1bkv_lite.kernels.decode_attention as da

    seen = {}

    class _Recorder:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                names = list(inspect.signature(_decode_split_kernel.fn).parameters)
                seen.update(zip(names, args))
                return _decode_split_kernel[grid](*args, **kwargs)
            return launch

    monkeypatch.setattr(da, "_decode_split_kernel", _Recorder())
    seed = fresh_seed()
    args, kwargs, _ = make_cache(seed=seed, device=device, B=1, Hq=4, Hkv=2, N=n, W=w, D=64, bits=64, score=score,
                                 dtype=dtype)
    if w == 0:
        kwargs.pop("window_k"), kwargs.pop("window_v")
    t = da._check_temperature(kwargs.get("temperature"), score, 4, device)  # as the checked entry point passes it
    da.h1b_decode_attention_unchecked(*args, projection=kwargs["projection"], score=score, temperature=t,
                                      key_norms=kwargs.get("key_norms"), window_k=kwargs.get("window_k"),
                                      window_v=kwargs.get("window_v"), value_bits=kwargs["value_bits"])
    assert seen["qw_ptr"].dtype == torch.int32, f"query words passed as {seen['qw_ptr'].dtype}"
    assert seen["qsq_ptr"].dtype == torch.float32 and seen["qp_ptr"].dtype == torch.float32
    assert seen["kc_ptr"].dtype == torch.int32


def test_decode_strided_cache(device):
    """Caches that are slices of larger preallocated buffers (as a growing KV cache is) need no copy."""
    seed = fresh_seed()
    args, kwargs, _ = make_cache(seed=seed, device=device, B=2, Hq=4, Hkv=2, N=50, W=4, D=64, bits=128,
                                 score="asym")
    q, codes, data, scale, zero = args

    def in_bigger(t):  # same values, stored in the first N rows of a buffer with room for 64 more tokens
        big = torch.zeros(t.shape[0], t.shape[1], t.shape[2] + 64, *t.shape[3:], dtype=t.dtype, device=t.device)
        big[:, :, : t.shape[2]] = t
        return big[:, :, : t.shape[2]]

    strided = [q, *(in_bigger(t) for t in (codes, data, scale, zero))]
    kwargs["key_norms"] = in_bigger(kwargs["key_norms"].unsqueeze(-1)).squeeze(-1)
    assert not strided[1].is_contiguous()
    _check_decode(strided, kwargs, seed)


@pytest.mark.parametrize("score", ["hamming", "cos", "asym"])
@pytest.mark.parametrize("gqa,W", [(1, 0), (3, 2), (4, 5), (8, 3)])
def test_reference_matches_h1b_attention(device, score, gqa, W):
    """The kernel reference agrees with the core library's h1b_attention at Tq = 1 on the same cache."""
    seed = fresh_seed()
    args, kwargs, raw = make_cache(seed=seed, device=device, B=2, Hq=2 * gqa, Hkv=2, N=41, W=W, D=64,
                                   bits=128, score=score)
    ref = h1b_decode_attention_reference(*args, **kwargs)
    lib = h1b_attention(raw["q"].unsqueeze(2), raw["k"], raw["v"], sketcher=raw["sketcher"], score=score,
                        temperature=kwargs.get("temperature"), value_bits=4, window=W)[:, :, 0]
    torch.testing.assert_close(ref, lib, rtol=1e-5, atol=1e-6, msg=lambda m: f"seed={seed}\n{m}")


@pytest.mark.parametrize("bits", [64, 128])
def test_cache_kernels_equal_torch_path_at_smollm2_shape(device, bits):
    """H1BCache(backend="triton") against backend="torch" on the same q/k/v at SmolLM2-135M's attention shape
    (9 query / 3 kv heads: GQA group 3, head_dim 64; value_bits 4, window 0, per-head temperatures 0.05-0.3):
    after a prefill and decode steps the append kernel has stored the torch path's codes, values, scales and
    zeros, and every decode step's kernel output equals the torch path's."""
    from transformers import LlamaConfig

    from h1bkv_lite.cache import H1BCache

    config = LlamaConfig(vocab_size=64, hidden_size=576, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=9, num_key_value_heads=3, head_dim=64)
    seed = fresh_seed()
    gen = _gen(seed)
    P, S = 300, 4
    k = _randn(1, 3, P + S, 64, gen=gen, device=device)
    v = _randn(1, 3, P + S, 64, gen=gen, device=device)
    temperature = torch.rand(9, generator=gen) * 0.25 + 0.05
    caches = {b: H1BCache(config, bits=bits, temperature=temperature, value_bits=4, window=0, backend=b)
              for b in ("torch", "triton")}
    R = caches["torch"].layers[0].sketcher.projection_on(device)
    q = _randn(1, 9, P + S, 64, gen=gen, device=device, scale=1.5)
    q[:, :, P:] = _no_tie_queries(q[:, :, P:].transpose(1, 2).contiguous(), R, gen).transpose(1, 2)
    outs = {}
    for name, cache in caches.items():
        layer = cache.layers[0]
        layer.update(k[:, :, :P], v[:, :, :P])
        layer.attend(q[:, :, :P])
        steps = []
        for t in range(P, P + S):
            layer.update(k[:, :, t:t + 1], v[:, :, t:t + 1])
            steps.append(layer.attend(q[:, :, t:t + 1]))
        outs[name] = torch.cat(steps, dim=2)
    msg = f"seed={seed}"
    ref, got = caches["torch"].layers[0].stored, caches["triton"].layers[0].stored
    assert torch.equal(got["values"], ref["values"]), msg
    assert torch.equal(got["value_scales"].view(torch.int16), ref["value_scales"].view(torch.int16)), msg
    assert torch.equal(got["value_zeros"].view(torch.int16), ref["value_zeros"].view(torch.int16)), msg
    flips = _assert_codes_match(got["key_codes"], k, R, msg)
    assert flips <= 2, f"{msg}: {flips} near-tie flips (expected ~0)"
    tol = TF32_TOL  # GQA value products in tf32 (rounded to nearest on every device)
    torch.testing.assert_close(outs["triton"], outs["torch"], **tol, msg=lambda m: f"{msg}\n{m}")


def test_auto_backend_on_cpu_is_the_reference():
    seed = fresh_seed()
    args, kwargs, _ = make_cache(seed=seed, device=torch.device("cpu"), B=1, Hq=2, Hkv=1, N=20, W=2, D=64,
                                 bits=64)
    assert torch.equal(h1b_decode_attention(*args, **kwargs), h1b_decode_attention_reference(*args, **kwargs))
    x = torch.randn(4, 64)
    R = SimHashSketcher(64, 64).projection
    assert torch.equal(sketch_pack(x, R), SimHashSketcher(64, 64).sketch(x))


# ---------------------------------------------------------------------------------------------------
# bad inputs


def test_backend_choice_errors():
    with pytest.raises(ValueError, match="backend"):
        use_triton("cuda", torch.device("cpu"), _decode_split_kernel)

    def compiled_kernel():  # stands for a kernel that was not defined under the interpreter
        pass

    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        use_triton("triton", torch.device("cpu"), compiled_kernel)
    assert use_triton("torch", torch.device("cpu"), compiled_kernel) is False


def test_sketch_pack_bad_inputs():
    R = SimHashSketcher(64, 128).projection
    with pytest.raises(TypeError, match="x"):
        sketch_pack([1.0] * 64, R)
    with pytest.raises(TypeError, match="x must have dtype"):
        sketch_pack(torch.zeros(2, 64, dtype=torch.int32), R)
    with pytest.raises(ValueError, match="projection.shape"):
        sketch_pack(torch.zeros(2, 32), R)
    with pytest.raises(TypeError, match="projection"):
        sketch_pack(torch.zeros(2, 64), R.double())
    with pytest.raises(ValueError, match="bits"):
        sketch_pack(torch.zeros(2, 64), torch.zeros(64, 12))
    with pytest.raises(ValueError, match="backend"):
        sketch_pack(torch.zeros(2, 64), R, backend="gpu")
    k = torch.randn(3, 64)
    with pytest.raises(ValueError, match="leading dims"):
        sketch_pack_quantize(k, torch.randn(4, 64), R)
    with pytest.raises(ValueError, match="value_bits"):
        sketch_pack_quantize(k, torch.randn(3, 64), R, value_bits=3)
    with pytest.raises(ValueError, match="group_size"):
        sketch_pack_quantize(k, torch.randn(3, 64), R, group_size=48)
    if is_interpreted(_decode_split_kernel):  # the Triton path needs whole bytes per group
        with pytest.raises(ValueError, match="group_size"):
            sketch_pack_quantize(k, torch.randn(3, 64), R, value_bits=4, group_size=1, backend="triton")
    with pytest.raises(ValueError, match="NaN"):
        sketch_pack_quantize(k, torch.full((3, 64), float("nan")), R)


def test_hamming_bad_inputs():
    a = torch.zeros(2, 3, 16, dtype=torch.uint8)
    with pytest.raises(TypeError, match="q_codes"):
        hamming_scores(a.float(), a)
    with pytest.raises(ValueError, match="k_codes"):
        hamming_scores(a, torch.zeros(16, dtype=torch.uint8))
    with pytest.raises(ValueError, match="code width"):
        hamming_scores(a, torch.zeros(2, 3, 8, dtype=torch.uint8))
    with pytest.raises(ValueError, match="broadcast"):
        hamming_scores(a, torch.zeros(3, 3, 16, dtype=torch.uint8))


def _good_call(**overrides):
    args, kwargs, _ = make_cache(seed=0, device=torch.device("cpu"), B=1, Hq=4, Hkv=2, N=8, W=2, D=64,
                                 bits=64, score="cos")
    names = ("q", "key_codes", "values_packed", "value_scale", "value_zero")
    call = dict(zip(names, args), **kwargs)
    call.update(overrides)
    return lambda: h1b_decode_attention(**call)


@pytest.mark.parametrize(
    "overrides,error,match",
    [
        (dict(q=torch.zeros(1, 4, 64, dtype=torch.int8)), TypeError, "q must have dtype"),
        (dict(q=torch.zeros(1, 4, 1, 64)), ValueError, "q must have 3 dims"),
        (dict(q=torch.zeros(1, 3, 64)), ValueError, "multiple of key_codes heads"),
        (dict(q=torch.zeros(2, 4, 64)), ValueError, "key_codes batch"),
        (dict(key_codes=torch.zeros(1, 2, 8, 8, dtype=torch.int32)), TypeError, "key_codes"),
        (dict(projection=torch.zeros(64, 128)), ValueError, "projection must have shape"),
        (dict(values_packed=torch.zeros(1, 2, 8, 64, dtype=torch.uint8)), ValueError, "values_packed"),
        (dict(value_scale=torch.zeros(1, 2, 8, 3, dtype=torch.float16)), ValueError, "value_scale"),
        (dict(value_bits=3), ValueError, "value_bits"),
        (dict(score="dot"), ValueError, "score"),
        (dict(key_norms=None), ValueError, "key_norms is required"),
        (dict(key_norms=torch.zeros(1, 2, 9)), ValueError, "key_norms must have shape"),
        (dict(temperature=0.5), ValueError, "temperature applies"),
        (dict(score="hamming"), ValueError, "key_norms is not used"),
        (dict(score="hamming", key_norms=None), ValueError, "temperature is required"),
        (dict(score="hamming", key_norms=None, temperature=torch.ones(3)), ValueError, "temperature must be"),
        (dict(score="hamming", key_norms=None, temperature=-1.0), ValueError, "temperature must be"),
        (dict(score="hamming", key_norms=None, temperature="1"), TypeError, "temperature"),
        (dict(window_v=None), ValueError, "window_k and window_v"),
        (dict(window_k=torch.zeros(1, 2, 2, 32), window_v=torch.zeros(1, 2, 2, 32)), ValueError, "window_k"),
        (dict(split_k=0), ValueError, "split_k"),
        (dict(backend="cuda"), ValueError, "backend"),
    ],
)
def test_decode_bad_inputs(overrides, error, match):
    with pytest.raises(error, match=match):
        _good_call(**overrides)()


def test_decode_nothing_to_attend_and_bits_for_triton():
    empty = dict(key_codes=torch.zeros(1, 2, 0, 8, dtype=torch.uint8),
                 values_packed=torch.zeros(1, 2, 0, 32, dtype=torch.uint8),
                 value_scale=torch.zeros(1, 2, 0, 1, dtype=torch.float16),
                 value_zero=torch.zeros(1, 2, 0, 1, dtype=torch.float16),
                 key_norms=torch.zeros(1, 2, 0), window_k=None, window_v=None)
    with pytest.raises(ValueError, match="nothing to attend"):
        _good_call(**empty)()
    if is_interpreted(_decode_split_kernel):
        args, kwargs, _ = make_cache(seed=1, device=torch.device("cpu"), B=1, Hq=2, Hkv=1, N=4, W=0, D=64,
                                     bits=40, score="cos")
        assert math.isfinite(h1b_decode_attention(*args, **kwargs).sum().item())  # torch path takes any bits
        with pytest.raises(ValueError, match="multiple of 32"):
            h1b_decode_attention(*args, backend="triton", **kwargs)

