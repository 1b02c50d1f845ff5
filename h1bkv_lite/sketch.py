"""SimHash sketches: the sign bits of a fixed Gaussian projection, packed eight to a byte.

A vector ``x [head_dim]`` becomes ``s = sign(x @ R)`` with ``R [head_dim, bits]`` drawn once from
N(0, 1) on the CPU from ``seed`` (so every device and run gets the same R). ``sign(0) = +1``.

Bit layout (shared with the Triton kernels, compared bit-exactly): sketch bit ``i`` is stored in bit
``i % 8`` (LSB = 0) of byte ``i // 8``; bit value 1 means ``(x @ R)[i] >= 0`` (sign +1).

For two sketches with Hamming distance ``h``, the angle between the original vectors is estimated by
``theta_hat = pi * h / bits`` (``h ~ Binomial(bits, theta / pi)``), so ``cos(pi * h / bits)`` estimates
their cosine and the paper's linear score ``1 - 2 h / bits`` estimates ``1 - 2 theta / pi``.
"""
from __future__ import annotations

import math

import torch

from ._device import to_device
from ._validation import check_int, check_same_device, check_sketch_bits, check_tensor

_POPCOUNT_TABLE = torch.tensor([bin(i).count("1") for i in range(256)], dtype=torch.int32)


class SimHashSketcher:
    """Fixed random-hyperplane sketcher for one head dimension.

    Parameters
    ----------
    head_dim : int
        Size of the vectors to sketch (last dimension of keys/queries).
    bits : int
        Sketch width b, a multiple of 8 in [8, 4096]; codes take ``bits // 8`` bytes.
    seed : int
        Seed of the CPU generator that draws ``R``; same seed, same R on every device.
    projection : torch.Tensor, optional
        A given ``R`` (float ``[head_dim, bits]``, finite), e.g. one learned by
        :class:`~h1bkv_lite.finetune.H1BFinetuner` with ``learn_projection=True``, used instead of the seeded
        draw (``seed`` is then only a label). Copied to float32 on the CPU; the caller's tensor is not kept.
    """

    def __init__(self, head_dim: int, bits: int, seed: int = 0, projection: torch.Tensor | None = None):
        self.head_dim = check_int("head_dim", head_dim, low=1)
        self.bits = check_sketch_bits(bits)
        self.seed = check_int("seed", seed, low=0)
        if projection is None:
            gen = torch.Generator(device="cpu").manual_seed(seed)
            projection = torch.randn(head_dim, bits, generator=gen, dtype=torch.float32)  # R [d, b]
            self.learned = False
        else:
            check_tensor("projection", projection, ndim=2)
            if tuple(projection.shape) != (head_dim, bits):
                raise ValueError(f"projection must have shape [head_dim, bits] = [{head_dim}, {bits}], "
                                 f"got {tuple(projection.shape)}")
            projection = projection.detach().to(device="cpu", dtype=torch.float32, copy=True).contiguous()
            self.learned = True
        self.projection = projection
        self._projection_cache: dict[torch.device, torch.Tensor] = {}

    def __repr__(self) -> str:
        given = ", projection=given" if self.learned else ""
        return f"SimHashSketcher(head_dim={self.head_dim}, bits={self.bits}, seed={self.seed}{given})"

    @property
    def nbytes_per_code(self) -> int:
        return self.bits // 8

    def projection_on(self, device: torch.device) -> torch.Tensor:
        """R as float32 on ``device`` (cached; copied there without a host sync, the first prefill needs it)."""
        device = torch.device(device)
        if device not in self._projection_cache:
            self._projection_cache[device] = to_device(self.projection, device)
        return self._projection_cache[device]

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """``x [..., head_dim]`` (fp16/bf16/fp32) -> ``x @ R`` float32 ``[..., bits]``."""
        self._check_vectors("x", x)
        return x.float() @ self.projection_on(x.device)

    def sketch(self, x: torch.Tensor) -> torch.Tensor:
        """``x [..., head_dim]`` (fp16/bf16/fp32) -> packed codes ``uint8 [..., bits // 8]``."""
        return pack_bits(self.project(x) >= 0)

    def unpack(self, codes: torch.Tensor) -> torch.Tensor:
        """Packed codes ``uint8 [..., bits // 8]`` -> bits ``bool [..., bits]`` (True = sign +1)."""
        self._check_codes("codes", codes)
        return unpack_bits(codes)

    def signs(self, codes: torch.Tensor) -> torch.Tensor:
        """Packed codes -> sign vectors ``float32 [..., bits]`` with entries +1/-1."""
        return self.unpack(codes).float() * 2 - 1

    def hamming(self, a: torch.Tensor, b: torch.Tensor, method: str = "matmul") -> torch.Tensor:
        """Pairwise Hamming distances ``int32 [..., Na, Nb]`` of codes ``a [..., Na, B]``, ``b [..., Nb, B]``.

        Leading dims broadcast. ``method="matmul"`` uses ``h = (bits - s_a . s_b) / 2`` for the +/-1 sign
        vectors (exact: the sums are small integers in float32); ``method="xor"`` counts the set bits of
        ``a XOR b`` byte by byte, the form the kernels use. Both give identical results.
        """
        self._check_codes("a", a, min_ndim=2)
        self._check_codes("b", b, min_ndim=2)
        check_same_device(a=a, b=b)
        if method == "matmul":
            dots = self.signs(a) @ self.signs(b).transpose(-1, -2)
            return ((self.bits - dots) / 2).round().to(torch.int32)
        if method == "xor":
            x = torch.bitwise_xor(a.unsqueeze(-2), b.unsqueeze(-3))  # [..., Na, Nb, B]
            return _POPCOUNT_TABLE.to(a.device)[x.long()].sum(-1, dtype=torch.int32)
        raise ValueError(f"method must be 'matmul' or 'xor', got {method!r}")

    def cosine(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Estimated cosine ``cos(pi * h / bits)``, float32 ``[..., Na, Nb]``."""
        return torch.cos(math.pi * self.hamming(a, b).float() / self.bits)

    def score(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """The paper's linear score ``1 - 2 h / bits`` in [-1, 1], float32 ``[..., Na, Nb]``."""
        return 1 - 2 * self.hamming(a, b).float() / self.bits

    def _check_vectors(self, name: str, x: torch.Tensor) -> None:
        check_tensor(name, x, min_ndim=1)
        if x.shape[-1] != self.head_dim:
            raise ValueError(f"{name} last dim must equal head_dim={self.head_dim}, got {x.shape[-1]}")

    def _check_codes(self, name: str, codes: torch.Tensor, min_ndim: int = 1) -> None:
        check_tensor(name, codes, min_ndim=min_ndim, dtypes=(torch.uint8,))
        if codes.shape[-1] != self.bits // 8:
            raise ValueError(
                f"{name} last dim must be bits // 8 = {self.bits // 8} bytes, got {codes.shape[-1]}"
            )


def pack_bits(bits: torch.Tensor) -> torch.Tensor:
    """``bool [..., n]`` (n a multiple of 8) -> ``uint8 [..., n // 8]``, bit i in bit i % 8 of byte i // 8."""
    if bits.shape[-1] % 8:
        raise ValueError(f"bits last dim must be a multiple of 8, got {bits.shape[-1]}")
    grouped = bits.reshape(*bits.shape[:-1], bits.shape[-1] // 8, 8).to(torch.int32)
    return (grouped << _bit_shifts(bits.device)).sum(-1).to(torch.uint8)


def unpack_bits(codes: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: ``uint8 [..., B]`` -> ``bool [..., 8 * B]`` (shifted in uint8: one byte per bit
    alive, no wider copy of the codes)."""
    expanded = ((codes.unsqueeze(-1) >> _bit_shifts(codes.device, torch.uint8)) & 1) != 0
    return expanded.reshape(*codes.shape[:-1], codes.shape[-1] * 8)


def _bit_shifts(device, dtype: torch.dtype = torch.int32) -> torch.Tensor:
    """``[0, 1, ..., 7]`` in ``dtype`` made on ``device`` (a fill, not a copy of a host constant: on CUDA a
    host-to-device copy would synchronise the host on every call, i.e. on every decode step of the torch path)."""
    return torch.arange(8, dtype=dtype, device=device)
