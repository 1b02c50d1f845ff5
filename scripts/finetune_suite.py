"""Run a suite of ``scripts/finetune.py`` runs, several at a time on one or more GPUs: the finetune ladder of issue 11.

    python scripts/finetune_suite.py --list                                   # the runs and their options
    python scripts/finetune_suite.py --parallel 4 --time-limit 540            # start (or continue) every run
    python scripts/finetune_suite.py --only paper_b128 fp16_paper -- --steps 20   # extra options go to each run
    python scripts/finetune_suite.py --parallel 4 --gpus 0 1                  # two at a time on each of two GPUs

Each run writes its own results folder ``<root>/<name>`` (``--root``, default ``results/finetune``; the files are
those of ``scripts/finetune.py``) and its console output to ``<root>/<name>/console.log`` (git-ignored). A run
whose folder holds a checkpoint is continued with ``--resume``; one whose ``summary.json`` says ``complete`` is
skipped. ``--time-limit`` is handed to every run (each stops checkpointed before it), so the same command, run
again, continues the suite where it stopped.

The runs share the GPU as separate processes (``--parallel``; with ``--gpus`` each process gets the least busy
of those GPUs as its only visible device); their order in :data:`LADDER` is their priority.
All use the script's defaults -- 5M training tokens at sequence length 1024, 8 sequences per step, cosine LR
schedule with 5% warm-up -- and :data:`SUITE_OPTIONS` (held-out evaluation every 200 steps on 32 windows) unless
their options say otherwise. (The first committed runs, fp16_paper and paper_b128, evaluated every 100 steps on
64 windows.)
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "finetune.py"

LORA = ("--recipe", "lora", "--distill", "0.5", "--lr", "1e-3")
GOAL = ("--center-keys", "--window", "64", "--sink", "4")
LADDER: dict[str, tuple[str, ...]] = {
    # the FP16 control: the paper's finetune (v_proj) with exact attention, evaluated with an exact cache
    "fp16_paper": ("--recipe", "paper", "--fp16-control"),
    # the paper's recipe (T + v_proj, "hamming", no exact window) at 2 bits per key element
    "paper_b128": ("--recipe", "paper", "--bits", "128"),
    # the project's goal setting: LoRA (+ T, half the loss the KL to the exact model) + key centering + 64 exact
    # recent tokens + 4 sinks; and its control, the same LoRA finetune with exact attention
    "goal_b128": (*LORA, *GOAL, "--bits", "128"),
    "fp16_lora": (*LORA, "--fp16-control"),
    # the paper's recipe at 1 and 4 bits per key element
    "paper_b64": ("--recipe", "paper", "--bits", "64"),
    "paper_b256": ("--recipe", "paper", "--bits", "256"),
    # LoRA alone, then one switch at a time on the paper's recipe (b = 128)
    "lora_b128": (*LORA, "--bits", "128"),
    "center_b128": ("--recipe", "paper", "--bits", "128", "--center-keys"),
    "window_b128": ("--recipe", "paper", "--bits", "128", "--window", "64", "--sink", "4"),
    "learnR_b128": ("--recipe", "paper", "--bits", "128", "--learn-projection"),
    "asym_b128": ("--recipe", "paper", "--bits", "128", "--score", "asym"),
    # the other widths
    "goal_b64": (*LORA, *GOAL, "--bits", "64"),
    "lora_b64": (*LORA, "--bits", "64"),
    "lora_b256": (*LORA, "--bits", "256"),
}
"""Run name -> its ``scripts/finetune.py`` options, in priority order."""

SUITE_OPTIONS = ("--eval-every", "200", "--eval-tokens", "32768")
"""Options every run gets before its own and the command line's: held-out evaluation every 200 steps on 32 windows
(an evaluation of 64 windows every 100 steps cost 30-50 s on the H200, 4-5 minutes of a 10-minute run)."""


def check_backends(model_name: str | None = None, bits=(64, 128, 256), prefill: int = 512, decode: int = 8,
                   layers=(0, -1), tol: float = 1e-2) -> dict:
    """Pre-flight on a GPU: ``H1BCache``'s default backend (the Triton kernels where they serve the model's shape)
    against ``backend="torch"`` on the model's own attention inputs (held-out text, ``layers``), per layer: after
    a prefill of ``prefill`` tokens, each of ``decode`` decode steps' attention output must agree within ``tol``
    of the torch path's output rms (max abs difference / rms), for each ``bits`` on "hamming" (calibrated
    temperature) and on "asym" with a 16-token window, 4 sinks and a key mean.

    Why outputs and not perplexity: in an un-adapted 1-bit cache perplexity is chaotic (a 1e-6 nudge of R moves
    it by 10%), while a wrong kernel moves whole rows of an output. ``tol`` 1e-2: the GQA kernel's tf32 value
    products truncate the softmax weights (up to 2^-10 each, one-signed), measured at 1.4-1.9e-3 of an output's
    rms on SmolLM2-135M; the torch path is fp32. Returns ``{setting: worst ratio}``; raises RuntimeError naming
    the first setting over ``tol``."""
    import torch  # noqa: PLC0415

    from h1bkv_lite.cache import H1BCache  # noqa: PLC0415
    from h1bkv_lite.capture import capture_attention_inputs  # noqa: PLC0415
    from h1bkv_lite.data import load_corpus, load_model, token_batches  # noqa: PLC0415

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, tokenizer = load_model(model_name, device=device)
    ids = token_batches(tokenizer, load_corpus(split="validation"), prefill + decode, 1)
    captured = capture_attention_inputs(model, ids, layers=list(layers), device=None)
    head_dim = next(iter(captured.values()))[1].shape[-1]
    mu = torch.randn(model.config.num_hidden_layers, model.config.num_key_value_heads, head_dim,
                     generator=torch.Generator().manual_seed(0))  # any mean: the check is of the arithmetic
    settings = {"hamming": {"score": "hamming"},
                "asym+window+sink+key_mean": {"score": "asym", "window": 16, "sink": 4, "key_mean": mu}}
    worst: dict[str, float] = {}
    for b in bits:
        for name, extra in settings.items():
            setting = f"b={b} {name}"
            for layer, (q, k, v) in captured.items():
                outs = {}
                for backend in ("auto", "torch"):
                    cache = H1BCache(model.config, bits=b, backend=backend, **extra)
                    cache_layer = cache.layers[layer]
                    cache_layer.update(k[:, :, :prefill], v[:, :, :prefill])
                    cache_layer.attend(q[:, :, :prefill])
                    steps = []
                    for t in range(prefill, prefill + decode):
                        cache_layer.update(k[:, :, t:t + 1], v[:, :, t:t + 1])
                        steps.append(cache_layer.attend(q[:, :, t:t + 1]).float())
                    outs[backend] = torch.cat(steps, dim=2)
                ratio = float((outs["auto"] - outs["torch"]).abs().max() / outs["torch"].pow(2).mean().sqrt())
                worst[setting] = max(worst.get(setting, 0.0), ratio)
            ok = worst[setting] <= tol
            print(f"check-backends {setting}: max |auto - torch| / rms = {worst[setting]:.2e} "
                  f"{'ok' if ok else 'DIFFERS'}", flush=True)
            if not ok:
                raise RuntimeError(f"H1BCache's default backend and the torch path disagree ({setting}): "
                                   f"{worst[setting]:.3g} of the output rms > {tol}")
    return worst


def state(folder: Path) -> str:
    """"complete", "resume" (a checkpoint to continue) or "new"."""
    summary = folder / "summary.json"
    if summary.is_file() and json.loads(summary.read_text()).get("complete"):
        return "complete"
    return "resume" if (folder / "checkpoint.pt").is_file() else "new"


def command(name: str, root: Path, time_limit: float | None, extra: list[str]) -> list[str]:
    folder = root / name
    cmd = [sys.executable, str(SCRIPT), *SUITE_OPTIONS, *LADDER[name], "--out", str(folder), *extra]
    if time_limit is not None:
        cmd += ["--time-limit", str(time_limit)]
    if state(folder) == "resume":
        cmd.append("--resume")
    return cmd


def pick_gpu(gpus: list[str] | None, busy: list[str]) -> str | None:
    """The GPU of ``gpus`` (indices as ``CUDA_VISIBLE_DEVICES`` names them) running the fewest of ``busy``
    (the GPUs of the running runs), the first on ties; None when no GPUs are given (every run sees all)."""
    if not gpus:
        return None
    return min(gpus, key=lambda g: busy.count(g))


def run_all(names: list[str], root: Path, parallel: int, time_limit: float | None, extra: list[str],
            gpus: list[str] | None = None) -> dict:
    """Start the runs, at most ``parallel`` at a time, each on the least busy of ``gpus`` (its
    ``CUDA_VISIBLE_DEVICES``) when given; returns ``{name: exit code}`` (None: skipped, complete)."""
    pending = [n for n in names if state(root / n) != "complete"]
    codes: dict[str, int | None] = {n: None for n in names if n not in pending}
    running: dict[str, tuple[subprocess.Popen, object, str | None]] = {}
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TQDM_MININTERVAL": "30"}
    env.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    while pending or running:
        while pending and len(running) < parallel:
            name = pending.pop(0)
            (root / name).mkdir(parents=True, exist_ok=True)
            log = open(root / name / "console.log", "a")  # noqa: SIM115 -- closed when the run ends
            cmd = command(name, root, time_limit, extra)
            gpu = pick_gpu(gpus, [g for _, _, g in running.values()])
            run_env = env if gpu is None else {**env, "CUDA_VISIBLE_DEVICES": gpu}
            log.write(f"\n$ {'' if gpu is None else f'CUDA_VISIBLE_DEVICES={gpu} '}{' '.join(cmd)}\n")
            log.flush()
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=run_env, cwd=ROOT)
            running[name] = (proc, log, gpu)
            print(f"[{time.strftime('%H:%M:%S')}] started {name}{'' if gpu is None else f' on GPU {gpu}'}",
                  flush=True)
        time.sleep(2)
        for name, (proc, log, _) in list(running.items()):
            if proc.poll() is not None:
                log.close()
                codes[name] = proc.returncode
                del running[name]
                print(f"[{time.strftime('%H:%M:%S')}] {name} exited {proc.returncode} ({state(root / name)})",
                      flush=True)
    return codes


def report(names: list[str], root: Path) -> str:
    """One line per run: state, steps, tokens, held-out ppl first -> last, final decode ppl and passkey."""
    lines = [f"{'run':<14} {'state':<9} {'step':>9} {'tokens':>10} {'held-out ppl':>17} {'decode ppl':>10} passkey"]
    for name in names:
        folder = root / name
        s = json.loads((folder / "summary.json").read_text()) if (folder / "summary.json").is_file() else {}
        final = s.get("final", {})
        ppl = f"{s.get('held_out_ppl_first', float('nan')):.2f} -> {final.get('held_out_ppl', float('nan')):.2f}"
        lines.append(f"{name:<14} {state(folder):<9} {s.get('step', 0):>4}/{s.get('steps', 0):<4} "
                     f"{s.get('tokens', 0):>10,} {ppl:>17} {final.get('decode_ppl', float('nan')):>10.2f} "
                     f"{final.get('passkey', {})}")
    return "\n".join(lines)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].replace("issue 11", "the project's issue 11"),
                                     epilog="\n".join(__doc__.split("\n\n")[1].splitlines()),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default="results/finetune",
                        help="folder of the runs' results folders (default: results/finetune)")
    parser.add_argument("--only", nargs="+", choices=tuple(LADDER), metavar="RUN",
                        help="these runs (default: every run of the ladder, in order; --list shows them)")
    parser.add_argument("--parallel", type=int, default=1, help="runs at a time (default: 1)")
    parser.add_argument("--gpus", nargs="+", default=None,
                        help="GPU indices to spread the runs over, each run getting the least busy one as its "
                             "CUDA_VISIBLE_DEVICES (default: every run sees every GPU)")
    parser.add_argument("--time-limit", type=float, default=None,
                        help="seconds, handed to every run: it stops checkpointed before (default: none)")
    parser.add_argument("--list", action="store_true", help="print each run's full command, then exit")
    parser.add_argument("--check-backends", action="store_true",
                        help="first check that the evaluation's default cache backend equals the torch path")
    parser.add_argument("--model", default=None, help="model for --check-backends (default: the bundled one)")
    parser.add_argument("extra", nargs=argparse.REMAINDER, help="after --: options for every run")
    ns = parser.parse_args(argv)
    if ns.parallel < 1:
        parser.error(f"--parallel must be >= 1, got {ns.parallel}")
    if ns.gpus is not None and (not all(g.isdigit() for g in ns.gpus) or len(set(ns.gpus)) != len(ns.gpus)):
        parser.error(f"--gpus takes distinct GPU indices (0 1 ...), got {' '.join(ns.gpus)}")
    if ns.time_limit is not None and not ns.time_limit > 0:
        parser.error(f"--time-limit must be > 0 seconds, got {ns.time_limit}")
    names = list(ns.only or LADDER)
    extra = ns.extra[1:] if ns.extra[:1] == ["--"] else ns.extra
    root = Path(ns.root)
    if ns.check_backends:
        check_backends(ns.model)
    if ns.list:
        for name in names:
            print(f"{name:<14} {' '.join(command(name, root, ns.time_limit, extra)[1:])}")
        return {}
    codes = run_all(names, root, ns.parallel, ns.time_limit, extra, ns.gpus)
    print(report(names, root), flush=True)
    return codes


if __name__ == "__main__":
    sys.exit(1 if any(main().values()) else 0)
