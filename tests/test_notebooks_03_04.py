"""Run notebooks 03 (value quantization) and 04 (memory accounting) with SMOKE parameters; check their metrics."""
from __future__ import annotations

import pytest

from notebook_runner import run_notebook

pytestmark = pytest.mark.slow

SCHEMES_COARSE_TO_FINE = ["per-token", "group 32", "group 16", "group 8"]


@pytest.fixture(scope="module")
def values_metrics(tmp_path_factory):
    return run_notebook("03_value_quantization", tmp_path_factory.mktemp("nb03"))


@pytest.fixture(scope="module")
def memory_metrics(tmp_path_factory):
    return run_notebook("04_memory_accounting", tmp_path_factory.mktemp("nb04"))


def test_value_error_falls_with_bits(values_metrics):
    recon = values_metrics["reconstruction_mean_rel_error"]
    for scheme in SCHEMES_COARSE_TO_FINE:
        assert recon["2"][scheme] > recon["4"][scheme] > recon["8"][scheme] > 0
    out = values_metrics["output_mean_rel_error"]
    assert out["2"]["per-token"] > out["4"]["per-token"] > out["8"]["per-token"] > 0
    assert values_metrics["errors_fall_with_bits"] is True


def test_smaller_groups_give_lower_error(values_metrics):
    recon = values_metrics["reconstruction_mean_rel_error"]
    for bits in ("2", "4", "8"):
        errs = [recon[bits][s] for s in SCHEMES_COARSE_TO_FINE]
        assert errs == sorted(errs, reverse=True) and len(set(errs)) == len(errs)
    assert values_metrics["smaller_groups_lower_error"] is True
    # and they cost metadata: bits + 32 / group_size at head_dim 64
    assert values_metrics["bits_per_element"]["4"] == {"per-token": 4.5, "group 32": 5.0, "group 16": 6.0, "group 8": 8.0}


def test_per_token_error_tracks_range_over_rms(values_metrics):
    assert values_metrics["spearman_range_to_rms_vs_error"] > 0.5


def test_measured_cache_bytes_equal_the_prediction(memory_metrics):
    rows = memory_metrics["measured"]
    assert rows and {r["source"] for r in rows} >= {"allocated tensors"}
    for r in rows:
        assert r["measured_bytes"] == pytest.approx(r["predicted_bytes"], rel=0.01), r
    assert memory_metrics["max_measured_rel_diff"] <= 0.01


def test_paper_table_checks(memory_metrics):
    assert memory_metrics["llama2_7b_fp16_8k_mb"] == pytest.approx(4300.2, rel=0.002)
    assert memory_metrics["paper_h1b_7b_mb"] == 58.7
    assert memory_metrics["h1b_7b_8k_mb"] > 8 * 58.7
    rows = {(r["model"], r["method"]): r for r in memory_metrics["paper_rows"]}
    assert rows[("7B", "FP16")]["verdict"].startswith("reproduced")
    assert rows[("7B", "H1B-KV")]["verdict"].startswith("impossible")
    assert rows[("60M", "H1B-KV")]["verdict"].startswith("impossible")
    assert memory_metrics["h1b_7b_ratio_ours"] < memory_metrics["cap"]["d128_no_scales"] < memory_metrics["h1b_7b_ratio_paper"]


def test_03_04_record_device_and_dtype(values_metrics, memory_metrics):
    assert values_metrics["device"] == "cpu" and values_metrics["dtype"] == "float32"
    assert memory_metrics["device"] == "cpu" and memory_metrics["dtype"] == "bfloat16"  # 04's default DTYPE
