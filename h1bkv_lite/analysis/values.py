"""Value vectors and what low-bit affine quantization does to them: statistics returned as DataFrames.

Inputs are value tensors as a model's attention sees them, ``v [B, H, T, D]`` (batch, kv heads, tokens,
head_dim) for one layer, or a mapping ``{layer: v}`` (as built from
:func:`h1bkv_lite.capture.capture_attention_inputs`). Every function returns a long-format pandas
DataFrame (one row per channel, vector or scheme) ready for seaborn.

A *scheme* is ``(bits, group_size)`` as in :func:`h1bkv_lite.quantize_values`: ``group_size=None`` is the
paper's per-token form (one fp16 scale and one fp16 zero per value vector); an int quantizes groups of that
many consecutive channels. DataFrames carry ``group_size`` as the number of channels per group (``D`` for
per-token) and a readable ``scheme`` label ("per-token", "group 16").

Why a dominant channel hurts per-token quantization: every element of a vector is rounded to a grid of
step ``s = (max - min) / (2**bits - 1)``, so the rounding error is about ``s / sqrt(12)`` per element and
the relative error of the vector is about ``range / ((2**bits - 1) * sqrt(12) * rms)``
(:func:`predicted_relative_error`). One large channel inflates ``range / rms`` (column ``range_to_rms``)
and with it the error of every other channel of that vector.
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import numpy as np
import pandas as pd
import torch

from .._validation import check_choice, check_int, check_tensor
from ..attention import h1b_attention
from ..quant import VALUE_BITS, quantize_values
from ..sketch import SimHashSketcher

__all__ = [
    "scheme_label",
    "storage_bits_per_element",
    "predicted_relative_error",
    "channel_stats",
    "outlier_channels",
    "relative_errors",
    "vector_stats",
    "reconstruction_errors",
    "error_summary",
    "pareto_front",
    "quantization_grid",
    "attention_output_errors",
]

OUTLIER_KEYS = ("kurtosis", "absmax", "absmax_ratio")


def scheme_label(group_size: int | None, head_dim: int | None = None) -> str:
    """"per-token" for ``None`` (or ``group_size == head_dim``), else "group <g>"."""
    if group_size is None or group_size == head_dim:
        return "per-token"
    return f"group {group_size}"


def storage_bits_per_element(bits: int, group_size: int | None, head_dim: int) -> float:
    """Stored bits per value element, fp16 scale + zero (32 bits per group) included.

    ``bits + 32 / group_size`` (``group_size=None``: ``head_dim``); e.g. 4-bit per-token at D=64 is 4.5,
    2-bit in groups of 8 is 6.0 -- finer groups pay for their accuracy in metadata.
    """
    check_choice("bits", bits, VALUE_BITS)
    check_int("head_dim", head_dim, low=1)
    g = head_dim if group_size is None else check_int("group_size", group_size, low=1, high=head_dim)
    return bits + 32 / g


def predicted_relative_error(range_to_rms, bits: int):
    """Uniform-rounding model of per-vector relative error: ``range_to_rms / ((2**bits - 1) * sqrt(12))``.

    ``range_to_rms`` float or array (see :func:`vector_stats`); returns the same kind. Exact in the limit
    of many levels when rounding errors are uniform; it ignores the two grid end points, which are exact.
    """
    check_choice("bits", bits, VALUE_BITS)
    return np.asarray(range_to_rms, dtype=np.float64) / (((1 << bits) - 1) * math.sqrt(12))


def channel_stats(values) -> pd.DataFrame:
    """Per (layer, head, channel) statistics over all tokens of all sequences.

    Columns: ``layer, head, channel, mean, std, absmax, kurtosis`` (excess, Fisher: 0 for a Gaussian;
    NaN for a constant channel), ``absmax_ratio`` (the channel's absmax over the median absmax of its
    head's channels: > 3 marks an outlier channel).
    """
    frames = []
    for layer, v in _layers(values).items():
        x = v.double().transpose(0, 1).reshape(v.shape[1], -1, v.shape[-1])  # [H, B*T, D]
        mean = x.mean(1)
        centred = x - mean.unsqueeze(1)
        m2 = (centred**2).mean(1)
        m4 = (centred**4).mean(1)
        kurt = torch.where(m2 > 0, m4 / m2.clamp_min(1e-300) ** 2 - 3, torch.full_like(m2, float("nan")))
        absmax = x.abs().amax(1)
        median = absmax.quantile(0.5, dim=-1, keepdim=True)  # torch.median takes the lower middle
        ratio = absmax / median.clamp_min(1e-300)
        H, D = absmax.shape
        frames.append(
            pd.DataFrame(
                {
                    "layer": layer,
                    "head": np.repeat(np.arange(H), D),
                    "channel": np.tile(np.arange(D), H),
                    "mean": mean.flatten().cpu().numpy(),
                    "std": m2.sqrt().flatten().cpu().numpy(),
                    "absmax": absmax.flatten().cpu().numpy(),
                    "kurtosis": kurt.flatten().cpu().numpy(),
                    "absmax_ratio": ratio.flatten().cpu().numpy(),
                }
            )
        )
    return pd.concat(frames, ignore_index=True)


def outlier_channels(values, top: int = 8, by: str = "absmax_ratio") -> pd.DataFrame:
    """The ``top`` channels with the largest ``by`` ("kurtosis", "absmax" or "absmax_ratio") over all layers.

    ``values`` as for :func:`channel_stats`, or a DataFrame it returned (reused, not recomputed).
    """
    check_int("top", top, low=1)
    check_choice("by", by, OUTLIER_KEYS)
    stats = values if isinstance(values, pd.DataFrame) else channel_stats(values)
    return stats.sort_values(by, ascending=False, na_position="last").head(top).reset_index(drop=True)


def relative_errors(v: torch.Tensor, bits: int = 4, group_size: int | None = None) -> torch.Tensor:
    """Per-vector ``|v - v_hat| / |v|`` after quantize + dequantize: ``v [..., D]`` -> float32 ``[...]``.

    A zero vector reconstructs exactly and gets 0.
    """
    check_tensor("v", v, min_ndim=1)
    v_hat = quantize_values(v, bits, group_size).dequantize()
    err = (v.double() - v_hat.double()).norm(dim=-1)
    norm = v.double().norm(dim=-1)
    return torch.where(norm > 0, err / norm.clamp_min(1e-300), err).float()


def vector_stats(v: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-vector ``range_to_rms`` (``(max - min) / rms`` over the channels) and ``top_channel``
    (``argmax |v|``): ``v [..., D]`` -> two ``[...]`` tensors (float32, int64). A zero vector has ratio 0."""
    check_tensor("v", v, min_ndim=1)
    x = v.double()
    rms = x.pow(2).mean(-1).sqrt()
    spread = x.amax(-1) - x.amin(-1)
    ratio = torch.where(rms > 0, spread / rms.clamp_min(1e-300), torch.zeros_like(rms))
    return {"range_to_rms": ratio.float(), "top_channel": x.abs().argmax(-1)}


def reconstruction_errors(
    values,
    bits: Iterable[int] = VALUE_BITS,
    group_sizes: Iterable[int | None] = (None, 32, 16, 8),
    *,
    max_vectors: int | None = None,
    seed: int = 0,
) -> pd.DataFrame:
    """Relative reconstruction error of every value vector under every scheme.

    values: ``v [B, H, T, D]`` or ``{layer: v}``. ``max_vectors``: per layer, a random subset of that many
    (batch, head, token) vectors (drawn with ``seed``; the same vectors for every scheme); ``None`` = all.

    Columns: ``layer, batch, head, token, bits, group_size`` (channels per group), ``scheme``,
    ``bits_per_element`` (storage, metadata included), ``rel_error``, ``range_to_rms``, ``top_channel``.
    """
    bits = _bits_list(bits)
    groups = list(group_sizes)
    if not groups:
        raise ValueError("group_sizes must name at least one group size (None = per-token)")
    if max_vectors is not None:
        check_int("max_vectors", max_vectors, low=1)
    gen = torch.Generator().manual_seed(check_int("seed", seed, low=0))
    frames = []
    for layer, v in _layers(values).items():
        B, H, T, D = v.shape
        for g in groups:
            _check_group(g, D)
        flat = v.reshape(-1, D)
        index = torch.arange(flat.shape[0])
        if max_vectors is not None and max_vectors < flat.shape[0]:
            index = torch.randperm(flat.shape[0], generator=gen)[:max_vectors].sort().values
        x = flat[index]
        stats = vector_stats(x)
        b_idx, rest = index // (H * T), index % (H * T)
        base = {
            "layer": layer,
            "batch": b_idx.cpu().numpy(),
            "head": (rest // T).cpu().numpy(),
            "token": (rest % T).cpu().numpy(),
        }
        for nb in bits:
            for g in groups:
                frames.append(
                    pd.DataFrame(
                        {
                            **base,
                            "bits": nb,
                            "group_size": D if g is None else g,
                            "scheme": scheme_label(g, D),
                            "bits_per_element": storage_bits_per_element(nb, g, D),
                            "rel_error": relative_errors(x, nb, g).cpu().numpy(),
                            "range_to_rms": stats["range_to_rms"].cpu().numpy(),
                            "top_channel": stats["top_channel"].cpu().numpy(),
                        }
                    )
                )
    return pd.concat(frames, ignore_index=True)


def error_summary(errors: pd.DataFrame, by=("bits", "group_size", "scheme"), column: str = "rel_error") -> pd.DataFrame:
    """Mean, median, 90th and 99th percentile and max of ``column`` per ``by`` group (``n`` = rows)."""
    if not isinstance(errors, pd.DataFrame):
        raise TypeError(f"errors must be a pandas DataFrame, got {type(errors).__name__}")
    by = [by] if isinstance(by, str) else list(by)
    missing = [c for c in [*by, column] if c not in errors.columns]
    if missing:
        raise ValueError(f"errors lacks column(s) {missing}; has {list(errors.columns)}")
    if errors.empty:
        raise ValueError("errors is empty; nothing to summarise")
    grouped = errors.groupby(by, sort=True)[column]
    out = grouped.agg(
        n="size",
        mean="mean",
        median="median",
        p90=lambda s: s.quantile(0.9),
        p99=lambda s: s.quantile(0.99),
        max="max",
    )
    return out.reset_index()


def pareto_front(summary: pd.DataFrame, cost: str = "bits_per_element", error: str = "mean") -> pd.DataFrame:
    """Rows of ``summary`` not dominated by another row (one with lower-or-equal ``cost`` and lower ``error``,
    or lower ``cost`` and equal ``error``), sorted by ``cost``: the schemes worth their storage."""
    if not isinstance(summary, pd.DataFrame):
        raise TypeError(f"summary must be a pandas DataFrame, got {type(summary).__name__}")
    missing = [c for c in (cost, error) if c not in summary.columns]
    if missing:
        raise ValueError(f"summary lacks column(s) {missing}; has {list(summary.columns)}")
    c, e = summary[cost].to_numpy(), summary[error].to_numpy()
    dominated = [
        bool(np.any(((c <= c[i]) & (e < e[i])) | ((c < c[i]) & (e <= e[i])))) for i in range(len(summary))
    ]
    return summary[~np.array(dominated, dtype=bool)].sort_values(cost).reset_index(drop=True)


def quantization_grid(x: torch.Tensor, bits: int = 4, group_size: int | None = None) -> pd.DataFrame:
    """The grid one vector ``x [D]`` is rounded to: one row per (group, level).

    Columns: ``group``, ``first_channel``, ``last_channel`` (inclusive), ``level`` (0 .. 2**bits - 1),
    ``value`` (``zero + level * scale`` in float32, what a code dequantizes to). A constant group has
    ``scale = 0``: all its levels coincide.
    """
    check_tensor("x", x, ndim=1)
    qt = quantize_values(x, bits, group_size)
    g = qt.group_size
    n_levels = 1 << bits
    levels = np.arange(n_levels)
    rows = []
    for i, (s, z) in enumerate(zip(qt.scale.float().tolist(), qt.zero.float().tolist())):
        rows.append(
            pd.DataFrame(
                {
                    "group": i,
                    "first_channel": i * g,
                    "last_channel": (i + 1) * g - 1,
                    "level": levels,
                    "value": (np.float32(z) + levels.astype(np.float32) * np.float32(s)),
                }
            )
        )
    return pd.concat(rows, ignore_index=True)


def attention_output_errors(
    captures: Mapping,
    bits: Iterable[int] = VALUE_BITS,
    group_sizes: Iterable[int | None] = (None, 32, 16, 8),
    device: str | torch.device | None = None,
) -> pd.DataFrame:
    """Error of causal attention output when only the values are quantized (keys exact).

    captures: ``{layer: (q, k, v, ...)}`` with ``q [B, Hq, T, D]``, ``k, v [B, Hkv, T, D]``. For each scheme,
    the output of ``h1b_attention(score="exact", value_bits=bits, group_size=g)`` is compared with exact
    attention (``value_bits=None``) by the per-query relative error ``|o - o_ref| / |o_ref|``. With keys exact
    and no window the attention weights do not depend on the values, so they are computed once per layer
    (by ``h1b_attention``) and each scheme's output is ``probs @ dequantized values`` -- the same numbers as
    calling ``h1b_attention`` per scheme (tested), a dozen softmaxes cheaper.

    Columns: ``layer, bits, group_size, scheme, bits_per_element, mean, median, p90, max`` (over batch,
    query heads and positions) and ``value_mean`` (the mean relative reconstruction error of that layer's
    value vectors under the same scheme, for comparison) and ``effective_keys`` (the mean over queries of
    ``1 / sum_j p_j**2``, how many keys a query's attention is spread over: rounding errors of independent
    keys average out only when it is large).

    ``device``: where to compute (None: where each layer's capture is). Captures kept on the host for numpy
    tables (``capture_attention_inputs``' default) can be attended on a GPU this way: each layer's q/k/v are
    copied there in turn (one layer's ``[B, Hq, T, T]`` probabilities alive at a time) and only the table's
    numbers come back. The numbers are the same up to float rounding of the device's kernels.
    """
    bits = _bits_list(bits)
    groups = list(group_sizes)
    if not groups:
        raise ValueError("group_sizes must name at least one group size (None = per-token)")
    if not isinstance(captures, Mapping) or not captures:
        raise ValueError("captures must be a non-empty mapping {layer: (q, k, v)}")
    rows = []
    for layer, entry in captures.items():
        if not isinstance(entry, (tuple, list)) or len(entry) < 3:
            raise ValueError(f"captures[{layer!r}] must be a tuple (q, k, v, ...), got {type(entry).__name__}")
        q, k, v = entry[:3]
        check_tensor("v", v, ndim=4)
        if device is not None:
            q, k, v = (t.to(device) for t in (q, k, v))
        D = v.shape[-1]
        for g in groups:
            _check_group(g, D)
        sketcher = SimHashSketcher(D, 8)  # unused by score="exact"; required by the signature
        ref, probs = h1b_attention(q, k, v, sketcher=sketcher, score="exact", value_bits=None, return_probs=True)
        ref = ref.double()
        effective_keys = (1 / probs.double().pow(2).sum(-1)).mean().item()
        ref_norm = ref.norm(dim=-1)
        group = q.shape[1] // v.shape[1]
        for nb in bits:
            for g in groups:
                v_hat = quantize_values(v, nb, g).dequantize().float().repeat_interleave(group, dim=1)
                out = (probs @ v_hat).to(q.dtype)  # = h1b_attention(..., score="exact", value_bits=nb, group_size=g)
                err = (out.double() - ref).norm(dim=-1)
                rel = torch.where(ref_norm > 0, err / ref_norm.clamp_min(1e-300), err).flatten()
                rows.append(
                    {
                        "layer": layer,
                        "bits": nb,
                        "group_size": D if g is None else g,
                        "scheme": scheme_label(g, D),
                        "bits_per_element": storage_bits_per_element(nb, g, D),
                        "mean": rel.mean().item(),
                        "median": rel.quantile(0.5).item(),
                        "p90": rel.quantile(0.9).item(),
                        "max": rel.max().item(),
                        "value_mean": relative_errors(v, nb, g).double().mean().item(),
                        "effective_keys": effective_keys,
                    }
                )
    return pd.DataFrame(rows)


def _layers(values) -> dict:
    """``v`` or ``{layer: v}`` -> ``{layer: v}`` with every ``v`` a float ``[B, H, T, D]`` tensor."""
    if isinstance(values, torch.Tensor):
        values = {0: values}
    if not isinstance(values, Mapping):
        raise TypeError(f"values must be a tensor [B, H, T, D] or a mapping {{layer: tensor}}, got {type(values).__name__}")
    if not values:
        raise ValueError("values is empty: pass at least one layer")
    for layer, v in values.items():
        check_tensor(f"values[{layer!r}]", v, ndim=4)
    return dict(values)


def _bits_list(bits) -> list[int]:
    bits = [bits] if isinstance(bits, int) else list(bits)
    if not bits:
        raise ValueError(f"bits must name at least one of {VALUE_BITS}")
    for b in bits:
        check_choice("bits", b, VALUE_BITS)
    return bits


def _check_group(group_size, head_dim: int) -> None:
    if group_size is None:
        return
    check_int("group_size", group_size, low=1, high=head_dim)
    if head_dim % group_size:
        raise ValueError(f"group_size must divide head_dim={head_dim}, got {group_size}")
