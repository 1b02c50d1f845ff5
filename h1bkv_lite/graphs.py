"""Decoding whose decode step is one captured CUDA graph, over a static-capacity :class:`H1BCache`: inside
``model.generate`` (:func:`decode_with_cuda_graphs`) or on its own, greedy (:func:`generate_greedy`).

An eager ``generate()`` decode step is bound by the host: Python issues a few hundred launches per step
(transformers' layers, the cache's append and attention kernels) while the GPU waits (``benchmarks/README.md``:
11 ms of GPU work in a 41 ms step at 8k tokens). A CUDA graph records one step's launches once and replays them
with a single call. That needs every launch of a step to have the same arguments every time, which
``H1BCache(max_cache_len=...)`` provides (fixed buffers, the fill level on the device), and the step's inputs in
fixed tensors: the token ids and their positions here. transformers' ``StaticCache`` with a compiled forward
is the fp16 counterpart.

    cache = H1BCache(model.config, bits=128, max_cache_len=prompt_len + new_tokens)
    ids = generate_greedy(model, input_ids, cache, max_new_tokens=new_tokens)   # [B, prompt_len + new]

The step replayed is ``model(input_ids=ids, position_ids=pos, past_key_values=cache)`` followed by the argmax
that feeds the next step; the host only counts (``H1BCache.replayed``). Without CUDA (or with
``cuda_graph=False``) the same step runs eagerly, which is how the CPU tests check its tokens.

Through ``model.generate`` itself, with its generation config, logits processors, sampling and stopping criteria,
:func:`decode_with_cuda_graphs` is the decoding loop transformers runs in place of its own (``custom_generate``); the
model's forward of each decode step is the replayed graph, everything after the logits runs as in ``generate()``:

    out = model.generate(input_ids, past_key_values=cache, max_new_tokens=128, custom_generate=decode_with_cuda_graphs)
"""
from __future__ import annotations

import time

import torch

from ._device import model_device
from ._validation import check_bool, check_int, check_tensor
from .cache import H1BCache

__all__ = ["decode_with_cuda_graphs", "generate_greedy"]

EOS_CHECK_EVERY = 16
"""Decode steps between checks for end of sequence (each check is one device sync)."""


def generate_greedy(model, input_ids: torch.Tensor, cache: H1BCache, max_new_tokens: int, *,
                    cuda_graph: bool | None = None, eos_token_id: int | list[int] | None = None,
                    pad_token_id: int | None = None, warmup_steps: int = 2, prefill_chunk_size: int | None = None,
                    timings: dict | None = None) -> torch.Tensor:
    """Greedy decoding (the argmax token each step, as ``model.generate(do_sample=False)``), every decode step
    after ``warmup_steps`` eager ones replayed from one CUDA graph.

    Parameters
    ----------
    model : a transformers causal LM whose attention goes through the cache (built from ``model.config``).
    input_ids : int64 ``[B, T]`` on the model's device; every row a whole prompt (no padding, no mask).
    cache : a fresh ``H1BCache(model.config, ..., max_cache_len=L)`` with ``L >= T + max_new_tokens`` (and, with an
        exact window or sinks, ``T >= window + sink``). On the CPU the cache needs ``backend="triton"`` under
        ``TRITON_INTERPRET=1`` (set before importing the package) and ``cuda_graph=False``.
    max_new_tokens : >= 1.
    cuda_graph : None (default: on CUDA), True or False (every step eager: the same arithmetic, for CPU tests
        and for comparing).
    eos_token_id : an id or a list of ids (e.g. Llama 3's ``generation_config.eos_token_id``): stop once every
        row has produced one (checked every ``EOS_CHECK_EVERY`` steps, so up to that many steps more run); tokens
        after a row's end are ``pad_token_id`` (default: the first end id).
    warmup_steps : eager decode steps before the capture (Triton compiles, allocator and cuBLAS state), >= 1.
    prefill_chunk_size : None (default: the prompt in one forward) or >= 1: the prompt in forwards of at most that
        many tokens (chunked prefill, as transformers' ``generate(..., prefill_chunk_size=...)``): the model's
        activations scale with the chunk, not the prompt, and later chunks attend to the earlier ones through the
        cache (:meth:`H1BLayer._attend_chunk`: their compressed tokens from the sketches).
    timings : None, or a dict that receives ``prefill_s`` (the prompt's forward, to its logits) and ``decode_s``
        (every decode step after it, capture included), seconds of wall time; asking for them costs two device
        syncs (after the prefill and at the end), for benchmarks.

    Returns
    -------
    int64 ``[B, T + n]``: the prompt and ``n <= max_new_tokens`` new tokens.

    Raises
    ------
    TypeError / ValueError for a cache that is not a fresh static-capacity ``H1BCache``, too small a capacity, or
    bad arguments; RuntimeError naming the step if the capture fails (``cuda_graph=False`` runs eagerly).
    """
    B, T, ends = _check(model, input_ids, cache, max_new_tokens, cuda_graph, eos_token_id, pad_token_id,
                        warmup_steps, prefill_chunk_size)
    if cuda_graph is None:
        cuda_graph = input_ids.device.type == "cuda"
    clock = _Clock(timings, input_ids.device)
    with torch.no_grad():
        for chunk in input_ids.split(prefill_chunk_size or T, dim=1):
            logits = model(input_ids=chunk, past_key_values=cache, use_cache=True, logits_to_keep=1).logits[:, -1]
        clock.lap("prefill_s")
        ids = logits.argmax(-1, keepdim=True)  # the step's input token ...
        pos = torch.full((B, 1), T, dtype=torch.long, device=input_ids.device)  # ... and its position
        new = [ids.clone()]
        run = _Runner(_Step(model, cache, ids, pos), cache, cuda_graph, warmup_steps)
        for i in range(1, max_new_tokens):
            if ends and i % EOS_CHECK_EVERY == 0 and _all_ended(new, ends):
                break
            run()
            new.append(ids.clone())
        clock.lap("decode_s")
    out = torch.cat(new, dim=1)
    if ends:
        out = _pad_after_end(out, ends, ends[0] if pad_token_id is None else pad_token_id)
    return torch.cat([input_ids, out], dim=1)


def decode_with_cuda_graphs(model, input_ids: torch.Tensor, logits_processor, stopping_criteria, generation_config,
                            cuda_graph: bool | None = None, warmup_steps: int = 2, **model_kwargs):
    """The decoding loop of ``model.generate(..., custom_generate=decode_with_cuda_graphs)`` over a static-capacity
    :class:`H1BCache`: the model's forward of every decode step after ``warmup_steps`` eager ones is one replayed CUDA
    graph; the rest of each step runs as in transformers' own loop (``GenerationMixin._sample``).

    ``generate()`` prepares the inputs, the generation config, the logits processors and the stopping criteria, then
    calls this function with them (transformers' ``custom_generate`` callables). Per prompt: the prompt's forward (in
    chunks of ``prefill_chunk_size`` when the generation config sets it, as ``generate`` does), then per new token: the
    logits processors, greedy (``do_sample=False``) or sampled (``do_sample=True``: softmax and ``torch.multinomial``
    of the processed scores) token choice, finished rows padded with the pad token, the stopping criteria. Whether to
    go on is read by the host one step late: the next forward is queued first, then the host waits for this step's
    stop flag only (pinned memory, an event), so the GPU never idles for the host's decision. When every row has
    ended before ``max_length`` (an end-of-sequence token or any other stopping criterion) that queued forward has
    fed the last chosen token to the cache: the cache then holds every token of the output (``generate`` leaves that
    last one out); at ``max_length``, known on the host, nothing extra runs. Greedy tokens equal ``generate()``'s
    with the same cache and no ``custom_generate``: the same kernels and arithmetic.

    What transformers does not hand to ``custom_generate`` callables (transformers 5.x): a ``streamer`` (the prompt
    reaches it, nothing after, and ``end()`` is never called: do not pass one, a ``TextIteratorStreamer`` consumer
    would wait forever), the ``tokenizer`` that ``stop_strings`` need (pass ``stopping_criteria=[StopStringCriteria(
    tokenizer, [...])]`` instead), ``assistant_model`` and ``synced_gpus``.

    Parameters (passed by ``generate``; ``cuda_graph`` and ``warmup_steps`` may be given to ``generate`` too)
    ----------
    model : a transformers causal LM whose attention goes through the cache (built from ``model.config``).
    input_ids : int64 ``[B, T]``: whole prompts (no padding: an ``attention_mask`` with a zero is refused).
    logits_processor, stopping_criteria, generation_config : ``generate``'s, prepared.
    cuda_graph : None (default: on CUDA), True, or False (every step eager: the same arithmetic, for CPU tests).
    warmup_steps : eager decode steps before the capture (Triton compiles, allocator and cuBLAS state), >= 1.
    model_kwargs : ``past_key_values`` -- a fresh ``H1BCache(model.config, ..., max_cache_len=L)`` with ``L >=
        generation_config.max_length - 1`` (the prompt plus ``max_new_tokens`` minus one: the last new token is not
        fed back) -- and ``attention_mask``, ``use_cache`` (True); ``position_ids`` / ``cache_position`` that
        ``generate`` derives (0 .. T - 1). Other model inputs are refused: the captured step passes only the token
        and its position.

    Returns
    -------
    int64 ``[B, T + n]``, or a ``GenerateDecoderOnlyOutput`` (``sequences``, ``scores`` / ``logits`` if asked,
    ``past_key_values``) when ``return_dict_in_generate=True``, as ``generate``.

    Raises
    ------
    TypeError / ValueError, before anything runs, for a cache that is not a fresh static-capacity ``H1BCache``, too
    small a capacity, padding, positions other than 0 .. T - 1, a generation mode other than greedy or sampling
    (beams, contrastive search, prompt lookup, constraints...), ``output_attentions`` / ``output_hidden_states``,
    ``use_cache=False``, other model inputs, or bad ``cuda_graph`` / ``warmup_steps``; RuntimeError if the capture
    fails (``cuda_graph=False`` runs eagerly). The loop is transformers' sampling loop (its ``_sample``), with the
    model's decode forward replayed.
    """
    cache = model_kwargs.pop("past_key_values", None)
    mask = model_kwargs.pop("attention_mask", None)
    B, T = input_ids.shape
    _check_generate_call(cache, mask, generation_config, model_kwargs, T)
    chunk = getattr(generation_config, "prefill_chunk_size", None)
    _check(model, input_ids, cache, generation_config.max_length - T, cuda_graph, None, None, warmup_steps, chunk,
           held_at_most=generation_config.max_length - 1)
    if cuda_graph is None:
        cuda_graph = input_ids.device.type == "cuda"
    pad = getattr(generation_config, "_pad_token_tensor", None)
    pad_ends = pad is not None and any(hasattr(c, "eos_token_id") for c in stopping_criteria)
    want_scores = generation_config.return_dict_in_generate and generation_config.output_scores
    want_logits = generation_config.return_dict_in_generate and generation_config.output_logits
    scores_seen, logits_seen = [], []
    unfinished = torch.ones(B, dtype=torch.bool, device=input_ids.device)
    with torch.no_grad():
        for part in input_ids.split(chunk or T, dim=1):
            logits = model(input_ids=part, past_key_values=cache, use_cache=True, logits_to_keep=1).logits[:, -1]
        token = torch.zeros(B, 1, dtype=torch.long, device=input_ids.device)
        pos = torch.full((B, 1), T, dtype=torch.long, device=input_ids.device)
        run = _Runner(_Step(model, cache, token, pos, choose=False), cache, cuda_graph, warmup_steps)
        going_on = _LateFlag(input_ids.device)
        while True:
            raw = logits.to(copy=True, dtype=torch.float32)  # a replay rewrites the graph's logits
            scores = logits_processor(input_ids, raw)
            if generation_config.do_sample:
                chosen = torch.multinomial(torch.softmax(scores, dim=-1), num_samples=1).squeeze(1)
            else:
                chosen = scores.argmax(dim=-1)
            if pad_ends:  # rows that had ended get the pad token
                chosen = torch.where(unfinished, chosen, pad.to(chosen.device))
            input_ids = torch.cat([input_ids, chosen[:, None]], dim=-1)
            scores_seen += [scores] if want_scores else []
            logits_seen += [raw] if want_logits else []
            unfinished &= ~stopping_criteria(input_ids, tuple(scores_seen) if want_scores else None)  # as _sample
            if input_ids.shape[1] >= generation_config.max_length:  # known on the host: no sync
                break
            token.copy_(chosen[:, None])
            going_on.record(unfinished.any())
            run()  # the next forward is queued before the host waits for this step's stop flag
            if not going_on.read():  # every row ended: that forward took the last token, which it is
                break
            logits = run.step.logits
    if not generation_config.return_dict_in_generate:
        return input_ids
    from transformers.generation.utils import GenerateDecoderOnlyOutput  # noqa: PLC0415 -- only when asked

    return GenerateDecoderOnlyOutput(sequences=input_ids, scores=tuple(scores_seen) if want_scores else None,
                                     logits=tuple(logits_seen) if want_logits else None, past_key_values=cache)


class _LateFlag:
    """A device bool read by the host without waiting for later work: :meth:`record` copies it to pinned host memory
    behind the work queued so far, :meth:`read` waits for that copy only (on CPU: a plain read)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.host = torch.zeros(1, dtype=torch.bool, pin_memory=self.cuda)
        self.event = torch.cuda.Event() if self.cuda else None

    def record(self, flag: torch.Tensor) -> None:
        self.host.copy_(flag.view(1), non_blocking=self.cuda)
        if self.cuda:
            self.event.record()

    def read(self) -> bool:
        if self.cuda:
            self.event.synchronize()
        return bool(self.host[0])


def _check_generate_call(cache, mask, generation_config, model_kwargs, prompt_len: int) -> None:
    """What :func:`decode_with_cuda_graphs` refuses, besides :func:`_check`'s cache checks; before anything runs."""
    if not isinstance(cache, H1BCache):
        raise TypeError("custom_generate=decode_with_cuda_graphs needs past_key_values=H1BCache(model.config, ..., "
                        f"max_cache_len=prompt + max_new_tokens) passed to generate(), got {type(cache).__name__}")
    from transformers.generation.configuration_utils import GenerationMode  # noqa: PLC0415 -- transformers only here

    mode = generation_config.get_generation_mode()
    if mode not in (GenerationMode.GREEDY_SEARCH, GenerationMode.SAMPLE):
        raise ValueError(f"decode_with_cuda_graphs decodes greedily or by sampling (num_beams=1, no assistant, no "
                         f"contrastive search, no constraints); the generation config asks for {mode.value}: use "
                         "generate() without custom_generate for it")
    recorded = [k for k in ("output_attentions", "output_hidden_states")
                if getattr(generation_config, k, False) or model_kwargs.pop(k, None)]
    if recorded:
        raise ValueError(f"decode_with_cuda_graphs returns sequences, scores and logits; {' and '.join(recorded)} "
                         "cannot be recorded from the captured step: drop them")
    if not model_kwargs.pop("use_cache", True):
        raise ValueError("decode_with_cuda_graphs needs use_cache=True (the decode steps read the cache)")
    if mask is not None and not bool(mask.bool().all()):  # once, before anything runs
        raise ValueError("decode_with_cuda_graphs serves prompts without padding (a static-capacity H1BCache has no "
                         "padding mask); got an attention_mask with zeros: pass prompts of one length")
    model_kwargs.pop("logits_to_keep", None)  # generate()'s own: a step needs one logit row
    for name in ("position_ids", "cache_position"):  # generate() makes them; an unpadded prompt implies 0 .. T - 1
        given = model_kwargs.pop(name, None)
        if given is not None and not bool((given == torch.arange(prompt_len, device=given.device)).all()):
            raise ValueError(f"decode_with_cuda_graphs places the prompt at positions 0 .. {prompt_len - 1}; got "
                             f"other {name}: use generate() without custom_generate for them")
    others = sorted(k for k, v in model_kwargs.items() if v is not None and v is not False)
    if others:
        raise ValueError(f"decode_with_cuda_graphs passes the model only the token ids and their positions; got model "
                         f"inputs {others}: use generate() without custom_generate for them")


class _Step:
    """One decode step on fixed tensors: ``logits`` of ``ids`` at ``pos``, then (``choose``) ``ids`` <- their argmax;
    ``pos`` += 1. Under a graph, ``logits`` is the graph's output tensor, rewritten by every replay."""

    def __init__(self, model, cache, ids, pos, choose: bool = True):
        self.model, self.cache, self.ids, self.pos, self.choose = model, cache, ids, pos, choose
        self.logits = None

    def __call__(self) -> None:
        self.logits = self.model(input_ids=self.ids, position_ids=self.pos, past_key_values=self.cache,
                                 use_cache=True, logits_to_keep=1).logits[:, -1]
        if self.choose:
            self.ids.copy_(self.logits.argmax(-1, keepdim=True))
        self.pos.add_(1)

    def capture(self) -> torch.cuda.CUDAGraph:
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                self()
        except Exception as err:  # noqa: BLE001 -- re-raised with what to do
            raise RuntimeError(
                "capturing the decode step as a CUDA graph failed (something in the model's forward synchronises "
                "with the host or changes its launches from step to step); pass cuda_graph=False to decode "
                "eagerly") from err
        return graph


class _Runner:
    """Runs a :class:`_Step` once per call: eagerly (``cuda_graph`` False); else the first ``warmup_steps`` calls
    eagerly on a side stream (as ``torch.cuda.graph`` asks), the next one captured (which advances the cache's host
    counts once) and replayed, and every later one replayed, the cache's host counts advanced by
    ``H1BCache.replayed``."""

    def __init__(self, step: _Step, cache: H1BCache, cuda_graph: bool, warmup_steps: int):
        self.step, self.cache, self.cuda_graph, self.warmup_steps = step, cache, cuda_graph, warmup_steps
        self.side = torch.cuda.Stream() if cuda_graph else None  # warm-up off the capture's stream
        self.graph, self.calls = None, 0

    def __call__(self) -> None:
        self.calls += 1
        if not self.cuda_graph:
            self.step()
        elif self.calls <= self.warmup_steps:
            with _on(self.side):
                self.step()
        elif self.graph is None:
            self.graph = self.step.capture()  # records this step (the host counts advance once); the replay runs it
            self.graph.replay()
        else:
            self.graph.replay()
            self.cache.replayed(1)  # what the replay's update() calls would have counted (while the GPU runs)


class _Clock:
    """Wall-time laps into ``timings`` (a device sync each), or nothing when ``timings`` is None."""

    def __init__(self, timings: dict | None, device: torch.device):
        self.timings, self.device, self.t = timings, device, time.perf_counter()

    def lap(self, name: str) -> None:
        if self.timings is None:
            return
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        self.timings[name] = now - self.t
        self.t = now


class _on:
    """``with _on(stream)``: run on ``stream``, then make the current stream wait for it."""

    def __init__(self, stream: torch.cuda.Stream):
        self.stream = stream

    def __enter__(self):
        self.stream.wait_stream(torch.cuda.current_stream())
        self._ctx = torch.cuda.stream(self.stream)
        self._ctx.__enter__()

    def __exit__(self, *exc):
        self._ctx.__exit__(*exc)
        torch.cuda.current_stream().wait_stream(self.stream)
        return False


def _is_end(tokens: torch.Tensor, ends: list[int]) -> torch.Tensor:
    return torch.isin(tokens, torch.tensor(ends, device=tokens.device))


def _all_ended(new: list[torch.Tensor], ends: list[int]) -> bool:
    return bool(_is_end(torch.cat(new, dim=1), ends).any(dim=1).all())  # one sync, every EOS_CHECK_EVERY


def _pad_after_end(out: torch.Tensor, ends: list[int], pad_token_id: int) -> torch.Tensor:
    """Tokens after each row's first end id replaced by ``pad_token_id``; rows trimmed to the last end."""
    is_end = _is_end(out, ends)
    ended = is_end.cumsum(dim=1)
    after = (ended - is_end.long()) > 0  # strictly after the first end
    out = out.masked_fill(after, pad_token_id)
    if bool(ended[:, -1].gt(0).all()):
        last = int((ended == 0).sum(dim=1).max()) + 1  # the longest row up to and with its eos
        out = out[:, :last]
    return out


def _check(model, input_ids, cache, max_new_tokens, cuda_graph, eos_token_id, pad_token_id, warmup_steps,
           prefill_chunk_size=None, held_at_most=None):
    """The checks both loops share; ``held_at_most``: the tokens the cache must have room for (default: the prompt
    and ``max_new_tokens``)."""
    if not isinstance(cache, H1BCache):
        raise TypeError(f"cache must be an H1BCache, got {type(cache).__name__}")
    if cache.static_capacity is None:
        raise ValueError("cache must have a static capacity: H1BCache(model.config, ..., max_cache_len=prompt + new)")
    if cache.get_seq_length() != 0:
        raise ValueError(f"cache must be fresh (it holds {cache.get_seq_length()} tokens): build a new H1BCache for "
                         "each call")
    check_tensor("input_ids", input_ids, ndim=2, dtypes=(torch.long,), finite=False)
    check_int("max_new_tokens", max_new_tokens, low=1)
    check_int("warmup_steps", warmup_steps, low=1)
    if prefill_chunk_size is not None:
        check_int("prefill_chunk_size", prefill_chunk_size, low=1)
    if cuda_graph is not None:
        check_bool("cuda_graph", cuda_graph)
        if cuda_graph and input_ids.device.type != "cuda":
            raise ValueError(f"cuda_graph=True needs CUDA tensors, got input_ids on {input_ids.device}")
    if pad_token_id is not None:
        check_int("pad_token_id", pad_token_id, low=0)
    ends = _end_ids(eos_token_id)
    layers = getattr(model.config, "num_hidden_layers", len(cache.layers))
    if len(cache.layers) != layers:
        raise ValueError(f"cache has {len(cache.layers)} layers, the model {layers}: build it with "
                         "H1BCache(model.config, ...)")
    B, T = input_ids.shape
    if T < cache.window + cache.sink:
        raise ValueError(f"the prompt ({T} tokens) must fill the cache's exact window and sinks "
                         f"(window={cache.window} + sink={cache.sink})")
    if prefill_chunk_size is not None and min(T, prefill_chunk_size) < cache.sink:
        raise ValueError(f"prefill_chunk_size ({prefill_chunk_size}) must hold the cache's sinks (sink={cache.sink}): "
                         "the first chunk is the prompt the sinks come from")
    if held_at_most is None and T + max_new_tokens > cache.static_capacity:
        raise ValueError(f"the prompt ({T} tokens) and max_new_tokens ({max_new_tokens}) exceed the cache's "
                         f"max_cache_len={cache.static_capacity}")
    if held_at_most is not None and held_at_most > cache.static_capacity:
        raise ValueError(f"the prompt ({T} tokens) and max_new_tokens ({max_new_tokens}) need max_cache_len >= "
                         f"{held_at_most} (the last new token is not fed back), got max_cache_len="
                         f"{cache.static_capacity}")
    device = model_device(model)
    if input_ids.device != device:
        raise ValueError(f"input_ids are on {input_ids.device}, the model on {device}")
    return B, T, ends


def _end_ids(eos_token_id) -> list[int] | None:
    """``eos_token_id`` as a list of ids (None stays None); TypeError for anything but ids >= 0 (no bools)."""
    if eos_token_id is None:
        return None
    ids = [eos_token_id] if not isinstance(eos_token_id, (list, tuple)) else list(eos_token_id)
    if not ids or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
        raise TypeError(f"eos_token_id must be a token id >= 0 or a non-empty list of them, got {eos_token_id!r}")
    return ids
