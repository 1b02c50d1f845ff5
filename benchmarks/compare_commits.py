"""The decode kernel of several commits, timed side by side on one GPU: find when a kernel got slower.

    python benchmarks/compare_commits.py 985ec53 HEAD .               # two commits and the working tree
    python benchmarks/compare_commits.py 985ec53 HEAD --shapes mha-32k gqa-128k --repeats 2 --out /tmp/cmp

Each commit's ``h1bkv_lite`` and ``kernels`` are extracted (``git archive``; ``.`` is the working tree as it is)
into a scratch folder and timed in a process of their own, with today's method (``decode_timing.bench_h1b``:
CUDA-graph time over L2-defeating input copies, the output checked against that commit's torch reference). Only
the kernels' public entry points are called, so any commit that has them can be timed. ``--repeats`` runs the
commits in turn that many times (A B A B ...), which shows drift of the machine apart from the code.

Results: a table on stdout and ``<out>/decode_commits_<device>.json`` (rows: label, commit, shape, ``h1b_us``,
``max_rel_err_vs_reference``, or ``error`` when a commit could not run that shape). Needs CUDA and git.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SHAPES = {  # name -> the case: 32 query heads, head_dim 128, 4-bit values, no window
    "mha-32k": dict(B=1, Hq=32, Hkv=32, N=32768, bits=128, score="hamming"),
    "mha-32k-b256": dict(B=1, Hq=32, Hkv=32, N=32768, bits=256, score="hamming"),
    "mha-128k": dict(B=1, Hq=32, Hkv=32, N=131072, bits=128, score="hamming"),
    "mha-32k-B8": dict(B=8, Hq=32, Hkv=32, N=32768, bits=128, score="hamming"),
    "mha-32k-cos": dict(B=1, Hq=32, Hkv=32, N=32768, bits=128, score="cos"),
    "gqa-32k": dict(B=1, Hq=32, Hkv=8, N=32768, bits=128, score="hamming"),
    "gqa-128k": dict(B=1, Hq=32, Hkv=8, N=131072, bits=128, score="hamming"),
    "gqa-32k-B8": dict(B=8, Hq=32, Hkv=8, N=32768, bits=128, score="hamming"),
    "gqa-32k-cos-b256": dict(B=1, Hq=32, Hkv=8, N=32768, bits=256, score="cos"),
}
WORKTREE = "."


def git(*args: str) -> str:
    """Output of a git command in the repository; RuntimeError with git's message on failure."""
    done = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"git {' '.join(args)}: {done.stderr.strip()}")
    return done.stdout.strip()


def resolve(commit: str) -> tuple[str, str]:
    """(short hash, subject) of ``commit``; ``.``: the working tree. ValueError naming an unknown commit."""
    if commit == WORKTREE:
        return WORKTREE, "the working tree"
    try:
        sha = git("rev-parse", "--short", f"{commit}^{{commit}}")
    except RuntimeError:
        raise ValueError(f"commits: {commit!r} is not a commit of this repository") from None
    return sha, git("log", "-1", "--format=%s", sha)


def extract(sha: str, dest: Path) -> Path:
    """``h1bkv_lite`` and ``kernels`` of commit ``sha`` (or the working tree) under ``dest/<sha>``, importable with
    that folder on ``PYTHONPATH`` (``h1bkv_lite/kernels`` links to ``kernels``, as the installed package maps it)."""
    folder = dest / ("worktree" if sha == WORKTREE else sha)
    folder.mkdir(parents=True)
    if sha == WORKTREE:
        for name in ("h1bkv_lite", "kernels"):
            shutil.copytree(ROOT / name, folder / name, symlinks=True,
                            ignore=shutil.ignore_patterns("__pycache__", "kernels"))
    else:
        archive = subprocess.run(["git", "archive", sha, "h1bkv_lite", "kernels"], cwd=ROOT, capture_output=True,
                                 check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(folder)], input=archive, check=True)
    link = folder / "h1bkv_lite" / "kernels"
    if not link.exists():
        link.symlink_to(Path("..") / "kernels")
    return folder


def run_worker(folder: Path, label: str, shapes: list[str], timeout: float) -> list[dict]:
    """Time ``shapes`` with the code in ``folder`` in a fresh process; one row per shape."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(folder), str(ROOT / "benchmarks")])}
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", "--label", label, "--shapes", *shapes]
    try:
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=folder)
    except subprocess.TimeoutExpired:
        return [{"label": label, "shape": s, "error": f"timed out after {timeout:.0f} s"} for s in shapes]
    rows = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode and not rows:
        message = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return [{"label": label, "shape": s, "error": f"exit {done.returncode}: {message[:300]}"} for s in shapes]
    return rows


def worker(label: str, shapes: list[str]) -> None:
    """In the commit's own process: time each shape, print one JSON line per shape."""
    import torch  # noqa: PLC0415 -- the parent process needs neither torch nor CUDA
    from decode_timing import bench_h1b  # noqa: PLC0415 -- from PYTHONPATH: today's timing method

    import h1bkv_lite.kernels as kernels  # noqa: PLC0415 -- the commit's own kernels

    device = torch.device("cuda")
    for name in shapes:
        row = {"label": label, "shape": name, **SHAPES[name], "kernels_from": str(Path(kernels.__file__).parent)}
        try:
            timed = bench_h1b(**SHAPES[name], D=128, device=device, eager=False, check=True)
            row.update(h1b_us=timed["h1b_ms"] * 1e3, max_rel_err_vs_reference=timed["max_rel_err_vs_reference"])
        except Exception as err:  # noqa: BLE001 -- an old commit may not serve a shape: record it, go on
            row["error"] = f"{type(err).__name__}: {str(err)[:300]}"
        print(json.dumps(row), flush=True)


def table(rows: list[dict], labels: list[str], shapes: list[str]) -> str:
    """Shapes down, commits across: the median time in microseconds over repeats (``error`` where none ran)."""
    def cell(label, shape):
        times = sorted(r["h1b_us"] for r in rows if r["label"] == label and r["shape"] == shape and "h1b_us" in r)
        return f"{times[len(times) // 2]:.1f}" if times else "error"

    width = max(10, *(len(label) for label in labels))
    lines = [f"{'shape':<18}" + "".join(f"{label:>{width + 2}}" for label in labels)]
    lines += [f"{s:<18}" + "".join(f"{cell(label, s):>{width + 2}}" for label in labels) for s in shapes]
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("commits", nargs="*", help="commits to compare (any git name; '.' = the working tree)")
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES), metavar="SHAPE",
                        help=f"cases to time (default: all of {', '.join(SHAPES)})")
    parser.add_argument("--repeats", type=int, default=1, help="times each commit is timed, in turn (default 1)")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per commit and repeat (default 300)")
    parser.add_argument("--out", default=None, help="folder for the JSON (default: none written)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--label", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if not args.worker:
        if len(args.commits) < 1:
            parser.error("commits: name at least one commit (two or more to compare)")
        if args.repeats < 1:
            parser.error(f"--repeats: at least 1, got {args.repeats}")
        if args.timeout <= 0:
            parser.error(f"--timeout: a positive number of seconds, got {args.timeout}")
        try:
            args.resolved = [resolve(c) for c in args.commits]
        except ValueError as err:
            parser.error(str(err))
    return args


def main(argv=None) -> dict | None:
    args = parse_args(argv)
    if args.worker:
        worker(args.label, args.shapes)
        return None
    import torch  # noqa: PLC0415

    if not torch.cuda.is_available():
        raise SystemExit("compare_commits.py times the Triton kernels: it needs a CUDA GPU")
    labels = [sha for sha, _ in args.resolved]
    rows = []
    with tempfile.TemporaryDirectory(prefix="h1bkv-commits-") as scratch:
        folders = {sha: extract(sha, Path(scratch)) for sha in dict.fromkeys(labels)}
        for repeat in range(args.repeats):
            for sha in labels:
                started = time.time()
                got = run_worker(folders[sha], sha, args.shapes, args.timeout)
                rows += [{**r, "repeat": repeat} for r in got]
                print(f"[{sha}] repeat {repeat + 1}/{args.repeats}: {time.time() - started:.0f} s", flush=True)
    print(table(rows, labels, args.shapes))
    result = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
              "head": git("rev-parse", "--short", "HEAD"),
              "commits": [{"label": sha, "subject": subject} for sha, subject in args.resolved],
              "timing": "CUDA-graph replay median per call (decode_timing.bench_h1b)", "rows": rows}
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        path = out / f"decode_commits_{result['device'].replace('NVIDIA ', '').replace(' ', '_').lower()}.json"
        path.write_text(json.dumps(result, indent=1))
        print(f"wrote {path}")
    return result


if __name__ == "__main__":
    main()
