"""Pairwise Hamming distances of packed sketches: XOR + SWAR popcount on 32-bit words.

Reference: :meth:`h1bkv_lite.SimHashSketcher.hamming` (integers, so the kernel matches it exactly).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from h1bkv_lite._validation import check_same_device, check_tensor
from h1bkv_lite.sketch import _POPCOUNT_TABLE

from ._common import as_words, cdiv, popcount32, tl, triton, use_triton


@triton.jit
def _hamming_kernel(q_ptr, k_ptr, out_ptr, NQ, NK, WORDS,
                    stride_qb, stride_kb, stride_ob,
                    BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr):
    bid = tl.program_id(0)
    rows = tl.program_id(1) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    cols = tl.program_id(2) * BLOCK_K + tl.arange(0, BLOCK_K)
    rmask, cmask = rows < NQ, cols < NK
    q_base = q_ptr + bid * stride_qb + rows * WORDS
    k_base = k_ptr + bid * stride_kb + cols * WORDS
    acc = tl.zeros((BLOCK_Q, BLOCK_K), dtype=tl.int32)
    for w in range(WORDS):
        qw = tl.load(q_base + w, mask=rmask, other=0)
        kw = tl.load(k_base + w, mask=cmask, other=0)
        acc += popcount32(qw[:, None] ^ kw[None, :])
    tl.store(out_ptr + bid * stride_ob + rows[:, None] * NK + cols[None, :], acc,
             mask=rmask[:, None] & cmask[None, :])


def hamming_scores_reference(q_codes: torch.Tensor, k_codes: torch.Tensor) -> torch.Tensor:
    """Plain torch: popcount of ``q XOR k`` byte by byte (``SimHashSketcher.hamming(method="xor")``)."""
    x = torch.bitwise_xor(q_codes.unsqueeze(-2), k_codes.unsqueeze(-3))  # [..., Nq, Nk, B]
    return _POPCOUNT_TABLE.to(q_codes.device)[x.long()].sum(-1, dtype=torch.int32)


def hamming_scores(q_codes: torch.Tensor, k_codes: torch.Tensor, *, backend: str = "auto") -> torch.Tensor:
    """Hamming distances between every query code and every key code.

    Parameters
    ----------
    q_codes : uint8 ``[..., Nq, B]`` packed sketches (``B = bits // 8``); k_codes : uint8 ``[..., Nk, B]``.
        Leading dims broadcast. Neither is modified.
    backend : ``"auto"`` (Triton on CUDA, torch elsewhere), ``"triton"`` or ``"torch"``.

    Returns
    -------
    int32 ``[..., Nq, Nk]``, equal to ``SimHashSketcher.hamming(q_codes, k_codes)``. The kernel works on
    int32 words; ``B`` not a multiple of 4 is zero-padded (a copy), which adds no distance.
    """
    check_tensor("q_codes", q_codes, min_ndim=2, dtypes=(torch.uint8,))
    check_tensor("k_codes", k_codes, min_ndim=2, dtypes=(torch.uint8,))
    check_same_device(q_codes=q_codes, k_codes=k_codes)
    if q_codes.shape[-1] != k_codes.shape[-1]:
        raise ValueError(
            f"q_codes and k_codes must have the same code width, got {q_codes.shape[-1]} and {k_codes.shape[-1]} bytes"
        )
    try:
        lead = torch.broadcast_shapes(q_codes.shape[:-2], k_codes.shape[:-2])
    except RuntimeError:
        raise ValueError(
            f"leading dims of q_codes {tuple(q_codes.shape[:-2])} and k_codes {tuple(k_codes.shape[:-2])} do not broadcast"
        ) from None
    if not use_triton(backend, q_codes.device, _hamming_kernel):
        return hamming_scores_reference(q_codes, k_codes)

    (nq, nbytes), nk = q_codes.shape[-2:], k_codes.shape[-2]
    pad = -nbytes % 4
    q3 = q_codes.expand(*lead, nq, nbytes).reshape(-1, nq, nbytes)
    k3 = k_codes.expand(*lead, nk, nbytes).reshape(-1, nk, nbytes)
    if pad:
        q3, k3 = F.pad(q3, (0, pad)), F.pad(k3, (0, pad))
    qw, kw = as_words(q3.contiguous()), as_words(k3.contiguous())
    batch, words = qw.shape[0], qw.shape[-1]
    out = torch.empty(batch, nq, nk, dtype=torch.int32, device=q_codes.device)
    BLOCK_Q, BLOCK_K = 32, 64
    grid = (batch, cdiv(nq, BLOCK_Q), cdiv(nk, BLOCK_K))
    _hamming_kernel[grid](qw, kw, out, nq, nk, words, qw.stride(0), kw.stride(0), out.stride(0),
                          BLOCK_Q=BLOCK_Q, BLOCK_K=BLOCK_K)
    return out.reshape(*lead, nq, nk)
