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


def _is_grid(result: dict) -> bool:
    rows = result.get("rows") or []
    return bool(rows) and all(isinstance(r, dict) and "speedup" in r for r in rows)


@pytest.fixture(scope="module")
def results_path():
    paths = sorted((ROOT / "benchmarks" / "results").glob("decode_*.json"))
    paths = [p for p in paths if "tune" not in p.name  # a grid of decode.py (not a tuning sweep, not commits compared)
             and _is_grid(json.loads(p.read_text()))]
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


def test_generate_ratios_use_the_dynamic_row_of_the_same_file(tmp_path):
    """Two runs with the same (model, batch, prompt) each divide by their own DynamicCache row; labels name the
    cache and its settings (h1b-graph rows too)."""
    from h1bkv_lite.kernels.report import load_generate_results

    def row(cache, tok_s, bits=None, score=None):
        return {"model": "m", "batch": 1, "prompt_len": 8192, "cache": cache, "bits": bits, "score": score,
                "oom": False, "prefill_s": 1.0, "decode_tok_s": tok_s, "peak_over_weights_bytes": 10,
                "cache_bytes": 5}

    for name, dyn, h1b in (("a.json", 20.0, 10.0), ("b.json", 40.0, 30.0)):
        rows = [row("dynamic", dyn), row("h1b", h1b, 128, "hamming"), row("h1b-graph", 4 * h1b, 128, "hamming")]
        (tmp_path / name).write_text(json.dumps({"device": "X", "rows": rows}))
    df = load_generate_results(sorted(tmp_path.glob("*.json"))).set_index(["source", "label"])
    a, b = str(tmp_path / "a.json"), str(tmp_path / "b.json")
    assert df.loc[(a, "h1b b=128 hamming"), "decode_tok_s_vs_dynamic"] == pytest.approx(0.5)
    assert df.loc[(b, "h1b b=128 hamming"), "decode_tok_s_vs_dynamic"] == pytest.approx(0.75)
    assert df.loc[(b, "h1b-graph b=128 hamming"), "decode_tok_s_vs_dynamic"] == pytest.approx(3.0)
    merged = [{**row("dynamic", 20.0), "run_id": "r1"}, {**row("h1b-graph", 40.0, 128, "hamming"), "run_id": "r1"},
              {**row("dynamic", 10.0), "run_id": "r2"}, {**row("h1b-graph", 40.0, 128, "hamming"), "run_id": "r2"}]
    (tmp_path / "merged.json").write_text(json.dumps({"device": "X", "rows": merged}))
    df = load_generate_results(tmp_path / "merged.json").set_index(["run_id", "label"])
    assert df.loc[("r1", "h1b-graph b=128 hamming"), "decode_tok_s_vs_dynamic"] == pytest.approx(2.0)
    assert df.loc[("r2", "h1b-graph b=128 hamming"), "decode_tok_s_vs_dynamic"] == pytest.approx(4.0)
    chunked = [{**row("dynamic", 20.0), "prefill_chunk": 8192}, {**row("h1b", 10.0, 128, "hamming"), "prefill_chunk": 8192}]
    (tmp_path / "chunked.json").write_text(json.dumps({"device": "X", "rows": chunked}))
    df = load_generate_results(tmp_path / "chunked.json").set_index("label")
    assert df.loc["h1b b=128 hamming, chunks of 8192", "decode_tok_s_vs_dynamic"] == pytest.approx(0.5)
    assert "dynamic, chunks of 8192" in df.index
