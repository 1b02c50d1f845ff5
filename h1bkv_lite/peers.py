"""The established implementations beside ours: transformers' ``QuantizedCache`` (quanto and hqq backends).

Behind the optional extra ``pip install h1bkv-lite[peers]`` (optimum-quanto, hqq). Nothing here imports a
peer package at module import: :func:`peer_status` says which peers can run here and, for the others, why
not (not installed, too old, or -- kvpress -- no release that runs beside transformers >= 5.3).

A peer is one :class:`QuantizedPeer` (backend, bits, transformers' defaults otherwise: groups of 64
elements along the flattened cache tensor -- with ``axis=0`` one group is 64 consecutive elements of one
token's head vector, i.e. per-token groups for keys *and* values --, a residual of up to 127 newest tokens
kept in the model's dtype; when it would reach 128, *every* token is dequantized and re-quantized together).

How it is measured, on the same windows and byte axis as :mod:`h1bkv_lite.analysis.quality`:

- **Perplexity** (:func:`stepwise_perplexity`): each window is decoded token by token through a fresh
  cache (teacher forced), so every query sees what the cache holds at that step. One forward over the window
  would not do: ``QuantizedCache`` returns a prompt's exact states to its own forward and quantizes them
  only for later steps. Our caches' compressed-prefill perplexity equals this token-by-token decoding up
  to float rounding (tested in ``tests/test_eval.py``), so the two are the same semantics.
- **Bytes** (:func:`cache_nbytes`): summed over the tensors the cache holds after the window -- quantized
  codes, their scales and zero-points, and the residual's exact K/V --, with every floating-point tensor
  counted at 2 bytes per element (``float_bytes=2``: the 16-bit accounting of :mod:`h1bkv_lite.memory`,
  whatever the model's dtype) and integer codes at their own size. :func:`predicted_nbytes` is the same count
  from the layout (tested equal to the measurement).
"""
from __future__ import annotations

import dataclasses
import importlib
import importlib.metadata
import math
import time
from collections.abc import Iterable, Sequence

import pandas as pd
import torch

from . import memory
from ._device import model_device
from ._validation import check_choice, check_int

__all__ = ["BACKENDS", "KVPRESS_REASON", "PEER_LABELS", "QuantizedPeer", "build_peers", "cache_nbytes",
           "compare_with_ours", "peer_status", "predicted_nbytes", "residual_tokens", "run_peers",
           "stepwise_perplexity", "unavailable_reason"]

BACKENDS = ("quanto", "hqq")
# the distribution and import names of each backend, and the oldest release transformers accepts
_PACKAGES = {"quanto": ("optimum-quanto", "optimum.quanto", "0.2.5"), "hqq": ("hqq", "hqq.core.quantize", None)}
PEER_LABELS = {"hf-quanto": "QuantizedCache (quanto)", "hf-hqq": "QuantizedCache (hqq)"}
INSTALL_HINT = "pip install 'h1bkv-lite[peers]', or pip install -e '.[peers]' in a checkout"

KVPRESS_REASON = (
    "kvpress (NVIDIA) has no release that runs beside transformers >= 5.3 (pinned here: 5.23), so no kvpress "
    "press is run: "
    "0.5.3-0.5.5 require transformers < 5.3; 0.5.0-0.5.2 set no upper bound on transformers but require "
    "pandas < 3 (pinned here: 3.1) and, installed anyway, fail at the first forward under transformers 5.23 "
    "(KeyError 'cache_position' in kvpress's BasePress.forward_hook: transformers no longer passes "
    "cache_position to attention modules); 0.4.x and older require transformers < 5"
)


def _version_tuple(v: str) -> tuple[int, ...]:
    out = []
    for part in v.split(".")[:3]:
        digits = "".join(c for c in part if c.isdigit())
        out.append(int(digits) if digits else 0)
    return tuple(out)


def unavailable_reason(backend: str) -> str | None:
    """None when ``backend`` ("quanto", "hqq" or "kvpress") can run here, else one sentence saying why not."""
    if backend == "kvpress":
        return KVPRESS_REASON
    check_choice("backend", backend, (*BACKENDS, "kvpress"))
    dist, module, oldest = _PACKAGES[backend]
    try:
        version = importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return f"{dist} is not installed ({INSTALL_HINT})"
    if oldest is not None and _version_tuple(version) < _version_tuple(oldest):
        return f"{dist} {version} is older than {oldest}, the oldest transformers' QuantizedCache accepts"
    try:
        importlib.import_module(module)
    except Exception as exc:  # noqa: BLE001 -- a broken install is reported, not raised
        return f"{dist} {version} is installed but `import {module}` fails: {type(exc).__name__}: {exc}"
    return None


def peer_status() -> pd.DataFrame:
    """One row per peer library: ``peer, package, version, available, reason`` (version empty when not
    installed, reason empty when available)."""
    rows = []
    for backend in (*BACKENDS, "kvpress"):
        dist = _PACKAGES[backend][0] if backend in _PACKAGES else "kvpress"
        try:
            version = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            version = None
        reason = unavailable_reason(backend)
        rows.append({"peer": "kvpress presses" if backend == "kvpress" else f"QuantizedCache ({backend})",
                     "package": dist, "version": version or "", "available": reason is None, "reason": reason or ""})
    return pd.DataFrame(rows)


@dataclasses.dataclass(frozen=True)
class QuantizedPeer:
    """transformers' ``QuantizedCache(backend, config, nbits, ...)``; the other fields are its defaults."""

    backend: str
    nbits: int
    q_group_size: int = 64
    residual_length: int = 128
    axis_key: int = 0
    axis_value: int = 0

    def __post_init__(self) -> None:
        check_choice("backend", self.backend, BACKENDS)
        check_choice("nbits", self.nbits, (2, 4))
        check_int("q_group_size", self.q_group_size, low=1)
        check_int("residual_length", self.residual_length, low=1)

    @property
    def name(self) -> str:
        """e.g. ``"HF quanto-4"``."""
        return f"HF {self.backend}-{self.nbits}"

    @property
    def family(self) -> str:
        return f"hf-{self.backend}"

    @property
    def params(self) -> dict:
        return {"family": self.family, **dataclasses.asdict(self)}

    def cache(self, config):
        """A fresh ``transformers.QuantizedCache`` for ``config``. RuntimeError (with the reason) if the
        backend cannot run here."""
        reason = unavailable_reason(self.backend)
        if reason is not None:
            raise RuntimeError(f"{self.name}: {reason}")
        from transformers import QuantizedCache  # noqa: PLC0415

        return QuantizedCache(backend=self.backend, config=config, nbits=self.nbits, axis_key=self.axis_key,
                              axis_value=self.axis_value, q_group_size=self.q_group_size,
                              residual_length=self.residual_length)


def build_peers(backends: Iterable[str] = BACKENDS, nbits: Iterable[int] = (2, 4)) -> list[QuantizedPeer]:
    """Every (backend, bits) pair, installed or not (filter with :func:`unavailable_reason`)."""
    return [QuantizedPeer(b, n) for b in backends for n in nbits]


# ------------------------------------------------------------------------------------------------ bytes
def _tensor_bytes(t, float_bytes: int | None) -> int:
    """Bytes of a tensor; a wrapper subclass (quanto's QBitsTensor, PackedTensor) by its inner tensors."""
    if type(t) is not torch.Tensor and hasattr(t, "__tensor_flatten__"):
        names, _ = t.__tensor_flatten__()
        return sum(_tensor_bytes(getattr(t, n), float_bytes) for n in names)
    size = float_bytes if (float_bytes is not None and t.is_floating_point()) else t.element_size()
    return t.numel() * size


def _state_bytes(state, float_bytes: int | None) -> int:
    if state is None:
        return 0
    if isinstance(state, torch.Tensor):
        return _tensor_bytes(state, float_bytes)
    if isinstance(state, dict):  # hqq's meta: scale, zero (tensors) and plain settings
        return sum(_state_bytes(v, float_bytes) for v in state.values())
    if isinstance(state, (tuple, list)):
        return sum(_state_bytes(v, float_bytes) for v in state)
    return 0


def cache_nbytes(cache, float_bytes: int | None = 2) -> dict[str, int]:
    """Bytes a ``QuantizedCache`` holds, from its tensors: ``{"quantized": codes + scales + zeros,
    "residual": exact K and V}``. ``float_bytes=2``: floating-point tensors at 2 bytes per element (16-bit
    accounting); None: at their own dtype's size."""
    if not hasattr(cache, "layers"):
        raise TypeError(f"cache must be a transformers Cache with .layers, got {type(cache).__name__}")
    quantized = residual = 0
    for layer in cache.layers:
        quantized += _state_bytes(getattr(layer, "_quantized_keys", None), float_bytes)
        quantized += _state_bytes(getattr(layer, "_quantized_values", None), float_bytes)
        if getattr(layer, "is_initialized", False):
            residual += _tensor_bytes(layer.keys, float_bytes) + _tensor_bytes(layer.values, float_bytes)
    return {"quantized": quantized, "residual": residual}


def residual_tokens(seq_len: int, residual_length: int, prefill: int = 1) -> int:
    """Tokens in ``QuantizedCache``'s exact residual after a prefill of ``prefill`` tokens (quantized at once)
    and ``seq_len - prefill`` one-token decode steps: the residual is flushed when it would reach
    ``residual_length``, so it holds ``(seq_len - prefill) mod residual_length``."""
    check_int("seq_len", seq_len, low=1)
    check_int("prefill", prefill, low=1)
    if prefill > seq_len:
        raise ValueError(f"prefill ({prefill}) must be <= seq_len ({seq_len})")
    return (seq_len - prefill) % check_int("residual_length", residual_length, low=1)


def predicted_nbytes(config, seq_len: int, peer: QuantizedPeer, *, batch: int = 1, prefill: int = 1,
                     float_bytes: int = 2) -> dict[str, int]:
    """What :func:`cache_nbytes` measures, from the layout: per layer and for K and V, the quantized tokens'
    ``numel * nbits / 8`` code bytes (packed per backend) plus a scale and a zero per group of
    ``q_group_size`` elements, and the residual's ``numel`` exact elements (:func:`residual_tokens`)."""
    if not isinstance(peer, QuantizedPeer):
        raise TypeError(f"peer must be a QuantizedPeer, got {type(peer).__name__}")
    shape = memory.model_shape(config)
    if any(shape.window(i) is not None for i in range(shape.num_layers)):
        raise ValueError("sliding-window layers are not modelled here (QuantizedCache keeps every token)")
    check_int("batch", batch, low=1)
    r = residual_tokens(seq_len, peer.residual_length, prefill)
    per_token = batch * shape.num_kv_heads * shape.head_dim  # elements of one token's K (or V) in one layer
    numel = (seq_len - r) * per_token
    if numel % peer.q_group_size:
        raise ValueError(f"q_group_size={peer.q_group_size} must divide the quantized tensor's {numel} elements")
    groups = numel // peer.q_group_size
    if peer.backend == "quanto":  # [groups, group_size] packed along the groups
        codes = math.ceil(groups * peer.nbits / 8) * peer.q_group_size
    else:  # hqq: [group_size, groups] packed along the group
        codes = math.ceil(peer.q_group_size * peer.nbits / 8) * groups
    quantized = 2 * shape.num_layers * (codes + 2 * groups * float_bytes)
    return {"quantized": quantized, "residual": 2 * shape.num_layers * r * per_token * float_bytes}


# ------------------------------------------------------------------------------------------------ running
@torch.no_grad()
def stepwise_perplexity(model, ids: torch.Tensor, make_cache) -> tuple[pd.DataFrame, list]:
    """Perplexity of each window of ``ids [n, T]`` decoded token by token (teacher forced) through
    ``make_cache(config)``; all ``T`` tokens are fed, so each cache ends holding the whole window.

    Returns one row per window (``window, tokens, nll, ppl``) and the final caches.
    """
    if ids.dim() != 2 or ids.shape[1] < 2:
        raise ValueError(f"ids must be [n_windows, T >= 2], got shape {tuple(ids.shape)}")
    device = model_device(model)
    rows, caches = [], []
    for w in range(ids.shape[0]):
        x = ids[w : w + 1].to(device)
        cache = make_cache(model.config)
        nll = 0.0
        for t in range(x.shape[1]):
            logits = model(input_ids=x[:, t : t + 1], past_key_values=cache, use_cache=True).logits
            if t + 1 < x.shape[1]:
                nll += float(torch.nn.functional.cross_entropy(logits[:, -1].float(), x[:, t + 1], reduction="sum"))
        tokens = x.shape[1] - 1
        rows.append({"window": w, "tokens": tokens, "nll": nll, "ppl": math.exp(nll / tokens)})
        caches.append(cache)
    return pd.DataFrame(rows), caches


def run_peers(model, ids: torch.Tensor, peers: Sequence[QuantizedPeer], *, log=print) -> pd.DataFrame:
    """Perplexity and bytes per token of each peer on ``ids [n, T]`` (the windows of the sweep).

    One row per peer: its fields, ``seq_len``, ``bytes_per_token`` (measured from the first window's cache
    at 16-bit accounting, :func:`cache_nbytes`), ``predicted_bytes_per_token``, ``bits_per_element``,
    ``bytes_per_token_8k`` (predicted), ``tokens, nll, ppl`` (over all windows) and ``runtime_s``.
    Peers that cannot run here raise RuntimeError: filter them first with :func:`unavailable_reason`.
    """
    shape = memory.model_shape(model.config)
    seq_len = ids.shape[1]
    elems = 2 * shape.num_layers * shape.num_kv_heads * shape.head_dim
    rows = []
    for peer in peers:
        start = time.perf_counter()
        df, caches = stepwise_perplexity(model, ids, peer.cache)
        measured = sum(cache_nbytes(caches[0]).values()) / seq_len
        predicted = sum(predicted_nbytes(model.config, seq_len, peer).values()) / seq_len
        tokens, nll = int(df.tokens.sum()), float(df.nll.sum())
        rows.append({"name": peer.name, **peer.params, "seq_len": seq_len, "bytes_per_token": measured,
                     "predicted_bytes_per_token": predicted, "bits_per_element": 8 * measured / elems,
                     "bytes_per_token_8k": sum(predicted_nbytes(model.config, 8192, peer).values()) / 8192,
                     "tokens": tokens, "nll": nll, "ppl": math.exp(nll / tokens),
                     "runtime_s": time.perf_counter() - start})
        if log is not None:
            log(f"{peer.name:16s} {measured:9.0f} B/token  ppl {rows[-1]['ppl']:9.2f}  ({rows[-1]['runtime_s']:.1f} s)")
    return pd.DataFrame(rows)


def compare_with_ours(results: pd.DataFrame, peer_results: pd.DataFrame) -> pd.DataFrame:
    """Each peer beside our KIVI re-implementation at the same bits (the closest method of ours):
    ``peer, ours, peer_ppl, ours_ppl, ppl_ratio`` (peer / ours), ``peer_bytes, ours_bytes, bytes_ratio``
    and both perplexities over FP16's (``results`` must hold the FP16 row)."""
    for df, cols in ((results, ("name", "family", "bits", "ppl", "bytes_per_token")),
                     (peer_results, ("name", "nbits", "ppl", "bytes_per_token"))):
        for c in cols:
            if c not in df.columns:
                raise KeyError(f"no column {c!r} (columns: {list(df.columns)})")
    fp16 = results[results.family == "fp16"]
    if fp16.empty:
        raise ValueError("results have no FP16 row")
    fp16_ppl = float(fp16.ppl.iloc[0])
    rows = []
    for p in peer_results.itertuples():
        ours = results[(results.family == "kivi") & (results.bits == p.nbits)]
        if ours.empty:
            continue
        o = ours.iloc[0]
        rows.append({"peer": p.name, "ours": o["name"], "peer_ppl": p.ppl, "ours_ppl": float(o.ppl),
                     "ppl_ratio": p.ppl / float(o.ppl), "peer_bytes": p.bytes_per_token,
                     "ours_bytes": float(o.bytes_per_token), "bytes_ratio": p.bytes_per_token / float(o.bytes_per_token),
                     "peer_vs_fp16": p.ppl / fp16_ppl, "ours_vs_fp16": float(o.ppl) / fp16_ppl})
    return pd.DataFrame(rows, columns=["peer", "ours", "peer_ppl", "ours_ppl", "ppl_ratio", "peer_bytes",
                                       "ours_bytes", "bytes_ratio", "peer_vs_fp16", "ours_vs_fp16"])
