"""Every model-using notebook takes DEVICE / DTYPE papermill parameters, resolved by the one library helper
(h1bkv_lite.runtime.resolve_device_dtype) before the model loads, and records them in metrics.json.

Cheap: reads the notebooks' sources; the papermill runs (tests/test_notebook*.py) check the metrics on CPU.
"""
import json
import re
from pathlib import Path

import pytest
import torch

from h1bkv_lite.runtime import DEVICE_CHOICES, DTYPE_CHOICES, resolve_device_dtype

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
MODEL_NOTEBOOKS = {"01_lsh_cosine_error": "auto", "02_attention_fidelity": "auto", "03_value_quantization": "auto",
                   "04_memory_accounting": "bfloat16", "05_quality_per_byte": "auto",
                   "06_finetuning": "auto", "08_closing_the_gap": "auto"}  # name -> default DTYPE


def _code_cells(name: str) -> list[dict]:
    nb = json.loads((NOTEBOOKS / f"{name}.ipynb").read_text())
    return [c for c in nb["cells"] if c["cell_type"] == "code"]


def _parameters(name: str) -> dict:
    cells = [c for c in _code_cells(name) if "parameters" in c["metadata"].get("tags", [])]
    assert len(cells) == 1, f"{name}: one cell tagged 'parameters'"
    scope: dict = {}
    exec("".join(cells[0]["source"]), scope)  # plain assignments only
    return scope


@pytest.mark.parametrize("name", sorted(MODEL_NOTEBOOKS))
def test_parameters_exist_with_their_defaults(name):
    params = _parameters(name)
    assert params["DEVICE"] == "auto"
    assert params["DTYPE"] == MODEL_NOTEBOOKS[name]
    resolve_device_dtype(params["DEVICE"], params["DTYPE"])  # the defaults resolve here (CPU or GPU)


@pytest.mark.parametrize("name", sorted(MODEL_NOTEBOOKS))
def test_notebook_resolves_them_with_the_helper_before_loading_the_model(name):
    sources = ["".join(c["source"]) for c in _code_cells(name) if "parameters" not in c["metadata"].get("tags", [])]
    resolve_at = [i for i, s in enumerate(sources) if "DEV, DT = resolve_device_dtype(DEVICE, DTYPE)" in s]
    load_at = [i for i, s in enumerate(sources) if "load_model(" in s]
    assert len(resolve_at) == 1 and load_at and resolve_at[0] < min(load_at)
    calls = re.findall(r"load_model\(([^)]*)\)", "\n".join(sources))
    assert calls and all("dtype=DT" in c and "device=DEV" in c for c in calls), calls
    assert "**device_info(DEV, DT)" in sources[-1] or any("**device_info(DEV, DT)" in s and "metrics = {" in s
                                                            for s in sources)
    assert not any(re.search(r"\.cuda\(\)|device=\"cuda", s) for s in sources)  # only DEV decides


@pytest.mark.parametrize("device,dtype,bad", [("gpu", "auto", "DEVICE"), ("cuda:x", "auto", "DEVICE"),
                                              ("cpu", "fp16", "DTYPE"), ("cpu", "float64", "DTYPE")])
def test_a_bad_parameter_raises_the_helpers_error(device, dtype, bad):
    allowed = DEVICE_CHOICES if bad == "DEVICE" else DTYPE_CHOICES
    with pytest.raises(ValueError, match=rf"^{bad} must be one of " + re.escape(", ".join(map(repr, allowed)))):
        resolve_device_dtype(device, dtype)


def test_cpu_defaults_are_float32_on_cpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device_dtype("auto", "auto") == (torch.device("cpu"), torch.float32)
