"""Triton kernels for H1B-KV, each beside its plain-torch reference (``backend="torch"``).

- :func:`sketch_pack` / :func:`sketch_pack_quantize` / :func:`sketch_pack_quantize_into` -- keys to packed
  SimHash codes; the fused append path that also quantizes the values, and its in-place form that writes
  into a cache's preallocated store (``kernels/sketch_pack.py``).
- :func:`hamming_scores` -- pairwise Hamming distances by XOR + popcount (``kernels/hamming.py``).
- :func:`h1b_decode_attention` -- split-K decode attention over sketched keys and 4-bit values
  (``kernels/decode_attention.py``).

``backend="auto"`` runs Triton on CUDA tensors and the torch reference elsewhere. On the CPU the Triton
kernels run only in Triton's interpreter: set ``TRITON_INTERPRET=1`` before importing this package and
pass ``backend="triton"`` (the tests do).
"""
from ._common import BACKENDS, HAS_TRITON
from .decode_attention import h1b_decode_attention, h1b_decode_attention_reference
from .hamming import hamming_scores, hamming_scores_reference
from .sketch_pack import (
    sketch_pack,
    sketch_pack_quantize,
    sketch_pack_quantize_into,
    sketch_pack_quantize_reference,
    sketch_pack_reference,
)

__all__ = [
    "BACKENDS",
    "HAS_TRITON",
    "h1b_decode_attention",
    "h1b_decode_attention_reference",
    "hamming_scores",
    "hamming_scores_reference",
    "sketch_pack",
    "sketch_pack_quantize",
    "sketch_pack_quantize_into",
    "sketch_pack_quantize_reference",
    "sketch_pack_reference",
]
