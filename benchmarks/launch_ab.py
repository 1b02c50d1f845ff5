"""Eager ``generate()`` with the kernels' cached launch on and off, rows interleaved in one run, one GPU.

    python benchmarks/launch_ab.py --out benchmarks/results          # -> launch_ab_<device>.json

An eager decode step issues two Triton launches per layer (the fused append, the attention). ``kernels._launcher``
relaunches their compiled kernels without Triton's per-call argument binding; inside
``kernels._launcher.uncached_launches()`` every launch takes ``kernel[grid](...)`` again. Each prompt length runs
``--repeats`` rounds of: H1BCache with Triton's own launch (``"uncached"``), H1BCache with the cached launch
(``"cached"``), DynamicCache -- interleaved, because this host's speed drifts within a run (identical launches
differ by up to 2x), so a ratio is read from rows run next to each other. Rows are ``benchmarks/generate.py``'s
(``decode_tok_s``, ``prefill_s``, peak memory; random-init fp16 models, random prompts), after an untimed warm-up
of both launch modes in every eager launch regime the rows reach. Timings never gate tests.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from h1bkv_lite.kernels import _launcher

sys.path.insert(0, str(Path(__file__).resolve().parent))
from decode import device_slug, environment, write_json  # noqa: E402
from generate import WARMUP_NEW_TOKENS, build_model, free_memory, run_generate, warmup_prompts  # noqa: E402

MODES = ("uncached", "cached")


def run_row(model, spec: dict, mode: str | None) -> dict:
    """One generate() row; ``mode`` "uncached" runs it inside ``uncached_launches()`` (None: a DynamicCache row)."""
    if mode == "uncached":
        with _launcher.uncached_launches():
            row = run_generate(model, spec, count_syncs=False)
    else:
        row = run_generate(model, spec, count_syncs=False)
    return {**row, "launch": mode}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", nargs="+", default=["llama-2-7b", "llama-3-8b"], help="presets or HF configs")
    parser.add_argument("--prompts", nargs="+", type=int, default=[8192, 32768], help="prompt lengths (tokens)")
    parser.add_argument("--batch", type=int, default=1, help="batch size (default: 1)")
    parser.add_argument("--new-tokens", type=int, default=64, help="tokens generated per row (default: 64)")
    parser.add_argument("--repeats", type=int, default=2, help="interleaved rounds per prompt (default: 2)")
    parser.add_argument("--bits", type=int, default=128, help="H1BCache sketch bits (default: 128)")
    parser.add_argument("--score", default="hamming", choices=["hamming", "cos", "asym"])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"), help="folder for the JSON")
    parser.add_argument("--out-name", help="file name in --out (default: launch_ab_<device>.json)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        parser.error("needs a CUDA GPU")
    for name in ("batch", "new_tokens", "repeats"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')}: a positive integer, got {getattr(args, name)}")
    dev = torch.device("cuda")
    torch.backends.cuda.enable_cudnn_sdp(False)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / (args.out_name or f"launch_ab_{device_slug(torch.cuda.get_device_name(dev))}.json")
    result = {**environment(dev), "date": time.strftime("%Y-%m-%d"), "new_tokens": args.new_tokens,
              "batch": args.batch, "rows": []}
    h1b = {"cache": "h1b", "bits": args.bits, "score": args.score, "prefill_chunk": None}
    dynamic = {"cache": "dynamic", "bits": None, "score": None, "prefill_chunk": None}
    for model_name in args.model:
        model = build_model(model_name, dev)
        common = {"model": model_name, "batch": args.batch}
        for T in warmup_prompts(model, args.prompts, args.new_tokens):  # compile every form both modes launch
            for mode in MODES:
                run_row(model, {**h1b, **common, "prompt_len": T, "new_tokens": WARMUP_NEW_TOKENS}, mode)
        for T in args.prompts:
            for rep in range(args.repeats):
                spec = {**common, "prompt_len": T, "new_tokens": args.new_tokens}
                for mode in MODES:
                    result["rows"].append({**run_row(model, {**h1b, **spec}, mode), "repeat": rep})
                result["rows"].append({**run_row(model, {**dynamic, **spec}, None), "repeat": rep})
                write_json(path, result)
                rows = result["rows"][-3:]
                print(f"{model_name} T={T} round {rep}: " + "  ".join(
                    f"{r['cache']}/{r['launch']} {r.get('decode_tok_s', float('nan')):5.1f} tok/s" for r in rows),
                    flush=True)
        del model
        free_memory()
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
