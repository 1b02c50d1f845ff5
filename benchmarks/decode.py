"""Decode-attention benchmark: the H1B-KV Triton kernel against torch SDPA (fp16, flash backend), one GPU.

    python benchmarks/decode.py --out benchmarks/results            # the full grid -> decode_<device>.json
    python benchmarks/decode.py --batches 1 --contexts 4k 32k --out-name decode_h200_part.json
    python benchmarks/decode.py --tune --out /tmp/results           # sweep kernel configs on a few shapes
    python benchmarks/decode.py --quick --out /tmp/results          # a small grid (smoke run)

One query token per sequence and head against a cache of ``context`` past tokens. H1B side: SimHash
key codes (``bits`` per token and kv head), 4-bit per-token values with fp16 scale and zero (plus an fp16
key norm for "cos"/"asym"), no exact window. SDPA side: the same context as an fp16 K/V cache.

Grid (each option takes one or more values; the default is the full grid):

- ``--batches`` B (default 1 8 32);
- ``--groups`` GQA group = query heads per kv head, always 32 query heads (default 1 4 8: 32/32, 32/8, 32/4);
- ``--head-dims`` (default 128 64; the head dims the kernel's tests cover);
- ``--contexts`` in tokens, ``4096`` or ``4k`` (default 4k 8k 32k 128k);
- ``--variants`` H1B variants as ``score:bits``, ``@context`` for "from that context on" (default
  ``hamming:128 hamming:256 cos:128@32k asym:128@32k``).

``--quick`` makes the defaults a small grid (B = 1, groups 1 and 4, head_dim 128, 8k and 32k); options given
beside it still apply. Rows run batch by batch, then group, head_dim, context and variant; one SDPA
measurement per shape serves all its variants. A case whose inputs would not fit is not run: its row says
``"skipped": "memory"`` with ``estimate_bytes`` (both sides' inputs as if held together, plus the L2-defeating
copies) over ``--max-gib`` (default 120 GiB, for a 141 GB H200; about 68 for an 80 GB H100). An out-of-memory
is recorded in its row (``"oom": true``, with the side that did run) and the grid goes on. The JSON is rewritten
after every row, so a run stopped early keeps its rows; ``--out-name`` keeps a partial grid from overwriting the
committed results. The output is checked against the torch reference (``max_rel_err_vs_reference``) for every
variant and shape at the grid's smallest batch and the smallest context that variant runs at.

Each row: the case (``B``, ``Hq``, ``Hkv``, ``group``, ``D``, ``context``, ``bits``, ``score``, ``value_bits``,
``estimate_bytes``), then ``h1b_ms``, ``h1b_eager_ms``, ``h1b_bytes``, ``sdpa_ms``, ``sdpa_eager_ms``,
``sdpa_bytes``, ``speedup`` (SDPA time / H1B time; ``speedup_eager``), ``byte_ratio``, ``h1b_GBps``,
``sdpa_GBps``, ``h1b_frac_of_copy``, ``sdpa_frac_of_copy``, ``config`` (the kernel's defaults), ``oom``.

Timing. Each number is the median over repeated replays of a CUDA graph that runs the call over several
distinct copies of its inputs, enough that they do not fit in L2 together (so every call reads DRAM),
divided by the number of calls: the GPU time a serving loop with graphs would see. ``*_eager_ms`` is
``triton.testing.do_bench`` (median, L2 flushed before each call) on the plain Python call, launch
overheads included. Bandwidth (``*_GBps``, ``*_frac_of_copy``) counts the bytes each call must read (its cache,
query) and write (output), once, against a device-to-device copy measured in the same run (bytes read + written).
"""
from __future__ import annotations

import argparse
import gc
import itertools
import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

import torch
import triton

from h1bkv_lite.kernels.decode_attention import SCORES, _default_config, decode_kernel_serves

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the benchmarks' shared timing module
from decode_timing import (  # noqa: E402
    L2_DEFEAT_BYTES, bench_h1b, bench_sdpa, copy_bandwidth,
)

QUERY_HEADS = 32
HEAD_DIMS = (64, 128)  # the head dims the kernel's tests check
VALUE_BITS = 4
FULL_GRID = {"batches": [1, 8, 32], "groups": [1, 4, 8], "head_dims": [128, 64],
             "contexts": [4096, 8192, 32768, 131072],
             "variants": ["hamming:128", "hamming:256", "cos:128@32k", "asym:128@32k"]}
QUICK_GRID = {**FULL_GRID, "batches": [1], "groups": [1, 4], "head_dims": [128], "contexts": [8192, 32768]}
DEFAULT_MAX_GIB = 120.0


# ---------------------------------------------------------------------------------------------------
# the grid: which cases run (no GPU needed)


def parse_context(text) -> int:
    """A context length in tokens: ``4096`` or ``4k`` (times 1024)."""
    match = re.fullmatch(r"(\d+)([kK]?)", str(text).strip())
    if not match or int(match.group(1)) < 1:
        raise argparse.ArgumentTypeError(f"a context is a positive token count such as 4096 or 4k, got {text!r}")
    return int(match.group(1)) * (1024 if match.group(2) else 1)


def parse_variant(text: str) -> tuple[str, int, int]:
    """``score:bits`` or ``score:bits@context`` -> (score, bits, first context it runs at; 0: every one)."""
    match = re.fullmatch(r"(\w+):(\d+)(?:@(\w+))?", text.strip())
    if not match:
        raise ValueError(f"--variants: each is score:bits or score:bits@context (hamming:128, cos:128@32k), "
                         f"got {text!r}")
    score, bits = match.group(1), int(match.group(2))
    if score not in SCORES:
        raise ValueError(f"--variants: the score must be one of {', '.join(SCORES)}, got {text!r}")
    if bits < 32 or not decode_kernel_serves(bits):
        raise ValueError(f"--variants: the kernel takes bits that are a positive multiple of 32, got {text!r}")
    try:
        start = parse_context(match.group(3)) if match.group(3) else 0
    except argparse.ArgumentTypeError as err:
        raise ValueError(f"--variants: {err}") from None
    return score, bits, start


def _check_grid(batches, groups, head_dims, contexts, max_gib) -> None:
    """ValueError naming the option whose values the benchmark cannot run."""
    for option, values in (("--batches", batches), ("--groups", groups), ("--head-dims", head_dims),
                           ("--contexts", contexts)):
        if not values or any(not isinstance(v, int) or v < 1 for v in values):
            raise ValueError(f"{option}: positive integers, got {list(values)}")
    bad = [g for g in groups if QUERY_HEADS % g]
    if bad:
        raise ValueError(f"--groups: a group (query heads per kv head) must divide the {QUERY_HEADS} query "
                         f"heads, got {bad}")
    bad = [d for d in head_dims if d not in HEAD_DIMS]
    if bad:
        raise ValueError(f"--head-dims: the kernel is benchmarked at head_dim {' or '.join(map(str, HEAD_DIMS))} "
                         f"(the ones its tests check), got {bad}")
    if not max_gib > 0:
        raise ValueError(f"--max-gib: a positive number of GiB, got {max_gib}")


def sdpa_bytes(*, B, Hq, Hkv, N, D) -> int:
    """Bytes one SDPA call moves: fp16 query, K and V read, output written."""
    return 2 * (2 * B * Hq * D + 2 * B * Hkv * N * D)


def h1b_bytes(*, B, Hq, Hkv, N, D, bits, score, value_bits=VALUE_BITS) -> int:
    """Bytes one H1B call moves: per token and kv head its code, packed value, fp16 scale and zero (and key norm
    for "cos"/"asym"); fp16 query read and output written."""
    per_token = bits // 8 + D * value_bits // 8 + 4 + (0 if score == "hamming" else 2)
    return B * Hkv * N * per_token + 2 * 2 * B * Hq * D


def estimate_bytes(*, B, Hq, Hkv, N, D, bits, score) -> int:
    """GPU memory a case needs, bounded from above: both sides' inputs as if held together (the benchmark
    frees SDPA's before making the H1B ones), each with its L2-defeating copies (under ``L2_DEFEAT_BYTES``
    more)."""
    return (sdpa_bytes(B=B, Hq=Hq, Hkv=Hkv, N=N, D=D) + h1b_bytes(B=B, Hq=Hq, Hkv=Hkv, N=N, D=D, bits=bits, score=score)
            + 2 * L2_DEFEAT_BYTES)


def build_cases(*, batches, groups, head_dims, contexts, variants, max_gib=DEFAULT_MAX_GIB) -> list[dict]:
    """Every case of the grid in run order (batch, group, head_dim, context, variant), as the fields its row
    starts from. ``variants`` are ``score:bits[@context]`` strings (``parse_variant``). A case whose
    ``estimate_bytes`` is over ``max_gib`` GiB has ``skipped="memory"``; ``check`` marks the cases compared
    with the torch reference: the smallest batch, at the smallest context each variant runs at. Duplicates
    are dropped. Raises ValueError naming the option at fault."""
    batches, groups, head_dims, contexts = (list(dict.fromkeys(v)) for v in (batches, groups, head_dims, contexts))
    _check_grid(batches, groups, head_dims, contexts, max_gib)
    parsed = list(dict.fromkeys(parse_variant(v) for v in variants))
    first_context = {v: min((n for n in contexts if n >= v[2]), default=None) for v in parsed}
    if not parsed or all(n is None for n in first_context.values()):
        raise ValueError(f"--variants: none runs at the selected contexts {contexts}, got {list(variants)}")
    cases = []
    for B, group, D, N in itertools.product(batches, groups, head_dims, contexts):
        for variant in parsed:
            score, bits, start = variant
            if N < start:
                continue
            Hkv = QUERY_HEADS // group
            case = {"B": B, "Hq": QUERY_HEADS, "Hkv": Hkv, "group": group, "D": D, "context": N, "bits": bits,
                    "score": score, "value_bits": VALUE_BITS,
                    "estimate_bytes": estimate_bytes(B=B, Hq=QUERY_HEADS, Hkv=Hkv, N=N, D=D, bits=bits, score=score),
                    "check": B == min(batches) and N == first_context[variant]}
            if case["estimate_bytes"] > max_gib * 2**30:
                case["skipped"] = "memory"
            cases.append(case)
    return cases


def derived_columns(row: dict, copy_gbps: float) -> dict:
    """Speedups, byte ratio and bandwidths of a row that has both sides' times and bytes."""
    h1b_gbps = row["h1b_bytes"] / (row["h1b_ms"] * 1e-3) / 1e9
    sdpa_gbps = row["sdpa_bytes"] / (row["sdpa_ms"] * 1e-3) / 1e9
    return {"speedup": row["sdpa_ms"] / row["h1b_ms"], "speedup_eager": row["sdpa_eager_ms"] / row["h1b_eager_ms"],
            "byte_ratio": row["sdpa_bytes"] / row["h1b_bytes"], "h1b_GBps": h1b_gbps, "sdpa_GBps": sdpa_gbps,
            "h1b_frac_of_copy": h1b_gbps / copy_gbps, "sdpa_frac_of_copy": sdpa_gbps / copy_gbps}


def format_row(r: dict) -> str:
    head = (f"B={r['B']} H={r['Hq']}/{r['Hkv']} D={r['D']} ctx={r['context']:>6} b={r['bits']} "
            f"{r['score']:>7}: ")
    if r.get("skipped"):
        return head + f"skipped ({r['skipped']}: needs ~{r['estimate_bytes'] / 2**30:.1f} GiB)"
    if r.get("oom"):
        return head + "out of memory in " + " and ".join(s for s in ("h1b", "sdpa") if f"{s}_ms" not in r)
    return (head + f"h1b {r['h1b_ms'] * 1e3:7.1f} us ({r['h1b_eager_ms'] * 1e3:6.1f} eager) "
            f"sdpa {r['sdpa_ms'] * 1e3:7.1f} us  speedup {r['speedup']:4.2f}x (bytes {r['byte_ratio']:4.2f}x)  "
            f"h1b {r['h1b_GBps']:5.0f} GB/s = {r['h1b_frac_of_copy']:4.0%} of copy")


def device_slug(name: str) -> str:
    """A device's tag in the results' file names: "NVIDIA H200" -> "h200"."""
    return name.replace("NVIDIA ", "").replace(" ", "_").lower()


def write_json(path: Path, result: dict) -> None:
    """Replace ``path`` in one step (a run killed while writing leaves the previous version)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(result, indent=1))
    os.replace(tmp, path)


def environment(device) -> dict:
    props = torch.cuda.get_device_properties(device)
    return {
        "device": torch.cuda.get_device_name(device),
        "sm_count": props.multi_processor_count,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d"),
        "commit": git_commit(),
    }


def git_commit() -> str | None:
    """The checkout's short commit (``+dirty`` with uncommitted changes), or None outside a git checkout."""
    def git(*args):
        return subprocess.run(["git", *args], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=10)

    try:
        head = git("rev-parse", "--short", "HEAD")
        if head.returncode:
            return None
        dirty = git("status", "--porcelain", "--untracked-files=no").stdout.strip()
        return head.stdout.strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


# ---------------------------------------------------------------------------------------------------
# running the grid (CUDA)


def attempt(fn, **kwargs):
    """``fn(**kwargs)``, or None when it ran out of GPU memory (what it held is freed)."""
    try:
        return fn(**kwargs)
    except torch.OutOfMemoryError as err:
        print(f"   out of memory in {fn.__name__}: {str(err).splitlines()[0][:200]}", flush=True)
    gc.collect()  # the traceback's frames, and the tensors they held, are gone once the handler ends
    torch.cuda.empty_cache()
    return None


def measure_row(case: dict, sdpa: dict | None, device, copy_gbps: float) -> dict:
    """One row: the case's fields, its H1B timing beside the shape's SDPA timing ``sdpa`` (None: that ran out
    of memory), and the derived columns; ``oom`` when either side ran out of memory."""
    row = {k: v for k, v in case.items() if k != "check"}
    if case.get("skipped"):
        return row
    h1b = attempt(bench_h1b, B=case["B"], Hq=case["Hq"], Hkv=case["Hkv"], N=case["context"], D=case["D"],
                  bits=case["bits"], score=case["score"], device=device, check=case["check"])
    row.update({**(h1b or {}), **(sdpa or {}), "oom": h1b is None or sdpa is None})
    if not row["oom"]:
        row.update(derived_columns(row, copy_gbps), config=_default_config(case["score"], case["group"], device))
    return row


def run_grid(device, cases: list[dict], path: Path, grid: dict) -> dict:
    """Run ``cases`` (``build_cases``), rewriting ``path`` after every row; one SDPA timing per shape."""
    env = environment(device)
    copy_gbps = copy_bandwidth(device)
    print(f"{env['device']}: copy bandwidth {copy_gbps:.0f} GB/s (read + write)", flush=True)
    result = {**env, "copy_GBps": copy_gbps, "timing": "cuda-graph replay median (eager: do_bench median)",
              "grid": grid, "rows": []}
    for (B, Hq, Hkv, D, N), shape_cases in itertools.groupby(
            cases, key=lambda c: (c["B"], c["Hq"], c["Hkv"], c["D"], c["context"])):
        shape_cases = list(shape_cases)
        sdpa = None
        if not all(c.get("skipped") for c in shape_cases):
            sdpa = attempt(bench_sdpa, B=B, Hq=Hq, Hkv=Hkv, N=N, D=D, device=device)
        for case in shape_cases:
            row = measure_row(case, sdpa, device, copy_gbps)
            result["rows"].append(row)
            write_json(path, result)
            print(format_row(row), flush=True)
    return result


TUNE_SHAPES = [
    dict(B=1, Hq=32, Hkv=32, N=32768, bits=128, score="hamming"),
    dict(B=8, Hq=32, Hkv=32, N=32768, bits=128, score="hamming"),
    dict(B=1, Hq=32, Hkv=8, N=32768, bits=128, score="hamming"),
    dict(B=1, Hq=32, Hkv=8, N=131072, bits=128, score="hamming"),
    dict(B=1, Hq=32, Hkv=4, N=32768, bits=128, score="hamming"),
    dict(B=1, Hq=32, Hkv=32, N=32768, bits=128, score="asym"),
    dict(B=1, Hq=32, Hkv=8, N=32768, bits=128, score="asym"),
    dict(B=1, Hq=32, Hkv=8, N=32768, bits=256, score="cos"),
    dict(B=8, Hq=32, Hkv=8, N=32768, bits=128, score="hamming"),
    dict(B=8, Hq=32, Hkv=8, N=131072, bits=128, score="hamming"),
]
# tensor-core forms: (value precision, query-key products on tensor cores, 4-bit values unpacked as fp16 pairs)
TC_FORMS = [("fp16", False, False), ("fp16", False, True), ("fp16", True, True)]


def tune_configs(gqa: bool) -> list[dict]:
    """The kernel configs ``--tune`` times, each form by tile, programs per SM and pipeline stages (1: loads of the
    next tile issued by hand; 2-3: Triton's pipeliner, asynchronous copies): GQA's tensor-core forms with the
    packed-pair unpack (``TC_FORMS[1:]``; the fp32 unpack once); for one query head per kv head the fp32 form and the
    fp16 one."""
    def cfg(form, block_n, per_sm, stages):
        prec, sdot, half2 = form
        return dict(use_dot=prec != "ieee", precision=prec, score_dot=sdot, half2_unpack=half2, block_n=block_n,
                    num_warps=4, programs_per_sm=per_sm, num_stages=stages, single_split_max_n=0, maxnreg=None)
    stages = (1, 2, 3)
    if gqa:  # and the fp32 unpack at the default tile, for the comparison
        return [cfg(TC_FORMS[0], 64, 3, 1)] + [cfg(form, block_n, per_sm, st) for form, block_n, per_sm, st in
                                               itertools.product(TC_FORMS[1:], (32, 64), (2, 3, 4), stages)]
    return ([cfg(("ieee", False, False), block_n, per_sm, st)
             for block_n, per_sm, st in itertools.product((64, 128), (2, 4), stages)]
            + [cfg(TC_FORMS[1], 128, 3, st) for st in stages])


def tune(device, gqa_only: bool = False, path: Path | None = None, shapes=None) -> dict:
    """Time kernel configs (``tune_configs``) on representative shapes (``TUNE_SHAPES``, or those at the indices
    ``shapes``; CUDA-graph timing, each checked against the reference); returns all rows, rewritten to ``path``
    after each shape."""
    shapes = [TUNE_SHAPES[i] for i in shapes] if shapes else TUNE_SHAPES
    shapes = [s for s in shapes if s["Hq"] > s["Hkv"] or not gqa_only]
    rows = []
    result = {**environment(device), "rows": rows}
    for shape in shapes:
        best = None
        for cfg in tune_configs(shape["Hq"] > shape["Hkv"]):
            try:
                r = bench_h1b(D=128, device=device, config=cfg, eager=False, check=True, **shape)
            except Exception as e:  # a config that fails to compile (e.g. out of resources)
                print(f"{shape} {cfg}: FAILED {type(e).__name__}: {str(e)[:200]}", flush=True)
                continue
            r.update(shape=shape, config=cfg)
            rows.append(r)
            if best is None or r["h1b_ms"] < best["h1b_ms"]:
                best = r
        if best is None:
            continue
        print(f"best for {shape}: {best['h1b_ms'] * 1e3:.1f} us with {best['config']}", flush=True)
        for r in sorted((r for r in rows if r["shape"] == shape), key=lambda r: r["h1b_ms"])[:6]:
            print(f"   {r['h1b_ms'] * 1e3:7.1f} us  err {r['max_rel_err_vs_reference']:.1e}  {r['config']}", flush=True)
        if path is not None:
            write_json(path, result)
    return result


def parse_args(argv=None) -> argparse.Namespace:
    """The options, with ``grid`` (the grid's values, defaults filled in) and ``cases`` (``build_cases``)
    added; an option the benchmark cannot run exits with argparse's usage error."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results", help="folder for the JSON results")
    parser.add_argument("--out-name", help="file name in --out (default: decode_<device>.json; "
                        "decode_tune_<device>.json with --tune)")
    parser.add_argument("--tune", action="store_true", help="sweep kernel configs instead of the grid")
    parser.add_argument("--gqa-only", action="store_true", help="with --tune: the GQA shapes only")
    parser.add_argument("--tune-shapes", nargs="+", type=int, choices=range(len(TUNE_SHAPES)), metavar="I",
                        help=f"with --tune: these of the {len(TUNE_SHAPES)} shapes only (indices into TUNE_SHAPES)")
    parser.add_argument("--quick", action="store_true", help="a small grid by default (a smoke run)")

    def default(name):
        full, quick = (" ".join(map(str, grid[name])) for grid in (FULL_GRID, QUICK_GRID))
        return f"(default: {full})" if full == quick else f"(default: {full}; --quick: {quick})"

    parser.add_argument("--batches", nargs="+", type=int, help="batch sizes " + default("batches"))
    parser.add_argument("--groups", nargs="+", type=int,
                        help=f"GQA groups: query heads per kv head, of {QUERY_HEADS} " + default("groups"))
    parser.add_argument("--head-dims", nargs="+", type=int, help="head dims " + default("head_dims"))
    parser.add_argument("--contexts", nargs="+", type=parse_context,
                        help="context lengths in tokens, e.g. 4096 or 4k " + default("contexts"))
    parser.add_argument("--variants", nargs="+", help="H1B variants, score:bits[@first context] " + default("variants"))
    parser.add_argument("--max-gib", type=float, default=DEFAULT_MAX_GIB,
                        help=f"skip cases whose inputs need more GPU memory (default: {DEFAULT_MAX_GIB:g}, "
                        "for a 141 GB H200)")
    args = parser.parse_args(argv)
    base = QUICK_GRID if args.quick else FULL_GRID
    args.grid = {name: base[name] if getattr(args, name) is None else getattr(args, name) for name in FULL_GRID}
    try:
        args.cases = build_cases(**args.grid, max_gib=args.max_gib)
    except ValueError as err:
        parser.error(str(err))
    return args


def main(argv=None):
    args = parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("this benchmark needs a CUDA GPU")
    device = torch.device("cuda")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    slug = device_slug(torch.cuda.get_device_name(device))
    path = out / (args.out_name or f"decode_{'tune_' if args.tune else ''}{slug}.json")
    if args.tune:
        write_json(path, tune(device, args.gqa_only, path, args.tune_shapes))
    else:
        skipped = sum(bool(c.get("skipped")) for c in args.cases)
        print(f"{len(args.cases)} rows ({skipped} over --max-gib {args.max_gib:g}) -> {path}", flush=True)
        run_grid(device, args.cases, path, {**args.grid, "max_gib": args.max_gib})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
