"""Exact KV-cache byte counts for FP16, H1B-KV, KIVI, token eviction and Loki-style low-rank keys.

Everything is an exact integer count of bytes; nothing is rounded away and ``CacheBytes.parts``
always sums to ``CacheBytes.total``. Counts cover the K/V cache of all layers and all sequences
of the batch, with the conventions below (``L`` layers, ``H`` kv heads, ``d`` head_dim, ``n``
tokens, ``B`` batch; "per token-head" means per token, per kv head, per layer, per sequence).

``FP16()``
    ``keys`` and ``values``: 2 bytes per element each, so ``2 * L * H * d * n * B * 2`` bytes
    (Llama-2-7B at 8192 tokens = 4 GiB exactly).
``H1B(bits, value_bits, group_size, key_norms, window, sink)``
    The first ``s = min(sink, n)`` tokens (StreamingLLM's attention sinks, part ``sink``) and the newest
    ``w = min(window, n - s)`` tokens (part ``window``) are kept as fp16 K and V; the other
    ``n - s - w`` tokens are compressed, per token-head: ``key_codes`` ``bits / 8`` bytes (the sign
    sketch); ``key_norms`` 2 bytes (fp16 ``|k|``) if ``key_norms`` else 0; ``values``
    ``ceil(d * value_bits / 8)`` bytes (packed, exact when ``d * value_bits`` is a multiple of 8);
    ``value_scales_zeros`` 4 bytes (fp16 scale + fp16 zero) per group of ``group_size`` channels
    (``None``: one group per vector, i.e. 4 bytes). ``projection`` is 0: the Gaussian matrix R is
    regenerated from a seed, never stored.
``KIVI(bits, group_size, residual)``
    ``q = floor((n - residual) / group_size) * group_size`` tokens are quantized when
    ``n > residual`` (else ``q = 0``); the other ``n - q`` tokens (the residual plus any incomplete
    token group) are fp16 K and V (part ``residual``). The same split is used for K and V. Keys are
    quantized per channel over groups of ``group_size`` tokens: ``key_codes`` ``q * d * bits / 8``
    bytes per head (packed along tokens, rounded up per channel-group), ``key_scales_zeros`` 4
    bytes per channel per token group. Values are quantized per token over groups of
    ``group_size`` channels: ``values`` ``ceil(d * bits / 8)`` bytes per token-head,
    ``value_scales_zeros`` 4 bytes per channel group per token-head.
``Eviction(budget)``
    ``min(budget, n)`` tokens kept as fp16 ``keys`` and ``values``. Token positions / indices
    and eviction scores (H2O's accumulated attention) are bookkeeping and are NOT counted (0).
``LowRankKeys(rank)`` (Loki)
    The full fp16 ``keys`` and ``values`` (Loki saves compute and bandwidth, not memory), plus
    ``projection``: one fp16 ``d x rank`` PCA basis per layer per kv head, ``L * H * d * rank * 2``
    bytes, shared by the batch (independent of ``n`` and ``B``).

Validation errors: ``TypeError`` for wrong types (non-int sizes, unknown scheme objects, a config
lacking a required field), ``ValueError`` for out-of-range values; messages name the argument.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ._validation import check_int, check_sketch_bits

__all__ = [
    "FP16", "H1B", "KIVI", "Eviction", "LowRankKeys", "ModelShape", "CacheBytes", "PRESETS",
    "model_shape", "kv_cache_bytes", "compression_ratio", "bits_per_element",
]

FP16_BYTES = 2
SCALE_ZERO_BYTES = 4  # one fp16 scale + one fp16 zero-point per quantization group


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(frozen=True)
class FP16:
    """Uncompressed fp16 K and V."""


@dataclass(frozen=True)
class H1B:
    """H1B-KV: ``bits``-bit sign sketch per key, ``value_bits`` affine values, optional fp16 window."""

    bits: int = 256
    value_bits: int = 4
    group_size: int | None = None
    key_norms: bool = False
    window: int = 0
    sink: int = 0

    def __post_init__(self) -> None:
        check_sketch_bits(self.bits)
        if isinstance(self.value_bits, bool) or self.value_bits not in (2, 4, 8):
            raise ValueError(f"value_bits must be one of 2, 4, 8, got {self.value_bits!r}")
        if self.group_size is not None:
            check_int("group_size", self.group_size, low=1)
        if not isinstance(self.key_norms, bool):
            raise TypeError(f"key_norms must be a bool, got {self.key_norms!r}")
        check_int("window", self.window, low=0)
        check_int("sink", self.sink, low=0)


@dataclass(frozen=True)
class KIVI:
    """KIVI: ``bits``-bit keys per channel and values per token, ``residual`` newest tokens fp16."""

    bits: int = 2
    group_size: int = 32
    residual: int = 128

    def __post_init__(self) -> None:
        if isinstance(self.bits, bool) or self.bits not in (2, 4, 8):
            raise ValueError(f"bits must be one of 2, 4, 8, got {self.bits!r}")
        check_int("group_size", self.group_size, low=1)
        check_int("residual", self.residual, low=0)


@dataclass(frozen=True)
class Eviction:
    """Token eviction (H2O, StreamingLLM, ...): at most ``budget`` tokens kept in fp16."""

    budget: int

    def __post_init__(self) -> None:
        check_int("budget", self.budget, low=0)


@dataclass(frozen=True)
class LowRankKeys:
    """Loki: full fp16 cache plus a ``head_dim x rank`` PCA basis per layer and kv head."""

    rank: int

    def __post_init__(self) -> None:
        check_int("rank", self.rank, low=1)


Scheme = FP16 | H1B | KIVI | Eviction | LowRankKeys


@dataclass(frozen=True)
class ModelShape:
    """The attention shape that sizes a KV cache."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    num_heads: int

    def __post_init__(self) -> None:
        for name in ("num_layers", "num_kv_heads", "head_dim", "num_heads"):
            check_int(name, getattr(self, name), low=1)


PRESETS: dict[str, ModelShape] = {
    "llama-2-7b": ModelShape(num_layers=32, num_kv_heads=32, head_dim=128, num_heads=32),
    "llama-3-8b": ModelShape(num_layers=32, num_kv_heads=8, head_dim=128, num_heads=32),
    "mistral-7b": ModelShape(num_layers=32, num_kv_heads=8, head_dim=128, num_heads=32),
    "smollm2-135m": ModelShape(num_layers=30, num_kv_heads=3, head_dim=64, num_heads=9),
}


def model_shape(config: Any) -> ModelShape:
    """Resolve a preset name, a ``ModelShape`` or a transformers-style config to a ``ModelShape``.

    Reads ``num_hidden_layers``, ``num_attention_heads``, ``num_key_value_heads`` (default
    ``num_attention_heads``) and ``head_dim`` (default ``hidden_size // num_attention_heads``).
    """
    if isinstance(config, ModelShape):
        return config
    if isinstance(config, str):
        try:
            return PRESETS[config.lower()]
        except KeyError:
            raise ValueError(f"unknown preset config {config!r}; known: {', '.join(PRESETS)}") from None
    if hasattr(config, "get_text_config"):  # multimodal transformers configs nest the LM config
        config = config.get_text_config()

    def need(name: str) -> Any:
        value = getattr(config, name, None)
        if value is None:
            raise TypeError(f"config has no {name}; pass a transformers config or one of {list(PRESETS)}")
        return value

    heads = need("num_attention_heads")
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or need("hidden_size") // heads
    return ModelShape(need("num_hidden_layers"), kv_heads, head_dim, heads)


@dataclass(frozen=True)
class CacheBytes:
    """Byte count of a KV cache: ``parts`` (name -> bytes) sum exactly to ``total``."""

    parts: dict[str, int]
    seq_len: int
    batch: int
    scheme: Scheme
    shape: ModelShape = field(repr=False)

    @property
    def total(self) -> int:
        """Total bytes (int)."""
        return sum(self.parts.values())

    @property
    def per_token(self) -> float:
        """Bytes per token per sequence, all layers and heads (nan when ``seq_len == 0``)."""
        return self.total / (self.seq_len * self.batch) if self.seq_len else float("nan")

    @property
    def mb(self) -> float:
        """Total in megabytes (1e6 bytes)."""
        return self.total / 1e6

    @property
    def mib(self) -> float:
        """Total in mebibytes (2**20 bytes)."""
        return self.total / 2**20


def _check_groups(name: str, group_size: int, head_dim: int) -> None:
    if head_dim % group_size:
        raise ValueError(f"{name}={group_size} must divide head_dim={head_dim}")


def kv_cache_bytes(
    config: Any, seq_len: int, batch: int = 1, scheme: Scheme = FP16(), exact_bytes: int = FP16_BYTES
) -> CacheBytes:
    """Exact KV-cache size of ``config`` holding ``seq_len`` tokens for ``batch`` sequences.

    Parameters
    ----------
    config : str, ModelShape or transformers config
        A key of ``PRESETS`` or an object with the fields read by :func:`model_shape`.
    seq_len : int
        Cached tokens per sequence, ``>= 0``.
    batch : int
        Number of sequences, ``>= 1``.
    scheme : FP16, H1B, KIVI, Eviction or LowRankKeys
        Storage scheme; conventions in the module docstring.
    exact_bytes : int
        Bytes per element of the K/V kept unquantized (full cache, windows, sinks, residuals, kept
        tokens): 2 (fp16/bf16, the default the paper's tables assume) or 4 (an fp32 model's cache).
        Quantization scales, zeros and key norms are fp16 regardless.

    Returns
    -------
    CacheBytes
    """
    shape = model_shape(config)
    n = check_int("seq_len", seq_len, low=0)
    b = check_int("batch", batch, low=1)
    d = shape.head_dim
    heads = shape.num_layers * shape.num_kv_heads * b  # (layer, kv head, sequence) triples
    e = check_int("exact_bytes", exact_bytes, low=1)
    if e not in (2, 4):
        raise ValueError(f"exact_bytes must be 2 (fp16/bf16) or 4 (fp32), got {e}")
    fp16_kv = lambda tokens: heads * tokens * d * e * 2  # noqa: E731  exact K and V

    if isinstance(scheme, FP16):
        half = heads * n * d * e
        parts = {"keys": half, "values": half}
    elif isinstance(scheme, H1B):
        groups = 1
        if scheme.group_size is not None:
            _check_groups("group_size", scheme.group_size, d)
            groups = d // scheme.group_size
        sink = min(scheme.sink, n)
        w = min(scheme.window, n - sink)
        old = heads * (n - sink - w)  # compressed token-heads
        parts = {
            "key_codes": old * (scheme.bits // 8),
            "key_norms": old * FP16_BYTES if scheme.key_norms else 0,
            "values": old * _ceil_div(d * scheme.value_bits, 8),
            "value_scales_zeros": old * groups * SCALE_ZERO_BYTES,
            "window": fp16_kv(w),
            "sink": fp16_kv(sink),
            "projection": 0,  # R is regenerated from its seed
        }
    elif isinstance(scheme, KIVI):
        g = scheme.group_size
        _check_groups("group_size", g, d)
        q = (n - scheme.residual) // g * g if n > scheme.residual else 0
        parts = {
            "key_codes": heads * (q // g) * d * _ceil_div(g * scheme.bits, 8),
            "key_scales_zeros": heads * (q // g) * d * SCALE_ZERO_BYTES,
            "values": heads * q * _ceil_div(d * scheme.bits, 8),
            "value_scales_zeros": heads * q * (d // g) * SCALE_ZERO_BYTES,
            "residual": fp16_kv(n - q),
        }
    elif isinstance(scheme, Eviction):
        half = heads * min(scheme.budget, n) * d * e
        parts = {"keys": half, "values": half}
    elif isinstance(scheme, LowRankKeys):
        if scheme.rank > d:
            raise ValueError(f"rank must be in 1..head_dim={d}, got {scheme.rank}")
        half = heads * n * d * e
        basis = shape.num_layers * shape.num_kv_heads * d * scheme.rank * FP16_BYTES
        parts = {"keys": half, "values": half, "projection": basis}
    else:
        raise TypeError(f"scheme must be FP16, H1B, KIVI, Eviction or LowRankKeys, got {scheme!r}")
    return CacheBytes(parts=parts, seq_len=n, batch=b, scheme=scheme, shape=shape)


def compression_ratio(config: Any, seq_len: int, scheme: Scheme, batch: int = 1) -> float:
    """FP16 cache bytes divided by ``scheme`` cache bytes at ``seq_len`` (``>= 1``) tokens."""
    check_int("seq_len", seq_len, low=1)
    fp16 = kv_cache_bytes(config, seq_len, batch, FP16()).total
    return fp16 / kv_cache_bytes(config, seq_len, batch, scheme).total


def bits_per_element(scheme: Scheme, head_dim: int) -> dict[str, float]:
    """Stored bits per key and per value element in the compressed region, metadata included.

    Ignores fp16 windows / residuals, Loki's basis and which tokens eviction keeps. For ``H1B``,
    ``bits / head_dim`` is the sketch alone (``bits=256`` at ``head_dim=128`` is 2 bits/element).
    """
    d = check_int("head_dim", head_dim, low=1)
    if isinstance(scheme, H1B):
        groups = 1 if scheme.group_size is None else d / scheme.group_size
        keys = (scheme.bits + 16 * scheme.key_norms) / d
        return {"keys": keys, "values": scheme.value_bits + 8 * SCALE_ZERO_BYTES * groups / d}
    if isinstance(scheme, KIVI):
        meta = 8 * SCALE_ZERO_BYTES / scheme.group_size
        return {"keys": scheme.bits + meta, "values": scheme.bits + meta}
    if isinstance(scheme, (FP16, Eviction, LowRankKeys)):
        return {"keys": 16.0, "values": 16.0}
    raise TypeError(f"scheme must be FP16, H1B, KIVI, Eviction or LowRankKeys, got {scheme!r}")
