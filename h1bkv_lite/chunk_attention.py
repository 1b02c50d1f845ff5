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
  store is read in blocks of about ``BLOCK_BYTES`` of signs, each merged into a running result as it is made.
- exact held tokens: every query sees all of them (no mask);
- the call's own tokens: causal.

"cos" (``|q| |k| cos(pi h / b)``) is not a dot product; it keeps the general path, as do padded batches and
sliding-window layers. Precision: the sketch-space operands are exact in fp16/bf16 for "hamming" up to the one
rounding of ``1 / (b T)`` per head (2**-11 relative in fp16, 2**-8 in bf16: the precision flash attention gives
exact logits), ``R^T q`` for "asym" is rounded to the query's dtype; accumulation is fp32.
"""
from __future__ import annotations

import functools
import math

import torch

from .sketch import unpack_bits

BLOCK_BYTES = 256 * 2**20
"""Bytes of one block's unpacked key signs (in the query's dtype): the store is read in blocks of
``BLOCK_BYTES // (B * Hkv * width * itemsize)`` tokens, so the signs and values alive at once stay near this bound
whatever the batch, heads and sketch width."""

_CUDA_FLASH_DTYPES = (torch.float16, torch.bfloat16)


@functools.lru_cache(maxsize=None)
def _cuda_flash_runs(index: int) -> bool:
    """Whether torch's flash-attention kernels run on CUDA device ``index``: a CUDA (not ROCm) build with them
    compiled in, and compute capability 8.0 or newer (FlashAttention-2 refuses Volta and Turing)."""
    built = getattr(torch.backends.cuda, "is_flash_attention_available", lambda: True)()
    return built and torch.version.hip is None and torch.cuda.get_device_capability(index) >= (8, 0)


def serves(device: torch.device, dtype: torch.dtype, head_dim: int, bits: int) -> bool:
    """Whether the flash kernels take a call on ``device`` in ``dtype``: on CUDA, a GPU they run on
    (:func:`_cuda_flash_runs`), fp16/bf16, and head dims (``head_dim`` and the padded sketch width ``max(head_dim,
    bits)``) of at most 256 and multiples of 8; on the CPU any float dtype (torch's CPU flash kernel). Anything else
    takes the caller's general path."""
    if device.type == "cuda":
        return (dtype in _CUDA_FLASH_DTYPES and max(head_dim, bits) <= 256 and head_dim % 8 == 0 and bits % 8 == 0
                and _cuda_flash_runs(device.index if device.index is not None else torch.cuda.current_device()))
    return device.type == "cpu"


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
    """The attention over the union of the parts' keys: ``parts``, a non-empty list of ``(out [..., Tq, D]``,
    ``lse`` float32 ``[..., Tq])``, each part's attention output and natural-log log-sum-exp -> ``(out`` float32
    ``[..., Tq, D], lse [..., Tq])``."""
    out, lse = parts[0][0].float(), parts[0][1]
    for part_out, part_lse in parts[1:]:
        top = torch.maximum(lse, part_lse)
        w_old, w_new = torch.exp(lse - top), torch.exp(part_lse - top)
        total = w_old + w_new
        out = (out * w_old.unsqueeze(-1) + part_out.float() * w_new.unsqueeze(-1)) / total.unsqueeze(-1)
        lse = top + torch.log(total)
    return out, lse


def _pad(x: torch.Tensor, width: int) -> torch.Tensor:
    return x if x.shape[-1] == width else torch.nn.functional.pad(x, (0, width - x.shape[-1]))


def _expand_heads(x: torch.Tensor, group: int) -> torch.Tensor:
    return x if group == 1 else x.repeat_interleave(group, dim=1)


def _signs(codes: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Packed codes uint8 ``[..., b / 8]`` -> +-1 ``[..., b]`` in ``dtype`` (``pack_bits``' bit order)."""
    return unpack_bits(codes).to(dtype).mul_(2).sub_(1)


def compressed_part(q_sketch: torch.Tensor, key_codes: torch.Tensor, values, head_dim: int, *, key_norms=None,
                    row_offset: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The compressed tokens' part of a chunk's attention.

    ``q_sketch [B, Hq, Tq, b]``: the sketch-space queries (module docstring), in the dtype the part runs in;
    ``key_codes`` uint8 ``[B, Hkv, C, b / 8]``, ``C >= 1``; ``values(start, end)``: the dequantized values of tokens
    ``start .. end - 1``, ``[B, Hkv, end - start, head_dim]`` in q_sketch's dtype; ``key_norms [B, Hkv, C]`` scale
    the signs ("asym"), or None; ``row_offset`` float32 ``[B, Hq, Tq]`` is added to every logit of a row (key
    centering), or None. The store is read in blocks of ``BLOCK_BYTES`` of signs, each merged into a running result.
    Returns ``(out`` float32 ``[B, Hq, Tq, head_dim], lse`` float32 ``[B, Hq, Tq])``. Shapes are the caller's
    contract (unchecked: this runs on every layer of a prefill chunk)."""
    B, Hq, Tq, bits = q_sketch.shape
    Hkv, C = key_codes.shape[1], key_codes.shape[2]
    group, width = Hq // Hkv, max(bits, head_dim)
    block = max(1, BLOCK_BYTES // (B * Hkv * width * q_sketch.element_size()))
    q = _pad(q_sketch, width).reshape(B, Hkv, group * Tq, width)  # a kv head's query heads side by side
    out = lse = None
    for start in range(0, C, block):
        end = min(C, start + block)
        signs = _signs(key_codes[:, :, start:end], q_sketch.dtype)  # [B, Hkv, n, b]
        if key_norms is not None:
            signs = signs * key_norms[:, :, start:end, None].to(q_sketch.dtype)
        part_out, part_lse = sdpa_with_lse(q, _pad(signs, width), _pad(values(start, end), width), causal=False,
                                           scale=1.0)
        del signs
        part = (part_out[..., :head_dim].reshape(B, Hq, Tq, head_dim), part_lse.reshape(B, Hq, Tq))
        out, lse = part if out is None else merge([(out, lse), part])
    return out.float(), lse if row_offset is None else lse + row_offset


def exact_part(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool,
               scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact tokens: ``q [B, Hq, Tq, D]`` over ``k, v [B, Hkv, Tk, D]``, logits ``q . k * scaling`` (GQA: the kv
    heads expanded; ``causal``: the call's own tokens, ``Tk == Tq``). Returns ``(out [B, Hq, Tq, D]`` in q's dtype,
    ``lse`` float32 ``[B, Hq, Tq])``. Shapes are the caller's contract (unchecked)."""
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
