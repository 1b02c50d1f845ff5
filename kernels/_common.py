"""What the kernel modules share: the optional Triton import, backend choice, and small Triton helpers.

Triton is an optional dependency (the ``kernels`` extra). Without it these modules still import and
every public function works with ``backend="torch"``/``"auto"`` (which then always picks the torch
reference); only ``backend="triton"`` raises.

Triton decides *when a kernel is defined* whether it will be compiled for the GPU or run by its CPU
interpreter (``TRITON_INTERPRET=1``), so that variable must be set before this package is imported.
"""
from __future__ import annotations

import types

import torch

from h1bkv_lite._validation import check_choice

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # only the torch references are usable; @triton.jit leaves functions undecorated
    HAS_TRITON = False
    triton = types.SimpleNamespace(jit=lambda fn=None, **_: fn if fn is not None else (lambda f: f))
    tl = types.SimpleNamespace(constexpr=None)

BACKENDS = ("auto", "triton", "torch")


def use_triton(backend: str, device: torch.device, kernel) -> bool:
    """True if the Triton ``kernel`` should run for tensors on ``device`` under ``backend``.

    ``"auto"``: Triton on CUDA (when installed), the torch reference elsewhere. ``"triton"``: Triton
    on CUDA, or on CPU tensors when the kernel was defined under ``TRITON_INTERPRET=1``.
    ``"torch"``: always the reference.
    """
    check_choice("backend", backend, BACKENDS)
    if backend == "torch":
        return False
    if backend == "auto":
        return HAS_TRITON and device.type == "cuda"
    if not HAS_TRITON:
        raise RuntimeError("backend='triton' needs the triton package (pip install 'h1bkv-lite[kernels]')")
    if device.type == "cuda" or is_interpreted(kernel):
        return True
    raise ValueError(
        f"backend='triton' got tensors on {device}: compiled Triton kernels need CUDA tensors; on the CPU "
        "set TRITON_INTERPRET=1 before importing h1bkv_lite.kernels, or use backend='torch'"
    )


def is_interpreted(kernel) -> bool:
    """Whether ``kernel`` runs in Triton's CPU interpreter (decided when it was defined)."""
    return type(kernel).__name__ == "InterpretedFunction"


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def as_words(codes: torch.Tensor) -> torch.Tensor:
    """View packed uint8 codes ``[..., B]`` (B a multiple of 4) as int32 words ``[..., B // 4]``.

    Little-endian words keep the bit order: sketch bit ``i`` is bit ``i % 32`` of word ``i // 32``.
    Copies only if the bytes cannot be viewed in place (last dim not contiguous, or misaligned).
    """
    if codes.stride(-1) != 1:
        codes = codes.contiguous()
    try:
        return codes.view(torch.int32)
    except RuntimeError:
        return codes.contiguous().clone().view(torch.int32)


@triton.jit
def popcount(x, PTX: tl.constexpr):
    """Set bits of each int32 word: the GPU's ``popc`` instruction when ``PTX`` (compiled code), else
    :func:`popcount32` (Triton's CPU interpreter runs no PTX). One instruction instead of SWAR's twelve: for GQA
    groups the popcounts were ~16% of the decode kernel's instructions per tile."""
    if PTX:
        return tl.inline_asm_elementwise("popc.b32 $0, $1;", "=r,r", [x], dtype=tl.int32, is_pure=True, pack=1)
    else:
        return popcount32(x)


@triton.jit
def popcount32(x):
    """Set bits of each int32 word (SWAR; no tl.popc, and libdevice popc fails in the interpreter).

    Arithmetic right shifts copy the sign bit down, but every shifted term is masked before it is
    used (0x55555555 clears bit 31) and the partial counts stay small and non-negative after step 2.
    """
    x = x - ((x >> 1) & 0x55555555)
    x = (x & 0x33333333) + ((x >> 2) & 0x33333333)
    x = (x + (x >> 4)) & 0x0F0F0F0F
    x = x + (x >> 8)
    x = x + (x >> 16)
    return x & 0x3F


@triton.jit
def pack_sign_bytes(proj, BLOCK_M: tl.constexpr, BLOCK_BYTES: tl.constexpr):
    """``proj [BLOCK_M, 8 * BLOCK_BYTES]`` float -> int32 ``[BLOCK_M, BLOCK_BYTES]`` of packed
    ``proj >= 0`` bits, bit ``i`` in bit ``i % 8`` of byte ``i // 8``."""
    bits = (proj >= 0).to(tl.int32)
    bits = tl.reshape(bits, (BLOCK_M, BLOCK_BYTES, 8))
    weights = 1 << tl.arange(0, 8)
    return tl.sum(bits * weights[None, None, :], axis=2)


@triton.jit
def pack_sign_words(proj, BLOCK_M: tl.constexpr, WORDS: tl.constexpr):
    """``proj [BLOCK_M, 32 * WORDS]`` float -> int32 words ``[BLOCK_M, WORDS]`` of ``proj >= 0`` bits
    (bit ``i`` in bit ``i % 32`` of word ``i // 32``: the little-endian view of the byte layout)."""
    bits = (proj >= 0).to(tl.int32)
    bits = tl.reshape(bits, (BLOCK_M, WORDS, 32))
    weights = 1 << tl.arange(0, 32)  # bit 31 is INT_MIN; distinct powers of two add like OR
    return tl.sum(bits * weights[None, None, :], axis=2)
