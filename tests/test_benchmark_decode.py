"""benchmarks/decode.py's grid (its cases, options, memory skips, rows as written) and kernels/report.py reading
old and new result files. The timings themselves need CUDA: here the benchmark functions are stand-ins."""
import argparse
import importlib.util
import json
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("bench_decode", ROOT / "benchmarks" / "decode.py")
decode = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(decode)
_spec = importlib.util.spec_from_file_location("bench_decode_timing", ROOT / "benchmarks" / "decode_timing.py")
timing = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(timing)


def _cases(**grid):
    return decode.build_cases(**{**decode.FULL_GRID, **grid})


def _keys(cases, *names):
    return sorted({tuple(c[n] for n in names) for c in cases})


def test_full_grid_is_the_default():
    cases = decode.parse_args([]).cases
    # 3 batches x 3 groups x 2 head dims x 4 contexts = 72 shapes; hamming b = 128 and 256 at each, cos and asym
    # (b = 128) at 32k and 128k: 72 * 2 + 36 * 2 rows
    assert len(cases) == 216
    assert len(_keys(cases, "B", "Hkv", "D", "context")) == 72
    assert _keys(cases, "B") == [(1,), (8,), (32,)]
    assert _keys(cases, "group", "Hq", "Hkv") == [(1, 32, 32), (4, 32, 8), (8, 32, 4)]
    assert _keys(cases, "D") == [(64,), (128,)]
    assert _keys(cases, "context") == [(4096,), (8192,), (32768,), (131072,)]
    assert _keys([c for c in cases if c["score"] != "hamming"], "context") == [(32768,), (131072,)]
    assert not any(c.get("skipped") for c in cases)  # the largest case fits an H200's default budget
    assert max(c["estimate_bytes"] for c in cases) < decode.DEFAULT_MAX_GIB * 2**30
    # batches run in order: every B = 1 row comes first (a run cut short keeps the cheap rows)
    assert [c["B"] for c in cases] == sorted(c["B"] for c in cases)


def test_reference_check_at_the_smallest_batch_and_each_variants_first_context():
    checked = [c for c in decode.parse_args([]).cases if c["check"]]
    assert len(checked) == 3 * 2 * 4  # every group and head dim, each of the four variants once
    assert {c["B"] for c in checked} == {1}
    assert {(c["score"], c["context"]) for c in checked} == {("hamming", 4096), ("cos", 32768), ("asym", 32768)}
    # the smallest selected context, whichever it is (8k is not always there)
    checked = [c for c in _cases(batches=[8, 32], contexts=[32768, 16384], variants=["hamming:128"]) if c["check"]]
    assert {(c["B"], c["context"]) for c in checked} == {(8, 16384)}


def test_quick_grid_and_options_beside_it():
    quick = decode.parse_args(["--quick"]).cases
    assert len(quick) == 12  # B = 1, 32/32 and 32/8 heads, D = 128, 8k and 32k (cos and asym at 32k)
    assert _keys(quick, "B", "Hkv", "D") == [(1, 8, 128), (1, 32, 128)]
    cases = decode.parse_args(["--quick", "--contexts", "128k"]).cases
    assert _keys(cases, "B", "context") == [(1, 131072)] and len(cases) == 8


def test_selection_options():
    args = decode.parse_args(["--batches", "8", "--groups", "8", "--head-dims", "64", "--contexts", "4k", "32768",
                              "--variants", "asym:256", "hamming:128@32k", "--out-name", "part.json"])
    assert args.out_name == "part.json"
    assert args.grid == {"batches": [8], "groups": [8], "head_dims": [64], "contexts": [4096, 32768],
                         "variants": ["asym:256", "hamming:128@32k"]}
    assert [(c["Hkv"], c["D"], c["context"], c["score"], c["bits"], c["check"]) for c in args.cases] == [
        (4, 64, 4096, "asym", 256, True), (4, 64, 32768, "asym", 256, False), (4, 64, 32768, "hamming", 128, True)]


@pytest.mark.parametrize("text,tokens", [("4096", 4096), ("4k", 4096), ("128K", 131072), (" 32k ", 32768)])
def test_parse_context(text, tokens):
    assert decode.parse_context(text) == tokens


@pytest.mark.parametrize("text", ["0", "4m", "", "4.5k", "-4k"])
def test_parse_context_refuses(text):
    with pytest.raises(argparse.ArgumentTypeError, match="positive token count"):
        decode.parse_context(text)


def test_memory_skip():
    # B = 32, 32/32 heads, 128k: SDPA's fp16 K/V alone is 64 GiB (68.7 GB)
    big = dict(batches=[32], groups=[1], head_dims=[128], contexts=[131072], variants=["hamming:128"])
    assert decode.sdpa_bytes(B=32, Hq=32, Hkv=32, N=131072, D=128) > 68e9
    (case,) = decode.build_cases(**big, max_gib=68)
    assert case["skipped"] == "memory" and case["estimate_bytes"] > 68 * 2**30
    (case,) = decode.build_cases(**big, max_gib=120)
    assert "skipped" not in case
    cases = decode.parse_args(["--max-gib", "68"]).cases  # an 80 GB H100's budget: only those rows go
    skipped = [c for c in cases if c.get("skipped")]
    assert _keys(skipped, "B", "Hkv", "D", "context") == [(32, 32, 128, 131072)] and len(skipped) == 4


@pytest.mark.parametrize("score,bits", [("hamming", 128), ("cos", 256), ("asym", 64)])
def test_byte_counts_match_the_benchmarks_inputs(score, bits):
    """The memory estimate counts what bench_h1b makes (built here on the CPU) and what SDPA reads."""
    shape = dict(B=2, Hq=8, Hkv=2, N=48, D=64)
    args, kwargs = timing.make_h1b_inputs(**shape, bits=bits, score=score, device="cpu",
                                          gen=torch.Generator().manual_seed(0))
    made = timing.tensor_bytes(*args, kwargs.get("key_norms")) + 2 * shape["B"] * shape["Hq"] * shape["D"]
    assert decode.h1b_bytes(**shape, bits=bits, score=score) == made
    q, k, v = (torch.empty(2, h, n, 64, dtype=torch.float16) for h, n in ((8, 1), (2, 48), (2, 48)))
    assert decode.sdpa_bytes(**shape) == timing.tensor_bytes(q, k, v) + 2 * 2 * 8 * 64


@pytest.mark.parametrize("argv,option", [
    (["--groups", "3"], "--groups"),  # does not divide 32 query heads
    (["--groups", "64"], "--groups"),
    (["--head-dims", "96"], "--head-dims"),
    (["--head-dims", "256"], "--head-dims"),
    (["--batches", "0"], "--batches"),
    (["--contexts", "4q"], "--contexts"),
    (["--variants", "lsh:128"], "--variants"),
    (["--variants", "hamming:100"], "--variants"),  # the kernel takes whole 32-bit code words
    (["--variants", "hamming"], "--variants"),
    (["--variants", "cos:128@32k", "--contexts", "8k"], "--variants"),  # nothing would run
    (["--max-gib", "0"], "--max-gib"),
])
def test_argument_errors_name_the_option(capsys, argv, option):
    with pytest.raises(SystemExit) as exit_info:
        decode.parse_args(argv)
    assert exit_info.value.code == 2
    assert option in capsys.readouterr().err


def test_build_cases_raises_value_errors():
    with pytest.raises(ValueError, match=r"--groups: .*divide the 32 query heads, got \[5\]"):
        _cases(groups=[1, 5])
    with pytest.raises(ValueError, match=r"--head-dims: .*got \[80\]"):
        _cases(head_dims=[80])


class _FakeBench:
    """Stand-ins for the CUDA timings: fixed times, the real byte counts; ``oom`` shapes raise an out-of-memory
    like a CUDA allocation would. Each call records how many rows the JSON file held at that moment."""

    def __init__(self, path, oom_sdpa=(), oom_h1b=()):
        self.path, self.oom_sdpa, self.oom_h1b, self.rows_on_disk = path, oom_sdpa, oom_h1b, []

    def _seen(self):
        self.rows_on_disk.append(len(json.loads(self.path.read_text())["rows"]) if self.path.exists() else 0)

    def bench_sdpa(self, *, B, Hq, Hkv, N, D, device):
        self._seen()
        if (B, Hkv, N) in self.oom_sdpa:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 64.00 GiB")
        return {"sdpa_ms": 0.4, "sdpa_bytes": decode.sdpa_bytes(B=B, Hq=Hq, Hkv=Hkv, N=N, D=D), "sdpa_eager_ms": 0.5}

    def bench_h1b(self, *, B, Hq, Hkv, N, D, bits, score, device, check):
        self._seen()
        if (B, Hkv, N, score) in self.oom_h1b:
            raise torch.OutOfMemoryError("CUDA out of memory.")
        row = {"h1b_ms": 0.1, "h1b_bytes": decode.h1b_bytes(B=B, Hq=Hq, Hkv=Hkv, N=N, D=D, bits=bits, score=score),
               "h1b_eager_ms": 0.2}
        return {**row, "max_rel_err_vs_reference": 1e-4} if check else row


@pytest.fixture
def fake_run(tmp_path, monkeypatch):
    """Run a grid with the stand-ins; returns (result as returned, result as on disk, the stand-ins)."""

    def run(cases, **oom):
        path = tmp_path / "decode_fake.json"
        fake = _FakeBench(path, **oom)
        monkeypatch.setattr(decode, "bench_sdpa", fake.bench_sdpa)
        monkeypatch.setattr(decode, "bench_h1b", fake.bench_h1b)
        monkeypatch.setattr(decode, "copy_bandwidth", lambda device: 4000.0)
        monkeypatch.setattr(decode, "environment", lambda device: {"device": "Fake GPU", "torch": "t", "triton": "t",
                                                                   "cuda": "c", "date": "2026-01-01"})
        result = decode.run_grid("cpu", cases, path, {"max_gib": 68})
        return result, json.loads(path.read_text()), fake

    return run


def test_run_grid_rows_memory_skips_and_oom(fake_run):
    cases = _cases(batches=[1, 32], groups=[1, 4], head_dims=[128], contexts=[4096, 131072],
                   variants=["hamming:128", "asym:128@32k"], max_gib=68)
    result, on_disk, fake = fake_run(cases, oom_sdpa=[(1, 8, 131072)], oom_h1b=[(32, 8, 4096, "hamming")])
    rows = result["rows"]
    assert on_disk == result and len(rows) == len(cases) == 12
    # the file is rewritten after every row: the stand-ins saw it grow
    assert fake.rows_on_disk == sorted(fake.rows_on_disk) and fake.rows_on_disk[-1] == len(rows) - 1
    # one SDPA timing per shape that runs (B = 32, 32/32, 128k is over 68 GiB: none there)
    assert len(fake.rows_on_disk) == 7 + 10
    by_key = {(r["B"], r["Hkv"], r["context"], r["score"]): r for r in rows}
    skipped = by_key[(32, 32, 131072, "hamming")]
    assert skipped["skipped"] == "memory" and "h1b_ms" not in skipped and "check" not in skipped
    assert by_key[(32, 8, 131072, "hamming")].get("skipped") is None  # GQA's K/V is 4x smaller
    sdpa_oom = by_key[(1, 8, 131072, "asym")]
    assert sdpa_oom["oom"] and sdpa_oom["h1b_ms"] == 0.1 and "sdpa_ms" not in sdpa_oom and "speedup" not in sdpa_oom
    h1b_oom = by_key[(32, 8, 4096, "hamming")]
    assert h1b_oom["oom"] and "h1b_ms" not in h1b_oom and h1b_oom["sdpa_ms"] == 0.4
    ok = by_key[(1, 32, 4096, "hamming")]
    assert ok["oom"] is False and ok["group"] == 1 and ok["max_rel_err_vs_reference"] == 1e-4
    assert ok["speedup"] == pytest.approx(4.0) and ok["speedup_eager"] == pytest.approx(2.5)
    assert ok["byte_ratio"] == pytest.approx(ok["sdpa_bytes"] / ok["h1b_bytes"])
    assert ok["h1b_GBps"] == pytest.approx(ok["h1b_bytes"] / 1e-4 / 1e9)
    assert ok["h1b_frac_of_copy"] == pytest.approx(ok["h1b_GBps"] / 4000.0)
    assert ok["config"] == decode._default_config("hamming", 1, "cpu")
    assert "max_rel_err_vs_reference" not in by_key[(32, 32, 4096, "hamming")]
    for row in (skipped, sdpa_oom, h1b_oom, ok):
        decode.format_row(row)  # every kind of row prints


def test_format_row():
    (case,) = _cases(batches=[32], groups=[1], head_dims=[128], contexts=[131072], variants=["hamming:128"],
                     max_gib=68)
    row = {k: v for k, v in case.items() if k != "check"}
    assert decode.format_row(row).endswith("skipped (memory: needs ~74.9 GiB)")  # 64 + 10.5 + 0.4
    assert decode.format_row({**row, "skipped": None, "oom": True, "sdpa_ms": 1.0}).endswith("out of memory in h1b")


def test_write_json_replaces_the_file(tmp_path):
    path = tmp_path / "r.json"
    decode.write_json(path, {"rows": [1]})
    decode.write_json(path, {"rows": [1, 2]})
    assert json.loads(path.read_text()) == {"rows": [1, 2]} and [p.name for p in tmp_path.iterdir()] == ["r.json"]


# ---------------------------------------------------------------------------------------------------
# kernels/report.py on old and new files


def test_report_reads_the_committed_file_without_group():
    from h1bkv_lite.kernels.report import load_decode_results

    path = ROOT / "benchmarks" / "results" / "archive" / "decode_h200_2026-11-26.json"  # written before "group"
    raw = json.loads(path.read_text())
    assert "group" not in raw["rows"][0]
    df = load_decode_results(path)
    assert len(df) == len(raw["rows"])
    assert (df["group"] == df["Hq"] // df["Hkv"]).all() and set(df["group"]) == {1, 4}
    assert set(df["heads"]) == {"32q/32kv", "32q/8kv"}  # one head_dim: the labels as before


def test_report_drops_skipped_and_oom_rows(fake_run, tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from h1bkv_lite.kernels import report

    cases = _cases(batches=[1, 32], groups=[1, 8], contexts=[4096, 131072], variants=["hamming:128", "cos:128@32k"],
                   max_gib=68)
    rows = fake_run(cases, oom_h1b=[(1, 4, 4096, "hamming")])[0]["rows"]
    df = report.load_decode_results(tmp_path / "decode_fake.json")
    # over the budget: B = 32, 32/32 heads, d = 128, 128k (2 variants); out of memory: B = 1, 32/4, 4k (2 head dims)
    assert sum(bool(r.get("skipped")) for r in rows) == 2 and sum(r.get("oom") is True for r in rows) == 2
    assert len(df) == len(rows) - 4
    assert df["speedup"].notna().all() and set(df["group"]) == {1, 8}
    assert "32q/4kv, d=64" in set(df["heads"])  # two head dims: one panel each
    table = report.decode_table(df)
    assert len(table) == len(df)
    for fig in (report.plot_decode_times(df), report.plot_speedup(df), report.plot_bandwidth(df),
                report.plot_at_context(df, 131072)):
        plt.close(fig)


@pytest.mark.slow
def test_notebook_07_reads_a_grid_with_skipped_and_oom_rows(fake_run, tmp_path):
    spec = importlib.util.spec_from_file_location("notebook_runner", ROOT / "tests" / "notebook_runner.py")
    runner = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(runner)
    cases = _cases(batches=[1, 32], contexts=[4096, 32768, 131072], max_gib=68)
    fake_run(cases, oom_sdpa=[(1, 4, 32768)])
    metrics = runner.run_notebook("07_kernel_performance", tmp_path / "nb", RESULTS=str(tmp_path / "decode_fake.json"),
                                  GENERATE_RESULTS="")
    assert metrics["device"] == "Fake GPU"
    assert metrics["speedup_hamming_b128_max"] == pytest.approx(4.0)  # the stand-ins' 0.4 vs 0.1 ms
    assert metrics["max_rel_err_vs_reference"] == pytest.approx(1e-4)
    for name in ("decode_time_vs_context", "decode_speedup", "decode_bandwidth"):
        assert (tmp_path / "nb" / f"{name}.png").exists()
