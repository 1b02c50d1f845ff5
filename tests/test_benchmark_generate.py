"""benchmarks/generate.py's row specs (the benchmark itself needs CUDA: it runs on the device machine)."""
import importlib.util
from pathlib import Path

import pytest
import torch

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "generate.py"
_spec = importlib.util.spec_from_file_location("bench_generate", _PATH)
generate = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(generate)


def _names(specs):
    return [(s["cache"], s["bits"], s["score"]) for s in specs]


def test_cache_specs_grid_and_filter():
    every = generate.cache_specs(True, bits=(128, 256), scores=("hamming",), graphs=True)
    assert _names(every) == [("dynamic", None, None), ("StaticCache", None, None), ("h1b", 128, "hamming"),
                             ("h1b", 256, "hamming"), ("h1b-graph", 128, "hamming"), ("h1b-graph", 256, "hamming")]
    kept = generate.cache_specs(True, bits=(128,), scores=("hamming", "asym"), graphs=True,
                                caches=["StaticCache", "h1b-graph"])
    assert _names(kept) == [("StaticCache", None, None), ("h1b-graph", 128, "hamming"), ("h1b-graph", 128, "asym")]
    assert _names(generate.cache_specs(False, bits=(128,), scores=("hamming",))) == [
        ("dynamic", None, None), ("h1b", 128, "hamming")]


def test_cache_specs_refuses_unknown_caches():
    with pytest.raises(ValueError, match=r"caches must be among .*'dynamic'.*got \['quanto'\]"):
        generate.cache_specs(False, caches=["dynamic", "quanto"])


def test_reset_compiled_drops_the_compiled_decode_step():
    model = torch.nn.Linear(2, 2)
    model._compiled_call = torch.compile(model.__call__)
    generate.reset_compiled(model)
    assert not hasattr(model, "_compiled_call")
    generate.reset_compiled(model)  # nothing compiled: a no-op


@pytest.mark.parametrize("oom_from, start_fits, refine, expected", [
    (7, None, True, (6, 7)),       # bisected between the candidates 4 (fits) and 8 (OOM)
    (7, None, False, (4, 8)),      # candidates only
    (17, 8, True, (16, 17)),       # up to 8 known to fit: not probed
    (1, None, True, (0, 1)),       # nothing fits
    (10**6, None, True, (64, None)),  # every candidate fits
])
def test_max_batch_probes_then_bisects(monkeypatch, oom_from, start_fits, refine, expected):
    probed = []

    def fake_run(model, spec, count_syncs=True):
        probed.append(spec["batch"])
        assert spec["new_tokens"] == 2 and not count_syncs
        return {"oom": spec["batch"] >= oom_from}

    monkeypatch.setattr(generate, "run_generate", fake_run)
    assert generate.max_batch(None, {"cache": "h1b", "bits": 128}, start_fits=start_fits, refine=refine) == expected
    assert len(probed) == len(set(probed)), "a batch was probed twice"
    if start_fits:
        assert min(probed) > start_fits
