"""Run a notebook headlessly with papermill and return the metrics it wrote (shared by notebook tests)."""
from __future__ import annotations

import json
from pathlib import Path

import papermill as pm

ROOT = Path(__file__).resolve().parents[1]


def run_notebook(name: str, out_dir: Path, **parameters) -> dict:
    """Execute ``notebooks/<name>.ipynb`` with ``SMOKE=True`` plus ``parameters``; return its metrics.json.

    A failing cell raises papermill's ``PapermillExecutionError``, whose message shows the cell's error.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    params = {"SMOKE": True, "FIG_DIR": str(out_dir), **parameters}
    pm.execute_notebook(
        str(ROOT / "notebooks" / f"{name}.ipynb"),
        str(out_dir / f"{name}.ipynb"),
        parameters=params,
        cwd=str(ROOT / "notebooks"),
        progress_bar=False,
        kernel_name="python3",
        execution_timeout=600,  # seconds per cell: a stuck cell fails the test with its traceback
    )
    return json.loads((out_dir / "metrics.json").read_text())
