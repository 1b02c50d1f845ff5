"""Timing of one decode-attention call on the GPU, shared by ``decode.py`` and ``compare_commits.py``.

Only the kernels' public entry points are imported (``h1b_decode_attention`` and its reference, present in every
commit of the project), so ``compare_commits.py`` can time older commits' kernels with today's method.

Each time is the median over repeated replays of a CUDA graph that runs the call over several distinct copies of
its inputs, enough that they do not fit in L2 together (so every call reads DRAM), divided by the number of calls;
``eager_time_ms`` is ``triton.testing.do_bench`` on the plain Python call (launches included, L2 flushed).
"""
from __future__ import annotations

import math
import statistics

import torch
import torch.nn.functional as F
import triton
from torch.nn.attention import SDPBackend, sdpa_kernel

from h1bkv_lite.kernels import h1b_decode_attention, h1b_decode_attention_reference

L2_DEFEAT_BYTES = 200 * 2**20  # distinct input sets per graph until they cover this many bytes


def copy_bandwidth(device, nbytes: int = 2**30) -> float:
    """Device-to-device copy bandwidth in GB/s, counting bytes read plus bytes written."""
    src = torch.randn(nbytes // 2, dtype=torch.float16, device=device)
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), warmup=25, rep=200, return_mode="median")
    return 2 * nbytes / (ms * 1e-3) / 1e9


def graph_time_ms(fns, reps: int = 20, trials: int = 7) -> float:
    """Median GPU time of one call, from CUDA-graph replays of ``fns`` (one call per input set)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for f in fns:  # warm up (compiles, allocator) outside the graph
            f()
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for f in fns:
            f()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(trials):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps):
            graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / (reps * len(fns)))
    del graph
    return statistics.median(times)


def eager_time_ms(fn) -> float:
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def make_h1b_inputs(*, B, Hq, Hkv, N, D, bits, score, device, gen, value_bits=4):
    """Random cache contents in the kernel's storage format (timings do not depend on the values)."""
    def randint(*shape):
        return torch.randint(0, 256, shape, dtype=torch.uint8, device=device, generator=gen)

    codes = randint(B, Hkv, N, bits // 8)
    data = randint(B, Hkv, N, D * value_bits // 8)
    scale = (torch.rand(B, Hkv, N, 1, device=device, generator=gen) * 0.02 + 1e-3).half()
    zero = (torch.randn(B, Hkv, N, 1, device=device, generator=gen) * 0.1 - 0.15).half()
    q = torch.randn(B, Hq, D, device=device, generator=gen).half()
    kwargs = dict(score=score, value_bits=value_bits)
    if score == "hamming":
        kwargs["temperature"] = 0.1
    else:
        kwargs["key_norms"] = (torch.rand(B, Hkv, N, device=device, generator=gen) * 4 + 8).half()
    return (q, codes, data, scale, zero), kwargs


def tensor_bytes(*tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


def bench_h1b(*, B, Hq, Hkv, N, D, bits, score, device, config=None, eager=True, check=False):
    gen = torch.Generator(device=device).manual_seed(0)
    projection = torch.randn(D, bits, device=device, generator=gen)
    args, kwargs = make_h1b_inputs(B=B, Hq=Hq, Hkv=Hkv, N=N, D=D, bits=bits, score=score, device=device, gen=gen)
    nbytes = tensor_bytes(*args, kwargs.get("key_norms")) + B * Hq * D * 2  # + fp16 output
    sets = [(args, kwargs)] + [
        make_h1b_inputs(B=B, Hq=Hq, Hkv=Hkv, N=N, D=D, bits=bits, score=score, device=device, gen=gen)
        for _ in range(max(0, math.ceil(L2_DEFEAT_BYTES / nbytes) - 1))
    ]
    # Under graphs launches are free, so contexts always split to fill the GPU; eager calls use the defaults
    # (one split, one launch, for short contexts)
    graphed = {"single_split_max_n": 0, **(config or {})}
    fns = [
        (lambda a=a, k=k: h1b_decode_attention(*a, projection=projection, backend="triton", config=graphed, **k))
        for a, k in sets
    ]
    row = {"h1b_ms": graph_time_ms(fns), "h1b_bytes": nbytes}
    if eager:
        a, k = sets[0]
        row["h1b_eager_ms"] = eager_time_ms(
            lambda: h1b_decode_attention(*a, projection=projection, backend="triton", config=config, **k))
    if check:
        got = fns[0]().float()
        ref = h1b_decode_attention_reference(*args, projection=projection, **kwargs).float()
        row["max_rel_err_vs_reference"] = ((got - ref).abs().max() / ref.abs().max()).item()
    del sets, fns
    torch.cuda.empty_cache()
    return row


def bench_sdpa(*, B, Hq, Hkv, N, D, device, eager=True):
    gen = torch.Generator(device=device).manual_seed(1)

    def make():  # drawn in fp16: drawing fp32 and casting would hold a transient copy of twice K's bytes
        return [torch.randn(B, h, n, D, device=device, generator=gen, dtype=torch.float16)
                for h, n in ((Hq, 1), (Hkv, N), (Hkv, N))]

    first = make()
    nbytes = tensor_bytes(*first) + B * Hq * D * 2
    sets = [first] + [make() for _ in range(max(0, math.ceil(L2_DEFEAT_BYTES / nbytes) - 1))]

    def call(q, k, v):
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return F.scaled_dot_product_attention(q, k, v, enable_gqa=Hq != Hkv)

    fns = [(lambda s=s: call(*s)) for s in sets]
    row = {"sdpa_ms": graph_time_ms(fns), "sdpa_bytes": nbytes}
    if eager:
        row["sdpa_eager_ms"] = eager_time_ms(fns[0])
    del sets, fns
    torch.cuda.empty_cache()
    return row
