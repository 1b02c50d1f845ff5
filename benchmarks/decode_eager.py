"""Eager decode attention (launch cost included): the kernel's launch forms side by side, against SDPA, one GPU.

    python benchmarks/decode_eager.py --out benchmarks/results      # -> decode_eager_<device>.json

What an eager ``generate()`` step pays per layer is the GPU time of its launches plus the host time to issue
them. For each shape (32 query heads, head_dim 128, "hamming" b = 128, 4-bit values, B = 1 by default) and
each form, two numbers:

- ``eager_us``: wall time per call of ``HOST_CALLS`` back-to-back calls and one sync at the end (median of
  ``REPEATS``): what an eager loop pays per call, the larger of the host's time to issue it and the GPU's time to
  run it (the inputs are not flushed from L2 between calls: at these sizes both sides are bound by the host);
- ``host_us``: host time to issue one call, from ``HOST_CALLS`` back-to-back calls without a sync (the launch
  queue absorbs them).

Forms (``config`` overrides of the kernel's defaults):

- ``split+combine``: splits filling the GPU, the query prep, split and combine kernels (three launches);
- ``one-split``: one program per (sequence, kv head) that writes the output (one launch; the default up to
  ``single_split_max_n`` tokens: 8192 for MHA, 4096 for GQA);
- ``fused``: splits filling the GPU, the combine done by each row's last split program (the query prep and one
  split kernel: two launches; the default past ``query_in_split_max_n`` tokens);
- ``query-in-split``: the same splits, each program sketching its query heads itself (``query_in_split_max_n``):
  one launch;
- ``<form>-unchecked``: each form through ``h1b_decode_attention_unchecked``, the call the cache makes on every
  decode step after its first (no argument checks); ``default-unchecked``: that call with the kernel's defaults
  (what the cache runs at this context); ``default-uncached-unchecked``: the same with ``cached_launch=False``
  (every launch bound by Triton's ``JITFunction.run`` instead of relaunching the kept compiled kernel,
  ``kernels/_launcher.py``): the host time the cached launch saves, side by side.

``host_profile``: the default unchecked call's host time by function (cProfile over ``HOST_CALLS`` calls, the top
entries by own time), to see what the launches cost against the Python around them.

``default-layout-unchecked``: the default unchecked call given the store's launch layout
(``decode_attention.StoreLayout``, worked out once: the codes' int32 view and every stride), the call the cache makes
on every decode step since 2026-12-02; ``paired_speedup_default_layout_unchecked`` pairs it with SDPA the same way.

``paired_speedup_default_unchecked``: SDPA's eager time over the default unchecked call's, from alternating
blocks of ``HOST_CALLS`` calls (:func:`paired_speedup`, ``PAIRED_ROUNDS`` pairs): the ratio the eager target is
read from, since each pair's two blocks run milliseconds apart while the host's speed drifts over the seconds
between the forms above.

SDPA: ``F.scaled_dot_product_attention`` on an fp16 cache, flash backend (``enable_gqa``), the backend pinned
once around its timings (entering ``sdpa_kernel`` per call would add host time a model does not pay). Timings never gate
tests; the ratios are read side by side from one run.
"""
from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from h1bkv_lite.kernels.decode_attention import (
    _default_config, h1b_decode_attention, h1b_decode_attention_unchecked,
)

sys.path.insert(0, str(Path(__file__).resolve().parent))
from decode import device_slug, environment, parse_context, write_json  # noqa: E402
from decode_timing import make_h1b_inputs  # noqa: E402

FORMS = {
    "split+combine": {"single_split_max_n": 0, "query_in_split_max_n": 0, "fused_combine": False},
    "one-split": {"single_split_max_n": 1 << 40},
    "fused": {"single_split_max_n": 0, "query_in_split_max_n": 0},
    "query-in-split": {"single_split_max_n": 0, "query_in_split_max_n": 1 << 40},
}
HOST_CALLS = 200
REPEATS = 5
PAIRED_ROUNDS = 16  # even: as many pairs start with either side


def host_us(fn) -> float:
    """Host microseconds to issue one call (``HOST_CALLS`` calls, no sync between them)."""
    fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(HOST_CALLS):
        fn()
    elapsed = time.perf_counter() - start
    torch.cuda.synchronize()
    return elapsed / HOST_CALLS * 1e6


def host_profile(fn, top: int = 15) -> list[str]:
    """cProfile of ``HOST_CALLS`` calls: the ``top`` functions by own time, as pstats prints them."""
    fn()
    torch.cuda.synchronize()
    profile = cProfile.Profile()
    profile.enable()
    for _ in range(HOST_CALLS):
        fn()
    profile.disable()
    torch.cuda.synchronize()
    text = io.StringIO()
    pstats.Stats(profile, stream=text).sort_stats("tottime").print_stats(top)
    return [line for line in text.getvalue().splitlines() if line.strip()]


def eager_us(fn) -> float:
    """Median over ``REPEATS`` of the wall time per call of ``HOST_CALLS`` calls and one sync (microseconds)."""
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(REPEATS):
        start = time.perf_counter()
        for _ in range(HOST_CALLS):
            fn()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - start) / HOST_CALLS * 1e6)
    return statistics.median(times)


def paired_speedup(baseline, candidate, *, rounds: int = PAIRED_ROUNDS, calls: int = HOST_CALLS,
                   sync=None, clock=time.perf_counter, after_block=None) -> dict:
    """``baseline``'s eager time over ``candidate``'s (> 1: the candidate is faster), from ``rounds`` pairs of
    blocks of ``calls`` back-to-back calls, each block closed by ``sync`` (default ``torch.cuda.synchronize``), the
    two blocks of a pair run in alternating order. A ratio is taken within each pair, a few milliseconds apart, so a
    host whose speed drifts between blocks (seen up to 2x on the H200's host) moves both sides of it; the median and
    quartiles over the pairs (inclusive method: within the ratios' range) are returned with every pair's ratio.
    ``after_block``: called untimed after each block (e.g. to crop a cache back to its prompt). Raises ValueError
    unless ``rounds`` and ``calls`` are positive ints."""
    for name, value in (("rounds", rounds), ("calls", calls)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    sync = sync or torch.cuda.synchronize
    baseline(), candidate()
    sync()

    def block(fn) -> float:
        start = clock()
        for _ in range(calls):
            fn()
        sync()
        elapsed = clock() - start
        if after_block is not None:
            after_block()
        return elapsed

    ratios = []
    for i in range(rounds):
        if i % 2 == 0:
            base_time = block(baseline)
            cand_time = block(candidate)
        else:
            cand_time = block(candidate)
            base_time = block(baseline)
        ratios.append(base_time / cand_time)
    q1, median, q3 = statistics.quantiles(ratios, n=4, method="inclusive") if rounds > 1 else ratios * 3
    return {"rounds": rounds, "calls_per_block": calls, "median": statistics.median(ratios), "q1": q1, "q3": q3,
            "ratios": ratios}


def measure_shape(*, B: int, group: int, N: int, device) -> dict:
    Hq, D, bits = 32, 128, 128
    Hkv = Hq // group
    gen = torch.Generator(device=device).manual_seed(0)
    projection = torch.randn(D, bits, device=device, generator=gen)
    args, kwargs = make_h1b_inputs(B=B, Hq=Hq, Hkv=Hkv, N=N, D=D, bits=bits, score="hamming", device=device, gen=gen)
    row = {"B": B, "Hq": Hq, "Hkv": Hkv, "group": group, "D": D, "context": N, "bits": bits, "score": "hamming",
           "defaults": _default_config("hamming", group, device), "forms": {}}
    reference = None
    for name, config in FORMS.items():
        def call(config=config):
            return h1b_decode_attention(*args, projection=projection, backend="triton", config=config, **kwargs)
        out = call().float()
        reference = out if reference is None else reference
        row["forms"][name] = {"config": config, "eager_us": eager_us(call), "host_us": host_us(call),
                              "max_abs_diff_vs_first_form": float((out - reference).abs().max())}
    for name, config in (*FORMS.items(), ("default-uncached", {"cached_launch": False}), ("default", None)):
        def unchecked(config=config):
            return h1b_decode_attention_unchecked(*args, projection=projection, score="hamming",
                                                  temperature=kwargs["temperature"], key_norms=None, window_k=None,
                                                  window_v=None, value_bits=kwargs["value_bits"], config=config)
        out = unchecked().float()
        row["forms"][f"{name}-unchecked"] = {
            "config": config or {}, "eager_us": eager_us(unchecked), "host_us": host_us(unchecked),
            "max_abs_diff_vs_first_form": float((out - reference).abs().max())}
    row["host_profile"] = host_profile(unchecked)  # the defaults' unchecked call
    from h1bkv_lite.kernels.decode_attention import StoreLayout  # noqa: PLC0415 -- (layer_step.py imports this
    # module to time older checkouts too, which lack it)
    layout = StoreLayout(args[1], None, *args[2:])

    def cache_call():  # the cache's call since 2026-12-02: the store's launch arguments worked out once
        return h1b_decode_attention_unchecked(*args, projection=projection, score="hamming",
                                              temperature=kwargs["temperature"], key_norms=None, window_k=None,
                                              window_v=None, value_bits=kwargs["value_bits"], layout=layout)
    out = cache_call().float()
    row["forms"]["default-layout-unchecked"] = {
        "config": {}, "eager_us": eager_us(cache_call), "host_us": host_us(cache_call),
        "max_abs_diff_vs_first_form": float((out - reference).abs().max())}
    q = torch.randn(B, Hq, 1, D, device=device, dtype=torch.float16, generator=gen)
    k, v = (torch.randn(B, Hkv, N, D, device=device, dtype=torch.float16, generator=gen) for _ in range(2))

    def sdpa():
        return F.scaled_dot_product_attention(q, k, v, enable_gqa=Hq != Hkv)

    # the backend is pinned once around SDPA's timings, not per call (a model's attention pays no context manager)
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        row["sdpa"] = {"eager_us": eager_us(sdpa), "host_us": host_us(sdpa)}
        row["paired_speedup_default_unchecked"] = paired_speedup(sdpa, unchecked)
        row["paired_speedup_default_layout_unchecked"] = paired_speedup(sdpa, cache_call)
    del args, kwargs
    for form in row["forms"].values():
        form["speedup_eager"] = row["sdpa"]["eager_us"] / form["eager_us"]
    del q, k, v
    torch.cuda.empty_cache()
    return row


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"), help="folder for the JSON")
    parser.add_argument("--out-name", help="file name in --out (default: decode_eager_<device>.json)")
    parser.add_argument("--batches", nargs="+", type=int, default=[1], help="batch sizes (default: 1)")
    parser.add_argument("--groups", nargs="+", type=int, default=[1, 4, 8],
                        help="query heads per kv head, of 32 (default: 1 4 8)")
    parser.add_argument("--contexts", nargs="+", type=parse_context, default=[4096, 8192, 32768],
                        help="tokens, 4096 or 4k (default: 4k 8k 32k)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        parser.error("needs a CUDA GPU")
    bad = [g for g in args.groups if g < 1 or 32 % g]
    if bad:
        parser.error(f"--groups: each must divide the 32 query heads, got {bad}")
    if any(b < 1 for b in args.batches):
        parser.error(f"--batches: positive integers, got {args.batches}")
    device = torch.device("cuda")
    args.out.mkdir(parents=True, exist_ok=True)
    result = {**environment(device), "timing": f"eager_us: wall time per call of {HOST_CALLS} calls and one sync, "
              f"median of {REPEATS}; host_us: {HOST_CALLS} calls without a sync", "rows": []}
    path = args.out / (args.out_name or f"decode_eager_{device_slug(torch.cuda.get_device_name(device))}.json")
    for B in args.batches:
        for group in args.groups:
            for N in args.contexts:
                row = measure_shape(B=B, group=group, N=N, device=device)
                result["rows"].append(row)
                write_json(path, result)
                forms = "  ".join(f"{k} {f['eager_us']:6.1f} us (host {f['host_us']:5.1f}, {f['speedup_eager']:4.2f}x)"
                                  for k, f in row["forms"].items())
                paired = row["paired_speedup_default_unchecked"]
                print(f"B={B} 32/{32 // group} ctx={N:>6}: sdpa {row['sdpa']['eager_us']:6.1f} us "
                      f"(host {row['sdpa']['host_us']:5.1f})  {forms}  paired default-unchecked vs sdpa: "
                      f"{paired['median']:.2f}x (quartiles {paired['q1']:.2f}-{paired['q3']:.2f})", flush=True)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
