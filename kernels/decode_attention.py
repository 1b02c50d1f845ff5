"""Decode attention over an H1B-KV cache: one new query token per sequence, split-K (flash-decoding).

The cache holds, per kv head and past token, a SimHash key code (``bits // 8`` bytes), optionally an
fp16 key norm, and the value quantized to ``value_bits`` with fp16 scale/zero per group; plus an exact
window of the newest ``W`` tokens. Logits for compressed keys (``D`` = head_dim, ``b`` = bits, ``h`` =
popcount of query code XOR key code):

- ``"hamming"`` (the paper's): ``(1 - 2 h / b) / T``, ``T`` a float or one per query head.
- ``"cos"``: ``|q| |k| cos(pi h / b) / sqrt(D)``.
- ``"asym"`` (QJL): ``sqrt(pi/2) / b * |k| * <R^T q, s_k> / sqrt(D)``, ``s_k`` the +-1 key signs; the
  query is not sketched.

Window keys always get the exact ``q . k / sqrt(D)``. One softmax over all of them; values are
``zero + code * scale`` per group. All arithmetic is fp32, except GQA's: its value products run on tensor cores
(fp16 operands, fp32 accumulation), their 4-bit values unpacked in packed fp16 pairs (``_nibbles_to_half``), and
"asym"'s query-key products at groups of more than 4 too (``R^T q`` in two fp16 parts); see ``_default_config``.

Kernels, in launch order: ``_query_prep_kernel`` (the query's code words and norm, or ``R^T q`` for
``"asym"``, once per call), then ``_decode_split_kernel`` over ``(batch * kv head, split)`` -- each program
walks one chunk of the context for all query heads of its kv head (GQA: the cache is read once per kv head)
with an online softmax and writes a partial ``(max, sum, acc)``; the last split of each row is the exact
window. The last program of a row to finish merges the row's partials (an arrival counter per row: the fused
combine, one launch fewer); under CUDA-graph capture ``_decode_combine_kernel`` does it instead, one program per
query head. When a row is a single split without a window (eager calls up to ``single_split_max_n`` compressed
tokens, or ``split_k=1``), the split kernel sketches its query heads itself and writes the output: one launch per call
for "hamming" and "cos". (Sketching inside every split program instead -- each loading all of R before its first
tile -- made B = 1, 32k MHA decode 1.5x slower on an H200: 70.8 -> 103 us of GPU time, in a kernel that also
spilled registers then; eager calls of up to
``query_in_split_max_n`` compressed tokens do it all the same, one launch in all, as the host's time to issue a
launch outweighs the extra loads there: see ``_default_config``.) Reference:
:func:`h1b_decode_attention_reference`, which follows ``h1bkv_lite.attention.sketched_logits``.
"""
from __future__ import annotations

import functools
import math
import threading

import torch

from h1bkv_lite._validation import (
    FLOAT_DTYPES, check_bool, check_choice, check_int, check_same_device, check_tensor,
)
from h1bkv_lite.quant import VALUE_BITS, unpack_codes
from h1bkv_lite.sketch import pack_bits, unpack_bits

from ._common import (
    HAS_TRITON, as_words, cdiv, is_interpreted, next_pow2, pack_sign_words, popcount, tl, triton, use_triton,
)
from ._launcher import FixedArgs, _current_device, _current_stream, launch
from .hamming import hamming_scores_reference
from .sketch_pack import _project_tile

SCORES = ("hamming", "cos", "asym")
_SCORE_ID = {"hamming": 0, "cos": 1, "asym": 2}
_LOG2E = 1.4426950408889634


@triton.jit
def _query_prep_kernel(q_ptr, r_ptr, qw_ptr, qsq_ptr, qp_ptr, M, D, stride_qm, proj_scale, BITS: tl.constexpr,
                       SCORE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr,
                       BLOCK_BITS: tl.constexpr):
    """Per query row, once per call: the int32 code words ``[M, BITS // 32]`` of ``sign(q @ R)`` ("hamming",
    "cos"), ``|q|^2`` ``[M]`` ("cos"), or ``proj_scale * q @ R`` ``[M, BITS]`` ("asym", read bit by bit by the
    split kernel). A call with several splits launches it, so its programs do not each project the query."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < M
    if SCORE == 1:
        d = tl.arange(0, BLOCK_D)
        x = tl.load(q_ptr + rows[:, None] * stride_qm + d[None, :],
                    mask=row_mask[:, None] & (d < D)[None, :], other=0.0).to(tl.float32)
        tl.store(qsq_ptr + rows, tl.sum(x * x, axis=1), mask=row_mask)
    for c0 in range(0, BITS, BLOCK_BITS):
        proj = _project_tile(q_ptr, r_ptr, rows, row_mask, stride_qm, D, BITS, c0, BLOCK_M, BLOCK_K, BLOCK_BITS)
        if SCORE == 2:
            cols = c0 + tl.arange(0, BLOCK_BITS)
            tl.store(qp_ptr + rows[:, None] * BITS + cols[None, :], proj * proj_scale,
                     mask=row_mask[:, None] & (cols < BITS)[None, :])
        else:
            words = pack_sign_words(proj, BLOCK_M, BLOCK_BITS // 32)
            wcol = c0 // 32 + tl.arange(0, BLOCK_BITS // 32)
            tl.store(qw_ptr + rows[:, None] * (BITS // 32) + wcol[None, :], words,
                     mask=row_mask[:, None] & (wcol < BITS // 32)[None, :])


@triton.jit
def _query_words(q_ptr, r_ptr, q_off, gmask, D, BITS: tl.constexpr, GR: tl.constexpr, NW_P: tl.constexpr,
                 BLOCK_KQ: tl.constexpr):
    """The query heads' SimHash code words int32 ``[GR, NW_P]`` (``sign(q @ R)``, fp32 multiply-adds over
    ``BLOCK_KQ`` columns of q at a time; words past ``BITS // 32`` are 0) and squared norms ``[GR]``."""
    cols = tl.arange(0, NW_P * 32)
    proj = tl.zeros((GR, NW_P * 32), dtype=tl.float32)
    sq = tl.zeros((GR,), dtype=tl.float32)
    for k0 in range(0, D, BLOCK_KQ):
        ks = k0 + tl.arange(0, BLOCK_KQ)
        x = tl.load(q_ptr + q_off[:, None] + ks[None, :], mask=gmask[:, None] & (ks < D)[None, :],
                    other=0.0).to(tl.float32)
        r = tl.load(r_ptr + ks[:, None] * BITS + cols[None, :], mask=(ks < D)[:, None] & (cols < BITS)[None, :],
                    other=0.0)
        proj += tl.sum(x[:, :, None] * r[None, :, :], axis=1)
        sq += tl.sum(x * x, axis=1)
    words = pack_sign_words(proj, GR, NW_P)
    return tl.where((tl.arange(0, NW_P) < BITS // 32)[None, :], words, 0), sq


@triton.jit
def _round_to_tf32(x):
    """fp32 ``x`` rounded to the nearest tf32 value (10 mantissa bits kept, ties away from zero), as fp32.

    Triton's tf32 ``tl.dot`` drops an operand's low 13 mantissa bits (truncation toward zero,
    triton-lang/triton#4574): a one-signed error of 0 to 2**-10 relative. Rounded first, the operand is
    exactly representable, so what the product loses is this rounding: at most 2**-11 relative, either sign."""
    bits = x.to(tl.int32, bitcast=True)
    return ((bits + 0x1000) & -8192).to(tl.float32, bitcast=True)  # -8192 = 0xFFFFE000: clear the low 13 bits


@triton.jit
def _online_softmax(s, m_i, l_i):
    """One online-softmax step on log2-unit logits ``s [GR, n]``: (p, rescale of old sums, new max, new sum)."""
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    return p, alpha, m_new, l_i * alpha + tl.sum(p, axis=1)


@triton.jit
def _codes_as_float(vbytes, J: tl.constexpr, VALUE_BITS: tl.constexpr):
    """Code ``J`` of each byte as a float, times ``2**(J * VALUE_BITS)``: the masked bits OR'ed into the
    mantissa of 2**23, minus 2**23 (exact; a logic op and an add instead of a shift and an int-to-float)."""
    bits = (vbytes & (((1 << VALUE_BITS) - 1) << (J * VALUE_BITS))) | 0x4B000000
    return bits.to(tl.float32, bitcast=True) - 8388608.0


_NIBBLES_TO_HALF2_PTX = """
{
.reg .b32 t0, t1, a0, a1, b0, b1, zero, k1032, k16, km72;
mov.b32 zero, 0;
mov.b32 k1032, 0x64086408;
mov.b32 k16, 0x2C002C00;
mov.b32 km72, 0xD480D480;
prmt.b32 t0, $4, zero, 0x4140;
prmt.b32 t1, $4, zero, 0x4342;
lop3.b32 a0, t0, 0x000F000F, 0x64006400, 0xEA;
lop3.b32 a1, t1, 0x000F000F, 0x64006400, 0xEA;
lop3.b32 b0, t0, 0x00F000F0, 0x64006400, 0xEA;
lop3.b32 b1, t1, 0x00F000F0, 0x64006400, 0xEA;
sub.f16x2 a0, a0, k1032;
sub.f16x2 a1, a1, k1032;
fma.rn.f16x2 b0, b0, k16, km72;
fma.rn.f16x2 b1, b1, k16, km72;
mul.rn.f16x2 $0, a0, $5;
mul.rn.f16x2 $1, a1, $6;
mul.rn.f16x2 $2, b0, $5;
mul.rn.f16x2 $3, b1, $6;
}
"""
"""PTX for :func:`_nibbles_to_half`, four bytes (eight 4-bit codes) per instance: ``$4`` holds bytes ``b0 .. b3``,
``$5, $6`` their scales as fp16 pairs; out come the low nibbles' ``(code - 8) * scale`` as fp16 pairs ``$0, $1`` and
the high nibbles' ``$2, $3``. ``prmt`` spreads bytes ``b0, b1`` (``b2, b3``) to the two 16-bit halves of a word;
``lop3`` keeps one nibble of each half and ORs in the exponent of 1024 (``0x6400``), giving the fp16 pair ``1024 +
code`` (low nibble) or ``1024 + 16 * code`` (high nibble: its bits 4-7 land on mantissa bits 4-7); one fp16x2
subtract of 1032 (or multiply-add by 1/16 and -72) leaves ``code - 8``, exactly; one fp16x2 multiply makes ``(code -
8) * scale``, rounded once. 14 instructions for eight values, where the fp32 unpack and its conversion to fp16 take
~3.5 a value. The trick is FasterTransformer's int4 -> fp16 conversion (used by AWQ and BitDecoding too)."""
_NIBBLES_TO_HALF2 = tl.constexpr(_NIBBLES_TO_HALF2_PTX) if HAS_TRITON else None  # a jit function reads constexprs


@triton.jit
def _nibbles_to_half(vbytes, sc, ASM: tl.constexpr):
    """4-bit value codes, two per byte (``vbytes`` uint8 ``[BLOCK_N, NBC]``, code ``2c`` in the low nibble of
    byte ``c``), centred and scaled: ``(code - 8) * scale`` (``sc``: fp16 ``[BLOCK_N, 1]``, per token) as fp16,
    rounded once: ``(low nibbles, high nibbles)``, each ``[BLOCK_N, NBC]``. The value is this plus ``zero + 8 *
    scale`` (the caller adds that in fp32): centred, the rounded part is at most half the token's value range, so
    its rounding error is that of rounding the value itself when the values straddle 0 (the usual case), and
    smaller when they do not. (Uncentred, ``code * scale`` spans the whole range: on random unit-variance values
    the kernel's error against the reference was 2-10x that of rounding the values themselves.) ``ASM``: in packed
    fp16 pairs
    (:data:`_NIBBLES_TO_HALF2_PTX`); otherwise (Triton's CPU interpreter, which runs no PTX) the same values from
    fp32 arithmetic (exact products, so the one rounding to fp16 is the same)."""
    if ASM:
        lo, hi = tl.inline_asm_elementwise(
            _NIBBLES_TO_HALF2, "=r,=r,=r,=r,r,r,r", [vbytes, sc], dtype=(tl.float16, tl.float16), is_pure=True,
            pack=4)
    else:
        v = vbytes.to(tl.int32)
        scf = sc.to(tl.float32)
        lo = (((v & 15) - 8).to(tl.float32) * scf).to(tl.float16)
        hi = (((v >> 4) - 8).to(tl.float32) * scf).to(tl.float16)
    return lo, hi


@triton.jit
def _value_update(acc, p, pv, vbytes, sc, zr, vs_base, vz_base, n, nmask, c, stride_vsn, stride_vzn,
                  J: tl.constexpr, D: tl.constexpr, VALUE_BITS: tl.constexpr, VALUE_GROUPS: tl.constexpr,
                  USE_DOT: tl.constexpr, PRECISION: tl.constexpr, GR: tl.constexpr):
    """Add the p-weighted value columns ``c * PER_BYTE + J`` of one tile to ``acc``: ``[GR, NBC]`` with
    ``tl.dot``; otherwise per-row partial sums (``[BLOCK_N, NBC]`` for one head, ``[GR, BLOCK_N, NBC]``),
    reduced over the rows once per chunk instead of once per tile. ``PRECISION == "fp16"``: the values
    dequantized (``zero + code * scale``) and the weights ``p`` rounded to fp16, an fp16 MMA with fp32
    accumulation (per-token ``sc``/``zr`` ``[BLOCK_N]`` are used only there)."""
    vals = _codes_as_float(vbytes, J, VALUE_BITS)  # [BLOCK_N, NBC], code * 2**(J * VALUE_BITS)
    inv_u: tl.constexpr = 1.0 / (1 << (J * VALUE_BITS))
    wgt = p
    if VALUE_GROUPS == 1:
        if PRECISION == "fp16":
            vals = zr[:, None] + vals * (sc * inv_u)[:, None]
        else:
            wgt = pv * inv_u  # the per-token scale is folded into the weights; zeros are summed separately
    else:
        grp = (c * (8 // VALUE_BITS) + J) // (D // VALUE_GROUPS)
        vmask = nmask[:, None] & (c < D * VALUE_BITS // 8)[None, :]
        gsc = tl.load(vs_base + n[:, None] * stride_vsn + grp[None, :], mask=vmask, other=0.0).to(tl.float32)
        gzr = tl.load(vz_base + n[:, None] * stride_vzn + grp[None, :], mask=vmask, other=0.0).to(tl.float32)
        vals = gzr + vals * (gsc * inv_u)
    if PRECISION == "fp16":
        result = acc + tl.dot(wgt.to(tl.float16), vals.to(tl.float16))
    elif USE_DOT:
        if PRECISION == "tf32":  # round to nearest instead of the MMA's truncation (codes alone are exact)
            wgt = _round_to_tf32(wgt)
            if VALUE_GROUPS != 1:
                vals = _round_to_tf32(vals)
        result = acc + tl.dot(wgt, vals, input_precision=PRECISION)
    elif GR == 1:
        result = acc + tl.reshape(wgt, (wgt.shape[1],))[:, None] * vals
    else:
        result = acc + wgt[:, :, None] * vals[None, :, :]
    return result


@triton.jit
def _rescale(acc, alpha, USE_DOT: tl.constexpr, GR: tl.constexpr):
    if USE_DOT:
        return acc * alpha[:, None]
    elif GR == 1:
        return acc * alpha[:, None]  # [1, 1] broadcasts over [BLOCK_N, NBC]
    else:
        return acc * alpha[:, None, None]


@triton.jit
def _reduce_rows(acc, USE_DOT: tl.constexpr, GR: tl.constexpr):
    """Per-row partial sums -> ``[GR, NBC]``."""
    if USE_DOT:
        return acc
    elif GR == 1:
        return tl.sum(acc, axis=0)[None, :]
    else:
        return tl.sum(acc, axis=1)


@triton.jit
def _store_value_columns(base, acc0, acc1, acc2, acc3, zsum, scale, smask,
                         PER_BYTE: tl.constexpr, USE_DOT: tl.constexpr, GR: tl.constexpr):
    """Value column ``c * PER_BYTE + j`` (accumulator ``acc<j>``) to ``base + j``: ``(acc + zsum) * scale`` in
    the pointers' dtype (the fp32 partial with scale 1, or the output normalised by 1 / l)."""
    ty = base.dtype.element_ty
    tl.store(base, ((_reduce_rows(acc0, USE_DOT, GR) + zsum) * scale).to(ty), mask=smask)
    if PER_BYTE > 1:
        tl.store(base + 1, ((_reduce_rows(acc1, USE_DOT, GR) + zsum) * scale).to(ty), mask=smask)
    if PER_BYTE > 2:
        tl.store(base + 2, ((_reduce_rows(acc2, USE_DOT, GR) + zsum) * scale).to(ty), mask=smask)
        tl.store(base + 3, ((_reduce_rows(acc3, USE_DOT, GR) + zsum) * scale).to(ty), mask=smask)


@triton.jit
def _load_tile(kc_base, kn_base, vd_base, vs_base, vz_base, n, nmask, w, wmask, c, cmask,
               stride_kcn, stride_knn, stride_vdn, stride_vsn, stride_vzn,
               SCORE: tl.constexpr, VALUE_GROUPS: tl.constexpr, BLOCK_N: tl.constexpr):
    """The cache bytes of one tile of keys: code words, norms, value bytes, per-token scale and zero."""
    kw = tl.load(kc_base + n[:, None] * stride_kcn + w[None, :], mask=nmask[:, None] & wmask[None, :], other=0)
    if SCORE == 0:
        kn = tl.zeros((BLOCK_N,), dtype=tl.float32)
    else:
        kn = tl.load(kn_base + n * stride_knn, mask=nmask, other=0.0).to(tl.float32)
    vbytes = tl.load(vd_base + n[:, None] * stride_vdn + c[None, :], mask=nmask[:, None] & cmask[None, :], other=0)
    if VALUE_GROUPS == 1:
        sc = tl.load(vs_base + n * stride_vsn, mask=nmask, other=0.0).to(tl.float32)
        zr = tl.load(vz_base + n * stride_vzn, mask=nmask, other=0.0).to(tl.float32)
    else:  # gathered per column in _value_update
        sc = tl.zeros((BLOCK_N,), dtype=tl.float32)
        zr = tl.zeros((BLOCK_N,), dtype=tl.float32)
    return kw, kn, vbytes, sc, zr


@triton.jit
def _asym_dots(kw, qp_ptr, qrow, gmask, w, wmask, BITS: tl.constexpr, GR: tl.constexpr):
    """``<R^T q, s_k>`` ``[GR, BLOCK_N]`` from code words ``kw [BLOCK_N, NW_P]``: bit j of every word at
    once, its sign applied by flipping the sign bit of ``R^T q`` (xor), summed over words at the end."""
    nkw = ~kw  # a cleared bit (sign -1) flips the sign
    if GR == 1:
        acc = tl.zeros(kw.shape, dtype=tl.float32)
    else:
        acc = tl.zeros((GR, kw.shape[0], kw.shape[1]), dtype=tl.float32)
    for j in tl.static_range(32):
        qpj = tl.load(qp_ptr + qrow[:, None] * BITS + w[None, :] * 32 + j, mask=gmask[:, None] & wmask[None, :],
                      other=0.0).to(tl.int32, bitcast=True)  # [GR, NW_P]: R^T q at bits 32 w + j
        flip = (nkw << (31 - j)) & -2147483648
        if GR == 1:
            acc += (tl.reshape(qpj, (kw.shape[1],))[None, :] ^ flip).to(tl.float32, bitcast=True)
        else:
            acc += (qpj[:, None, :] ^ flip[None, :, :]).to(tl.float32, bitcast=True)
    if GR == 1:
        return tl.sum(acc, axis=1)[None, :]
    else:
        return tl.sum(acc, axis=2)


@triton.jit
def _sign_matrix(words, ROWS: tl.constexpr, NW: tl.constexpr, NW_P: tl.constexpr):
    """int32 code words ``[ROWS, NW_P]`` -> fp16 ``[ROWS, NW_P * 32]``: +1 / -1 for sketch bit ``32 w + j``
    set / clear (bit ``j`` of word ``w``), 0 in the padding words ``w >= NW``. Products of two such rows
    sum to ``bits - 2 * hamming`` exactly (integers, fp32 accumulation)."""
    j = tl.arange(0, 32)
    signs = ((words[:, :, None] >> j[None, None, :]) & 1) * 2 - 1  # [ROWS, NW_P, 32]
    if NW_P > NW:
        signs = tl.where((tl.arange(0, NW_P) < NW)[None, :, None], signs, 0)
    return tl.reshape(signs, (ROWS, NW_P * 32)).to(tl.float16)


@triton.jit
def _attend_tile(m_i, l_rows, z_rows, acc0, acc1, acc2, acc3, kw, kn, vbytes, sc, zr, n, nmask,
                 qw, qs_hi, qs_lo, t_log2, qn, cos_ptr, qp_ptr, qrow, gmask, w, wmask, vs_base, vz_base, c,
                 stride_vsn, stride_vzn,
                 D: tl.constexpr, BITS: tl.constexpr, NW_P: tl.constexpr, VALUE_BITS: tl.constexpr,
                 VALUE_GROUPS: tl.constexpr, SCORE: tl.constexpr, GR: tl.constexpr, USE_DOT: tl.constexpr,
                 PRECISION: tl.constexpr, PER_BYTE: tl.constexpr, SCORE_DOT: tl.constexpr, HALF2: tl.constexpr,
                 ASM: tl.constexpr):
    """One tile of compressed keys (``nmask`` marks the real ones): logits in log2 units, the online softmax
    and the value sums; returns the updated ``(m_i, l_rows, z_rows, acc0, acc1, acc2, acc3)``.

    ``SCORE_DOT``: the query-key products on tensor cores, ``qs_hi [GR, NW_P * 32]`` (fp16) times the key
    signs (:func:`_sign_matrix`): the query's +-1 signs ("hamming", "cos": exact) or, for "asym", ``R^T q``
    over its row maximum ``qn`` as two fp16 parts (``qs_hi + qs_lo``, ~22 significant bits). ``HALF2``: 4-bit
    values dequantized by :func:`_nibbles_to_half` (``ASM``: in PTX) for the fp16 MMA."""
    if SCORE_DOT:
        ks = tl.trans(_sign_matrix(kw, kw.shape[0], BITS // 32, NW_P))  # [NW_P * 32, BLOCK_N]
        dots = tl.dot(qs_hi, ks)  # [GR, BLOCK_N], fp32
        if SCORE == 2:
            s = (dots + tl.dot(qs_lo, ks)) * qn[:, None] * kn[None, :]
        elif SCORE == 0:
            s = dots * (t_log2 * (1.0 / BITS))[:, None]  # bits - 2 h = the sign products' sum
        else:
            s = qn[:, None] * kn[None, :] * tl.load(cos_ptr + ((BITS - dots) * 0.5).to(tl.int32))
    elif SCORE == 2:
        s = _asym_dots(kw, qp_ptr, qrow, gmask, w, wmask, BITS, GR) * kn[None, :]
    else:
        if GR == 1:
            h = tl.sum(popcount(tl.reshape(qw, (NW_P,))[None, :] ^ kw, ASM), axis=1)[None, :]
        else:
            h = tl.sum(popcount(qw[:, None, :] ^ kw[None, :, :], ASM), axis=2)  # [GR, BLOCK_N]
        if SCORE == 0:
            s = (1.0 - h.to(tl.float32) * (2.0 / BITS)) * t_log2[:, None]
        else:
            s = qn[:, None] * kn[None, :] * tl.load(cos_ptr + h)
    s = tl.where(nmask[None, :], s, -float("inf"))

    # Online softmax with a lazily moved maximum: sums are re-based only when a logit exceeds the
    # current base by more than 2**8 (so p <= 256), which after the first tile is rare.
    m_tile = tl.max(s, axis=1)
    if tl.max((m_tile > m_i + 8.0).to(tl.int32), axis=0) > 0:
        m_new = tl.maximum(m_i, m_tile)
        alpha = tl.exp2(m_i - m_new)
        l_rows = l_rows * alpha[:, None]
        z_rows = z_rows * alpha[:, None]
        acc0 = _rescale(acc0, alpha, USE_DOT, GR)
        acc1 = _rescale(acc1, alpha, USE_DOT, GR)
        acc2 = _rescale(acc2, alpha, USE_DOT, GR)
        acc3 = _rescale(acc3, alpha, USE_DOT, GR)
        m_i = m_new
    p = tl.exp2(s - m_i[:, None])
    l_rows += p

    if HALF2:  # 4-bit codes to fp16 in packed pairs; two MMAs (even, odd value columns); the offsets in fp32
        lo, hi = _nibbles_to_half(vbytes, sc.to(tl.float16)[:, None], ASM)  # (code - 8) * scale
        p16 = p.to(tl.float16)
        z_rows += p16.to(tl.float32) * (zr + 8.0 * sc)[None, :]  # the rest of each value, with the MMA's weights
        acc0 = tl.dot(p16, lo, acc0)
        acc1 = tl.dot(p16, hi, acc1)
    else:  # the fp32 unpack (:func:`_value_update`)
        vbytes = vbytes.to(tl.int32)
        pv = p
        if VALUE_GROUPS == 1 and PRECISION != "fp16":  # fp16: zero and scale are folded into the values
            pv = p * sc[None, :]
            z_rows += p * zr[None, :]
        acc0 = _value_update(acc0, p, pv, vbytes, sc, zr, vs_base, vz_base, n, nmask, c, stride_vsn, stride_vzn,
                             0, D, VALUE_BITS, VALUE_GROUPS, USE_DOT, PRECISION, GR)
        if PER_BYTE > 1:
            acc1 = _value_update(acc1, p, pv, vbytes, sc, zr, vs_base, vz_base, n, nmask, c, stride_vsn, stride_vzn,
                                 1, D, VALUE_BITS, VALUE_GROUPS, USE_DOT, PRECISION, GR)
        if PER_BYTE > 2:
            acc2 = _value_update(acc2, p, pv, vbytes, sc, zr, vs_base, vz_base, n, nmask, c, stride_vsn, stride_vzn,
                                 2, D, VALUE_BITS, VALUE_GROUPS, USE_DOT, PRECISION, GR)
            acc3 = _value_update(acc3, p, pv, vbytes, sc, zr, vs_base, vz_base, n, nmask, c, stride_vsn, stride_vzn,
                                 3, D, VALUE_BITS, VALUE_GROUPS, USE_DOT, PRECISION, GR)
    return m_i, l_rows, z_rows, acc0, acc1, acc2, acc3


@triton.jit(do_not_specialize=["N", "W", "CHUNK_TILES", "NUM_SPLITS", "SPLITS_TOTAL", "inv_t"])
def _decode_split_kernel(
    q_ptr, stride_qb, stride_qh, r_ptr, out_ptr, stride_ob, stride_oh,
    qw_ptr, qsq_ptr, qp_ptr, t_ptr, stride_tb, inv_t, cos_ptr,
    kc_ptr, stride_kcb, stride_kch, stride_kcn,
    kn_ptr, stride_knb, stride_knh, stride_knn,
    vd_ptr, stride_vdb, stride_vdh, stride_vdn,
    vs_ptr, stride_vsb, stride_vsh, stride_vsn,
    vz_ptr, stride_vzb, stride_vzh, stride_vzn,
    wk_ptr, stride_wkb, stride_wkh, stride_wkn,
    wv_ptr, stride_wvb, stride_wvh, stride_wvn,
    m_ptr, l_ptr, acc_ptr, cnt_ptr,
    N, W, HKV, CHUNK_TILES, NUM_SPLITS, SPLITS_TOTAL, qk_scale, n_ptr,
    D: tl.constexpr, BITS: tl.constexpr, NW_P: tl.constexpr, GROUP: tl.constexpr, VALUE_GROUPS: tl.constexpr,
    VALUE_BITS: tl.constexpr, SCORE: tl.constexpr,
    GR: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_W: tl.constexpr,
    PER_HEAD_T: tl.constexpr, USE_DOT: tl.constexpr, PRECISION: tl.constexpr, BLOCK_KQ: tl.constexpr,
    N_ON_DEVICE: tl.constexpr, DIRECT: tl.constexpr, SCORE_DOT: tl.constexpr, HALF2: tl.constexpr,
    ASM: tl.constexpr, PIPELINE: tl.constexpr = 0, FUSED: tl.constexpr = False, BLOCK_S: tl.constexpr = 32,
    QUERY_HERE: tl.constexpr = False,
):
    # DIRECT: this row is one split without a window: sketch the query here and write the output itself.
    # QUERY_HERE: each program sketches its query heads itself ("hamming"/"cos"; DIRECT implies it), so a split
    # call needs no query-prep launch.
    # A compile-time constant: as a runtime flag (one kernel for both, no compile when a context grows past
    # single_split_max_n mid-generation) the unused branch's registers slowed every split launch (H200, B = 1,
    # 32k MHA: 103 -> 112 us); now each form (one split; split with the query here; split after the prep) compiles
    # once, at the first context in its range, so an eager generation may compile up to three forms.
    pid_bh = tl.program_id(0)
    split = tl.program_id(1)
    b = pid_bh // HKV
    hk = pid_bh % HKV
    g = tl.arange(0, GR)
    gmask = g < GROUP
    heads = hk * GROUP + g  # query heads served by this kv head
    qrow = b * (HKV * GROUP) + heads  # rows of the prep outputs
    part = qrow * SPLITS_TOTAL + split  # rows of the partial outputs
    m_i = tl.full((GR,), -float("inf"), dtype=tl.float32)
    l_i = tl.zeros((GR,), dtype=tl.float32)

    if split < NUM_SPLITS:
        # ---- compressed keys [start, end); logits in log2 units (exp2) ----
        NW: tl.constexpr = BITS // 32
        w = tl.arange(0, NW_P)  # code words, padded to a power of two
        wmask = w < NW
        qw = tl.zeros((GR, NW_P), dtype=tl.int32)  # each score sets what it reads; the others stay unused
        t_log2 = tl.zeros((GR,), dtype=tl.float32)
        qn = tl.zeros((GR,), dtype=tl.float32)
        if SCORE < 2:
            if DIRECT or QUERY_HERE:  # project the query here (no prep launch)
                qw, q_sq = _query_words(q_ptr, r_ptr, b * stride_qb + heads * stride_qh, gmask, D, BITS, GR, NW_P,
                                        BLOCK_KQ)
            else:  # projected once by the prep kernel; each split program only loads the words
                qw = tl.load(qw_ptr + qrow[:, None] * NW + w[None, :], mask=gmask[:, None] & wmask[None, :], other=0)
                if SCORE == 1:
                    q_sq = tl.load(qsq_ptr + qrow, mask=gmask, other=0.0)
                else:
                    q_sq = tl.zeros((GR,), dtype=tl.float32)
        if SCORE == 0:
            if PER_HEAD_T:
                t_log2 = 1.4426950408889634 / tl.load(t_ptr + b * stride_tb + heads, mask=gmask, other=1.0)
            else:
                t_log2 = tl.full((GR,), inv_t * 1.4426950408889634, tl.float32)
        elif SCORE == 1:
            qn = tl.sqrt(q_sq) * qk_scale
        qs_hi = tl.zeros((GR, NW_P * 32), dtype=tl.float16)  # SCORE_DOT's query operand (see _attend_tile)
        qs_lo = qs_hi
        if SCORE_DOT:
            if SCORE == 2:  # R^T q over its row maximum (padded rows: 0), split into two fp16 parts
                cols = tl.arange(0, NW_P * 32)
                qpf = tl.load(qp_ptr + qrow[:, None] * BITS + cols[None, :],
                              mask=gmask[:, None] & (cols < BITS)[None, :], other=0.0)
                qn = tl.maximum(tl.max(tl.abs(qpf), axis=1), 1e-30)
                qpf = qpf / qn[:, None]
                qs_hi = qpf.to(tl.float16)
                qs_lo = (qpf - qs_hi.to(tl.float32)).to(tl.float16)
            else:
                qs_hi = _sign_matrix(qw, GR, NW, NW_P)
        PER_BYTE: tl.constexpr = 8 // VALUE_BITS
        NBC: tl.constexpr = BLOCK_D // PER_BYTE  # value bytes per token, padded
        c = tl.arange(0, NBC)
        cmask = c < D // PER_BYTE
        kc_base = kc_ptr + b * stride_kcb + hk * stride_kch
        kn_base = kn_ptr + b * stride_knb + hk * stride_knh
        vd_base = vd_ptr + b * stride_vdb + hk * stride_vdh
        vs_base = vs_ptr + b * stride_vsb + hk * stride_vsh
        vz_base = vz_ptr + b * stride_vzb + hk * stride_vzh
        # value column c * PER_BYTE + j accumulates in acc<j>; see _value_update for the shapes
        if USE_DOT:
            acc0 = tl.zeros((GR, NBC), dtype=tl.float32)
        elif GR == 1:
            acc0 = tl.zeros((BLOCK_N, NBC), dtype=tl.float32)
        else:
            acc0 = tl.zeros((GR, BLOCK_N, NBC), dtype=tl.float32)
        acc1 = acc0
        acc2 = acc0
        acc3 = acc0
        l_rows = tl.zeros((GR, BLOCK_N), dtype=tl.float32)  # per-row sums of p, reduced at the end
        z_rows = tl.zeros((GR, BLOCK_N), dtype=tl.float32)  # per-row sums of p * zero (per-token values)
        start = split * CHUNK_TILES * BLOCK_N  # a multiple of BLOCK_N the compiler can see (aligned loads)
        if N_ON_DEVICE:  # N slots were planned for; the first n_ptr[0] hold tokens (a static-capacity cache)
            end = tl.minimum(start + CHUNK_TILES * BLOCK_N, tl.load(n_ptr))
        else:
            end = tl.minimum(start + CHUNK_TILES * BLOCK_N, N)
        # The full tiles are masked against a bound the compiler sees as a multiple of BLOCK_N (a mask against
        # `end`, of unknown alignment, made the MHA kernel spill registers: Triton 3.6, sm_90); the row's
        # partial last tile, if any, goes first, on its own.
        end = tl.maximum(end, start)  # a static-capacity split past the filled slots: empty
        full_end = start + ((end - start) // BLOCK_N) * BLOCK_N
        if full_end < end:  # the row's partial last tile, first: no prefetched tile is held meanwhile
            n = full_end + tl.arange(0, BLOCK_N)
            nmask = n < end
            kw, kn, vbytes, sc, zr = _load_tile(
                kc_base, kn_base, vd_base, vs_base, vz_base, n, nmask, w, wmask, c, cmask,
                stride_kcn, stride_knn, stride_vdn, stride_vsn, stride_vzn, SCORE, VALUE_GROUPS, BLOCK_N)
            m_i, l_rows, z_rows, acc0, acc1, acc2, acc3 = _attend_tile(
                m_i, l_rows, z_rows, acc0, acc1, acc2, acc3, kw, kn, vbytes, sc, zr, n, nmask,
                qw, qs_hi, qs_lo, t_log2, qn, cos_ptr, qp_ptr, qrow, gmask, w, wmask, vs_base, vz_base, c,
                stride_vsn, stride_vzn, D, BITS, NW_P, VALUE_BITS, VALUE_GROUPS, SCORE, GR, USE_DOT, PRECISION,
                PER_BYTE, SCORE_DOT, HALF2, ASM)
        # The next tile's loads: by Triton's software pipeliner (PIPELINE = its stages: asynchronous copies through
        # shared memory), or by hand, issued before the current tile is processed.
        if not PIPELINE:
            n_next = start + tl.arange(0, BLOCK_N)
            nmask_next = n_next < full_end
            kw_next, kn_next, vb_next, sc_next, zr_next = _load_tile(
                kc_base, kn_base, vd_base, vs_base, vz_base, n_next, nmask_next, w, wmask, c, cmask,
                stride_kcn, stride_knn, stride_vdn, stride_vsn, stride_vzn, SCORE, VALUE_GROUPS, BLOCK_N)
        for n0 in tl.range(start, full_end, BLOCK_N, num_stages=PIPELINE if PIPELINE else None):
            if PIPELINE:
                n = n0 + tl.arange(0, BLOCK_N)
                nmask = n < full_end
                kw, kn, vbytes, sc, zr = _load_tile(
                    kc_base, kn_base, vd_base, vs_base, vz_base, n, nmask, w, wmask, c, cmask,
                    stride_kcn, stride_knn, stride_vdn, stride_vsn, stride_vzn, SCORE, VALUE_GROUPS, BLOCK_N)
            else:
                n, nmask = n_next, nmask_next
                kw, kn, vbytes, sc, zr = kw_next, kn_next, vb_next, sc_next, zr_next
                n_next = n + BLOCK_N
                nmask_next = n_next < full_end
                kw_next, kn_next, vb_next, sc_next, zr_next = _load_tile(
                    kc_base, kn_base, vd_base, vs_base, vz_base, n_next, nmask_next, w, wmask, c, cmask,
                    stride_kcn, stride_knn, stride_vdn, stride_vsn, stride_vzn, SCORE, VALUE_GROUPS, BLOCK_N)
            m_i, l_rows, z_rows, acc0, acc1, acc2, acc3 = _attend_tile(
                m_i, l_rows, z_rows, acc0, acc1, acc2, acc3, kw, kn, vbytes, sc, zr, n, nmask,
                qw, qs_hi, qs_lo, t_log2, qn, cos_ptr, qp_ptr, qrow, gmask, w, wmask, vs_base, vz_base, c,
                stride_vsn, stride_vzn, D, BITS, NW_P, VALUE_BITS, VALUE_GROUPS, SCORE, GR, USE_DOT, PRECISION,
                PER_BYTE, SCORE_DOT, HALF2, ASM)
        l_i = tl.sum(l_rows, axis=1)
        zsum = tl.sum(z_rows, axis=1)[:, None]
        smask = gmask[:, None] & cmask[None, :]
        if DIRECT:  # the only partial of its row: normalise and write the output (no combine launch)
            _store_value_columns(out_ptr + b * stride_ob + heads[:, None] * stride_oh + c[None, :] * PER_BYTE,
                                 acc0, acc1, acc2, acc3, zsum, 1.0 / l_i[:, None], smask, PER_BYTE, USE_DOT, GR)
        else:  # the partial (fp32, unnormalised) for the combine kernel
            _store_value_columns(acc_ptr + part[:, None] * BLOCK_D + c[None, :] * PER_BYTE,
                                 acc0, acc1, acc2, acc3, zsum, 1.0, smask, PER_BYTE, USE_DOT, GR)
    else:
        # ---- exact window: logits q . k / sqrt(D) ----
        d = tl.arange(0, BLOCK_D)
        dmask = d < D
        q = tl.load(q_ptr + b * stride_qb + heads[:, None] * stride_qh + d[None, :],
                    mask=gmask[:, None] & dmask[None, :], other=0.0).to(tl.float32)
        wk_base = wk_ptr + b * stride_wkb + hk * stride_wkh
        wv_base = wv_ptr + b * stride_wvb + hk * stride_wvh
        acc = tl.zeros((GR, BLOCK_D), dtype=tl.float32)
        for w0 in range(0, W, BLOCK_W):
            t = w0 + tl.arange(0, BLOCK_W)
            tmask = t < W
            kvmask = tmask[:, None] & dmask[None, :]
            kt = tl.load(wk_base + t[:, None] * stride_wkn + d[None, :], mask=kvmask, other=0.0).to(tl.float32)
            vt = tl.load(wv_base + t[:, None] * stride_wvn + d[None, :], mask=kvmask, other=0.0).to(tl.float32)
            s = tl.sum(q[:, None, :] * kt[None, :, :], axis=2) * (qk_scale * 1.4426950408889634)
            s = tl.where(tmask[None, :], s, -float("inf"))
            p, alpha, m_i, l_i = _online_softmax(s, m_i, l_i)
            acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * vt[None, :, :], axis=1)
        tl.store(acc_ptr + part[:, None] * BLOCK_D + d[None, :], acc, mask=gmask[:, None] & dmask[None, :])

    if not DIRECT:
        tl.store(m_ptr + part, m_i, mask=gmask)
        tl.store(l_ptr + part, l_i, mask=gmask)
        if FUSED:  # the row's last program to finish merges its partials: no combine launch
            tl.debug_barrier()  # every thread's partial stores are issued before the release below
            finished = tl.atomic_add(cnt_ptr + pid_bh, 1, sem="acq_rel")  # programs of this row done before us
            if finished == SPLITS_TOTAL - 1:
                for gi in range(GROUP):
                    _combine_row(m_ptr, l_ptr, acc_ptr, out_ptr, b * (HKV * GROUP) + hk * GROUP + gi, SPLITS_TOTAL,
                                 stride_ob, stride_oh, HKV * GROUP, D, BLOCK_D, BLOCK_S, ".cg")
                tl.atomic_xchg(cnt_ptr + pid_bh, 0)  # zero again for the next call on this stream


_RUNS_PTX = HAS_TRITON and not is_interpreted(_decode_split_kernel) and torch.version.hip is None
"""Whether the split kernel's inline PTX runs: compiled (not Triton's CPU interpreter) for an NVIDIA GPU (a ROCm
build of torch, whose GPUs are also ``"cuda"`` devices, gets the portable forms: SWAR popcount, fp32 unpack)."""


@triton.jit
def _combine_row(m_ptr, l_ptr, acc_ptr, out_ptr, row, SPLITS, stride_ob, stride_oh, HQ,
                 D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr, CACHE: tl.constexpr):
    """Merge the ``SPLITS`` partials ``(max, sum, acc)`` of query row ``row = b * HQ + head`` into its output.
    ``CACHE``: the loads' cache modifier (``".cg"``, through L2 only, when other programs wrote the partials during
    this launch)."""
    s = tl.arange(0, BLOCK_S)
    d = tl.arange(0, BLOCK_D)
    m_max = tl.full((BLOCK_S,), -float("inf"), dtype=tl.float32)
    for s0 in range(0, SPLITS, BLOCK_S):
        m_max = tl.maximum(m_max, tl.load(m_ptr + row * SPLITS + s0 + s, mask=s0 + s < SPLITS, other=-float("inf"),
                                          cache_modifier=CACHE))
    m = tl.max(m_max, axis=0)
    l_tot = tl.zeros((BLOCK_S,), dtype=tl.float32)
    o = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for s0 in range(0, SPLITS, BLOCK_S):
        smask = s0 + s < SPLITS
        wgt = tl.exp2(tl.load(m_ptr + row * SPLITS + s0 + s, mask=smask, other=-float("inf"), cache_modifier=CACHE)
                      - m)
        l_tot += wgt * tl.load(l_ptr + row * SPLITS + s0 + s, mask=smask, other=0.0, cache_modifier=CACHE)
        part = tl.load(acc_ptr + (row * SPLITS + s0 + s)[:, None] * BLOCK_D + d[None, :],
                       mask=smask[:, None], other=0.0, cache_modifier=CACHE)
        o += tl.sum(part * wgt[:, None], axis=0)
    o = o / tl.sum(l_tot, axis=0)
    bidx = row // HQ
    hidx = row % HQ
    tl.store(out_ptr + bidx * stride_ob + hidx * stride_oh + d, o.to(out_ptr.dtype.element_ty), mask=d < D)


@triton.jit(do_not_specialize=["SPLITS"])
def _decode_combine_kernel(m_ptr, l_ptr, acc_ptr, out_ptr, SPLITS, stride_ob, stride_oh, HQ,
                           D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr):
    _combine_row(m_ptr, l_ptr, acc_ptr, out_ptr, tl.program_id(0), SPLITS, stride_ob, stride_oh, HQ, D, BLOCK_D,
                 BLOCK_S, "")


# ----------------------------------------------------------------------------------------------------
# launcher


@functools.lru_cache(maxsize=None)
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4


@functools.lru_cache(maxsize=None)
def _cos_table(bits: int, device: torch.device) -> torch.Tensor:
    """``log2(e) * cos(pi h / bits)`` for h = 0..bits (the reference's expression, on the same device)."""
    return torch.cos(math.pi * torch.arange(bits + 1, device=device).float() / bits) * _LOG2E


_COUNTERS: dict = {}
_PARTIALS: dict = {}
MAX_PARTIALS = 64  # kept partials sets (one per device, stream and thread): past it all are dropped and made anew


def _stream_id(device: torch.device) -> int:
    """The handle of ``device``'s current CUDA stream (0 off CUDA: Triton's CPU interpreter runs in program order)."""
    return _current_stream(device.index) if device.type == "cuda" else 0


def _combine_counters(device: torch.device, rows: int) -> torch.Tensor:
    """The split kernel's per-row arrival counters for its fused combine (int32, zero between calls: the last
    program of a row resets its counter), one buffer per device and stream, grown by doubling. Not called while
    the current stream captures a CUDA graph (nothing is allocated mid-capture, and a graph replays launches for
    free, so the separate combine kernel runs there)."""
    key = (device, _stream_id(device))
    counters = _COUNTERS.get(key)
    if counters is None or counters.numel() < rows:
        counters = torch.zeros(max(1024, 2 * rows), dtype=torch.int32, device=device)
        _COUNTERS[key] = counters
    return counters


def _partials(device: torch.device, rows: int, block_d: int, capturing: bool) -> tuple:
    """The split programs' partial results, fp32: row maximum ``[rows]``, log-sum-exp ``[rows]`` and output
    ``[rows, block_d]`` (``rows`` = query rows x slices). Written and read back within one call, in the order of
    the current stream, so eager calls reuse one set per device, stream and thread (two threads' launches may
    interleave on one stream): three allocations less on every decode step. The set kept is the last size asked
    for (every layer of a decode step asks for the same); another size replaces it. Past ``MAX_PARTIALS`` kept sets
    (streams x threads) all are dropped; :func:`release_kept_buffers` drops them too. Under CUDA-graph capture each
    call allocates its own (the graph's memory pool keeps them for the replays)."""
    if capturing:
        return _new_partials(device, rows, block_d)
    key = (device, _stream_id(device), threading.get_ident())
    kept = _PARTIALS.get(key)
    if kept is None or kept[0] != (rows, block_d):
        if kept is None and len(_PARTIALS) >= MAX_PARTIALS:
            _PARTIALS.clear()
        kept = _PARTIALS[key] = (rows, block_d), _new_partials(device, rows, block_d)
    return kept[1]


def _new_partials(device: torch.device, rows: int, block_d: int) -> tuple:
    f32 = dict(dtype=torch.float32, device=device)
    return torch.empty(rows, **f32), torch.empty(rows, **f32), torch.empty(rows, block_d, **f32)


def release_kept_buffers() -> None:
    """Drop the buffers eager decode calls keep between calls (the split partials, the fused combine's counters),
    so that ``torch.cuda.empty_cache()`` can return their memory; the next call allocates them again."""
    _PARTIALS.clear()
    _COUNTERS.clear()


def _plan_splits(n: int, rows: int, device: torch.device, block_n: int, split_k: int | None,
                 programs_per_sm: int, single_split_max_n: int) -> tuple[int, int]:
    """(number of splits, chunk length) for ``n`` compressed keys and ``rows = batch * kv heads``: by
    default as many splits as fit one wave of ``programs_per_sm`` programs on every SM (at least one: more
    rows than that run in several waves), and one split when ``n <= single_split_max_n`` (short contexts,
    where a second launch costs more than the parallelism gains); chunks are whole multiples of ``block_n``,
    so no split is empty."""
    if n == 0:
        return 0, block_n
    if split_k is None:
        split_k = 1 if n <= single_split_max_n else max(1, programs_per_sm * _sm_count(device) // rows)
    chunk = cdiv(cdiv(n, split_k), block_n) * block_n
    return cdiv(n, chunk), chunk


def _default_config(score: str, group: int, device: torch.device) -> dict:
    """Tile sizes and inner-product form, from sweeps on an H200 (``benchmarks/decode.py --tune``; Triton 3.6) and
    the compiler's register report.

    One query head per kv head: fp32 multiply-adds into per-row partial sums, 128-key tiles for "hamming"
    (64 for "cos"/"asym", which need more registers). (The fp16 tensor-core form below, its one query row padded
    to the MMA's 16, was 4-14% slower there: 65.4 vs 62.7 us at B = 1, 32k; ``results/decode_tune_half2_h200.json``.)

    MHA, ``programs_per_sm``: 2 was ~5% faster than 4 at B = 1, 32k in three sweeps (58.2-60.0 vs 61.3-62.7 us) and
    slower at B = 8 (390.6 vs 380.6); 4 stays.

    GQA groups: one program serves the group's query heads from one read of the cache, the value products on tensor
    cores (``tl.dot``) in **fp16**: the weights ``p`` (<= 256 under the lazily moved maximum) rounded to fp16, and
    the values: with ``half2_unpack`` (4-bit codes, one scale and zero per token: the paper's format)
    ``(code - 8) * scale`` rounded once to fp16 by :func:`_nibbles_to_half` (PTX on packed fp16 pairs) and ``zero +
    8 * scale`` summed apart in fp32; otherwise ``zero + code * scale`` rounded to fp16. 2**-11 relative per
    operand, fp32 accumulation: flash attention's precision. Measured (same run,
    ``results/decode_tune_half2_h200.json``; error against the torch reference 8.6e-4 of the largest output either
    way, the fp16 output's rounding; measured before the codes were centred and before ``popc``, which took another
    7-19% off from 32k), fp32 unpack ->
    ``half2_unpack``: B = 1, 32q/8kv, 32k 35.1 -> 31.9 us, 128k 99.8 -> 88.3; 32q/4kv 32k 27.6 -> 26.9; B = 8, 128k
    714 -> 622. The earlier tf32 form (``config={"precision": "tf32"}``, weights ``p * scale`` rounded to
    nearest tf32 by :func:`_round_to_tf32`) was slower still (``results/decode_tune_gqa_tc_h200.json``: 42.7 us at
    32k). ``"ieee"`` / ``"tf32x3"`` give fp32-accurate products. Nsight Compute of the fp16 form before
    ``half2_unpack`` (``benchmarks/ncu_decode.py``, B = 1, 32k, 32q/8kv): latency-bound, no eligible warp on 44% of
    cycles.

    ``score_dot``: the query-key products as an fp16 MMA of +-1 sign matrices (:func:`_sign_matrix`) instead of
    xor + popcount: exact, but unpacking 32 signs per code word costs more than popcounts ("hamming" 31.9 -> 43.5
    us at 32k). For "asym" the other form (32 sign bits per word applied to ``R^T q``) is faster at groups of 4
    (43.4 vs 46.7 us) but spills registers at groups of 8 (255 registers, ~950 stack bytes, compiled for sm_90), so
    ``score_dot`` is the default there.

    ``programs_per_sm``: programs resident per SM; the split plan fills one wave of them (:func:`_plan_splits`). The
    "hamming" GQA form takes 146 registers a thread at groups of 4 (sm_90, ``kernel_resources.py``), three blocks of 4
    warps per SM: 3 was the fastest of 2 / 3 / 4 for 32q/8kv (B = 1 and 8, 32k and 128k; with 3 stages, 154
    registers: 27.8 vs 32.3 us at 4, ``results/decode_tune_pps_h200.json``); at groups of 8 it took 206 with 1 stage
    (two blocks fit; 2 was the fastest, 32q/4kv, B = 1, 32k: 26.9 vs 33.4 us) and takes 148 with 3 stages, so three
    fit: 3 is faster at 128k (B = 1: 52.4 vs 57.1 us; B = 8: 308.7 vs 355.8) and 5% slower at 32k (25.1 vs 23.9).
    "asym" takes 200-255 registers: two blocks fit, 2 was the fastest (43.4 vs 50.7 us).
    ``config={"maxnreg": 128, "programs_per_sm": 4}`` was
    1-4% faster than the fp32-unpack default for "hamming" and 1.5x slower for "asym" (spills); not a default. (One
    program per query head, each re-reading its kv head's cache, measured 2-4x slower.)

    ``num_stages``: 1 issues the next tile's loads by hand before the current tile's work; 2 or 3 hands the tile
    loop to Triton's software pipeliner (asynchronous copies through shared memory, ``cp.async``). Swept on the
    H200 (``results/decode_tune_stages_h200.json``, every row checked against the reference): 3 stages made GQA
    "hamming" 4-15% faster (B = 1, 32q/8kv: 32k 29.9 -> 28.1 us, 128k 79.4 -> 71.6; 32q/4kv 25.3 -> 24.3; B = 8,
    128k 551.0 -> 478.7), "asym" 1% slower in its default form and 9% faster with ``score_dot`` (47.1 -> 42.9), and
    MHA 9% slower (61.5 -> 67.1 us). So GQA takes 3 stages, except "asym" in its default form at groups of 4 or
    fewer; MHA keeps 1.

    ``config`` overrides are checked by :func:`_check_config`; turning ``use_dot`` off on its own selects the
    fp32 multiply-adds (``"ieee"``).
    ``fused_combine``: the split kernel merges each row's partials itself -- the last of the row's programs to
    finish (an atomic arrival counter per row, :func:`_combine_counters`) runs the combine -- so an eager call
    launches the query prep (split rows) and one split kernel, not three kernels. While a CUDA graph is being
    captured the separate combine kernel runs instead (no allocation mid-capture; a replay launches for free).
    ``single_split_max_n``: outside CUDA-graph capture, contexts up to this many compressed tokens run as one split per
    (sequence, kv head) and write the output directly (one launch: no query prep, no partials); under capture every
    context is split (launches cost nothing in a graph). Eager decode is bound by the host's launches: on an H200, 7B
    shapes at B = 1, one split made a whole eager decode step faster at 8k than prep + split (MHA 29.9 vs 31.9 ms,
    GQA 35.9 vs 38.5 ms), though its GPU time is far longer where there are few rows (B = 1, 32q/8kv, 8k: 8 programs,
    132 us against 17 us split), and an eager call issues faster (``results/decode_eager_h200.json``, B = 1, 8k,
    through the checked entry point: 101-160 us against 153-232 us split with the fused combine; SDPA 47-85 us). That
    was before ``query_in_split_max_n``: for GQA, whose one split is GPU-bound at 8k, the limit is now 4096.
    ``query_in_split_max_n``: outside capture, "hamming"/"cos" calls split over up to this many compressed tokens
    sketch the query in every split program (``QUERY_HERE``: each loads R) instead of launching the query prep, so
    an eager call is one launch at every context up to it. Measured on an H200 in two calls (2026-12-01,
    ``results/decode_eager_h200_query_in_split.json`` and ``_forms.json``, B = 1, through the unchecked call the
    cache makes, wall time per call of back-to-back calls; this host's speed drifts, identical launches differ by up
    to 2x within a call): prep + split against the query in the splits, MHA 16k 129 / 193 against 92 / 143 us, 32k
    233 / 238 against 131 / 161; GQA 32q/8kv 16k 174 / 126 against 127 / 91, 32k 179 / 138 against 132 / 100;
    32q/4kv 16k-32k 132-188 against 96-140. At 8k one split against the query in the splits: MHA 72 / 72 against
    92 / 95; 32q/8kv 115 / 114 against 90 / 97 (8 programs: GPU-bound); 32q/4kv 163 / 160 against 100 / 149. Hence
    MHA: one split to 8192 tokens, the query in the splits to 16384 (32k looked faster too, but the extra loads of R
    by every program cost GPU time that was not measured on this kernel); GQA: one split to 4096, the query in the
    splits to 32768 (longer contexts not measured). SDPA took 47-149 us (MHA) and 48-88 us (GQA) in those calls:
    eager calls stay slower than SDPA at every measured context (MHA 32k was faster in the first call only), bound
    by the host's time to issue one Triton launch (~70-100 us there against SDPA's ~47).

    ``cached_launch``: relaunch the kept compiled kernels without Triton's per-call argument binding
    (:func:`kernels._launcher.launch`; the same compiled kernel on the same arguments, bit-identical outputs);
    False binds every launch through ``JITFunction.run`` (to compare: ``benchmarks/decode_eager.py``'s
    ``default-uncached`` form, ``benchmarks/launch_ab.py``).

    Registers (``benchmarks/kernel_resources.py``: compiled for sm_90 without a GPU): every default form fits
    255 registers a thread; only "asym" at groups of 4 (its faster form) spills a few bytes."""
    if group > 1:
        asym = score == "asym"
        return {"block_n": 64, "use_dot": True, "precision": "fp16", "half2_unpack": True,
                "score_dot": asym and group > 4, "num_warps": 4, "num_stages": 1 if asym and group <= 4 else 3,
                "programs_per_sm": 2 if asym else 3, "single_split_max_n": 4096, "query_in_split_max_n": 32768,
                "fused_combine": True, "maxnreg": None, "cached_launch": True}
    return {"block_n": 128 if score == "hamming" else 64, "use_dot": False, "precision": "ieee", "half2_unpack": True,
            "score_dot": False, "num_warps": 4, "num_stages": 1, "programs_per_sm": 4, "single_split_max_n": 8192,
            "query_in_split_max_n": 16384, "fused_combine": True, "maxnreg": None, "cached_launch": True}


PRECISIONS = ("ieee", "tf32", "tf32x3", "fp16")


def _half2_unpack(cfg: dict, value_bits: int, value_groups: int) -> bool:
    """Whether the kernel unpacks values in packed fp16 pairs (:func:`_nibbles_to_half`): asked for, on the fp16
    tensor-core form, for 4-bit codes with one scale and zero per token (the paper's format); other formats take
    the fp32 unpack."""
    return bool(cfg["half2_unpack"]) and cfg["precision"] == "fp16" and value_bits == 4 and value_groups == 1


@functools.lru_cache(maxsize=256)
def _defaults(score: str, group: int, device, make_config) -> dict:
    """``make_config(score, group, device)`` kept per arguments: the launch path reads it on every call, never
    writes. ``make_config`` is ``_default_config`` as the module holds it at the call (so a test that swaps it in
    gets its own entry)."""
    return make_config(score, group, device)


def _merged_config(score: str, group: int, device, config: dict | None) -> dict:
    """The defaults of ``_default_config`` with ``config``'s overrides (read-only: the defaults are shared). Turning
    ``use_dot`` off without naming a precision selects ``"ieee"`` (the GQA default, fp16, exists only as a
    tensor-core form)."""
    if not config:
        return _defaults(score, group, device, _default_config)
    cfg = {**_defaults(score, group, device, _default_config), **config}
    if config and "use_dot" in config and "precision" not in config and not cfg["use_dot"]:
        cfg["precision"] = "ieee"
    return cfg


def _check_config(config: dict | None, score: str, group: int, device) -> None:
    """``config`` (tuning overrides of ``_default_config``) names known keys with usable values, and the merged
    config is one the kernel serves on every backend. Raises ValueError (TypeError for a value of the wrong type)
    naming the key and what it accepts."""
    if config is None:
        return
    known = _default_config("hamming", 1, None)
    unknown = sorted(set(config) - set(known))
    if unknown:
        raise ValueError(f"config: unknown keys {unknown}; the keys are {sorted(known)}")
    if "precision" in config:
        check_choice("config['precision']", config["precision"], PRECISIONS)
    for key in ("use_dot", "score_dot", "half2_unpack", "fused_combine", "cached_launch"):
        if key in config:
            check_bool(f"config[{key!r}]", config[key])
    for key in ("block_n", "num_warps", "num_stages", "programs_per_sm") + (
            ("maxnreg",) if config.get("maxnreg") is not None else ()):
        if key in config:
            check_int(f"config[{key!r}]", config[key], low=1)
    for key in ("single_split_max_n", "query_in_split_max_n"):
        if key in config:
            check_int(f"config[{key!r}]", config[key], low=0)
    for key in ("block_n", "num_warps"):
        if key in config and config[key] & (config[key] - 1):
            raise ValueError(f"config[{key!r}] must be a power of two, got {config[key]}")
    cfg = _merged_config(score, group, device, config)
    if cfg["precision"] != "ieee" and not cfg["use_dot"]:
        raise ValueError(f"config: precision={cfg['precision']!r} is a tensor-core (tl.dot) form and needs "
                         "use_dot=True; without tl.dot the products are fp32 ('ieee')")
    if cfg["use_dot"] and cfg["block_n"] < 16:
        raise ValueError(f"config['block_n'] must be >= 16 with use_dot=True (the MMA's K dimension), "
                         f"got {cfg['block_n']}")


def _capturing(device: torch.device) -> bool:
    """Whether ``device``'s current CUDA stream is capturing a graph (False off CUDA): the launch plan then splits every
    context, prepares the query and launches the combine kernel (launches are free in a replay; nothing is allocated
    mid-capture)."""
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


@functools.lru_cache(maxsize=1024, typed=True)
def _split_meta(D, bits, group, value_groups, value_bits, score_id, per_head_t, n_on_device, direct, query_here,
                fused, block_n, use_dot, precision, score_dot, half2, num_stages, num_warps, maxnreg, asm) -> tuple:
    """The split kernel's constexprs and launch options (two dicts, shared between calls: read-only), kept per
    combination (and argument type) so an eager call does not rebuild them. ``asm``: ``_RUNS_PTX`` at the call."""
    gr, nw_p = next_pow2(group), next_pow2(bits // 32)
    constexprs = dict(
        D=D, BITS=bits, NW_P=nw_p, GROUP=group, VALUE_GROUPS=value_groups, VALUE_BITS=value_bits, SCORE=score_id,
        GR=gr, BLOCK_N=block_n, BLOCK_D=max(16, next_pow2(D)), BLOCK_W=max(2, 16 // gr),
        PER_HEAD_T=per_head_t, USE_DOT=use_dot, PRECISION=precision,
        BLOCK_KQ=max(1, min(16, 4096 // (gr * nw_p * 32))), N_ON_DEVICE=n_on_device, DIRECT=direct,
        QUERY_HERE=query_here, SCORE_DOT=score_dot, HALF2=half2,
        ASM=asm, PIPELINE=num_stages if num_stages > 1 else 0, FUSED=fused,
        BLOCK_S=32,  # the fused combine's partials per step, masked: a constant, so no recompile as contexts grow
    )
    options = dict(num_warps=num_warps, num_stages=1,  # the tile loop's stages come as PIPELINE (the window's: 1)
                   **({} if maxnreg is None else {"maxnreg": maxnreg}))
    return FixedArgs(constexprs), FixedArgs(options)


class StoreLayout:
    """The compressed tensors' launch arguments, worked out once per set of store buffers: the key codes viewed as
    int32 words and every tensor's first three strides (a decode step of a growing cache passes the same whole
    buffers until they grow, and asking a tensor for its strides costs about a microsecond of host time each, ~34
    per step). ``StoreLayout(key_codes, key_norms, values_packed, value_scale, value_zero)``, the tensors as
    :func:`h1b_decode_attention` takes them (``key_norms`` may be None); pass it as ``layout=`` to
    :func:`h1b_decode_attention_unchecked` together with the same tensors."""

    __slots__ = ("words", "norms", "args", "tensors")

    def __init__(self, key_codes, key_norms, values_packed, value_scale, value_zero):
        self.tensors = (key_codes, key_norms, values_packed, value_scale, value_zero)
        self.words = kw = as_words(key_codes)
        self.norms = key_norms if key_norms is not None else kw
        self.args = (kw, *kw.stride()[:3], self.norms, *self.norms.stride()[:3],
                     values_packed, *values_packed.stride()[:3], value_scale, *value_scale.stride()[:3],
                     value_zero, *value_zero.stride()[:3])

    def serves(self, key_codes, key_norms, values_packed, value_scale, value_zero) -> bool:
        """Whether it was built from these very tensors."""
        kept = self.tensors
        return (kept[0] is key_codes and kept[1] is key_norms and kept[2] is values_packed and kept[3] is value_scale
                and kept[4] is value_zero)


def _launch(q, key_codes, key_norms, values_packed, value_scale, value_zero, window_k, window_v,
            projection, score, temperature, value_bits, split_k, config, n_valid=None, length=None, layout=None):
    """Launch order: the query-projection kernel (``"asym"`` always; "hamming"/"cos" when the context is split
    past ``query_in_split_max_n`` tokens, or under CUDA-graph capture),
    the split kernel, and the combine kernel only while a CUDA graph is being captured (or with
    ``fused_combine=False``): otherwise the split kernel merges each row's partials itself, and with one split and no
    window it writes the output directly. ``n_valid``: see :func:`h1b_decode_attention` (the splits are planned for
    all ``N`` slots). ``length``: see :func:`h1b_decode_attention_unchecked`."""
    dev = q.device
    if dev.type == "cuda" and dev.index != _current_device():  # Triton launches on the current device
        with torch.cuda.device(dev):
            return _launch(q, key_codes, key_norms, values_packed, value_scale, value_zero, window_k, window_v,
                           projection, score, temperature, value_bits, split_k, config, n_valid, length, layout)
    B, Hq, D = q.shape
    _, Hkv, N, _ = key_codes.shape
    if length is not None:
        N = length
    bits = projection.shape[1]
    group = Hq // Hkv
    cfg = _merged_config(score, group, dev, config)
    cached = cfg["cached_launch"]  # relaunch the compiled kernels without Triton's per-call binding (_launcher)
    block_n, block_d = cfg["block_n"], max(16, next_pow2(D))
    W = 0 if window_k is None else window_k.shape[2]
    rows = B * Hkv
    # under CUDA-graph capture launches cost nothing: always split, and merge in the combine kernel
    capturing = _capturing(dev)
    splits, chunk = _plan_splits(N, rows, dev, block_n, split_k, cfg["programs_per_sm"],
                                 0 if capturing else cfg["single_split_max_n"])
    total = splits + (1 if W > 0 else 0)
    direct = total == 1 and W == 0
    # "hamming"/"cos": a direct row, or (eagerly) a split context of up to query_in_split_max_n tokens, sketches its
    # query in the split programs: no prep launch ("asym" reads R^T q from memory: always prepared)
    query_here = score != "asym" and (direct or (not capturing and N <= cfg["query_in_split_max_n"]))
    fused = cfg["fused_combine"] and not (capturing or direct or total == 0)
    counters = _combine_counters(dev, rows) if fused else None
    score_id = _SCORE_ID[score]
    qk_scale = 1.0 / math.sqrt(D)

    if q.stride(-1) != 1:
        q = q.contiguous()
    # the query's projection, once per call: always for "asym"; for "hamming" / "cos" when the rows are split past
    # query_in_split_max_n tokens or under capture (otherwise the split programs project it: one launch)
    # unused arguments alias tensors of the dtype the kernel reads them as: its compressed-key branch is compiled
    # even when it is not run (N = 0 with a window), and a float there for the int32 query words does not compile
    if layout is None:
        layout = StoreLayout(key_codes, key_norms, values_packed, value_scale, value_zero)
    kw = layout.words
    q_words, q_sq, q_proj = kw, projection, projection
    if N > 0 and not query_here:
        f32 = dict(dtype=torch.float32, device=dev)
        q2 = q.reshape(B * Hq, D)
        if score_id == 2:
            q_proj = torch.empty(B * Hq, bits, **f32)
        else:
            q_words = torch.empty(B * Hq, bits // 32, dtype=torch.int32, device=dev)
            q_sq = torch.empty(B * Hq, **f32) if score_id == 1 else projection
        asym_scale = math.sqrt(math.pi / 2) / bits * qk_scale * _LOG2E
        launch(_query_prep_kernel, (cdiv(B * Hq, 16),),
               (q2, projection, q_words, q_sq, q_proj, B * Hq, D, q2.stride(0), asym_scale),
               dict(BITS=bits, SCORE=score_id, BLOCK_M=16, BLOCK_D=block_d, BLOCK_K=min(64, block_d),
                    BLOCK_BITS=min(128, next_pow2(bits))), cached=cached)
    cos_table = _cos_table(bits, dev) if score_id == 1 else q
    per_head_t = isinstance(temperature, torch.Tensor)
    t_tensor = temperature if per_head_t else q
    inv_t = 1.0 / temperature if (score_id == 0 and not per_head_t) else 1.0

    wk = window_k if W > 0 else q  # never read when W == 0 (q's three strides stand in)
    wv = window_v if W > 0 else q
    out = torch.empty(B, Hq, D, dtype=q.dtype, device=dev)
    if direct:
        m = lse = acc = out  # not written
    else:
        m, lse, acc = _partials(dev, B * Hq * total, block_d, capturing)
    launch(_decode_split_kernel, (rows, total), (
        q, q.stride(0), q.stride(1), projection, out, out.stride(0), out.stride(1),
        q_words, q_sq, q_proj, t_tensor, t_tensor.stride(0) if t_tensor.dim() == 2 else 0, inv_t, cos_table,
        *layout.args,
        wk, *wk.stride()[:3],
        wv, *wv.stride()[:3],
        m, lse, acc, kw if counters is None else counters,
        N, W, Hkv, chunk // block_n, splits, total, qk_scale, q if n_valid is None else n_valid,
    ), *_split_meta(D, bits, group, value_scale.shape[-1], value_bits, score_id, per_head_t, n_valid is not None,
                    direct, query_here and not direct, counters is not None, cfg["block_n"], cfg["use_dot"],
                    cfg["precision"], cfg["score_dot"], _half2_unpack(cfg, value_bits, value_scale.shape[-1]),
                    cfg["num_stages"], cfg["num_warps"], cfg["maxnreg"], _RUNS_PTX), cached=cached)
    if not direct and counters is None:
        launch(_decode_combine_kernel, (B * Hq,), (m, lse, acc, out, total, out.stride(0), out.stride(1), Hq),
               dict(D=D, BLOCK_D=block_d, BLOCK_S=min(32, next_pow2(total))), cached=cached)
    return out


# ----------------------------------------------------------------------------------------------------
# reference and public entry point


def h1b_decode_attention_reference(
    q, key_codes, values_packed, value_scale, value_zero, *, projection, score, temperature=None,
    key_norms=None, window_k=None, window_v=None, value_bits=4, n_valid=None,
) -> torch.Tensor:
    """Plain torch, fp32: the same inputs and result as :func:`h1b_decode_attention` (no checks).

    Logits follow ``h1bkv_lite.attention.sketched_logits``; values are dequantized in fp32 (not cast
    back to the original dtype). ``n_valid``: attend to the first ``int(n_valid)`` compressed slots only.
    """
    if n_valid is not None:
        n = int(n_valid.reshape(-1)[0])
        key_codes, values_packed, value_scale, value_zero = (
            t[:, :, :n] for t in (key_codes, values_packed, value_scale, value_zero))
        key_norms = None if key_norms is None else key_norms[:, :, :n]
    B, Hq, D = q.shape
    Hkv, N = key_codes.shape[1], key_codes.shape[2]
    bits = projection.shape[1]
    group = Hq // Hkv
    qf = q.float().reshape(B, Hkv, group, D)  # query heads of one kv head side by side
    proj = qf @ projection  # [B, Hkv, group, bits]
    if score == "asym":
        dots = proj @ (unpack_bits(key_codes).float() * 2 - 1).transpose(-1, -2)
        logits = math.sqrt(math.pi / 2) / bits * key_norms.float().unsqueeze(-2) * dots / math.sqrt(D)
    else:
        h = hamming_scores_reference(pack_bits(proj >= 0), key_codes).float()  # [B, Hkv, group, N]
        if score == "hamming":
            t = torch.as_tensor(temperature, dtype=torch.float32, device=q.device)
            t = t.reshape(B, Hq) if t.dim() == 2 else t.expand(Hq).reshape(1, Hq)
            logits = (1 - 2 * h / bits) / t.reshape(-1, Hkv, group, 1)
        else:
            cos = torch.cos(math.pi * h / bits)
            logits = qf.norm(dim=-1, keepdim=True) * key_norms.float().unsqueeze(-2) * cos / math.sqrt(D)
    G = value_scale.shape[-1]
    codes = unpack_codes(values_packed, value_bits).float().reshape(B, Hkv, N, G, D // G)
    v_hat = (value_zero.float().unsqueeze(-1) + codes * value_scale.float().unsqueeze(-1)).reshape(B, Hkv, N, D)
    values = v_hat
    if window_k is not None and window_k.shape[2] > 0:
        logits = torch.cat([logits, qf @ window_k.float().transpose(-1, -2) / math.sqrt(D)], dim=-1)
        values = torch.cat([v_hat, window_v.float()], dim=2)
    probs = torch.softmax(logits, dim=-1)  # [B, Hkv, group, N + W]
    return (probs @ values).reshape(B, Hq, D).to(q.dtype)


def h1b_decode_attention(
    q: torch.Tensor,
    key_codes: torch.Tensor,
    values_packed: torch.Tensor,
    value_scale: torch.Tensor,
    value_zero: torch.Tensor,
    *,
    projection: torch.Tensor,
    score: str,
    temperature=None,
    key_norms: torch.Tensor | None = None,
    window_k: torch.Tensor | None = None,
    window_v: torch.Tensor | None = None,
    value_bits: int = 4,
    split_k: int | None = None,
    backend: str = "auto",
    config: dict | None = None,
    n_valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention of one new query token per sequence and head over an H1B-KV cache.

    Parameters
    ----------
    q : ``[B, Hq, D]`` fp16 / bf16 / fp32, the new token's queries.
    key_codes : uint8 ``[B, Hkv, N, bits // 8]`` SimHash codes of the compressed keys (``bits`` a
        multiple of 32 for the Triton path). ``Hq`` must be a multiple of ``Hkv``; query head ``h`` reads
        kv head ``h // (Hq // Hkv)``. ``N`` may be 0 when a window is given.
    values_packed : uint8 ``[B, Hkv, N, D * value_bits // 8]``; value_scale, value_zero : fp16
        ``[B, Hkv, N, G]``, ``G`` groups per vector (``G = 1``: per token, the paper's form); the layout
        of :class:`h1bkv_lite.QuantizedTensor`.
    projection : float32 ``[D, bits]``, the sketcher's R (``SimHashSketcher.projection_on(device)``).
    score : ``"hamming"``, ``"cos"`` or ``"asym"`` (module docstring).
    temperature : float, one-element tensor, tensor ``[Hq]`` or ``[B, Hq]`` (per sequence, as the cache
        calibrates it; > 0); required by ``"hamming"``, not accepted by the others.
    key_norms : ``[B, Hkv, N]`` fp16 (or any float) key norms; required by ``"cos"`` and ``"asym"``.
    window_k, window_v : ``[B, Hkv, W, D]`` fp16 / bf16 / fp32 exact newest tokens, both or neither
        (``W`` may be 0).
    value_bits : 2, 4 or 8.
    split_k : number of context chunks per (sequence, kv head); ``None`` picks enough to fill the GPU.
    backend : ``"auto"`` (Triton on CUDA, torch elsewhere), ``"triton"`` or ``"torch"``.
    config : tuning overrides for the Triton path (keys of ``_default_config``: tile, warps, programs per SM,
        pipeline stages of the tile loop, ``use_dot``, ``precision`` in ``PRECISIONS``, ``half2_unpack`` (used by the
        fp16 form with 4-bit per-token values only), ``score_dot``, ``maxnreg``, and the eager launch policy:
        ``single_split_max_n``, ``query_in_split_max_n``, ``fused_combine``, ``cached_launch``); for benchmarks.
        Checked on every backend (ValueError / TypeError naming the key).
    n_valid : int32 tensor of one element on q's device, or None (all ``N``). Only the first ``n_valid`` of
        the ``N`` compressed slots hold tokens; the splits are planned for all ``N``, so the call's arguments
        and launch grid stay the same while a static-capacity cache fills (what a CUDA graph replays). Its
        value is read on the device, not checked: ``1 <= n_valid <= N`` (or ``0 <= n_valid`` with a window).

    Returns
    -------
    ``[B, Hq, D]`` in q's dtype. No input is modified. Shapes, dtypes and devices are checked, values are
    not: scanning the cache for NaN would cost a pass over it and a device sync on every decode step, so
    NaN/Inf inputs simply propagate (a temperature tensor on the GPU is likewise not checked for > 0).
    """
    _check_decode_inputs(q, key_codes, values_packed, value_scale, value_zero, projection, score, key_norms,
                         window_k, window_v, value_bits)
    B, Hq, D = q.shape
    temperature = _check_temperature(temperature, score, Hq, q.device, B)
    if split_k is not None:
        check_int("split_k", split_k, low=1)
    _check_config(config, score, Hq // key_codes.shape[1], q.device)
    if n_valid is not None:
        check_tensor("n_valid", n_valid, dtypes=(torch.int32,), finite=False)
        if n_valid.numel() != 1 or n_valid.device != q.device:
            raise ValueError(f"n_valid must be one int32 element on q's device ({q.device}), got shape "
                             f"{tuple(n_valid.shape)} on {n_valid.device}")
    if not use_triton(backend, q.device, _decode_split_kernel):
        return h1b_decode_attention_reference(
            q, key_codes, values_packed, value_scale, value_zero, projection=projection, score=score,
            temperature=temperature, key_norms=key_norms, window_k=window_k, window_v=window_v,
            value_bits=value_bits, n_valid=n_valid,
        )
    if not decode_kernel_serves(projection.shape[1]):
        raise ValueError(
            f"the Triton kernel needs bits (projection.shape[1]) a multiple of 32, got {projection.shape[1]} "
            "(use backend='torch')"
        )
    for name, t in (("values_packed", values_packed), ("value_scale", value_scale), ("value_zero", value_zero),
                    ("key_norms", key_norms), ("window_k", window_k), ("window_v", window_v)):
        if t is not None and t.shape[-1] > 1 and t.stride(-1) != 1:
            raise ValueError(f"{name} must have a contiguous last dim (stride 1), got strides {t.stride()}")
    return _launch(q, key_codes, key_norms, values_packed, value_scale, value_zero, window_k, window_v,
                   projection.contiguous(), score, temperature, value_bits, split_k, config, n_valid)


def h1b_decode_attention_unchecked(q, key_codes, values_packed, value_scale, value_zero, *, projection, score,
                                   temperature, key_norms, window_k, window_v, value_bits,
                                   n_valid=None, config=None, length=None, layout=None) -> torch.Tensor:
    """:func:`h1b_decode_attention` on the Triton path without its argument checks (the cache's decode hot
    path, after its first step went through the checked entry point with the same layout). ``temperature``
    as :func:`h1b_decode_attention` returns it from its checks: None, a float or a float32 CUDA tensor
    ``[Hq]`` / ``[B, Hq]``; ``projection`` contiguous float32 ``[D, bits]``; ``config`` one that
    :func:`h1b_decode_attention` accepted (benchmarks time the launch forms this way). ``length``: None, or a host
    int ``<= N``: only the first ``length`` compressed slots hold tokens, and the call is the one on the slices
    ``[:, :, :length]`` of the compressed tensors (a growing store passes its whole buffers: no views to build on
    every decode step). Not with ``n_valid``. ``layout``: None, or the :class:`StoreLayout` of these same compressed
    tensors (built once while they stay the same; :meth:`StoreLayout.serves` tells)."""
    return _launch(q, key_codes, key_norms, values_packed, value_scale, value_zero, window_k, window_v,
                   projection, score, temperature, value_bits, None, config, n_valid, length, layout)


def decode_kernel_serves(bits: int) -> bool:
    """Whether the Triton decode kernel serves sketches of ``bits`` bits (whole 32-bit words). Every other
    precondition is a shape or dtype the cache always meets; callers fall back to the reference when False."""
    return bits % 32 == 0


def _check_temperature(temperature, score: str, heads: int, device, batch: int = 1):
    """None (not "hamming"), a positive float, or a float32 ``[heads]`` / ``[batch, heads]`` tensor on
    ``device``."""
    if score != "hamming":
        if temperature is not None:
            raise ValueError(f"temperature applies to score='hamming' only, got one with score={score!r}")
        return None
    if temperature is None:
        raise ValueError("temperature is required for score='hamming' (a float or a tensor [Hq])")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float, torch.Tensor)):
        raise TypeError(f"temperature must be a float or a tensor, got {type(temperature).__name__}")
    if isinstance(temperature, torch.Tensor) and temperature.numel() == 1 and temperature.device.type == "cpu":
        temperature = float(temperature)
    if not isinstance(temperature, torch.Tensor):
        if not (math.isfinite(temperature) and temperature > 0):
            raise ValueError(f"temperature must be finite and > 0, got {temperature}")
        return float(temperature)
    t = temperature.reshape(()).expand(heads) if temperature.numel() == 1 else temperature
    if t.shape != (heads,) and t.shape != (batch, heads):
        raise ValueError(f"temperature must be a scalar or have shape [{heads}] (one per query head) or "
                         f"[{batch}, {heads}] (per sequence and head), got {tuple(t.shape)}")
    if t.device.type == "cpu" and not bool((torch.isfinite(t) & (t > 0)).all()):
        raise ValueError("temperature must be finite and > 0")
    return t.to(device=device, dtype=torch.float32).contiguous()


def _check_decode_inputs(q, key_codes, values_packed, value_scale, value_zero, projection, score, key_norms,
                         window_k, window_v, value_bits) -> None:
    """Shapes, dtypes and devices only (no pass over the data, no device sync)."""
    check_tensor("q", q, ndim=3, dtypes=FLOAT_DTYPES, finite=False)
    check_tensor("key_codes", key_codes, ndim=4, dtypes=(torch.uint8,), nonempty=False)
    check_choice("score", score, SCORES)
    check_choice("value_bits", value_bits, VALUE_BITS)
    check_tensor("projection", projection, ndim=2, dtypes=(torch.float32,), finite=False)
    B, Hq, D = q.shape
    Bk, Hkv, N, nbytes = key_codes.shape
    if Bk != B:
        raise ValueError(f"key_codes batch ({Bk}) must equal q's ({B})")
    if Hkv == 0 or Hq % Hkv:
        raise ValueError(f"q heads ({Hq}) must be a multiple of key_codes heads ({Hkv})")
    if tuple(projection.shape) != (D, nbytes * 8):
        raise ValueError(
            f"projection must have shape [D, bits] = [{D}, {nbytes * 8}] (q head_dim, key_codes bytes * 8), "
            f"got {tuple(projection.shape)}"
        )
    check_tensor("values_packed", values_packed, ndim=4, dtypes=(torch.uint8,), nonempty=False)
    if tuple(values_packed.shape) != (B, Hkv, N, D * value_bits // 8) or (D * value_bits) % 8:
        raise ValueError(
            f"values_packed must have shape [B, Hkv, N, D * value_bits // 8] = {[B, Hkv, N, D * value_bits // 8]}, "
            f"got {list(values_packed.shape)}"
        )
    for name, t in (("value_scale", value_scale), ("value_zero", value_zero)):
        check_tensor(name, t, ndim=4, dtypes=FLOAT_DTYPES, finite=False, nonempty=False)
        if tuple(t.shape[:3]) != (B, Hkv, N) or t.shape[3] < 1 or D % t.shape[3]:
            raise ValueError(f"{name} must have shape [B, Hkv, N, G] = [{B}, {Hkv}, {N}, G] with G dividing D={D}, "
                             f"got {list(t.shape)}")
    if value_scale.shape != value_zero.shape:
        raise ValueError(f"value_scale {list(value_scale.shape)} and value_zero {list(value_zero.shape)} differ")
    if score in ("cos", "asym"):
        if key_norms is None:
            raise ValueError(f"key_norms is required for score={score!r}")
        check_tensor("key_norms", key_norms, ndim=3, dtypes=FLOAT_DTYPES, finite=False, nonempty=False)
        if tuple(key_norms.shape) != (B, Hkv, N):
            raise ValueError(f"key_norms must have shape [B, Hkv, N] = {[B, Hkv, N]}, got {list(key_norms.shape)}")
    elif key_norms is not None:
        raise ValueError("key_norms is not used by score='hamming'; pass None")
    if (window_k is None) != (window_v is None):
        raise ValueError("window_k and window_v must be given together (or both None)")
    W = 0
    if window_k is not None:
        for name, t in (("window_k", window_k), ("window_v", window_v)):
            check_tensor(name, t, ndim=4, dtypes=FLOAT_DTYPES, finite=False, nonempty=False)
            if t.shape[:2] != (B, Hkv) or t.shape[3] != D:
                raise ValueError(f"{name} must have shape [B, Hkv, W, D] = [{B}, {Hkv}, W, {D}], got {list(t.shape)}")
        if window_k.shape != window_v.shape:
            raise ValueError(f"window_k {list(window_k.shape)} and window_v {list(window_v.shape)} differ")
        W = window_k.shape[2]
    if N + W == 0:
        raise ValueError("nothing to attend to: key_codes has N = 0 tokens and there is no window")
    check_same_device(q=q, key_codes=key_codes, values_packed=values_packed, value_scale=value_scale,
                      value_zero=value_zero, projection=projection, key_norms=key_norms, window_k=window_k,
                      window_v=window_v)
