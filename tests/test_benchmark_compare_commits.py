"""benchmarks/compare_commits.py on the CPU: commits resolved and extracted so that their own kernels import, the
worker's failures recorded per shape, the table. The timings themselves need CUDA."""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("bench_compare_commits", ROOT / "benchmarks" / "compare_commits.py")
cmp = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(cmp)


def _imported_from(folder: Path) -> Path:
    env = {**os.environ, "PYTHONPATH": str(folder)}
    out = subprocess.run([sys.executable, "-c", "import h1bkv_lite.kernels as k, pathlib; "
                          "print(pathlib.Path(k.__file__).resolve().parent)"],
                         env=env, cwd=folder, capture_output=True, text=True, check=True)
    return Path(out.stdout.strip())


@pytest.mark.parametrize("commit", ["HEAD", cmp.WORKTREE])
def test_extracted_code_is_what_imports(tmp_path, commit):
    sha, subject = cmp.resolve(commit)
    assert subject
    folder = cmp.extract(sha, tmp_path)
    assert (folder / "kernels" / "decode_attention.py").is_file()
    # the extracted copy's kernels, not the installed package's
    assert _imported_from(folder) == (folder / "kernels").resolve()


def test_unknown_commits_are_refused_by_name():
    with pytest.raises(ValueError, match="no-such-commit"):
        cmp.resolve("no-such-commit")
    with pytest.raises(SystemExit):
        cmp.parse_args(["no-such-commit"])
    with pytest.raises(SystemExit):
        cmp.parse_args([])  # no commit named
    with pytest.raises(SystemExit):
        cmp.parse_args(["HEAD", "--repeats", "0"])
    with pytest.raises(SystemExit):
        cmp.parse_args(["HEAD", "--shapes", "mha-1m"])


def test_a_worker_that_cannot_time_records_each_shape(tmp_path):
    """Without CUDA every shape fails inside the worker; each gets a row with its error, none is dropped."""
    folder = cmp.extract(cmp.WORKTREE, tmp_path)
    rows = cmp.run_worker(folder, "worktree", ["mha-32k", "gqa-32k"], timeout=240)
    assert [r["shape"] for r in rows] == ["mha-32k", "gqa-32k"]
    for r in rows:
        if "h1b_us" not in r:  # a CPU machine: the kernels imported, the timing found no CUDA
            assert "cuda" in r["error"].lower(), r["error"]
        assert Path(r["kernels_from"]).resolve() == (folder / "kernels").resolve()


def test_table_takes_the_median_over_repeats_and_marks_errors():
    rows = [{"label": "a", "shape": "mha-32k", "h1b_us": t} for t in (70.0, 90.0, 71.0)]
    rows += [{"label": "b", "shape": "mha-32k", "error": "ImportError"}]
    rows += [{"label": "b", "shape": "gqa-32k", "h1b_us": 42.4}]
    text = cmp.table(rows, ["a", "b"], ["mha-32k", "gqa-32k"])
    lines = text.splitlines()
    assert lines[1].split() == ["mha-32k", "71.0", "error"]
    assert lines[2].split() == ["gqa-32k", "error", "42.4"]
    json.dumps(rows)  # rows are what the JSON holds
