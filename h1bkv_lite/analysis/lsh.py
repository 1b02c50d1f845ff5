"""How well a b-bit SimHash sketch estimates angles, cosines and dot products: measured vs theory.

For vectors ``x, y`` at angle ``theta`` and a sketch of ``b`` random hyperplanes, the Hamming distance is
``h ~ Binomial(b, theta / pi)``, so ``theta_hat = pi h / b`` is unbiased with
``Var[theta_hat] = pi^2 p (1 - p) / b``, ``p = theta / pi`` (:func:`theory_variance`).

Estimators compared per pair (columns of :func:`angle_estimates`):

- ``theta_hat = pi h / b`` for ``theta``;
- ``cos_hat = cos(theta_hat)`` for ``cos theta`` (slightly biased: cos is not linear);
- the paper's linear score ``a = 1 - 2 h / b``: unbiased for ``1 - 2 theta / pi`` (its Proposition), but a
  *biased* estimate of ``cos theta`` itself, with bias :func:`linear_score_bias`;
- QJL's asymmetric estimate of ``<x, y>`` with ``x`` (the query) kept in full precision,
  ``sqrt(pi/2) / b * |y| * <x R, sign(y R)>``; unbiased, variance ``|x|^2 |y|^2 (pi/2 - cos^2) / b``
  (:func:`asym_theory_variance`). Errors are reported relative to ``|x| |y|``.
"""
from __future__ import annotations

import math
from typing import Iterable, Sequence

import numpy as np
import pandas as pd
import torch
from scipy import stats

from .._validation import check_choice, check_int, check_sketch_bits, check_tensor
from ..sketch import SimHashSketcher

PAIR_KINDS = ("uniform_angle", "independent")


def theory_variance(theta, bits):
    """``Var[pi h / b] = pi^2 p (1 - p) / b`` with ``p = theta / pi``; ``theta`` in [0, pi] (radians).

    ``theta`` and ``bits`` are floats/ints or arrays that broadcast (numpy); returns float or ndarray.
    """
    theta_arr = np.asarray(theta, dtype=np.float64)
    bits_arr = np.asarray(bits, dtype=np.float64)
    if np.any(theta_arr < 0) or np.any(theta_arr > math.pi) or not np.all(np.isfinite(theta_arr)):
        raise ValueError("theta must be finite angles in [0, pi] radians")
    if np.any(bits_arr <= 0) or not np.all(np.isfinite(bits_arr)):
        raise ValueError("bits must be positive")
    p = theta_arr / math.pi
    out = math.pi**2 * p * (1 - p) / bits_arr
    return float(out) if out.ndim == 0 else out


def theory_mae(theta, bits: int, grid: int = 1025):
    """``E|pi h / b - theta|`` for ``h ~ Binomial(b, theta / pi)``, per angle.

    ``theta`` float or ndarray of angles in [0, pi]; ``bits`` one int. Exact for up to ``grid`` angles;
    more are interpolated from ``grid`` evenly spaced exact values (error far below sampling noise).
    Returns a float for a scalar ``theta``, else a float64 ndarray shaped like it.
    """
    check_int("bits", bits, low=1)
    th = np.asarray(theta, dtype=np.float64)
    theory_variance(th, bits)  # validates theta
    flat = th.reshape(-1)
    points = flat if flat.size <= grid else np.linspace(0, math.pi, grid)
    k = np.arange(bits + 1)
    pmf = stats.binom.pmf(k[None, :], bits, points[:, None] / math.pi)  # [P, bits + 1]
    mae = (pmf * np.abs(math.pi * k[None, :] / bits - points[:, None])).sum(-1)
    out = mae if flat.size <= grid else np.interp(flat, points, mae)
    return float(out[0]) if th.ndim == 0 else out.reshape(th.shape)


def asym_theory_variance(cos, bits):
    """Variance of the asymmetric (QJL) estimate of ``<x, y>`` divided by ``(|x| |y|)^2``: ``(pi/2 - cos^2) / b``.

    Over the draw of R. With one fixed R the estimates also share a small scale error (R's row norms are not
    exactly sqrt(d)), visible as a bias when many pairs are averaged under one R.
    """
    cos_arr = np.asarray(cos, dtype=np.float64)
    bits_arr = np.asarray(bits, dtype=np.float64)
    if np.any(np.abs(cos_arr) > 1 + 1e-6) or not np.all(np.isfinite(cos_arr)):
        raise ValueError("cos must be finite and in [-1, 1]")
    if np.any(bits_arr <= 0):
        raise ValueError("bits must be positive")
    out = (math.pi / 2 - np.clip(cos_arr, -1, 1) ** 2) / bits_arr
    return float(out) if out.ndim == 0 else out


def linear_score_bias(cos):
    """Bias of the paper's score as a cosine estimate: ``E[1 - 2h/b] - cos = 1 - (2/pi) arccos(cos) - cos``.

    Zero at cos in {-1, 0, 1}; about -0.21 at cos = 0.77 and +0.21 at cos = -0.77 (the score is
    pulled towards 0 — flattened — for every other cosine). ``cos`` float or ndarray in [-1, 1].
    """
    c = np.clip(np.asarray(cos, dtype=np.float64), -1, 1)
    out = 1 - (2 / math.pi) * np.arccos(c) - c
    return float(out) if out.ndim == 0 else out


def random_pairs(n: int, dim: int, seed: int = 0, kind: str = "uniform_angle") -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` pairs of Gaussian vectors ``x, y`` float32 ``[n, dim]``.

    ``kind="independent"``: x, y i.i.d. N(0, I) — in high dimension their angle concentrates near 90 deg
    (std ~ 1/sqrt(dim)). ``kind="uniform_angle"``: x ~ N(0, I); y has a Gaussian norm and makes an angle
    with x drawn uniformly from [0, pi], so every angle is sampled.
    """
    check_int("n", n, low=1)
    check_int("dim", dim, low=2)
    check_int("seed", seed, low=0)
    check_choice("kind", kind, PAIR_KINDS)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dim, generator=gen)
    z = torch.randn(n, dim, generator=gen)
    if kind == "independent":
        return x, z
    xhat = x / x.norm(dim=-1, keepdim=True)
    perp = z - (z * xhat).sum(-1, keepdim=True) * xhat
    perp = perp / perp.norm(dim=-1, keepdim=True)
    theta = torch.rand(n, 1, generator=gen) * math.pi
    y = (torch.cos(theta) * xhat + torch.sin(theta) * perp) * z.norm(dim=-1, keepdim=True)
    return x, y


def pairs_at_angle(n: int, dim: int, theta: float, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` random pairs float32 ``[n, dim]`` whose angle is exactly ``theta`` (radians, in [0, pi])."""
    check_int("n", n, low=1)
    check_int("dim", dim, low=2)
    if not (0 <= theta <= math.pi):
        raise ValueError(f"theta must be in [0, pi], got {theta}")
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dim, generator=gen, dtype=torch.float64)
    z = torch.randn(n, dim, generator=gen, dtype=torch.float64)
    xhat = x / x.norm(dim=-1, keepdim=True)
    perp = z - (z * xhat).sum(-1, keepdim=True) * xhat
    perp = perp / perp.norm(dim=-1, keepdim=True)
    y = math.cos(theta) * xhat + math.sin(theta) * perp
    return x.float(), y.float()


def pairwise_hamming(x: torch.Tensor, y: torch.Tensor, sketcher: SimHashSketcher) -> torch.Tensor:
    """Hamming distance of each pair's sketches, row by row: ``x, y [N, D]`` -> int64 ``[N]``."""
    sx = sketcher.project(x) >= 0
    sy = sketcher.project(y) >= 0
    return (sx != sy).sum(-1)


def angle_estimates(
    x: torch.Tensor, y: torch.Tensor, bits_list: Sequence[int], seed: int = 0, groups=None
) -> pd.DataFrame:
    """Every estimator for every pair and sketch width, one row per (bits, pair).

    x (queries, kept full precision by "asym"), y (keys): float ``[N, D]``. One projection R per width,
    drawn from ``seed`` (as :class:`~h1bkv_lite.SimHashSketcher` does); with ``groups`` (ints ``[N]``,
    e.g. one id per layer and kv head, as a deployment draws one R per head) the pairs of group ``g`` use
    the R of seed ``seed + g``. Columns:

    ``bits, bits_per_element (= bits / D), pair, theta, theta_hat, cos, cos_hat, score, score_target,
    asym_rel, asym_rel_err`` where ``score = 1 - 2h/b``, ``score_target = 1 - 2 theta / pi``,
    ``asym_rel`` = asymmetric estimate of ``<x, y>`` / (|x| |y|) and ``asym_rel_err = asym_rel - cos``.
    """
    check_tensor("x", x, ndim=2)
    check_tensor("y", y, ndim=2)
    if x.shape != y.shape:
        raise ValueError(f"x and y must have the same shape [N, D], got {tuple(x.shape)} and {tuple(y.shape)}")
    bits_list = _check_bits_list(bits_list)
    N, D = x.shape
    xf, yf = x.double(), y.double()
    xn, yn = xf.norm(dim=-1), yf.norm(dim=-1)
    if bool((xn == 0).any()) or bool((yn == 0).any()):
        raise ValueError("x and y must not contain zero vectors (their angle is undefined)")
    cos = ((xf * yf).sum(-1) / (xn * yn)).clamp(-1, 1)
    theta = torch.arccos(cos)
    groups = _check_groups(groups, N)
    frames = []
    for b in bits_list:
        h, signed_dot = _hamming_and_signed_dot(x, y, b, seed, groups)
        theta_hat = math.pi * h / b
        asym = math.sqrt(math.pi / 2) / b * yn * signed_dot
        asym_rel = asym / (xn * yn)
        frames.append(
            pd.DataFrame(
                {
                    "bits": b,
                    "bits_per_element": b / D,
                    "pair": np.arange(N),
                    "theta": theta.cpu().numpy(),
                    "theta_hat": theta_hat.cpu().numpy(),
                    "cos": cos.cpu().numpy(),
                    "cos_hat": torch.cos(theta_hat).cpu().numpy(),
                    "score": (1 - 2 * h / b).cpu().numpy(),
                    "score_target": (1 - 2 * theta / math.pi).cpu().numpy(),
                    "asym_rel": asym_rel.cpu().numpy(),
                    "asym_rel_err": (asym_rel - cos).cpu().numpy(),
                }
            )
        )
    return pd.concat(frames, ignore_index=True)


def summarize_estimates(df: pd.DataFrame) -> pd.DataFrame:
    """One row per ``bits`` from an :func:`angle_estimates` frame: errors, biases, variances vs theory.

    ``mae, bias, var_empirical, var_theory, var_ratio`` refer to ``theta_hat`` (radians);
    ``var_theory`` is the mean of :func:`theory_variance` over the pairs' true angles, and
    ``var_empirical`` the mean squared deviation of ``theta_hat - theta`` from its mean (bias).
    ``cos_mae, cos_bias`` for ``cos_hat``; ``score_mae, score_bias`` of the linear score vs its target
    ``1 - 2 theta/pi``; ``score_vs_cos_mae, score_vs_cos_bias`` of the linear score vs the cosine;
    ``asym_mae, asym_bias, asym_var, asym_var_theory, asym_var_ratio`` of the asymmetric estimate
    relative to ``|x||y|``; ``mae_x_sqrt_bits`` = mae * sqrt(bits) (constant under a 1/sqrt(b) law).
    """
    missing = {"bits", "theta", "theta_hat", "cos", "cos_hat", "score", "score_target", "asym_rel_err"} - set(df)
    if missing:
        raise ValueError(f"df is missing columns {sorted(missing)}; pass the output of angle_estimates")
    rows = []
    for b, g in df.groupby("bits", sort=True):
        err = g["theta_hat"] - g["theta"]
        var_th = float(np.mean(theory_variance(g["theta"].to_numpy(), b)))
        var_emp = float(np.mean((err - err.mean()) ** 2))
        asym = g["asym_rel_err"]
        asym_th = float(np.mean(asym_theory_variance(g["cos"].to_numpy(), b)))
        asym_var = float(np.mean((asym - asym.mean()) ** 2))
        rows.append(
            {
                "bits": int(b),
                "bits_per_element": float(g["bits_per_element"].iloc[0]) if "bits_per_element" in g else np.nan,
                "n_pairs": len(g),
                "mae": float(err.abs().mean()),
                "bias": float(err.mean()),
                "var_empirical": var_emp,
                "var_theory": var_th,
                "var_ratio": var_emp / var_th if var_th > 0 else np.nan,
                "mae_theory": float(np.mean(theory_mae(g["theta"].to_numpy(), int(b)))),
                "mae_x_sqrt_bits": float(err.abs().mean() * math.sqrt(b)),
                "cos_mae": float((g["cos_hat"] - g["cos"]).abs().mean()),
                "cos_bias": float((g["cos_hat"] - g["cos"]).mean()),
                "score_mae": float((g["score"] - g["score_target"]).abs().mean()),
                "score_bias": float((g["score"] - g["score_target"]).mean()),
                "score_vs_cos_mae": float((g["score"] - g["cos"]).abs().mean()),
                "score_vs_cos_bias": float((g["score"] - g["cos"]).mean()),
                "asym_mae": float(asym.abs().mean()),
                "asym_bias": float(asym.mean()),
                "asym_var": asym_var,
                "asym_var_theory": asym_th,
                "asym_var_ratio": asym_var / asym_th if asym_th > 0 else np.nan,
                "cos_rmse": float(np.sqrt(np.mean((g["cos_hat"] - g["cos"]) ** 2))),
                "score_vs_cos_rmse": float(np.sqrt(np.mean((g["score"] - g["cos"]) ** 2))),
                "asym_rmse": float(np.sqrt(np.mean(asym**2))),
            }
        )
    return pd.DataFrame(rows)


def binned_bias(df: pd.DataFrame, value: str, target: str, by: str = "cos", bins: int = 20) -> pd.DataFrame:
    """Mean of ``df[value] - df[target]`` in ``bins`` equal-width bins of ``df[by]``, per ``bits``.

    Returns columns ``bits, bin_center, bias, n`` (empty bins dropped).
    """
    for col in (value, target, by, "bits"):
        if col not in df:
            raise ValueError(f"df has no column {col!r}")
    check_int("bins", bins, low=1)
    lo, hi = float(df[by].min()), float(df[by].max())
    edges = np.linspace(lo, hi, bins + 1)
    idx = np.clip(np.digitize(df[by], edges) - 1, 0, bins - 1)
    tmp = pd.DataFrame({"bits": df["bits"], "bin": idx, "d": df[value] - df[target]})
    out = tmp.groupby(["bits", "bin"])["d"].agg(["mean", "size"]).reset_index()
    out["bin_center"] = (edges[out["bin"]] + edges[out["bin"] + 1]) / 2
    return out.rename(columns={"mean": "bias", "size": "n"})[["bits", "bin_center", "bias", "n"]]


def local_slopes(bits: Sequence[float], err: Sequence[float]) -> np.ndarray:
    """Slopes of ``log(err)`` vs ``log(bits)`` between consecutive widths (``-0.5`` everywhere = 1/sqrt(b)).

    A knee would show as a break in these slopes (steeper below the knee than above). Returns ``[len - 1]``.
    """
    b = np.asarray(bits, dtype=np.float64)
    e = np.asarray(err, dtype=np.float64)
    if b.shape != e.shape or b.ndim != 1 or len(b) < 2:
        raise ValueError("bits and err must be 1-D of the same length >= 2")
    if np.any(b <= 0) or np.any(e <= 0):
        raise ValueError("bits and err must be positive for a log-log slope")
    order = np.argsort(b)
    lb, le = np.log(b[order]), np.log(e[order])
    return np.diff(le) / np.diff(lb)


def pairs_from_capture(
    capture: dict,
    n_per_layer: int,
    seed: int = 0,
    *,
    min_position: int = 1,
) -> tuple[torch.Tensor, torch.Tensor, pd.DataFrame]:
    """Sample causal (query, key) pairs ``(q_i, k_j)``, ``j <= i``, from captured attention inputs.

    capture: ``{layer: (q, k, v)}`` with q ``[B, Hq, T, D]`` and k ``[B, Hkv, T, D]`` (GQA: query head h
    reads kv head ``h // (Hq // Hkv)``). For each layer, ``n_per_layer`` pairs: batch row, query head
    and query position ``i >= min_position`` uniform, then key position ``j`` uniform in ``[0, i]``.
    Returns ``q [N, D]``, ``k [N, D]`` float32 and a frame with ``layer, batch, q_head, kv_head, i, j``.
    """
    if not isinstance(capture, dict) or not capture:
        raise ValueError("capture must be a non-empty dict {layer: (q, k, v)}")
    check_int("n_per_layer", n_per_layer, low=1)
    check_int("seed", seed, low=0)
    gen = torch.Generator().manual_seed(seed)
    qs, ks, metas = [], [], []
    for layer in sorted(capture):
        q, k = capture[layer][0], capture[layer][1]
        check_tensor(f"capture[{layer}] q", q, ndim=4)
        check_tensor(f"capture[{layer}] k", k, ndim=4)
        B, Hq, T, D = q.shape
        Hkv = k.shape[1]
        if Hq % Hkv or k.shape[0] != B or k.shape[2] != T or k.shape[3] != D:
            raise ValueError(f"capture[{layer}]: q {tuple(q.shape)} and k {tuple(k.shape)} do not match")
        check_int("min_position", min_position, low=0, high=T - 1)
        bi = torch.randint(B, (n_per_layer,), generator=gen)
        hi = torch.randint(Hq, (n_per_layer,), generator=gen)
        ii = torch.randint(min_position, T, (n_per_layer,), generator=gen)
        jj = (torch.rand(n_per_layer, generator=gen) * (ii + 1).float()).long().clamp(max=ii)
        kv = hi // (Hq // Hkv)
        qs.append(q[bi, hi, ii].float())
        ks.append(k[bi, kv, jj].float())
        metas.append(
            pd.DataFrame(
                {"layer": layer, "batch": bi.cpu().numpy(), "q_head": hi.cpu().numpy(), "kv_head": kv.cpu().numpy(),
                 "i": ii.cpu().numpy(), "j": jj.cpu().numpy()}
            )
        )
    return torch.cat(qs), torch.cat(ks), pd.concat(metas, ignore_index=True)


def _hamming_and_signed_dot(x, y, bits, seed, groups, chunk=8192):
    """Per pair: Hamming distance ``h`` and ``<x R, sign(y R)>`` (float64 ``[N]`` each), R per group."""
    N, D = x.shape
    h = torch.empty(N, dtype=torch.float64, device=x.device)
    dot = torch.empty(N, dtype=torch.float64, device=x.device)
    for g in torch.unique(groups).tolist():
        sk = SimHashSketcher(D, bits, seed=seed + g)
        idx = (groups == g).nonzero().squeeze(-1)
        for part in idx.split(chunk):
            px, py = sk.project(x[part]).double(), sk.project(y[part]).double()  # [n, bits]
            h[part] = ((px >= 0) != (py >= 0)).sum(-1).double()
            dot[part] = (px * torch.where(py >= 0, 1.0, -1.0)).sum(-1)
    return h, dot


def _check_groups(groups, n: int) -> torch.Tensor:
    if groups is None:
        return torch.zeros(n, dtype=torch.long)
    g = torch.as_tensor(np.array(groups))  # a copy: pandas arrays may be read-only
    if g.shape != (n,) or g.is_floating_point() or g.dtype == torch.bool:
        raise ValueError(f"groups must be {n} integer ids (one per pair), got shape {tuple(g.shape)} dtype {g.dtype}")
    if bool((g < 0).any()):
        raise ValueError("groups must be non-negative")
    return g.long()


def _check_bits_list(bits_list: Iterable[int]) -> list[int]:
    if isinstance(bits_list, int) or not isinstance(bits_list, Iterable):
        raise TypeError(f"bits_list must be a sequence of ints, got {type(bits_list).__name__}")
    bits_list = list(bits_list)
    if not bits_list:
        raise ValueError("bits_list is empty")
    for b in bits_list:
        check_sketch_bits(b)
    return bits_list
