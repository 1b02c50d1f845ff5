"""h1bkv_lite.runs: reading scripts/finetune.py results folders, on the committed GPU runs and on edited copies."""
import json
import shutil
from pathlib import Path

import pytest

from h1bkv_lite import memory
from h1bkv_lite.runs import RUNG_FIELDS, curves, in_progress, ladder, read_run, read_runs, runs_table

COMMITTED = Path(__file__).resolve().parents[1] / "results" / "finetune"


@pytest.fixture
def committed():
    return read_runs(COMMITTED)


def test_committed_runs_read_into_a_table(committed):
    table = runs_table(committed).set_index("run")
    assert {"fp16_paper", "paper_b64", "paper_b128", "paper_b256"} <= set(table.index)
    assert table.loc["fp16_paper", "fp16_control"] and not table.loc["paper_b128", "fp16_control"]
    assert table.loc["paper_b128", "bits"] == 128 and table.loc["paper_b128", "window"] == 0
    summary = json.loads((COMMITTED / "paper_b128" / "summary.json").read_text())
    assert table.loc["paper_b128", "decode_after"] == summary["final"]["decode_ppl"]
    assert table.loc["paper_b128", "train_tokens"] == summary["tokens"] >= 5_000_000
    reference = json.loads((COMMITTED / "paper_b128" / "reference.json").read_text())
    assert table.loc["paper_b128", "decode_before"] == reference["unadapted"]["decode_ppl"]
    assert table.loc["paper_b128", "passkey_2k_before"] == reference["unadapted"]["passkey"]["2048"]


def test_curves_are_the_logged_evaluations(committed):
    c = curves(committed)
    run = c[c.run == "paper_b128"]
    assert run.step.iloc[0] == 0 and run.tokens.is_monotonic_increasing
    assert run.eval_ppl.iloc[-1] == pytest.approx(committed["paper_b128"].summary["final"]["held_out_ppl"])


def test_ladder_rungs_follow_the_schema_and_the_byte_accounting(committed):
    lad = ladder(committed, shape="smollm2-135m", context=2048)
    names = [r["name"] for r in lad["rungs"]]
    assert "paper_b128" in names and "paper_b128 (un-adapted)" in names
    assert "fp16_paper" not in " ".join(names)  # the control is a reference, not a rung
    for rung in [*lad["rungs"], lad["fp16"], lad["fp16_same_finetune"]]:
        assert set(RUNG_FIELDS) <= set(rung)
    b128 = next(r for r in lad["rungs"] if r["name"] == "paper_b128")
    shape = memory.PRESETS["smollm2-135m"]
    assert b128["bits_per_key_element"] == 2.0
    # 30 layers x 3 kv heads x (16 B of sketch + 32 B of 4-bit values + 4 B scale / zero): no norms for hamming
    assert b128["bytes_per_token"] == shape.num_layers * shape.num_kv_heads * (16 + 32 + 4) == 4680
    assert lad["fp16"]["bytes_per_token"] == 30 * 3 * 64 * 2 * 2
    assert lad["fp16_same_finetune"]["train_tokens"] == committed["fp16_paper"].summary["tokens"]
    assert [r["bits"] for r in lad["rungs"]] == sorted(r["bits"] for r in lad["rungs"])
    unadapted = next(r for r in lad["rungs"] if r["name"] == "paper_b128 (un-adapted)")
    assert unadapted["train_tokens"] == 0 and unadapted["decode_ppl"] > b128["decode_ppl"]


def test_each_finetuned_rung_names_the_control_with_its_recipe(committed):
    """fp16_same_finetune is the paper recipe's control (the paper's claim), whatever sorts first by name (the
    committed fp16_lora does); every finetuned rung carries its own recipe's control."""
    lad = ladder(committed)
    assert {"paper", "lora"} <= set(lad["fp16_same_finetune_by_recipe"])
    assert lad["fp16_same_finetune"]["run"] == "fp16_paper"
    assert lad["fp16_same_finetune_by_recipe"]["lora"]["run"] == "fp16_lora"
    b128 = next(r for r in lad["rungs"] if r["name"] == "paper_b128")
    assert b128["recipe"] == "paper"
    assert b128["same_finetune_decode_ppl"] == committed["fp16_paper"].summary["final"]["decode_ppl"]
    goal = next(r for r in lad["rungs"] if r["name"] == "goal_b128")  # LoRA recipe: the LoRA control
    assert goal["recipe"] == "lora" and (goal["window"], goal["sink"]) == (64, 4)
    assert goal["same_finetune_decode_ppl"] == committed["fp16_lora"].summary["final"]["decode_ppl"]


def test_in_progress_reports_the_last_evaluation_against_the_control_at_that_step(tmp_path):
    for name in ("fp16_paper", "paper_b128", "paper_b64"):
        shutil.copytree(COMMITTED / name, tmp_path / name)
    (tmp_path / "paper_b64" / "summary.json").unlink()  # as a run cut by a time limit looks before its summary
    log = (tmp_path / "paper_b64" / "log.csv").read_text().splitlines()
    evals = read_run(COMMITTED / "paper_b64").log.dropna(subset=["eval_ppl"])
    cut_step = int(evals.step.iloc[1])  # keep the rows up to the second held-out evaluation
    (tmp_path / "paper_b64" / "log.csv").write_text("\n".join(log[:cut_step + 2]) + "\n")
    runs = read_runs(tmp_path)
    got = in_progress(runs, ladder(runs))
    assert list(got) == ["paper_b64"]  # complete runs and controls are not in progress
    control = runs["fp16_paper"].log.dropna(subset=["eval_ppl"]).set_index("step").eval_ppl
    assert got["paper_b64"] == {"step": cut_step, "steps": 611, "held_out_ppl": pytest.approx(evals.eval_ppl.iloc[1]),
                                "control_held_out_ppl": pytest.approx(control[cut_step]), "control": "fp16_paper"}


def test_a_rung_without_its_recipes_control_says_none(tmp_path):
    for name in ("paper_b128", "fp16_lora"):
        shutil.copytree(COMMITTED / name, tmp_path / name)
    lad = ladder(read_runs(tmp_path))
    assert lad["fp16_same_finetune"]["run"] == "fp16_lora"  # the only control
    assert next(r for r in lad["rungs"] if r["name"] == "paper_b128")["same_finetune_decode_ppl"] is None


def test_windows_and_norms_cost_bytes(tmp_path):
    src = COMMITTED / "paper_b128"
    for name, change in {"w": {"window": 64, "sink": 4}, "asym": {"score": "asym"}}.items():
        shutil.copytree(src, tmp_path / name)
        config = json.loads((tmp_path / name / "config.json").read_text())
        config["config"].update(change)
        (tmp_path / name / "config.json").write_text(json.dumps(config))
    rungs = {r["name"]: r for r in ladder(read_runs(tmp_path))["rungs"]}
    base = 4680
    assert rungs["w"]["bytes_per_token"] == pytest.approx(base + 30 * 3 * (64 + 4) * (2 * 64 * 2 - 52) / 2048)
    assert rungs["asym"]["bytes_per_token"] == base + 30 * 3 * 2  # an fp16 key norm per token and kv head
    assert rungs["w"]["window"] == 64 and rungs["w"]["sink"] == 4


def test_incomplete_runs_are_listed_but_not_on_the_ladder(tmp_path):
    shutil.copytree(COMMITTED / "paper_b64", tmp_path / "cut")
    (tmp_path / "cut" / "summary.json").unlink()
    runs = read_runs(tmp_path)
    table = runs_table(runs)
    assert not table.complete.iloc[0] and table.train_tokens.iloc[0] == 0
    with pytest.raises(ValueError, match="no complete run"):
        ladder(runs)


def test_bad_folders_raise_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a folder"):
        read_runs(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="holds no finetune results"):
        read_runs(tmp_path)
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="reference.json is missing"):
        read_run(tmp_path / "x")
    (tmp_path / "x" / "reference.json").write_text("{")
    (tmp_path / "x" / "log.csv").write_text("step\n0\n")
    with pytest.raises(ValueError, match="unreadable JSON"):
        read_run(tmp_path / "x")
    (tmp_path / "x" / "reference.json").write_text("{}")
    with pytest.raises(ValueError, match="lacks the 'config' and 'run'"):
        read_run(tmp_path / "x")
