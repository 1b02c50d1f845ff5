import pytest


@pytest.fixture(scope="session")
def model_and_tokenizer():
    """The bundled SmolLM2-135M (float32, CPU, eval mode), loaded once per test session."""
    from h1bkv_lite.data import load_model

    return load_model()
