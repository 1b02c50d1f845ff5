"""Decode-step append benchmark: one new token per sequence and kv head sketched, packed and quantized into
the cache's store (``sketch_pack_quantize_into``, one Triton launch), one GPU.

    python benchmarks/append.py --out benchmarks/results        # -> append_<device>.json

The append runs once per layer and decode step. Its GPU time is latency, not bandwidth (a few KiB per call),
so this script sweeps the launch configuration (rows per program, warps) and times, side by side in one run:
the fused kernel, its sketch half alone (``sketch_pack``), the torch path of the cache (``pack_bits`` of the
projection's signs plus ``quantize_values_unchecked``), and, for scale, the fp16 copy a ``DynamicCache``
append makes (``torch.cat`` of one token onto 8k cached tokens). Timing as ``decode.py``: CUDA-graph replays
(GPU time; no launch cost) and ``triton.testing.do_bench`` on the plain call (``eager``, launch included).
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parent))
from decode import eager_time_ms, graph_time_ms  # noqa: E402

from h1bkv_lite.kernels.sketch_pack import _launch_append, _launch_sketch_pack  # noqa: E402
from h1bkv_lite.quant import quantize_values_unchecked  # noqa: E402
from h1bkv_lite.sketch import pack_bits  # noqa: E402

CONFIGS = [{}, {"block_m": 16}, {"block_m": 16, "num_warps": 1}, {"block_m": 16, "num_warps": 2},
           {"block_m": 32, "num_warps": 8}]


def case(B: int, H: int, D: int, bits: int, device) -> dict:
    gen = torch.Generator(device=device).manual_seed(0)
    k = torch.randn(B, H, 1, D, device=device, dtype=torch.float16, generator=gen)
    v = torch.randn(B, H, 1, D, device=device, dtype=torch.float16, generator=gen)
    R = torch.randn(D, bits, device=device, generator=gen)
    cap = 64
    codes = torch.empty(B, H, cap, bits // 8, dtype=torch.uint8, device=device)
    data = torch.empty(B, H, cap, D // 2, dtype=torch.uint8, device=device)
    scale = torch.empty(B, H, cap, 1, dtype=torch.float16, device=device)
    zero = torch.empty_like(scale)
    slot = dict(codes=codes[:, :, 5:6], data=data[:, :, 5:6], scale=scale[:, :, 5:6], zero=zero[:, :, 5:6])

    def fused(config):
        return lambda: _launch_append(k, v, R, slot["codes"], slot["data"], slot["scale"], slot["zero"], 4, D, config)

    def torch_path():
        pack_bits(k.float() @ R >= 0)
        quantize_values_unchecked(v, 4, D)

    past = torch.randn(B, H, 8192, D, device=device, dtype=torch.float16)
    row = {"batch": B, "kv_heads": H, "head_dim": D, "bits": bits}
    for i, config in enumerate(CONFIGS):
        fn = fused(config)
        row[f"fused_{i}_graph_us"] = 1e3 * graph_time_ms([fn])
        row[f"fused_{i}_eager_us"] = 1e3 * eager_time_ms(fn)
    k2 = k.reshape(-1, D)
    codes_only = torch.empty(k2.shape[0], bits // 8, dtype=torch.uint8, device=device)

    def sketch_only():  # sketch_pack's launch, without its checked entry point (a finite check syncs)
        _launch_sketch_pack(k2, R, codes_only)

    row["sketch_only_graph_us"] = 1e3 * graph_time_ms([sketch_only])
    row["torch_path_graph_us"] = 1e3 * graph_time_ms([torch_path])
    row["torch_path_eager_us"] = 1e3 * eager_time_ms(torch_path)
    row["dynamic_cat_8k_graph_us"] = 1e3 * graph_time_ms([lambda: torch.cat([past, k], dim=2)])
    return row


def main(argv=None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True,
                        help="folder for the results (writes append_<device>.json there)")
    ns = parser.parse_args(argv)
    if not torch.cuda.is_available():
        parser.error("needs CUDA")
    device = torch.device("cuda")
    rows = []
    for B, H in [(1, 8), (1, 32), (8, 8), (8, 32)]:
        for bits in (128, 256):
            rows.append(case(B, H, 128, bits, device))
            print(json.dumps({k: round(v, 1) if isinstance(v, float) else v for k, v in rows[-1].items()}), flush=True)
    name = torch.cuda.get_device_name(device)
    result = {"device": name, "torch": torch.__version__, "triton": triton.__version__,
              "python": platform.python_version(), "configs": CONFIGS, "rows": rows}
    ns.out.mkdir(parents=True, exist_ok=True)
    path = ns.out / f"append_{name.replace('NVIDIA ', '').replace(' ', '_').lower()}.json"
    path.write_text(json.dumps(result, indent=1))
    return path


if __name__ == "__main__":
    print(main())
