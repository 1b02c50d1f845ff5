"""Registers, spills and instruction counts of the decode split kernel, compiled for a GPU without one.

    python benchmarks/kernel_resources.py                               # MHA, "hamming", b = 128, sm_90
    python benchmarks/kernel_resources.py --group 8 --score asym --config block_n=32
    python benchmarks/kernel_resources.py --static --arch 90            # the static-capacity (n_valid) form

Triton compiles ``_decode_split_kernel`` (the ``h1bkv_lite`` on the import path: point ``PYTHONPATH`` at another
commit's code, e.g. one ``compare_commits.py`` extracted, to compare) for the target with the specialisations a real
launch would get: B = 1, 32 query heads, head_dim 128, a 32k context split as the launcher would split it,
per-token 4-bit values, the split form (``--direct``: the one-split form). Integer arguments the kernel does not
exclude from specialisation are marked divisible by 16 (or folded to 1) as their real values are. The compiled cubin is read with
``cuobjdump`` from Triton's bundle: registers per thread, stack (spills), and SASS counts (the whole kernel, and
the loop over the cache's tiles: instructions per tile and the commonest opcodes). Spills in the loop over
the cache are what made the MHA kernel slower than it had been (``benchmarks/README.md``). Results depend on the
Triton version (the device's was 3.6; install that one beside your own with ``pip install --target``).
"""
from __future__ import annotations

import argparse
import collections
import inspect
import json
import os
import re
import subprocess
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from h1bkv_lite.kernels import decode_attention as da

HEADS, D, CONTEXT, SMS = 32, 128, 32768, 132  # the shape compiled; SMS: an H100/H200's multiprocessors
POINTERS = {"q_ptr": "*fp16", "out_ptr": "*fp16", "r_ptr": "*fp32", "qw_ptr": "*i32", "qn_ptr": "*fp32",
            "qsq_ptr": "*fp32", "qp_ptr": "*fp32", "t_ptr": "*fp32", "cos_ptr": "*fp32", "kc_ptr": "*i32",
            "kn_ptr": "*fp16", "vd_ptr": "*u8", "vs_ptr": "*fp16", "vz_ptr": "*fp16", "wk_ptr": "*fp16",
            "wv_ptr": "*fp16", "m_ptr": "*fp32", "l_ptr": "*fp32", "acc_ptr": "*fp32", "n_ptr": "*i32",
            "cnt_ptr": "*i32"}
FLOATS = ("inv_t", "qk_scale")


def launch_values(group: int, bits: int, block_n: int, programs_per_sm: int) -> dict:
    """The integer arguments a launch at the compiled shape passes (strides in elements)."""
    kv = HEADS // group
    splits = -(-programs_per_sm * SMS // kv)
    chunk = -(-(-(-CONTEXT // splits)) // block_n) * block_n
    splits = -(-CONTEXT // chunk)
    words = bits // 32
    return dict(stride_qb=HEADS * D, stride_qh=D, stride_ob=HEADS * D, stride_oh=D, stride_tb=0,
                stride_kcb=kv * CONTEXT * words, stride_kch=CONTEXT * words, stride_kcn=words,
                stride_knb=kv * CONTEXT, stride_knh=CONTEXT, stride_knn=1,
                stride_vdb=kv * CONTEXT * D // 2, stride_vdh=CONTEXT * D // 2, stride_vdn=D // 2,
                stride_vsb=kv * CONTEXT, stride_vsh=CONTEXT, stride_vsn=1, stride_vzb=kv * CONTEXT,
                stride_vzh=CONTEXT, stride_vzn=1, stride_wkb=HEADS * D, stride_wkh=D, stride_wkn=D,
                stride_wvb=HEADS * D, stride_wvh=D, stride_wvn=D, N=CONTEXT, W=0, HKV=kv, CHUNK=chunk,
                CHUNK_TILES=chunk // block_n, NUM_SPLITS=splits, SPLITS_TOTAL=splits)


def compile_split_kernel(*, group=1, score="hamming", bits=128, static=False, direct=False, query_here=False,
                         config=None, arch=90):
    """The compiled kernel (Triton's CompiledKernel) for the shape above; ``config`` overrides the defaults."""
    fn = da._decode_split_kernel
    names = list(inspect.signature(fn.fn).parameters)
    nospec = set(getattr(fn, "do_not_specialize", None) or ())
    nospec |= {names[i] for i in list(nospec) if isinstance(i, int)}
    cfg = da._merged_config(score, group, None, config)
    half2 = getattr(da, "_half2_unpack", lambda *args: False)(cfg, 4, 1)  # (absent before commit 9bcf03c)
    gr, nw_p = triton.next_power_of_2(group), triton.next_power_of_2(bits // 32)
    consts = dict(D=D, BITS=bits, NW_P=nw_p, GROUP=group, VALUE_GROUPS=1, VALUE_BITS=4,
                  SCORE=da._SCORE_ID[score], GR=gr, BLOCK_N=cfg["block_n"], BLOCK_D=D, BLOCK_W=max(2, 16 // gr),
                  PER_HEAD_T=score == "hamming", USE_DOT=cfg["use_dot"], PRECISION=cfg["precision"],
                  BLOCK_KQ=max(1, min(16, 4096 // (gr * nw_p * 32))), N_ON_DEVICE=static, DIRECT=direct,
                  SCORE_DOT=cfg.get("score_dot", False), HALF2=half2, ASM=True,
                  PIPELINE=cfg.get("num_stages", 1) if cfg.get("num_stages", 1) > 1 else 0,
                  FUSED=cfg.get("fused_combine", False) and not direct, BLOCK_S=32,  # (eager: the fused combine)
                  QUERY_HERE=query_here and not direct)  # (ignored by kernels of commits before it existed)
    values = launch_values(group, bits, cfg["block_n"], cfg["programs_per_sm"])
    signature, constexprs, attrs = {}, {}, {}
    for i, name in enumerate(names):
        if name in consts:
            signature[name], constexprs[name] = "constexpr", consts[name]
        elif name in POINTERS:
            signature[name], attrs[(i,)] = POINTERS[name], [["tt.divisibility", 16]]
        elif name in FLOATS:
            signature[name] = "fp32"
        elif name not in nospec and values[name] == 1:
            signature[name], constexprs[name] = "constexpr", 1
        else:
            signature[name] = "i32"
            if name not in nospec and values[name] % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
    source = ASTSource(fn, signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(source, target=GPUTarget("cuda", arch, 32),
                          options={"num_warps": cfg["num_warps"], "num_stages": 1}), cfg  # as the launcher


def resources(kernel) -> dict:
    """Registers, stack bytes and SASS counts of a compiled kernel, from ``cuobjdump``."""
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.TemporaryDirectory() as tmp:
        cubin = os.path.join(tmp, "kernel.cubin")
        with open(cubin, "wb") as f:
            f.write(kernel.asm["cubin"])
        usage = subprocess.run([tool, "-res-usage", cubin], capture_output=True, text=True, check=True).stdout
        sass = subprocess.run([tool, "-sass", cubin], capture_output=True, text=True, check=True).stdout
    fields = dict(re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", usage))
    code = [line for line in sass.splitlines() if re.match(r"\s+/\*[0-9a-f]{4,}\*/", line)]
    loop = main_loop(sass)
    return {"registers": int(fields["REG"]), "stack_bytes": int(fields["STACK"]),
            "loop_instructions": len(loop),
            "loop_opcodes": dict(collections.Counter(map(_opcode, loop)).most_common(12)),
            "shared_bytes": int(fields["SHARED"]), "sass_instructions": len(code),
            "spill_stores": sum(" STL" in line for line in code), "spill_loads": sum(" LDL" in line for line in code),
            "global_loads": sum("LDG" in line for line in code),
            "global_loads_128bit": sum("LDG.E.128" in line for line in code)}


def _address(line: str) -> int:
    return int(re.match(r"\s+/\*([0-9a-f]+)\*/", line).group(1), 16)


def _opcode(line: str) -> str:
    return re.search(r"\*/\s+(?:@!?U?P\w+\s+)?([A-Z0-9_]+)", line).group(1)


def main_loop(sass: str) -> list[str]:
    """The SASS lines of the loop over the cache's tiles (one tile per iteration): of the loops (spans of backward
    branches), the one with the most ``LOP3`` logic instructions (code unpacking, masks; the exact window's loop is
    floating point)."""
    lines, labels, code = sass.splitlines(), {}, []
    for i, line in enumerate(lines):
        label = re.match(r"\.L_x_(\d+):", line.strip())
        if label:
            nxt = next((ln for ln in lines[i + 1:] if re.match(r"\s+/\*[0-9a-f]{4,}\*/", ln)), None)
            if nxt is not None:
                labels[label.group(1)] = _address(nxt)
        elif re.match(r"\s+/\*[0-9a-f]{4,}\*/", line):
            code.append(line)
    spans = []
    for line in code:  # branch targets are labels or addresses, by cuobjdump version
        m = re.search(r"BRA(?:\.\w+)*\s+(?:`\(\.L_x_(\d+)\)|0x([0-9a-f]+))", line)
        target = (labels.get(m.group(1)) if m.group(1) else int(m.group(2), 16)) if m else None
        if target is not None and target < _address(line):
            spans.append((target, _address(line)))
    if not spans:
        return []
    loops = [[line for line in code if start <= _address(line) <= end] for start, end in spans]
    return max(loops, key=lambda loop: sum(_opcode(line) == "LOP3" for line in loop))


def parse_config(items) -> dict:
    """``key=value`` pairs: integers, booleans (true/false) or strings."""
    out = {}
    for item in items or ():
        key, sep, value = item.partition("=")
        if not sep or key not in da._default_config("hamming", 1, None):
            raise argparse.ArgumentTypeError(f"--config takes key=value with a key of the kernel's config "
                                             f"({', '.join(da._default_config('hamming', 1, None))}), got {item!r}")
        out[key] = int(value) if value.isdigit() else {"true": True, "false": False}.get(value.lower(), value)
    return out


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--group", type=int, default=1, choices=(1, 2, 4, 8), help="query heads per kv head")
    parser.add_argument("--score", default="hamming", choices=da.SCORES)
    parser.add_argument("--bits", type=int, default=128, choices=(64, 128, 256, 512))
    parser.add_argument("--static", action="store_true", help="the static-capacity form (fill level on the device)")
    parser.add_argument("--direct", action="store_true",
                        help="the one-split form (short contexts: the query sketched in the kernel, output written)")
    parser.add_argument("--query-here", action="store_true",
                        help="the split form that sketches the query in every split program (eager calls up to "
                             "query_in_split_max_n tokens) instead of reading the query prep's words")
    parser.add_argument("--config", nargs="*", default=[], help="kernel config overrides, e.g. block_n=32 num_warps=8")
    parser.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 90 (Hopper), 80 (Ampere)")
    args = parser.parse_args(argv)
    try:
        config = parse_config(args.config)
        da._check_config(config, args.score, args.group, None)  # what h1b_decode_attention would refuse
    except (argparse.ArgumentTypeError, ValueError, TypeError) as err:
        parser.error(str(err))
    kernel, cfg = compile_split_kernel(group=args.group, score=args.score, bits=args.bits, static=args.static,
                                       direct=args.direct, query_here=args.query_here, config=config,
                                       arch=args.arch)
    row = {"triton": triton.__version__, "arch": args.arch, "group": args.group, "score": args.score,
           "bits": args.bits, "static": args.static, "direct": args.direct, "query_here": args.query_here, "config": cfg, **resources(kernel)}
    print(json.dumps(row))
    return row


if __name__ == "__main__":
    main()
