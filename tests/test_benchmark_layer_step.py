"""benchmarks/layer_step.py's step functions and measurement, on the CPU (the benchmark itself runs on CUDA)."""
import importlib.util
import sys
from pathlib import Path

import pytest
import torch

_DIR = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(_DIR))
_spec = importlib.util.spec_from_file_location("bench_layer_step", _DIR / "layer_step.py")
layer_step = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(layer_step)


def test_steps_append_one_token_to_each_cache_and_reset_crops_back():
    steps = layer_step.make_steps("tiny", 40, 64, "hamming", torch.device("cpu"))
    assert (steps["Hq"], steps["Hkv"], steps["D"]) == (8, 2, 64)
    lengths = steps["lengths"]
    assert lengths() == (40, 40)  # the warm-up steps were cropped away
    steps["h1b"]()
    steps["dynamic"]()
    steps["dynamic"]()
    assert lengths() == (41, 42)
    steps["reset"]()
    assert lengths() == (40, 40)


def test_measure_returns_both_times_and_a_paired_ratio_over_the_asked_rounds():
    row = layer_step.measure("tiny", 24, 64, "hamming", torch.device("cpu"), calls=3, rounds=2)
    assert row["h1b_us"] > 0 and row["dynamic_us"] > 0
    assert row["paired_speedup"]["rounds"] == 2 and len(row["paired_speedup"]["ratios"]) == 2
    assert (row["model"], row["prompt"], row["bits"], row["Hkv"]) == ("tiny", 24, 64, 2)


def test_main_needs_cuda(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit):
        layer_step.main(["--out", "/nonexistent"])
    assert "needs a CUDA GPU" in capsys.readouterr().err
