"""Evaluate KV-cache methods on a causal LM: perplexity, passkey retrieval, agreement with FP16 greedy decoding.

A *method* is ``"fp16"`` (exact attention, :class:`~h1bkv_lite.baselines.FP16Cache`) or a cache factory:
any callable ``factory(config, compressed_prefill=...) -> Cache`` such as
``functools.partial(H1BCache, bits=64, window=16)`` or ``functools.partial(KIVICache, bits=2)``.

What each token sees:

- :func:`perplexity` runs each window in one forward with ``factory(config, compressed_prefill=True)``:
  every query attends as it would have at decode time, had the window been generated token by token
  (H1B: sketched keys and quantized values outside its own window; KIVI: quantized whole token groups
  outside its residual; eviction: the tokens kept after the previous step, replayed one query at a time;
  Loki: its own top-k). This equals token-by-token decoding up to float rounding (tested), with one
  exception: H1B's ``temperature=None`` is calibrated on the window itself (an oracle); pass a
  temperature from :func:`~h1bkv_lite.cache.fit_temperature` on other text for a deployment-faithful number.
- :func:`decode_perplexity` (long context) prefills ``prefill`` tokens into ``factory(config)`` exactly, as a
  deployment would, and then scores ``decode`` tokens decoded one at a time: each scored token is predicted by
  a one-token decode step whose query attends to the cache as stored (H1B: every key older than its window
  and sinks only through its sketch). The same function with ``"fp16"`` is the exact reference.
- :func:`passkey_retrieval` writes the haystack into the cache with a normal (exact) prefill, as a
  deployment would, then asks the question in a second forward: the question attends exactly to itself
  (and the method's exact window) and to the haystack only through what the method kept.
- :func:`generation_agreement` prefills the prompt exactly and decodes token by token through the cache.

Results are pandas DataFrames, one row per window / trial / prompt.
"""
from __future__ import annotations

import functools
import math
import random
import re

import pandas as pd
import torch
from tqdm.auto import tqdm

from ._device import model_device
from .baselines import FP16Cache

__all__ = ["decode_perplexity", "generation_agreement", "long_context", "method_name", "passkey_prompt",
           "passkey_retrieval", "perplexity"]


def _factory(method):
    if method is None or method == "fp16":
        return FP16Cache
    if isinstance(method, str) or not callable(method):
        raise TypeError(f"method must be 'fp16' or a cache factory (config, compressed_prefill=...) -> Cache, "
                        f"got {method!r}")
    return method


def method_name(method) -> str:
    """A short label: ``"fp16"``, ``"H1BCache(bits=64, window=16)"``, or the factory's ``__name__``."""
    if method is None or method == "fp16":
        return "fp16"
    if isinstance(method, functools.partial):
        args = [f"{k}={'tensor' if isinstance(v, torch.Tensor) else repr(v)}" for k, v in method.keywords.items()]
        return f"{getattr(method.func, '__name__', 'cache')}({', '.join(args)})"
    return getattr(method, "__name__", type(method).__name__)


def _device(model) -> torch.device:
    return model_device(model)


def _windows(tokenizer_or_ids, seq_len: int, n_windows: int, text: str | None) -> torch.Tensor:
    """Token windows ``long [n, seq_len]``: given ids (1D: cut into windows; 2D: as they are), or text."""
    if isinstance(tokenizer_or_ids, torch.Tensor):
        ids = tokenizer_or_ids.long()
        if ids.dim() == 1:
            n = min(n_windows, ids.numel() // seq_len)
            if n == 0:
                raise ValueError(f"need at least seq_len={seq_len} tokens, got {ids.numel()}")
            return ids[: n * seq_len].view(n, seq_len)
        if ids.dim() != 2 or ids.shape[1] < 2:
            raise ValueError(f"ids must be 1D or [n, T >= 2], got shape {tuple(ids.shape)}")
        return ids
    from .data import load_corpus, token_batches  # noqa: PLC0415 -- only when text is needed

    return token_batches(tokenizer_or_ids, load_corpus() if text is None else text, seq_len, n_windows)


@torch.no_grad()
def perplexity(model, tokenizer_or_ids, method="fp16", *, seq_len: int = 512, n_windows: int = 1,
               batch_size: int = 1, text: str | None = None, progress: bool = True) -> pd.DataFrame:
    """Perplexity of ``model`` on held-out windows with every token's attention going through ``method``.

    Parameters
    ----------
    tokenizer_or_ids : a tokenizer (windows from ``text``, default the Austen validation split, via
        :func:`h1bkv_lite.data.token_batches`), or token ids ``long [n, T]`` (or 1D, cut into ``seq_len`` windows).
    method : ``"fp16"`` or a cache factory (module docstring).
    seq_len, n_windows : window length and count (used when windows are cut here).
    batch_size : windows per forward.

    Returns
    -------
    DataFrame with one row per window: ``method, window, tokens`` (predicted tokens, ``T - 1``),
    ``nll`` (sum, nats), ``ppl``. Overall perplexity: ``exp(df.nll.sum() / df.tokens.sum())``.
    """
    factory = _factory(method)
    ids = _windows(tokenizer_or_ids, seq_len, n_windows, text).to(_device(model))
    rows = []
    starts = range(0, ids.shape[0], batch_size)
    for start in tqdm(starts, desc=f"perplexity {method_name(method)}", disable=not progress):
        batch = ids[start : start + batch_size]
        cache = factory(model.config, compressed_prefill=True)
        logits = model(input_ids=batch, past_key_values=cache, use_cache=True).logits
        nll = torch.nn.functional.cross_entropy(
            logits[:, :-1].float().transpose(1, 2), batch[:, 1:], reduction="none").sum(-1)
        for i, value in enumerate(nll.tolist()):
            tokens = batch.shape[1] - 1
            rows.append({"method": method_name(method), "window": start + i, "tokens": tokens, "nll": value,
                         "ppl": math.exp(value / tokens)})
    return pd.DataFrame(rows)


@torch.no_grad()
def decode_perplexity(model, tokenizer_or_ids, method="fp16", *, prefill: int = 1024, decode: int = 128,
                      n_windows: int = 1, batch_size: int = 1, text: str | None = None,
                      prefill_chunk: int | None = None, progress: bool = True) -> pd.DataFrame:
    """Long-context decode perplexity: prefill ``prefill`` tokens into the cache, then score ``decode`` tokens
    decoded one at a time through it.

    Each window holds ``prefill + decode + 1`` tokens ``x_0 .. x_{P+D}``. One forward writes ``x_0 .. x_{P-1}``
    into ``factory(model.config)`` (exact attention within the prompt; an H1B cache then compresses everything
    but its window and sinks); then decode step ``t = 0 .. D-1`` feeds ``x_{P+t}`` alone and scores the
    model's prediction of ``x_{P+t+1}``. So every scored token comes from a decode step -- never from the
    prefill forward -- and with H1B every key older than ``window`` (and not a sink) is seen only through its
    sketch, and every such value 4-bit. With ``"fp16"`` this equals the model's ordinary next-token loss at
    those positions (tested).

    Parameters
    ----------
    tokenizer_or_ids : a tokenizer (windows from ``text``, default the held-out Austen book, via
        :func:`h1bkv_lite.data.token_batches`), or token ids ``long [n, T]`` with ``T >= prefill + decode + 1``
        (the first ``prefill + decode + 1`` tokens of each row are used), or 1D ids (cut into windows).
    method : ``"fp16"`` or a cache factory (module docstring), e.g. ``ft.method()`` of a finetune.
    prefill, decode : tokens written by the prefill (>= 1) and tokens scored by decode steps (>= 1).
    n_windows : windows (when cut here).  batch_size : windows decoded together.
    prefill_chunk : None (the prefill in one forward) or >= 1: the prefill in forwards of at most that many tokens
        (chunked prefill, as ``generate(..., prefill_chunk_size=...)``). An exact cache gives the same loss either
        way; with an H1B cache the later chunks see the earlier ones compressed (:mod:`h1bkv_lite.chunk_attention`).

    Returns
    -------
    DataFrame, one row per window: ``method, window, prefill, tokens`` (= ``decode``), ``nll`` (sum, nats),
    ``ppl``. Overall: ``exp(df.nll.sum() / df.tokens.sum())``.

    Raises ValueError for non-positive sizes or windows shorter than ``prefill + decode + 1``.
    """
    from ._validation import check_int  # noqa: PLC0415

    check_int("prefill", prefill, low=1)
    check_int("decode", decode, low=1)
    check_int("n_windows", n_windows, low=1)
    check_int("batch_size", batch_size, low=1)
    if prefill_chunk is not None:
        check_int("prefill_chunk", prefill_chunk, low=1)
    factory = _factory(method)
    length = prefill + decode + 1
    ids = _windows(tokenizer_or_ids, length, n_windows, text)
    if ids.shape[1] < length:
        raise ValueError(f"windows of {ids.shape[1]} tokens are too short for prefill={prefill} + decode={decode} + 1")
    ids = ids[:, :length].to(_device(model))
    rows = []
    starts = range(0, ids.shape[0], batch_size)
    for start in tqdm(starts, desc=f"decode ppl {method_name(method)}", disable=not progress):
        batch = ids[start : start + batch_size]
        cache = factory(model.config)
        for chunk in batch[:, :prefill].split(prefill_chunk or prefill, dim=1):
            model(input_ids=chunk, past_key_values=cache, use_cache=True, logits_to_keep=1)
        nll = torch.zeros(batch.shape[0], dtype=torch.float32, device=batch.device)
        for t in range(prefill, prefill + decode):
            logits = model(input_ids=batch[:, t : t + 1], past_key_values=cache, use_cache=True).logits[:, -1]
            nll += torch.nn.functional.cross_entropy(logits.float(), batch[:, t + 1], reduction="none")
        for i, value in enumerate(nll.tolist()):  # one read-back per batch
            rows.append({"method": method_name(method), "window": start + i, "prefill": prefill, "tokens": decode,
                         "prefill_chunk": prefill_chunk, "nll": value, "ppl": math.exp(value / decode)})
    return pd.DataFrame(rows)


def _encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


_INTRO = ("There is an important piece of information hidden inside a lot of irrelevant text. "
          "Find it and memorize it. I will quiz you about it.\n")
_NEEDLE = " The pass key is {key}. Remember it. {key} is the pass key. "
_QUESTION = "\nWhat is the pass key? The pass key is"


def passkey_prompt(tokenizer, filler_ids: list[int], length: int, depth: float, key: int) -> tuple[list[int], list[int]]:
    """(context ids, question ids), ``length`` tokens in all, the needle after ``depth`` of the filler."""
    intro, needle, question = _encode(tokenizer, _INTRO), _encode(tokenizer, _NEEDLE.format(key=key)), _encode(
        tokenizer, _QUESTION)
    budget = length - len(intro) - len(needle) - len(question)
    if budget < 0 or budget > len(filler_ids):
        raise ValueError(f"length={length} leaves {budget} filler tokens; {len(filler_ids)} available")
    cut = round(depth * budget)
    context = intro + filler_ids[:cut] + needle + filler_ids[cut:budget]
    return context, question


def _greedy_continue(model, cache, ids: torch.Tensor, n_new: int) -> torch.Tensor:
    """Feed ``ids [1, T]`` into ``cache`` (one forward) and decode ``n_new`` argmax tokens -> ``long [n_new]``."""
    out = []
    logits = model(input_ids=ids, past_key_values=cache, use_cache=True).logits[:, -1]
    for step in range(n_new):
        out.append(logits.argmax(-1, keepdim=True))
        if step + 1 < n_new:
            logits = model(input_ids=out[-1], past_key_values=cache, use_cache=True).logits[:, -1]
    return torch.cat(out, dim=-1)[0]


@torch.no_grad()
def passkey_retrieval(model, tokenizer, method="fp16", lengths=(256, 512), depths=(0.0, 0.5, 1.0), *,
                      trials: int = 1, n_new: int = 10, seed: int = 0, text: str | None = None,
                      progress: bool = True) -> pd.DataFrame:
    """Passkey retrieval: a random 5-digit key hidden in corpus filler at each ``(length, depth)``.

    The context (intro, filler, needle) is prefilled into ``factory(config)``; then the question is fed
    and ``n_new`` tokens are decoded greedily. ``text``: filler source (default: Austen validation
    split); trial ``t`` uses filler starting ``t * max(lengths)`` tokens in.

    Returns a DataFrame: ``method, length, depth, trial, passkey, answer, correct, exact``: ``correct`` -- the
    key appears anywhere in the answer; ``exact`` -- the answer's first run of digits is the key (exact match;
    the stricter accuracy, ``df.exact.mean()``).
    """
    factory = _factory(method)
    if text is None:
        from .data import load_corpus  # noqa: PLC0415

        text = load_corpus()
    need = max(lengths) * trials
    filler = _encode(tokenizer, text[: 8 * need + 4096])
    if len(filler) < need:
        raise ValueError(f"filler text has {len(filler)} tokens, need {need}")
    rng = random.Random(seed)
    device = _device(model)
    grid = [(n, d, t) for n in lengths for d in depths for t in range(trials)]
    rows = []
    for length, depth, trial in tqdm(grid, desc=f"passkey {method_name(method)}", disable=not progress):
        key = rng.randint(10000, 99999)
        context, question = passkey_prompt(tokenizer, filler[trial * max(lengths):], length, depth, key)
        cache = factory(model.config)
        model(input_ids=torch.tensor([context], device=device), past_key_values=cache, use_cache=True)
        answer = tokenizer.decode(_greedy_continue(model, cache, torch.tensor([question], device=device), n_new))
        rows.append({"method": method_name(method), "length": length, "depth": depth, "trial": trial,
                     "passkey": key, "answer": answer, "correct": str(key) in answer,
                     "exact": _first_number(answer) == str(key)})
    return pd.DataFrame(rows)


def long_context(model, tokenizer, method="fp16", *, prefill: int = 1024, decode: int = 128, windows: int = 4,
                 passkey_lengths=(1024, 2048), passkey_depths=(0.1, 0.5, 0.9), passkey_trials: int = 2,
                 text: str | None = None, progress: bool = True) -> dict:
    """The long-context numbers of issue 11 for one ``method``, as ``scripts/finetune.py`` reports them.

    ``decode_ppl``: :func:`decode_perplexity` over ``windows`` held-out windows (``prefill`` tokens prefilled,
    ``decode`` scored one decode step at a time), pooled over all scored tokens, with ``decode_prefill`` and
    ``decode_tokens`` (tokens scored); skipped when any of the three is 0. ``passkey``: ``{str(length): exact-match
    accuracy}`` of :func:`passkey_retrieval` (8 new tokens; ``trials`` keys per length and depth) with
    ``passkey_trials`` (prompts in all); skipped for no lengths. ``text``: the held-out text of both (default:
    the Austen validation book); ``tokenizer`` may also be token ids for the decode perplexity alone, as there.
    Returns a dict of those keys.
    """
    out: dict = {}
    if windows and prefill and decode:
        df = decode_perplexity(model, tokenizer, method, prefill=prefill, decode=decode, n_windows=windows,
                               text=text, progress=progress)
        out.update(decode_ppl=math.exp(df.nll.sum() / df.tokens.sum()), decode_prefill=prefill,
                   decode_tokens=int(df.tokens.sum()))
    if passkey_lengths:
        df = passkey_retrieval(model, tokenizer, method, lengths=tuple(passkey_lengths),
                               depths=tuple(passkey_depths), trials=passkey_trials, n_new=8, text=text,
                               progress=progress)
        out["passkey"] = {str(length): float(g.exact.mean()) for length, g in df.groupby("length")}
        out["passkey_trials"] = int(len(df))
    return out


def _first_number(text: str) -> str | None:
    match = re.search(r"\d+", text)
    return None if match is None else match.group(0)


@torch.no_grad()
def generation_agreement(model, tokenizer, method, prompts, n_new: int = 32, *,
                         progress: bool = True) -> pd.DataFrame:
    """How often ``method`` decodes the same greedy tokens as exact (FP16) attention.

    Greedy = plain argmax, no logits processors (no EOS stop, no repetition penalty), after an exact
    prefill of the prompt. ``prompts``: strings (tokenized with ``tokenizer``) or token id lists / 1D
    tensors. Per prompt: ``match_rate`` -- fraction of the ``n_new`` free-running greedy tokens equal to
    FP16's, position by position; ``first_mismatch`` -- index of the first difference (``n_new`` if none);
    ``teacher_forced_match`` -- fraction of steps where the method's next token equals FP16's when it is
    fed FP16's continuation one decode step at a time.

    Returns a DataFrame: ``method, prompt, prompt_tokens, n_new, match_rate, first_mismatch, teacher_forced_match``.
    """
    factory = _factory(method)
    device = _device(model)
    rows = []
    for i, prompt in enumerate(tqdm(prompts, desc=f"agreement {method_name(method)}", disable=not progress)):
        ids = _encode(tokenizer, prompt) if isinstance(prompt, str) else list(map(int, prompt))
        ids = torch.tensor([ids], device=device)
        ref = _greedy_continue(model, FP16Cache(model.config), ids, n_new)
        same = _greedy_continue(model, factory(model.config), ids, n_new) == ref
        cache = factory(model.config)
        forced = [model(input_ids=ids, past_key_values=cache, use_cache=True).logits[0, -1].argmax()]
        for token in ref[:-1]:
            forced.append(model(input_ids=token.view(1, 1), past_key_values=cache, use_cache=True).logits[0, -1].argmax())
        rows.append({
            "method": method_name(method), "prompt": i, "prompt_tokens": ids.shape[1], "n_new": n_new,
            "match_rate": same.float().mean().item(),
            "first_mismatch": int((~same).nonzero()[0, 0]) if not bool(same.all()) else n_new,
            "teacher_forced_match": (torch.stack(forced) == ref).float().mean().item(),
        })
    return pd.DataFrame(rows)
