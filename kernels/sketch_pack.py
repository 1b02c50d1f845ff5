"""Sketch-and-pack kernels: ``sign(x @ R)`` straight into packed bytes, and the fused cache-append path.

References: :meth:`h1bkv_lite.SimHashSketcher.sketch` (bit layout: sketch bit ``i`` in bit ``i % 8`` of
byte ``i // 8``, 1 = projection >= 0, sign(0) = +1) and :func:`h1bkv_lite.quantize_values`.

Exactness. The projection is an fp32 dot product (``input_precision="ieee"``: no tf32), but its
summation order differs from torch's matmul, so a projection within a few ulps of 0 can land on the
other side of it: codes match bit-exactly except on such near-ties (|x @ R| ~ 1e-7 |x| |R_i|, which
random data essentially never produces; the tests count them). The value quantization reproduces
``quantize_values`` exactly: same fp32 min/max, correctly rounded division (``div_rn``), fp16 zero
rounded down and scale rounded up by the same nearest-then-step rule, round-half-to-even codes.
"""
from __future__ import annotations

import functools

import torch

from h1bkv_lite._validation import FLOAT_DTYPES, check_same_device, check_tensor
from h1bkv_lite.quant import QuantizedTensor, check_value_format, quantize_values
from h1bkv_lite.sketch import pack_bits

from ._common import cdiv, next_pow2, pack_sign_bytes, tl, triton, use_triton
from ._launcher import FixedArgs, launch

_FP16_MAX = torch.finfo(torch.float16).max


@triton.jit
def _project_tile(x_ptr, r_ptr, rows, row_mask, stride_xm, D, BITS, col0,
                  BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_COLS: tl.constexpr):
    """fp32 ``x[rows] @ R[:, col0:col0 + BLOCK_COLS]`` -> ``[BLOCK_M, BLOCK_COLS]``, K looped in chunks."""
    cols = col0 + tl.arange(0, BLOCK_COLS)
    acc = tl.zeros((BLOCK_M, BLOCK_COLS), dtype=tl.float32)
    for k0 in range(0, D, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + rows[:, None] * stride_xm + ks[None, :],
                    mask=row_mask[:, None] & (ks < D)[None, :], other=0.0).to(tl.float32)
        r = tl.load(r_ptr + ks[:, None] * BITS + cols[None, :],
                    mask=(ks < D)[:, None] & (cols < BITS)[None, :], other=0.0)
        acc += tl.dot(x, r, input_precision="ieee")
    return acc


@triton.jit
def _sketch_pack_kernel(x_ptr, r_ptr, out_ptr, M, D, NBYTES, stride_xm,
                        BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_BYTES: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_b = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < M
    proj = _project_tile(x_ptr, r_ptr, rows, row_mask, stride_xm, D, NBYTES * 8, pid_b * BLOCK_BYTES * 8,
                         BLOCK_M, BLOCK_K, BLOCK_BYTES * 8)
    packed = pack_sign_bytes(proj, BLOCK_M, BLOCK_BYTES)
    nbytes = pid_b * BLOCK_BYTES + tl.arange(0, BLOCK_BYTES)
    tl.store(out_ptr + rows[:, None] * NBYTES + nbytes[None, :], packed.to(tl.uint8),
             mask=row_mask[:, None] & (nbytes < NBYTES)[None, :])


@triton.jit
def _round_fp16(x, DOWN: tl.constexpr):
    """fp32 -> fp16 rounded toward -inf (DOWN) or +inf: round to nearest, then step one fp16 ulp if
    that went the wrong way (the rule of ``h1bkv_lite.quant._round_fp16``, with nextafter done on the
    fp16 bit pattern)."""
    h = x.to(tl.float16)
    hb = h.to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
    neg = hb >= 0x8000
    is_zero = (hb & 0x7FFF) == 0
    if DOWN:
        wrong = h.to(tl.float32) > x
        stepped = tl.where(is_zero, 0x8001, tl.where(neg, hb + 1, hb - 1))
    else:
        wrong = h.to(tl.float32) < x
        stepped = tl.where(is_zero, 0x0001, tl.where(neg, hb - 1, hb + 1))
    out = tl.where(wrong, stepped, hb)
    return out.to(tl.int16).to(tl.float16, bitcast=True)


@triton.jit
def _round_half_even(t):
    """torch.round for t >= 0 (codes are never negative here)."""
    f = tl.floor(t)
    r = t - f
    odd = (f - 2.0 * tl.floor(f * 0.5)) == 1.0
    return f + tl.where((r > 0.5) | ((r == 0.5) & odd), 1.0, 0.0)


@triton.jit(do_not_specialize=["M", "SEQ", "pos0"],
            do_not_specialize_on_alignment=["codes_ptr", "data_ptr", "scale_ptr", "zero_ptr"])
def _sketch_pack_quantize_kernel(
    k_ptr, r_ptr, codes_ptr, v_ptr, data_ptr, scale_ptr, zero_ptr,
    M, D, NBYTES, SEQ, HEADS,
    stride_kb, stride_kh, stride_kt, stride_vb, stride_vh, stride_vt,
    stride_cbh, stride_dbh, stride_sbh, stride_zbh,
    GROUPS, GROUP_SIZE, DATA_BYTES, V_LIMIT, pos_ptr, pos0,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_BYTES: tl.constexpr,
    GROUPS_P: tl.constexpr, GROUP_P: tl.constexpr, VALUE_BITS: tl.constexpr, POS_ON_DEVICE: tl.constexpr,
):
    """Row ``r`` of the ``M = B * HEADS * SEQ`` new tokens is token ``t = r % SEQ`` of head ``h`` and
    sequence ``b`` (``r // SEQ = b * HEADS + h``); inputs are read through their strides and outputs
    written at ``out + (r // SEQ) * stride_?bh + t * row_width``, so the outputs may be slots of a larger
    preallocated store (the cache's in-place append), at slot ``pos0 + t`` (``pos0 = 0`` for slot views, the fill
    level for whole buffers); with ``POS_ON_DEVICE`` token ``t`` goes to slot ``pos_ptr[0] + t`` of the outputs
    instead (a static-capacity store). Values are clamped to +-``V_LIMIT``
    (the fp16 scale/zero range; the checked entry point rejects larger ones before launching)."""
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < M
    bh = rows // SEQ
    tok = rows % SEQ
    k_off = (bh // HEADS) * stride_kb + (bh % HEADS) * stride_kh + tok * stride_kt
    v_off = (bh // HEADS) * stride_vb + (bh % HEADS) * stride_vh + tok * stride_vt
    if POS_ON_DEVICE:
        slot = tok + tl.load(pos_ptr)
    else:
        slot = tok + pos0

    # keys -> sign bits, BLOCK_BYTES bytes of the code at a time
    for b0 in range(0, NBYTES, BLOCK_BYTES):
        proj = _project_tile(k_ptr, r_ptr, k_off, row_mask, 1, D, NBYTES * 8, b0 * 8,
                             BLOCK_M, BLOCK_K, BLOCK_BYTES * 8)
        packed = pack_sign_bytes(proj, BLOCK_M, BLOCK_BYTES)
        nbytes = b0 + tl.arange(0, BLOCK_BYTES)
        tl.store(codes_ptr + (bh * stride_cbh + slot * NBYTES)[:, None] + nbytes[None, :], packed.to(tl.uint8),
                 mask=row_mask[:, None] & (nbytes < NBYTES)[None, :])

    # values -> per-group affine codes; tile [BLOCK_M, GROUPS_P, GROUP_P], element (g, j) = column g*gs + j
    LEVELS: tl.constexpr = (1 << VALUE_BITS) - 1
    PER_BYTE: tl.constexpr = 8 // VALUE_BITS
    g = tl.arange(0, GROUPS_P)
    j = tl.arange(0, GROUP_P)
    valid = (g < GROUPS)[:, None] & (j < GROUP_SIZE)[None, :]
    mask3 = row_mask[:, None, None] & valid[None, :, :]
    col = g[:, None] * GROUP_SIZE + j[None, :]
    v = tl.load(v_ptr + v_off[:, None, None] + col[None, :, :], mask=mask3, other=0.0).to(tl.float32)
    v = tl.minimum(tl.maximum(v, -V_LIMIT), V_LIMIT)
    real_group = (g < GROUPS)[None, :]
    lo = tl.where(real_group, tl.min(tl.where(mask3, v, float("inf")), axis=2), 0.0)  # [BLOCK_M, GROUPS_P]
    hi = tl.where(real_group, tl.max(tl.where(mask3, v, -float("inf")), axis=2), 0.0)
    lo = tl.where(row_mask[:, None], lo, 0.0)
    hi = tl.where(row_mask[:, None], hi, 0.0)
    zero = _round_fp16(lo, True)
    zero_f = zero.to(tl.float32)
    scale = _round_fp16(tl.math.div_rn(hi - zero_f, tl.full(hi.shape, LEVELS, tl.float32)), False)
    scale_f = scale.to(tl.float32)
    safe = tl.where(scale_f > 0, scale_f, 1.0)
    t = tl.math.div_rn(v - zero_f[:, :, None], tl.broadcast_to(safe[:, :, None], v.shape))
    q = tl.minimum(tl.maximum(_round_half_even(t), 0.0), LEVELS)
    q = tl.where(scale_f[:, :, None] > 0, q, 0.0).to(tl.int32)

    q = tl.reshape(q, (BLOCK_M, GROUPS_P, GROUP_P // PER_BYTE, PER_BYTE))
    shifts = tl.arange(0, PER_BYTE) * VALUE_BITS
    packed_v = tl.sum(q << shifts[None, None, None, :], axis=3)  # [BLOCK_M, GROUPS_P, GROUP_P // PER_BYTE]
    jb = tl.arange(0, GROUP_P // PER_BYTE)
    byte_col = g[:, None] * (GROUP_SIZE // PER_BYTE) + jb[None, :]
    byte_ok = (g < GROUPS)[:, None] & (jb < GROUP_SIZE // PER_BYTE)[None, :]
    tl.store(data_ptr + (bh * stride_dbh + slot * DATA_BYTES)[:, None, None] + byte_col[None, :, :], packed_v.to(tl.uint8),
             mask=row_mask[:, None, None] & byte_ok[None, :, :])
    gmask = row_mask[:, None] & (g < GROUPS)[None, :]
    tl.store(scale_ptr + (bh * stride_sbh + slot * GROUPS)[:, None] + g[None, :], scale, mask=gmask)
    tl.store(zero_ptr + (bh * stride_zbh + slot * GROUPS)[:, None] + g[None, :], zero, mask=gmask)


def _check_projection(x: torch.Tensor, projection: torch.Tensor) -> int:
    check_tensor("projection", projection, ndim=2, dtypes=(torch.float32,))
    d, bits = projection.shape
    if x.shape[-1] != d:
        raise ValueError(f"x last dim ({x.shape[-1]}) must equal projection.shape[0] (head_dim={d})")
    if bits % 8:
        raise ValueError(f"projection.shape[1] (bits) must be a multiple of 8, got {bits}")
    return bits


def _rows(x: torch.Tensor) -> torch.Tensor:
    """``x [..., d]`` -> 2-D ``[M, d]`` with a unit last stride (a view when possible)."""
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def sketch_pack_reference(x: torch.Tensor, projection: torch.Tensor) -> torch.Tensor:
    """Plain torch: ``pack_bits(x.float() @ projection >= 0)``, as ``SimHashSketcher.sketch``."""
    return pack_bits(x.float() @ projection >= 0)


def sketch_pack(x: torch.Tensor, projection: torch.Tensor, *, backend: str = "auto") -> torch.Tensor:
    """SimHash codes of ``x``: packed ``sign(x @ projection)``.

    Parameters
    ----------
    x : ``[..., d]`` fp16 / bf16 / fp32 (CPU or CUDA). Not modified.
    projection : float32 ``[d, bits]``, ``bits`` a multiple of 8 (``SimHashSketcher.projection_on``).
    backend : ``"auto"`` (Triton on CUDA, torch elsewhere), ``"triton"`` or ``"torch"``.

    Returns
    -------
    uint8 ``[..., bits // 8]``, bit ``i`` in bit ``i % 8`` of byte ``i // 8``, 1 where ``x @ R >= 0``.
    """
    check_tensor("x", x, min_ndim=1, dtypes=FLOAT_DTYPES)
    bits = _check_projection(x, projection)
    check_same_device(x=x, projection=projection)
    if not use_triton(backend, x.device, _sketch_pack_kernel):
        return sketch_pack_reference(x, projection)
    x2 = _rows(x)
    out = torch.empty(x2.shape[0], bits // 8, dtype=torch.uint8, device=x.device)
    _launch_sketch_pack(x2, projection.contiguous(), out)
    return out.reshape(*x.shape[:-1], bits // 8)


def _launch_sketch_pack(x2: torch.Tensor, projection: torch.Tensor, out: torch.Tensor) -> None:
    """One launch of ``_sketch_pack_kernel``: rows ``x2 [M, d]`` (unit stride in d) into ``out [M, bits // 8]``.

    Unchecked (``sketch_pack`` checks): benchmarks call it to time the launch alone.
    """
    M, d = x2.shape
    nbytes = out.shape[1]
    BLOCK_M, BLOCK_K = 32, max(16, min(64, next_pow2(d)))
    BLOCK_BYTES = max(2, min(16, next_pow2(nbytes)))
    grid = (cdiv(M, BLOCK_M), cdiv(nbytes, BLOCK_BYTES))
    _sketch_pack_kernel[grid](x2, projection, out, M, d, nbytes, x2.stride(0),
                              BLOCK_M=BLOCK_M, BLOCK_K=BLOCK_K, BLOCK_BYTES=BLOCK_BYTES)


def sketch_pack_quantize_reference(
    k: torch.Tensor, v: torch.Tensor, projection: torch.Tensor, value_bits: int = 4, group_size: int | None = None
) -> tuple[torch.Tensor, QuantizedTensor]:
    """Plain torch: ``(sketch_pack_reference(k, projection), quantize_values(v, value_bits, group_size))``."""
    return sketch_pack_reference(k, projection), quantize_values(v, value_bits, group_size)


def sketch_pack_quantize(
    k: torch.Tensor,
    v: torch.Tensor,
    projection: torch.Tensor,
    value_bits: int = 4,
    group_size: int | None = None,
    *,
    backend: str = "auto",
) -> tuple[torch.Tensor, QuantizedTensor]:
    """Cache-append path in one launch: key codes and quantized values of a batch of new tokens.

    Parameters
    ----------
    k : ``[..., d]`` fp16 / bf16 / fp32 new keys; v : ``[..., n]`` new values with the same leading
        dims (e.g. ``[B, Hkv, T, d]`` both). Neither is modified.
    projection : float32 ``[d, bits]``, ``bits`` a multiple of 8.
    value_bits : 2, 4 or 8.  group_size : divides ``n`` (``None`` = ``n``, one group per vector).
        The Triton path needs whole bytes per group (``group_size * value_bits % 8 == 0``).

    Returns
    -------
    ``(codes, qt)``: uint8 codes ``[..., bits // 8]`` as :func:`sketch_pack`, and a
    :class:`~h1bkv_lite.QuantizedTensor` whose ``data [..., n * value_bits // 8]``, fp16
    ``scale / zero [..., n // group_size]`` equal ``quantize_values(v, value_bits, group_size)``'s.

    Raises ValueError (like :func:`~h1bkv_lite.quantize_values`) for values beyond the fp16 scale range
    (one device sync for that check: the cache's decode path uses :func:`sketch_pack_quantize_into`).
    """
    check_tensor("k", k, min_ndim=1, dtypes=FLOAT_DTYPES)
    check_tensor("v", v, min_ndim=1, dtypes=FLOAT_DTYPES)
    bits = _check_projection(k, projection)
    check_same_device(k=k, v=v, projection=projection)
    if k.shape[:-1] != v.shape[:-1]:
        raise ValueError(f"k and v must share leading dims, got k {tuple(k.shape)} and v {tuple(v.shape)}")
    group_size = check_value_format(v, value_bits, group_size, bits_name="value_bits")
    n = v.shape[-1]
    if not use_triton(backend, k.device, _sketch_pack_quantize_kernel):
        return sketch_pack_quantize_reference(k, v, projection, value_bits, group_size)
    if not append_kernel_serves(n, value_bits, group_size):
        raise ValueError(
            f"group_size * value_bits must fill whole bytes for the Triton kernel, got group_size={group_size} "
            f"with value_bits={value_bits} (use backend='torch')"
        )
    if v.abs().max() > _FP16_MAX / 2:
        raise ValueError(f"v has magnitudes above {_FP16_MAX / 2:g}; fp16 scales/zeros cannot represent it")
    lead = k.shape[:-1]
    k4, v4 = k.reshape(1, 1, -1, k.shape[-1]), v.reshape(1, 1, -1, n)
    M = k4.shape[2]
    codes = torch.empty(1, 1, M, bits // 8, dtype=torch.uint8, device=k.device)
    data = torch.empty(1, 1, M, n * value_bits // 8, dtype=torch.uint8, device=k.device)
    scale = torch.empty(1, 1, M, n // group_size, dtype=torch.float16, device=k.device)
    zero = torch.empty_like(scale)
    _launch_append(k4, v4, projection, codes, data, scale, zero, value_bits, group_size)
    qt = QuantizedTensor(data.reshape(*lead, -1), scale.reshape(*lead, -1), zero.reshape(*lead, -1),
                         value_bits, group_size, v.shape, v.dtype)
    return codes.reshape(*lead, bits // 8), qt


def append_kernel_serves(n: int, value_bits: int, group_size: int | None) -> bool:
    """Whether the fused append kernel handles values of ``n`` channels at ``value_bits`` per group of
    ``group_size`` (None: per token): each group must fill whole bytes."""
    return ((n if group_size is None else group_size) * value_bits) % 8 == 0


def sketch_pack_quantize_into(k: torch.Tensor, v: torch.Tensor, projection: torch.Tensor, *, codes: torch.Tensor,
                              data: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, value_bits: int,
                              group_size: int, pos: torch.Tensor | None = None, start: int | None = None,
                              out_strides: tuple | None = None) -> None:
    """The cache's in-place append (one launch, no device sync): sketch ``k`` and quantize ``v`` into
    given slots of a preallocated store.

    k, v : ``[B, H, m, d]`` / ``[B, H, m, n]`` on CUDA (or CPU under ``TRITON_INTERPRET=1``), any strides
    with a contiguous last dim. codes ``uint8 [B, H, m, bits // 8]``, data ``uint8 [B, H, m, n * value_bits
    // 8]``, scale / zero ``fp16 [B, H, m, n // group_size]``: views (e.g. ``store[:, :, L:L + m]``) whose
    last two dims are contiguous; written in place. Values beyond +-32752 (half the fp16 maximum) are
    clamped instead of checked, as :func:`h1bkv_lite.quant.quantize_values_unchecked` does.
    Shapes are the caller's contract (not checked: this is the decode hot path).

    pos : None, or an int32 tensor of one element on the device: then the outputs are whole store buffers
        ``[B, H, C, ...]`` and the ``m`` tokens go to slots ``pos .. pos + m - 1`` (a static-capacity store
        whose fill level lives on the device, so the launch is the same every decode step; ``pos + m <= C``
        is the caller's contract, not checked).
    start : None, or a host int: then the outputs are whole store buffers ``[B, H, C, ...]`` and the ``m`` tokens go
        to slots ``start .. start + m - 1`` (a growing store's fill level: no slot views to build on the decode path;
        ``start + m <= C`` is the caller's contract, not checked). Not with ``pos``.
    out_strides : None, or :func:`append_out_strides` of these outputs (worked out once while a store keeps its
        buffers: a decode step then asks them for no strides).

    Raises ValueError when both ``pos`` and ``start`` are given, or ``start`` is not an int >= 0 (host values only:
    no device sync).
    """
    if start is not None:
        if pos is not None:
            raise ValueError("give pos (a fill level on the device) or start (one on the host), not both")
        if isinstance(start, bool) or not isinstance(start, int) or start < 0:
            raise ValueError(f"start must be an int >= 0 (the first slot written), got {start!r}")
    _launch_append(k, v, projection, codes, data, scale, zero, value_bits, group_size, pos=pos, start=start,
                   out_strides=out_strides)


def append_out_strides(codes: torch.Tensor, data: torch.Tensor, scale: torch.Tensor,
                       zero: torch.Tensor) -> tuple[int, int, int, int]:
    """Elements between (sequence, head) rows of the append's four outputs ``[B, H, n, w]`` (whole store buffers or
    slot views). ValueError when an output's token rows are not contiguous or its (sequence, head) rows are not
    uniformly strided."""
    return tuple(_bh_stride(t, t.shape[2]) for t in (codes, data, scale, zero))


def _launch_append(k, v, projection, codes, data, scale, zero, value_bits, group_size, config=None,
                   pos=None, start=None, out_strides=None) -> None:
    """``config``: launch overrides for benchmarks (``block_m`` >= 16, a power of two; ``num_warps``;
    ``cached_launch``: False takes Triton's own per-call launch instead of :func:`kernels._launcher.launch`)."""
    B, H, m, d = k.shape
    n = v.shape[-1]
    M = B * H * m
    if M == 0:
        return
    if k.stride(-1) != 1:
        k = k.contiguous()
    if v.stride(-1) != 1:
        v = v.contiguous()
    if not projection.is_contiguous():  # the kernel reads R row-major (the sketcher's R is)
        projection = projection.contiguous()
    nbytes, groups = projection.shape[1] // 8, n // group_size
    config = config or {}
    # 16 rows per program (tl.dot's minimum): at head_dim 128, 32 rows with 4 warps took 123-230 us per
    # launch against 8-12 us for 16 (H200, one decode token per kv head, benchmarks/append.py): a program
    # that large is latency-bound on one SM however few rows are real
    block_m = config.get("block_m", 16)
    launch(_sketch_pack_quantize_kernel, (cdiv(M, block_m),), (
        k, projection, codes, v, data, scale, zero,
        M, d, nbytes, m, H,
        k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
        *(out_strides or append_out_strides(codes, data, scale, zero)),
        groups, group_size, n * value_bits // 8, _FP16_MAX / 2, k if pos is None else pos, start or 0,
    ), *_append_meta(d, nbytes, groups, group_size, value_bits, block_m, config.get("num_warps", 4), pos is not None),
        cached=config.get("cached_launch", True))


@functools.lru_cache(maxsize=256, typed=True)
def _append_meta(d: int, nbytes: int, groups: int, group_size: int, value_bits: int, block_m: int, num_warps: int,
                 pos_on_device: bool) -> tuple[dict, dict]:
    """The append kernel's constexprs and launch options (shared between calls: read-only)."""
    constexprs = dict(BLOCK_M=block_m, BLOCK_K=max(16, min(64, next_pow2(d))),
                      BLOCK_BYTES=max(2, min(16, next_pow2(nbytes))), GROUPS_P=next_pow2(groups),
                      GROUP_P=max(next_pow2(group_size), 8 // value_bits), VALUE_BITS=value_bits,
                      POS_ON_DEVICE=pos_on_device)
    return FixedArgs(constexprs), FixedArgs(num_warps=num_warps)


def _bh_stride(out: torch.Tensor, m: int) -> int:
    """Elements between consecutive (sequence, head) rows of an output ``[B, H, m, w]`` whose last two
    dims are contiguous and whose (B, H) dims are uniformly strided (a slot view of a store)."""
    B, H, _, w = out.shape
    if out.stride(3) != 1 or (m > 1 and out.stride(2) != w):
        raise ValueError(f"append outputs need contiguous token rows, got strides {out.stride()}")
    if B > 1 and H > 1 and out.stride(0) != H * out.stride(1):
        raise ValueError(f"append outputs need uniformly strided (batch, head) rows, got strides {out.stride()}")
    return out.stride(1) if H > 1 else out.stride(0)
