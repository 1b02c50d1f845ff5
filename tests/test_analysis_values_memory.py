"""Unit tests of analysis.values and analysis.memory_table on synthetic tensors, against brute force."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
from scipy import stats

from h1bkv_lite import SimHashSketcher, h1b_attention, quantize_values
from h1bkv_lite.analysis.memory_table import (
    PAPER_60M_SHAPE,
    PART_GROUPS,
    allocate_cache,
    cache_parts,
    compare_with_paper,
    compression_cap,
    default_schemes,
    measure_compressed_bytes,
    paper_table,
    size_sweep,
)
from h1bkv_lite.analysis.values import (
    attention_output_errors,
    channel_stats,
    error_summary,
    outlier_channels,
    pareto_front,
    predicted_relative_error,
    quantization_grid,
    reconstruction_errors,
    relative_errors,
    scheme_label,
    storage_bits_per_element,
    vector_stats,
)
from h1bkv_lite.memory import FP16, H1B, KIVI, Eviction, LowRankKeys, ModelShape, compression_ratio, kv_cache_bytes

MiB = 2**20


def values_with_outlier(B=2, H=3, T=40, D=16, seed=0, channel=5, head=1):
    """Gaussian values with one heavy-tailed channel: rare large spikes in (head, channel)."""
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(B, H, T, D, generator=g)
    spikes = (torch.rand(B, T, generator=g) < 0.1).float() * 20
    v[:, head, :, channel] += spikes
    return v


# ------------------------------------------------------------------ values: channel statistics


def test_channel_stats_match_scipy():
    v = values_with_outlier()
    df = channel_stats({3: v, 7: v * 2})
    assert list(df.columns) == ["layer", "head", "channel", "mean", "std", "absmax", "kurtosis", "absmax_ratio"]
    assert len(df) == 2 * 3 * 16
    for layer, scale in ((3, 1), (7, 2)):
        for h in range(3):
            x = (v[:, h].reshape(-1, 16) * scale).double().numpy()
            rows = df[(df.layer == layer) & (df["head"] == h)].sort_values("channel")
            np.testing.assert_allclose(rows["mean"], x.mean(0), rtol=1e-10, atol=1e-12)
            np.testing.assert_allclose(rows["std"], x.std(0), rtol=1e-10)
            np.testing.assert_allclose(rows["kurtosis"], stats.kurtosis(x, axis=0, fisher=True, bias=True), rtol=1e-8)
            absmax = np.abs(x).max(0)
            np.testing.assert_allclose(rows["absmax"], absmax, rtol=1e-6)
            np.testing.assert_allclose(rows["absmax_ratio"], absmax / np.median(absmax), rtol=1e-6)


def test_channel_stats_constant_channel_has_nan_kurtosis():
    v = torch.randn(1, 1, 10, 8)
    v[..., 2] = 1.5
    df = channel_stats(v)
    assert math.isnan(df.loc[df.channel == 2, "kurtosis"].item())
    assert df.loc[df.channel != 2, "kurtosis"].notna().all()


@pytest.mark.parametrize("by", ["kurtosis", "absmax", "absmax_ratio"])
def test_outlier_channels_find_the_planted_channel(by):
    v = values_with_outlier(channel=5, head=1)
    top = outlier_channels({0: v}, top=3, by=by)
    assert len(top) == 3
    assert (top.loc[0, "head"], top.loc[0, "channel"]) == (1, 5)
    assert top[by].is_monotonic_decreasing
    # a precomputed table is reused as is
    pd.testing.assert_frame_equal(outlier_channels(channel_stats(v), top=3, by=by), top)


# ------------------------------------------------------------------ values: reconstruction errors


def brute_relative_error(x: np.ndarray, bits: int, g: int) -> float:
    """Ideal float64 affine quantization (no fp16 metadata) of one vector, group by group."""
    levels = 2**bits - 1
    out = np.empty_like(x)
    for s in range(0, len(x), g):
        grp = x[s : s + g]
        lo, hi = grp.min(), grp.max()
        step = (hi - lo) / levels
        out[s : s + g] = lo if step == 0 else lo + np.round((grp - lo) / step) * step
    return float(np.linalg.norm(x - out) / np.linalg.norm(x))


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("group_size", [None, 4, 8])
def test_relative_errors_match_per_vector_brute_force(bits, group_size):
    v = values_with_outlier(B=1, H=2, T=12, D=16)
    got = relative_errors(v, bits, group_size)
    assert got.shape == (1, 2, 12) and got.dtype == torch.float32
    g = 16 if group_size is None else group_size
    for h in range(2):
        for t in range(12):
            x = v[0, h, t]
            # exact: the library's own quantizer applied to this one vector
            x_hat = quantize_values(x, bits, group_size).dequantize()
            exact = ((x - x_hat).norm() / x.norm()).item()
            assert got[0, h, t].item() == pytest.approx(exact, rel=1e-5)
            # close to ideal float64 rounding: fp16 scales/zeros move the grid only slightly
            ideal = brute_relative_error(x.double().numpy(), bits, g)
            assert got[0, h, t].item() == pytest.approx(ideal, rel=0.05, abs=2e-3)


def test_relative_errors_zero_vector_and_bound():
    v = torch.randn(3, 5, 32)
    v[1, 2] = 0
    err = relative_errors(v, 4)
    assert err[1, 2] == 0
    # every element is within scale/2 of its reconstruction
    qt = quantize_values(v, 4)
    bound = (qt.scale.float().squeeze(-1) / 2) * math.sqrt(32) / v.norm(dim=-1).clamp_min(1e-12)
    assert bool((err <= bound + 1e-6).all())


def test_errors_fall_with_bits_and_with_smaller_groups():
    v = values_with_outlier(B=2, H=3, T=64, D=32)
    means = {(b, g): relative_errors(v, b, g).mean().item() for b in (2, 4, 8) for g in (None, 16, 8, 4)}
    for g in (None, 16, 8, 4):
        assert means[(2, g)] > means[(4, g)] > means[(8, g)]
    for b in (2, 4, 8):
        assert means[(b, None)] > means[(b, 16)] > means[(b, 8)] > means[(b, 4)]


def test_vector_stats_brute_force():
    v = torch.randn(2, 3, 7, 8)
    v[0, 0, 0] = 0
    s = vector_stats(v)
    x = v.double().numpy()
    rms = np.sqrt((x**2).mean(-1))
    want = np.where(rms > 0, (x.max(-1) - x.min(-1)) / np.where(rms > 0, rms, 1), 0)
    np.testing.assert_allclose(s["range_to_rms"].numpy(), want, rtol=1e-6)
    np.testing.assert_array_equal(s["top_channel"].numpy(), np.abs(x).argmax(-1))


def test_predicted_relative_error_matches_gaussian_vectors():
    v = torch.randn(4000, 128, generator=torch.Generator().manual_seed(1))
    ratio = vector_stats(v)["range_to_rms"].numpy()
    for bits in (4, 8):
        measured = relative_errors(v, bits).numpy()
        assert measured.mean() == pytest.approx(predicted_relative_error(ratio, bits).mean(), rel=0.1)


def test_storage_bits_and_labels():
    assert storage_bits_per_element(4, None, 64) == 4.5
    assert storage_bits_per_element(2, 8, 64) == 6.0
    assert storage_bits_per_element(8, 32, 128) == 9.0
    assert scheme_label(None) == scheme_label(64, 64) == "per-token"
    assert scheme_label(16, 64) == "group 16"


def test_reconstruction_errors_table_rows_map_back_to_vectors():
    v = values_with_outlier(B=2, H=3, T=10, D=16)
    df = reconstruction_errors({4: v}, bits=(2, 4), group_sizes=(None, 8))
    assert len(df) == 2 * 3 * 10 * 4
    assert set(df.scheme) == {"per-token", "group 8"} and set(df.group_size) == {16, 8}
    for _, row in df.sample(12, random_state=0).iterrows():
        g = None if row.scheme == "per-token" else int(row.group_size)
        x = v[int(row.batch), int(row["head"]), int(row.token)]
        assert row.rel_error == pytest.approx(relative_errors(x, int(row.bits), g).item(), rel=1e-6)
        assert row.range_to_rms == pytest.approx(vector_stats(x)["range_to_rms"].item(), rel=1e-6)
        assert row.bits_per_element == storage_bits_per_element(int(row.bits), g, 16)
    # a subsample picks the same vectors for every scheme
    sub = reconstruction_errors(v, bits=(2, 8), group_sizes=(None, 4), max_vectors=7, seed=3)
    keys = sub.groupby(["bits", "scheme"]).apply(lambda d: tuple(zip(d.batch, d["head"], d.token)), include_groups=False)
    assert len(set(keys)) == 1 and len(keys.iloc[0]) == 7


def test_error_summary_matches_pandas():
    df = reconstruction_errors(values_with_outlier(T=20), bits=(4,), group_sizes=(None, 8))
    s = error_summary(df)
    for _, row in s.iterrows():
        sel = df[(df.bits == row.bits) & (df.group_size == row.group_size)].rel_error
        assert row.n == len(sel)
        assert row["mean"] == pytest.approx(sel.mean())
        assert row.p90 == pytest.approx(np.quantile(sel, 0.9))
        assert row["max"] == sel.max()


def test_pareto_front_brute_force():
    rng = np.random.default_rng(0)
    df = pd.DataFrame({"bits_per_element": rng.integers(1, 10, 40).astype(float), "mean": rng.random(40)})
    front = pareto_front(df)
    for i, row in df.iterrows():
        others = df.drop(index=i)
        dominated = (
            ((others.bits_per_element <= row.bits_per_element) & (others["mean"] < row["mean"]))
            | ((others.bits_per_element < row.bits_per_element) & (others["mean"] <= row["mean"]))
        ).any()
        on_front = ((front.bits_per_element == row.bits_per_element) & (front["mean"] == row["mean"])).any()
        assert on_front != dominated
    assert front.bits_per_element.is_monotonic_increasing and front["mean"].is_monotonic_decreasing
    with pytest.raises(ValueError, match="cost"):
        pareto_front(df, cost="cost")


def test_quantization_grid_holds_every_reconstruction():
    x = torch.randn(16, generator=torch.Generator().manual_seed(2)) * 3
    x[3] = 12.0
    for bits, g in ((2, None), (2, 4), (4, 8)):
        grid = quantization_grid(x, bits, g)
        gs = 16 if g is None else g
        assert len(grid) == (16 // gs) * 2**bits
        x_hat = quantize_values(x, bits, g).dequantize()
        for c in range(16):
            levels = grid[grid.group == c // gs].value.to_numpy()
            assert np.isclose(levels, x_hat[c].item(), rtol=0, atol=1e-6).any()
            first, last = grid[grid.group == c // gs][["first_channel", "last_channel"]].iloc[0]
            assert first <= c <= last
        # the grid spans the group's range
        for grp, levels in grid.groupby("group").value:
            chunk = x[grp * gs : (grp + 1) * gs]
            assert levels.min() <= chunk.min().item() and levels.max() >= chunk.max().item() - 1e-6


def test_attention_output_errors_match_manual_attention():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 9, 16, generator=g)
    k = torch.randn(2, 2, 9, 16, generator=g)
    v = values_with_outlier(B=2, H=2, T=9, D=16)
    df = attention_output_errors({0: (q, k, v), 5: (q, k, v * 3)}, bits=(2, 8), group_sizes=(None, 4))
    assert len(df) == 2 * 2 * 2
    mask = torch.ones(9, 9).tril().bool()
    logits = q @ k.repeat_interleave(2, 1).transpose(-1, -2) / 4
    p = torch.softmax(logits.masked_fill(~mask, float("-inf")), -1)
    for _, row in df.iterrows():
        vv = v * (3 if row.layer == 5 else 1)
        gsz = None if row.scheme == "per-token" else int(row.group_size)
        v_hat = quantize_values(vv, int(row.bits), gsz).dequantize()
        ref = p @ vv.repeat_interleave(2, 1)
        out = p @ v_hat.repeat_interleave(2, 1)
        rel = ((out - ref).norm(dim=-1) / ref.norm(dim=-1)).flatten()
        assert row["mean"] == pytest.approx(rel.mean().item(), rel=1e-4)
        assert row["max"] == pytest.approx(rel.max().item(), rel=1e-4)
        assert row.value_mean == pytest.approx(relative_errors(vv, int(row.bits), gsz).mean().item(), rel=1e-5)
        assert row.effective_keys == pytest.approx((1 / p.pow(2).sum(-1)).mean().item(), rel=1e-5)
        # the same as calling h1b_attention with quantized values directly
        direct = h1b_attention(q, k, vv, sketcher=SimHashSketcher(16, 8), score="exact", value_bits=int(row.bits), group_size=gsz)
        assert torch.allclose(direct, out, atol=1e-5)
    # averaging over keys shrinks the error below the values' own (first query sees one key: equal)
    assert (df["mean"] < df["value_mean"]).all()
    # computed on a named device (here the host again): the same table, the captures untouched
    before = [t.clone() for t in (q, k, v)]
    moved = attention_output_errors({0: (q, k, v), 5: (q, k, v * 3)}, bits=(2, 8), group_sizes=(None, 4),
                                    device=torch.device("cpu"))
    pd.testing.assert_frame_equal(moved, df)
    assert all(torch.equal(a, b) for a, b in zip(before, (q, k, v)))


@pytest.mark.parametrize(
    "call,exc,match",
    [
        (lambda v: channel_stats({}), ValueError, "values is empty"),
        (lambda v: channel_stats(v[0]), ValueError, r"values\[0\] must have 4 dims"),
        (lambda v: channel_stats([v]), TypeError, "values must be a tensor"),
        (lambda v: outlier_channels(v, top=0), ValueError, "top"),
        (lambda v: outlier_channels(v, by="max"), ValueError, "by"),
        (lambda v: relative_errors(v, bits=3), ValueError, "bits"),
        (lambda v: reconstruction_errors(v, bits=(4, 5)), ValueError, "bits"),
        (lambda v: reconstruction_errors(v, group_sizes=(6,)), ValueError, "group_size must divide head_dim=16"),
        (lambda v: reconstruction_errors(v, group_sizes=()), ValueError, "group_sizes"),
        (lambda v: reconstruction_errors(v, max_vectors=0), ValueError, "max_vectors"),
        (lambda v: error_summary(pd.DataFrame({"bits": [4]})), ValueError, "rel_error"),
        (lambda v: error_summary(v), TypeError, "errors"),
        (lambda v: quantization_grid(v), ValueError, "x must have 1 dims"),
        (lambda v: attention_output_errors({}), ValueError, "captures"),
        (lambda v: attention_output_errors({0: v}), ValueError, r"captures\[0\]"),
        (lambda v: storage_bits_per_element(4, 128, 64), ValueError, "group_size"),
        (lambda v: predicted_relative_error(1.0, 1), ValueError, "bits"),
    ],
)
def test_values_validation(call, exc, match):
    with pytest.raises(exc, match=match):
        call(torch.randn(1, 2, 4, 16))


# ------------------------------------------------------------------ memory_table: the paper's table


def test_paper_table_holds_the_papers_numbers():
    t = paper_table()
    assert list(zip(t.model, t.method, t.paper_mb)) == [
        ("7B", "FP16", 4300.2),
        ("7B", "KIVI-2", 537.5),
        ("7B", "SparseLLM (eviction)", 537.5),
        ("7B", "Loki", 2150.1),
        ("7B", "H1B-KV", 58.7),
        ("60M", "FP16", 67.1),
        ("60M", "H1B-KV", 5.3),
    ]
    assert (t.context == 8192).all() and t.source.str.contains("2510.05529").all()


def test_compare_with_paper_verdicts():
    df = compare_with_paper().set_index(["model", "method"])
    fp16 = df.loc[("7B", "FP16")]
    assert fp16.our_mb == 4 * 2**30 / 1e6
    assert abs(fp16.ratio - 1) < 0.002 and fp16.verdict.startswith("reproduced within 0.12%")
    kivi = df.loc[("7B", "KIVI-2")]
    assert kivi.verdict.startswith("not reproduced") and "FP16 figure / 8" in kivi.explanation
    assert "codes alone" in kivi.explanation
    assert df.loc[("7B", "SparseLLM (eviction)")].verdict.startswith("reproduced")
    loki = df.loc[("7B", "Loki")]
    assert loki.our_mb > fp16.our_mb and "FP16 figure / 2" in loki.explanation
    h1b = df.loc[("7B", "H1B-KV")]
    assert h1b.verdict == "impossible: 4-bit values alone are 536.9 MB"
    assert h1b.floor_mb == 512 * MiB / 1e6 and h1b.our_mb == 800 * MiB / 1e6
    assert h1b.paper_bits == pytest.approx(56, abs=0.1) and h1b.our_bits == 800
    assert h1b.paper_x > compression_cap(4, 128) > h1b.our_x
    assert df.loc[("60M", "FP16")].verdict.startswith("reproduced")
    small = df.loc[("60M", "H1B-KV")]
    assert small.verdict.startswith("impossible") and small.paper_x > 8
    # the floor does not depend on the inferred 60M shape: fp16 values / 4
    assert small.floor_mb == pytest.approx(df.loc[("60M", "FP16")].our_mb / 2 / 4)


def test_compression_cap_bounds_every_h1b_configuration():
    assert compression_cap(4, 128, scales=False) == 8.0
    assert compression_cap(4, 128) == pytest.approx(128 / 17)
    assert compression_cap(4, 64) == pytest.approx(64 / 9)
    assert compression_cap(2, 64, group_size=16) == pytest.approx(32 * 64 / (128 + 128))
    for cfg, d in (("llama-2-7b", 128), ("smollm2-135m", 64)):
        for b in (8, 64, 256, 4096):
            for n in (1, 8192, 131072):
                assert compression_ratio(cfg, n, H1B(bits=b)) < compression_cap(4, d)
    with pytest.raises(ValueError, match="value_bits"):
        compression_cap(3)
    with pytest.raises(ValueError, match="group_size"):
        compression_cap(4, 64, group_size=48)


def test_compare_with_paper_validation():
    with pytest.raises(ValueError, match="seq_len"):
        compare_with_paper(seq_len=0)
    with pytest.raises(ValueError, match="tolerance"):
        compare_with_paper(tolerance=2)


# ------------------------------------------------------------------ memory_table: sweeps and parts


def test_size_sweep_and_parts_agree_with_kv_cache_bytes():
    schemes = default_schemes()
    models = ["llama-2-7b", "smollm2-135m"]
    sweep = size_sweep(models, schemes, [1024, 8192])
    assert len(sweep) == 2 * len(schemes) * 2
    for _, r in sweep.iterrows():
        want = kv_cache_bytes(r.model, r.seq_len, scheme=schemes[r.scheme])
        assert r["bytes"] == want.total and r.bytes_per_token == want.per_token
        assert r.ratio_vs_fp16 == compression_ratio(r.model, r.seq_len, schemes[r.scheme])
    parts = cache_parts(models, schemes, 8192)
    totals = parts.groupby(["model", "scheme"])["bytes"].sum()
    for (m, s), total in totals.items():
        assert total == kv_cache_bytes(m, 8192, scheme=schemes[s]).total
    assert set(parts.part) <= set(PART_GROUPS.values())
    h1b = parts[(parts.model == "llama-2-7b") & (parts.scheme == "H1B b=256")].set_index("part")["bytes"]
    assert h1b.to_dict() == {"keys": 256 * MiB, "values": 512 * MiB, "scales/zeros": 32 * MiB}
    named = size_sweep({"paper 60M": PAPER_60M_SHAPE}, {"FP16": FP16()}, [8192])
    assert named.model.item() == "paper 60M" and named["bytes"].item() == 64 * MiB


def test_sweep_validation():
    with pytest.raises(ValueError, match="seq_lens"):
        size_sweep(["llama-2-7b"], {"FP16": FP16()}, [])
    with pytest.raises(ValueError, match="seq_lens"):
        size_sweep(["llama-2-7b"], {"FP16": FP16()}, [0])
    with pytest.raises(TypeError, match=r"schemes\['x'\]"):
        cache_parts(["llama-2-7b"], {"x": "fp16"})
    with pytest.raises(ValueError, match="unknown preset"):
        cache_parts(["llama-7b"], {"FP16": FP16()})


# ------------------------------------------------------------------ memory_table: allocated caches


MEASURED = [
    FP16(),
    H1B(bits=64),
    H1B(bits=16, value_bits=2, group_size=4, key_norms=True, window=5),
    H1B(bits=256, value_bits=8, window=1000),  # window longer than the sequence
    KIVI(bits=2, group_size=8, residual=16),
    KIVI(bits=4, group_size=4, residual=0),
    KIVI(bits=2, group_size=8, residual=1000),  # nothing quantized
    Eviction(20),
    Eviction(1000),
    LowRankKeys(4),
]
HAS_SINK = "sink" in H1B.__dataclass_fields__
if HAS_SINK:  # attention-sink tokens kept exact, if the accounting knows them
    MEASURED += [H1B(bits=32, window=5, sink=3, key_norms=True), H1B(bits=8, sink=1000), H1B(bits=64, window=30, sink=20)]


@pytest.mark.parametrize("scheme", MEASURED, ids=repr)
@pytest.mark.parametrize("shape", [(2, 1, 3, 37, 16), (1, 2, 2, 64, 32), (3, 2, 41, 8)])
def test_measured_bytes_equal_the_prediction_part_by_part(scheme, shape):
    g = torch.Generator().manual_seed(0)
    k, v = torch.randn(*shape, generator=g), torch.randn(*shape, generator=g)
    measured = measure_compressed_bytes(k, v, scheme)
    L, B, H, T, D = shape if len(shape) == 5 else (1, *shape)
    predicted = kv_cache_bytes(ModelShape(L, H, D, H), T, B, scheme)
    assert measured.parts == predicted.parts
    assert measured.total == predicted.total and measured.seq_len == T and measured.batch == B


def test_allocated_h1b_cache_holds_the_right_tensors():
    g = torch.Generator().manual_seed(1)
    k, v = torch.randn(2, 1, 3, 30, 16, generator=g), torch.randn(2, 1, 3, 30, 16, generator=g)
    parts = allocate_cache(k, v, H1B(bits=32, value_bits=4, key_norms=True, window=6), seed=7)
    (codes,) = parts["key_codes"]
    assert codes.dtype == torch.uint8 and codes.shape == (2, 1, 3, 24, 4)
    assert torch.equal(codes, SimHashSketcher(16, 32, seed=7).sketch(k[..., :24, :]))
    (norms,) = parts["key_norms"]
    assert norms.dtype == torch.float16 and torch.allclose(norms.float(), k[..., :24, :].norm(dim=-1), rtol=1e-3)
    (packed,) = parts["values"]
    assert packed.dtype == torch.uint8 and packed.shape == (2, 1, 3, 24, 8)
    assert torch.equal(packed, quantize_values(v[..., :24, :], 4).data)
    wk, wv = parts["window"]
    assert torch.equal(wk, k[..., 24:, :].half()) and torch.equal(wv, v[..., 24:, :].half())
    assert parts["projection"] == []


@pytest.mark.skipif(not HAS_SINK, reason="memory.H1B has no sink field")
def test_allocated_h1b_sink_tokens_are_the_first_ones():
    g = torch.Generator().manual_seed(3)
    k, v = torch.randn(1, 1, 2, 20, 8, generator=g), torch.randn(1, 1, 2, 20, 8, generator=g)  # [L, B, H, T, D]
    parts = allocate_cache(k, v, H1B(bits=16, window=4, sink=2))
    sk, sv = parts["sink"]
    assert torch.equal(sk, k[..., :2, :].half()) and torch.equal(sv, v[..., :2, :].half())
    assert torch.equal(parts["key_codes"][0], SimHashSketcher(8, 16).sketch(k[..., 2:16, :]))
    assert torch.equal(parts["window"][0], k[..., 16:, :].half())


def test_allocated_kivi_and_loki():
    g = torch.Generator().manual_seed(2)
    k, v = torch.randn(1, 2, 40, 8, generator=g), torch.randn(1, 2, 40, 8, generator=g)
    kivi = allocate_cache(k, v, KIVI(bits=2, group_size=4, residual=10))
    (kc,) = kivi["key_codes"]
    assert kc.shape == (1, 1, 2, 8, 7)  # 28 tokens per channel, 2 bits: 7 bytes
    assert kivi["residual"][0].shape == (1, 1, 2, 12, 8)
    loki = allocate_cache(k, v, LowRankKeys(3))
    (basis,) = loki["projection"]
    assert basis.shape == (1, 2, 8, 3) and basis.dtype == torch.float16
    b = basis[0, 0].double()
    assert torch.allclose(b.T @ b, torch.eye(3, dtype=torch.float64), atol=2e-3)
    # the basis spans the top principal directions: brute force via SVD
    x = k[0, 0].double() - k[0, 0].double().mean(0)
    top = torch.linalg.svd(x, full_matrices=False).Vh[:3].T
    assert torch.allclose(torch.linalg.svdvals(top.T @ b), torch.ones(3, dtype=torch.float64), atol=5e-3)


@pytest.mark.parametrize(
    "args,exc,match",
    [
        (dict(k=torch.randn(4, 8)), ValueError, "k must be"),
        (dict(v=torch.randn(1, 2, 5, 8)), ValueError, "v must have k's shape"),
        (dict(scheme="h1b"), TypeError, "scheme"),
        (dict(scheme=LowRankKeys(9)), ValueError, "rank"),
        (dict(scheme=H1B(group_size=3)), ValueError, "group_size"),
        (dict(scheme=KIVI(group_size=3)), ValueError, "group_size"),
        (dict(k=torch.full((1, 2, 4, 8), float("nan"))), ValueError, "k contains NaN"),
    ],
)
def test_measure_validation(args, exc, match):
    kw = dict(k=torch.randn(1, 2, 4, 8), v=torch.randn(1, 2, 4, 8), scheme=FP16()) | args
    if "k" in args:
        kw["v"] = torch.randn(*args["k"].shape)
    with pytest.raises(exc, match=match):
        measure_compressed_bytes(**kw)
