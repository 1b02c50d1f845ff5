"""Tests for h1bkv_lite.attention against a per-query loop written from the module docstring."""

from __future__ import annotations

import math
import statistics

import pytest
import torch
import torch.nn.functional as F

from h1bkv_lite import SCORES, SimHashSketcher, calibrate_temperature, h1b_attention, quantize_values, sketched_logits

CUDA = torch.cuda.is_available()
D, BITS, TK = 32, 64, 7


def qkv(B=2, Hq=6, Hkv=2, Tq=3, Tk=TK, d=D, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, h, t, d, generator=gen).to(dtype) for h, t in ((Hq, Tq), (Hkv, Tk), (Hkv, Tk)))
    return q, k, v


def popcount(a: list[int], b: list[int]) -> int:
    return sum(bin(x ^ y).count("1") for x, y in zip(a, b))


def per_head(temperature, Hq: int) -> list[float]:
    t = torch.as_tensor(temperature, dtype=torch.float64)
    return t.expand(Hq).tolist() if t.dim() == 0 else t.tolist()


def brute_attention(q, k, v, *, sketcher, score, temperature, value_bits, group_size, window, causal):
    """One (batch, head, query) at a time, one key at a time, in Python floats (float64).

    The queries are the last Tq positions; query head h reads kv head h // (Hq // Hkv). Key j is exact for
    query i iff it is among the newest ``window`` keys that query can see; other keys get the ``score``
    logit of the module docstring, with the fp16 key norm the cache stores, and quantized values.
    """
    B, Hq, Tq, d = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    b = sketcher.bits
    qc, kc = sketcher.sketch(q).tolist(), sketcher.sketch(k).tolist()
    qd, kd, vd = q.double().tolist(), k.double().tolist(), v.double().tolist()
    qR = (q.double() @ sketcher.projection.double()).tolist()  # R^T q, for "asym"
    knorm16 = torch.linalg.vector_norm(k.float(), dim=-1).half().tolist()  # "an fp16 key norm per token-head"
    v_hat = vd if value_bits is None else quantize_values(v, value_bits, group_size).dequantize().double().tolist()
    T = per_head(temperature, Hq) if score == "hamming" else None
    out = [[[[0.0] * d for _ in range(Tq)] for _ in range(Hq)] for _ in range(B)]
    probs = [[[[0.0] * Tk for _ in range(Tq)] for _ in range(Hq)] for _ in range(B)]
    for bi in range(B):
        for h in range(Hq):
            kh = h // (Hq // Hkv)
            for i in range(Tq):
                pos = Tk - Tq + i
                qv = qd[bi][h][i]
                seen = [j for j in range(Tk) if not causal or j <= pos]
                exact_keys = set(seen[max(0, len(seen) - window):])  # the newest `window` it sees
                logits = []
                for j in seen:
                    kv = kd[bi][kh][j]
                    hd = popcount(qc[bi][h][i], kc[bi][kh][j])
                    if score == "exact" or j in exact_keys:
                        logit = sum(x * y for x, y in zip(qv, kv)) / math.sqrt(d)
                    elif score == "hamming":
                        logit = (1 - 2 * hd / b) / T[h]
                    elif score == "cos":
                        qnorm = math.sqrt(sum(x * x for x in qv))
                        logit = qnorm * knorm16[bi][kh][j] * math.cos(math.pi * hd / b) / math.sqrt(d)
                    else:  # asym
                        code = kc[bi][kh][j]
                        signs = [1.0 if (code[n // 8] >> (n % 8)) & 1 else -1.0 for n in range(b)]
                        dot = sum(x * y for x, y in zip(qR[bi][h][i], signs))
                        logit = math.sqrt(math.pi / 2) / b * knorm16[bi][kh][j] * dot / math.sqrt(d)
                    logits.append(logit)
                top = max(logits)
                weights = [math.exp(x - top) for x in logits]
                total = sum(weights)
                row = out[bi][h][i]
                for j, w in zip(seen, weights):
                    p = w / total
                    probs[bi][h][i][j] = p
                    value = vd[bi][kh][j] if j in exact_keys else v_hat[bi][kh][j]
                    for n in range(d):
                        row[n] += p * value[n]
    return torch.tensor(out, dtype=torch.float64), torch.tensor(probs, dtype=torch.float64)


def sdpa(q, k, v, causal: bool) -> torch.Tensor:
    """Torch SDPA with kv heads repeated and the causal mask aligned to the last query position."""
    group = q.shape[1] // k.shape[1]
    Tq, Tk = q.shape[2], k.shape[2]
    mask = None
    if causal:
        mask = torch.arange(Tk).unsqueeze(0) <= torch.arange(Tk - Tq, Tk).unsqueeze(1)
    return F.scaled_dot_product_attention(
        q.float(), k.float().repeat_interleave(group, 1), v.float().repeat_interleave(group, 1), attn_mask=mask
    )


def check_probs(probs, Tq, Tk, causal, context):
    assert probs.dtype == torch.float32 and probs.shape[-2:] == (Tq, Tk), context
    torch.testing.assert_close(probs.sum(-1), torch.ones_like(probs[..., 0]), atol=1e-6, rtol=0, msg=lambda m: f"{context}\n{m}")
    if causal:
        masked = torch.arange(Tk).unsqueeze(0) > torch.arange(Tk - Tq, Tk).unsqueeze(1)
        assert (probs[..., masked] == 0).all(), f"{context}: weight on keys in the future"
    assert (probs >= 0).all()


TEMPERATURE = torch.tensor([0.3, 0.45, 0.6, 0.35, 0.5, 0.4])  # one per query head (Hq = 6)


def run_both(*, score, heads, Tq, causal, window, value_bits, group_size, temperature, seed, dtype=torch.float32):
    Hq, Hkv = heads
    q, k, v = qkv(Hq=Hq, Hkv=Hkv, Tq=Tq, seed=seed, dtype=dtype)
    s = SimHashSketcher(D, BITS, seed)
    kwargs = dict(sketcher=s, score=score, temperature=temperature, value_bits=value_bits, group_size=group_size,
                  window=window, causal=causal)
    out, probs = h1b_attention(q, k, v, return_probs=True, **kwargs)
    want_out, want_probs = brute_attention(q, k, v, **kwargs)
    return out, probs, want_out, want_probs


# ---------------------------------------------------------------------------------------------------------
# Against the brute-force loop


@pytest.mark.parametrize("window", [0, 3, TK])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("Tq", [1, 3, TK])
@pytest.mark.parametrize("heads", [(6, 2), (6, 6)], ids=["gqa", "mha"])
@pytest.mark.parametrize("score", SCORES)
def test_matches_brute_force(score, heads, Tq, causal, window):
    seed = 17 * Tq + 3 * window + causal + heads[1]
    context = f"seed={seed} score={score} heads={heads} Tq={Tq} causal={causal} window={window}"
    out, probs, want_out, want_probs = run_both(score=score, heads=heads, Tq=Tq, causal=causal, window=window,
                                                value_bits=4, group_size=None, temperature=TEMPERATURE, seed=seed)
    assert out.shape == (2, heads[0], Tq, D) and out.dtype == torch.float32
    check_probs(probs, Tq, TK, causal, context)
    torch.testing.assert_close(probs.double(), want_probs, atol=2e-6, rtol=1e-5, msg=lambda m: f"{context}\n{m}")
    torch.testing.assert_close(out.double(), want_out, atol=1e-5, rtol=1e-5, msg=lambda m: f"{context}\n{m}")


@pytest.mark.parametrize("window", [0, 3, TK])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize(
    "value_bits, group_size", [(None, None), (2, None), (2, 16), (4, None), (4, 16), (8, None), (8, 16)], ids=str
)
def test_value_quantization_matches_brute_force(value_bits, group_size, causal, window):
    seed = 5 * window + causal + (value_bits or 0)
    context = f"seed={seed} value_bits={value_bits} group_size={group_size} causal={causal} window={window}"
    out, probs, want_out, want_probs = run_both(score="hamming", heads=(6, 2), Tq=3, causal=causal, window=window,
                                                value_bits=value_bits, group_size=group_size, temperature=0.4,
                                                seed=seed)
    check_probs(probs, 3, TK, causal, context)
    torch.testing.assert_close(probs.double(), want_probs, atol=2e-6, rtol=1e-5, msg=lambda m: f"{context}\n{m}")
    torch.testing.assert_close(out.double(), want_out, atol=1e-5, rtol=1e-5, msg=lambda m: f"{context}\n{m}")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("score", SCORES)
def test_half_precision_inputs(score, dtype):
    context = f"score={score} dtype={dtype}"
    out, probs, want_out, want_probs = run_both(score=score, heads=(6, 2), Tq=3, causal=True, window=2,
                                                value_bits=4, group_size=16, temperature=TEMPERATURE, seed=4,
                                                dtype=dtype)
    assert out.dtype == dtype, context
    check_probs(probs, 3, TK, True, context)
    torch.testing.assert_close(probs.double(), want_probs, atol=2e-6, rtol=1e-5, msg=lambda m: f"{context}\n{m}")
    eps = torch.finfo(dtype).eps  # the output is rounded once to the input dtype
    torch.testing.assert_close(out.double(), want_out, atol=eps, rtol=eps, msg=lambda m: f"{context}\n{m}")


# ---------------------------------------------------------------------------------------------------------
# Against torch SDPA


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("Tq", [1, 4, TK])
@pytest.mark.parametrize("score", SCORES)
def test_full_window_without_value_quantization_is_sdpa(score, Tq, causal):
    q, k, v = qkv(Tq=Tq, seed=Tq)
    s = SimHashSketcher(D, BITS, seed=Tq)
    out = h1b_attention(q, k, v, sketcher=s, score=score, temperature=0.5, value_bits=None, window=TK, causal=causal)
    torch.testing.assert_close(out, sdpa(q, k, v, causal), atol=1e-5, rtol=1e-5, msg=f"score={score}")


@pytest.mark.parametrize("window", [0, 2, TK])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("heads", [(6, 2), (4, 4), (3, 1)], ids=str)
def test_exact_score_without_value_quantization_is_sdpa(heads, causal, window):
    q, k, v = qkv(Hq=heads[0], Hkv=heads[1], Tq=4, seed=window)
    s = SimHashSketcher(D, BITS, seed=window)
    out = h1b_attention(q, k, v, sketcher=s, score="exact", value_bits=None, window=window, causal=causal)
    torch.testing.assert_close(out, sdpa(q, k, v, causal), atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------------------
# Estimators and temperature


@pytest.mark.parametrize("data_seed", [0, 1])
def test_asym_logits_are_unbiased_over_projections(data_seed):
    """Mean over 200 independent R of (estimate - <q,k>/sqrt(d)) is within 3 standard errors of 0."""
    q, k, _ = qkv(B=1, Hq=2, Hkv=1, Tq=3, Tk=4, d=16, seed=data_seed)
    norms = torch.linalg.vector_norm(k, dim=-1)  # exact norms: the estimator itself must be unbiased
    true = (q @ k.transpose(-1, -2) / math.sqrt(16)).double()  # [1, 2, 3, 4]
    errors = []
    for seed in range(1000, 1200):
        s = SimHashSketcher(16, 64, seed)
        est = sketched_logits(q, s.sketch(k), sketcher=s, score="asym", key_norms=norms)
        errors.append(est.double() - true)
    errors = torch.stack(errors)  # [200, 1, 2, 3, 4]
    mean, se = errors.mean(0), errors.std(0) / math.sqrt(len(errors))
    z = (mean / se).abs()
    assert (z < 3).all(), f"data_seed={data_seed}: |mean error| / se up to {z.max():.2f} (pairs: {z.flatten().tolist()})"
    assert (se < 0.1 * true.abs().mean()).all(), "the test has too little power to mean anything"


def test_cos_score_is_biased_at_few_bits():
    """Sanity check that the unbiasedness test above can fail: 'cos' with |q||k| is biased at small b."""
    q, k, _ = qkv(B=1, Hq=1, Hkv=1, Tq=2, Tk=3, d=16, seed=3)
    norms = torch.linalg.vector_norm(k, dim=-1)
    true = (q @ k.transpose(-1, -2) / 4).double()
    est = torch.stack([
        sketched_logits(q, s.sketch(k), sketcher=s, score="cos", key_norms=norms).double()
        for s in (SimHashSketcher(16, 8, seed) for seed in range(300))
    ]).mean(0)
    assert (est.abs() < true.abs()).float().mean() > 0.5  # E[cos(pi h / b)] shrinks toward 0 at b = 8


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("heads", [(6, 2), (2, 2)], ids=str)
def test_default_temperature_is_calibrated_temperature(heads, causal):
    q, k, v = qkv(Hq=heads[0], Hkv=heads[1], Tq=5, seed=heads[0] + causal)
    s = SimHashSketcher(D, BITS, seed=9)
    t = calibrate_temperature(q, k, sketcher=s, causal=causal)
    implicit = h1b_attention(q, k, v, sketcher=s, causal=causal, return_probs=True)
    explicit = h1b_attention(q, k, v, sketcher=s, causal=causal, temperature=t, return_probs=True)
    for a, b in zip(implicit, explicit):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


def brute_temperature(q, k, sketcher, causal, per_head):
    """std(1 - 2h/b) / std(q.k/sqrt(d)) over the visible pairs (the ratio does not depend on ddof)."""
    B, Hq, Tq, d = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    qc, kc = sketcher.sketch(q).tolist(), sketcher.sketch(k).tolist()
    a, e = [[] for _ in range(Hq)], [[] for _ in range(Hq)]
    for bi in range(B):
        for h in range(Hq):
            kh = h // (Hq // Hkv)
            for i in range(Tq):
                for j in range(Tk):
                    if causal and j > Tk - Tq + i:
                        continue
                    a[h].append(1 - 2 * popcount(qc[bi][h][i], kc[bi][kh][j]) / sketcher.bits)
                    e[h].append(float(q[bi, h, i].double() @ k[bi, kh, j].double()) / math.sqrt(d))
    if not per_head:
        a, e = [sum(a, [])], [sum(e, [])]
    return torch.tensor([statistics.pstdev(x) / statistics.pstdev(y) for x, y in zip(a, e)], dtype=torch.float64)


@pytest.mark.parametrize("per_head", [True, False])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("heads", [(6, 2), (3, 3)], ids=str)
def test_calibrate_temperature(heads, causal, per_head):
    q, k, _ = qkv(Hq=heads[0], Hkv=heads[1], Tq=4, seed=11)
    s = SimHashSketcher(D, BITS, seed=12)
    t = calibrate_temperature(q, k, sketcher=s, causal=causal, per_head=per_head)
    assert t.dtype == torch.float32
    assert t.shape == ((heads[0],) if per_head else ()), f"per_head={per_head}"
    assert (t > 0).all()
    torch.testing.assert_close(t.double().reshape(-1), brute_temperature(q, k, s, causal, per_head), atol=0, rtol=1e-5)
    # a std ratio: scaling q by 2 keeps the sketches and doubles the exact spread
    torch.testing.assert_close(calibrate_temperature(2 * q, k, sketcher=s, causal=causal, per_head=per_head), t / 2)


@pytest.mark.parametrize("temperature", [0.5, torch.tensor(0.5), [0.5] * 6, torch.full((6,), 0.5)], ids=str)
def test_temperature_forms_agree(temperature):
    q, k, v = qkv(seed=21)
    s = SimHashSketcher(D, BITS, seed=21)
    ref = h1b_attention(q, k, v, sketcher=s, temperature=0.5)
    torch.testing.assert_close(h1b_attention(q, k, v, sketcher=s, temperature=temperature), ref, atol=0, rtol=0)


# ---------------------------------------------------------------------------------------------------------
# Bad input


@pytest.fixture
def inputs():
    q, k, v = qkv(seed=30)
    return q, k, v, SimHashSketcher(D, BITS, seed=30)


def test_bad_dtypes(inputs):
    q, k, v, s = inputs
    for name in ("q", "k", "v"):
        for dtype in (torch.float64, torch.int32, torch.int64):
            args = {"q": q, "k": k, "v": v}
            args[name] = args[name].to(dtype)
            with pytest.raises(TypeError, match=rf"^{name} must have dtype"):
                h1b_attention(**args, sketcher=s, temperature=0.5)
    with pytest.raises(TypeError, match=r"^q must have dtype"):
        calibrate_temperature(q.double(), k, sketcher=s)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("name", ["q", "k", "v"])
def test_non_finite_inputs(inputs, name, bad):
    q, k, v, s = inputs
    args = {"q": q.clone(), "k": k.clone(), "v": v.clone()}
    args[name][0, 1, 2, 3] = bad
    with pytest.raises(ValueError, match=rf"^{name} contains NaN or Inf"):
        h1b_attention(**args, sketcher=s, temperature=0.5)


def test_shape_errors(inputs):
    q, k, v, s = inputs
    with pytest.raises(ValueError, match="head_dim"):
        h1b_attention(q, k, v, sketcher=SimHashSketcher(D + 8, BITS), temperature=0.5)
    with pytest.raises(ValueError, match="head_dim"):
        h1b_attention(q[..., :16], k, v, sketcher=s, temperature=0.5)
    with pytest.raises(ValueError, match="head_dim"):
        calibrate_temperature(q, k[..., :16], sketcher=s)
    q5, k2, v2 = qkv(Hq=5, Hkv=2)
    with pytest.raises(ValueError, match=r"q heads \(5\).*k heads \(2\)"):
        h1b_attention(q5, k2, v2, sketcher=s, temperature=0.5)
    with pytest.raises(ValueError, match=r"q heads"):
        calibrate_temperature(q5, k2, sketcher=s)
    with pytest.raises(ValueError, match=r"^v must have k's shape"):
        h1b_attention(q, k, v[:, :, :-1], sketcher=s, temperature=0.5)
    with pytest.raises(ValueError, match="batch"):
        h1b_attention(q, k[:1], v[:1], sketcher=s, temperature=0.5)
    with pytest.raises(ValueError, match=r"^q must have 4 dims"):
        h1b_attention(q[0], k, v, sketcher=s, temperature=0.5)
    with pytest.raises(ValueError, match=r"^k must have 4 dims"):
        h1b_attention(q, k[0], v, sketcher=s, temperature=0.5)
    q_long, k_short, v_short = qkv(Tq=5, Tk=4)
    with pytest.raises(ValueError, match=r"q may not have more positions"):
        h1b_attention(q_long, k_short, v_short, sketcher=s, temperature=0.5, causal=True)


def test_empty_inputs(inputs):
    q, k, v, s = inputs
    with pytest.raises(ValueError, match=r"^q is empty"):
        h1b_attention(q[:, :, :0], k, v, sketcher=s, temperature=0.5)
    with pytest.raises(ValueError, match=r"^k is empty"):
        h1b_attention(q, k[:, :, :0], v[:, :, :0], sketcher=s, temperature=0.5)
    with pytest.raises(ValueError, match=r"^q is empty"):
        h1b_attention(q[:0], k[:0], v[:0], sketcher=s, temperature=0.5)


def test_bad_options(inputs):
    q, k, v, s = inputs
    with pytest.raises(ValueError, match=r"^value_bits must be one of"):
        h1b_attention(q, k, v, sketcher=s, temperature=0.5, value_bits=3)
    with pytest.raises(ValueError, match="group_size"):
        h1b_attention(q, k, v, sketcher=s, temperature=0.5, value_bits=4, group_size=7)
    with pytest.raises(ValueError, match=r"^score must be one of"):
        h1b_attention(q, k, v, sketcher=s, score="dot")
    with pytest.raises(ValueError, match=r"^window must be in"):
        h1b_attention(q, k, v, sketcher=s, temperature=0.5, window=-1)
    with pytest.raises(TypeError, match=r"^window must be an int"):
        h1b_attention(q, k, v, sketcher=s, temperature=0.5, window=1.5)
    with pytest.raises(TypeError, match=r"^causal must be a bool"):
        h1b_attention(q, k, v, sketcher=s, temperature=0.5, causal=1)
    with pytest.raises(TypeError, match=r"^sketcher must be a SimHashSketcher"):
        h1b_attention(q, k, v, sketcher=None, temperature=0.5)
    with pytest.raises(TypeError, match=r"^sketcher"):
        calibrate_temperature(q, k, sketcher="simhash")


@pytest.mark.parametrize(
    "temperature",
    [0.0, -0.5, float("nan"), float("inf"), torch.tensor([0.5, 0.5, 0.0, 0.5, 0.5, 0.5]),
     torch.full((2,), 0.5), torch.full((6, 1), 0.5), torch.full((1, 6), 0.5), [0.5] * 5],
    ids=str,
)
def test_bad_temperature(inputs, temperature):
    q, k, v, s = inputs
    with pytest.raises(ValueError, match=r"^temperature must"):
        h1b_attention(q, k, v, sketcher=s, score="hamming", temperature=temperature)
    with pytest.raises(ValueError, match=r"^temperature must"):
        sketched_logits(q, s.sketch(k), sketcher=s, score="hamming", temperature=temperature)


def test_sketched_logits_bad_options(inputs):
    q, k, _, s = inputs
    codes = s.sketch(k)
    with pytest.raises(ValueError, match=r"^temperature is required"):
        sketched_logits(q, codes, sketcher=s, score="hamming")
    for score in ("cos", "asym"):
        with pytest.raises(ValueError, match=r"^key_norms is required"):
            sketched_logits(q, codes, sketcher=s, score=score)
    with pytest.raises(ValueError, match=r"^score must be one of"):
        sketched_logits(q, codes, sketcher=s, score="exact")  # needs the keys themselves


def test_sketched_logits_rejects_bad_head_counts(inputs):
    """A public entry point: a GQA mismatch must be refused by name, not fail inside a reshape."""
    q, k, _, s = inputs  # q has 6 heads
    codes = s.sketch(k[:, :1].expand(-1, 4, -1, -1))  # 4 kv heads: 6 is no multiple of 4
    with pytest.raises(ValueError, match="heads"):
        sketched_logits(q, codes, sketcher=s, score="hamming", temperature=0.5)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA ('meta' tensors cannot pass the NaN check that runs first)")
def test_mismatched_devices(inputs):
    q, k, v, s = inputs
    for name in ("k", "v"):
        args = {"q": q, "k": k, "v": v}
        args[name] = args[name].cuda()
        with pytest.raises(ValueError, match=rf"one device.*\b{name} on cuda"):
            h1b_attention(**args, sketcher=s, temperature=0.5)
    with pytest.raises(ValueError, match=r"one device.*\bk on cuda"):
        calibrate_temperature(q, k.cuda(), sketcher=s)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("score", SCORES)
def test_cuda_matches_cpu(score):
    q, k, v = qkv(seed=40)
    s = SimHashSketcher(D, BITS, seed=40)
    kwargs = dict(sketcher=s, score=score, temperature=TEMPERATURE, window=2, return_probs=True)
    out, probs = h1b_attention(q, k, v, **kwargs)
    out_c, probs_c = h1b_attention(q.cuda(), k.cuda(), v.cuda(), **kwargs)
    assert out_c.device.type == "cuda"
    torch.testing.assert_close(out_c.cpu(), out, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(probs_c.cpu(), probs, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("score", ["cos", "asym"])
def test_large_key_norms_do_not_overflow(score):
    """Keys whose norm exceeds the fp16 range (65504) are legal fp32 input: finite output or a named error."""
    q, k, v = qkv(seed=50)
    k = k / torch.linalg.vector_norm(k, dim=-1, keepdim=True) * 7e4  # entries ~1e4, |k| = 7e4
    q = q * 1e-4
    s = SimHashSketcher(D, BITS, seed=50)
    try:
        out = h1b_attention(q, k, v, sketcher=s, score=score)
    except ValueError as err:
        assert "k" in str(err)
    else:
        assert torch.isfinite(out).all(), f"score={score}: NaN/Inf output from finite input"


# ---------------------------------------------------------------------------------------------------------
# Inputs are never mutated


@pytest.mark.parametrize("score", SCORES)
def test_inputs_not_mutated(score):
    q, k, v = qkv(seed=60)
    s = SimHashSketcher(D, BITS, seed=60)
    temperature = TEMPERATURE.clone()
    before = [x.clone() for x in (q, k, v, temperature, s.projection)]
    h1b_attention(q, k, v, sketcher=s, score=score, temperature=temperature, window=2, value_bits=2, group_size=16,
                  return_probs=True)
    h1b_attention(q, k, v, sketcher=s, score=score, value_bits=None)
    calibrate_temperature(q, k, sketcher=s)
    calibrate_temperature(q, k, sketcher=s, per_head=False, causal=False)
    if score != "exact":
        codes, norms = s.sketch(k), torch.linalg.vector_norm(k, dim=-1)
        codes_before, norms_before = codes.clone(), norms.clone()
        sketched_logits(q, codes, sketcher=s, score=score, temperature=temperature, key_norms=norms)
        assert torch.equal(codes, codes_before) and torch.equal(norms, norms_before), f"score={score}"
    for x, x0, name in zip((q, k, v, temperature, s.projection), before, ("q", "k", "v", "temperature", "R")):
        assert torch.equal(x, x0), f"score={score}: {name} was modified"
