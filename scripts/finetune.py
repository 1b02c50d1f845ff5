"""Finetune a causal LM for H1B attention on the Austen training novels, evaluating on the held-out book.

One run = one results folder (``--out``)::

    python scripts/finetune.py --recipe paper --bits 128 --train-tokens 5000000 --out results/finetune/paper_b128
    accelerate launch --num_processes 2 scripts/finetune.py ...same arguments...   # data-parallel, same global batch

Arguments: every :class:`h1bkv_lite.finetune.FinetuneConfig` field (``--recipe``, ``--bits``, ``--window``,
``--sink``, ``--center-keys``, ``--learn-projection``, ...; booleans as ``--x / --no-x``; ``--max-grad-norm none``
for no clipping), generated from the dataclass, plus the run arguments below (``--help`` lists them all).
The defaults are the config's, except ``--batch-size`` (8 here: 8 x 1024 tokens per step).

What it writes into ``--out`` (rank 0 only):

``config.json``       every config field, every run argument, the device name, the data-parallel world size,
                      torch / transformers / peft / accelerate / Python versions and the git commit.
``log.csv``           one row per step: ``step, tokens, lr, train_loss, ce, kl, grad_norm, seconds`` and, at
                      evaluation steps, ``eval_loss`` (nats per token) and ``eval_ppl`` on the held-out book
                      (through ``H1BCache(compressed_prefill=True)`` with the learned temperatures: what decoding
                      sees); step 0 is the evaluation before training. Rewritten at every evaluation.
``adapters.safetensors``  only the adapted parameters (temperatures, ``v_proj`` or LoRA adapters, a learned
                      projection) and the key mean: a few MB (``H1BFinetuner.from_adapters`` reads it back).
``reference.json``    the un-adapted model's numbers measured before the first step: ``fp16`` (exact cache)
                      and ``unadapted`` (the H1B cache with the calibrated temperature).
``summary.json``      final numbers (held-out ppl through the H1B cache and through an exact cache, long-context
                      decode ppl, passkey accuracy at each length), ``complete``, steps, tokens, wall time,
                      tokens/s, and ``flattened``: whether the held-out curve flattened -- the last evaluation
                      improved held-out perplexity by less than ``--flat-tol`` (1%) over the best of the
                      ``--flat-window`` (3) evaluations before it (``h1bkv_lite.finetune.curve_flattened``).
``checkpoint.pt``     everything needed to resume (optimizer and LR-schedule state; tens of MB): git-ignored by
                      the ``.gitignore`` written beside it.

Long runs on a machine with a per-command time limit: ``--time-limit SECONDS`` stops cleanly (checkpointed)
before it, and the same command with ``--resume`` continues exactly where it stopped (the batch of a step
depends only on the seed and the step; the LR schedule and optimizer state are restored).

``--fp16-control``: the FP16-with-the-same-finetune control -- train with exact attention (``--window`` =
``--seq-len``, temperature frozen) and evaluate the adapted model with an exact cache.

Data parallel: under ``accelerate launch`` (``accelerate`` present) every process loads the model on its own
GPU, takes ``batch_size / W`` of each step's rows and the gradients are averaged (``H1BFinetuner.train``);
without accelerate the script runs on one device. For a model too big for one GPU's memory, see the README
("Finetuning on a GPU": FSDP).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import platform
import subprocess
import sys
import time
import typing
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(ROOT))

from h1bkv_lite.data import BUNDLED_MODEL, load_corpus, load_model, token_batches  # noqa: E402
from h1bkv_lite.finetune import (  # noqa: E402
    AUTOCASTS,
    RECIPES,
    STES,
    TEMPERATURES,
    TRAIN_SCORES,
    FinetuneConfig,
    H1BFinetuner,
    curve_flattened,
    data_parallel,
)
from h1bkv_lite.quant import VALUE_BITS  # noqa: E402

SCRIPT_DEFAULTS = {"batch_size": 8}
"""Run defaults that differ from FinetuneConfig's (a GPU-sized batch)."""
CHOICES = {"recipe": RECIPES, "score": TRAIN_SCORES, "value_bits": VALUE_BITS, "temperature": TEMPERATURES,
           "ste": STES}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
DEFAULT_TRAIN_TOKENS = 5_000_000
FILES = ("config.json", "log.csv", "adapters.safetensors", "reference.json", "summary.json")


# ------------------------------------------------------------------------------------------------ arguments
def _optional(kind):
    def parse(text: str):
        return None if text.lower() == "none" else kind(text)

    parse.__name__ = f"optional {kind.__name__}"
    return parse


def _add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """One option per FinetuneConfig field, typed from its annotation."""
    group = parser.add_argument_group("FinetuneConfig (h1bkv_lite.finetune)")
    hints = typing.get_type_hints(FinetuneConfig)
    for field in dataclasses.fields(FinetuneConfig):
        flag = "--" + field.name.replace("_", "-")
        default = SCRIPT_DEFAULTS.get(field.name, field.default)
        hint = hints[field.name]
        args = typing.get_args(hint)
        kw: dict = {"dest": field.name, "default": default, "help": "a FinetuneConfig field (see its docstring)"}
        if hint is bool:
            group.add_argument(flag, action=argparse.BooleanOptionalAction, **kw)
            continue
        if typing.get_origin(hint) is tuple:
            group.add_argument(flag, nargs="+", type=args[0], **kw)
            continue
        if type(None) in args:  # X | None: "none" gives None
            kind = next(a for a in args if a is not type(None))
            group.add_argument(flag, type=_optional(kind), metavar=kind.__name__.upper() + "|none", **kw)
            continue
        if field.name in CHOICES:
            kw["choices"] = CHOICES[field.name]
        group.add_argument(flag, type=hint, **kw)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Finetune a causal LM for H1B attention (h1bkv_lite.finetune) and evaluate it on the held-out "
                    "book; see the module docstring for the files written.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    run = parser.add_argument_group("run")
    run.add_argument("--out", required=True, default=argparse.SUPPRESS, help="results folder")
    run.add_argument("--model", default=BUNDLED_MODEL,
                     help="the bundled model, an HF id, a local folder or a .gguf file (h1bkv_lite.data.load_model)")
    run.add_argument("--dtype", default="float32", choices=tuple(DTYPES), help="parameter dtype of the model")
    run.add_argument("--device", default="auto", help="'auto' (CUDA when present; a process's own GPU under "
                                                       "accelerate launch), 'cpu', 'cuda', 'cuda:N'")
    run.add_argument("--autocast", default="auto", choices=AUTOCASTS,
                     help="bf16 autocast of the model's matmuls ('auto': on CUDA); sketch, scores and softmax stay fp32")
    run.add_argument("--gradient-checkpointing", action="store_true", help="recompute layers in the backward")
    run.add_argument("--seq-len", type=int, default=1024, help="training / held-out window length, tokens")
    budget = run.add_mutually_exclusive_group()
    budget.add_argument("--train-tokens", type=int, default=None,
                        help=f"training budget in tokens (steps = ceil(tokens / (batch * seq-len))); "
                             f"None: {DEFAULT_TRAIN_TOKENS:,} unless --steps")
    budget.add_argument("--steps", type=int, default=None, help="training steps (instead of --train-tokens)")
    run.add_argument("--warmup-steps", type=int, default=None, help="LR warm-up steps (None: 5%% of the steps)")
    run.add_argument("--eval-every", type=int, default=100, help="held-out evaluation every N steps")
    run.add_argument("--eval-tokens", type=int, default=65536, help="held-out tokens per evaluation")
    run.add_argument("--eval-batch-size", type=int, default=4, help="held-out windows per forward")
    run.add_argument("--calibration-windows", type=int, default=4,
                     help="training windows that calibrate the temperature (and key mean)")
    run.add_argument("--max-train-windows", type=int, default=None,
                     help="use only the first N training windows (None: every window of the five novels)")
    run.add_argument("--log-every", type=int, default=10, help="read losses back to the host every N steps")
    run.add_argument("--checkpoint-every", type=int, default=None, help="checkpoint every N steps (None: --eval-every)")
    run.add_argument("--time-limit", type=float, default=None,
                     help="seconds: stop (checkpointed) once this much wall time has passed; continue with --resume")
    run.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint.pt")
    run.add_argument("--until-flat", action="store_true",
                     help="stop at the first evaluation where the held-out curve has flattened")
    run.add_argument("--flat-window", type=int, default=3, help="flattening rule: evaluations compared")
    run.add_argument("--flat-tol", type=float, default=0.01, help="flattening rule: relative improvement")
    run.add_argument("--fp16-control", action="store_true",
                     help="train with exact attention (window = seq-len, T frozen), evaluate with an exact cache")
    final = parser.add_argument_group("final long-context evaluation (0 / no lengths: skipped)")
    final.add_argument("--decode-prefill", type=int, default=1024, help="tokens prefilled into the cache")
    final.add_argument("--decode-tokens", type=int, default=128, help="tokens scored one decode step at a time")
    final.add_argument("--decode-windows", type=int, default=4, help="held-out windows for decode perplexity")
    final.add_argument("--passkey-lengths", type=int, nargs="*", default=[1024, 2048], help="prompt lengths")
    final.add_argument("--passkey-depths", type=float, nargs="+", default=[0.1, 0.5, 0.9], help="needle depths")
    final.add_argument("--passkey-trials", type=int, default=2, help="keys per (length, depth)")
    _add_config_arguments(parser)
    return parser


def parse_args(argv=None) -> tuple[FinetuneConfig, argparse.Namespace]:
    """``(config, run arguments)``; ValueError / TypeError naming the argument for a bad value."""
    ns = build_parser().parse_args(argv)
    names = {f.name for f in dataclasses.fields(FinetuneConfig)}
    values = {name: getattr(ns, name) for name in names}
    if ns.fp16_control:
        values.update(window=max(values["window"], ns.seq_len), train_temperature=False)
        if values["recipe"] == "temperature":
            raise ValueError("--fp16-control trains the weights: use --recipe paper or lora, not temperature")
    config = FinetuneConfig(**values)  # raises ValueError / TypeError naming the field
    run = argparse.Namespace(**{k: v for k, v in vars(ns).items() if k not in names})
    _check_run(run)
    return config, run


def _check_run(run) -> None:
    def positive(flag, value, low=1):
        if value is not None and (isinstance(value, bool) or value < low):
            raise ValueError(f"{flag} must be >= {low}, got {value}")

    positive("--seq-len", run.seq_len, 2)
    positive("--train-tokens", run.train_tokens)
    positive("--steps", run.steps)
    positive("--warmup-steps", run.warmup_steps, 0)
    positive("--eval-every", run.eval_every)
    positive("--eval-tokens", run.eval_tokens, run.seq_len if run.eval_tokens else 0)
    positive("--eval-batch-size", run.eval_batch_size)
    positive("--calibration-windows", run.calibration_windows)
    positive("--max-train-windows", run.max_train_windows)
    positive("--log-every", run.log_every)
    positive("--checkpoint-every", run.checkpoint_every)
    positive("--flat-window", run.flat_window)
    positive("--decode-prefill", run.decode_prefill, 0)
    positive("--decode-tokens", run.decode_tokens, 0)
    positive("--decode-windows", run.decode_windows, 0)
    positive("--passkey-trials", run.passkey_trials)
    if run.time_limit is not None and run.time_limit <= 0:
        raise ValueError(f"--time-limit must be > 0 seconds, got {run.time_limit}")
    if not 0 <= run.flat_tol < 1:
        raise ValueError(f"--flat-tol must be in [0, 1), got {run.flat_tol}")
    for length in run.passkey_lengths:
        positive("--passkey-lengths", length, 64)
    for depth in run.passkey_depths:
        if not 0 <= depth <= 1:
            raise ValueError(f"--passkey-depths must be in [0, 1], got {depth}")
    if run.train_tokens is None and run.steps is None:
        run.train_tokens = DEFAULT_TRAIN_TOKENS


# ------------------------------------------------------------------------------------------------ setup
def _accelerator():
    """accelerate's Accelerator (process group under ``accelerate launch``), or None without the package."""
    try:
        from accelerate import Accelerator  # noqa: PLC0415
    except ImportError:
        return None
    return Accelerator()


def _device(run, accelerator) -> torch.device:
    if run.device == "auto" and accelerator is not None:
        return accelerator.device
    from h1bkv_lite.finetune import resolve_device  # noqa: PLC0415

    return resolve_device(run.device)


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{device.type} ({platform.processor() or platform.machine()})"


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version  # noqa: PLC0415

    out = {"python": platform.python_version()}
    for name in ("torch", "transformers", "peft", "accelerate", "safetensors", "triton"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    out["cuda"] = torch.version.cuda
    return out


def _git_commit() -> dict:
    def git(*args):
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10)

    try:
        head = git("rev-parse", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}
    if head.returncode:
        return {"commit": None, "dirty": None}
    return {"commit": head.stdout.strip(), "dirty": bool(dirty.stdout.strip())}


def _windows(tokenizer, text: str, seq_len: int, limit: int | None) -> torch.Tensor:
    """Every non-overlapping window of ``seq_len`` tokens of ``text`` (or the first ``limit``): long ``[n, seq_len]``."""
    if limit is not None:
        return token_batches(tokenizer, text, seq_len, limit)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    n = len(ids) // seq_len
    if n == 0:
        raise ValueError(f"--seq-len {seq_len} is longer than the text ({len(ids)} tokens)")
    return torch.tensor(ids[: n * seq_len], dtype=torch.long).view(n, seq_len)


# ------------------------------------------------------------------------------------------------ evaluation
def long_context(model, tokenizer, method, run, progress: bool) -> dict:
    """Decode perplexity and passkey accuracy of ``method`` (a cache factory or "fp16") on the held-out book."""
    from h1bkv_lite.eval import long_context as measure  # noqa: PLC0415

    return measure(model, tokenizer, method, prefill=run.decode_prefill, decode=run.decode_tokens,
                   windows=run.decode_windows, passkey_lengths=run.passkey_lengths,
                   passkey_depths=run.passkey_depths, passkey_trials=run.passkey_trials, progress=progress)


# ------------------------------------------------------------------------------------------------ output
# run options that decide the data, the schedule or what is evaluated: a resumed run must keep them (the config
# fields are checked by H1BFinetuner.load)
RESUME_FIXED = ("model", "seq_len", "train_tokens", "steps", "warmup_steps", "max_train_windows", "calibration_windows",
                "eval_tokens", "fp16_control", "dtype")


def _check_resume_options(saved: dict, now: dict) -> None:
    """ValueError naming every option in ``RESUME_FIXED`` that differs from the run being resumed."""
    changed = [f"--{k.replace('_', '-')} {saved[k]!r} -> {now[k]!r}" for k in RESUME_FIXED
               if k in saved and k in now and saved[k] != now[k]]
    if changed:
        raise ValueError("--resume continues a run with its own options; these differ from the run in --out: "
                         + ", ".join(changed) + " (start a new --out to change them)")


def _write_json(path: Path, data) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    tmp.replace(path)


def write_log(ft: H1BFinetuner, path: Path, tokens_per_step: int) -> "pd.DataFrame":  # noqa: F821
    """``log.csv`` from the finetuner's history (see the module docstring for the columns)."""
    hist = ft.history()
    log = hist.rename(columns={"loss": "train_loss", "ppl": "eval_ppl"})
    log.insert(1, "tokens", log.step * tokens_per_step)
    log["eval_loss"] = log.eval_ppl.map(math.log)
    cols = ["step", "tokens", "lr", "train_loss", "ce", "kl", "grad_norm", "seconds", "eval_loss", "eval_ppl",
            "eval_seconds"]
    log = log[cols]
    tmp = path.with_name(path.name + ".tmp")
    log.to_csv(tmp, index=False)
    tmp.replace(path)
    return log


def main(argv=None) -> dict:
    """Run the script; returns the summary (also written to ``summary.json``)."""
    start = time.time()
    config, run = parse_args(argv)
    accelerator = _accelerator()
    device = _device(run, accelerator)
    rank, world = data_parallel()
    main_process = rank == 0
    out = Path(run.out)
    checkpoint = out / "checkpoint.pt"
    if checkpoint.exists() and not run.resume:
        raise ValueError(f"--out {out} already holds a run (checkpoint.pt): pass --resume to continue it, or choose "
                         "another --out")
    if run.resume and (out / "config.json").exists():
        _check_resume_options(json.loads((out / "config.json").read_text())["run"], vars(run))
    if main_process:
        out.mkdir(parents=True, exist_ok=True)
        (out / ".gitignore").write_text("# resume state (optimizer, LR schedule): tens of MB, not committed\n"
                                        "checkpoint.pt\ncheckpoint.pt.tmp\n*.tmp\nconsole.log\n")

    model, tokenizer = load_model(run.model, dtype=DTYPES[run.dtype], device=device)
    train_ids = _windows(tokenizer, load_corpus(split="train"), run.seq_len, run.max_train_windows)
    held_out = load_corpus(split="validation")
    n_eval = run.eval_tokens // run.seq_len
    eval_ids = token_batches(tokenizer, held_out, run.seq_len, n_eval) if n_eval else None
    calibration = train_ids[: run.calibration_windows]
    tokens_per_step = config.batch_size * run.seq_len
    steps = run.steps if run.steps is not None else math.ceil(run.train_tokens / tokens_per_step)
    warmup = run.warmup_steps if run.warmup_steps is not None else round(0.05 * steps)
    if warmup > steps:
        raise ValueError(f"--warmup-steps must be <= the {steps} training steps, got {warmup}")

    ft = H1BFinetuner(model, config, calibration_ids=calibration, device=device, autocast=run.autocast,
                      gradient_checkpointing=run.gradient_checkpointing)
    ft.use_cosine_schedule(warmup, steps)
    resumed_from = 0
    if run.resume and checkpoint.exists():
        ft.load(checkpoint)
        resumed_from = ft.step
    evaluated_with = "fp16" if run.fp16_control else "h1b"

    reference_path = out / "reference.json"
    if ft.step == 0 and not reference_path.exists():  # the un-adapted model, before any step
        reference = {"fp16": {"held_out_ppl": ft.perplexity(eval_ids, exact=True, batch_size=run.eval_batch_size)
                              if eval_ids is not None else None,
                              **long_context(model, tokenizer, "fp16", run, main_process)},
                     "unadapted": {"held_out_ppl": ft.perplexity(eval_ids, batch_size=run.eval_batch_size)
                                   if eval_ids is not None else None,
                                   **long_context(model, tokenizer, ft.method(), run, main_process)}}
        if main_process:
            _write_json(reference_path, reference)
    reference = json.loads(reference_path.read_text()) if reference_path.exists() else {}

    if main_process:
        _write_json(out / "config.json", {
            "config": dataclasses.asdict(config), "run": vars(run), "steps": steps, "warmup_steps": warmup,
            "tokens_per_step": tokens_per_step, "train_windows": int(train_ids.shape[0]),
            "train_corpus_tokens": int(train_ids.numel()),
            "eval_windows": 0 if eval_ids is None else int(eval_ids.shape[0]),
            "device": _device_name(device), "world_size": world,
            "autocast": None if ft.autocast_dtype is None else str(ft.autocast_dtype),
            "n_trainable": ft.n_trainable(), "trainable_fraction": ft.trainable_fraction(),
            "versions": _versions(), "git": _git_commit(), "argv": sys.argv if argv is None else list(argv)})

    flat = {"value": False}

    def on_eval(finetuner):
        if main_process:
            write_log(finetuner, out / "log.csv", tokens_per_step)
        ppl = [row["ppl"] for row in finetuner.evals]
        flat["value"] = curve_flattened(ppl, run.flat_window, run.flat_tol)
        return run.until_flat and flat["value"]

    deadline = None if run.time_limit is None else time.monotonic() + run.time_limit - (time.time() - start)
    ft.train(train_ids, steps, eval_ids=eval_ids, eval_every=run.eval_every, eval_batch_size=run.eval_batch_size,
             checkpoint=checkpoint, checkpoint_every=run.checkpoint_every or run.eval_every,
             progress=main_process, log_every=run.log_every, deadline=deadline, on_eval=on_eval)
    log = write_log(ft, out / "log.csv", tokens_per_step) if main_process else None
    complete = ft.step == steps or (run.until_flat and flat["value"])
    ppl = [row["ppl"] for row in ft.evals]
    summary = {
        "complete": bool(complete), "step": ft.step, "steps": steps, "tokens": ft.step * tokens_per_step,
        "resumed_from_step": resumed_from, "evaluated_with": evaluated_with,
        "flattened": curve_flattened(ppl, run.flat_window, run.flat_tol),
        "flat_rule": (f"the last held-out evaluation improved perplexity by less than {run.flat_tol:.0%} over the "
                      f"best of the {run.flat_window} evaluations before it"),
        "held_out_ppl_first": ppl[0] if ppl else None, "held_out_ppl_best": min(ppl) if ppl else None,
        "wall_seconds_this_call": None, "reference": reference,
    }
    if main_process:  # before the final evaluation, so a failure there loses no training
        ft.save_adapters(out / "adapters.safetensors")
    if complete:
        final = {"held_out_ppl": ppl[-1] if ppl else None}
        if eval_ids is not None:
            final["held_out_ppl_exact_cache"] = ft.perplexity(eval_ids, exact=True, batch_size=run.eval_batch_size)
        final.update(long_context(model, tokenizer, "fp16" if run.fp16_control else ft.method(), run, main_process))
        summary["final"] = final
    else:  # adapters.safetensors holds the state so far; the checkpoint resumes the run
        summary["next"] = "incomplete: run the same command with --resume to continue"
    if main_process:
        train_seconds = float(log.seconds.sum()) if log is not None else float("nan")
        summary.update(train_seconds=train_seconds, eval_seconds=float(log.eval_seconds.sum()),
                       tokens_per_second=ft.step * tokens_per_step / train_seconds if train_seconds else None,
                       wall_seconds_this_call=time.time() - start, device=_device_name(device), world_size=world)
        _write_json(out / "summary.json", summary)
    return summary


if __name__ == "__main__":
    try:
        main()
    except (ValueError, TypeError) as err:
        sys.exit(f"error: {err}")
