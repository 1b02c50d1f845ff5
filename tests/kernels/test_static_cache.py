"""H1BCache(max_cache_len=...): the static-capacity mode (fixed buffers, fill level on the device) against the
growing store, on the Triton path (the CPU interpreter here, see conftest.py; compiled on CUDA, marked gpu).

Both sides run the same kernels on the same tokens; the static side plans the decode kernel's splits for its
capacity instead of the filled length, so outputs differ by summation order only: fp32 sums, with the GQA
value products in tf32 on both (TF32_TOL of test_kernels.py). Stored codes, values, scales and zeros are
compared bit-exactly.
"""
import pytest
import torch
from transformers import LlamaConfig, MistralConfig

from h1bkv_lite.cache import H1BCache
from h1bkv_lite.kernels._common import is_interpreted
from h1bkv_lite.kernels.decode_attention import _decode_split_kernel

_CUDA = torch.cuda.is_available()
DEVICES = [
    "cpu",
    pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not _CUDA, reason="needs CUDA")]),
]
TOL = dict(rtol=2**-9, atol=2**-9)  # see the module docstring


@pytest.fixture(params=DEVICES)
def device(request):
    if request.param == "cpu" and not is_interpreted(_decode_split_kernel):
        pytest.skip("Triton kernels are compiled for CUDA here; run with TRITON_INTERPRET=1 for the CPU cases")
    return torch.device(request.param)


def _config(layers: int = 1, heads: int = 9, kv_heads: int = 3) -> LlamaConfig:
    return LlamaConfig(vocab_size=64, hidden_size=64 * heads, intermediate_size=64, num_hidden_layers=layers,
                       num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=64)


def _seed() -> int:
    return int(torch.randint(0, 2**31 - 1, (1,)).item())


def _qkv(seed, B, Hq, Hkv, T, device):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(B, h, T, 64, generator=gen).to(device) for h in (Hq, Hkv, Hkv)]


def _run(cache, q, k, v, prompt: int):
    """Prefill ``prompt`` tokens, then decode the rest one at a time; the decode steps' outputs."""
    layer = cache.layers[0]
    layer.update(k[:, :, :prompt], v[:, :, :prompt])
    layer.attend(q[:, :, :prompt])
    outs = []
    for t in range(prompt, q.shape[2]):
        layer.update(k[:, :, t:t + 1], v[:, :, t:t + 1])
        outs.append(layer.attend(q[:, :, t:t + 1]))
    return torch.cat(outs, dim=2)


@pytest.mark.parametrize("score,temperature,heads,window,sink,centered", [
    ("hamming", None, (9, 3), 0, 0, False), ("asym", None, (4, 4), 0, 0, False), ("hamming", 0.1, (8, 2), 0, 0, False),
    ("hamming", None, (9, 3), 8, 3, True), ("asym", None, (4, 2), 5, 0, False), ("cos", None, (4, 4), 0, 2, True)])
def test_static_capacity_equals_the_growing_store(device, score, temperature, heads, window, sink, centered):
    """Prefill (calibrated T for "hamming" without one) and decode steps, with and without an exact window (a ring
    in the static cache), sinks and key centering: the same stored bytes, outputs within summation-order
    rounding, the same nbytes(); the device fill level follows the host count."""
    seed = _seed()
    Hq, Hkv = heads
    P, S = 70, 13  # more decode steps than the window: the ring wraps
    q, k, v = _qkv(seed, 2, Hq, Hkv, P + S, device)
    mu = torch.randn(1, Hkv, 64, generator=torch.Generator().manual_seed(seed)) if centered else None
    kw = dict(bits=128, score=score, temperature=temperature, backend="triton", window=window, sink=sink,
              key_mean=mu)
    growing = H1BCache(_config(heads=Hq, kv_heads=Hkv), **kw)
    static = H1BCache(_config(heads=Hq, kv_heads=Hkv), **kw, max_cache_len=P + S + 3)
    want, got = _run(growing, q, k, v, P), _run(static, q, k, v, P)
    msg = f"seed={seed}"
    torch.testing.assert_close(got, want, **TOL, msg=lambda m: f"{msg}\n{m}")
    a, b = growing.layers[0].stored, static.layers[0].stored
    assert set(a) == set(b)
    for name in a:
        assert torch.equal(a[name].view(torch.uint8), b[name].view(torch.uint8)), f"{msg}: {name}"
    assert static.nbytes() == growing.nbytes() and static.nbytes_by_part() == growing.nbytes_by_part()
    layer = static.layers[0]
    assert int(layer._filled_dev) == layer.held_compressed == P + S - window - sink
    assert layer.store.capacity >= P + S + 3 and layer.store.buffers()["key_codes"].shape[2] == layer.store.capacity


def test_static_buffers_keep_their_addresses_across_decode_steps(device):
    seed = _seed()
    q, k, v = _qkv(seed, 1, 4, 2, 40, device)
    cache = H1BCache(_config(heads=4, kv_heads=2), bits=64, temperature=0.2, backend="triton", max_cache_len=64)
    layer = cache.layers[0]
    layer.update(k[:, :, :30], v[:, :, :30])
    layer.attend(q[:, :, :30])
    pointers = {name: t.data_ptr() for name, t in layer.store.buffers().items()}
    fill = layer._filled_dev.data_ptr()
    for t in range(30, 40):
        layer.update(k[:, :, t:t + 1], v[:, :, t:t + 1])
        layer.attend(q[:, :, t:t + 1])
        assert {name: x.data_ptr() for name, x in layer.store.buffers().items()} == pointers
        assert layer._filled_dev.data_ptr() == fill


def test_static_capacity_refuses_more_tokens_than_it_holds(device):
    q, k, v = _qkv(_seed(), 1, 4, 2, 20, device)
    cache = H1BCache(_config(heads=4, kv_heads=2), bits=64, temperature=0.2, backend="triton", max_cache_len=16)
    with pytest.raises(ValueError, match="more than max_cache_len=16"):
        cache.layers[0].update(k, v)
        cache.layers[0].attend(q)


def test_static_crop_moves_the_device_fill_level(device):
    """A rollback (assisted decoding) lowers the device fill level with the host count: the next steps
    overwrite the dropped slots and attend as the growing store does after the same crop."""
    seed = _seed()
    q, k, v = _qkv(seed, 1, 4, 2, 50, device)
    kw = dict(bits=64, temperature=0.2, backend="triton")
    caches = [H1BCache(_config(heads=4, kv_heads=2), **kw), H1BCache(_config(heads=4, kv_heads=2), **kw,
                                                                         max_cache_len=64)]
    outs = []
    for cache in caches:
        _run(cache, q[:, :, :45], k[:, :, :45], v[:, :, :45], 40)
        cache.crop(-3)
        layer = cache.layers[0]
        steps = []
        for t in range(42, 50):
            layer.update(k[:, :, t:t + 1], v[:, :, t:t + 1])
            steps.append(layer.attend(q[:, :, t:t + 1]))
        outs.append(torch.cat(steps, dim=2))
    assert int(caches[1].layers[0]._filled_dev) == caches[1].layers[0].held_compressed == 50
    torch.testing.assert_close(outs[1], outs[0], **TOL, msg=lambda m: f"seed={seed}\n{m}")


def test_replayed_advances_the_host_counts(device):
    """After graph replays (device work without Python) the host counts catch up: nbytes() and the stored views
    cover the replayed tokens."""
    q, k, v = _qkv(_seed(), 1, 4, 2, 10, device)
    cache = H1BCache(_config(heads=4, kv_heads=2), bits=64, temperature=0.2, backend="triton", max_cache_len=64)
    _run(cache, q, k, v, 9)
    layer = cache.layers[0]
    before = cache.nbytes()
    cache.replayed(3)
    assert layer.n_seen == layer.n_compressed == len(layer.store) == 13 and cache.get_seq_length() == 13
    assert cache.nbytes() == before * 13 // 10
    with pytest.raises(ValueError, match="static-capacity"):
        H1BCache(_config(heads=4, kv_heads=2), bits=64, temperature=0.2).replayed(1)


def test_static_window_fills_in_order_then_takes_single_token_steps(device):
    """A prompt (or a last prompt chunk of one token) shorter than the window and sinks: the next tokens fill them in
    order, then the ring starts; the outputs equal the growing store's. Once decoding has begun, multi-token calls
    are refused."""
    seed = _seed()
    q, k, v = _qkv(seed, 1, 4, 2, 30, device)
    kw = dict(bits=64, temperature=0.2, backend="triton", window=8, sink=2)
    short = H1BCache(_config(heads=4, kv_heads=2), **kw, max_cache_len=64)
    growing = H1BCache(_config(heads=4, kv_heads=2), **kw)
    torch.testing.assert_close(_run(short, q[:, :, :14], k[:, :, :14], v[:, :, :14], 6),
                               _run(growing, q[:, :, :14], k[:, :, :14], v[:, :, :14], 6), **TOL,
                               msg=lambda m: f"seed={seed}\n{m}")
    kw["max_cache_len"] = 64
    cache = H1BCache(_config(heads=4, kv_heads=2), **kw)
    _run(cache, q[:, :, :22], k[:, :, :22], v[:, :, :22], 20)
    with pytest.raises(ValueError, match="one token per forward once decoding has begun, got 3"):
        cache.layers[0].update(k[:, :, 22:25], v[:, :, 22:25])
    with pytest.raises(NotImplementedError, match="cannot roll back"):
        cache.crop(-1)


def test_static_capacity_arguments_are_checked():
    config = _config(heads=4, kv_heads=2)
    for kwargs, match in [({"max_cache_len": 0}, "max_cache_len"),
                          ({"max_cache_len": 8, "backend": "torch"}, "needs the Triton kernels"),
                          ({"max_cache_len": 8, "bits": 24}, "multiple of 32")]:
        with pytest.raises(ValueError, match=match):
            H1BCache(config, **{"bits": 64, **kwargs})
    sliding = MistralConfig(vocab_size=64, hidden_size=256, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, head_dim=64, sliding_window=32)
    with pytest.raises(ValueError, match="sliding-window"):
        H1BCache(sliding, bits=64, max_cache_len=8)


def test_static_capacity_on_cpu_without_the_interpreter_is_refused():
    """backend="auto" on CPU tensors takes the torch path, which has no static mode: a clear error at the
    first update (not a silent growing store)."""
    cache = H1BCache(_config(heads=4, kv_heads=2), bits=64, temperature=0.2, max_cache_len=8)
    k = torch.randn(1, 2, 4, 64)
    with pytest.raises(ValueError, match="needs the Triton kernels"):
        cache.layers[0].update(k, k)


def test_growing_store_decodes_from_its_whole_buffers_across_a_growth(device, monkeypatch):
    """A growing store's decode step hands the kernel its whole buffers, the fill level as ``length`` and a launch
    layout kept while the buffers stay the same: each call is bit-identical to the call on the live slices, the
    layout is reused between steps and replaced when the buffers grow (a prompt of 250 tokens fills 250 of 256
    slots; the seventh decode step grows them)."""
    from h1bkv_lite.kernels import decode_attention as da

    seed = _seed()
    q, k, v = _qkv(seed, 1, 4, 2, 260, device)
    cache = H1BCache(_config(heads=4, kv_heads=2), bits=64, score="cos", backend="triton")
    layer = cache.layers[0]
    real = da.h1b_decode_attention_unchecked
    seen = []

    def checked(*args, length=None, layout=None, **kwargs):
        out = real(*args, length=length, layout=layout, **kwargs)
        q0, *stored = args
        norms = kwargs.pop("key_norms")
        sliced = real(q0, *(t[:, :, :length] for t in stored), key_norms=norms[:, :, :length], **kwargs)
        assert torch.equal(out, sliced), f"seed={seed}, length={length}"
        seen.append((length, layout, layer.store.capacity))
        return out

    monkeypatch.setattr(da, "h1b_decode_attention_unchecked", checked)
    layer.update(k[:, :, :250], v[:, :, :250])
    layer.attend(q[:, :, :250])
    for t in range(250, 260):
        layer.update(k[:, :, t:t + 1], v[:, :, t:t + 1])
        layer.attend(q[:, :, t:t + 1])
    # the first decode step goes through the checked entry point; every later one through the spy
    assert [length for length, _, _ in seen] == list(range(252, 261))
    assert all(layout is not None for _, layout, _ in seen)
    capacities = [cap for _, _, cap in seen]
    assert capacities[0] == 256 and capacities[-1] > 256
    grown = capacities.index(capacities[-1])
    layouts = [layout for _, layout, _ in seen]
    assert all(x is layouts[0] for x in layouts[:grown]) and all(x is layouts[-1] for x in layouts[grown:])
    assert layouts[-1] is not layouts[0]
    assert layouts[-1].tensors[0] is layer.store.buffers()["key_codes"]


def test_a_batch_op_frees_the_replaced_buffers_at_once(device):
    """Beam search remaps the cache's batch every step: the store's old buffers must go at once, not stay held by
    the launch layout kept for them until the layer's next decode step (twice the store's memory meanwhile)."""
    import gc
    import weakref

    seed = _seed()
    q, k, v = _qkv(seed, 2, 4, 2, 24, device)
    cache = H1BCache(_config(heads=4, kv_heads=2), bits=64, temperature=0.2, backend="triton")
    layer = cache.layers[0]
    layer.update(k[:, :, :20], v[:, :, :20])
    layer.attend(q[:, :, :20])
    for t in (20, 21):  # the second step is unchecked: it keeps a launch layout of the buffers
        layer.update(k[:, :, t:t + 1], v[:, :, t:t + 1])
        layer.attend(q[:, :, t:t + 1])
    assert layer._buffer_layouts is not None
    old = weakref.ref(layer.store.buffers()["key_codes"])
    cache.reorder_cache(torch.tensor([1, 0], device=device))
    gc.collect()
    assert old() is None, "the replaced buffers are still held"
    layer.update(k[:, :, 22:23].flip(0), v[:, :, 22:23].flip(0))
    assert layer.attend(q[:, :, 22:23].flip(0)).shape == (2, 4, 1, 64)
