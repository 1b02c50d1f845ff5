"""Notebook 07 (kernel performance) runs on the committed benchmark JSON and reports consistent numbers."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]


def _run_notebook():
    spec = importlib.util.spec_from_file_location("notebook_runner", ROOT / "tests" / "notebook_runner.py")
    runner = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(runner)
    return runner.run_notebook


@pytest.fixture(scope="module")
def results_path():
    paths = sorted((ROOT / "benchmarks" / "results").glob("decode_*.json"))
    paths = [p for p in paths if "tune" not in p.name]
    if not paths:
        pytest.skip("no committed decode benchmark results")
    return paths[0]


def test_notebook_07_reads_results(tmp_path, results_path):
    metrics = _run_notebook()("07_kernel_performance", tmp_path, RESULTS=str(results_path))
    raw = json.loads(results_path.read_text())
    assert metrics["device"] == raw["device"]
    rows = [r for r in raw["rows"] if r["score"] == "hamming" and r["bits"] == 128]
    assert metrics["speedup_hamming_b128_max"] == pytest.approx(max(r["speedup"] for r in rows))
    assert 0 < metrics["h1b_frac_of_copy_hamming_b128_max"] <= 1.0
    assert metrics["max_rel_err_vs_reference"] < 5e-3  # fp16 output against the fp32 reference
    for name in ("decode_time_vs_context", "decode_speedup", "decode_bandwidth", "generate_vs_dynamic"):
        assert (tmp_path / f"{name}.png").exists()
    generate = [json.loads(p.read_text()) for p in sorted((ROOT / "benchmarks" / "results").glob("generate_*.json"))]
    rows = [r for g in generate for r in g["rows"] if r["cache"] == "h1b" and r["bits"] == 128
            and r["score"] == "hamming" and r["batch"] == 1 and not r["oom"]]
    assert rows and metrics["generate_h1b_syncs_per_decode_step_max"] <= 1  # transformers' mask, not the cache
    assert 0 < metrics["generate_peak_vs_dynamic_max"] < 1


def test_notebook_07_without_generate_results(tmp_path, results_path):
    metrics = _run_notebook()("07_kernel_performance", tmp_path, RESULTS=str(results_path), GENERATE_RESULTS="")
    assert "generate_peak_vs_dynamic_max" not in metrics
    assert not (tmp_path / "generate_vs_dynamic.png").exists()


@pytest.mark.parametrize("where", ["repo root", "elsewhere"])
def test_notebook_07_runs_from_any_working_directory(tmp_path, where):
    """The default (relative) RESULTS path resolves from notebooks/, whatever the working directory."""
    import papermill as pm

    cwd = ROOT if where == "repo root" else tmp_path
    out = tmp_path / "out"
    pm.execute_notebook(str(ROOT / "notebooks" / "07_kernel_performance.ipynb"), str(tmp_path / "run.ipynb"),
                        parameters={"SMOKE": True, "FIG_DIR": str(out)}, cwd=str(cwd), progress_bar=False,
                        kernel_name="python3", execution_timeout=600)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["device"] == json.loads((ROOT / "benchmarks/results/decode_h200.json").read_text())["device"]
    assert (out / "generate_vs_dynamic.png").exists()
