import os
import time

# Read by the OpenMP runtime when torch loads it, so set before torch is imported (kernels inherit it).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest
import torch

from h1bkv_lite.runtime import available_cpus, configure_offline, configure_threads

# Inherited by notebook kernels too: no model hub at run time (everything is bundled), and thread pools
# sized to the CPUs this process may use (a container's CFS quota included), with idle OpenMP threads
# sleeping instead of spinning: oversubscribed pools make small torch ops 100x slower.
configure_offline()
_THREADS = configure_threads()
_START = time.monotonic()
_reporter = {}  # the terminal reporter, set in pytest_configure

_CUDA = torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    """Without CUDA, tests marked ``gpu`` are deselected (not skipped): they run on the device machine."""
    if _CUDA:
        return
    gpu = [item for item in items if item.get_closest_marker("gpu")]
    if gpu:
        config.hook.pytest_deselected(items=gpu)
        items[:] = [item for item in items if not item.get_closest_marker("gpu")]


def pytest_report_header(config):
    lines = [f"CPU threads: {_THREADS} (available_cpus() = {available_cpus()}, os.cpu_count() = {os.cpu_count()})"]
    if not _CUDA:
        lines.append("no CUDA: tests marked gpu are deselected (they run on a GPU machine: see benchmarks/README.md)")
    return lines


def pytest_runtest_logreport(report):
    """Name every phase that takes over 20 s as it ends, with the session's elapsed time (a slow CI run
    then shows where its time went even if it is cut off before the durations table)."""
    if report.duration > 20:
        reporter = _reporter.get("terminal")
        if reporter is not None:
            reporter.write_line(f"[{time.monotonic() - _START:6.0f} s] {report.when} {report.nodeid}: "
                                f"{report.duration:.0f} s")


@pytest.hookimpl(trylast=True)
def pytest_configure(config):
    _reporter["terminal"] = config.pluginmanager.get_plugin("terminalreporter")


@pytest.fixture(scope="session")
def model_and_tokenizer():
    """The bundled SmolLM2-135M (float32, CPU, eval mode), loaded once per test session."""
    from h1bkv_lite.data import load_model

    return load_model()
