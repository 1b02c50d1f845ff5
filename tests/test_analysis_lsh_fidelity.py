"""Unit tests of h1bkv_lite.analysis (lsh + fidelity) on synthetic tensors: brute force and known answers."""
import math

import numpy as np
import pytest
import torch
from scipy import stats

from h1bkv_lite import SimHashSketcher, calibrate_temperature, h1b_attention
from h1bkv_lite.analysis import (
    angle_estimates,
    asym_theory_variance,
    attention_fidelity,
    attention_sink_score,
    average_ranks,
    binned_bias,
    causal_mask,
    exact_attention,
    fidelity_sweep,
    fit_temperature,
    head_stats,
    kl_divergence,
    linear_score_bias,
    local_score,
    local_slopes,
    pairs_at_angle,
    pairs_from_capture,
    pairwise_hamming,
    random_pairs,
    relative_error,
    spearman_rows,
    summarize_estimates,
    temperature_kl_curve,
    theory_mae,
    theory_variance,
    topk_recall,
)


def _qkv(B=1, Hq=4, Hkv=2, T=40, D=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, Hq, T, D, generator=g), torch.randn(B, Hkv, T, D, generator=g),
            torch.randn(B, Hkv, T, D, generator=g))


# ------------------------------------------------------------------------------------------------ lsh
def test_theory_variance_formula():
    assert theory_variance(math.pi / 2, 64) == pytest.approx(math.pi**2 * 0.25 / 64)
    assert theory_variance(0.0, 16) == 0.0
    assert theory_variance(math.pi, 16) == 0.0
    th = np.array([0.3, 1.0, 2.0])
    np.testing.assert_allclose(theory_variance(th, 128), math.pi**2 * (th / math.pi) * (1 - th / math.pi) / 128)
    with pytest.raises(ValueError, match="theta"):
        theory_variance(-0.1, 16)
    with pytest.raises(ValueError, match="bits"):
        theory_variance(1.0, 0)


def test_asym_theory_variance_and_linear_bias_known_values():
    assert asym_theory_variance(0.0, 10) == pytest.approx(math.pi / 20)
    assert asym_theory_variance(1.0, 1) == pytest.approx(math.pi / 2 - 1)
    for c in (-1.0, 0.0, 1.0):
        assert linear_score_bias(c) == pytest.approx(0.0, abs=1e-12)
    c_star = math.sqrt(1 - 4 / math.pi**2)  # where d/dc of the bias vanishes
    assert linear_score_bias(c_star) == pytest.approx(-0.2105, abs=1e-3)
    assert linear_score_bias(-c_star) == pytest.approx(0.2105, abs=1e-3)


def test_pairs_at_angle_and_random_pairs():
    x, y = pairs_at_angle(500, 32, 1.1, seed=3)
    cos = torch.nn.functional.cosine_similarity(x, y, dim=-1)
    torch.testing.assert_close(cos, torch.full_like(cos, math.cos(1.1)), atol=1e-5, rtol=0)
    x, y = random_pairs(4000, 32, seed=1)
    theta = torch.arccos(torch.nn.functional.cosine_similarity(x, y, dim=-1).clamp(-1, 1))
    assert 0.9 < theta.mean().item() / (math.pi / 2) < 1.1
    assert theta.std().item() > 0.8  # uniform on [0, pi]: std = pi / sqrt(12) = 0.91
    x, y = random_pairs(4000, 64, seed=1, kind="independent")
    theta = torch.arccos(torch.nn.functional.cosine_similarity(x, y, dim=-1).clamp(-1, 1))
    assert theta.std().item() < 0.2
    with pytest.raises(ValueError, match="kind"):
        random_pairs(10, 8, kind="bogus")


def test_pairwise_hamming_matches_sketcher():
    x, y = random_pairs(50, 16, seed=2)
    sk = SimHashSketcher(16, 64, seed=5)
    brute = torch.diagonal(sk.hamming(sk.sketch(x), sk.sketch(y))).long()
    assert torch.equal(pairwise_hamming(x, y, sk), brute)


def test_angle_estimates_columns_match_brute_force():
    x, y = random_pairs(30, 16, seed=4)
    df = angle_estimates(x, y, [32, 128], seed=7)
    assert len(df) == 60
    sk = SimHashSketcher(16, 32, seed=7)
    h = pairwise_hamming(x, y, sk).double().numpy()
    row = df[df.bits == 32]
    np.testing.assert_allclose(row.theta_hat, math.pi * h / 32)
    np.testing.assert_allclose(row.score, 1 - 2 * h / 32)
    np.testing.assert_allclose(row.bits_per_element, 2.0)
    # asymmetric estimate: sqrt(pi/2)/b * |y| * <R^T x, sign(R^T y)> / (|x||y|)
    px, py = sk.project(x).double(), sk.project(y).double()
    est = math.sqrt(math.pi / 2) / 32 * (px * torch.where(py >= 0, 1.0, -1.0)).sum(-1) / x.double().norm(dim=-1)
    np.testing.assert_allclose(row.asym_rel, est.numpy(), rtol=1e-9, atol=1e-12)
    cos = torch.nn.functional.cosine_similarity(x.double(), y.double(), dim=-1).numpy()
    np.testing.assert_allclose(row.cos, cos, atol=1e-12)


def test_angle_estimates_groups_use_their_own_projection():
    x, y = random_pairs(20, 16, seed=4)
    groups = np.array([0] * 10 + [3] * 10)
    df = angle_estimates(x, y, [64], seed=1, groups=groups)
    h3 = pairwise_hamming(x[10:], y[10:], SimHashSketcher(16, 64, seed=4)).double().numpy()
    np.testing.assert_allclose(df.theta_hat.iloc[10:], math.pi * h3 / 64)
    with pytest.raises(ValueError, match="groups"):
        angle_estimates(x, y, [64], groups=np.zeros(3, dtype=int))


@pytest.mark.parametrize("theta", [0.4, math.pi / 2, 2.5])
@pytest.mark.parametrize("bits", [16, 64])
def test_empirical_variance_at_fixed_angle_matches_binomial_theory(theta, bits):
    # Over many pairs at one angle, h ~ Binomial(bits, theta/pi): mean and variance of theta_hat match.
    n = 6000
    x, y = pairs_at_angle(n, 32, theta, seed=11)
    df = angle_estimates(x, y, [bits], seed=bits)
    s = summarize_estimates(df).iloc[0]
    var_th = theory_variance(theta, bits)
    assert s.var_theory == pytest.approx(var_th, rel=1e-4)
    # sample variance of n draws: relative sd sqrt(2/n) ~ 1.8% (+ kurtosis); allow 10%
    assert s.var_ratio == pytest.approx(1.0, abs=0.10)
    assert abs(s.bias) < 4 * math.sqrt(var_th / n)


def test_asym_estimator_unbiased_with_theory_variance():
    # Unbiased over the draw of R: one fixed R scales every estimate by its mean row norm / sqrt(d)
    # (a ~1/sqrt(2 d b) relative error), so average over 300 independent projections.
    x, y = pairs_at_angle(6000, 32, 1.0, seed=2)
    s = summarize_estimates(angle_estimates(x, y, [64], seed=9, groups=np.arange(6000) % 300)).iloc[0]
    assert abs(s.asym_bias) < 4 * math.sqrt(s.asym_var_theory / 6000)
    assert s.asym_var_ratio == pytest.approx(1.0, abs=0.1)


def test_linear_score_unbiased_for_its_target_but_not_for_cosine():
    theta = math.acos(0.77)
    x, y = pairs_at_angle(6000, 32, theta, seed=5)
    s = summarize_estimates(angle_estimates(x, y, [256], seed=3)).iloc[0]
    assert abs(s.score_bias) < 0.01
    assert s.score_vs_cos_bias == pytest.approx(linear_score_bias(0.77), abs=0.01)


def test_summarize_mae_falls_like_inverse_sqrt_bits():
    x, y = random_pairs(4000, 64, seed=0)
    summ = summarize_estimates(angle_estimates(x, y, [16, 64, 256, 1024], seed=0))
    assert summ.mae.is_monotonic_decreasing
    slopes = local_slopes(summ.bits, summ.mae)
    np.testing.assert_allclose(slopes, -0.5, atol=0.08)
    with pytest.raises(ValueError, match="columns"):
        summarize_estimates(summ)


def test_local_slopes_and_binned_bias():
    np.testing.assert_allclose(local_slopes([16, 64, 256], [4.0, 2.0, 1.0]), [-0.5, -0.5])
    with pytest.raises(ValueError, match="positive"):
        local_slopes([16, 64], [1.0, 0.0])
    x, y = random_pairs(3000, 32, seed=1)
    df = angle_estimates(x, y, [64], seed=1)
    bb = binned_bias(df, "score", "cos", by="cos", bins=10)
    assert set(bb.columns) == {"bits", "bin_center", "bias", "n"}
    assert bb.n.sum() == 3000
    # the binned empirical bias follows the closed form
    np.testing.assert_allclose(bb.bias, linear_score_bias(bb.bin_center), atol=0.06)


def test_pairs_from_capture_are_causal_and_gqa_consistent():
    q, k, v = _qkv(B=2, Hq=6, Hkv=2, T=30, D=8)
    cap = {3: (q, k, v), 7: (q * 2, k * 2, v)}
    xq, xk, meta = pairs_from_capture(cap, 200, seed=1)
    assert xq.shape == (400, 8) and xk.shape == (400, 8)
    assert (meta.j <= meta.i).all() and (meta.i >= 1).all()
    assert (meta.kv_head == meta.q_head // 3).all()
    assert sorted(meta.layer.unique()) == [3, 7]
    r = meta.iloc[250]
    scale = 2 if r.layer == 7 else 1
    torch.testing.assert_close(xq[250], scale * q[r.batch, r.q_head, r.i])
    torch.testing.assert_close(xk[250], scale * k[r.batch, r.kv_head, r.j])
    with pytest.raises(ValueError, match="capture"):
        pairs_from_capture({}, 10)


def test_angle_estimates_validates_inputs():
    x, y = random_pairs(10, 16)
    with pytest.raises(ValueError, match="same shape"):
        angle_estimates(x, y[:5], [64])
    with pytest.raises(ValueError, match="bits"):
        angle_estimates(x, y, [12])
    with pytest.raises(TypeError, match="bits_list"):
        angle_estimates(x, y, 64)
    with pytest.raises(ValueError, match="zero"):
        angle_estimates(torch.zeros(3, 16), y[:3], [64])


# ------------------------------------------------------------------------------------------------ fidelity
def test_kl_identical_is_zero_and_matches_brute_force():
    p = torch.softmax(torch.randn(5, 7), -1)
    q = torch.softmax(torch.randn(5, 7), -1)
    torch.testing.assert_close(kl_divergence(p, p), torch.zeros(5), atol=1e-7, rtol=0)
    brute = (p.double() * (p.double().log() - q.double().log())).sum(-1).float()
    torch.testing.assert_close(kl_divergence(p, q), brute)
    # zero-probability entries of p contribute nothing; an underflowed q stays finite
    p0 = torch.tensor([[0.5, 0.5, 0.0]])
    assert kl_divergence(p0, torch.tensor([[0.5, 0.5, 0.0]])).item() == pytest.approx(0.0)
    assert torch.isfinite(kl_divergence(p0, torch.tensor([[1.0, 0.0, 0.0]]))).all()
    with pytest.raises(ValueError, match="same shape"):
        kl_divergence(p, q[:, :3])


def test_topk_recall_identical_is_one_and_brute_force():
    x = torch.randn(3, 20, 20)
    mask = causal_mask(20, 20)
    r = topk_recall(x, x, 4, mask)
    assert torch.isnan(r[:, :4]).all()  # rows with <= 4 visible keys are trivial
    assert (r[:, 4:] == 1).all()
    y = torch.randn(3, 20, 20)
    r = topk_recall(x, y, 5)
    for i in range(3):
        for t in range(20):
            a = set(x[i, t].topk(5).indices.tolist())
            b = set(y[i, t].topk(5).indices.tolist())
            assert r[i, t].item() == pytest.approx(len(a & b) / 5)


def test_average_ranks_match_scipy_with_ties():
    x = torch.tensor([[3.0, 1.0, 3.0, 2.0, float("inf"), 1.0], [0.0, 0.0, 0.0, 5.0, -1.0, 5.0]])
    want = stats.rankdata(x.numpy(), axis=-1)
    np.testing.assert_allclose(average_ranks(x).numpy(), want)
    r = torch.randint(0, 4, (6, 50)).float()
    np.testing.assert_allclose(average_ranks(r).numpy(), stats.rankdata(r.numpy(), axis=-1))


def test_spearman_rows_matches_scipy_on_visible_entries():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 12, 12, generator=g)
    y = x + torch.randn(2, 12, 12, generator=g)
    y = y.round()  # ties
    mask = causal_mask(12, 12)
    rho = spearman_rows(x, y, mask)
    assert torch.isnan(rho[:, :2]).all()  # < 3 visible keys
    for b in range(2):
        for t in range(2, 12):
            want = stats.spearmanr(x[b, t, : t + 1].numpy(), y[b, t, : t + 1].numpy()).statistic
            if np.isnan(want):
                assert torch.isnan(rho[b, t])
            else:
                assert rho[b, t].item() == pytest.approx(want, abs=1e-5)
    torch.testing.assert_close(spearman_rows(x, x, mask)[:, 2:], torch.ones(2, 10))


def test_relative_error_and_sink_local_scores():
    o = torch.randn(4, 8)
    torch.testing.assert_close(relative_error(o, o), torch.zeros(4))
    torch.testing.assert_close(relative_error(o, 2 * o), torch.ones(4))
    T = 20
    sink = torch.zeros(1, 2, T, T)
    sink[0, 0, :, 0] = 1.0  # head 0: all mass on token 0
    idx = torch.arange(T)
    sink[0, 1, idx, idx] = 1.0  # head 1: all mass on itself (local)
    assert attention_sink_score(sink).tolist() == [[1.0, 0.0]]
    assert local_score(sink, window=4).tolist() == [[0.0, 1.0]]
    with pytest.raises(ValueError, match="min_position"):
        attention_sink_score(sink, min_position=T)


def test_exact_attention_matches_h1b_exact_mode():
    q, k, v = _qkv()
    out, p, _ = exact_attention(q, k, v)
    sk = SimHashSketcher(16, 64)
    ref_out, ref_p = h1b_attention(q, k, v, sketcher=sk, score="exact", value_bits=None, return_probs=True)
    torch.testing.assert_close(p, ref_p)
    torch.testing.assert_close(out, ref_out)


@pytest.mark.parametrize("score,value_bits", [("hamming", None), ("cos", 4), ("asym", None), ("exact", 4)])
def test_attention_fidelity_maps_match_h1b_attention(score, value_bits):
    q, k, v = _qkv(T=32, D=16, seed=2)
    sk = SimHashSketcher(16, 64, seed=1)
    temp = torch.linspace(0.1, 0.4, 4) if score == "hamming" else None
    res = attention_fidelity(q, k, v, sketcher=sk, score=score, temperature=temp, value_bits=value_bits,
                             return_maps=True)
    out, probs = h1b_attention(q, k, v, sketcher=sk, score=score, temperature=temp, value_bits=value_bits,
                               return_probs=True)
    torch.testing.assert_close(res["probs"], probs)
    ex_out = exact_attention(q, k, v)[0]
    torch.testing.assert_close(res["out_rel_err"], relative_error(ex_out, out).mean((0, 2)))


def test_attention_fidelity_exact_mode_is_perfect():
    q, k, v = _qkv()
    r = attention_fidelity(q, k, v, sketcher=SimHashSketcher(16, 64), score="exact", topk=(4, 8))
    assert r["kl"].abs().max() < 1e-6
    assert (r["recall@4"] == 1).all() and (r["recall@8"] == 1).all()
    torch.testing.assert_close(r["spearman"], torch.ones(4))
    assert r["out_rel_err"].max() < 1e-5
    assert r["kl"].shape == (4,)


@pytest.mark.parametrize("score", ["hamming", "cos", "asym"])
def test_attention_fidelity_improves_with_bits(score):
    q, k, v = _qkv(T=64, D=32, seed=1)
    q = q * 2  # peaked enough that the order matters
    res = {}
    for bits in (16, 1024):
        sk = SimHashSketcher(32, bits, seed=0)
        temp = fit_temperature(q, k, sketcher=sk) if score == "hamming" else None
        res[bits] = attention_fidelity(q, k, v, sketcher=sk, score=score, temperature=temp, return_maps=True)
    assert res[1024]["kl"].mean() < res[16]["kl"].mean()
    assert res[1024]["recall@8"].mean() > res[16]["recall@8"].mean()
    assert res[1024]["spearman"].mean() > res[16]["spearman"].mean()
    assert res[16]["probs"].shape == (1, 4, 64, 64)
    # the reported KL is the brute-force KL of the returned maps
    p, pe = res[16]["probs"], res[16]["probs_exact"]
    brute = (pe * (pe.clamp_min(1e-30).log() - p.clamp_min(1e-30).log())).sum(-1).mean((0, 2))
    torch.testing.assert_close(res[16]["kl"], brute, rtol=1e-4, atol=1e-5)


def test_fit_temperature_beats_or_matches_std_calibration():
    q, k, _ = _qkv(T=48, D=32, seed=3)
    sk = SimHashSketcher(32, 128, seed=0)
    t_fit = fit_temperature(q, k, sketcher=sk, max_rows=47)
    t_std = calibrate_temperature(q, k, sketcher=sk)
    curve = temperature_kl_curve(q, k, sketcher=sk, temperatures=torch.stack([t_fit, t_std]), max_rows=47)
    assert (curve[0] <= curve[1] + 1e-6).all()
    assert t_fit.shape == (4,) and (t_fit > 0).all()
    with pytest.raises(ValueError, match="temperatures"):
        temperature_kl_curve(q, k, sketcher=sk, temperatures=torch.tensor([-1.0]))


def test_fidelity_validates_inputs():
    q, k, v = _qkv()
    sk = SimHashSketcher(16, 64)
    with pytest.raises(ValueError, match="score"):
        attention_fidelity(q, k, v, sketcher=sk, score="bogus")
    with pytest.raises(ValueError, match="multiple"):
        attention_fidelity(q[:, :3], k, v, sketcher=sk)
    with pytest.raises(ValueError, match="k and v"):
        attention_fidelity(q, k, v[:, :, :5], sketcher=sk)
    with pytest.raises(TypeError, match="mask"):
        topk_recall(q, q, 2, mask=torch.ones(40, 40))


def test_theory_mae_matches_simulation_and_interpolation():
    rng = np.random.default_rng(0)
    theta = 1.2
    h = rng.binomial(32, theta / math.pi, size=200_000)
    assert theory_mae(theta, 32) == pytest.approx(np.abs(math.pi * h / 32 - theta).mean(), rel=0.01)
    th = np.linspace(0.01, 3.1, 3000)
    # 3000 angles are interpolated from a grid; 30 are computed exactly
    np.testing.assert_allclose(theory_mae(th, 64)[::100], theory_mae(th[::100], 64), rtol=1e-2)
    assert theory_mae(0.0, 64) == 0.0


def test_head_stats_and_fidelity_sweep_on_synthetic_capture():
    cap = {0: _qkv(T=24, D=16, seed=0), 2: _qkv(T=24, D=16, seed=1)}
    calib = {0: _qkv(T=24, D=16, seed=5), 2: _qkv(T=24, D=16, seed=6)}
    hs = head_stats(cap)
    assert list(hs.columns) == ["layer", "head", "sink", "local", "entropy"]
    assert len(hs) == 8 and hs.sink.between(0, 1).all() and hs.local.between(0, 1).all()
    df = fidelity_sweep(cap, [16, 64], ["hamming", "hamming_std", "cos"], calib_capture=calib, topk=(4,))
    assert len(df) == 2 * 2 * 3 * 4
    assert set(df.temperature_source[df.score.str.startswith("hamming")]) == {"calibration"}
    assert df.temperature[df.score == "cos"].isna().all()
    # one row reproduces a direct call (projection seed = seed + layer; temperature fitted on calib)
    sk = SimHashSketcher(16, 64, seed=2)
    temp = fit_temperature(*calib[2][:2], sketcher=sk)
    direct = attention_fidelity(*cap[2], sketcher=sk, score="hamming", temperature=temp, topk=(4,))
    got = df[(df.layer == 2) & (df.bits == 64) & (df.score == "hamming")].sort_values("head")
    np.testing.assert_allclose(got.kl, direct["kl"].numpy(), rtol=1e-5)
    np.testing.assert_allclose(got["recall@4"], direct["recall@4"].numpy())
    with pytest.raises(ValueError, match="scores"):
        fidelity_sweep(cap, [16], ["bogus"])
    with pytest.raises(ValueError, match="calib_capture lacks"):
        fidelity_sweep(cap, [16], calib_capture={0: calib[0]})
