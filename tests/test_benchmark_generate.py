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


def test_static_cache_rows_have_room_for_the_sync_count_steps():
    """A StaticCache sized prompt + new tokens overflowed (index_copy_ out of bounds) in the two decode steps
    count_decode_syncs runs after generate(): the H200 rows' device-side assert. Reproduced eagerly on CPU."""
    from transformers import StaticCache

    from h1bkv_lite.random_model import random_model

    model = random_model("tiny", dtype=torch.float32)
    T, N = 64, 4
    cache = generate.make_cache({"cache": "StaticCache", "prompt_len": T, "new_tokens": N}, model)
    assert isinstance(cache, StaticCache)
    ids = torch.randint(3, model.config.vocab_size, (1, T), generator=torch.Generator().manual_seed(0))
    out = model.generate(ids, attention_mask=torch.ones_like(ids), past_key_values=cache, max_new_tokens=N,
                         min_new_tokens=N, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        for step in range(generate.SYNC_COUNT_STEPS):  # what count_decode_syncs runs
            mask = torch.ones((1, out.shape[1] + step), dtype=torch.long)
            model(input_ids=out[:, -1:], attention_mask=mask, past_key_values=cache, use_cache=True)
    assert int(cache.get_seq_length()) == T + N - 1 + generate.SYNC_COUNT_STEPS


@pytest.mark.parametrize("heads,kv,prompts,expected", [
    (32, 32, [8192, 32768, 131072], [8192 + 256, 16384 + 256]),  # MHA: one split to 8192, query in splits to 16384
    (32, 8, [8192, 32768], [4096 + 256, 32768 + 256]),  # GQA: to 4096 and 32768; 32768 + 1 is past the second
    (32, 8, [2048, 8192], [2048, 4096 + 256]),  # a row inside the one-split regime warms it up too
    (32, 8, [1024], [2048]),  # 1024 + 64 new tokens stays one split
])
def test_warmup_prompts_reach_every_eager_launch_regime(heads, kv, prompts, expected):
    """The untimed warm-up runs one prompt in each of the decode kernel's eager launch regimes that a measured row
    reaches (a row of prompt T decodes contexts T + 1 .. T + new tokens), so no Triton compile falls inside a timed
    decode."""
    from types import SimpleNamespace

    from h1bkv_lite.kernels.decode_attention import _default_config

    model = SimpleNamespace(config=SimpleNamespace(num_attention_heads=heads, num_key_value_heads=kv),
                            device=torch.device("cpu"))
    cfg = _default_config("hamming", heads // kv, model.device)
    assert (cfg["single_split_max_n"], cfg["query_in_split_max_n"]) == ((8192, 16384) if kv == heads else (4096, 32768))
    assert generate.warmup_prompts(model, prompts, new_tokens=64) == expected
