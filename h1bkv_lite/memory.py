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

Sliding-window layers. A layer with a sliding window ``W`` (``ModelShape.sliding_windows``, read from a
transformers config by :func:`layer_windows` with the decision ``DynamicCache(config=...)`` makes) holds at
most the ``W - 1`` newest tokens at rest (the next token makes ``W``, all its query sees), like transformers'
``DynamicSlidingWindowLayer``: of ``n`` tokens the oldest ``t = max(0, n - W + 1)`` are dropped. Each scheme
first splits all ``n`` tokens as above, then drops from the front: ``FP16`` and ``LowRankKeys`` hold
``n - t`` tokens; ``Eviction`` ``min(budget, n - t)``; ``H1B`` drops sinks first, then compressed tokens,
then window tokens; ``KIVI`` drops whole key groups only, ``floor(t / group_size) * group_size`` tokens
(compressed first, then residual), so up to ``group_size - 1`` tokens older than the window stay stored
(masked). A full-attention layer holds all ``n``.

Validation errors: ``TypeError`` for wrong types (non-int sizes, unknown scheme objects, a config
lacking a required field), ``ValueError`` for out-of-range values; messages name the argument.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ._validation import check_int, check_sketch_bits

__all__ = [
    "FP16", "H1B", "KIVI", "Eviction", "LowRankKeys", "ModelShape", "CacheBytes", "PRESETS",
    "model_shape", "layer_windows", "kv_cache_bytes", "compression_ratio", "bits_per_element",
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
    """The attention shape that sizes a KV cache.

    ``sliding_windows``: None (every layer attends to the whole sequence) or one entry per layer, the
    layer's sliding window (int >= 1) or None for a full-attention layer.
    """

    num_layers: int
    num_kv_heads: int
    head_dim: int
    num_heads: int
    sliding_windows: tuple[int | None, ...] | None = None

    def __post_init__(self) -> None:
        for name in ("num_layers", "num_kv_heads", "head_dim", "num_heads"):
            check_int(name, getattr(self, name), low=1)
        if self.sliding_windows is not None:
            windows = tuple(self.sliding_windows)
            if len(windows) != self.num_layers:
                raise ValueError(
                    f"sliding_windows must have one entry per layer ({self.num_layers}), got {len(windows)}")
            for w in windows:
                if w is not None:
                    check_int("sliding_windows entry", w, low=1)
            object.__setattr__(self, "sliding_windows", None if all(w is None for w in windows) else windows)

    def window(self, layer: int) -> int | None:
        """The sliding window of ``layer``, or None (full attention)."""
        return None if self.sliding_windows is None else self.sliding_windows[layer]


PRESETS: dict[str, ModelShape] = {
    "llama-2-7b": ModelShape(num_layers=32, num_kv_heads=32, head_dim=128, num_heads=32),
    "llama-3-8b": ModelShape(num_layers=32, num_kv_heads=8, head_dim=128, num_heads=32),
    "mistral-7b": ModelShape(num_layers=32, num_kv_heads=8, head_dim=128, num_heads=32),  # no sliding window
    # (v0.2+; v0.1's 4096-token window is modelled when its config is passed instead of the name)
    "smollm2-135m": ModelShape(num_layers=30, num_kv_heads=3, head_dim=64, num_heads=9),
}


def model_shape(config: Any) -> ModelShape:
    """Resolve a preset name, a ``ModelShape`` or a transformers-style config to a ``ModelShape``.

    Reads ``num_hidden_layers``, ``num_attention_heads``, ``num_key_value_heads`` (default
    ``num_attention_heads``), ``head_dim`` (default ``hidden_size // num_attention_heads``) and the sliding
    windows (:func:`layer_windows`).
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
    layers = need("num_hidden_layers")
    return ModelShape(layers, kv_heads, head_dim, heads, layer_windows(config, layers))


def layer_windows(config: Any, num_layers: int | None = None) -> tuple[int | None, ...]:
    """Per decoder layer, its sliding window (int) or None (full attention), decided as transformers'
    ``DynamicCache(config=...)`` decides which layers are ``DynamicSlidingWindowLayer`` s (5.0 to 5.x):
    ``config.layer_types`` when set ("sliding_attention" layers get ``config.sliding_window``), else every
    layer is sliding when ``config.sliding_window`` is set (Mistral's default is 4096; Qwen2 sets it only
    with ``use_sliding_window=True``), else none is.

    Raises NotImplementedError, naming it, for an attention layer type the caches do not implement
    (``"chunked_attention"`` / ``attention_chunk_size``, e.g. Llama 4).
    """
    if hasattr(config, "get_text_config"):  # multimodal transformers configs nest the LM config
        config = config.get_text_config()
    n = num_layers if num_layers is not None else getattr(config, "num_hidden_layers", None)
    window = getattr(config, "sliding_window", None)
    chunk = getattr(config, "attention_chunk_size", None)
    types = getattr(config, "layer_types", None)
    if types is None:
        if window is None and chunk is not None:
            types = ["chunked_attention"] * (n or 0)
        else:
            types = ["sliding_attention" if window is not None else "full_attention"] * (n or 0)
    windows = []
    for i, kind in enumerate(list(types)[:n]):
        if kind == "full_attention":
            windows.append(None)
        elif kind == "sliding_attention":
            if not isinstance(window, int) or isinstance(window, bool) or window < 1:
                raise ValueError(f"layer {i} is a sliding_attention layer, but config.sliding_window is {window!r}")
            windows.append(window)
        elif kind == "chunked_attention":
            raise NotImplementedError(
                f"layer {i} uses chunked attention (attention_chunk_size={chunk}, e.g. Llama 4); h1bkv_lite "
                "caches implement full and sliding-window attention only"
            )
        else:
            raise NotImplementedError(
                f"layer {i} has layer type {kind!r}; h1bkv_lite caches implement 'full_attention' and "
                "'sliding_attention' layers only"
            )
    return tuple(windows)


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
    e = check_int("exact_bytes", exact_bytes, low=1)
    if e not in (2, 4):
        raise ValueError(f"exact_bytes must be 2 (fp16/bf16) or 4 (fp32), got {e}")
    if not isinstance(scheme, (FP16, H1B, KIVI, Eviction, LowRankKeys)):
        raise TypeError(f"scheme must be FP16, H1B, KIVI, Eviction or LowRankKeys, got {scheme!r}")
    d = shape.head_dim
    if isinstance(scheme, H1B) and scheme.group_size is not None:
        _check_groups("group_size", scheme.group_size, d)
    if isinstance(scheme, KIVI):
        _check_groups("group_size", scheme.group_size, d)
    if isinstance(scheme, LowRankKeys) and scheme.rank > d:
        raise ValueError(f"rank must be in 1..head_dim={d}, got {scheme.rank}")
    # layers grouped by what they drop: a full layer drops nothing, a sliding one all but its W - 1 newest
    dropped: dict[int, int] = {}
    for layer in range(shape.num_layers):
        w = shape.window(layer)
        t = 0 if w is None else max(0, n - w + 1)
        dropped[t] = dropped.get(t, 0) + 1
    parts: dict[str, int] = {}
    for t, layers in dropped.items():
        for name, count in _layer_parts(scheme, n, t, d, e).items():
            parts[name] = parts.get(name, 0) + count * layers * shape.num_kv_heads * b
    if isinstance(scheme, LowRankKeys):  # one basis per layer and kv head, shared by the batch
        parts["projection"] = shape.num_layers * shape.num_kv_heads * d * scheme.rank * FP16_BYTES
    return CacheBytes(parts=parts, seq_len=n, batch=b, scheme=scheme, shape=shape)


def _layer_parts(scheme: Scheme, n: int, t: int, d: int, e: int) -> dict[str, int]:
    """Bytes of one (layer, kv head, sequence) holding ``n`` tokens of which the oldest ``t`` were dropped
    (a sliding window; 0 for full attention). ``e``: bytes per exact element."""
    exact_kv = lambda tokens: tokens * d * e * 2  # noqa: E731  exact K and V
    if isinstance(scheme, FP16):
        return {"keys": (n - t) * d * e, "values": (n - t) * d * e}
    if isinstance(scheme, H1B):
        groups = 1 if scheme.group_size is None else d // scheme.group_size
        sink = min(scheme.sink, n)
        w = min(scheme.window, n - sink)
        old = n - sink - w  # compressed, before the sliding window drops any
        held_sink = max(0, sink - t)
        held_old = max(0, old - max(0, t - sink))
        held_window = n - t - held_sink - held_old
        return {
            "key_codes": held_old * (scheme.bits // 8),
            "key_norms": held_old * FP16_BYTES if scheme.key_norms else 0,
            "values": held_old * _ceil_div(d * scheme.value_bits, 8),
            "value_scales_zeros": held_old * groups * SCALE_ZERO_BYTES,
            "window": exact_kv(held_window),
            "sink": exact_kv(held_sink),
            "projection": 0,  # R is regenerated from its seed
        }
    if isinstance(scheme, KIVI):
        g = scheme.group_size
        q = (n - scheme.residual) // g * g if n > scheme.residual else 0
        gone = t // g * g  # whole key groups only
        held_q = max(0, q - gone)
        return {
            "key_codes": (held_q // g) * d * _ceil_div(g * scheme.bits, 8),
            "key_scales_zeros": (held_q // g) * d * SCALE_ZERO_BYTES,
            "values": held_q * _ceil_div(d * scheme.bits, 8),
            "value_scales_zeros": held_q * (d // g) * SCALE_ZERO_BYTES,
            "residual": exact_kv(n - max(q, gone)),
        }
    if isinstance(scheme, Eviction):
        kept = min(scheme.budget, n - t)
        return {"keys": kept * d * e, "values": kept * d * e}
    return {"keys": (n - t) * d * e, "values": (n - t) * d * e, "projection": 0}  # LowRankKeys



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
