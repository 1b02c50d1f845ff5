"""Read the results folders of ``scripts/finetune.py`` (e.g. the committed ``results/finetune/``) into tables.

    runs = read_runs("results/finetune")          # {name: Run}
    runs_table(runs)                               # one row per run: settings, budget, before / after numbers
    curves(runs)                                   # held-out perplexity against training tokens
    ladder(runs, shape="smollm2-135m")            # the rungs of issue 11, with their bytes per token
    in_progress(runs, ladder(runs))                # incomplete runs at their last held-out evaluation

A run folder holds ``config.json``, ``log.csv``, ``reference.json`` and (once a call of the script has ended)
``summary.json``; see ``scripts/finetune.py``. Nothing here trains or evaluates: the numbers are the ones the
runs measured (device and budget in ``config.json``).

The ladder (issue 11): for every H1B run two rungs -- the un-adapted model with that run's settings (its
``reference.json``, measured before the first step) and the finetuned one (its final numbers) -- plus two
references: ``fp16`` (the un-adapted model with an exact cache) and ``fp16_same_finetune`` (the run trained with
``--fp16-control``: the same finetune with exact attention, evaluated with an exact cache). Each rung has
``name, bits, bits_per_key_element, bytes_per_token, window, sink, train_tokens, decode_ppl, passkey_1k,
passkey_2k`` (and ``held_out_ppl``, ``run``, ``adapted``); ``bytes_per_token`` is
:func:`h1bkv_lite.memory.kv_cache_bytes` per token at ``context`` tokens (default 2048, the longest passkey
prompt), every layer and kv head, with 16-bit exact tokens.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from . import memory

__all__ = ["Run", "read_run", "read_runs", "runs_table", "curves", "ladder", "in_progress", "RUNG_FIELDS"]

RUNG_FIELDS = ("name", "bits", "bits_per_key_element", "bytes_per_token", "window", "sink", "train_tokens",
               "decode_ppl", "passkey_1k", "passkey_2k")
"""The fields every rung and reference of :func:`ladder` has (issue 11's ``metrics.json`` schema)."""


@dataclass(frozen=True)
class Run:
    """One results folder: ``name`` (the folder's), ``config`` (``config.json``), ``reference``
    (``reference.json``), ``summary`` (``summary.json``, ``{}`` before the first call ends) and ``log``
    (``log.csv`` as a DataFrame)."""

    name: str
    path: Path
    config: dict
    reference: dict
    summary: dict
    log: pd.DataFrame

    @property
    def settings(self) -> dict:
        """The ``FinetuneConfig`` fields of the run."""
        return self.config["config"]

    @property
    def fp16_control(self) -> bool:
        return bool(self.config["run"].get("fp16_control"))

    @property
    def complete(self) -> bool:
        return bool(self.summary.get("complete"))


def read_run(path) -> Run:
    """Read one results folder. Raises FileNotFoundError naming the missing file (``config.json``,
    ``reference.json`` or ``log.csv``), ValueError for a file that is not the script's."""
    path = Path(path)
    files = {}
    for name in ("config.json", "reference.json", "log.csv"):
        if not (path / name).is_file():
            raise FileNotFoundError(f"{path} is not a scripts/finetune.py results folder: {name} is missing")
    try:
        files["config"] = json.loads((path / "config.json").read_text())
        files["reference"] = json.loads((path / "reference.json").read_text())
        summary = path / "summary.json"
        files["summary"] = json.loads(summary.read_text()) if summary.is_file() else {}
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: unreadable JSON ({err})") from err
    if "config" not in files["config"] or "run" not in files["config"]:
        raise ValueError(f"{path}/config.json lacks the 'config' and 'run' sections of scripts/finetune.py")
    return Run(name=path.name, path=path, log=pd.read_csv(path / "log.csv"), **files)


def read_runs(root) -> dict[str, Run]:
    """Every results folder directly under ``root`` (sub-folders holding a ``config.json``), by name, sorted.
    Raises FileNotFoundError when ``root`` is not a folder or holds no run."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root} is not a folder of finetune results")
    runs = {p.name: read_run(p) for p in sorted(root.iterdir()) if (p / "config.json").is_file()}
    if not runs:
        raise FileNotFoundError(f"{root} holds no finetune results folder (a sub-folder with config.json)")
    return runs


def _passkey(numbers: dict, length: int) -> float:
    return float(numbers.get("passkey", {}).get(str(length), math.nan))


def runs_table(runs: dict[str, Run]) -> pd.DataFrame:
    """One row per run: settings (recipe, bits, score, window, sink, center_keys, learn_projection,
    fp16_control), budget (steps, train_tokens, complete, flattened, device) and the numbers before (the
    un-adapted model with the run's settings) and after: held-out, decode perplexity, passkey at 1k / 2k."""
    rows = []
    for name, run in runs.items():
        cfg, before = run.settings, run.reference.get("fp16" if run.fp16_control else "unadapted", {})
        after = run.summary.get("final", {})
        rows.append({
            "run": name, "recipe": cfg["recipe"], "bits": None if run.fp16_control else cfg["bits"],
            "score": cfg["score"], "window": cfg["window"], "sink": cfg["sink"],
            "center_keys": cfg["center_keys"], "learn_projection": cfg["learn_projection"],
            "fp16_control": run.fp16_control, "steps": run.summary.get("step", 0),
            "train_tokens": run.summary.get("tokens", 0), "complete": run.complete,
            "flattened": run.summary.get("flattened"), "device": run.config.get("device"),
            "held_out_before": before.get("held_out_ppl"), "held_out_after": after.get("held_out_ppl"),
            "decode_before": before.get("decode_ppl"), "decode_after": after.get("decode_ppl"),
            "passkey_1k_before": _passkey(before, 1024), "passkey_1k_after": _passkey(after, 1024),
            "passkey_2k_before": _passkey(before, 2048), "passkey_2k_after": _passkey(after, 2048),
        })
    return pd.DataFrame(rows)


def curves(runs: dict[str, Run]) -> pd.DataFrame:
    """Held-out evaluations of every run: ``run, step, tokens, eval_ppl`` (step 0: before training)."""
    parts = [run.log.dropna(subset=["eval_ppl"])[["step", "tokens", "eval_ppl"]].assign(run=name)
             for name, run in runs.items()]
    return pd.concat(parts, ignore_index=True)[["run", "step", "tokens", "eval_ppl"]]


def _scheme(cfg: dict) -> memory.H1B:
    return memory.H1B(bits=cfg["bits"], value_bits=cfg["value_bits"], group_size=cfg["group_size"],
                      key_norms=cfg["score"] != "hamming", window=cfg["window"], sink=cfg["sink"])


def _rung(name: str, cfg: dict | None, numbers: dict, shape: memory.ModelShape, context: int,
          train_tokens: int, run: str, adapted: bool) -> dict:
    scheme = memory.FP16() if cfg is None else _scheme(cfg)
    per_token = memory.kv_cache_bytes(shape, context, scheme=scheme).per_token
    bits = None if cfg is None else cfg["bits"]
    return {"name": name, "bits": bits, "bits_per_key_element": 16.0 if bits is None else bits / shape.head_dim,
            "bytes_per_token": per_token, "window": None if cfg is None else cfg["window"],
            "sink": None if cfg is None else cfg["sink"], "train_tokens": train_tokens,
            "decode_ppl": numbers.get("decode_ppl"), "passkey_1k": _passkey(numbers, 1024),
            "passkey_2k": _passkey(numbers, 2048), "held_out_ppl": numbers.get("held_out_ppl"), "run": run,
            "adapted": adapted}


def ladder(runs: dict[str, Run], shape="smollm2-135m", context: int = 2048) -> dict:
    """The issue-11 ladder from complete runs: ``{"rungs": [...], "fp16": {...}, "fp16_same_finetune": {...},
    "fp16_same_finetune_by_recipe": {recipe: {...}}, "context": context}``.

    ``rungs``: for each complete H1B run, ``"<run> (un-adapted)"`` (``train_tokens`` 0) and ``"<run>"``, sorted by
    bits then name; a finetuned rung also has ``recipe`` and ``same_finetune_decode_ppl``, the decode perplexity
    of the complete ``--fp16-control`` run with its recipe (the same finetune with exact attention; None without
    one). ``fp16``: from the first run's reference (every run measures the same un-adapted model).
    ``fp16_same_finetune_by_recipe``: per recipe, its complete control (the first by name when there are
    several); ``fp16_same_finetune``: the "paper" recipe's (the paper's claim), else the first by name (None
    without any). ``shape``: a :data:`h1bkv_lite.memory.PRESETS` name, ``ModelShape`` or config (the model the
    runs trained). Raises ValueError without a complete run."""
    shape = memory.model_shape(shape)
    complete = {n: r for n, r in runs.items() if r.complete}
    if not complete:
        raise ValueError("no complete run to build the ladder from (summary.json with complete: true)")
    controls: dict[str, dict] = {}
    for name, run in complete.items():
        if run.fp16_control and run.settings["recipe"] not in controls:
            controls[run.settings["recipe"]] = _rung("fp16_same_finetune", None, run.summary["final"], shape,
                                                     context, run.summary["tokens"], name, True)
    rungs = []
    for name, run in complete.items():
        if run.fp16_control:
            continue
        cfg = run.settings
        control = controls.get(cfg["recipe"])
        rungs.append(_rung(f"{name} (un-adapted)", cfg, run.reference["unadapted"], shape, context, 0, name, False))
        rungs.append({**_rung(name, cfg, run.summary["final"], shape, context, run.summary["tokens"], name, True),
                      "recipe": cfg["recipe"], "same_finetune_decode_ppl": control and control["decode_ppl"]})
    rungs.sort(key=lambda r: (r["bits"], r["run"], r["adapted"]))
    first = next(iter(complete.values()))
    fp16 = _rung("fp16", None, first.reference["fp16"], shape, context, 0, first.name, False)
    main_control = controls.get("paper") or next(iter(controls.values()), None)
    return {"rungs": rungs, "fp16": fp16, "fp16_same_finetune": main_control,
            "fp16_same_finetune_by_recipe": controls, "context": context}


def in_progress(runs: dict[str, Run], lad: dict) -> dict:
    """Incomplete runs with at least two held-out evaluations (step 0 and one after it), each at its last one:
    ``{name: {"step", "steps", "held_out_ppl", "control", "control_held_out_ppl"}}``: ``control`` names its
    recipe's complete FP16 control (``lad["fp16_same_finetune_by_recipe"]``, from :func:`ladder`),
    ``control_held_out_ppl`` is that control's held-out perplexity at the same step (None when it did not evaluate
    at that step). Runs whose recipe has no control are left
    out: there is nothing to compare them with."""
    out = {}
    for name, run in runs.items():
        control = lad["fp16_same_finetune_by_recipe"].get(run.settings["recipe"])
        evals = run.log.dropna(subset=["eval_ppl"])
        if run.complete or control is None or len(evals) < 2:
            continue
        step, ppl = int(evals.step.iloc[-1]), float(evals.eval_ppl.iloc[-1])
        ref = runs[control["run"]].log.dropna(subset=["eval_ppl"]).set_index("step").eval_ppl.get(step)
        out[name] = {"step": step, "steps": int(run.config["steps"]), "held_out_ppl": ppl,
                     "control_held_out_ppl": None if ref is None else float(ref), "control": control["run"]}
    return out
