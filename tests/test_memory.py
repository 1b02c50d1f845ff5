"""Tests for h1bkv_lite.memory: exact KV-cache byte accounting."""

from __future__ import annotations

import dataclasses
import itertools
import math
from types import SimpleNamespace

import numpy as np
import pytest

from h1bkv_lite.memory import (
    FP16,
    H1B,
    KIVI,
    PRESETS,
    CacheBytes,
    Eviction,
    LowRankKeys,
    ModelShape,
    bits_per_element,
    compression_ratio,
    kv_cache_bytes,
    model_shape,
)

GiB, MiB = 2**30, 2**20
TINY = ModelShape(num_layers=3, num_kv_heads=2, head_dim=8, num_heads=4)  # small enough to enumerate


def brute_h1b(shape: ModelShape, n: int, batch: int, s: H1B) -> dict[str, int]:
    """Count H1B bytes one (sequence, layer, head, token) at a time, in bits where possible."""
    d = shape.head_dim
    out = dict.fromkeys(["key_codes", "key_norms", "values", "value_scales_zeros", "window", "sink"], 0)
    for _seq, _layer, _head in itertools.product(range(batch), range(shape.num_layers), range(shape.num_kv_heads)):
        for t in range(n):
            if t < s.sink:  # one of the first `sink` tokens
                out["sink"] += 2 * d * 16 // 8
                continue
            if t >= n - s.window:  # one of the newest `window` tokens
                out["window"] += 2 * d * 16 // 8
                continue
            out["key_codes"] += s.bits // 8
            out["key_norms"] += 2 if s.key_norms else 0
            out["values"] += d * s.value_bits // 8
            n_groups = 1 if s.group_size is None else len(range(0, d, s.group_size))
            out["value_scales_zeros"] += n_groups * (16 + 16) // 8
    return out


def brute_kivi(shape: ModelShape, n: int, batch: int, s: KIVI) -> dict[str, int]:
    """Count KIVI bytes by walking tokens: full token groups older than the residual are quantized."""
    d, g = shape.head_dim, s.group_size
    # mark tokens quantized: walk groups of g from the oldest, while the group leaves >= residual behind
    quantized = np.zeros(n, dtype=bool)
    start = 0
    while start + g <= n - s.residual:
        quantized[start : start + g] = True
        start += g
    units = batch * shape.num_layers * shape.num_kv_heads
    n_q = int(quantized.sum())
    per_unit = {
        "key_codes": sum(g * s.bits for _ in range(n_q // g) for _ in range(d)) // 8,
        "key_scales_zeros": (n_q // g) * d * 4,
        "values": n_q * d * s.bits // 8,
        "value_scales_zeros": n_q * (d // g) * 4,
        "residual": int((~quantized).sum()) * d * 2 * 2,
    }
    return {k: v * units for k, v in per_unit.items()}


# ---------------------------------------------------------------- FP16 and presets


def test_llama2_7b_fp16_8k_is_exactly_4_gib():
    r = kv_cache_bytes("llama-2-7b", 8192)
    assert r.total == 4 * GiB == 4294967296
    assert r.parts == {"keys": 2 * GiB, "values": 2 * GiB}
    assert isinstance(r.total, int) and isinstance(r, CacheBytes)
    assert r.mib == 4096.0 and r.mb == pytest.approx(4294.967296)
    assert r.per_token == 4 * GiB / 8192 == 2 * 32 * 32 * 128 * 2


def test_gqa_presets_are_4x_smaller_than_mha():
    mha = kv_cache_bytes("llama-2-7b", 4096).total
    assert kv_cache_bytes("llama-3-8b", 4096).total * 4 == mha
    assert kv_cache_bytes("mistral-7b", 4096).total * 4 == mha


def test_smollm2_preset():
    s = PRESETS["smollm2-135m"]
    assert (s.num_layers, s.num_kv_heads, s.head_dim, s.num_heads) == (30, 3, 64, 9)
    assert kv_cache_bytes("smollm2-135m", 1000).total == 2 * 30 * 3 * 64 * 1000 * 2
    assert kv_cache_bytes("SmolLM2-135M", 10).total == kv_cache_bytes("smollm2-135m", 10).total


def test_transformers_config_matches_preset():
    from transformers import LlamaConfig, MistralConfig

    cfg = LlamaConfig(hidden_size=4096, num_attention_heads=32, num_hidden_layers=32, intermediate_size=11008)
    l3 = LlamaConfig(hidden_size=4096, num_attention_heads=32, num_key_value_heads=8, num_hidden_layers=32)
    smol = LlamaConfig(hidden_size=576, num_attention_heads=9, num_key_value_heads=3, num_hidden_layers=30)
    mis = MistralConfig()  # defaults are Mistral-7B (v0.1: a 4096-token sliding window on every layer)
    assert model_shape(mis).sliding_windows == (4096,) * 32
    for c, name in [(cfg, "llama-2-7b"), (l3, "llama-3-8b"), (smol, "smollm2-135m"), (mis, "mistral-7b")]:
        assert dataclasses.replace(model_shape(c), sliding_windows=None) == PRESETS[name]
        for scheme in [FP16(), H1B(), H1B(bits=64, window=16, key_norms=True), KIVI(), Eviction(100)]:
            assert kv_cache_bytes(c, 777, 2, scheme).parts == kv_cache_bytes(name, 777, 2, scheme).parts  # < 4096


def test_config_fallbacks():
    # no num_key_value_heads -> MHA; no head_dim -> hidden_size // num_attention_heads
    c = SimpleNamespace(num_hidden_layers=32, num_attention_heads=32, hidden_size=4096)
    assert model_shape(c) == PRESETS["llama-2-7b"]
    c = SimpleNamespace(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=None, head_dim=16)
    assert model_shape(c) == ModelShape(2, 4, 16, 4)


# ---------------------------------------------------------------- H1B


@pytest.mark.parametrize(
    "scheme",
    [
        H1B(),
        H1B(bits=8, value_bits=2),
        H1B(bits=64, value_bits=8, group_size=4, key_norms=True),
        H1B(bits=16, group_size=2, window=5),
        H1B(window=100),  # window longer than the sequence
        H1B(bits=16, window=3, sink=4),
        H1B(sink=50, window=7),  # sinks longer than the sequence
    ],
)
@pytest.mark.parametrize("n,batch", [(0, 1), (1, 1), (13, 2), (40, 3)])
def test_h1b_parts_match_brute_force(scheme, n, batch):
    r = kv_cache_bytes(TINY, n, batch, scheme)
    want = brute_h1b(TINY, n, batch, scheme)
    assert {k: v for k, v in r.parts.items() if k != "projection"} == want
    assert r.parts["projection"] == 0  # R is derived from the seed
    assert r.total == sum(want.values()) == sum(r.parts.values())


def test_h1b_paper_arithmetic_llama2_7b_8k():
    r = kv_cache_bytes("llama-2-7b", 8192, scheme=H1B(bits=256, value_bits=4))
    assert r.parts["values"] == 512 * MiB  # 32 x 4096 x 0.5 B x 8192
    assert r.parts["key_codes"] == 256 * MiB  # 32 B per token-head
    # one fp16 scale + zero per value vector: 4 B x 32 layers x 32 heads x 8192 tokens = 32 MiB
    assert r.parts["value_scales_zeros"] == 32 * MiB
    assert r.parts["key_norms"] == r.parts["window"] == r.parts["sink"] == 0
    assert r.total == 800 * MiB
    ratio = compression_ratio("llama-2-7b", 8192, H1B())
    assert ratio == 4096 / 800 == pytest.approx(5.12)
    assert ratio < 8  # 4-bit values on every token cap the reduction at 8x
    # even with free keys the 8x cap holds; two value groups per vector double the metadata
    g64 = kv_cache_bytes("llama-2-7b", 8192, scheme=H1B(group_size=64))
    assert g64.parts["value_scales_zeros"] == 64 * MiB
    assert compression_ratio("llama-2-7b", 8192, H1B(group_size=64)) == pytest.approx(4096 / 832)
    # the paper's 58.7 MB is below the 4-bit values alone
    assert r.parts["values"] / 1e6 > 58.7


def test_h1b_window_and_batch_scaling():
    base = kv_cache_bytes("llama-3-8b", 4096, scheme=H1B())
    win = kv_cache_bytes("llama-3-8b", 4096, scheme=H1B(window=128))
    fp16_tok = 2 * 32 * 8 * 128 * 2  # K+V bytes per token, all layers
    h1b_tok = 32 * 8 * (32 + 64 + 4)  # codes + 4-bit values + scale/zero per token
    assert base.per_token == h1b_tok
    assert win.total - base.total == 128 * (fp16_tok - h1b_tok)
    assert win.parts["window"] == 128 * fp16_tok
    for b in (2, 5):
        assert kv_cache_bytes("llama-3-8b", 4096, b, H1B(window=128)).total == b * win.total
    # a window covering the whole sequence is the FP16 cache
    assert kv_cache_bytes("llama-3-8b", 300, scheme=H1B(window=300)).total == kv_cache_bytes("llama-3-8b", 300).total


def test_h1b_key_norms_add_two_bytes_per_token_head():
    a = kv_cache_bytes("smollm2-135m", 500, scheme=H1B(bits=64))
    b = kv_cache_bytes("smollm2-135m", 500, scheme=H1B(bits=64, key_norms=True))
    assert b.total - a.total == b.parts["key_norms"] == 30 * 3 * 500 * 2


# ---------------------------------------------------------------- KIVI


@pytest.mark.parametrize(
    "n,quantized",
    [(0, 0), (1, 0), (100, 0), (128, 0), (129, 0), (159, 0), (160, 32), (161, 32), (191, 32), (192, 64), (1000, 864)],
)
def test_kivi_residual_rule(n, quantized):
    r = kv_cache_bytes("llama-2-7b", n, scheme=KIVI(bits=2, group_size=32, residual=128))
    units = 32 * 32
    assert r.parts["residual"] == units * (n - quantized) * 128 * 2 * 2
    assert r.parts["values"] == units * quantized * 128 * 2 // 8
    assert r.parts["key_scales_zeros"] == units * (quantized // 32) * 128 * 4
    assert r.total == sum(r.parts.values())


@pytest.mark.parametrize(
    "scheme", [KIVI(), KIVI(bits=4, group_size=4, residual=3), KIVI(bits=8, group_size=2, residual=0)]
)
@pytest.mark.parametrize("n,batch", [(0, 1), (2, 1), (17, 2), (200, 1)])
def test_kivi_parts_match_brute_force(scheme, n, batch):
    shape = ModelShape(2, 2, 32, 2)
    assert kv_cache_bytes(shape, n, batch, scheme).parts == brute_kivi(shape, n, batch, scheme)


def test_kivi2_llama2_7b_long_context_approaches_bits():
    r = kv_cache_bytes("llama-2-7b", 8192, scheme=KIVI())
    bpe = bits_per_element(KIVI(), 128)
    assert bpe == {"keys": 3.0, "values": 3.0}  # 2 bits + 32 bits of scale/zero per 32 elements
    quantized = 8192 - 128 - (8192 - 128) % 32
    assert r.total == 32 * 32 * (quantized * 128 * 2 * 3 // 8 + (8192 - quantized) * 128 * 2 * 2)


# ---------------------------------------------------------------- eviction and low rank


def test_eviction():
    assert kv_cache_bytes("llama-2-7b", 8192, scheme=Eviction(1024)).total == 512 * MiB
    assert compression_ratio("llama-2-7b", 8192, Eviction(1024)) == 8.0
    assert kv_cache_bytes("llama-2-7b", 500, 3, Eviction(1024)) == dataclasses.replace(
        kv_cache_bytes("llama-2-7b", 500, 3), scheme=Eviction(1024)
    )
    assert kv_cache_bytes("llama-2-7b", 10, scheme=Eviction(0)).total == 0


def test_low_rank_keys_saves_no_memory():
    r = kv_cache_bytes("llama-2-7b", 8192, 2, LowRankKeys(rank=32))
    fp16 = kv_cache_bytes("llama-2-7b", 8192, 2)
    assert r.parts["keys"] == fp16.parts["keys"] and r.parts["values"] == fp16.parts["values"]
    assert r.parts["projection"] == 32 * 32 * 128 * 32 * 2  # per layer per kv head, not per sequence
    assert r.total > fp16.total
    assert compression_ratio("llama-2-7b", 8192, LowRankKeys(32)) < 1


# ---------------------------------------------------------------- helpers


def test_units_and_per_token():
    r = kv_cache_bytes("smollm2-135m", 0)
    assert r.total == 0 and math.isnan(r.per_token)
    r = kv_cache_bytes("smollm2-135m", 100, 4)
    assert r.per_token == r.total / 400 == 30 * 3 * 64 * 2 * 2
    assert r.mib == r.total / 2**20 and r.mb == r.total / 1e6


def test_bits_per_element():
    assert bits_per_element(H1B(bits=256), 128) == {"keys": 2.0, "values": 4.25}
    assert bits_per_element(H1B(bits=256), 64)["keys"] == 4.0
    assert bits_per_element(H1B(bits=64, key_norms=True, group_size=32), 64) == {"keys": 1.25, "values": 5.0}
    assert bits_per_element(FP16(), 128) == {"keys": 16.0, "values": 16.0}


def test_numpy_ints_accepted_and_schemes_frozen():
    assert kv_cache_bytes("llama-2-7b", np.int64(8192), np.int32(1)).total == 4 * GiB
    with pytest.raises(dataclasses.FrozenInstanceError):
        H1B().bits = 8  # type: ignore[misc]


# ---------------------------------------------------------------- validation


@pytest.mark.parametrize(
    "make,exc,match",
    [
        (lambda: H1B(bits=0), ValueError, "bits"),
        (lambda: H1B(bits=12), ValueError, "bits must be a multiple of 8"),
        (lambda: H1B(bits=8192), ValueError, r"bits must be in \[8, 4096\]"),
        (lambda: H1B(bits=256.0), TypeError, "bits"),
        (lambda: H1B(value_bits=3), ValueError, "value_bits"),
        (lambda: H1B(value_bits=True), ValueError, "value_bits"),
        (lambda: H1B(group_size=0), ValueError, "group_size"),
        (lambda: H1B(window=-1), ValueError, "window"),
        (lambda: H1B(sink=-2), ValueError, "sink"),
        (lambda: H1B(key_norms=1), TypeError, "key_norms"),
        (lambda: KIVI(bits=3), ValueError, "bits"),
        (lambda: KIVI(group_size=0), ValueError, "group_size"),
        (lambda: KIVI(residual=-5), ValueError, "residual"),
        (lambda: Eviction(-1), ValueError, "budget"),
        (lambda: LowRankKeys(-1), ValueError, "rank"),
        (lambda: LowRankKeys(0), ValueError, "rank"),
    ],
)
def test_bad_scheme_arguments(make, exc, match):
    with pytest.raises(exc, match=match):
        make()


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        (dict(seq_len=-1), ValueError, "seq_len"),
        (dict(seq_len=1.5), TypeError, "seq_len"),
        (dict(seq_len=True), TypeError, "seq_len"),
        (dict(batch=0), ValueError, "batch"),
        (dict(batch=2.0), TypeError, "batch"),
        (dict(config="llama-7b"), ValueError, "unknown preset.*llama-2-7b.*smollm2-135m"),
        (dict(config=SimpleNamespace(num_attention_heads=4, hidden_size=64)), TypeError, "num_hidden_layers"),
        (dict(config=SimpleNamespace(num_hidden_layers=2, hidden_size=64)), TypeError, "num_attention_heads"),
        (dict(config=SimpleNamespace(num_hidden_layers=2, num_attention_heads=4)), TypeError, "hidden_size"),
        (dict(config=SimpleNamespace(num_hidden_layers=0, num_attention_heads=4, head_dim=8)), ValueError, "num_lay"),
        (dict(scheme=H1B(group_size=48)), ValueError, "group_size=48 must divide head_dim=128"),
        (dict(scheme=KIVI(group_size=48)), ValueError, "group_size=48 must divide head_dim=128"),
        (dict(scheme=LowRankKeys(129)), ValueError, "rank"),
        (dict(scheme="fp16"), TypeError, "scheme"),
    ],
)
def test_bad_call_arguments(kwargs, exc, match):
    args = dict(config="llama-2-7b", seq_len=16, batch=1, scheme=FP16()) | kwargs
    with pytest.raises(exc, match=match):
        kv_cache_bytes(**args)


def test_compression_ratio_needs_tokens():
    with pytest.raises(ValueError, match="seq_len"):
        compression_ratio("llama-2-7b", 0, H1B())
    with pytest.raises(ValueError, match="head_dim"):
        bits_per_element(H1B(), 0)
    with pytest.raises(TypeError, match="scheme"):
        bits_per_element("h1b", 128)


def test_exact_bytes_scales_only_unquantized_parts():
    fp32 = kv_cache_bytes("llama-2-7b", 1000, scheme=FP16(), exact_bytes=4)
    assert fp32.total == 2 * kv_cache_bytes("llama-2-7b", 1000).total
    h16 = kv_cache_bytes("smollm2-135m", 300, 2, H1B(bits=64, window=10, sink=4, key_norms=True))
    h32 = kv_cache_bytes("smollm2-135m", 300, 2, H1B(bits=64, window=10, sink=4, key_norms=True), exact_bytes=4)
    for part in ("window", "sink"):
        assert h32.parts[part] == 2 * h16.parts[part] > 0
    for part in ("key_codes", "key_norms", "values", "value_scales_zeros"):
        assert h32.parts[part] == h16.parts[part] > 0
    with pytest.raises(ValueError, match="exact_bytes"):
        kv_cache_bytes("llama-2-7b", 10, exact_bytes=3)


# ---------------------------------------------------------------- sliding-window layers


def brute_sliding(shape: ModelShape, n: int, scheme, window: int | None) -> dict[str, int]:
    """One layer's bytes (all heads, batch 1), token by token: label every token by the full-attention
    rule (sink / compressed / window for H1B, quantized / residual for KIVI), then drop the oldest
    ``n - W + 1`` (KIVI: whole key groups only)."""
    d, t = shape.head_dim, (0 if window is None else max(0, n - window + 1))
    out: dict[str, int] = {}
    add = lambda part, b: out.__setitem__(part, out.get(part, 0) + b * shape.num_kv_heads)  # noqa: E731
    if isinstance(scheme, H1B):
        for pos in range(n):
            label = "sink" if pos < scheme.sink else "window" if pos >= n - scheme.window else "old"
            if pos < t:
                continue
            if label == "old":
                add("key_codes", scheme.bits // 8)
                add("key_norms", 2 if scheme.key_norms else 0)
                add("values", d * scheme.value_bits // 8)
                add("value_scales_zeros", 4 * (1 if scheme.group_size is None else d // scheme.group_size))
            else:
                add(label, 2 * d * 2)
        return out
    if isinstance(scheme, KIVI):
        per_layer = brute_kivi(dataclasses.replace(shape, num_layers=1), n, 1, scheme)
        g = scheme.group_size
        gone = t // g * g
        quantized = (n - scheme.residual) // g * g if n > scheme.residual else 0
        held_q = max(0, quantized - gone)
        scale = lambda part: per_layer[part] * held_q // quantized if quantized else 0  # noqa: E731
        parts = {p: scale(p) for p in ("key_codes", "key_scales_zeros", "values", "value_scales_zeros")}
        parts["residual"] = (n - max(quantized, gone)) * d * 2 * 2 * shape.num_kv_heads
        return parts
    kept = n - t if not isinstance(scheme, Eviction) else min(scheme.budget, n - t)
    return {"keys": kept * d * 2 * shape.num_kv_heads, "values": kept * d * 2 * shape.num_kv_heads}


@pytest.mark.parametrize("scheme", [FP16(), H1B(bits=16), H1B(bits=16, window=3, sink=2, key_norms=True),
                                    H1B(bits=16, window=20, sink=1), KIVI(bits=2, group_size=4, residual=3),
                                    KIVI(bits=4, group_size=4, residual=20), Eviction(5), Eviction(50)])
def test_sliding_layers_hold_only_their_window(scheme):
    """A sliding layer with window W holds its W - 1 newest tokens (DynamicSlidingWindowLayer's rule), split
    by the scheme's own rule; full layers of the same model hold everything."""
    windows = (None, 6, None, 9)
    shape = ModelShape(num_layers=4, num_kv_heads=2, head_dim=8, num_heads=4, sliding_windows=windows)
    for n in range(0, 25):
        got = kv_cache_bytes(shape, n, 1, scheme).parts
        want: dict[str, int] = {}
        for w in windows:
            for part, b in brute_sliding(dataclasses.replace(shape, num_layers=1, sliding_windows=None), n, scheme,
                                         w).items():
                want[part] = want.get(part, 0) + b
        assert {p: b for p, b in got.items() if b} == {p: b for p, b in want.items() if b}, (n, scheme)


def test_sliding_windows_follow_transformers_dynamic_cache():
    """The layers DynamicCache(config=...) makes DynamicSlidingWindowLayers are the sliding ones here."""
    import transformers as tf

    configs = [tf.MistralConfig(num_hidden_layers=3, sliding_window=8),
               tf.MistralConfig(num_hidden_layers=3, sliding_window=None),
               tf.Qwen2Config(num_hidden_layers=3, use_sliding_window=True, sliding_window=8, max_window_layers=1),
               tf.Qwen2Config(num_hidden_layers=3), tf.Gemma2Config(num_hidden_layers=3, sliding_window=8),
               tf.Gemma3TextConfig(num_hidden_layers=7, sliding_window=8), tf.LlamaConfig(num_hidden_layers=2)]
    for config in configs:
        dynamic = tf.DynamicCache(config=config)
        expected = tuple(getattr(layer, "sliding_window", None) if getattr(layer, "is_sliding", False) else None
                         for layer in dynamic.layers)
        windows = model_shape(config).sliding_windows
        assert (windows or (None,) * config.num_hidden_layers) == expected, type(config).__name__
    assert kv_cache_bytes(configs[0], 20).total == kv_cache_bytes(ModelShape(3, 8, 128, 32), 7).total


def test_shapes_with_unsupported_layer_types_are_refused_by_name():
    with pytest.raises(NotImplementedError, match="chunked attention"):
        model_shape(SimpleNamespace(num_hidden_layers=2, num_attention_heads=4, head_dim=8, attention_chunk_size=16))
    with pytest.raises(NotImplementedError, match="linear_attention"):
        model_shape(SimpleNamespace(num_hidden_layers=2, num_attention_heads=4, head_dim=8,
                                    layer_types=["full_attention", "linear_attention"]))
    with pytest.raises(ValueError, match="one entry per layer"):
        ModelShape(2, 2, 8, 2, sliding_windows=(4,))
