"""One decode-attention shape, called a few times, for Nsight Compute to profile (the kernels' hardware counters).

    ncu --clock-control none --kernel-name regex:_decode_split_kernel --launch-skip 3 --launch-count 1 \
        --section SpeedOfLight --section WarpStateStats --section SchedulerStats --section Occupancy \
        --section LaunchStats --section ComputeWorkloadAnalysis --section InstructionStats \
        python benchmarks/ncu_decode.py --group 4 --context 32768 --config score_dot=true

(the sections of ``benchmarks/results/ncu_h200/``).

Builds the same random cache as ``decode.py`` (``decode_timing.make_h1b_inputs``: 32 query heads, head_dim 128,
per-token 4-bit values), checks one call against the torch reference, then makes ``--calls`` more calls (the
first are compiles and warm-up: skip them with ``--launch-skip``). ``--config`` overrides the kernel's defaults
as ``key=value`` (the keys of ``_default_config``). Without ncu it prints the output's error and exits.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from h1bkv_lite.kernels import h1b_decode_attention, h1b_decode_attention_reference

sys.path.insert(0, str(Path(__file__).resolve().parent))
from decode_timing import make_h1b_inputs  # noqa: E402
from kernel_resources import parse_config  # noqa: E402


def main(argv=None) -> float:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--group", type=int, default=1, choices=(1, 2, 4, 8), help="query heads per kv head")
    parser.add_argument("--context", type=int, default=32768, help="compressed tokens")
    parser.add_argument("--bits", type=int, default=128)
    parser.add_argument("--score", default="hamming", choices=("hamming", "cos", "asym"))
    parser.add_argument("--calls", type=int, default=5)
    parser.add_argument("--config", nargs="*", default=[], help="kernel config overrides, e.g. score_dot=true")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("this script needs a CUDA GPU")
    device = torch.device("cuda")
    gen = torch.Generator(device=device).manual_seed(0)
    projection = torch.randn(128, args.bits, device=device, generator=gen)
    tensors, kwargs = make_h1b_inputs(B=args.batch, Hq=32, Hkv=32 // args.group, N=args.context, D=128,
                                      bits=args.bits, score=args.score, device=device, gen=gen)
    kwargs["projection"] = projection
    config = parse_config(args.config)
    out = h1b_decode_attention(*tensors, **kwargs, config=config)
    ref = h1b_decode_attention_reference(*tensors, **kwargs)
    err = ((out.float() - ref.float()).abs().max() / ref.float().abs().max()).item()
    print(f"max error / max |reference|: {err:.2e}", flush=True)
    for _ in range(args.calls):
        h1b_decode_attention(*tensors, **kwargs, config=config)
    torch.cuda.synchronize()
    return err


if __name__ == "__main__":
    main()
