"""Shared figure style for the notebooks: one seaborn theme, one way to save (PNG + SVG).

    from h1bkv_lite.plotting import set_style, save_figure
    set_style()
    fig, ax = plt.subplots()
    ...
    save_figure(fig, FIG_DIR, "error_vs_bits")   # writes FIG_DIR/error_vs_bits.png and .svg
    label_bits_axis(ax, [16, 64, 256], head_dim=64)  # log2 x axis: "64\n1 b/elt"
    draw(bits=64); plt.show()                          # the default view, as a plain figure
    display(control_panel(draw, bits=widgets.SelectionSlider(options=[16, 64, 256], value=64)))
"""
from __future__ import annotations

import os
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


NOTEBOOKS_DIR = Path(__file__).resolve().parents[1] / "notebooks"
"""The checkout's notebooks/ folder, against which the notebooks' relative path parameters are written."""


def notebook_path(path) -> Path:
    """A notebook's path parameter as an absolute path, whatever the working directory: absolute paths are
    kept; relative ones (the defaults, like ``"../figures/01_lsh_cosine_error"``) are resolved against the
    checkout's ``notebooks/`` folder, or against the working directory when the package is installed without
    one (a wheel). Glob characters pass through unchanged."""
    path = Path(path).expanduser()
    if path.is_absolute():
        return path
    base = NOTEBOOKS_DIR if NOTEBOOKS_DIR.is_dir() else Path.cwd()
    return Path(os.path.normpath(base / path))


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


def control_panel(draw, **controls):
    """ipywidgets controls above an output area that ``draw(**values)`` fills whenever a control changes.

    ``controls`` maps each keyword argument of ``draw`` to an ipywidgets control (anything with a
    ``value`` trait). Nothing is drawn into the panel until a control moves: show the default view as a
    plain figure first. That keeps figures in headless runs (papermill, ``make figures``) and avoids a
    known hang: output captured by a widget while a notebook executes headless makes nbclient send on
    the kernel's shell channel while it waits on it, and the cell's reply can be missed
    (jupyter/nbclient#312). Returns an ``ipywidgets.VBox`` to ``display``.
    """
    import ipywidgets as widgets

    if not callable(draw):
        raise TypeError(f"draw must be callable, got {type(draw).__name__}")
    if not controls:
        raise ValueError("control_panel needs at least one control (name=widget)")
    for name, control in controls.items():
        if not isinstance(control, widgets.ValueWidget):
            raise TypeError(f"control {name!r} must be an ipywidgets value widget, got {type(control).__name__}")
    view = widgets.Output()

    def redraw(_change=None):
        with view:
            view.clear_output(wait=True)
            draw(**{name: control.value for name, control in controls.items()})

    for control in controls.values():
        control.observe(redraw, names="value")
    row = widgets.HBox(list(controls.values()), layout=widgets.Layout(flex_flow="row wrap"))
    return widgets.VBox([row, view])
