"""How close H1B attention maps are to exact ones: KL, top-k recall, rank correlation, output error.

Every metric is computed per query row over the keys that row can see (causal), then averaged per head.
Shapes: attention maps ``p [..., Tq, Tk]`` (rows sum to 1 over visible keys), logits the same shape,
outputs ``[..., Tq, D]``; the leading dims are usually ``[B, H]``.
"""
from __future__ import annotations

import math

import pandas as pd
import torch

from .._validation import check_choice, check_int, check_sketch_bits, check_tensor
from ..attention import SCORES, calibrate_temperature, sketched_logits
from ..quant import VALUE_BITS, quantize_values
from ..sketch import SimHashSketcher


def causal_mask(Tq: int, Tk: int, device=None) -> torch.Tensor:
    """bool ``[Tq, Tk]``: query ``i`` (the last ``Tq`` positions of ``Tk``) sees keys ``j <= i``."""
    check_int("Tq", Tq, low=1)
    check_int("Tk", Tk, low=Tq)
    qpos = torch.arange(Tk - Tq, Tk, device=device).unsqueeze(-1)
    return torch.arange(Tk, device=device).unsqueeze(0) <= qpos


def kl_divergence(p: torch.Tensor, q: torch.Tensor, eps: float = 1e-30) -> torch.Tensor:
    """Row-wise ``KL(p || q) = sum_j p_j (log p_j - log q_j)`` in nats: ``[..., N]`` -> float32 ``[...]``.

    Terms with ``p_j = 0`` are 0; ``q`` is floored at ``eps`` so an underflowed probability gives a large
    but finite KL.
    """
    _check_maps(p=p, q=q)
    return _kl(p, q, eps)


def topk_recall(p_exact: torch.Tensor, p_approx: torch.Tensor, k: int, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Fraction of the exact top-``k`` keys of each row that are also in the approximate top-``k``.

    p_exact, p_approx ``[..., Tq, Tk]`` (probabilities or logits: only the order matters); mask bool
    ``[Tq, Tk]`` or broadcastable (True = visible; default: all). Rows with ``<= k`` visible keys are
    trivially 1 and returned as NaN (use ``nanmean``). ``-inf`` entries are allowed. Ties are broken by
    ``torch.topk``'s order. Returns float32 ``[..., Tq]``.
    """
    _check_maps(p_exact=p_exact, p_approx=p_approx, finite=False)
    check_int("k", k, low=1)
    return _topk_recalls(p_exact, p_approx, (k,), _mask_for(p_exact, mask))[k]


def _kl(p: torch.Tensor, q: torch.Tensor, eps: float = 1e-30) -> torch.Tensor:
    p, q = p.float(), q.float()
    terms = p * (torch.log(p.clamp_min(eps)) - torch.log(q.clamp_min(eps)))  # log difference first: no cancellation
    return torch.where(p > 0, terms, torch.zeros_like(terms)).sum(-1).clamp_min(0)


def _topk_recalls(a: torch.Tensor, b: torch.Tensor, ks, mask: torch.Tensor) -> dict:
    """``{k: recall [..., Tq]}`` for several k from one sorted top-max(k) per map."""
    neg = torch.finfo(torch.float32).min
    a = a.float().masked_fill(~mask, neg)
    b = b.float().masked_fill(~mask, neg)
    kmax = min(max(ks), a.shape[-1])
    ia = a.topk(kmax, dim=-1, sorted=True).indices
    ib = b.topk(kmax, dim=-1, sorted=True).indices
    n_visible = mask.expand_as(a).sum(-1)
    out = {}
    for k in ks:
        kk = min(k, kmax)
        hit = (ia[..., :kk].unsqueeze(-1) == ib[..., :kk].unsqueeze(-2)).any(-1).float().mean(-1)
        out[k] = torch.where(n_visible > k, hit, torch.full_like(hit, float("nan")))
    return out


def average_ranks(x: torch.Tensor) -> torch.Tensor:
    """Ranks 1..N along the last dim with ties given their average rank (as ``scipy.stats.rankdata``).

    x float ``[..., N]`` (``+inf`` allowed, no NaN) -> float64 ``[..., N]``.
    """
    check_tensor("x", x, min_ndim=1, finite=False)
    if bool(torch.isnan(x).any()):
        raise ValueError("x contains NaN; ranks are undefined")
    s, idx = x.sort(dim=-1, stable=True)
    n = x.shape[-1]
    pos = torch.arange(n, device=x.device).expand_as(s)
    starts = torch.ones_like(s, dtype=torch.bool)
    starts[..., 1:] = s[..., 1:] != s[..., :-1]
    ends = torch.ones_like(starts)
    ends[..., :-1] = starts[..., 1:]
    first = torch.where(starts, pos, torch.zeros_like(pos)).cummax(-1).values
    last = torch.where(ends, pos, torch.full_like(pos, n)).flip(-1).cummin(-1).values.flip(-1)
    r = (first + last).double() / 2 + 1
    return torch.empty_like(r).scatter_(-1, idx, r)


def spearman_rows(x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Spearman rank correlation of each row of ``x`` and ``y`` over its visible entries.

    x, y float ``[..., Tq, Tk]`` (scores or logits); mask bool broadcastable to them (True = visible;
    default all). Ties get average ranks. Rows with fewer than 3 visible entries or a constant row give
    NaN. Returns float32 ``[..., Tq]``.
    """
    _check_maps(x=x, y=y, finite=False)
    mask = _mask_for(x, mask).expand_as(x)
    m = mask.double()
    n = m.sum(-1)
    # masked entries go to +inf so visible entries take ranks 1..n_visible
    rx = average_ranks(x.float().masked_fill(~mask, float("inf"))) * m
    ry = average_ranks(y.float().masked_fill(~mask, float("inf"))) * m
    mx = rx.sum(-1, keepdim=True) / n.unsqueeze(-1).clamp_min(1)
    my = ry.sum(-1, keepdim=True) / n.unsqueeze(-1).clamp_min(1)
    dx, dy = (rx - mx) * m, (ry - my) * m
    cov = (dx * dy).sum(-1)
    den = ((dx**2).sum(-1) * (dy**2).sum(-1)).sqrt()
    rho = cov / den
    rho = torch.where((n >= 3) & (den > 0), rho, torch.full_like(rho, float("nan")))
    return rho.float()


def relative_error(out_exact: torch.Tensor, out_approx: torch.Tensor) -> torch.Tensor:
    """Row-wise ``|o - o_hat| / |o|`` over the last dim: ``[..., D]`` -> float32 ``[...]`` (0/0 -> 0)."""
    _check_maps(out_exact=out_exact, out_approx=out_approx)
    num = (out_exact.double() - out_approx.double()).norm(dim=-1)
    den = out_exact.double().norm(dim=-1)
    return torch.where(den > 0, num / den.clamp_min(1e-300), num).float()


def attention_sink_score(p: torch.Tensor, min_position: int = 8) -> torch.Tensor:
    """Mean attention mass on token 0, over query rows at positions ``>= min_position``.

    p ``[..., Tq, Tk]`` causal maps whose queries are the last ``Tq`` of ``Tk`` positions. Returns float32
    ``[...]`` (e.g. ``[B, H]``); values near 1 mark an attention-sink head.
    """
    rows = _late_rows(p, min_position)
    return p[..., rows, 0].float().mean(-1)


def local_score(p: torch.Tensor, window: int = 8, min_position: int = 8) -> torch.Tensor:
    """Mean attention mass on the ``window`` newest visible keys (``i - window < j <= i``, ``j >= 1``).

    Token 0 is excluded so sinks do not count as local. p as in :func:`attention_sink_score`;
    returns float32 ``[...]``.
    """
    check_int("window", window, low=1)
    rows = _late_rows(p, min_position)
    Tq, Tk = p.shape[-2:]
    qpos = torch.arange(Tk - Tq, Tk, device=p.device).unsqueeze(-1)
    kpos = torch.arange(Tk, device=p.device).unsqueeze(0)
    near = (kpos <= qpos) & (qpos - kpos < window) & (kpos >= 1)
    return (p.float() * near).sum(-1)[..., rows].mean(-1)


def exact_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True):
    """Plain float32 softmax attention with GQA: returns ``(out [B, Hq, Tq, D], probs, logits [B, Hq, Tq, Tk])``."""
    _check_qkv(q, k, v)
    vf = v.float().repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    logits = _exact_logits(q, k)
    if causal:
        logits = logits.masked_fill(~causal_mask(q.shape[2], k.shape[2], q.device), float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return probs @ vf, probs, logits


def attention_fidelity(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    sketcher: SimHashSketcher,
    score: str = "hamming",
    temperature=None,
    value_bits: int | None = None,
    topk=(8, 32),
    exact=None,
    rank_rows: int | None = 128,
    return_maps: bool = False,
) -> dict:
    """Compare causal H1B attention (every key sketched, ``window=0``) with exact attention, per head.

    q ``[B, Hq, T, D]``, k and v ``[B, Hkv, T, D]``; ``score`` in ("hamming", "cos", "asym", "exact");
    ``temperature`` (hamming only: float or ``[Hq]``; ``None`` = calibrated on these same inputs, an
    oracle); ``value_bits`` None keeps values exact so only the keys' error is measured. ``exact``: a
    precomputed :func:`exact_attention` result to reuse across calls. ``rank_rows``: Spearman (a full
    sort per row, the costly metric) is computed on at most this many evenly spaced query rows
    (``None``: all rows); the other metrics use every row.

    Returns a dict of float32 ``[Hq]`` tensors (averaged over batch and query rows): ``kl`` (nats,
    KL(exact || h1b)), ``recall@k`` for each k, ``spearman`` (of logits over visible keys),
    ``out_rel_err`` (|o - o_hat| / |o|); with ``return_maps`` also ``probs_exact`` and ``probs``
    ``[B, Hq, T, T]``.
    """
    _check_qkv(q, k, v)
    check_choice("score", score, SCORES)
    if q.shape[2] != k.shape[2]:
        raise ValueError(f"q and k must cover the same positions (prefill), got T={q.shape[2]} and {k.shape[2]}")
    topk = (topk,) if isinstance(topk, int) else tuple(topk)
    for kk in topk:
        check_int("topk", kk, low=1)
    if value_bits is not None:
        check_choice("value_bits", value_bits, VALUE_BITS)
    if rank_rows is not None:
        check_int("rank_rows", rank_rows, low=1)
    out_ex, p_ex, logit_ex = exact_attention(q, k, v) if exact is None else exact
    # Same maps and outputs as h1b_attention(..., window=0) (tested), computed once per call
    if score == "hamming" and temperature is None:
        temperature = calibrate_temperature(q, k, sketcher=sketcher)
    mask = causal_mask(q.shape[2], k.shape[2], q.device)
    logit = _compressed_logits(q, k, sketcher, score, temperature)
    p = torch.softmax(logit.masked_fill(~mask, float("-inf")), dim=-1)
    v_used = v if value_bits is None else quantize_values(v, value_bits).dequantize()
    out = p @ v_used.float().repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    result = {"kl": _kl(p_ex, p).mean((0, 2))}
    for kk, rec in _topk_recalls(logit_ex, logit, topk, mask).items():
        result[f"recall@{kk}"] = rec.nanmean(2).mean(0)
    rows = _spread_rows(q.shape[2], rank_rows, device=q.device)
    result["spearman"] = spearman_rows(logit_ex[:, :, rows], logit[:, :, rows], mask[rows]).nanmean(2).mean(0)
    result["out_rel_err"] = relative_error(out_ex, out.float()).mean((0, 2))
    if return_maps:
        result["probs_exact"] = p_ex
        result["probs"] = p
    return result


def temperature_kl_curve(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    sketcher: SimHashSketcher,
    temperatures: torch.Tensor,
    max_rows: int = 128,
) -> torch.Tensor:
    """Mean causal KL(exact || hamming-score softmax) per query head for each candidate temperature.

    q ``[B, Hq, T, D]``, k ``[B, Hkv, T, D]``; temperatures float ``[G]`` (shared by all heads) or
    ``[G, Hq]`` (per head). ``max_rows`` evenly spaced query rows (positions >= 1) keep it cheap.
    Returns float32 ``[G, Hq]``.
    """
    check_tensor("q", q, ndim=4)
    check_tensor("k", k, ndim=4)
    check_int("max_rows", max_rows, low=1)
    temps = torch.as_tensor(temperatures, dtype=torch.float32).to(q.device)
    Hq, T = q.shape[1], q.shape[2]
    if temps.dim() == 1:
        temps = temps.unsqueeze(-1).expand(-1, Hq)
    if temps.dim() != 2 or temps.shape[1] != Hq or not bool((temps > 0).all()):
        raise ValueError(f"temperatures must be positive, shape [G] or [G, {Hq}], got {tuple(temps.shape)}")
    if T < 2:
        raise ValueError("need at least 2 positions to fit a temperature")
    rows = _spread_rows(T, max_rows, first=1, device=q.device)
    a = sketched_logits(q[:, :, rows], sketcher.sketch(k), sketcher=sketcher, score="hamming", temperature=1.0)
    visible = torch.arange(T, device=q.device).unsqueeze(0) <= rows.unsqueeze(-1)  # [R, T]: row r is position rows[r]
    p_ex = torch.softmax(_exact_logits(q[:, :, rows], k).masked_fill(~visible, float("-inf")), -1)
    curve = []
    for t in temps:
        logits = (a / t.view(1, Hq, 1, 1)).masked_fill(~visible, float("-inf"))
        curve.append(_kl(p_ex, torch.softmax(logits, -1)).mean((0, 2)))
    return torch.stack(curve)


def fit_temperature(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    sketcher: SimHashSketcher,
    multipliers=None,
    max_rows: int = 128,
) -> torch.Tensor:
    """Per-head temperature for the "hamming" score that minimises KL(exact || h1b) on these (calibration) data.

    Searches ``T0 * multipliers`` with ``T0`` = :func:`~h1bkv_lite.calibrate_temperature` (std matching);
    default multipliers ``2 ** linspace(-3, 3, 25)``. q, k as in :func:`temperature_kl_curve`.
    Returns float32 ``[Hq]``. Stands in for the paper's learned temperature, fitted per head.
    """
    mult = torch.as_tensor(2.0 ** torch.linspace(-3, 3, 25) if multipliers is None else multipliers, dtype=torch.float32)
    if mult.dim() != 1 or not bool((mult > 0).all()):
        raise ValueError("multipliers must be a 1-D sequence of positive numbers")
    t0 = calibrate_temperature(q, k, sketcher=sketcher)  # [Hq], on q's device
    temps = mult.to(t0.device).unsqueeze(-1) * t0.unsqueeze(0)  # [G, Hq]
    curve = temperature_kl_curve(q, k, sketcher=sketcher, temperatures=temps, max_rows=max_rows)
    best = curve.argmin(0)
    return temps.gather(0, best.unsqueeze(0)).squeeze(0)


SWEEP_SCORES = ("hamming", "hamming_std", "cos", "asym", "exact")
"""Score modes of :func:`fidelity_sweep`: "hamming" uses a KL-fitted per-head temperature
(:func:`fit_temperature`), "hamming_std" the std-matched one (:func:`~h1bkv_lite.calibrate_temperature`),
both fitted on the calibration capture."""


def head_stats(capture: dict, *, min_position: int = 8, local_window: int = 8) -> pd.DataFrame:
    """Exact-attention character of every head: ``layer, head, sink, local, entropy``.

    capture ``{layer: (q, k, v, ...)}`` as from :func:`~h1bkv_lite.capture.capture_attention_inputs`.
    ``sink`` = :func:`attention_sink_score`, ``local`` = :func:`local_score` (``local_window`` newest
    keys), ``entropy`` = mean row entropy (nats) over rows at positions >= ``min_position``; all averaged
    over the batch.
    """
    _check_capture("capture", capture)
    frames = []
    for layer in sorted(capture):
        q, k, v = capture[layer][:3]
        _, p, _ = exact_attention(q, k, v)
        rows = _late_rows(p, min_position)
        ent = -torch.special.xlogy(p, p).sum(-1)[..., rows].mean(-1)
        frames.append(
            pd.DataFrame(
                {
                    "layer": layer,
                    "head": range(q.shape[1]),
                    "sink": attention_sink_score(p, min_position).mean(0).cpu().numpy(),
                    "local": local_score(p, local_window, min_position).mean(0).cpu().numpy(),
                    "entropy": ent.mean(0).cpu().numpy(),
                }
            )
        )
    return pd.concat(frames, ignore_index=True)


def fidelity_sweep(
    capture: dict,
    bits_list,
    scores=("hamming", "cos", "asym"),
    *,
    calib_capture: dict | None = None,
    seed: int = 0,
    topk=(8, 32),
    value_bits: int | None = None,
) -> pd.DataFrame:
    """:func:`attention_fidelity` for every layer, sketch width and score mode: one row per (layer, head, bits, score).

    capture / calib_capture: ``{layer: (q, k, v, ...)}`` (q ``[B, Hq, T, D]``, k/v ``[B, Hkv, T, D]``).
    Temperatures of "hamming"/"hamming_std" (see :data:`SWEEP_SCORES`) are fitted per layer, width and
    head on ``calib_capture`` (which must hold the same layers); ``None`` fits them on ``capture`` itself
    (an oracle, flagged in the ``temperature_source`` column). Layer ``l`` uses the projection of seed
    ``seed + l``. Columns: ``layer, head, bits, bits_per_element, score, temperature (NaN unless
    hamming), temperature_source, kl, recall@k..., spearman, out_rel_err``.
    """
    _check_capture("capture", capture)
    bits_list = [check_sketch_bits(b) for b in bits_list]
    scores = tuple(scores)
    for sc in scores:
        check_choice("scores", sc, SWEEP_SCORES)
    if calib_capture is not None:
        _check_capture("calib_capture", calib_capture)
        missing = set(capture) - set(calib_capture)
        if missing:
            raise ValueError(f"calib_capture lacks layers {sorted(missing)} of capture")
    source = "oracle" if calib_capture is None else "calibration"
    frames = []
    for layer in sorted(capture):
        q, k, v = capture[layer][:3]
        qc, kc = (capture if calib_capture is None else calib_capture)[layer][:2]
        exact = exact_attention(q, k, v)
        for bits in bits_list:
            sk = SimHashSketcher(q.shape[-1], bits, seed=seed + layer)
            for sc in scores:
                temp = None
                if sc == "hamming":
                    temp = fit_temperature(qc, kc, sketcher=sk)
                elif sc == "hamming_std":
                    temp = calibrate_temperature(qc, kc, sketcher=sk)
                mode = "hamming" if sc.startswith("hamming") else sc
                res = attention_fidelity(
                    q, k, v, sketcher=sk, score=mode, temperature=temp, value_bits=value_bits, topk=topk,
                    exact=exact,
                )
                row = {"layer": layer, "head": range(q.shape[1]), "bits": bits,
                       "bits_per_element": bits / q.shape[-1], "score": sc,
                       "temperature": float("nan") if temp is None else temp.cpu().numpy(),
                       "temperature_source": source if temp is not None else ""}
                row.update({name: val.cpu().numpy() for name, val in res.items()})
                frames.append(pd.DataFrame(row))
    return pd.concat(frames, ignore_index=True)


def _check_capture(name: str, capture) -> None:
    if not isinstance(capture, dict) or not capture:
        raise ValueError(f"{name} must be a non-empty dict {{layer: (q, k, v)}}")
    for layer, entry in capture.items():
        if not isinstance(entry, (tuple, list)) or len(entry) < 3:
            raise ValueError(f"{name}[{layer}] must be a tuple (q, k, v, ...)")
        _check_qkv(*entry[:3])


def _exact_logits(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """``q k^T / sqrt(D)`` float32 ``[B, Hq, Tq, Tk]`` with GQA (kv head ``h // group``)."""
    kf = k.float().repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    return q.float() @ kf.transpose(-1, -2) / math.sqrt(q.shape[-1])


def _compressed_logits(q, k, sketcher, score, temperature=None):
    """Logits ``[B, Hq, Tq, Tk]`` of a score mode, as :func:`~h1bkv_lite.h1b_attention` forms them."""
    if score == "exact":
        return _exact_logits(q, k)
    codes = sketcher.sketch(k)
    if score == "hamming":
        return sketched_logits(q, codes, sketcher=sketcher, score="hamming", temperature=temperature)
    norms = k.float().norm(dim=-1).to(torch.float16)  # what the cache stores
    return sketched_logits(q, codes, sketcher=sketcher, score=score, key_norms=norms)


def _check_qkv(q, k, v) -> None:
    check_tensor("q", q, ndim=4)
    check_tensor("k", k, ndim=4)
    check_tensor("v", v, ndim=4)
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    if q.shape[0] != k.shape[0] or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} must share batch and head_dim")
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"q heads ({q.shape[1]}) must be a multiple of k heads ({k.shape[1]})")


def _check_maps(finite: bool = True, **tensors) -> None:
    names = list(tensors)
    for name, t in tensors.items():
        check_tensor(name, t, min_ndim=1, finite=finite)
    shapes = {tuple(t.shape) for t in tensors.values()}
    if len(shapes) > 1:
        raise ValueError(f"{' and '.join(names)} must have the same shape, got {sorted(shapes)}")


def _mask_for(x: torch.Tensor, mask) -> torch.Tensor:
    if mask is None:
        return torch.ones(x.shape[-2:], dtype=torch.bool, device=x.device)
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
        raise TypeError("mask must be a bool torch.Tensor (True = visible)")
    try:
        torch.broadcast_shapes(mask.shape, x.shape)
    except RuntimeError as err:
        raise ValueError(f"mask shape {tuple(mask.shape)} does not broadcast to {tuple(x.shape)}") from err
    return mask


def _spread_rows(T: int, n: int | None, first: int = 0, device=None) -> torch.Tensor:
    """At most ``n`` evenly spaced positions in ``[first, T - 1]`` (all of them when ``n`` is None), on ``device``."""
    if n is None or n >= T - first:
        return torch.arange(first, T, device=device)
    return torch.linspace(first, T - 1, n, device=device).round().long().unique()


def _late_rows(p: torch.Tensor, min_position: int) -> torch.Tensor:
    check_tensor("p", p, min_ndim=2)
    Tq, Tk = p.shape[-2:]
    check_int("min_position", min_position, low=0, high=Tk - 1)
    rows = torch.arange(Tk - Tq, Tk, device=p.device) >= min_position
    if not bool(rows.any()):
        raise ValueError(f"no query row at position >= min_position={min_position}")
    return rows.nonzero().squeeze(-1)
