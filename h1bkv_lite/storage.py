"""Preallocated token storage for compressed caches: tensors that grow along the token dim, in place.

A compressed cache appends a few tokens per decode step. ``torch.cat`` onto the whole store copies
O(N) bytes per token (O(N^2) per generation) and reallocates every step; :class:`TokenStore` instead
keeps one buffer per field with room to spare, writes new tokens into the free slots, and grows
geometrically (amortised O(1) per token, like ``std::vector``) when full. Readers get views of the
filled part, so nothing is copied on the decode path and no host synchronisation is needed: the length
is a Python int, known from the shapes of what was appended.

Every field is batch-major with tokens on dim 2 (``[B, H, N, ...]``), the layout of the caches' stored
parts. ``nbytes()`` counts the filled part only (what :mod:`h1bkv_lite.memory` predicts);
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
        self.length = 0

    def __len__(self) -> int:
        return self.length

    def __contains__(self, name: str) -> bool:
        return name in self._buffers

    @property
    def capacity(self) -> int:
        """Tokens the buffers hold before the next growth (0 when empty)."""
        return next(iter(self._buffers.values())).shape[2] if self._buffers else 0

    def reserve(self, chunk: dict[str, torch.Tensor], total: int) -> None:
        """Make room for ``total`` tokens of fields shaped like ``chunk``'s (``[B, H, n, ...]``)."""
        if not self._buffers:
            self._buffers = {name: t.new_empty((*t.shape[:2], _round_up(total), *t.shape[3:]))
                             for name, t in chunk.items()}
        elif total > self.capacity:
            self._grow(max(total, math.ceil(self.capacity * self.growth)))

    def slots(self, n: int, like: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Views of the next ``n`` free slots (room is made first), to be written in place, then
        :meth:`commit` ted. ``like``: a chunk with the fields' shapes (its token count is ignored)."""
        self.reserve(like, self.length + n)
        return {name: buf[:, :, self.length:self.length + n] for name, buf in self._buffers.items()}

    def commit(self, n: int) -> None:
        """Count ``n`` slots returned by :meth:`slots` as filled."""
        self.length += n

    def append(self, chunk: dict[str, torch.Tensor]) -> None:
        """Copy ``chunk`` (every field ``[B, H, n, ...]``, the same ``n``) after the filled part."""
        n = next(iter(chunk.values())).shape[2]
        if self._buffers and set(chunk) != set(self._buffers):
            raise ValueError(f"chunk fields {sorted(chunk)} differ from the store's {sorted(self._buffers)}")
        for name, view in self.slots(n, chunk).items():
            view.copy_(chunk[name])
        self.commit(n)

    def view(self) -> dict[str, torch.Tensor]:
        """The filled part of every field, as views (no copy)."""
        return {name: buf[:, :, :self.length] for name, buf in self._buffers.items()}

    def map_batch(self, fn) -> None:
        """Apply ``fn`` (a batch-dim op: index_select, repeat_interleave, ...) to every buffer."""
        self._buffers = {name: fn(buf) for name, buf in self._buffers.items()}

    def truncate(self, n: int) -> None:
        """Keep the first ``n`` tokens (capacity unchanged)."""
        self.length = min(self.length, max(0, n))

    def nbytes(self) -> dict[str, int]:
        """Bytes of the filled part, per field."""
        return {name: t.numel() * t.element_size() for name, t in self.view().items()}

    def reserved_nbytes(self) -> int:
        """Bytes of the buffers (filled part and spare capacity)."""
        return sum(t.numel() * t.element_size() for t in self._buffers.values())

    def _grow(self, total: int) -> None:
        new_cap = _round_up(total)
        grown = {}
        for name, buf in self._buffers.items():
            bigger = buf.new_empty((*buf.shape[:2], new_cap, *buf.shape[3:]))
            bigger[:, :, :self.length].copy_(buf[:, :, :self.length])
            grown[name] = bigger
        self._buffers = grown
