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


@pytest.mark.parametrize("kw,chunk", [(dict(score="hamming"), None), (dict(score="asym"), None),
                                      (dict(window=6, sink=2), None), (dict(window=6, sink=2), 10)])
def test_generate_loop_greedy_equals_generate(device, kw, chunk):
    """``custom_generate=decode_with_cuda_graphs``: the tokens of transformers' own loop over the same cache
    settings (greedy; ``prefill_chunk_size`` honoured)."""
    model, ids = _model(device), _ids(device, T=35 if chunk else 24)
    want = _generate(model, ids, _cache(model, 50, **kw), 9, do_sample=False, prefill_chunk_size=chunk)
    cache = _cache(model, 50, **kw)
    got = _generate(model, ids, cache, 9, do_sample=False, prefill_chunk_size=chunk,
                    custom_generate=decode_with_cuda_graphs, cuda_graph=False)
    assert torch.equal(got, want)
    assert cache.get_seq_length() == ids.shape[1] + 8  # the last token is chosen, not fed back


def test_generate_loop_samples_and_scores_as_generate(device):
    """Sampling (temperature, top-k), the processed scores and raw logits returned, as transformers' loop with the
    same seed: the same random draws in the same order."""
    model, ids = _model(device), _ids(device)
    runs = []
    for custom in ({}, dict(custom_generate=decode_with_cuda_graphs, cuda_graph=False)):
        torch.manual_seed(5)
        runs.append(_generate(model, ids, _cache(model, 40), 9, do_sample=True, top_k=20, temperature=0.7,
                              output_scores=True, output_logits=True, return_dict_in_generate=True, **custom))
    want, got = runs
    assert torch.equal(got.sequences, want.sequences)
    assert len(got.scores) == len(got.logits) == 9
    for name in ("scores", "logits"):
        assert all(torch.equal(a, b) for a, b in zip(getattr(got, name), getattr(want, name))), name
    assert isinstance(got.past_key_values, H1BCache)


def test_generate_loop_stops_and_pads_as_generate(device):
    """An end-of-sequence id ends a row (later tokens are the pad id); the call stops when every row has ended. The
    stop flag is read one step late, so the forward queued meanwhile has fed the last token to the cache."""
    model, ids = _model(device), _ids(device)
    first = _generate(model, ids, _cache(model, 30), 1, do_sample=False)[:, -1]
    loop = dict(custom_generate=decode_with_cuda_graphs, cuda_graph=False)
    eos = int(first[0])
    want = _generate(model, ids, _cache(model, 60), 30, do_sample=False, eos_token_id=eos)
    got = _generate(model, ids, _cache(model, 60), 30, do_sample=False, eos_token_id=eos, **loop)
    assert torch.equal(got, want)
    one = ids[:1]  # ends at its first token
    cache = _cache(model, 60)
    got = _generate(model, one, cache, 30, do_sample=False, eos_token_id=eos, **loop)
    assert torch.equal(got, _generate(model, one, _cache(model, 60), 30, do_sample=False, eos_token_id=eos))
    assert got.shape[1] == one.shape[1] + 1 and int(got[0, -1]) == eos
    assert cache.get_seq_length() == got.shape[1]  # the prompt and the end token


def test_generate_loop_arguments_are_checked(device):
    model, ids = _model(device), _ids(device)
    loop = dict(custom_generate=decode_with_cuda_graphs, cuda_graph=False)
    with pytest.raises(TypeError, match=r"needs past_key_values=H1BCache\(model.config, ..., max_cache_len"):
        model.generate(ids, max_new_tokens=3, pad_token_id=0, **loop)  # generate() made a DynamicCache
    with pytest.raises(ValueError, match="static capacity"):
        _generate(model, ids, H1BCache(model.config, bits=64, backend="triton"), 3, **loop)
    with pytest.raises(ValueError, match="exceed the cache's max_cache_len=26"):
        _generate(model, ids, _cache(model, 26), 3, **loop)
    with pytest.raises(ValueError, match="num_beams=1"):
        _generate(model, ids, _cache(model, 40), 3, num_beams=2, **loop)
    with pytest.raises(ValueError, match="output_attentions and output_hidden_states"):
        _generate(model, ids, _cache(model, 40), 3, return_dict_in_generate=True, output_hidden_states=True, **loop)
    padded = torch.ones_like(ids)
    padded[0, 0] = 0
    with pytest.raises(ValueError, match="without padding"):
        model.generate(ids, attention_mask=padded, past_key_values=_cache(model, 40), max_new_tokens=3,
                       pad_token_id=0, **loop)
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
def test_generate_loop_graph_replays_equal_eager(kw, gen):
    """On CUDA, the replayed decode forwards give the eager loop's tokens (sampled ones too: the draws happen outside
    the graph, in the same order), and the cache's host counts keep up."""
    device = torch.device("cuda")
    model, ids = _model(device), _ids(device, T=35)
    caches = [_cache(model, 80, **kw), _cache(model, 80, **kw)]
    torch.manual_seed(3)
    eager = _generate(model, ids, caches[0], 30, custom_generate=decode_with_cuda_graphs, cuda_graph=False, **gen)
    torch.manual_seed(3)
    graphed = _generate(model, ids, caches[1], 30, custom_generate=decode_with_cuda_graphs, **gen)
    assert torch.equal(graphed, eager)
    held = caches[1].get_seq_length()  # every token but the last; all of them after an end token (read late)
    assert held == caches[0].get_seq_length() and held in (graphed.shape[1] - 1, graphed.shape[1])
    assert caches[1].nbytes() == caches[0].nbytes()
