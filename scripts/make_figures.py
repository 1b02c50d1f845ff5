"""Regenerate every figure headlessly: run each notebook in notebooks/ with papermill.

Each notebook ``notebooks/NN_name.ipynb`` runs with its full (non-smoke) parameters and writes its
figures and ``metrics.json`` to ``figures/NN_name/``; the executed copy of the notebook is saved there
too, so the outputs can be read on a code host. ``python scripts/make_figures.py 01 03`` runs a subset.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import papermill as pm
from tqdm.auto import tqdm

from h1bkv_lite.runtime import configure_offline, configure_threads

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("only", nargs="*", help="notebook name prefixes to run (default: all)")
    parser.add_argument("--smoke", action="store_true", help="quick test-sized runs (SMOKE=True)")
    args = parser.parse_args(argv)
    # Notebook kernels inherit these: no model hub at run time, and thread pools sized to the CPUs this
    # process may use (a container's CPU quota included) with idle OpenMP threads sleeping, not spinning.
    configure_offline()
    threads = configure_threads()
    tqdm.write(f"CPU threads per notebook kernel: {threads}")

    notebooks = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
    if args.only:
        notebooks = [nb for nb in notebooks if any(nb.stem.startswith(p) for p in args.only)]
    if not notebooks:
        print("no notebooks matched", file=sys.stderr)
        return 1
    for nb in tqdm(notebooks, desc="notebooks", unit="nb"):
        out_dir = ROOT / "figures" / nb.stem
        out_dir.mkdir(parents=True, exist_ok=True)
        start = time.time()
        pm.execute_notebook(
            str(nb),
            str(out_dir / nb.name),
            parameters={"FIG_DIR": str(out_dir), "SMOKE": args.smoke},
            cwd=str(ROOT / "notebooks"),
            progress_bar=False,
            kernel_name="python3",
        )
        tqdm.write(f"{nb.stem}: {time.time() - start:.0f} s -> {out_dir.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
