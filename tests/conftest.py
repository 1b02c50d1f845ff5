import os

# Set before torch starts its thread pool (and inherited by notebook kernels): idle OpenMP threads sleep
# instead of spinning, which on a busy 2-core machine made small torch ops 100x slower.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest


@pytest.fixture(scope="session")
def model_and_tokenizer():
    """The bundled SmolLM2-135M (float32, CPU, eval mode), loaded once per test session."""
    from h1bkv_lite.data import load_model

    return load_model()
