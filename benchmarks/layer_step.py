"""One layer's eager decode step, H1BCache against DynamicCache + SDPA, side by side on one GPU.

    python benchmarks/layer_step.py --out benchmarks/results        # -> layer_step_<device>.json

An eager ``generate()`` step is bound by the host: per layer, the model's Python and launches, then the cache's
``update`` and the attention call. This times the cache's part alone, as a model layer makes it: ``cache.update(k,
v, 0)`` of one new token, then the attention function transformers would call (H1BCache: the ``"h1bkv"`` hook,
:func:`h1bkv_lite.cache.cache_attention`; DynamicCache: transformers' ``sdpa_attention_forward``), on a layer that
holds a ``--prompt``-token prefill of random fp16 keys and values. One random-init layer shape per ``--model`` preset
(``h1bkv_lite.random_model.PRESETS``: head counts and head_dim), B = 1.

``paired_speedup``: DynamicCache's time over H1BCache's, from alternating blocks of ``HOST_CALLS`` back-to-back
steps (:func:`decode_eager.paired_speedup`), both caches cropped back to the prompt after every block (untimed), so
the context stays ``--prompt`` to ``--prompt + HOST_CALLS``. ``h1b_us`` / ``dynamic_us``: wall microseconds per step
of one block each (median of the blocks). At B = 1 both are bound by the host (a step's GPU time is a few tens of
microseconds). Run it from another checkout (``PYTHONPATH=<checkout>``) to time that commit's cache with the same
method. Timings never gate tests.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers import DynamicCache
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from h1bkv_lite import H1BCache
from h1bkv_lite.cache import cache_attention
from h1bkv_lite.random_model import random_config

sys.path.insert(0, str(Path(__file__).resolve().parent))
from decode import device_slug, environment, write_json  # noqa: E402
from decode_eager import HOST_CALLS, PAIRED_ROUNDS, paired_speedup  # noqa: E402


class _Attention(torch.nn.Module):
    """What transformers' attention functions read from the attention module."""

    def __init__(self, config):
        super().__init__()
        self.layer_idx, self.is_causal, self.config = 0, True, config
        self.num_key_value_groups = config.num_attention_heads // config.num_key_value_heads


def make_steps(model: str, prompt: int, bits: int, score: str, device) -> dict:
    """Prefilled one-layer caches of ``model``'s shape and their decode-step functions (``"h1b"``, ``"dynamic"``),
    with a ``reset`` that crops both back to the prompt and ``lengths`` (their token counts)."""
    config = random_config(model)
    config.num_hidden_layers = 1
    Hq, Hkv = config.num_attention_heads, config.num_key_value_heads
    D = getattr(config, "head_dim", None) or config.hidden_size // Hq
    gen = torch.Generator(device=device).manual_seed(0)

    def randn(h, t):
        return torch.randn(1, h, t, D, generator=gen, device=device, dtype=torch.float16)

    module = _Attention(config)
    q, k, v = randn(Hq, prompt), randn(Hkv, prompt), randn(Hkv, prompt)
    h1b = H1BCache(config, bits=bits, score=score)
    dyn = DynamicCache(config=config)
    with torch.no_grad():
        cache_attention(module, q, *h1b.update(k, v, 0), None)
        sdpa_attention_forward(module, q, *dyn.update(k, v, 0), None)
    q1, k1, v1 = randn(Hq, 1), randn(Hkv, 1), randn(Hkv, 1)

    @torch.no_grad()
    def h1b_step():
        cache_attention(module, q1, *h1b.update(k1, v1, 0), None)

    @torch.no_grad()
    def dynamic_step():
        sdpa_attention_forward(module, q1, *dyn.update(k1, v1, 0), None)

    def reset():  # negative crop: remove that many tokens (the API of transformers >= 5.14)
        for cache in (h1b, dyn):
            extra = cache.get_seq_length() - prompt
            if extra:
                cache.crop(-extra)

    for _ in range(3):  # compile, first checked kernel call
        h1b_step(), dynamic_step()
    reset()
    def lengths() -> tuple[int, int]:
        return h1b.get_seq_length(), dyn.get_seq_length()

    return {"h1b": h1b_step, "dynamic": dynamic_step, "reset": reset, "lengths": lengths, "Hq": Hq, "Hkv": Hkv, "D": D}


def block_us(fn, reset, sync, calls: int) -> float:
    """Wall microseconds per call of ``calls`` back-to-back calls (synced before and after), then ``reset()``."""
    sync()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    sync()
    elapsed = time.perf_counter() - start
    reset()
    return elapsed / calls * 1e6


def measure(model: str, prompt: int, bits: int, score: str, device, *, calls: int = HOST_CALLS,
            rounds: int = PAIRED_ROUNDS) -> dict:
    """One row: the two step times (median of 5 blocks each) and their paired ratio (``rounds`` pairs)."""
    steps = make_steps(model, prompt, bits, score, device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    row = {"model": model, "prompt": prompt, "bits": bits, "score": score, "batch": 1,
           **{name: steps[name] for name in ("Hq", "Hkv", "D")}}
    row["h1b_us"] = statistics.median(block_us(steps["h1b"], steps["reset"], sync, calls) for _ in range(5))
    row["dynamic_us"] = statistics.median(block_us(steps["dynamic"], steps["reset"], sync, calls) for _ in range(5))
    row["paired_speedup"] = paired_speedup(steps["dynamic"], steps["h1b"], rounds=rounds, calls=calls, sync=sync,
                                           after_block=steps["reset"])
    return row


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", nargs="+", default=["llama-2-7b", "llama-3-8b"], help="presets or HF configs")
    parser.add_argument("--prompt", nargs="+", type=int, default=[8192], help="tokens held (default: 8192)")
    parser.add_argument("--bits", type=int, default=128, help="H1BCache sketch bits (default: 128)")
    parser.add_argument("--score", default="hamming", choices=["hamming", "cos", "asym"])
    parser.add_argument("--label", default="", help="a name for the code timed (e.g. a commit), kept in the rows")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"), help="folder for the JSON")
    parser.add_argument("--out-name", help="file name in --out (default: layer_step_<device>.json)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        parser.error("needs a CUDA GPU")
    if any(p < 2 for p in args.prompt):
        parser.error("--prompt: at least 2 tokens (the prefill calibrates the 'hamming' temperature)")
    device = torch.device("cuda")
    rows = []
    for model in args.model:
        for prompt in args.prompt:
            row = {**measure(model, prompt, args.bits, args.score, device), "label": args.label}
            rows.append(row)
            ps = row["paired_speedup"]
            print(f"{args.label:>10} {model:>11} {prompt:>7}: h1b {row['h1b_us']:7.1f} us  dynamic "
                  f"{row['dynamic_us']:7.1f} us  dynamic/h1b {ps['median']:.2f}x ({ps['q1']:.2f}-{ps['q3']:.2f})",
                  flush=True)
    name = args.out_name or f"layer_step_{device_slug(torch.cuda.get_device_name(device))}.json"
    write_json(args.out / name, {"environment": environment(device), "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
