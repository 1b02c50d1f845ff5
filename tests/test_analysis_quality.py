"""h1bkv_lite.analysis.quality: sweep construction, byte accounting, Pareto front vs brute force, verdict logic
on synthetic tables, and bad inputs. No model needed (fast)."""
import numpy as np
import pandas as pd
import pytest

from h1bkv_lite import memory
from h1bkv_lite.analysis import quality as Q

SHAPE = memory.PRESETS["smollm2-135m"]


# ------------------------------------------------------------------------------------------------ sweep
def test_default_sweep_has_every_requested_setting_once():
    s = Q.build_sweep(h1b_extra=[dict(bits=256, score="asym", value_bits=2, window=64, sink=4)])
    names = [x.name for x in s]
    assert len(names) == len(set(names))
    fam = pd.Series([x.family for x in s]).value_counts().to_dict()
    # 4 b x 3 scores x 2 windows + 1 extra; KIVI 2/4; 3 streaming budgets; 1 H2O; 3 Loki ranks; FP16
    assert fam == {"h1b": 25, "kivi": 2, "streaming": 3, "h2o": 1, "loki": 3, "fp16": 1}
    h1b = [x for x in s if x.family == "h1b" and x.value_bits == 4]
    assert {(x.bits, x.score, x.window, x.sink) for x in h1b} == {
        (b, sc, w, sk) for b in [32, 64, 128, 256] for sc in ["hamming", "cos", "asym"] for w, sk in [(0, 0), (64, 4)]}
    assert s[0].family == "fp16"
    assert {x.budget for x in s if x.family == "streaming"} == {64, 128, 256}
    assert all(x.sink == 4 for x in s if x.family in ("streaming", "h2o"))
    assert {(x.rank, x.top_k) for x in s if x.family == "loki"} == {(8, 64), (16, 64), (32, 64)}
    extra = [x for x in s if x.family == "h1b" and x.value_bits == 2]
    assert [x.name for x in extra] == ["H1B b=256 asym v2 w64+4s"]


def test_empty_families_are_left_out():
    s = Q.build_sweep(h1b_bits=[64], h1b_scores=["asym"], h1b_windows=[(0, 0)], kivi_bits=[], streaming_budgets=[],
                      h2o_budgets=[], loki_ranks=[], fp16=False)
    assert [x.name for x in s] == ["H1B b=64 asym v4"]


@pytest.mark.parametrize("kwargs, err", [
    (dict(h1b_bits=[12]), ValueError),
    (dict(h1b_bits=[64, 64]), ValueError),
    (dict(h1b_bits=[64.0]), TypeError),
    (dict(h1b_scores=["exact"]), ValueError),
    (dict(h1b_value_bits=[3]), ValueError),
    (dict(h1b_windows=[(64,)]), TypeError),
    (dict(h1b_windows=[(-1, 0)]), ValueError),
    (dict(h1b_extra=[dict(bits=64, score="asym")] * 2), ValueError),  # duplicated setting
    (dict(h1b_extra=[(64, "asym")]), TypeError),
    (dict(kivi_bits=[3]), ValueError),
    (dict(streaming_budgets=[0]), ValueError),
    (dict(streaming_budgets=[4]), ValueError),  # budget must exceed the 4 sinks
    (dict(loki_ranks=[0]), ValueError),
    (dict(loki_top_k=0), ValueError),
])
def test_build_sweep_rejects_bad_input(kwargs, err):
    with pytest.raises(err):
        Q.build_sweep(**kwargs)


def test_setting_validation():
    with pytest.raises(ValueError, match="family"):
        Q.Setting("sparse")
    with pytest.raises(ValueError, match="needs score"):
        Q.Setting("h1b", bits=64, value_bits=4)
    with pytest.raises(ValueError, match="does not apply"):
        Q.Setting("kivi", bits=2, group_size=32, residual=128, window=16)
    with pytest.raises(ValueError, match="does not apply"):
        Q.Setting("fp16", budget=3)
    with pytest.raises(ValueError, match="oracle"):
        Q.Setting("h1b", bits=64, score="hamming", value_bits=4).factory()
    with pytest.raises(ValueError, match="loki_basis"):
        Q.Setting("loki", rank=8, top_k=64).factory()
    with pytest.raises(TypeError):
        Q.scheme_of("H1B b=64")
    assert Q.Setting("h1b", bits=64, score="cos", value_bits=4, window=64, sink=4).name == "H1B b=64 cos v4 w64+4s"
    assert Q.Setting("h1b", bits=64, score="cos", value_bits=4, window=16).name == "H1B b=64 cos v4 w16"
    assert Q.Setting("loki", rank=8, top_k=64).params == {"family": "loki", "rank": 8, "top_k": 64}


def test_factories_build_the_right_caches():
    import torch

    from h1bkv_lite.baselines import EvictionCache, KIVICache, LokiCache
    from h1bkv_lite.cache import H1BCache

    f = Q.Setting("h1b", bits=64, score="hamming", value_bits=2, window=8, sink=2).factory(temperature=0.5, seed=3)
    assert f.func is H1BCache and f.keywords == dict(bits=64, score="hamming", value_bits=2, window=8, sink=2, seed=3,
                                                     temperature=0.5)
    assert "temperature" not in Q.Setting("h1b", bits=64, score="asym", value_bits=4).factory().keywords
    assert Q.Setting("h2o", budget=64, sink=4).factory().keywords == dict(budget=64, policy="h2o", sink=4)
    assert Q.Setting("kivi", bits=2, group_size=32, residual=128).factory().func is KIVICache
    assert Q.Setting("streaming", budget=64).factory().func is EvictionCache
    basis = torch.zeros(1)
    assert Q.Setting("loki", rank=8, top_k=64).factory(loki_basis=basis).func is LokiCache


# ------------------------------------------------------------------------------------------------ bytes
def test_bytes_per_token_is_kv_cache_bytes_per_token():
    n = 512
    for s in Q.build_sweep(h1b_extra=[dict(bits=256, score="asym", value_bits=2, window=64, sink=4)]):
        total = memory.kv_cache_bytes(SHAPE, n, 1, Q.scheme_of(s)).total
        assert Q.bytes_per_token(SHAPE, n, s) == total / n
    fp16 = Q.bytes_per_token(SHAPE, n, Q.Setting("fp16"))
    assert fp16 == 2 * 30 * 3 * 64 * 2  # K and V, fp16
    assert Q.bits_per_element(SHAPE, fp16) == 16
    # H1B b=64, 4-bit per-token values, no norms: 8 + 32 + 4 bytes per token-head
    assert Q.bytes_per_token(SHAPE, n, Q.Setting("h1b", bits=64, score="hamming", value_bits=4)) == 90 * 44
    # cos/asym add an fp16 norm
    assert Q.bytes_per_token(SHAPE, n, Q.Setting("h1b", bits=64, score="asym", value_bits=4)) == 90 * 46
    # eviction keeps budget tokens of n
    assert Q.bytes_per_token(SHAPE, n, Q.Setting("streaming", budget=128, sink=4)) == fp16 * 128 / n


def test_h1b_sink_costs_what_window_tokens_cost():
    n = 300
    with_sink = Q.Setting("h1b", bits=64, score="asym", value_bits=4, window=64, sink=4)
    wider = Q.Setting("h1b", bits=64, score="asym", value_bits=4, window=68)
    assert Q.bytes_per_token(SHAPE, n, with_sink) == Q.bytes_per_token(SHAPE, n, wider)
    per_head = (n - 68) * (8 + 2 + 32 + 4) + 68 * 64 * 2 * 2
    assert Q.bytes_per_token(SHAPE, n, with_sink) == 90 * per_head / n


def test_sweep_table_columns_and_values():
    s = Q.build_sweep(h1b_bits=[64], h1b_scores=["hamming"], h1b_windows=[(0, 0)], streaming_budgets=[64],
                      h2o_budgets=[], loki_ranks=[8])
    t = Q.sweep_table(s, SHAPE, 512)
    assert list(t.name) == [x.name for x in s]
    row = t.set_index("name").loc["H1B b=64 hamming v4"]
    assert row.bits_per_element == pytest.approx(8 * 90 * 44 / (2 * 90 * 64))
    assert row.key_bits_per_element == 1.0 and row.value_bits_per_element == 4.5
    assert t.set_index("name").loc["FP16"].fp16_fraction == 1.0
    assert t.set_index("name").loc["StreamingLLM 64"].bytes_per_token_8k == 23040 * 64 / 8192
    assert t.set_index("name").loc["Loki r8 k64"].bytes_per_token > 23040


def test_exact_fraction():
    assert Q.exact_fraction(Q.Setting("fp16"), 256) == 1.0
    assert Q.exact_fraction(Q.Setting("loki", rank=8, top_k=64), 256) == 1.0
    assert Q.exact_fraction(Q.Setting("h1b", bits=64, score="asym", value_bits=4, window=64, sink=4), 272) == 0.25
    assert Q.exact_fraction(Q.Setting("h1b", bits=64, score="asym", value_bits=4), 100) == 0.0
    assert Q.exact_fraction(Q.Setting("h1b", bits=64, score="asym", value_bits=4, window=64, sink=4), 50) == 1.0
    kivi = Q.Setting("kivi", bits=2, group_size=32, residual=128)
    assert Q.exact_fraction(kivi, 128) == 1.0
    assert Q.exact_fraction(kivi, 256) == 128 / 256  # 128 quantized (4 whole groups), 128 residual
    assert Q.exact_fraction(kivi, 250) == 154 / 250  # 96 quantized, 154 exact
    assert Q.exact_fraction(Q.Setting("streaming", budget=256, sink=4), 256) == 1.0
    assert Q.exact_fraction(Q.Setting("h2o", budget=128, sink=4), 512) == 0.25
    with pytest.raises(ValueError):
        Q.exact_fraction(kivi, 0)
    with pytest.raises(TypeError):
        Q.exact_fraction("KIVI-2", 10)


# ------------------------------------------------------------------------------------------------ Pareto
def brute_front(x, y):
    n = len(x)
    return np.array([not any(x[j] <= x[i] and y[j] <= y[i] and (x[j] < x[i] or y[j] < y[i]) for j in range(n))
                     for i in range(n)])


@pytest.mark.parametrize("seed", range(30))
def test_pareto_front_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 40))
    # small integer grids: many ties in x, in y and identical points
    x = rng.integers(0, 8, n).astype(float)
    y = rng.integers(0, 8, n).astype(float)
    df = pd.DataFrame({"bytes_per_token": x, "ppl": y}, index=rng.permutation(100)[:n])
    got = Q.pareto_front(df)
    assert got.index.equals(df.index)
    np.testing.assert_array_equal(got.to_numpy(), brute_front(x, y))


def test_pareto_front_simple_cases():
    df = pd.DataFrame({"bytes_per_token": [1, 2, 3, 2, 1], "ppl": [5, 3, 1, 4, 5]})
    assert Q.pareto_front(df).tolist() == [True, True, True, False, True]  # identical points both kept
    assert Q.pareto_front(df.iloc[:0]).tolist() == []
    other = pd.DataFrame({"a": [1, 2], "b": [2, 1]})
    assert Q.pareto_front(other, x="a", y="b").tolist() == [True, True]


def test_pareto_front_bad_input():
    with pytest.raises(KeyError):
        Q.pareto_front(pd.DataFrame({"bytes_per_token": [1.0]}))
    with pytest.raises(ValueError):
        Q.pareto_front(pd.DataFrame({"bytes_per_token": [1.0, 2.0], "ppl": [1.0, float("nan")]}))
    with pytest.raises(TypeError):
        Q.pareto_front({"bytes_per_token": [1.0], "ppl": [1.0]})


# ------------------------------------------------------------------------------------------------ verdicts
def table(rows):
    return pd.DataFrame(rows, columns=["name", "family", "bytes_per_token", "ppl"])


def test_challenger_better_when_it_beats_at_lower_bytes_and_never_loses():
    df = table([("FP16", "fp16", 100, 10), ("h1", "h1b", 20, 11), ("h2", "h1b", 40, 10.5),
                ("k2", "kivi", 40, 12), ("k4", "kivi", 50, 10.8)])
    c = Q.compare_families(df, baselines=["kivi"]).iloc[0]
    assert c.verdict == "challenger better" and c.claim_holds
    assert (c.baseline_beaten, c.challenger_beaten) == (2, 0)
    assert c.example == "h2 beats k2"  # the cheapest beaten baseline point, by the best challenger at <= bytes
    assert c.best_challenger == "h2" and c.best_baseline == "k4"


def test_baseline_better_and_matched_bytes_tie_counts_for_the_lower_ppl():
    df = table([("h1", "h1b", 20, 300), ("h2", "h1b", 40, 100), ("s64", "streaming", 20, 50),
                ("s128", "streaming", 60, 40)])
    c = Q.compare_families(df, baselines=["streaming"]).iloc[0]
    assert c.verdict == "baseline better" and not c.claim_holds
    assert (c.baseline_beaten, c.challenger_beaten) == (0, 2)
    assert c.example == "s64 beats h1"


def test_mixed_and_neither():
    df = table([("h1", "h1b", 10, 20), ("h2", "h1b", 50, 20), ("k", "kivi", 30, 25), ("k2", "kivi", 40, 15),
                ("l", "loki", 200, 5)])
    c = Q.compare_families(df, baselines=["kivi", "loki", "h2o"]).set_index("baseline")
    assert "h2o" not in c.index  # families absent from the table are skipped
    assert c.loc["kivi", "verdict"] == "mixed"
    assert (c.loc["kivi", "baseline_beaten"], c.loc["kivi", "challenger_beaten"]) == (1, 1)
    assert c.loc["loki", "verdict"] == "neither" and not c.loc["loki", "claim_holds"]
    lines = Q.verdict_lines(c.reset_index(), df[Q.pareto_front(df)])
    assert "mixed" in lines[0] and "neither beats the other" in lines[1] and "Every H1B-KV setting is smaller" in lines[1]
    assert lines[-1].startswith("**Pareto front")


def test_neither_with_overlapping_bytes_is_not_called_smaller():
    df = table([("h1", "h1b", 10, 50), ("h2", "h1b", 100, 40), ("l", "loki", 50, 30), ("l2", "loki", 200, 20)])
    assert Q.compare_families(df, baselines=["loki"]).iloc[0].verdict == "baseline better"  # l beats h2
    df = table([("h1", "h1b", 10, 50), ("h2", "h1b", 100, 40), ("l", "loki", 50, 60), ("l2", "loki", 200, 20)])
    assert Q.compare_families(df, baselines=["loki"]).iloc[0].verdict == "challenger better"  # h1 beats l
    # no win either way, but H1B's largest setting is bigger than Loki's smallest: no "every setting is smaller"
    df = table([("h1", "h1b", 10, 50), ("h2", "h1b", 100, 40), ("l2", "loki", 50, 45)])
    c = Q.compare_families(df, baselines=["loki"])
    assert c.iloc[0].verdict == "neither" and c.iloc[0].max_challenger_x == 100
    line = Q.verdict_lines(c)[0]
    assert "neither beats the other at matched or lower bytes" in line and "smaller" not in line


def test_equal_ppl_is_not_a_win():
    df = table([("h", "h1b", 10, 20), ("k", "kivi", 10, 20)])
    assert Q.compare_families(df, baselines=["kivi"]).iloc[0].verdict == "neither"


def test_compare_families_bad_input():
    df = table([("h", "h1b", 10, 20), ("k", "kivi", 10, 20)])
    with pytest.raises(ValueError, match="no 'h1b'"):
        Q.compare_families(df[df.family == "kivi"])
    with pytest.raises(ValueError):
        Q.compare_families(df, baselines=["sparsellm"])
    with pytest.raises(ValueError, match="also listed"):
        Q.compare_families(df, baselines=["h1b"])
    with pytest.raises(KeyError):
        Q.compare_families(df.drop(columns="family"))
    with pytest.raises(ValueError):
        Q.compare_families(df.assign(ppl=[float("inf"), 1.0]))


def h1b_rows():
    rows = []
    for b, s, w, sk, v, ppl in [(32, "asym", 0, 0, 4, 900), (64, "asym", 0, 0, 4, 400), (32, "hamming", 0, 0, 4, 500),
                                 (64, "hamming", 0, 0, 4, 450), (32, "asym", 64, 4, 4, 450), (64, "asym", 64, 4, 4, 200),
                                 (64, "asym", 64, 4, 2, 260)]:
        st = Q.Setting("h1b", bits=b, score=s, value_bits=v, window=w, sink=sk)
        rows.append({"name": st.name, **st.params, "ppl": ppl, "bytes_per_token": 1.0})
    rows.append({"name": "FP16", "family": "fp16", "ppl": 30, "bytes_per_token": 9.0})
    return pd.DataFrame(rows)


def test_h1b_effects():
    e = Q.h1b_effects(h1b_rows())
    assert e["bits"] == [32, 64]
    assert e["window"] == {(32, "asym", 64, 4): 0.5, (64, "asym", 64, 4): 0.5}
    assert e["best_score"] == {(32, 0, 0): "hamming", (64, 0, 0): "asym", (32, 64, 4): "asym", (64, 64, 4): "asym"}
    assert e["bits_trend"][("asym", 0, 0)] == [900, 400]
    assert e["value_bits"] == {"H1B b=64 asym v2 w64+4s": pytest.approx(1.3)}
    with pytest.raises(ValueError):
        Q.h1b_effects(h1b_rows().query("family == 'fp16'"))
    with pytest.raises(KeyError):
        Q.h1b_effects(h1b_rows().drop(columns="score"))


def test_matched_settings_picks_paper_form_best_and_nearest_bytes():
    s = Q.build_sweep(h1b_bits=[64, 256], h1b_scores=["hamming", "asym"], h1b_windows=[(0, 0)], kivi_bits=[2, 4],
                      streaming_budgets=[64, 256], h2o_budgets=[], loki_ranks=[8])
    t = Q.sweep_table(s, SHAPE, 512)
    t["ppl"] = [30, 500, 900, 300, 150, 33, 31, 40, 35, 32]  # best H1B: b=256 asym (6300 B/token)
    got = [x.name for x in Q.matched_settings(t, s)]
    assert got == ["FP16", "H1B b=256 hamming v4", "H1B b=256 asym v4", "KIVI-2", "StreamingLLM 256", "Loki r8 k64"]  # 11520 is nearer 6300 than 2880 in log
    with pytest.raises(ValueError):
        Q.matched_settings(t, s[:3])


# ------------------------------------------------------------------------------------------------ passkey, agreement
def test_passkey_summary_and_usable_lengths():
    rows = []
    results = [("fp16", {128: [1, 1, 0, 1], 512: [0, 1, 0, 0]}), ("H1B", {128: [0, 1, 0, 0], 512: [0, 0, 0, 0]})]
    for method, acc in results:
        for n, res in acc.items():
            rows += [{"method": method, "length": n, "correct": bool(c)} for c in res]
    df = pd.DataFrame(rows)
    assert Q.usable_passkey_lengths(df[df.method == "fp16"], 0.5) == [128]
    assert Q.usable_passkey_lengths(df[df.method == "fp16"], 0.25) == [128, 512]
    s = Q.passkey_summary(df).set_index(["method", "length"])
    assert s.loc[("fp16", 128), "accuracy"] == 0.75 and s.loc[("fp16", 128), "trials"] == 4
    assert s.loc[("H1B", 128), "relative"] == pytest.approx(1 / 3)
    assert s.loc[("H1B", 512), "fp16_accuracy"] == 0.25 and s.loc[("H1B", 512), "correct"] == 0
    with pytest.raises(ValueError):
        Q.usable_passkey_lengths(df, 1.5)
    with pytest.raises(KeyError):
        Q.passkey_summary(df.drop(columns="correct"))


def test_agreement_summary_and_prompts():
    df = pd.DataFrame({"method": ["a", "a", "b"], "prompt": [0, 1, 0], "prompt_tokens": [300] * 3, "n_new": [32] * 3,
                       "match_rate": [1.0, 0.5, 0.25], "first_mismatch": [32, 3, 0],
                       "teacher_forced_match": [1.0, 0.75, 0.5]})
    s = Q.agreement_summary(df).set_index("method")
    assert s.loc["a", "match_rate"] == 0.75 and s.loc["a", "prompts"] == 2 and s.loc["b", "first_mismatch"] == 0
    assert Q.agreement_prompts(range(10), 2, 3, start=4) == [[4, 5, 6], [7, 8, 9]]
    with pytest.raises(ValueError):
        Q.agreement_prompts(range(10), 2, 4, start=4)
    with pytest.raises(KeyError):
        Q.agreement_summary(df.drop(columns="match_rate"))
