"""Shared figure style for the notebooks: one seaborn theme, one way to save (PNG + SVG).

    from h1bkv_lite.plotting import set_style, save_figure
    set_style()
    fig, ax = plt.subplots()
    ...
    save_figure(fig, FIG_DIR, "error_vs_bits")   # writes FIG_DIR/error_vs_bits.png and .svg
    label_bits_axis(ax, [16, 64, 256], head_dim=64)  # log2 x axis: "64\n1 b/elt"
"""
from __future__ import annotations

from pathlib import Path

import matplotlib
import seaborn as sns

PALETTE = "colorblind"
DPI = 150


def set_style(context: str = "notebook") -> None:
    """Apply the project's seaborn theme (whitegrid, colorblind palette, light spines)."""
    sns.set_theme(context=context, style="whitegrid", palette=PALETTE)
    matplotlib.rcParams.update(
        {
            "figure.dpi": 100,
            "savefig.dpi": DPI,
            "savefig.bbox": "tight",
            "axes.titleweight": "bold",
            "axes.spines.top": False,
            "axes.spines.right": False,
            "svg.fonttype": "none",
        }
    )


def save_figure(fig, fig_dir, name: str) -> list[Path]:
    """Write ``fig`` to ``fig_dir/name.png`` and ``fig_dir/name.svg`` (creating ``fig_dir``); return the paths."""
    if not name or any(sep in name for sep in "/\\") or name.endswith((".png", ".svg")):
        raise ValueError(f"name must be a bare file stem like 'error_vs_bits', got {name!r}")
    out = Path(fig_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"{name}.png", out / f"{name}.svg"]
    for path in paths:
        fig.savefig(path, dpi=DPI, bbox_inches="tight")
    return paths


def label_bits_axis(ax, bits, head_dim: int, axis: str = "x") -> None:
    """Log2-scaled sketch-width axis whose ticks read ``b`` over ``b / head_dim`` bits per element."""
    bits = list(bits)
    if not bits or head_dim <= 0:
        raise ValueError("bits must be non-empty and head_dim > 0")
    set_scale = ax.set_xscale if axis == "x" else ax.set_yscale
    set_ticks = ax.set_xticks if axis == "x" else ax.set_yticks
    set_label = ax.set_xlabel if axis == "x" else ax.set_ylabel
    set_scale("log", base=2)
    set_ticks(bits, [f"{b}\n{b / head_dim:g} b/elt" for b in bits])
    if axis == "x":
        ax.minorticks_off()
    set_label(f"sketch width b (bits per key; head_dim {head_dim})")
