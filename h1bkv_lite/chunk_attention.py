"""Attention of a multi-token call over a layer that already holds tokens: a prefill chunk (transformers'
``generate(..., prefill_chunk_size=...)``) or a prompt continued, without a ``Tq x N`` matrix.

Such a call's queries see three kinds of keys: compressed tokens (SimHash codes and quantized values, all older
than the call), exact tokens held from before the call (sinks and the exact window), and the call's own tokens
(exact, causal). Each part is one flash-attention call that also returns its log-sum-exp, and the parts are
merged by their log-sum-exps (flash-decoding's combine), which gives the softmax over all of them:

- compressed: the logits are dot products in sketch space. "hamming" (the paper's): ``(1 - 2 h / b) / T =
  s_q . s_k / (b T)`` for the +-1 sign vectors ``s`` of ``q R`` and of the key; "asym" (QJL): ``sqrt(pi/2) / b *
  scaling * |k| <R^T q, s_k>``. So the queries ``s_q / (b T)`` (or ``R^T q * sqrt(pi/2) / b * scaling``) attend
  to the keys ``s_k`` (or ``|k| s_k``) and the dequantized values, with scale 1; key centering adds the exact
  ``q . mu * scaling`` to every compressed logit of a query row, i.e. to its log-sum-exp. The query heads of a
  kv head are folded into the query rows (no mask: every compressed token is visible to every query), and the
  store is read in blocks of ``COMPRESSED_BLOCK`` tokens, so only one block's signs and values are unpacked.
- exact held tokens: every query sees all of them (no mask);
- the call's own tokens: causal.

"cos" (``|q| |k| cos(pi h / b)``) is not a dot product; it keeps the general path, as do padded batches and
sliding-window layers. Precision: the sketch-space operands are exact in fp16/bf16 for "hamming" up to the one
rounding of ``1 / (b T)`` per head (2**-11 relative in fp16, 2**-8 in bf16: the precision flash attention gives
exact logits), ``R^T q`` for "asym" is rounded to the query's dtype; accumulation is fp32.
"""
from __future__ import annotations

import math

import torch

from .sketch import unpack_bits

COMPRESSED_BLOCK = 16384
"""Compressed tokens per flash-attention call (bounds the unpacked signs and values alive at once)."""

_CUDA_FLASH_DTYPES = (torch.float16, torch.bfloat16)


def serves(q: torch.Tensor, head_dim: int, bits: int) -> bool:
    """Whether the flash kernels run these shapes: on CUDA fp16/bf16 with head dims (``head_dim`` and the padded
    sketch width) of at most 256 and multiples of 8; on the CPU any float dtype (torch's CPU flash kernel)."""
    width = max(head_dim, bits)
    if q.device.type == "cuda":
        return q.dtype in _CUDA_FLASH_DTYPES and width <= 256 and head_dim % 8 == 0 and bits % 8 == 0
    return q.device.type == "cpu"


def sdpa_with_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool,
                  scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Flash attention of ``q [B, H, Tq, E]`` over ``k [B, H, Tk, E]``, ``v [B, H, Tk, E]`` (``causal``: Tq == Tk)
    -> ``(out [B, H, Tq, E]`` in q's dtype, ``lse`` float32 ``[B, H, Tq]``, natural log). Through the flash
    backend's aten op, the one torch's ``scaled_dot_product_attention`` dispatches to (its public entry point does
    not return the log-sum-exp)."""
    if q.device.type == "cuda":
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, causal, False, scale=scale)[:2]
    else:
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal, scale=scale)
    return out, lse[..., :q.shape[2]].float()


def merge(parts: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """The attention over the union of the parts' keys: ``parts`` of ``(out [..., Tq, D], lse [..., Tq])`` ->
    ``(out`` float32 ``[..., Tq, D], lse [..., Tq])``."""
    if len(parts) == 1:
        return parts[0][0].float(), parts[0][1]
    lse = torch.stack([p[1] for p in parts])
    top = lse.amax(0)
    weights = torch.exp(lse - top)  # [P, ..., Tq]
    total = weights.sum(0)
    out = sum(w.unsqueeze(-1) * o.float() for w, (o, _) in zip(weights, parts))
    return out / total.unsqueeze(-1), top + torch.log(total)


def _pad(x: torch.Tensor, width: int) -> torch.Tensor:
    return x if x.shape[-1] == width else torch.nn.functional.pad(x, (0, width - x.shape[-1]))


def _expand_heads(x: torch.Tensor, group: int) -> torch.Tensor:
    return x if group == 1 else x.repeat_interleave(group, dim=1)


def compressed_part(q_sketch: torch.Tensor, key_codes: torch.Tensor, values, *, key_norms=None,
                    row_offset: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The compressed tokens' part: ``q_sketch [B, Hq, Tq, b]`` (the sketch-space queries, module docstring) over
    ``key_codes`` uint8 ``[B, Hkv, C, b / 8]`` and the values ``values(start, end) -> [B, Hkv, end - start, D]``
    (dequantized, in q's dtype); ``key_norms [B, Hkv, C]`` scale the signs ("asym"); ``row_offset [B, Hq, Tq]``
    is added to every logit of a row (key centering). Returns ``(out [B, Hq, Tq, D], lse [B, Hq, Tq])``."""
    B, Hq, Tq, bits = q_sketch.shape
    Hkv, C = key_codes.shape[1], key_codes.shape[2]
    group = Hq // Hkv
    parts = []
    for start in range(0, C, COMPRESSED_BLOCK):
        end = min(C, start + COMPRESSED_BLOCK)
        signs = unpack_bits(key_codes[:, :, start:end]).to(q_sketch.dtype) * 2 - 1  # [B, Hkv, n, b]
        if key_norms is not None:
            signs = signs * key_norms[:, :, start:end, None].to(q_sketch.dtype)
        v = values(start, end)
        width = max(bits, v.shape[-1])
        q = _pad(q_sketch, width).reshape(B, Hkv, group * Tq, width)  # a kv head's query heads side by side
        out, lse = sdpa_with_lse(q, _pad(signs, width), _pad(v, width), causal=False, scale=1.0)
        parts.append((out[..., :v.shape[-1]].reshape(B, Hq, Tq, -1), lse.reshape(B, Hq, Tq)))
    out, lse = merge(parts)
    return out, lse if row_offset is None else lse + row_offset


def exact_part(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool,
               scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact tokens: ``q [B, Hq, Tq, D]`` over ``k, v [B, Hkv, Tk, D]`` (GQA heads expanded; causal: the call's own
    tokens, ``Tk == Tq``). Returns ``(out, lse)``."""
    group = q.shape[1] // k.shape[1]
    return sdpa_with_lse(q, _expand_heads(k, group).contiguous(), _expand_heads(v, group).contiguous(),
                         causal=causal, scale=scaling)


def hamming_queries(q: torch.Tensor, projection: torch.Tensor, temperature: torch.Tensor) -> torch.Tensor:
    """``s_q / (b T)``: the "hamming" sketch-space queries, in q's dtype. ``q [B, Hq, Tq, D]``, ``projection``
    float32 ``[D, b]``, ``temperature`` float32 ``[Hq]`` or ``[B, Hq]``."""
    bits = projection.shape[1]
    signs = torch.where(q.float() @ projection >= 0, 1.0, -1.0)
    t = temperature.reshape(-1, q.shape[1], 1, 1)
    return (signs / (bits * t)).to(q.dtype)


def asym_queries(q: torch.Tensor, projection: torch.Tensor, scaling: float) -> torch.Tensor:
    """``R^T q * sqrt(pi / 2) / b * scaling``: the "asym" sketch-space queries, in q's dtype."""
    bits = projection.shape[1]
    return (q.float() @ projection * (math.sqrt(math.pi / 2) / bits * scaling)).to(q.dtype)
