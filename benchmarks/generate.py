"""End-to-end ``model.generate()`` benchmark: H1BCache against DynamicCache (and StaticCache) on one GPU.

    python benchmarks/generate.py --out benchmarks/results                 # the full grid -> generate_<device>.json
    python benchmarks/generate.py --quick --out /tmp/results               # a small model and grid (smoke run)
    python benchmarks/generate.py --model meta-llama/Llama-3.1-8B --prompts 8192 --batches 1 --out /tmp/r

Models are random-init fp16 transformers built from a config by :func:`h1bkv_lite.random_model.random_model`
(``--model``: a preset -- llama-2-7b, llama-3-8b, tiny --, or any HF config name or local path, read offline when
``HF_HUB_OFFLINE=1``): timings and memory do not depend on the weights.
Each row runs ``model.generate(input_ids, past_key_values=cache, max_new_tokens=N, do_sample=False)`` on a
random prompt and records:

- ``prefill_s``: wall time from the call to the first logits (a LogitsProcessor synchronises once there);
- ``decode_tok_s``: the other ``N - 1`` tokens over the rest of the call's wall time (eager generate, as a
  user runs it: Python and launch overheads included);
- ``peak_over_weights_bytes``: ``torch.cuda.max_memory_allocated()`` during the call minus what was
  allocated before it (weights, inputs); ``held_after_bytes``: allocated after the call with the cache alive;
- ``cache_bytes``: ``cache.nbytes()`` (the stored tensors), or the K/V bytes of a transformers cache;
- ``syncs_per_decode_step``: host synchronisations during one plain decode ``forward`` (after the first),
  counted with ``torch.cuda.set_sync_debug_mode("warn")``: the model's and the cache's, not generate()'s loop;
- ``oom``: the call ran out of GPU memory (recorded, the benchmark goes on); any other error stops the benchmark
  and is recorded as ``aborted`` beside the rows so far (a device-side assert leaves CUDA unusable).

``--graphs`` adds rows ``cache="h1b-graph"``: ``H1BCache(..., max_cache_len=prompt + N)`` through the same
``model.generate`` call with ``custom_generate=decode_with_cuda_graphs`` (:mod:`h1bkv_lite.graphs`): transformers'
inputs, logits processors and stopping criteria, each decode step's model forward one replayed CUDA graph, timed as
the other rows (a replay makes no host sync by construction; the loop makes one a step, as generate() does).
Before 2026-12-01's second session these rows ran :func:`h1bkv_lite.graphs.generate_greedy` (no logits processors,
an end-of-sequence check every 16 steps) and timed it with its own ``timings``.

``--prefill-chunk N`` forwards every row's prompt in chunks of ``N`` tokens (transformers' ``prefill_chunk_size``,
which the graph rows' loop honours too), for every cache alike: the model's prefill activations then scale with the
chunk instead of the prompt. With H1BCache the later chunks attend to the earlier ones through the cache (their
compressed tokens from the sketches, :mod:`h1bkv_lite.chunk_attention`); with DynamicCache exactly. The file name
gets ``_chunk<N>``.

``StaticCache`` rows are run twice with the same shape, the first call unmeasured: transformers compiles its decode
step for each cache shape, and the compilation is not what the row measures. Before that first call the
compiled step of any earlier shape is dropped (``reset_compiled``): every shape compiles from scratch.

``max_batch_32k`` maps each model and cache to the largest batch whose 32k-token prompt (``--max-batch-len``) and
two decode steps fit: the candidates 1, 2, 4, 8, 12, 16, 24, 32, 48, 64 up to the first out of memory, then a
bisection between (``--no-refine``: the candidates only); ``max_batch_first_oom`` holds the smallest batch that
ran out of memory (None: none did). Attention of the fp16 caches: SDPA with cuDNN off (flash and
memory-efficient enabled); the kernels that ran are listed under ``sdpa_kernels``.
"""
from __future__ import annotations

import argparse
import gc
import json
import platform
import re
import sys
import time
import warnings
from pathlib import Path

import torch
from transformers import DynamicCache, LogitsProcessor, StaticCache

from h1bkv_lite import H1BCache
from h1bkv_lite.graphs import decode_with_cuda_graphs
from h1bkv_lite.random_model import PRESETS, random_model

sys.path.insert(0, str(Path(__file__).resolve().parent))
from decode import git_commit  # noqa: E402

BATCH_CANDIDATES = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64)
SYNC_COUNT_STEPS = 2  # decode steps count_decode_syncs runs on a row's cache after its generate() call
WARMUP_NEW_TOKENS = 40


def warmup_prompts(model, prompts, new_tokens: int) -> list[int]:
    """Prompt lengths for the untimed warm-up: one in each eager launch regime of the decode kernel that a measured
    row reaches (one split; split with the query sketched in the split programs; query prep + split, the combine
    kernel under graph capture), so that every Triton form a row launches is compiled before rows are timed. The
    regimes are bounded by ``_default_config``'s ``single_split_max_n`` and ``query_in_split_max_n`` for the
    model's group size; a row of prompt ``T`` decodes contexts ``T + 1 .. T + new_tokens``."""
    from h1bkv_lite.kernels.decode_attention import _default_config  # noqa: PLC0415 -- Triton is optional

    group = model.config.num_attention_heads // getattr(model.config, "num_key_value_heads",
                                                         model.config.num_attention_heads)
    cfg = _default_config("hamming", group, model.device)
    bounds = sorted({cfg["single_split_max_n"], cfg["query_in_split_max_n"]})
    lo, hi = min(prompts) + 1, max(prompts) + new_tokens
    warm = [max(1, bounds[0] // 2)] if lo <= bounds[0] else []
    warm += [b + 256 for b in bounds if b < hi]
    return warm


def build_model(name: str, device):
    """A random-init fp16 model of ``name`` (a preset of ``h1bkv_lite.random_model.PRESETS`` or an HF config) on
    ``device``, seed 0, SDPA attention, eval mode."""
    return random_model(name, dtype=torch.float16, device=device, seed=0)


def make_cache(spec: dict, model):
    """A fresh cache for one generate() call, from a row spec."""
    if spec["cache"] == "dynamic":
        return DynamicCache(config=model.config)
    if spec["cache"] == "StaticCache":  # room for the decode steps count_decode_syncs adds after generate()
        return StaticCache(config=model.config,
                           max_cache_len=spec["prompt_len"] + spec["new_tokens"] + SYNC_COUNT_STEPS)
    if spec["cache"] == "h1b-graph":
        return H1BCache(model.config, bits=spec["bits"], score=spec["score"],
                        max_cache_len=spec["prompt_len"] + spec["new_tokens"])
    return H1BCache(model.config, bits=spec["bits"], score=spec["score"])


def cache_nbytes(cache) -> int:
    if hasattr(cache, "nbytes") and callable(cache.nbytes):
        return cache.nbytes()
    total = 0
    for layer in cache.layers:
        for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
    return total


class _FirstLogits(LogitsProcessor):
    """Synchronises once, when generate() has the prompt's logits, and notes the time."""

    def __init__(self):
        self.t_first = None

    def __call__(self, input_ids, scores):
        if self.t_first is None:
            torch.cuda.synchronize()
            self.t_first = time.perf_counter()
        return scores


def free_memory():
    gc.collect()
    torch.cuda.empty_cache()


def run_generate(model, spec: dict, *, count_syncs: bool = True) -> dict:
    """One row: generate() with a fresh cache; OOM recorded, not raised."""
    B, T, N = spec["batch"], spec["prompt_len"], spec["new_tokens"]
    dev = model.device
    gen = torch.Generator(device="cpu").manual_seed(T + B)
    ids = torch.randint(3, model.config.vocab_size, (B, T), generator=gen).to(dev)
    mask = torch.ones_like(ids)
    row = {**spec, "oom": False}
    free_memory()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    cache = out = None
    try:
        cache = make_cache(spec, model)
        # the graph rows: generate()'s decoding loop replaced by one whose decode forwards are replayed CUDA graphs
        loop = dict(custom_generate=decode_with_cuda_graphs) if spec["cache"] == "h1b-graph" else {}
        first = _FirstLogits()
        t0 = time.perf_counter()
        out = model.generate(ids, attention_mask=mask, past_key_values=cache, max_new_tokens=N,
                             min_new_tokens=N, do_sample=False, logits_processor=[first], pad_token_id=0,
                             prefill_chunk_size=spec.get("prefill_chunk"), **loop)
        torch.cuda.synchronize()
        prefill_s, decode_s = first.t_first - t0, time.perf_counter() - first.t_first
        row.update(prefill_s=prefill_s, decode_tok_s=(N - 1) / decode_s,
                   peak_over_weights_bytes=torch.cuda.max_memory_allocated() - base,
                   held_after_bytes=torch.cuda.memory_allocated() - base, cache_bytes=cache_nbytes(cache))
        if count_syncs:  # a replayed graph makes none by construction (its capture would have failed)
            row["syncs_per_decode_step"] = (0 if spec["cache"] == "h1b-graph"
                                            else count_decode_syncs(model, cache, out, mask))
    except torch.OutOfMemoryError as err:
        row.update(oom=True, error=str(err).splitlines()[0][:300])
    finally:
        del cache, out
        free_memory()
    return row


@torch.no_grad()
def count_decode_syncs(model, cache, sequences, mask) -> int:
    """Host synchronisations in one plain decode forward (after the first decode step): ``SYNC_COUNT_STEPS``
    forwards on ``cache``, a warm one and the counted one (a fixed-capacity cache needs room for them)."""
    token = sequences[:, -1:]
    full_mask = torch.ones(sequences.shape, dtype=mask.dtype, device=mask.device)
    model(input_ids=token, attention_mask=full_mask, past_key_values=cache, use_cache=True)  # a warm step
    full_mask = torch.ones((sequences.shape[0], sequences.shape[1] + 1), dtype=mask.dtype, device=mask.device)
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            model(input_ids=token, attention_mask=full_mask, past_key_values=cache, use_cache=True)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


@torch.no_grad()
def sdpa_kernels(model) -> list[str]:
    """Names of the attention kernels one DynamicCache prefill + decode step launches (profiler)."""
    ids = torch.randint(3, model.config.vocab_size, (1, 1024), device=model.device)
    cache = DynamicCache(config=model.config)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        model(input_ids=ids, past_key_values=cache, use_cache=True)
        model(input_ids=ids[:, -1:], past_key_values=cache, use_cache=True)
        torch.cuda.synchronize()
    names = {e.name for e in prof.events() if re.search(r"flash|fmha|attention|cudnn", e.name, re.I)}
    return sorted(n[:120] for n in names)


def reset_compiled(model) -> None:
    """Forget the decode step generate() compiled for an earlier StaticCache shape (``model._compiled_call``) and
    dynamo's caches, so the next StaticCache shape compiles from scratch, as in a fresh process."""
    model.__dict__.pop("_compiled_call", None)
    torch._dynamo.reset()


def max_batch(model, spec: dict, start_fits: int | None = None, refine: bool = True) -> tuple[int, int | None]:
    """(largest batch that fits, smallest batch that ran out of memory or None): whether a batch fits is whether
    its prompt and 2 decode steps run. BATCH_CANDIDATES are probed in order up to the first that runs out of
    memory (those up to ``start_fits`` are known to fit), then, with ``refine``, the batches between the last fit
    and that one are bisected, so the answer is exact rather than a candidate."""
    def fits(b: int) -> bool:
        row = run_generate(model, {**spec, "batch": b, "new_tokens": 2}, count_syncs=False)
        print(f"  max batch probe {spec['cache']} {spec.get('bits')} B={b}: {'OOM' if row['oom'] else 'fits'}",
              flush=True)
        return not row["oom"]

    best, first_oom = 0, None
    for b in BATCH_CANDIDATES:
        if (start_fits is not None and b <= start_fits) or fits(b):
            best = b
        else:
            first_oom = b
            break
    while refine and first_oom is not None and first_oom - best > 1:
        mid = (best + first_oom) // 2
        if fits(mid):
            best = mid
        else:
            first_oom = mid
    return best, first_oom


CACHES = ("dynamic", "StaticCache", "h1b", "h1b-graph")


def cache_specs(static: bool, bits=(128, 256), scores=("hamming", "asym"), graphs: bool = False,
                caches=None) -> list[dict]:
    """Row specs: DynamicCache, StaticCache (``static``), H1BCache per (score, bits), its graph rows (``graphs``);
    ``caches`` (a subset of ``CACHES``) keeps only those."""
    specs = [dict(cache="dynamic", bits=None, score=None)]
    if static:
        specs.append(dict(cache="StaticCache", bits=None, score=None))
    specs += [dict(cache="h1b", bits=b, score=s) for s in scores for b in bits]
    if graphs:
        specs += [dict(cache="h1b-graph", bits=b, score=s) for s in scores for b in bits]
    if caches is not None:
        unknown = sorted(set(caches) - set(CACHES))
        if unknown:
            raise ValueError(f"caches must be among {CACHES}, got {unknown}")
        specs = [s for s in specs if s["cache"] in caches]
    return specs


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", nargs="+", default=["llama-2-7b", "llama-3-8b"],
                        help="presets (%s) or HF config names/paths" % ", ".join(PRESETS))
    parser.add_argument("--prompts", nargs="+", type=int, default=[8192, 32768, 131072],
                        help="prompt lengths in tokens (default: 8192 32768 131072)")
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8], help="batch sizes (default: 1 8)")
    parser.add_argument("--new-tokens", type=int, default=128, help="tokens generated per row (default: 128)")
    parser.add_argument("--bits", nargs="+", type=int, default=[128, 256],
                        help="H1BCache sketch bits (default: 128 256)")
    parser.add_argument("--scores", nargs="+", default=["hamming", "asym"],
                        help="H1BCache scores (default: hamming asym)")
    parser.add_argument("--static", action="store_true", help="add transformers' StaticCache (compiled decode step)")
    parser.add_argument("--graphs", action="store_true", help="add H1BCache(max_cache_len=...) rows through "
                        "generate(custom_generate=decode_with_cuda_graphs): each decode forward a replayed CUDA graph")
    parser.add_argument("--caches", nargs="+", choices=CACHES, default=None,
                        help="only these caches' rows (default: every cache the other options add)")
    parser.add_argument("--max-batch-len", type=int, default=32768, help="prompt length of the max-batch search "
                        "(0: skip)")
    parser.add_argument("--no-refine", action="store_true", help="max-batch search over the candidates only "
                        "(default: then bisect between the last fit and the first out-of-memory batch)")
    parser.add_argument("--prefill-chunk", type=int, default=None, help="prompt forwarded in chunks of this many "
                        "tokens (transformers' prefill_chunk_size), for every cache; default: the whole prompt at once")
    parser.add_argument("--quick", action="store_true", help="tiny model, short prompts (a smoke run)")
    parser.add_argument("--out", type=Path, required=True,
                        help="folder for the results (writes generate_<device>_<models>.json there)")
    args = parser.parse_args()
    if args.quick:
        args.model, args.prompts, args.batches, args.new_tokens, args.max_batch_len = ["tiny"], [1024, 4096], [1, 2], 16, 0
    if args.prefill_chunk is not None and args.prefill_chunk < 1:
        parser.error(f"--prefill-chunk: a positive number of tokens, got {args.prefill_chunk}")
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/generate.py needs CUDA")
    torch.backends.cuda.enable_cudnn_sdp(False)
    dev = torch.device("cuda")
    name = torch.cuda.get_device_name(dev)
    result = {"device": name, "torch": torch.__version__, "transformers": __import__("transformers").__version__,
              "triton": __import__("triton").__version__, "python": platform.python_version(), "commit": git_commit(),
              "date": time.strftime("%Y-%m-%d"),
              "new_tokens": args.new_tokens, "rows": [], "max_batch_32k": {}, "max_batch_first_oom": {},
              "max_batch_len": args.max_batch_len, "prefill_chunk": args.prefill_chunk, "sdpa_kernels": {}}
    tag = re.sub(r"[^a-z0-9]+", "_", name.lower().replace("nvidia", "")).strip("_")
    args.out.mkdir(parents=True, exist_ok=True)
    chunked = "" if args.prefill_chunk is None else f"_chunk{args.prefill_chunk}"
    path = args.out / f"generate_{tag}_{'_'.join(args.model)}{chunked}.json"
    specs = [{**spec, "prefill_chunk": args.prefill_chunk}
             for spec in cache_specs(args.static, args.bits, args.scores, args.graphs, args.caches)]
    for model_name in args.model:
        model = build_model(model_name, dev)
        result["sdpa_kernels"][model_name] = sdpa_kernels(model)
        warm = warmup_prompts(model, args.prompts, args.new_tokens)
        for spec in specs:  # warm-up at every batch size: Triton compiles (and specialisations), cuBLAS handles
            if spec["cache"] == "StaticCache":
                continue  # compiled per shape by its own untimed first call (below)
            for B in args.batches:
                for T in warm:
                    run_generate(model, {**spec, "model": model_name, "batch": B, "prompt_len": T,
                                         "new_tokens": WARMUP_NEW_TOKENS}, count_syncs=False)
        fits = {}
        for T in args.prompts:
            for B in args.batches:
                for spec in specs:
                    key = (spec["cache"], spec["bits"], spec["score"])
                    if fits.get(key) is False and B >= fits.get(key + ("B",), 0):
                        continue  # a smaller problem already ran out of memory
                    row_spec = {**spec, "model": model_name, "batch": B, "prompt_len": T, "new_tokens": args.new_tokens}
                    try:
                        if spec["cache"] == "StaticCache":  # its compiled decode step is specialised to the
                            reset_compiled(model)  # cache's shape: compiled afresh, by an untimed call
                            run_generate(model, row_spec, count_syncs=False)
                        row = run_generate(model, row_spec)
                    except RuntimeError as err:  # not an OOM (recorded in the row): e.g. a device-side assert,
                        result["aborted"] = {**row_spec, "error": f"{type(err).__name__}: {str(err)[:300]}"}
                        path.write_text(json.dumps(result, indent=1))  # after which CUDA is unusable
                        raise SystemExit(f"stopped at {row_spec}: {type(err).__name__} (rows so far in {path})")
                    if row["oom"]:
                        fits[key], fits[key + ("B",)] = False, B
                    result["rows"].append(row)
                    print(json.dumps({k: row.get(k) for k in ("model", "cache", "bits", "score", "batch", "prompt_len",
                                                                "prefill_s", "decode_tok_s", "peak_over_weights_bytes",
                                                                "syncs_per_decode_step", "oom")}), flush=True)
                    path.write_text(json.dumps(result, indent=1))
        if args.max_batch_len:
            result["max_batch_32k"][model_name] = {}
            for spec in (s for s in specs if s["cache"] in ("dynamic", "h1b") and s["bits"] in (None, 128)
                         and s["score"] in (None, "hamming")):
                ran = [r for r in result["rows"] if r["model"] == model_name and r["cache"] == spec["cache"]
                       and r["bits"] == spec["bits"] and r["score"] == spec["score"]
                       and r["prompt_len"] == args.max_batch_len and not r["oom"]]
                known = max((r["batch"] for r in ran), default=None)
                label = spec["cache"] if spec["bits"] is None else f"h1b-{spec['bits']}-{spec['score']}"
                best, first_oom = max_batch(model, {**spec, "model": model_name, "prompt_len": args.max_batch_len},
                                            start_fits=known, refine=not args.no_refine)
                result["max_batch_32k"][model_name][label] = best
                result["max_batch_first_oom"].setdefault(model_name, {})[label] = first_oom
                path.write_text(json.dumps(result, indent=1))
        del model
        free_memory()
    path.write_text(json.dumps(result, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
