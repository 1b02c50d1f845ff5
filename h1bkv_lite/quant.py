"""Asymmetric (affine) low-bit quantization of value vectors, packed into bytes.

Each group of ``group_size`` consecutive elements along the last dim (``None`` = the whole vector, the
paper's per-token form) gets an fp16 ``scale`` and an fp16 ``zero`` (the group's offset):
``q = clamp(round((v - zero) / scale), 0, 2**bits - 1)``, ``v_hat = zero + q * scale``.

``zero`` is the group minimum rounded *down* to fp16 and ``scale`` is rounded *up*, so the stored grid
always covers the group's range and every element is within ``scale / 2`` of its reconstruction.
A constant group gets ``scale = 0`` and reconstructs as ``zero`` (exact when the value is representable in
fp16; no division by zero). The bound holds for the float32 reconstruction; ``dequantize()`` returns
the input's dtype, which adds at most half an ulp of that dtype (fp16/bf16). Packing: element ``j`` of a vector sits in bits
``[(j % per_byte) * bits, ...)`` of byte ``j // per_byte``, ``per_byte = 8 // bits`` (LSB first).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ._validation import check_choice, check_int, check_tensor

VALUE_BITS = (2, 4, 8)
_FP16_MAX = torch.finfo(torch.float16).max


@dataclass(frozen=True)
class QuantizedTensor:
    """Packed low-bit tensor.

    Attributes
    ----------
    data : uint8 ``[..., n * bits // 8]`` packed codes.
    scale, zero : fp16 ``[..., n // group_size]`` per-group step and offset.
    bits : 2, 4 or 8.  group_size : elements per group.  shape / dtype : of the original tensor.
    """

    data: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    bits: int
    group_size: int
    shape: torch.Size
    dtype: torch.dtype

    def codes(self) -> torch.Tensor:
        """Unpacked integer codes, ``uint8 [..., n]``."""
        return unpack_codes(self.data, self.bits)

    def dequantize(self) -> torch.Tensor:
        """Reconstruction ``zero + q * scale`` in the original dtype and shape."""
        n = self.shape[-1]
        q = self.codes().float().reshape(*self.shape[:-1], n // self.group_size, self.group_size)
        v = self.zero.float().unsqueeze(-1) + q * self.scale.float().unsqueeze(-1)
        return v.reshape(self.shape).to(self.dtype)

    @property
    def nbytes(self) -> int:
        """True storage in bytes: packed codes + fp16 scales + fp16 zeros."""
        return sum(t.numel() * t.element_size() for t in (self.data, self.scale, self.zero))


def quantize_values(v: torch.Tensor, bits: int = 4, group_size: int | None = None) -> QuantizedTensor:
    """Quantize ``v [..., n]`` (fp16/bf16/fp32) to ``bits`` per element with per-group fp16 scale/zero.

    ``group_size`` must divide ``n`` (``None`` = ``n``, one group per vector); ``n`` must fill whole
    bytes (``n * bits % 8 == 0``). ``v`` is not modified.
    """
    check_tensor("v", v, min_ndim=1)
    group_size = check_value_format(v, bits, group_size)
    n = v.shape[-1]
    if (n * bits) % 8:
        raise ValueError(f"last dim * bits must fill whole bytes; got last dim {n} with bits={bits}")
    if v.abs().max() > _FP16_MAX / 2:
        raise ValueError(f"v has magnitudes above {_FP16_MAX / 2:g}; fp16 scales/zeros cannot represent it")
    return quantize_values_unchecked(v, bits, group_size)


def quantize_values_unchecked(v: torch.Tensor, bits: int, group_size: int) -> QuantizedTensor:
    """:func:`quantize_values` without argument checks or device syncs, for a cache's hot path.

    ``bits`` in (2, 4, 8) and ``group_size`` dividing ``v.shape[-1]`` are the caller's contract. Values
    beyond +-32752 (half the fp16 maximum) are clamped to it instead of raising, the same rule as the
    fused Triton append (:func:`h1bkv_lite.kernels.sketch_pack_quantize_into`).
    """
    n = v.shape[-1]
    levels = (1 << bits) - 1
    limit = _FP16_MAX / 2
    groups = v.float().clamp(-limit, limit).reshape(*v.shape[:-1], n // group_size, group_size)
    lo, hi = groups.amin(-1), groups.amax(-1)
    zero = _round_fp16(lo, down=True)
    scale = _round_fp16((hi - zero.float()) / levels, down=False)
    step = scale.float().unsqueeze(-1)
    safe_step = torch.where(step > 0, step, torch.ones_like(step))
    q = ((groups - zero.float().unsqueeze(-1)) / safe_step).round().clamp_(0, levels)
    q = torch.where(step > 0, q, torch.zeros_like(q)).to(torch.uint8)
    data = pack_codes(q.reshape(v.shape), bits)
    return QuantizedTensor(data, scale, zero, bits, group_size, v.shape, v.dtype)


def check_value_format(v: torch.Tensor, bits, group_size, bits_name: str = "bits") -> int:
    """Validate ``bits`` (2, 4 or 8) and ``group_size`` (dividing ``v``'s last dim); return the group size."""
    check_int(bits_name, bits)
    check_choice(bits_name, bits, VALUE_BITS)
    n = v.shape[-1]
    if group_size is None:
        return n
    check_int("group_size", group_size, low=1, high=n)
    if n % group_size:
        raise ValueError(f"group_size must divide the last dim of v ({n}), got {group_size}")
    return group_size


def pack_codes(q: torch.Tensor, bits: int) -> torch.Tensor:
    """``uint8 [..., n]`` codes < 2**bits -> ``uint8 [..., n * bits // 8]`` (LSB-first within a byte)."""
    per_byte = 8 // bits
    grouped = q.reshape(*q.shape[:-1], q.shape[-1] // per_byte, per_byte).to(torch.int32)
    shifts = torch.arange(per_byte, device=q.device, dtype=torch.int32) * bits
    return (grouped << shifts).sum(-1).to(torch.uint8)


def unpack_codes(data: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of :func:`pack_codes`."""
    per_byte = 8 // bits
    shifts = torch.arange(per_byte, device=data.device, dtype=torch.int32) * bits
    q = (data.to(torch.int32).unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    return q.reshape(*data.shape[:-1], data.shape[-1] * per_byte).to(torch.uint8)


def _round_fp16(x: torch.Tensor, *, down: bool) -> torch.Tensor:
    """Round float32 ``x`` to fp16 toward -inf (``down``) or +inf."""
    h = x.to(torch.float16)
    if down:
        wrong = h.float() > x
        step_to = torch.full_like(h, -float("inf"))
    else:
        wrong = h.float() < x
        step_to = torch.full_like(h, float("inf"))
    return torch.where(wrong, torch.nextafter(h, step_to), h)
