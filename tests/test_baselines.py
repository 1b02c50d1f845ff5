"""Baseline caches (FP16, KIVI, eviction, Loki) on tiny random models: generate, exactness, bytes, args."""
import functools

import pytest
import torch
from test_cache import VOCAB, greedy, tiny_model
from transformers import DynamicCache

from h1bkv_lite import memory
from h1bkv_lite.baselines import EvictionCache, FP16Cache, KIVICache, LokiCache, calibrate_loki


@pytest.fixture(scope="module")
def basis():
    model = tiny_model()
    return calibrate_loki(model, torch.randint(0, VOCAB, (2, 32), generator=torch.Generator().manual_seed(0)))


def factories(basis):
    """name -> (compressing factory, degenerate factory that must equal DynamicCache on <= 40 tokens)."""
    P = functools.partial
    return {
        "kivi": (P(KIVICache, bits=2, group_size=8, residual=8), P(KIVICache, bits=2, group_size=8, residual=40)),
        "kivi4": (P(KIVICache, bits=4, group_size=16, residual=4), P(KIVICache, bits=4, residual=128)),
        "h2o": (P(EvictionCache, budget=12, sink=2), P(EvictionCache, budget=40)),
        "streaming": (P(EvictionCache, budget=12, policy="streaming"), P(EvictionCache, budget=40, policy="streaming")),
        "loki": (P(LokiCache, rank=4, top_k=8, basis=basis), P(LokiCache, rank=4, top_k=40, basis=basis)),
    }


NAMES = ["kivi", "kivi4", "h2o", "streaming", "loki"]


@pytest.fixture(scope="module")
def prompt():
    return torch.randint(0, VOCAB, (1, 24), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2"])
@pytest.mark.parametrize("name", NAMES)
def test_degenerate_settings_reproduce_dynamic_cache(arch, name, basis, prompt):
    model = tiny_model(arch)
    ref_tokens, ref_scores = greedy(model, prompt, DynamicCache(config=model.config), n_new=10)
    compressing, degenerate = factories(basis)[name]
    tokens, scores = greedy(model, prompt, degenerate(model.config), n_new=10)
    assert torch.equal(tokens, ref_tokens)
    torch.testing.assert_close(scores, ref_scores, atol=1e-4, rtol=1e-4)
    tokens, scores = greedy(model, prompt, compressing(model.config), n_new=10)
    assert not torch.allclose(scores, ref_scores, atol=1e-3)  # compression does something
    assert model.config._attn_implementation == "sdpa"


def test_fp16_cache_is_a_dynamic_cache(prompt):
    model = tiny_model(dtype=torch.float16)
    cache = FP16Cache(model.config)
    assert isinstance(cache, DynamicCache)
    greedy(model, prompt, cache, n_new=5)
    assert cache.nbytes() == memory.kv_cache_bytes(model.config, 28, 1, cache.scheme).total


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("length", [13, 30])
def test_nbytes_matches_memory_prediction(name, length, basis):
    model = tiny_model("qwen2", dtype=torch.float16)
    cache = factories(basis)[name][0](model.config)
    ids = torch.randint(0, VOCAB, (2, length - 5), generator=torch.Generator().manual_seed(length))
    greedy(model, ids, cache, n_new=6)
    assert cache.get_seq_length() == length
    predicted = memory.kv_cache_bytes(model.config, length, 2, cache.scheme)
    assert cache.nbytes_by_part() == predicted.parts
    assert cache.nbytes() == predicted.total


@pytest.mark.parametrize("name", NAMES)
def test_compressed_prefill_equals_token_by_token_decode(name, basis):
    model = tiny_model("mistral")
    factory = factories(basis)[name][0]
    ids = torch.randint(0, VOCAB, (2, 26), generator=torch.Generator().manual_seed(5))
    parallel = model(ids, past_key_values=factory(model.config, compressed_prefill=True)).logits
    cache = factory(model.config)
    stepwise = torch.cat([model(ids[:, t:t + 1], past_key_values=cache).logits for t in range(ids.shape[1])], dim=1)
    torch.testing.assert_close(parallel, stepwise, atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("name", ["h2o", "streaming", "loki"])
def test_left_padded_batch_equals_sequences_alone(name, basis):
    model = tiny_model()
    factory = factories(basis)[name][0]
    gen = torch.Generator().manual_seed(6)
    long, short = torch.randint(1, VOCAB, (1, 20), generator=gen), torch.randint(1, VOCAB, (1, 14), generator=gen)
    batch = torch.cat([long, torch.cat([torch.zeros(1, 6, dtype=torch.long), short], dim=1)])
    mask = torch.ones_like(batch)
    mask[1, :6] = 0
    tokens, scores = greedy(model, batch, factory(model.config), mask=mask)
    for row, ids in enumerate([long, short]):
        alone_tokens, alone_scores = greedy(model, ids, factory(model.config))
        assert torch.equal(tokens[row:row + 1], alone_tokens)
        torch.testing.assert_close(scores[row:row + 1], alone_scores, atol=1e-4, rtol=1e-4)


def test_streaming_keeps_sinks_and_recent_tokens():
    model = tiny_model()
    cache = EvictionCache(model.config, budget=10, policy="streaming", sink=3)
    model(torch.randint(0, VOCAB, (1, 25)), past_key_values=cache)
    for _ in range(3):
        model(torch.randint(0, VOCAB, (1, 1)), past_key_values=cache)
    expected = torch.tensor([0, 1, 2] + list(range(21, 28)))
    for layer in cache.layers:
        assert torch.equal(layer.pos, expected.expand(1, 2, 10))


def test_h2o_keeps_heavy_hitters():
    model = tiny_model()
    cache = EvictionCache(model.config, budget=10, policy="h2o", sink=1, recent=3)
    ids = torch.randint(0, VOCAB, (1, 30), generator=torch.Generator().manual_seed(7))
    model(ids, past_key_values=cache)
    pos = cache.layers[0].pos[0, 0].tolist()
    assert pos[0] == 0 and pos[-3:] == [27, 28, 29] and len(pos) == 10
    # the other 6 are the middle tokens that received the most prefill attention from kv head 0's query heads
    attn = tiny_model(attn="eager")(ids, output_attentions=True).attentions[0]  # same weights, [B, Hq, T, T]
    received = attn[0, :2].sum(dim=(0, 1))[1:27]
    assert set(pos[1:7]) == set((received.topk(6).indices + 1).tolist())


def test_loki_basis_is_orthonormal_and_attends_to_top_k(basis):
    assert basis.shape == (2, 2, 32, 32)
    torch.testing.assert_close(basis.transpose(-1, -2) @ basis, torch.eye(32).expand(2, 2, 32, 32), atol=1e-4, rtol=0)
    model = tiny_model()
    cache = LokiCache(model.config, rank=4, top_k=5, basis=basis, compressed_prefill=True)
    gen = torch.Generator().manual_seed(8)
    k, v, q = torch.randn(1, 2, 16, 32, generator=gen), torch.randn(1, 2, 16, 32, generator=gen), torch.randn(
        1, 4, 1, 32, generator=gen)
    cache.update(k, v, 0)
    out = cache.layers[0].attend(q)
    p = basis[0, 0, :, :4].half().float()  # query head 0 reads kv head 0
    chosen = ((q[0, 0] @ p) @ (k[0, 0] @ p).T).topk(5).indices[0]
    probs = torch.softmax(q[0, 0] @ k[0, 0, chosen].T / 32**0.5, dim=-1)
    torch.testing.assert_close(out[0, 0], probs @ v[0, 0, chosen], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("cls, kwargs, error, match", [
    (KIVICache, dict(bits=3), ValueError, "bits"),
    (KIVICache, dict(group_size=5), ValueError, "group_size"),
    (KIVICache, dict(residual=-1), ValueError, "residual"),
    (KIVICache, dict(compressed_prefill="yes"), TypeError, "compressed_prefill"),
    (EvictionCache, dict(budget=0), ValueError, "budget"),
    (EvictionCache, dict(budget=8, policy="lru"), ValueError, "policy"),
    (EvictionCache, dict(budget=8, sink=9), ValueError, "sink"),
    (EvictionCache, dict(budget=8, sink=2, recent=7), ValueError, "recent"),
    (EvictionCache, dict(budget=8, policy="streaming", recent=2), ValueError, "recent"),
    (LokiCache, dict(rank=0, top_k=4, basis=torch.zeros(2, 2, 32, 32)), ValueError, "rank"),
    (LokiCache, dict(rank=4, top_k=0, basis=torch.zeros(2, 2, 32, 32)), ValueError, "top_k"),
    (LokiCache, dict(rank=4, top_k=4, basis=torch.zeros(2, 2, 16, 32)), ValueError, "basis"),
    (LokiCache, dict(rank=4, top_k=4, basis=None), TypeError, "basis"),
])
def test_bad_arguments(cls, kwargs, error, match):
    config = tiny_model().config
    with pytest.raises(error, match=match):
        cls(config, **kwargs)
