"""Notebook 06 (light finetuning) runs headlessly with SMOKE parameters and writes consistent metrics."""
import pytest
from notebook_runner import run_notebook

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def metrics(tmp_path_factory):
    return run_notebook("06_finetuning", tmp_path_factory.mktemp("nb06"))


def test_notebook_06_writes_figures_and_metrics(metrics, tmp_path_factory):
    assert metrics["smoke"] is True and metrics["bits"] == [64]
    for key in ("ppl_h1b_before", "ppl_h1b_after", "ppl_exact_cache_adapted"):
        assert set(metrics[key]) == {"paper_64", "lora_64"}


def test_notebook_06_counts_trainable_parameters(metrics):
    assert metrics["trainable_params"]["paper"] == 30 * 576 * 192 + 1  # v_proj + one global temperature
    assert metrics["trainable_params"]["lora"] == 30 * 8 * ((576 + 576) + 2 * (576 + 192)) + 1
    assert metrics["trainable_fraction"]["paper"] == pytest.approx(3_317_761 / 134_515_008)
    assert metrics["llama2_7b_v_proj_fraction"] == pytest.approx(0.0797, abs=1e-3)


def test_notebook_06_numbers_are_consistent(metrics):
    fp16 = metrics["ppl_fp16"]
    unadapted = metrics["ppl_h1b_unadapted_head_T"]["64"]
    assert 10 < fp16 < 200
    assert unadapted > 2 * fp16  # 1 bit per key element, no finetune: far from exact
    assert metrics["ppl_h1b_before"]["paper_64"] == pytest.approx(metrics["ppl_h1b_before"]["lora_64"], rel=1e-6)
    # the paper's recipe lowers held-out H1B perplexity even in four short steps (measured: see the report)
    assert metrics["ppl_h1b_after"]["paper_64"] < metrics["ppl_h1b_before"]["paper_64"]
    reload = metrics["checkpoint_reload_ppl"]
    assert reload["reloaded"] == pytest.approx(reload["saved"], rel=1e-6)
    assert reload["values"] == metrics["trainable_params"]["paper"]
