"""benchmarks/generate.py's row specs (the benchmark itself needs CUDA: it runs on the device machine)."""
import importlib.util
from pathlib import Path

import pytest

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
