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

Sliding-window layers drop their oldest entries: :meth:`drop_front` only advances a start offset (no copy);
the live entries are moved to the front of the buffer when it is full (:meth:`_reserve`), so a store that
keeps at most ``W`` entries copies O(W) bytes once per ``capacity - W`` appends.
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
        self._filled: dict[str, int] = {}  # end of the live entries in the buffer, per field
        self._start: dict[str, int] = {}  # start of the live entries (entries before it were dropped)

    @property
    def length(self) -> int:
        """Live entries along dim 2 of the first field (all fields, when they advance together)."""
        name = next(iter(self._filled), None)
        return 0 if name is None else self._filled[name] - self._start[name]

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

    def append_position(self, n: int, like: dict[str, torch.Tensor] | None = None) -> int:
        """Make room for ``n`` more entries in every field (as :meth:`slots` does) and return the slot where they go
        in the buffers of :meth:`buffers`: every field's fill level, which must agree (ValueError otherwise: fields
        advanced by different amounts). A caller writes the whole buffers at that slot, then :meth:`commit` s ``n``:
        no views are built (a decode step's append). ``like``: as for :meth:`slots`."""
        if like is None:
            if not self._buffers:
                raise ValueError("append_position() of an empty store needs like= (the fields' shapes and dtypes)")
            like = self._buffers
        positions = {self._make_room(name, t, n) for name, t in like.items()}
        if len(positions) != 1:
            raise ValueError(f"append_position() needs every field filled to the same slot, got {sorted(positions)}")
        return positions.pop()

    def reserve(self, like: dict[str, torch.Tensor], capacity: int) -> None:
        """Allocate every field's buffer for ``capacity`` entries (rounded up to a multiple of 256) now, empty:
        a static-capacity store, whose buffers keep their addresses as long as appends stay within it (what a
        CUDA graph that writes into them needs). ``like``: tensors with the fields' shapes and dtypes. Raises
        ValueError on a store that already holds buffers."""
        if self._buffers:
            raise ValueError("reserve() needs an empty store")
        for name, t in like.items():
            self._buffers[name] = t.new_empty((*t.shape[:2], _round_up(capacity), *t.shape[3:]))
            self._filled[name] = self._start[name] = 0

    def buffers(self) -> dict[str, torch.Tensor]:
        """Every field's whole buffer (filled part first, then spare capacity), not copies."""
        return dict(self._buffers)

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
        """The live part of every field, as views (no copy)."""
        return {name: buf[:, :, self._start[name]:self._filled[name]] for name, buf in self._buffers.items()}

    def map_batch(self, fn) -> None:
        """Apply ``fn`` (a batch-dim op: index_select, repeat_interleave, ...) to every buffer."""
        self._buffers = {name: fn(buf) for name, buf in self._buffers.items()}

    def truncate(self, keep) -> None:
        """Keep the first ``keep`` live entries of every field (an int, or a dict per field); capacity is kept."""
        for name in self._filled:
            n = keep[name] if isinstance(keep, dict) else keep
            self._filled[name] = min(self._filled[name], self._start[name] + max(0, n))

    def drop_front(self, n) -> None:
        """Drop the oldest ``n`` live entries of every field (an int, or a dict per field): the start offset
        advances, nothing is copied (the buffer is compacted when it is next full)."""
        for name in self._filled:
            m = n[name] if isinstance(n, dict) else n
            self._start[name] = min(self._filled[name], self._start[name] + max(0, m))

    def _reserve(self, name: str, like: torch.Tensor, n: int) -> torch.Tensor:
        """Room for ``n`` more entries of field ``name`` (created like ``like``); returns their view."""
        filled = self._make_room(name, like, n)
        return self._buffers[name][:, :, filled:filled + n]

    def _make_room(self, name: str, like: torch.Tensor, n: int) -> int:
        """Room for ``n`` more entries of field ``name`` (created like ``like``); returns its fill level."""
        if name not in self._buffers:
            self._buffers[name] = like.new_empty((*like.shape[:2], _round_up(n), *like.shape[3:]))
            self._filled[name] = self._start[name] = 0
        buf, start, filled = self._buffers[name], self._start[name], self._filled[name]
        if filled + n > buf.shape[2]:
            live = filled - start
            if live + n <= buf.shape[2] // 2:  # entries were dropped from the front: compact, do not grow
                if live:
                    buf[:, :, :live].copy_(buf[:, :, start:filled].clone())
            else:
                buf = self._grown(buf, start, filled, max(live + n, math.ceil(buf.shape[2] * self.growth)))
                self._buffers[name] = buf
            self._start[name] = 0
            self._filled[name] = filled = live
        return filled

    def nbytes(self) -> dict[str, int]:
        """Bytes of the live part, per field."""
        return {name: t.numel() * t.element_size() for name, t in self.view().items()}

    def reserved_nbytes(self) -> int:
        """Bytes of the buffers (filled part and spare capacity)."""
        return sum(t.numel() * t.element_size() for t in self._buffers.values())

    @staticmethod
    def _grown(buf: torch.Tensor, start: int, filled: int, total: int) -> torch.Tensor:
        """A buffer of ``total`` (rounded up) entries holding the live entries ``[start, filled)`` first."""
        bigger = buf.new_empty((*buf.shape[:2], _round_up(total), *buf.shape[3:]))
        bigger[:, :, :filled - start].copy_(buf[:, :, start:filled])
        return bigger
