"""Preallocated token storage for compressed caches: tensors that grow along the token dim, in place.

A compressed cache appends a few tokens per decode step. ``torch.cat`` onto the whole store copies
O(N) bytes per token (O(N^2) per generation) and reallocates every step; :class:`TokenStore` instead
keeps one buffer per field with room to spare, writes new tokens into the free slots, and grows
geometrically (amortised O(1) per token, like ``std::vector``) when full. Readers get views of the
filled part, so nothing is copied on the decode path and no host synchronisation is needed: the length
is a Python int, known from the shapes of what was appended.

Every field is batch-major and grows along dim 2 (``[B, H, N, ...]``), the layout of the caches' stored
parts; fields may advance by different amounts per append (KIVI stores keys per group of tokens and
values per token), so each keeps its own filled length. ``nbytes()`` counts the filled part only (what :mod:`h1bkv_lite.memory` predicts);
``reserved_nbytes()`` counts the buffers.
"""
from __future__ import annotations

import math

import torch

__all__ = ["TokenStore"]

_ALIGN = 256  # capacities are multiples of this many tokens


def _round_up(n: int, multiple: int = _ALIGN) -> int:
    return -(-n // multiple) * multiple


class TokenStore:
    """Named tensors ``[B, H, N, ...]`` grown along dim 2 in preallocated buffers.

    Parameters
    ----------
    growth : capacity factor applied when a buffer is full (> 1; default 1.5).
    """

    def __init__(self, growth: float = 1.5):
        if not (isinstance(growth, (int, float)) and growth > 1):
            raise ValueError(f"growth must be a number > 1, got {growth!r}")
        self.growth = float(growth)
        self._buffers: dict[str, torch.Tensor] = {}
        self._filled: dict[str, int] = {}

    @property
    def length(self) -> int:
        """Filled entries along dim 2 of the first field (all fields, when they advance together)."""
        return next(iter(self._filled.values()), 0)

    def __len__(self) -> int:
        return self.length

    def __contains__(self, name: str) -> bool:
        return name in self._buffers

    @property
    def capacity(self) -> int:
        """Entries the first field's buffer holds before it grows (0 when empty)."""
        return next(iter(self._buffers.values())).shape[2] if self._buffers else 0

    def slots(self, n: int, like: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """Views of the next ``n`` free entries of every field (room is made first), to be written in place
        and then :meth:`commit` ted. ``like``: tensors with the fields' shapes and dtypes (their dim 2 is
        ignored), needed only while the store has no buffers yet."""
        if like is None:
            if not self._buffers:
                raise ValueError("slots() of an empty store needs like= (the fields' shapes and dtypes)")
            like = self._buffers
        return {name: self._reserve(name, t, n) for name, t in like.items()}

    def commit(self, n: int) -> None:
        """Count ``n`` entries of every field returned by :meth:`slots` as filled."""
        self._filled = {name: filled + n for name, filled in self._filled.items()}

    def append(self, chunk: dict[str, torch.Tensor]) -> None:
        """Copy every field of ``chunk`` (``[B, H, n_field, ...]``) after that field's filled part."""
        if self._buffers and set(chunk) != set(self._buffers):
            raise ValueError(f"chunk fields {sorted(chunk)} differ from the store's {sorted(self._buffers)}")
        for name, t in chunk.items():
            self._reserve(name, t, t.shape[2]).copy_(t)
            self._filled[name] += t.shape[2]

    def view(self) -> dict[str, torch.Tensor]:
        """The filled part of every field, as views (no copy)."""
        return {name: buf[:, :, :self._filled[name]] for name, buf in self._buffers.items()}

    def map_batch(self, fn) -> None:
        """Apply ``fn`` (a batch-dim op: index_select, repeat_interleave, ...) to every buffer."""
        self._buffers = {name: fn(buf) for name, buf in self._buffers.items()}

    def truncate(self, keep) -> None:
        """Keep the first ``keep`` entries of every field (an int, or a dict per field); capacity is kept."""
        for name in self._filled:
            n = keep[name] if isinstance(keep, dict) else keep
            self._filled[name] = min(self._filled[name], max(0, n))

    def _reserve(self, name: str, like: torch.Tensor, n: int) -> torch.Tensor:
        """Room for ``n`` more entries of field ``name`` (created like ``like``); returns their view."""
        if name not in self._buffers:
            self._buffers[name] = like.new_empty((*like.shape[:2], _round_up(n), *like.shape[3:]))
            self._filled[name] = 0
        buf, filled = self._buffers[name], self._filled[name]
        if filled + n > buf.shape[2]:
            buf = self._grown(buf, filled, max(filled + n, math.ceil(buf.shape[2] * self.growth)))
            self._buffers[name] = buf
        return buf[:, :, filled:filled + n]

    def nbytes(self) -> dict[str, int]:
        """Bytes of the filled part, per field."""
        return {name: t.numel() * t.element_size() for name, t in self.view().items()}

    def reserved_nbytes(self) -> int:
        """Bytes of the buffers (filled part and spare capacity)."""
        return sum(t.numel() * t.element_size() for t in self._buffers.values())

    @staticmethod
    def _grown(buf: torch.Tensor, filled: int, total: int) -> torch.Tensor:
        bigger = buf.new_empty((*buf.shape[:2], _round_up(total), *buf.shape[3:]))
        bigger[:, :, :filled].copy_(buf[:, :, :filled])
        return bigger
