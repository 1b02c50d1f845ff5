"""Where the wall time of one eager ``generate()`` decode step goes: host (Python) time by function and GPU
time by kernel, for H1BCache against DynamicCache on the same random-init model and prompt.

    python benchmarks/profile_decode_step.py --model llama-2-7b --prompt 8192 --out benchmarks/results

A decode step of eager transformers is usually bound by the host: the GPU waits for Python to issue the
next launch. This script prefills one prompt per cache, then runs ``--steps`` plain decode forwards under
``cProfile`` (host time per function) and under ``torch.profiler`` (GPU time per kernel), and writes both
summaries as text to ``profile_<model>_<prompt>.txt``. Numbers are from one run; read them as proportions.
"""
from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import sys
import time
from pathlib import Path

import torch
from transformers import DynamicCache

sys.path.insert(0, str(Path(__file__).resolve().parent))
from generate import build_model  # noqa: E402

from h1bkv_lite import H1BCache  # noqa: E402


@torch.no_grad()
def decode_steps(model, cache, token, mask, steps: int):
    for _ in range(steps):
        mask = torch.cat([mask, mask[:, -1:]], dim=1)
        model(input_ids=token, attention_mask=mask, past_key_values=cache, use_cache=True)
    return mask


@torch.no_grad()
def profile_cache(model, name: str, make_cache, prompt: int, steps: int) -> str:
    dev = model.device
    ids = torch.randint(3, model.config.vocab_size, (1, prompt), device=dev)
    mask = torch.ones_like(ids)
    cache = make_cache()
    model(input_ids=ids, attention_mask=mask, past_key_values=cache, use_cache=True)
    token = ids[:, -1:]
    mask = decode_steps(model, cache, token, mask, 3)  # warm: compiles, first checked kernel call
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    mask = decode_steps(model, cache, token, mask, steps)
    torch.cuda.synchronize()
    wall = (time.perf_counter() - t0) / steps
    prof = cProfile.Profile()
    prof.enable()
    mask = decode_steps(model, cache, token, mask, steps)
    torch.cuda.synchronize()
    prof.disable()
    text = io.StringIO()
    stats = pstats.Stats(prof, stream=text)
    stats.sort_stats("tottime").print_stats(30)
    text.write("--- the cache's and Triton's functions by cumulative time (same run) ---\n")
    stats.sort_stats("cumulative").print_stats(r"h1bkv_lite|kernels|triton|cache_utils", 40)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as tp:
        decode_steps(model, cache, token, mask, steps)
        torch.cuda.synchronize()
    gpu = tp.key_averages().table(sort_by="cuda_time_total", row_limit=20)
    gpu_total_us = sum(e.device_time_total for e in tp.key_averages()) / steps
    head = (f"===== {name}: {wall * 1e3:.2f} ms per decode step (wall, no profiler); "
            f"GPU busy {gpu_total_us / 1e3:.2f} ms per step =====\n")
    return head + "--- host time by function (cProfile, %d steps) ---\n" % steps + text.getvalue() + \
        "--- GPU time by kernel (%d steps) ---\n" % steps + gpu + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="llama-2-7b")
    parser.add_argument("--prompt", type=int, default=8192)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--bits", type=int, default=128)
    parser.add_argument("--score", default="hamming")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/profile_decode_step.py needs CUDA")
    torch.backends.cuda.enable_cudnn_sdp(False)
    model = build_model(args.model, torch.device("cuda"))
    parts = [f"{args.model}, prompt {args.prompt}, B=1, {torch.cuda.get_device_name()}, torch {torch.__version__}\n"]
    parts.append(profile_cache(model, "DynamicCache", lambda: DynamicCache(config=model.config), args.prompt,
                               args.steps))
    parts.append(profile_cache(model, f"H1BCache(bits={args.bits}, score={args.score!r})",
                               lambda: H1BCache(model.config, bits=args.bits, score=args.score), args.prompt,
                               args.steps))
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"profile_{args.model}_{args.prompt}.txt"
    path.write_text("".join(parts))
    print("".join(parts))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
