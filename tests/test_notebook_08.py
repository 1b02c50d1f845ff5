"""Notebook 08 (closing the gap) runs headlessly with SMOKE parameters on the committed runs and writes the
ladder in issue 11's schema."""
import json
from pathlib import Path

import pytest
from notebook_runner import ROOT, run_notebook

from h1bkv_lite.runs import RUNG_FIELDS, in_progress, ladder, read_runs

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def metrics(tmp_path_factory):
    return run_notebook("08_closing_the_gap", tmp_path_factory.mktemp("nb08"), THREADS=1)


def test_notebook_08_writes_figures(metrics):
    for name in ("heldout_curves", "ladder", "switches_unadapted"):
        for ext in ("png", "svg"):
            assert (Path(metrics["fig_dir"]) / f"{name}.{ext}").stat().st_size > 0


def test_notebook_08_ladder_is_the_committed_runs(metrics):
    expected = ladder(read_runs(ROOT / "results" / "finetune"), context=metrics["context"])
    assert [r["name"] for r in metrics["rungs"]] == [r["name"] for r in expected["rungs"]]
    for rung in [*metrics["rungs"], metrics["fp16"], metrics["fp16_same_finetune"]]:
        assert set(RUNG_FIELDS) <= set(rung)
    b128 = next(r for r in metrics["rungs"] if r["name"] == "paper_b128")
    summary = json.loads((ROOT / "results" / "finetune" / "paper_b128" / "summary.json").read_text())
    assert b128["decode_ppl"] == summary["final"]["decode_ppl"] and b128["train_tokens"] == summary["tokens"]
    assert metrics["fp16"]["bits_per_key_element"] == 16.0 and metrics["fp16_same_finetune"]["train_tokens"] > 0
    assert metrics["fp16_same_finetune"]["run"] == "fp16_paper"  # the paper's claim: its recipe's control
    assert set(metrics["fp16_same_finetune_by_recipe"]) == set(expected["fp16_same_finetune_by_recipe"])


def test_notebook_08_reports_runs_in_progress_against_their_control(metrics):
    """Incomplete committed runs (a device session's time limit) are reported at their last held-out evaluation,
    beside their recipe's FP16 control at the same step; complete runs are not listed there."""
    runs = read_runs(ROOT / "results" / "finetune")  # in_progress itself is tested in tests/test_runs.py
    assert metrics["in_progress"] == in_progress(runs, ladder(runs, context=metrics["context"]))


def test_notebook_08_measures_the_switches_on_the_same_windows(metrics):
    sw = metrics["switches_unadapted"]
    rows = {r["rung"]: r["decode_ppl"] for r in sw["rows"]}
    assert sw["eval_windows"] == 1 and sw["eval_decode"] == 8  # SMOKE
    assert list(rows)[0] == "fp16" and len(rows) == 6
    assert all(v > 1 for v in rows.values())
    assert rows["paper form (hamming)"] > rows["fp16"]  # 2 bits per key element, un-adapted: worse than exact
    checks = metrics["checkpoint_checks"]
    assert [c["run"] for c in checks] == ["paper_b128", "goal_b128"]  # the paper recipe's and the LoRA + window one
    for check in checks:
        assert not check["same_settings"]  # SMOKE settings differ from the run's
        assert check["recomputed_decode_ppl"] > 1


def test_notebook_08_records_device_and_dtype(metrics):
    assert metrics["device"] == "cpu" and metrics["dtype"] == "float32"
