"""Run notebooks 01 (SimHash estimator error) and 02 (attention fidelity) with SMOKE parameters and check the
numbers they write to metrics.json against theory and against the expected trends in b."""
import pytest

from notebook_runner import run_notebook

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def lsh_metrics(tmp_path_factory):
    return run_notebook("01_lsh_cosine_error", tmp_path_factory.mktemp("nb01"))


@pytest.fixture(scope="module")
def fidelity_metrics(tmp_path_factory):
    return run_notebook("02_attention_fidelity", tmp_path_factory.mktemp("nb02"))


def test_01_angle_variance_matches_binomial_theory(lsh_metrics):
    bits = lsh_metrics["bits"]
    assert bits == sorted(bits) and len(bits) >= 4
    for b in bits:
        rnd = lsh_metrics["random"][str(b)]
        assert 0.8 <= rnd["var_ratio"] <= 1.25, (b, rnd["var_ratio"])
        assert rnd["var_empirical"] == pytest.approx(rnd["var_theory"], rel=0.25)
        assert abs(rnd["bias"]) < 4 * (rnd["var_theory"] / lsh_metrics["n_random_pairs"]) ** 0.5 + 1e-3
        # the asymmetric estimator's variance follows (pi/2 - cos^2) / b as well
        assert 0.8 <= rnd["asym_var_ratio"] <= 1.25
        # real vectors: same law within a looser band (structured data, one R per head)
        assert 0.7 <= lsh_metrics["real"][str(b)]["var_ratio"] <= 1.4


def test_01_mae_decreases_with_bits_like_inverse_sqrt(lsh_metrics):
    for data in ("random", "real"):
        mae = [lsh_metrics[data][str(b)]["mae"] for b in lsh_metrics["bits"]]
        assert all(a > b for a, b in zip(mae, mae[1:])), (data, mae)
    for slopes in lsh_metrics["mae_local_slopes"].values():
        assert all(-0.75 < s < -0.3 for s in slopes), slopes


def test_01_linear_score_is_unbiased_for_its_target_not_the_cosine(lsh_metrics):
    top = lsh_metrics["random"][str(lsh_metrics["bits"][-1])]
    assert abs(top["score_bias"]) < 0.01
    # as a cosine estimate it plateaus at its bias: the cosine-corrected estimate does far better at large b
    assert top["score_vs_cos_rmse"] > 2 * top["cos_rmse"]


def test_02_kl_falls_and_recall_rises_with_bits(fidelity_metrics):
    lo, hi = str(fidelity_metrics["bits"][0]), str(fidelity_metrics["bits"][-1])
    assert {"hamming", "cos", "asym"} <= set(fidelity_metrics["scores"])
    for score in fidelity_metrics["scores"]:
        assert fidelity_metrics["kl"][score][hi] < fidelity_metrics["kl"][score][lo], score
        assert fidelity_metrics["recall@32"][score][hi] > fidelity_metrics["recall@32"][score][lo], score
        assert fidelity_metrics["recall@8"][score][hi] > fidelity_metrics["recall@8"][score][lo], score
        assert fidelity_metrics["out_rel_err"][score][hi] < fidelity_metrics["out_rel_err"][score][lo], score


def test_02_metrics_are_sane(fidelity_metrics):
    for score in fidelity_metrics["scores"]:
        for b in map(str, fidelity_metrics["bits"]):
            assert fidelity_metrics["kl"][score][b] > 0
            assert 0 < fidelity_metrics["recall@8"][score][b] <= 1
            assert 0 < fidelity_metrics["recall@32"][score][b] <= 1
            assert -1 <= fidelity_metrics["spearman"][score][b] <= 1
    # 4-bit values with exact keys cost far less than any 1-bit key sketch
    assert fidelity_metrics["values_only_out_rel_err"] < 0.2
    assert fidelity_metrics["values_only_out_rel_err"] < min(
        v[str(fidelity_metrics["bits"][-1])] for v in fidelity_metrics["out_rel_err"].values()
    )


def test_01_02_record_device_and_dtype(lsh_metrics, fidelity_metrics):
    for m in (lsh_metrics, fidelity_metrics):  # DEVICE="auto", DTYPE="auto" on a CPU-only machine
        assert m["device"] == "cpu" and m["dtype"] == "float32" and m["device_name"]
