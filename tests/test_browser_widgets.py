"""The notebooks' widgets, for real: JupyterLab in headless Chromium, run all cells, move a control.

For each notebook a smoke-parameterised copy is opened in a headless JupyterLab, every cell is run
through JupyterLab's own command, the first control of its widget panel is moved (a slider one step
with the keyboard, else a toggle button or checkbox clicked), and the figure the widget drew must change
(the PNG behind the output's <img> differs).
Needs Debian's ``chromium`` (``.ci/run`` installs it when it can) and the ``playwright`` package (its
Python API drives the system Chromium through ``executable_path``; no browser download).
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import nbformat
import pytest
from papermill.iorw import load_notebook_node
from papermill.parameterize import parameterize_notebook

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted(p.stem for p in (ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]
TOKEN = "h1bkv-browser-test"
RUN_TIMEOUT_S = 600

pytestmark = [
    pytest.mark.browser,
    pytest.mark.slow,
    pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (apt-get install chromium)"),
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """A JupyterLab server over smoke-parameterised copies of the notebooks; yields its base URL."""
    work = tmp_path_factory.mktemp("lab")
    # Copies sit in work/notebooks/ beside links to the repo's inputs, so relative paths resolve as in the repo.
    for inputs in ("benchmarks", "data", "results"):
        (work / inputs).symlink_to(ROOT / inputs, target_is_directory=True)
    (work / "notebooks").mkdir()
    for name in NOTEBOOKS:
        nb = load_notebook_node(str(ROOT / "notebooks" / f"{name}.ipynb"))
        fig_dir = work / "figures" / name
        nb = parameterize_notebook(nb, {"SMOKE": True, "FIG_DIR": str(fig_dir)})
        nbformat.write(nb, work / "notebooks" / f"{name}.ipynb")
    # Render every cell (no virtual scrolling), so outputs far down the page exist in the DOM.
    settings = work / "settings" / "@jupyterlab" / "notebook-extension"
    settings.mkdir(parents=True)
    (settings / "tracker.jupyterlab-settings").write_text(json.dumps({"windowingMode": "none"}))
    port = _free_port()
    log = open(work / "jupyterlab.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "jupyterlab", "--no-browser", f"--port={port}", "--ServerApp.ip=127.0.0.1",
         f"--IdentityProvider.token={TOKEN}", f"--ServerApp.root_dir={work}", "--LabApp.expose_app_in_browser=True",
         f"--LabApp.user_settings_dir={work / 'settings'}", "--ServerApp.open_browser=False", "--allow-root"],
        cwd=work, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            assert proc.poll() is None, (work / "jupyterlab.log").read_text()
            time.sleep(0.5)
    else:
        proc.kill()
        pytest.fail("JupyterLab did not start within 120 s:\n" + (work / "jupyterlab.log").read_text())
    yield url
    proc.terminate()
    proc.wait(timeout=30)
    log.close()


@pytest.fixture(scope="module")
def browser():
    playwright = pytest.importorskip("playwright.sync_api")
    with playwright.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        yield b
        b.close()


_BUSY_JS = "() => [...document.querySelectorAll('.jp-InputArea-prompt')].some(e => e.textContent.includes('*'))"
_ERRORS_JS = ("() => [...document.querySelectorAll('.jp-OutputArea-output[data-mime-type=\"application/"
              "vnd.jupyter.stderr\"], .jp-RenderedText[data-mime-type=\"application/vnd.jupyter.error\"]')]"
              ".filter(e => e.textContent.includes('Error')).map(e => e.textContent.slice(0, 2000))")
# The first control of a notebook's widget panel: a slider handle, else an unselected toggle button, else a
# checkbox. The figure that must change is the image in the cell output holding that control.
_CONTROLS = (".jp-OutputArea .noUi-handle, .jp-OutputArea .widget-toggle-button:not(.mod-active), "
             ".jp-OutputArea .widget-checkbox input")


def _wait_idle(page, timeout_s: float) -> None:
    deadline = time.time() + timeout_s
    time.sleep(2)
    while page.evaluate(_BUSY_JS):
        if time.time() > deadline:
            raise TimeoutError(f"cells still running after {timeout_s:.0f} s")
        time.sleep(1)


def _shutdown_sessions(url: str) -> None:
    """Close every notebook session (and its kernel) on the server: each holds a model in memory."""
    def call(method, path):
        req = urllib.request.Request(f"{url}{path}", method=method, headers={"Authorization": f"token {TOKEN}"})
        with urllib.request.urlopen(req, timeout=30) as resp:
            return json.loads(resp.read() or b"null")

    for session in call("GET", "/api/sessions"):
        call("DELETE", f"/api/sessions/{session['id']}")


@pytest.fixture
def page(lab, browser):
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    yield page
    page.close()
    _shutdown_sessions(lab)


def test_every_notebook_is_driven():
    assert len(NOTEBOOKS) >= 7 and NOTEBOOKS[0].startswith("01_")


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_slider_redraws_figure(lab, page, name):
    # A workspace of its own: JupyterLab would otherwise reopen the notebooks of earlier tests (whose
    # kernels were shut down) beside this one.
    page.goto(f"{lab}/lab/workspaces/{name}/tree/notebooks/{name}.ipynb?token={TOKEN}")
    page.wait_for_function("() => window.jupyterapp && document.querySelector('.jp-Notebook .jp-Cell')",
                           timeout=120_000)
    page.wait_for_function("() => document.querySelector('.jp-Notebook-ExecutionIndicator, .jp-Toolbar')",
                           timeout=60_000)
    time.sleep(3)  # let the kernel session come up
    page.evaluate("() => window.jupyterapp.commands.execute('notebook:run-all-cells')")
    _wait_idle(page, RUN_TIMEOUT_S)
    errors = page.evaluate(_ERRORS_JS)
    assert not errors, f"{name}: a cell failed in JupyterLab:\n" + "\n".join(errors)

    page.wait_for_selector(_CONTROLS, timeout=60_000)
    control = page.locator(_CONTROLS).first
    control.scroll_into_view_if_needed()
    output = control.locator("xpath=ancestor::div[contains(@class,'jp-OutputArea-output')]")
    images = output.locator("img")

    def figure_src():
        return images.first.get_attribute("src") if images.count() else None

    before = figure_src()  # None where the widget draws only once a control moves
    shot_before = output.screenshot()
    if "noUi-handle" in (control.get_attribute("class") or ""):
        control.focus()
        # a slider: one step, towards the end that has room
        at_max = control.get_attribute("aria-valuenow") == control.get_attribute("aria-valuemax")
        page.keyboard.press("ArrowLeft" if at_max else "ArrowRight")
    else:
        control.click()  # a toggle button not yet selected, or a checkbox
    deadline = time.time() + 180
    while figure_src() in (before, None):
        assert time.time() < deadline, f"{name}: the figure did not change after moving the control"
        time.sleep(1)
    _wait_idle(page, 180)
    shot_after = output.screenshot()
    assert shot_after != shot_before, f"{name}: the widget's screenshot did not change"
