"""benchmarks/launch_ab.py's interleaving and launch switch (the benchmark itself needs CUDA: the device machine)."""
import importlib.util
import json
from pathlib import Path

import pytest
import torch

from h1bkv_lite.kernels import _launcher

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "launch_ab.py"
_spec = importlib.util.spec_from_file_location("bench_launch_ab", _PATH)
launch_ab = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(launch_ab)


@pytest.fixture
def fake_gpu(monkeypatch):
    """No GPU here: the model, the rows and the device facts are stand-ins; each row records whether the cached
    launch was on while it ran."""
    calls = []

    def fake_run(model, spec, *, count_syncs=True):
        calls.append((spec["cache"], spec["prompt_len"], spec["new_tokens"], _launcher.enabled()))
        return {**spec, "oom": False, "decode_tok_s": 10.0}

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H200")
    monkeypatch.setattr(torch.backends.cuda, "enable_cudnn_sdp", lambda on: None)
    monkeypatch.setattr(launch_ab, "environment", lambda device: {"device": "NVIDIA H200"})
    monkeypatch.setattr(launch_ab, "build_model", lambda name, device: object())
    monkeypatch.setattr(launch_ab, "warmup_prompts", lambda model, prompts, new_tokens: [300])
    monkeypatch.setattr(launch_ab, "run_generate", fake_run)
    return calls


def test_rows_interleave_the_launch_modes_and_dynamic_cache(fake_gpu, tmp_path):
    assert launch_ab.main(["--model", "tiny", "--prompts", "100", "200", "--repeats", "2", "--new-tokens", "8",
                           "--out", str(tmp_path)]) == 0
    warm = launch_ab.WARMUP_NEW_TOKENS
    round_ = [("h1b", False), ("h1b", True), ("dynamic", True)]
    expected = [("h1b", 300, warm, False), ("h1b", 300, warm, True)]
    for T in (100, 200):
        expected += [(cache, T, 8, enabled) for _ in range(2) for cache, enabled in round_]
    assert fake_gpu == expected
    assert _launcher.enabled(), "the cached launch must be on again after the benchmark"
    rows = json.loads((tmp_path / "launch_ab_h200.json").read_text())["rows"]
    assert [(r["cache"], r["launch"], r["repeat"]) for r in rows[:3]] == [
        ("h1b", "uncached", 0), ("h1b", "cached", 0), ("dynamic", None, 0)]
    assert len(rows) == 12


@pytest.mark.parametrize("option", ["--repeats", "--new-tokens", "--batch"])
def test_argument_errors_name_the_option(fake_gpu, capsys, tmp_path, option):
    with pytest.raises(SystemExit):
        launch_ab.main([option, "0", "--out", str(tmp_path)])
    assert option in capsys.readouterr().err
