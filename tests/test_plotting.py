"""plotting: the figure-saving rules and the widget panel that draws only when a control moves."""
import ipywidgets as widgets
import matplotlib
import pytest

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from h1bkv_lite.plotting import control_panel, label_bits_axis, save_figure  # noqa: E402


def test_control_panel_draws_only_when_a_control_moves():
    calls = []
    bits = widgets.SelectionSlider(options=[16, 64, 256], value=64)
    mode = widgets.ToggleButtons(options=["real", "random"])
    panel = control_panel(lambda bits, data: calls.append((bits, data)), bits=bits, data=mode)
    assert isinstance(panel, widgets.VBox)
    row, view = panel.children
    assert list(row.children) == [bits, mode] and isinstance(view, widgets.Output)
    assert calls == []  # nothing drawn at construction (headless runs must not write into widgets)
    bits.value = 256
    mode.value = "random"
    assert calls == [(256, "real"), (256, "random")]


def test_control_panel_rejects_bad_arguments():
    with pytest.raises(TypeError, match="draw must be callable"):
        control_panel("not callable", bits=widgets.IntSlider())
    with pytest.raises(ValueError, match="at least one control"):
        control_panel(print)
    with pytest.raises(TypeError, match="control 'bits' must be an ipywidgets value widget"):
        control_panel(print, bits=[16, 64])


def test_save_figure_writes_png_and_svg(tmp_path):
    fig, ax = plt.subplots()
    ax.plot([0, 1], [1, 0])
    paths = save_figure(fig, tmp_path / "out", "line")
    plt.close(fig)
    assert [p.name for p in paths] == ["line.png", "line.svg"] and all(p.stat().st_size > 0 for p in paths)
    for bad in ("", "a/b", "x.png"):
        with pytest.raises(ValueError, match="bare file stem"):
            save_figure(fig, tmp_path, bad)


def test_label_bits_axis_ticks_read_bits_per_element():
    fig, ax = plt.subplots()
    label_bits_axis(ax, [16, 64, 256], head_dim=64)
    assert [t.get_text() for t in ax.get_xticklabels()] == ["16\n0.25 b/elt", "64\n1 b/elt", "256\n4 b/elt"]
    assert ax.get_xscale() == "log"
    with pytest.raises(ValueError):
        label_bits_axis(ax, [], head_dim=64)
    plt.close(fig)


def test_notebook_path_resolves_relative_parameters_from_the_notebooks_folder(tmp_path, monkeypatch):
    from h1bkv_lite.plotting import NOTEBOOKS_DIR, notebook_path

    monkeypatch.chdir(tmp_path)
    assert notebook_path("../figures/07_kernel_performance") == NOTEBOOKS_DIR.parent / "figures" / "07_kernel_performance"
    assert notebook_path(tmp_path / "x") == tmp_path / "x"
    assert str(notebook_path("../benchmarks/results/generate_*.json")).endswith("benchmarks/results/generate_*.json")
