"""h1bkv_lite.graphs: greedy decoding over a static-capacity H1BCache (``generate_greedy``) and ``model.generate``'s
decoding loop (``custom_generate=decode_with_cuda_graphs``), each decode step one replayed CUDA graph on a GPU; eager on
the CPU (the Triton interpreter, see conftest.py), where their tokens are checked against ``model.generate`` with the
same cache settings (the same kernels and arithmetic, so equal)."""
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from h1bkv_lite.cache import H1BCache
from h1bkv_lite.graphs import EOS_CHECK_EVERY, _pad_after_end, decode_with_cuda_graphs, generate_greedy
from h1bkv_lite.kernels._common import is_interpreted
from h1bkv_lite.kernels.decode_attention import _decode_split_kernel

_CUDA = torch.cuda.is_available()
DEVICES = [
    "cpu",
    pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not _CUDA, reason="needs CUDA")]),
]


@pytest.fixture(params=DEVICES)
def device(request):
    if request.param == "cpu" and not is_interpreted(_decode_split_kernel):
        pytest.skip("Triton kernels are compiled for CUDA here; run with TRITON_INTERPRET=1 for the CPU cases")
    return torch.device(request.param)


def _model(device):
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=96, hidden_size=256, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=64)
    return LlamaForCausalLM(config).to(device).eval()


def _ids(device, B=2, T=24, seed=1):
    return torch.randint(3, 96, (B, T), generator=torch.Generator().manual_seed(seed)).to(device)


def _cache(model, capacity, **kw):
    return H1BCache(model.config, bits=64, backend="triton", max_cache_len=capacity, **kw)


@pytest.mark.parametrize("kw", [dict(score="hamming"), dict(score="asym"), dict(window=6, sink=2)])
def test_eager_steps_equal_model_generate(device, kw):
    model, ids = _model(device), _ids(device)
    got = generate_greedy(model, ids, _cache(model, 40, **kw), 9, cuda_graph=False)
    want = model.generate(ids, attention_mask=torch.ones_like(ids), past_key_values=_cache(model, 40, **kw),
                          max_new_tokens=9, do_sample=False, pad_token_id=0)
    assert torch.equal(got, want)


@pytest.mark.parametrize("kw,T,chunk", [(dict(score="hamming"), 35, 10), (dict(window=6, sink=2), 35, 10),
                                        (dict(window=6, sink=2), 15, 7)])
def test_prefill_chunks_equal_model_generate_with_chunks(device, kw, T, chunk):
    """``prefill_chunk_size``: the prompt in forwards of ``chunk`` tokens (its later chunks through the flash path of
    ``H1BLayer._attend_chunk``; 15 in chunks of 7 ends with a one-token chunk while the window is still filling),
    then the static ring window, as ``model.generate(..., prefill_chunk_size=chunk)`` with the same cache settings
    and as the growing store (no ``max_cache_len``) decoded by ``generate``, to the same tokens."""
    model, ids = _model(device), _ids(device, T=T)
    got = generate_greedy(model, ids, _cache(model, 50, **kw), 7, cuda_graph=False, prefill_chunk_size=chunk)
    for cache in (_cache(model, 50, **kw), H1BCache(model.config, bits=64, backend="triton", **kw)):
        want = model.generate(ids, attention_mask=torch.ones_like(ids), past_key_values=cache, max_new_tokens=7,
                              do_sample=False, pad_token_id=0, prefill_chunk_size=chunk)
        assert torch.equal(got, want), type(cache.layers[0]).__name__


@pytest.mark.gpu
@pytest.mark.skipif(not _CUDA, reason="needs CUDA")
@pytest.mark.parametrize("kw", [dict(), dict(window=6, sink=2)])
def test_cuda_graph_replays_equal_eager_steps(kw):
    device = torch.device("cuda")
    model, ids = _model(device), _ids(device)
    caches = [_cache(model, 64, **kw), _cache(model, 64, **kw)]
    eager = generate_greedy(model, ids, caches[0], 30, cuda_graph=False)
    graphed = generate_greedy(model, ids, caches[1], 30, cuda_graph=True, warmup_steps=2)
    assert torch.equal(graphed, eager)
    assert caches[1].get_seq_length() == caches[0].get_seq_length() == ids.shape[1] + 29  # host counts kept up
    assert caches[1].nbytes() == caches[0].nbytes()


def test_stops_at_end_of_sequence(device):
    model, ids = _model(device), _ids(device)
    first = generate_greedy(model, ids, _cache(model, 30), 1, cuda_graph=False)[:, -1]
    if first[0] != first[1]:
        ids = ids[:1]  # one row, so that its first token ends every row
    eos = int(first[0])
    cache = _cache(model, 24 + 40)
    out = generate_greedy(model, ids, cache, 40, cuda_graph=False, eos_token_id=[95, eos])  # a list, as Llama 3
    assert out.shape[1] == ids.shape[1] + 1 and bool((out[:, -1] == eos).all())  # trimmed after the end
    # stopped at the first check: the prompt and EOS_CHECK_EVERY - 1 decode steps went through the cache
    assert cache.get_seq_length() == ids.shape[1] + EOS_CHECK_EVERY - 1


def test_pad_after_end():
    out = torch.tensor([[5, 7, 2, 9, 2], [1, 2, 3, 4, 6]])
    assert torch.equal(_pad_after_end(out, [2], 0), torch.tensor([[5, 7, 2, 0, 0], [1, 2, 0, 0, 0]])[:, :3])
    ongoing = torch.tensor([[5, 2, 9], [1, 3, 4]])
    assert torch.equal(_pad_after_end(ongoing, [2], 0), torch.tensor([[5, 2, 0], [1, 3, 4]]))
    several = torch.tensor([[5, 8, 9, 2], [1, 2, 3, 4]])  # either end id ends a row (Llama 3 lists several)
    assert torch.equal(_pad_after_end(several, [2, 8], 0), torch.tensor([[5, 8], [1, 2]]))


def test_arguments_are_checked(device):
    model, ids = _model(device), _ids(device)
    with pytest.raises(TypeError, match="cache must be an H1BCache"):
        generate_greedy(model, ids, object(), 4)
    with pytest.raises(ValueError, match="static capacity"):
        generate_greedy(model, ids, H1BCache(model.config, bits=64, backend="triton"), 4)
    with pytest.raises(ValueError, match="exceed the cache's max_cache_len=26"):
        generate_greedy(model, ids, _cache(model, 26), 4)
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate_greedy(model, ids, _cache(model, 30), 0)
    used = _cache(model, 40)
    generate_greedy(model, ids, used, 2, cuda_graph=False)
    with pytest.raises(ValueError, match="must be fresh"):
        generate_greedy(model, ids, used, 2)
    with pytest.raises(ValueError, match=r"must fill the cache's exact window and sinks \(window=20 \+ sink=8\)"):
        generate_greedy(model, ids, _cache(model, 40, window=20, sink=8), 2)
    for bad, error in ((0, ValueError), (2.5, TypeError)):
        with pytest.raises(error, match="prefill_chunk_size"):
            generate_greedy(model, ids, _cache(model, 40), 2, prefill_chunk_size=bad)
    with pytest.raises(ValueError, match=r"prefill_chunk_size \(3\) must hold the cache's sinks \(sink=4\)"):
        generate_greedy(model, ids, _cache(model, 40, sink=4), 2, prefill_chunk_size=3)
    for bad in ([], True, [5, False], -1, 2.0):
        with pytest.raises(TypeError, match=r"eos_token_id must be a token id >= 0 or a non-empty list"):
            generate_greedy(model, ids, _cache(model, 40), 2, eos_token_id=bad)
    other = LlamaForCausalLM(LlamaConfig(**{**model.config.to_dict(), "num_hidden_layers": 3})).to(device)
    with pytest.raises(ValueError, match="cache has 3 layers, the model 2"):
        generate_greedy(model, ids, H1BCache(other.config, bits=64, backend="triton", max_cache_len=40), 2)
    if device.type == "cpu":
        with pytest.raises(ValueError, match="cuda_graph=True needs CUDA"):
            generate_greedy(model, ids, _cache(model, 30), 2, cuda_graph=True)


@pytest.mark.gpu
@pytest.mark.skipif(not _CUDA, reason="needs CUDA")
def test_replays_make_no_host_sync():
    """The decode loop after the capture: a replay, the host counts, the token copy -- no device sync."""
    from h1bkv_lite.graphs import _Step

    device = torch.device("cuda")
    model, ids = _model(device), _ids(device)
    cache = _cache(model, 64)
    generate_greedy(model, ids, cache, 3, cuda_graph=False)  # prompt + 2 eager steps: compiled, calibrated
    token = torch.zeros(ids.shape[0], 1, dtype=torch.long, device=device)
    pos = torch.full_like(token, cache.get_seq_length())
    step = _Step(model, cache, token, pos)
    graph = step.capture()
    graph.replay()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(5):
            cache.replayed(1)
            graph.replay()
            token.clone()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert cache.get_seq_length() == ids.shape[1] + 2 + 6
    assert int(cache.layers[0]._filled_dev) == cache.layers[0].held_compressed


def _generate(model, ids, cache, new, **kw):
    """``model.generate`` over ``cache`` (no ``custom_generate`` unless given), unpadded prompts."""
    return model.generate(ids, attention_mask=torch.ones_like(ids), past_key_values=cache, max_new_tokens=new,
                          pad_token_id=0, **kw)


def _loop_model(device):
    """The test model without a default end token (LlamaConfig's is 2), so that a call runs to ``max_new_tokens``
    unless a test passes ``eos_token_id``."""
    model = _model(device)
    model.generation_config.eos_token_id = None
    return model


LOOP = dict(custom_generate=decode_with_cuda_graphs, cuda_graph=False)


@pytest.mark.parametrize("kw,chunk", [(dict(score="hamming"), None), (dict(score="asym"), None),
                                      (dict(window=6, sink=2), None), (dict(window=6, sink=2), 10)])
def test_generate_loop_greedy_equals_generate(device, kw, chunk):
    """``custom_generate=decode_with_cuda_graphs``: the tokens of transformers' own loop over the same cache
    settings (greedy; ``prefill_chunk_size`` honoured); the cache holds every token but the last, as generate's."""
    model, ids = _loop_model(device), _ids(device, T=35 if chunk else 24)
    want = _generate(model, ids, _cache(model, 50, **kw), 9, do_sample=False, prefill_chunk_size=chunk)
    cache = _cache(model, ids.shape[1] + 8, **kw)  # room for what is fed back: the last new token is not
    got = _generate(model, ids, cache, 9, do_sample=False, prefill_chunk_size=chunk, **LOOP)
    assert got.shape == want.shape == (ids.shape[0], ids.shape[1] + 9) and torch.equal(got, want)
    assert cache.get_seq_length() == ids.shape[1] + 8


def test_generate_loop_samples_and_scores_as_generate(device):
    """Sampling (temperature, top-k), the processed scores and raw logits returned, several sequences per prompt, as
    transformers' loop with the same seed: the same random draws in the same order."""
    model, ids = _loop_model(device), _ids(device)
    runs = []
    for custom in ({}, LOOP):
        torch.manual_seed(5)
        runs.append(_generate(model, ids, _cache(model, 40), 9, do_sample=True, top_k=20, temperature=0.7,
                              num_return_sequences=2, output_scores=True, output_logits=True,
                              return_dict_in_generate=True, **custom))
    want, got = runs
    assert got.sequences.shape == (2 * ids.shape[0], ids.shape[1] + 9) and torch.equal(got.sequences, want.sequences)
    assert len(got.scores) == len(got.logits) == 9
    for name in ("scores", "logits"):
        assert all(torch.equal(a, b) for a, b in zip(getattr(got, name), getattr(want, name))), name
    assert isinstance(got.past_key_values, H1BCache)


def test_generate_loop_one_new_token(device):
    """``max_new_tokens=1``: the prompt's forward and its token, no decode step."""
    model, ids = _loop_model(device), _ids(device)
    cache = _cache(model, ids.shape[1])  # exactly the prompt: the one new token is never fed back
    got = _generate(model, ids, cache, 1, do_sample=False, **LOOP)
    assert torch.equal(got, _generate(model, ids, _cache(model, 30), 1, do_sample=False))
    assert got.shape[1] == ids.shape[1] + 1 and cache.get_seq_length() == ids.shape[1]


def test_generate_loop_stops_and_pads_as_generate(device):
    """End-of-sequence ids end the rows at different steps (later tokens are the pad id); the call stops once every
    row has ended, before ``max_new_tokens``. The stop flag is read one step late, so the forward queued meanwhile has
    fed the last token to the cache."""
    model, ids = _loop_model(device), _ids(device)
    T = ids.shape[1]
    free = _generate(model, ids, _cache(model, 60), 30, do_sample=False)
    ends = sorted({int(free[0, T + 1]), int(free[1, T + 3])})  # row 0 ends by its 2nd new token, row 1 by its 4th
    want = _generate(model, ids, _cache(model, 60), 30, do_sample=False, eos_token_id=ends)
    cache = _cache(model, 60)
    got = _generate(model, ids, cache, 30, do_sample=False, eos_token_id=ends, **LOOP)
    assert torch.equal(got, want)
    assert got.shape[1] <= T + 4  # every row ended, long before max_new_tokens
    assert cache.get_seq_length() == got.shape[1]  # the prompt and every new token, the last one included


def test_generate_loop_arguments_are_checked(device):
    model, ids = _loop_model(device), _ids(device)
    with pytest.raises(TypeError, match=r"needs past_key_values=H1BCache\(model.config, ..., max_cache_len"):
        model.generate(ids, max_new_tokens=3, pad_token_id=0, **LOOP)  # generate() made a DynamicCache
    with pytest.raises(ValueError, match="static capacity"):
        _generate(model, ids, H1BCache(model.config, bits=64, backend="triton"), 3, **LOOP)
    with pytest.raises(ValueError, match=r"need max_cache_len >= 26 \(the last new token is not fed back\), got "
                                         r"max_cache_len=25"):
        _generate(model, ids, _cache(model, 25), 3, **LOOP)
    refused = [(dict(num_beams=2), "greedily or by sampling .* asks for beam_search"),
               (dict(penalty_alpha=0.6, top_k=4), "asks for contrastive_search"),
               (dict(prompt_lookup_num_tokens=2), "asks for assisted_generation"),
               (dict(return_dict_in_generate=True, output_hidden_states=True), "output_hidden_states cannot be"),
               (dict(output_attentions=True), "output_attentions cannot be recorded"),
               (dict(use_cache=False), "needs use_cache=True"),
               (dict(position_ids=torch.arange(ids.shape[1], device=device)[None] + 100), "other position_ids"),
               (dict(labels=ids), r"got model inputs \['labels'\]")]
    for extra, message in refused:
        cache = _cache(model, 40)
        with pytest.raises(ValueError, match=message):
            _generate(model, ids, cache, 3, **extra, **LOOP)
        assert cache.get_seq_length() == 0, extra  # refused before anything ran
    padded = torch.ones_like(ids)
    padded[0, 0] = 0
    with pytest.raises(ValueError, match="without padding"):
        model.generate(ids, attention_mask=padded, past_key_values=_cache(model, 40), max_new_tokens=3,
                       pad_token_id=0, **LOOP)
    with pytest.raises(ValueError, match="warmup_steps"):
        _generate(model, ids, _cache(model, 40), 3, custom_generate=decode_with_cuda_graphs, warmup_steps=0)
    if device.type == "cpu":
        with pytest.raises(ValueError, match="cuda_graph=True needs CUDA"):
            _generate(model, ids, _cache(model, 40), 3, custom_generate=decode_with_cuda_graphs, cuda_graph=True)


@pytest.mark.gpu
@pytest.mark.skipif(not _CUDA, reason="needs CUDA")
@pytest.mark.parametrize("kw,gen", [(dict(), dict(do_sample=False)), (dict(window=6, sink=2), dict(do_sample=False)),
                                    (dict(), dict(do_sample=True, top_p=0.9, temperature=0.8)),
                                    (dict(window=6, sink=2), dict(do_sample=False, prefill_chunk_size=10))])
def test_generate_loop_graph_replays_equal_eager(monkeypatch, kw, gen):
    """On CUDA, the replayed decode forwards give the eager loop's tokens (sampled ones too: the draws happen outside
    the graph, in the same order), the steps after the warm-up ones are replays, and the host counts keep up."""
    device = torch.device("cuda")
    model, ids = _loop_model(device), _ids(device, T=35)
    caches = [_cache(model, 80, **kw), _cache(model, 80, **kw)]
    torch.manual_seed(3)
    eager = _generate(model, ids, caches[0], 30, **LOOP, **gen)
    replays = []
    replay = torch.cuda.CUDAGraph.replay
    monkeypatch.setattr(torch.cuda.CUDAGraph, "replay", lambda graph: (replays.append(1), replay(graph))[1])
    torch.manual_seed(3)
    graphed = _generate(model, ids, caches[1], 30, custom_generate=decode_with_cuda_graphs, warmup_steps=2, **gen)
    assert torch.equal(graphed, eager) and graphed.shape[1] == ids.shape[1] + 30
    assert len(replays) == 29 - 2  # 29 decode forwards: 2 eager warm-ups, the captured one replayed, 26 more
    assert caches[1].get_seq_length() == caches[0].get_seq_length() == ids.shape[1] + 29
    layer = caches[1].layers[0]
    assert int(layer._filled_dev) == layer.held_compressed and caches[1].nbytes() == caches[0].nbytes()


@pytest.mark.gpu
@pytest.mark.skipif(not _CUDA, reason="needs CUDA")
def test_generate_loop_graph_stops_late_as_eager():
    """On CUDA the stop flag is read through pinned memory and an event: rows ending early stop the call as the
    eager loop does, the cache holding every token."""
    device = torch.device("cuda")
    model, ids = _loop_model(device), _ids(device)
    T = ids.shape[1]
    free = _generate(model, ids, _cache(model, 60), 30, do_sample=False, **LOOP)
    ends = sorted({int(free[0, T + 4]), int(free[1, T + 6])})
    want = _generate(model, ids, _cache(model, 60), 30, do_sample=False, eos_token_id=ends)
    cache = _cache(model, 60)
    got = _generate(model, ids, cache, 30, do_sample=False, eos_token_id=ends,
                    custom_generate=decode_with_cuda_graphs, warmup_steps=1)
    assert torch.equal(got, want) and got.shape[1] <= T + 7
    assert cache.get_seq_length() == got.shape[1]
