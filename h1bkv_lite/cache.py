"""H1BCache: a transformers ``Cache`` that keeps past keys only as SimHash sketches and values only low-bit.

Use it like any cache::

    cache = H1BCache(model.config, bits=256, score="hamming")
    out = model.generate(**inputs, past_key_values=cache)
    cache.nbytes()  # == memory.kv_cache_bytes(config, seq_len, batch, cache.scheme, exact_bytes=dtype size).total

What is stored, per layer, kv head and token (``B`` batch, ``Hkv`` kv heads, ``N`` tokens, ``D`` head_dim):
``key_codes`` uint8 ``[B, Hkv, N, bits // 8]``; ``key_norms`` fp16 ``[B, Hkv, N]`` ("cos"/"asym" only);
values as :class:`~h1bkv_lite.quant.QuantizedTensor` parts (packed uint8, fp16 scale/zero per group); the
newest ``window`` tokens and the first ``sink`` tokens exact, in the model dtype. Nothing else of a past key
survives: decode attention reads the codes through :func:`~h1bkv_lite.attention.sketched_logits`.

How attention reaches the cache (the hook). A transformers attention module calls
``past_key_values.update(k, v, layer_idx)`` and then the function registered for
``config._attn_implementation``. ``update`` of a :class:`HookedLayer` stores the new tokens, hands itself to
:func:`cache_attention` (registered as ``"h1bkv"`` in ``AttentionInterface``) and switches the config it
was built with to ``"h1bkv"``; :func:`cache_attention` switches it straight back and lets the layer attend
over its own stored data. So the user's implementation is restored after every layer, nothing needs
enabling, and other caches keep using sdpa/eager. Requirement: the cache must get the model's own config
object (``model.config``); if the model attends without the hook, the next ``update`` raises.

Prefill. By default (``compressed_prefill=False``) the prompt (the first forward, whatever its length, and
any later multi-token forward) attends exactly, like a deployment that compresses while writing the cache:
the first forward of a layer goes through torch SDPA over its own k/v (:func:`prompt_attention`, no ``T x T``
matrix without padding), and only then are tokens older than the window compressed, in place, into the
layer's preallocated :class:`~h1bkv_lite.storage.TokenStore` (nothing of the prompt's full-precision K/V
survives beyond the window and sinks). A later multi-token forward (a chunk of a chunked prefill) attends to its
own tokens exactly and causally and to what the layer holds as stored (compressed tokens through their sketches),
through flash attention in parts merged by log-sum-exp (:mod:`h1bkv_lite.chunk_attention`; "cos", padded batches
and sliding-window layers take the general masked path). Decode steps always see compressed keys. With
``compressed_prefill=True`` every query of a multi-token forward already sees what it would see had the
tokens been decoded one by one (``h1b_attention`` semantics, window relative to each query) -- the mode
:mod:`h1bkv_lite.eval` uses for perplexity.

Temperature ("hamming"). ``temperature=None`` calibrates ``T`` per layer, query head and sequence on the
first (prefill) forward's exact q/k with :func:`~h1bkv_lite.attention.sampled_temperature` (padding
excluded; a bounded sample of query rows and keys, equal to
:func:`~h1bkv_lite.attention.calibrate_temperature` on prompts of up to 512 tokens), so a padded batch
behaves like its sequences run alone. A float, a ``[Hq]`` tensor (per head)
or a ``[L, Hq]`` / ``[L, 1]`` tensor (per layer) fixes it instead, e.g. from :func:`fit_temperature`.

Sliding-window layers (Mistral, Gemma 2/3's local layers, Qwen2 / Phi-3 with a window): which layers slide,
and by how much, is decided from the config as transformers' ``DynamicCache(config=...)`` decides
(:func:`memory.layer_windows`), and must equal the ``sliding_window`` the model passes to attention
(NotImplementedError otherwise). Such a layer attends within its window (query at position ``p`` sees keys
``> p - W``; applied by the layer itself, whatever the mask) and, once a forward has attended, keeps only its
``W - 1`` newest tokens, as ``DynamicSlidingWindowLayer`` does: tokens older than that are dropped from the
sinks, the compressed store (a start offset, no copy) and the exact window. Every layer, local or global, uses
the cache's format. ``crop`` mirrors ``DynamicSlidingWindowLayer`` (see :meth:`HookedLayer.crop`).

Sketch seeds: one :class:`~h1bkv_lite.sketch.SimHashSketcher` per layer, ``seed + layer_idx``, shared by
the kv heads of that layer (the paper draws one R per head; sharing R across heads keeps every head's
estimate unbiased and lets the decode kernel read one R per layer). ``projection=`` (float ``[L, D, bits]``)
replaces the seeded draws by given matrices, e.g. ones learned by :mod:`h1bkv_lite.finetune`
(``learn_projection=True``); like R they are model constants, not billed per token by :meth:`nbytes`.

Key centering (``key_mean=``, beyond the paper; default off). Keys of a head share a large common component
(a per-channel mean, strongest in RoPE's low-frequency channels), so their sketches agree on many bits whatever
the query. With ``mu`` a per-layer, per-kv-head, per-channel mean (float ``[L, Hkv, D]``, from
:func:`fit_key_mean` on calibration text), a compressed key is stored as the sketch (and, for "cos"/"asym",
the fp16 norm) of ``k - mu``, and its logit is

    ``logit(q, k) = est(q . (k - mu) * scaling) + q . mu * scaling``

where ``est`` is the score mode's estimate ("hamming": ``(1 - 2 h / b) / T`` with ``h`` between the sketches of
``q`` and ``k - mu``; "cos": ``|q| |k - mu| cos(pi h / b) * scaling``; "asym": QJL's unbiased estimate) and
the second term is exact (``mu`` is known). Since ``q . k = q . mu + q . (k - mu)``, this is the exact logit
whenever ``est`` is exact, and the exact keys of the window and sinks stay on the same scale. The term
``q . mu * scaling`` is one constant per query row, so it cancels in the softmax *only* when it is added to
every key of the row, compressed and exact alike -- which this rule does (exact keys carry it inside
``q . k``); adding it to compressed keys only, or dropping it when some keys are exact, would bias the
softmax between the two groups. Centering changes the estimate, not the target: only ``q . (k - mu)`` is
approximated. "hamming" temperatures are calibrated on the centered keys (``std(1 - 2h/b) / std(q . (k - mu)
* scaling)``). The Triton decode kernel serves centered caches by the same rule shifted: it scores compressed
keys by ``est`` alone and the exact keys by ``q . (k - mu) * scaling`` (it is handed the window and sinks centered),
every logit of the row lowered by the same ``q . mu * scaling``, which the softmax ignores. ``mu`` (``L * Hkv *
D`` floats) is a model constant, not billed per token.
"""
from __future__ import annotations

import functools
import math
import threading
import types
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from transformers import AttentionInterface, PretrainedConfig
from transformers.cache_utils import Cache, CacheLayerMixin
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

from . import chunk_attention, memory
from ._device import model_device, to_device
from ._validation import check_bool, check_choice, check_int, check_sketch_bits
from .attention import sampled_temperature_unchecked, sketched_logits_unchecked
from .quant import VALUE_BITS, QuantizedTensor, quantize_values_unchecked
from .sketch import SimHashSketcher, pack_bits
from .storage import TokenStore

__all__ = ["ATTENTION_NAME", "H1BCache", "HookedCache", "HookedLayer", "cache_attention", "fit_key_mean",
           "fit_temperature"]

ATTENTION_NAME = "h1bkv"
"""Name of :func:`cache_attention` in transformers' ``AttentionInterface`` (and of its mask function)."""

BACKENDS = ("auto", "torch", "triton")


# ------------------------------------------------------------------------------------------------ the hook
class _Handoff(threading.local):
    """The layer whose ``update`` just ran, waiting for its attention call (one per thread)."""

    layer = None  # HookedLayer
    key = None  # the key tensor update() returned: identifies the attention call that belongs to it
    restore = None  # (config, implementation to put back) or None


_HANDOFF = _Handoff()


def _check_nothing_pending(layer: "HookedLayer") -> None:
    """Before ``layer`` stores new tokens: a layer still waiting for its attention call means either that the
    model attended without the hook (a later layer of the same cache is updating: raise), or that an earlier
    forward stopped between ``update`` and attention (an exception, an interrupted compile...): then the
    switched implementation is restored and nothing is raised, so one failure does not poison later calls."""
    stale = _HANDOFF.layer
    if stale is None:
        return
    _release()
    if stale.owner is layer.owner and stale.layer_idx < layer.layer_idx:
        raise RuntimeError(
            f"the attention of cache layer {stale.layer_idx} did not go through h1bkv_lite's attention hook, so "
            "the model attended to uncompressed inputs; build the cache with the model's own config object "
            "(e.g. H1BCache(model.config, ...)), or set model.config._attn_implementation = "
            f"{ATTENTION_NAME!r}"
        )


def _hand_over(layer: "HookedLayer", key: torch.Tensor) -> None:
    config, plain = layer.config, layer.plain_attn_switch  # plain: the config's __dict__, else None
    current = plain[_INTERNAL_ATTN] if plain is not None else config._attn_implementation
    _HANDOFF.layer, _HANDOFF.key = layer, key
    _HANDOFF.restore = None if current == ATTENTION_NAME else (config, current, plain)
    if current != ATTENTION_NAME:
        _set_attn_implementation(config, ATTENTION_NAME, plain)


def _release() -> None:
    if _HANDOFF.restore is not None:
        _set_attn_implementation(*_HANDOFF.restore)
    _HANDOFF.layer = _HANDOFF.key = _HANDOFF.restore = None


_INTERNAL_ATTN = "_attn_implementation_internal"


def plain_attn_switch(config) -> dict | None:
    """``config.__dict__`` where the config's attention implementation can be read and written there as its
    ``_attn_implementation_internal`` entry (else None): its type keeps transformers' own ``_attn_implementation``
    property, that property reads the attribute (transformers 5.x), the config has no sub-configs (whose
    implementations the setter would set too) and holds the attribute in its ``__dict__``. Decided once per cache
    layer (the config's own attribute reads go through a ``__getattribute__`` that costs microseconds each)."""
    namespace = getattr(config, "__dict__", None)
    plain = (_plain_attn_property(type(config)) and not getattr(config, "sub_configs", None)
             and isinstance(namespace, dict) and _INTERNAL_ATTN in namespace)
    return namespace if plain else None


def _set_attn_implementation(config, name, plain: dict | None) -> None:
    """``config._attn_implementation = name``, twice per layer and step. transformers' setter (a property that
    walks the sub-configs through validated setattr) costs tens of microseconds, and so does reading the property
    through the config's ``__getattribute__``; where :func:`plain_attn_switch` gave the config's ``__dict__``
    (``plain``), the attribute is written there directly, the same effect. Otherwise the setter runs."""
    if plain is not None:
        plain[_INTERNAL_ATTN] = name
    else:
        config._attn_implementation = name


@functools.lru_cache(maxsize=None)
def _plain_attn_property(config_type: type) -> bool:
    """Whether ``config_type`` keeps transformers' own ``_attn_implementation`` property and that property
    reads ``_attn_implementation_internal`` (checked once on a probe instance)."""
    prop = getattr(config_type, "_attn_implementation", None)
    if prop is not getattr(PretrainedConfig, "_attn_implementation", None) or not isinstance(prop, property):
        return False
    probe = PretrainedConfig()
    object.__setattr__(probe, "_attn_implementation_internal", "_h1bkv_probe")
    return prop.fget(probe) == "_h1bkv_probe"


@torch.compiler.disable
def cache_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """The ``"h1bkv"`` attention function: the pending :class:`HookedLayer` attends, else plain sdpa.

    query ``[B, Hq, Tq, D]``; returns ``(out [B, Tq, Hq, D], None)`` like transformers' attention functions.
    """
    if _HANDOFF.layer is None or _HANDOFF.key is not key:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    layer = _HANDOFF.layer
    refused = _refused_feature(dropout, kwargs)
    if refused:
        _release()
        raise NotImplementedError(f"h1bkv_lite caches do not support {refused}; they would silently change the "
                                  "model's attention. Use a model without it, or DynamicCache")
    window = kwargs.get("sliding_window")
    if window is not None and window != layer.sliding_window:
        _release()
        built = "a full-attention layer" if layer.sliding_window is None else f"window {layer.sliding_window}"
        raise NotImplementedError(
            f"the model attends layer {layer.layer_idx} with sliding_window={window}, but the cache built it as {built} "
            "(from config.layer_types / config.sliding_window, as transformers' DynamicCache decides); build the "
            "cache with the model's own config"
        )
    out = layer.attend(query, attention_mask, scaling)
    return out.transpose(1, 2).contiguous(), None


def _refused_feature(dropout, kwargs) -> str | None:
    """The attention feature a model passed that the caches' attention does not implement, or None."""
    if kwargs.get("s_aux") is not None:
        return "per-head attention sinks (s_aux, e.g. gpt-oss)"
    if kwargs.get("softcap") is not None:
        return "attention logit softcapping (softcap, e.g. Gemma 2)"
    if dropout:
        return f"attention dropout (dropout={dropout}; the model is in training mode)"
    return None


AttentionInterface.register(ATTENTION_NAME, cache_attention)
AttentionMaskInterface.register(ATTENTION_NAME, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])


def allowed_mask(attention_mask, batch: int, q_len: int, kv_len: int, device) -> torch.Tensor:
    """transformers' mask (None, bool/float 4D ``[B, 1, Tq, Nkv]``, or 2D padding ``[B, Nkv]``) as bool
    ``[B, 1, Tq, Nkv]`` (True = may attend), always causal with the queries at the last ``Tq`` positions."""
    qpos = torch.arange(kv_len - q_len, kv_len, device=device).unsqueeze(-1)
    allowed = (torch.arange(kv_len, device=device) <= qpos).expand(batch, 1, q_len, kv_len)
    if attention_mask is None:
        return allowed
    if attention_mask.dim() == 2:
        keep = attention_mask.bool()[:, None, None, -kv_len:]
    elif attention_mask.dim() == 4:
        keep = attention_mask[..., -kv_len:]
        if keep.dtype != torch.bool:
            keep = keep > torch.finfo(keep.dtype).min / 2  # additive masks: 0 keep, dtype min drop
    else:
        raise ValueError(f"attention_mask must be 2D or 4D, got shape {tuple(attention_mask.shape)}")
    if keep.shape[-1] != kv_len:
        raise ValueError(f"attention_mask covers {keep.shape[-1]} keys, the cache holds {kv_len}")
    return allowed & keep.to(device)


def masked_softmax(logits: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """float32 softmax over the last dim where ``allowed``; rows with nothing allowed give zeros."""
    probs = torch.softmax(logits.float().masked_fill(~allowed, float("-inf")), dim=-1)
    return probs.masked_fill(~allowed.any(-1, keepdim=True), 0.0)


def exact_logits(q: torch.Tensor, k: torch.Tensor, scaling: float) -> torch.Tensor:
    """float32 ``q @ k^T * scaling``: q ``[B, Hq, Tq, D]``, k ``[B, Hkv, N, D]`` (GQA) -> ``[B, Hq, Tq, N]``."""
    group = q.shape[1] // k.shape[1]
    return q.float() @ k.float().repeat_interleave(group, dim=1).transpose(-1, -2) * scaling


def weighted_values(probs: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """float32 ``probs [B, Hq, Tq, N] @ v [B, Hkv, N, D]`` (GQA) -> ``[B, Hq, Tq, D]``."""
    group = probs.shape[1] // v.shape[1]
    return probs @ v.float().repeat_interleave(group, dim=1)


def prompt_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attention_mask, scaling: float,
                     sliding_window: int | None = None) -> torch.Tensor:
    """Exact causal attention of a prompt over itself (``Tq == Tk``) through torch SDPA: no ``T x T`` matrix
    is built when ``attention_mask`` is None and no sliding window binds (flash / memory-efficient kernels on CUDA).

    q ``[B, Hq, T, D]``, k and v ``[B, Hkv, T, D]`` (GQA: ``Hq`` a multiple of ``Hkv``); ``attention_mask``:
    None (causal), transformers' 4D mask (bool, True = attend, or additive) or a 2D padding mask;
    ``sliding_window``: each query also sees only keys less than that many positions back (itself included,
    transformers' ``sliding_window_overlay``), whatever the mask says.
    Returns ``[B, Hq, T, D]`` in q's dtype. Query rows that may attend to nothing (left padding) give 0.
    """
    B, Hq, T, _ = q.shape
    group = Hq // k.shape[1]
    if attention_mask is None and (sliding_window is None or T <= sliding_window):
        if group > 1 and not _SDPA_HAS_GQA:
            k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        gqa = {"enable_gqa": True} if group > 1 and _SDPA_HAS_GQA else {}
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scaling, **gqa)
    allowed = allowed_mask(attention_mask, B, T, T, q.device)  # [B, 1, T, T]: the mask is that size already
    if sliding_window is not None:
        allowed = allowed & window_band(T, T, 0, sliding_window, q.device)
    if group > 1:
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=scaling)
    return out.masked_fill(~allowed.any(-1, keepdim=True), 0.0)


def window_band(q_len: int, kv_len: int, kv_offset: int, sliding_window: int, device) -> torch.Tensor:
    """bool ``[Tq, Nkv]``: key column ``j`` (position ``kv_offset + j``) is within the sliding window of query
    ``i`` (position ``kv_offset + kv_len - q_len + i``): fewer than ``sliding_window`` positions back, as
    transformers' ``sliding_window_overlay``. Built from host ints: no sync."""
    qpos = torch.arange(kv_len - q_len, kv_len, device=device).unsqueeze(-1)
    return torch.arange(kv_len, device=device) > qpos - sliding_window


def valid_tokens(attention_mask, batch: int, n: int, device) -> torch.Tensor | None:
    """bool ``[B, n]``, False for padding among the last ``n`` tokens, or None when there is no mask.

    A 4D mask with at least ``n`` query rows is read on its diagonal (each token as its own query): padding
    is hidden even from itself, and unlike the last query row the diagonal is not cut by a sliding window.
    Otherwise (2D masks, shorter 4D ones) the last query row is read."""
    if attention_mask is None:
        return None
    if attention_mask.dim() == 4 and attention_mask.shape[-2] >= n:
        diag = attention_mask[:, :, -n:, -n:].diagonal(dim1=-2, dim2=-1)[:, 0]  # [B or 1, n]
        keep = diag if diag.dtype == torch.bool else diag > torch.finfo(diag.dtype).min / 2
        return keep.expand(batch, n).to(device)
    return allowed_mask(attention_mask[..., -1:, :] if attention_mask.dim() == 4 else attention_mask,
                        batch, 1, n, device)[:, 0, 0, -n:]


_SDPA_HAS_GQA = tuple(int(x) for x in torch.__version__.split(".")[:2]) >= (2, 5)


# ------------------------------------------------------------------------------------------------ layers
class HookedLayer(CacheLayerMixin):
    """A cache layer that stores tokens its own way and attends over them itself (through the hook).

    Subclasses implement ``_init_storage(k)``, ``_append(k, v)``, ``_attend(q, allowed, scaling)``,
    ``nbytes_by_part()`` and list their batch-major tensors in ``_batch_fields`` (dict fields:
    every value is batch-major). ``allowed`` is bool ``[B, 1, Tq, N]`` over the tokens the layer holds
    (``N = n_seen - window_start``, the positions ``window_start .. n_seen - 1``).

    Sliding-window layers. ``sliding_window`` (None: full attention) is decided from the config as
    transformers' ``DynamicCache`` decides (:func:`memory.layer_windows`: ``config.layer_types``, else
    ``config.sliding_window``), and checked against the ``sliding_window`` the model passes to attention.
    A sliding layer applies the window itself (query at position ``p`` sees keys ``> p - W``, whatever
    the mask) and, once a forward has attended, drops every token older than the newest ``W - 1``
    (``_drop_front``; ``window_start`` counts the positions gone), as ``DynamicSlidingWindowLayer`` does;
    ``get_mask_sizes`` reports the held positions. ``activate_past_recording()`` (transformers' assisted
    decoding) postpones the drop to the next :meth:`crop`. Lengths are host ints: no sync.
    """

    is_compileable = False
    is_croppable = True
    _batch_fields: tuple[str, ...] = ()

    def __init__(self, config, layer_idx: int, *, compressed_prefill: bool = False):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.compressed_prefill = compressed_prefill
        self.sliding_window: int | None = memory.layer_windows(config)[layer_idx]
        self.is_sliding = self.sliding_window is not None
        self.record_past = False  # transformers' assisted decoding: keep dropped tokens until crop()
        self.window_start = 0  # positions before it were dropped by the sliding window
        self.n_seen = 0  # tokens written so far (positions 0 .. n_seen - 1)
        self.exact_call = False  # the current forward attends exactly (a prompt, compressed_prefill=False)
        self._call_kv = None  # (k, v) of the current call until it has attended
        self.owner = None  # the HookedCache holding this layer (set by it)
        self.plain_attn_switch = plain_attn_switch(config)  # how the hook switches the attention (_hand_over)

    def __repr__(self):
        return f"{type(self).__name__}(layer={self.layer_idx}, tokens={self.n_seen})"

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.batch, self.kv_heads, _, self.head_dim = key_states.shape
        self._init_storage(key_states)
        self.is_initialized = True

    @torch.compiler.disable
    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Store the new tokens ``[B, Hkv, Tq, D]``; returns them unchanged (they identify the attention call)."""
        _check_nothing_pending(self)
        self._check_room(key_states.shape[2])
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        elif key_states.shape[:2] != (self.batch, self.kv_heads) or key_states.dtype != self.dtype:
            raise ValueError(
                f"layer {self.layer_idx} holds batch {self.batch}, {self.kv_heads} kv heads, {self.dtype}; got "
                f"keys of shape {tuple(key_states.shape)} and dtype {key_states.dtype}"
            )
        q_len = key_states.shape[2]
        # the prompt (the first call, whatever its length) and later multi-token calls attend exactly
        self.exact_call = not self.compressed_prefill and (q_len > 1 or self.n_seen == 0)
        self.n_seen += q_len
        self._call_kv = (key_states, value_states)
        self._append(key_states, value_states)
        _hand_over(self, key_states)
        return key_states, value_states

    def _check_room(self, q_len: int) -> None:
        """Raise ValueError before storing ``q_len`` more tokens if the layer has no room (a subclass's limit)."""

    def attend(self, query: torch.Tensor, attention_mask=None, scaling: float | None = None) -> torch.Tensor:
        """Attention of ``query [B, Hq, Tq, D]`` (the newest ``Tq`` tokens) over everything stored.

        ``attention_mask``: transformers' mask for this call (None = causal). Returns ``[B, Hq, Tq, D]``
        in the query's dtype. Three paths: the prompt of an empty layer (``_attend_prompt``: exact, no
        ``T x T`` matrix), a fast path a subclass may offer (``_attend_fast``, e.g. a decode kernel), and the
        general one (``_attend`` with a bool mask ``[B, 1, Tq, N]``).
        """
        if _HANDOFF.layer is self:
            _release()
        B, _, q_len, D = query.shape
        scaling = D**-0.5 if scaling is None else scaling
        try:
            if self.exact_call and self.n_seen == q_len and self._call_kv is not None:
                out = self._attend_prompt(query, *self._call_kv, attention_mask, scaling)
            else:
                out = self._attend_fast(query, attention_mask, scaling)
                if out is None:
                    out = self._attend(query, self._allowed(attention_mask, B, q_len, query.device), scaling)
            self._slide()
            return out.to(query.dtype)
        finally:
            self._call_kv = None  # the call's full-precision k/v are not kept

    @property
    def _offset(self) -> int:
        """Position of the first column of the attention mask (the oldest token held)."""
        return self.window_start

    def _allowed(self, attention_mask, batch: int, q_len: int, device) -> torch.Tensor:
        """bool ``[B, 1, Tq, N]`` over the held columns: transformers' mask (or causal), and the sliding window."""
        kv_len = self.n_seen - self._offset
        allowed = allowed_mask(attention_mask, batch, q_len, kv_len, device)
        if self.sliding_window is not None:
            allowed = allowed & window_band(q_len, kv_len, self._offset, self.sliding_window, device)
        return allowed

    def _attend_prompt(self, q, k, v, attention_mask, scaling: float) -> torch.Tensor:
        """The first call of an empty layer, exact (``k, v``: the call's tokens). Default: the general path."""
        return self._attend(q, self._allowed(attention_mask, q.shape[0], q.shape[2], q.device), scaling)

    def activate_past_recording(self) -> None:
        """transformers' hook for caches that must roll back (assisted decoding): a sliding layer keeps the
        tokens older than its window until the next :meth:`crop`, like ``DynamicSlidingWindowLayer``."""
        self.record_past = True

    def _slide(self, force: bool = False) -> None:
        """At rest (after a forward attended, or after a crop): drop what the sliding window no longer sees."""
        if self.sliding_window is None or (self.record_past and not force) or not self.is_initialized:
            return
        keep_from = self.n_seen - self.sliding_window + 1
        if keep_from > self.window_start:
            self._drop_front(keep_from)

    def _drop_front(self, keep_from: int) -> None:
        """Drop the tokens at positions ``< keep_from`` (a subclass may keep a few more, e.g. whole groups)
        and advance ``window_start`` to the first position still held."""
        raise NotImplementedError(f"{type(self).__name__} cannot drop tokens that left a sliding window")

    def _attend_fast(self, q, attention_mask, scaling: float) -> torch.Tensor | None:
        """A subclass's fast path for this call, or None (then the general path runs)."""
        return None

    def get_seq_length(self) -> int:
        return self.n_seen

    # The cache-layer API across the supported transformers range (see README, "Supported versions"): 5.0-5.4
    # pass ``cache_position`` (a tensor of the new positions) to get_mask_sizes and 5.5+ the query length;
    # up to 5.13 the unbounded-length query is get_max_cache_shape, from 5.14 get_max_length.
    def get_mask_sizes(self, query_length) -> tuple[int, int]:
        """(kv length, kv offset) of the next forward's mask: the held positions plus the new ones."""
        if isinstance(query_length, torch.Tensor):  # cache_position (transformers < 5.5)
            query_length = query_length.shape[0]
        return self.n_seen - self._offset + query_length, self._offset

    def get_max_length(self) -> int:
        return -1 if self.sliding_window is None else self.sliding_window

    def get_max_cache_shape(self) -> int:  # transformers < 5.14
        return self.get_max_length()

    def reset(self) -> None:
        self.is_initialized = False
        self.n_seen = 0
        self.window_start = 0
        self._call_kv = None

    def crop(self, length: int) -> None:
        """Roll back the newest tokens (assisted / speculative decoding): ``length < 0`` removes ``-length``
        tokens (transformers >= 5.14), ``length > 0`` keeps the first ``length`` (the older API), 0 removes
        nothing. Tokens are dropped from wherever they are stored (exact window, compressed store, sinks);
        compressed tokens cannot come back exact, so after a rollback into the compressed part the window
        refills with new tokens only. Raises NotImplementedError where the format cannot drop them (see
        ``_crop`` of each layer).

        Sliding-window layers (as ``DynamicSlidingWindowLayer``): a rollback is exact while the tokens the
        shortened sequence's window needs are still held -- always before the window is full, and after
        ``activate_past_recording()`` (transformers' assisted decoding calls it); otherwise RuntimeError.
        After the crop the layer drops what its window no longer sees (``crop(0)`` does only that)."""
        remove = -length if length < 0 else (max(0, self.n_seen - length) if length > 0 else 0)
        remove = min(remove, self.n_seen)
        if not self.is_initialized:
            return
        needed_from = max(0, self.n_seen - remove - (self.sliding_window or 0) + 1)  # the shortened window's start
        if remove and self.sliding_window is not None and self.window_start > needed_from:
            raise RuntimeError(
                f"cannot roll back {remove} tokens of sliding-window layer {self.layer_idx} (window "
                f"{self.sliding_window}): the tokens before position {self.window_start} were already dropped, and the "
                "shortened sequence's window needs them; call cache.activate_past_recording() before the forward to "
                "roll back (transformers' DynamicSlidingWindowLayer refuses this too)"
            )
        if remove:
            self._crop(remove)
            self.n_seen -= remove
        self._slide(force=True)

    def _crop(self, remove: int) -> None:
        raise NotImplementedError(f"{type(self).__name__} cannot roll back tokens")

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._map_batch(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map_batch(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._map_batch(lambda t: t[indices])

    def _map_batch(self, fn) -> None:
        """Apply ``fn`` to every batch-major tensor (``_batch_fields``; dict fields value by value)."""
        if not self.is_initialized:
            return
        for name in self._batch_fields:
            field = getattr(self, name)
            if isinstance(field, TokenStore):
                field.map_batch(fn)
            elif isinstance(field, dict):
                setattr(self, name, {k: fn(t) for k, t in field.items()})
            elif field is not None:
                setattr(self, name, fn(field))
        self.batch = getattr(self, self._batch_fields[0]).shape[0]

    def nbytes_by_part(self) -> dict[str, int]:
        raise NotImplementedError

    def _init_storage(self, key_states: torch.Tensor) -> None:
        raise NotImplementedError

    def _append(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        raise NotImplementedError

    def _attend(self, q: torch.Tensor, allowed: torch.Tensor, scaling: float) -> torch.Tensor:
        raise NotImplementedError


def nbytes_of(*tensors) -> int:
    """Total bytes of the given tensors (None skipped)."""
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


class CompressingLayer(HookedLayer):
    """Token order ``[sink | compressed | recent]``: the first ``sink`` tokens and a recent buffer stay exact.

    A subclass says how many tokens are compressed once ``n`` tokens are visible (``_n_compressed``,
    excluding sinks, monotone in ``n``) and how a chunk of tokens is compressed (``_compress`` -> dict of
    batch-major tensors with tokens on dim 2), scored (``_compressed_logits``) and read back
    (``_compressed_values``). Tokens are compressed as soon as no query of the current call sees them
    exact, and after attention down to what the rule keeps at rest.

    Sliding-window layers drop from the front, oldest first: sinks, then compressed tokens (the
    :class:`~h1bkv_lite.storage.TokenStore` advances a start offset: no copy per step), then exact recent
    tokens (counted as compressed and dropped, so positions stay ``[sink | compressed | recent]``).
    ``n_compressed`` counts every token ever compressed (dropped ones too), ``held_compressed`` those stored.
    A subclass with grouped storage rounds the drop down (``_drop_boundary``).
    """

    _batch_fields = ("sink_k", "sink_v", "recent_k", "recent_v", "store")

    def __init__(self, config, layer_idx: int, *, sink: int = 0, compressed_prefill: bool = False):
        super().__init__(config, layer_idx, compressed_prefill=compressed_prefill)
        self.sink = sink

    def _init_storage(self, key_states: torch.Tensor) -> None:
        empty = key_states[:, :, :0].clone()
        self.sink_k = self.sink_v = self.recent_k = self.recent_v = empty
        self.store = TokenStore()  # compressed tokens, preallocated and grown geometrically
        self.n_compressed = 0  # tokens compressed so far, including those a sliding window dropped since
        self.compressed_dropped = 0  # of those, dropped by the sliding window
        self._no_recent = None  # (k, v) with no tokens, reused (_empty_recent)

    @property
    def held_compressed(self) -> int:
        """Compressed tokens stored (host int)."""
        return self.n_compressed - self.compressed_dropped

    @property
    def stored(self) -> dict[str, torch.Tensor]:
        """The compressed tokens' tensors (views of the filled part of :attr:`store`)."""
        return self.store.view() if self.is_initialized else {}

    def _n_compressed(self, n: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _compress(self, k: torch.Tensor, v: torch.Tensor) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def _compressed_logits(self, q: torch.Tensor, chunk: dict, scaling: float) -> torch.Tensor:
        raise NotImplementedError

    def _compressed_values(self, chunk: dict) -> torch.Tensor:
        raise NotImplementedError

    def _compressed_at(self, n: int) -> int:
        return int(self._n_compressed(torch.tensor(n)))

    def _append(self, k: torch.Tensor, v: torch.Tensor) -> None:
        q_len = k.shape[2]
        room = min(self.sink, self.n_seen) - min(self.sink, self.n_seen - q_len)  # of the first `sink` positions
        if room > 0:
            self.sink_k = torch.cat([self.sink_k, k[:, :, :room]], dim=2)
            self.sink_v = torch.cat([self.sink_v, v[:, :, :room]], dim=2)
            k, v = k[:, :, room:], v[:, :, room:]
        if self.recent_k.shape[2] == 0:  # the prompt: referenced, not copied (compressed after attention)
            self.recent_k, self.recent_v = k, v
        else:  # O(window) per decode step
            self.recent_k = torch.cat([self.recent_k, k], dim=2)
            self.recent_v = torch.cat([self.recent_v, v], dim=2)
        if not self.exact_call:  # what even the oldest query of this call sees compressed
            self._compress_until(self._compressed_at(self.n_seen - q_len + 1))

    def _compress_until(self, n_compressed: int) -> None:
        m = min(n_compressed - self.n_compressed, self.recent_k.shape[2])
        if m <= 0:
            return
        self._store_compressed(self.recent_k[:, :, :m], self.recent_v[:, :, :m])
        if m == self.recent_k.shape[2]:  # all of it (window 0: every decode step): empty tensors
            self.recent_k, self.recent_v = self._empty_recent()
        else:  # copies, so that no view keeps a prompt's full-precision K/V alive
            self.recent_k, self.recent_v = self.recent_k[:, :, m:].clone(), self.recent_v[:, :, m:].clone()
        self.n_compressed += m

    def _empty_recent(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Zero-token ``(k, v)`` like ``recent_k/v``, made once per batch size (not two allocations per step): they
        hold no memory, and every write to the window makes new tensors (``torch.cat``)."""
        empty = self._no_recent
        if empty is None or empty[0].shape[:2] != self.recent_k.shape[:2]:
            B, H, _, D = self.recent_k.shape
            empty = self._no_recent = self.recent_k.new_empty((B, H, 0, D)), self.recent_v.new_empty((B, H, 0, D))
        return empty

    def _store_compressed(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """Compress ``k, v [B, Hkv, m, D]`` and append them to :attr:`store`."""
        self.store.append(self._compress(k, v))

    def _crop(self, remove: int) -> None:
        """Newest first: the exact window, then compressed tokens, then sinks."""
        R = self.recent_k.shape[2]
        r = min(remove, R)
        self.recent_k, self.recent_v = self.recent_k[:, :, :R - r], self.recent_v[:, :, :R - r]
        c = min(remove - r, self.held_compressed)
        if c:
            self._drop_compressed(self.held_compressed - c)
            self.n_compressed -= c
        s = remove - r - c
        if s:
            S = self.sink_k.shape[2]
            self.sink_k, self.sink_v = self.sink_k[:, :, :S - s], self.sink_v[:, :, :S - s]

    def _drop_compressed(self, keep: int) -> None:
        """Keep the first ``keep`` held compressed tokens (a store with one entry per token, every field)."""
        self.store.truncate(keep)

    def _drop_boundary(self, keep_from: int) -> int:
        """The first position to keep when the window needs ``keep_from`` on (grouped formats round down)."""
        return keep_from

    def _drop_compressed_front(self, n: int) -> None:
        """Drop the oldest ``n`` held compressed tokens (one store entry per token, every field)."""
        self.store.drop_front(n)

    def _drop_front(self, keep_from: int) -> None:
        keep_from = self._drop_boundary(keep_from)
        d = keep_from - self.window_start
        if d <= 0:
            return
        a = min(d, self.sink_k.shape[2])  # sinks are the oldest held tokens
        if a:  # copies: no view keeps the dropped part alive
            self.sink_k, self.sink_v = self.sink_k[:, :, a:].clone(), self.sink_v[:, :, a:].clone()
        b = min(d - a, self.held_compressed)
        if b:
            self._drop_compressed_front(b)
            self.compressed_dropped += b
        c = d - a - b
        if c:  # exact recent tokens: count them as compressed (and dropped) so that positions stay in order
            self.recent_k, self.recent_v = self.recent_k[:, :, c:].clone(), self.recent_v[:, :, c:].clone()
            self.n_compressed += c
            self.compressed_dropped += c
        self.window_start = keep_from

    def _settle(self) -> None:
        """After attention: drop what the sliding window no longer sees, then compress down to the rule."""
        self._slide()
        self._compress_until(self._compressed_at(self.n_seen))

    def _attend_prompt(self, q, k, v, attention_mask, scaling: float) -> torch.Tensor:
        """Exact attention of an empty layer's prompt over itself (SDPA), then compression down to what is
        kept exact at rest. ``k, v``: the prompt's tokens as the model passed them."""
        out = prompt_attention(q, k, v, attention_mask, scaling, self.sliding_window)
        self._after_prompt(q, k, attention_mask, scaling)
        self._settle()
        return out

    def _after_prompt(self, q, k, attention_mask, scaling: float) -> None:
        """Hook: what a subclass learns from the exact prompt before it is compressed."""

    def _attend(self, q: torch.Tensor, allowed: torch.Tensor, scaling: float) -> torch.Tensor:
        q_len = q.shape[2]
        S, C, R = self.sink_k.shape[2], self.held_compressed, self.recent_k.shape[2]
        exact = exact_logits(q, torch.cat([self.sink_k, self.recent_k], dim=2), scaling)
        logits_sink, logits_recent = exact.split([S, R], dim=-1)
        logits_comp = self._compressed_logits(q, self.stored, scaling) if C else exact[..., :0]
        # recent tokens that some queries of this call already see compressed (compressed_prefill only)
        m = 0 if self.exact_call else min(max(self._compressed_at(self.n_seen) - self.n_compressed, 0), R)
        if m:
            chunk = self._compress(self.recent_k[:, :, :m], self.recent_v[:, :, :m])
            n_visible = torch.arange(self.n_seen - q_len + 1, self.n_seen + 1, device=q.device)
            per_query = self._n_compressed(n_visible) - self.n_compressed  # [Tq] recent tokens compressed per query
            use_comp = torch.arange(m, device=q.device) < per_query.unsqueeze(-1)  # [Tq, m]
            head = torch.where(use_comp, self._compressed_logits(q, chunk, scaling), logits_recent[..., :m])
            logits_recent = torch.cat([head, logits_recent[..., m:]], dim=-1)
        probs = masked_softmax(torch.cat([logits_sink, logits_comp, logits_recent], dim=-1), allowed)
        p_sink, p_comp, p_recent = probs.split([S, C, R], dim=-1)
        out = weighted_values(p_sink, self.sink_v)
        if C:
            out = out + weighted_values(p_comp, self._compressed_values(self.stored))
        if m:
            p_head = p_recent[..., :m]
            out = out + weighted_values(p_head * use_comp, self._compressed_values(chunk))
            p_recent = torch.cat([p_head * ~use_comp, p_recent[..., m:]], dim=-1)
        out = out + weighted_values(p_recent, self.recent_v)
        self._settle()
        return out

    def _exact_bytes(self) -> tuple[int, int]:
        """(sink bytes, recent bytes)."""
        return nbytes_of(self.sink_k, self.sink_v), nbytes_of(self.recent_k, self.recent_v)


class H1BLayer(CompressingLayer):
    """One layer of :class:`H1BCache` (see there for the arguments).

    Hot paths. The prompt attends through SDPA (:func:`prompt_attention`) and is compressed right after, in
    one launch on CUDA (:func:`~h1bkv_lite.kernels.sketch_pack_quantize_into`, written in place into the
    preallocated :class:`~h1bkv_lite.storage.TokenStore`); "hamming" calibrates its temperature on a bounded
    sample of query rows (:func:`~h1bkv_lite.attention.sampled_temperature`). A decode step appends the new
    token the same way and attends through the Triton kernel: no host synchronisation, no copy of the
    store. Nothing is checked for NaN on these paths (that would be a device sync per layer and step);
    values beyond +-32752 and key norms beyond the fp16 maximum are clamped, the same rule on the kernel
    and the torch paths.
    """

    _batch_fields = CompressingLayer._batch_fields + ("calibrated",)

    def __init__(self, config, layer_idx: int, *, sketcher: SimHashSketcher, score: str, temperature,
                 value_bits: int, group_size: int | None, window: int, sink: int, compressed_prefill: bool,
                 backend: str, key_mean: torch.Tensor | None = None, max_cache_len: int | None = None):
        super().__init__(config, layer_idx, sink=sink, compressed_prefill=compressed_prefill)
        self.max_cache_len = max_cache_len  # None: the store grows; else a static capacity (see H1BCache)
        self.sketcher, self.score, self.temperature = sketcher, score, temperature
        self.key_mean = key_mean  # float32 [Hkv, D] (centering) or None
        self._key_mean_dev = None
        self.value_bits, self.group_size, self.window, self.backend = value_bits, group_size, window, backend
        self.calibrated: torch.Tensor | None = None  # [B, Hq] per-sequence T from the prefill

    def _init_storage(self, key_states: torch.Tensor) -> None:
        super()._init_storage(key_states)
        self.calibrated = None
        self._padded = False  # some sequence of the batch has padding (then decode takes the torch path)
        self._temperature_dev = None  # the given temperature on the cache's device
        self._kernel_checked = False  # the first kernel call goes through the checked entry point
        dev = key_states.device
        self._use_triton = _triton_serves(self.backend, dev, self.sketcher.bits, self.head_dim, self.value_bits,
                                          self.group_size)
        self._filled_dev = None  # static capacity: compressed tokens stored, int32 [1] on the device
        self._ring_head = None  # static capacity with a window: slot of the oldest exact recent token (device)
        self._buffer_layouts = None  # launch arguments of the store's buffers (_layouts)
        if self.max_cache_len is not None:
            if not self._use_triton:
                raise ValueError(
                    f"max_cache_len (a static-capacity cache) needs the Triton kernels, which do not serve these "
                    f"{dev.type} tensors with backend={self.backend!r}: use CUDA (or backend='triton' on the CPU "
                    "under TRITON_INTERPRET=1, for tests)")
            # every token but the exact window and sinks is compressed
            self.store.reserve(self._slot_shapes(key_states), max(1, self.max_cache_len - self.window - self.sink))
            self._filled_dev = torch.zeros(1, dtype=torch.int32, device=dev)

    def _compressed_at(self, n: int) -> int:
        return max(0, n - self.sink - self.window)

    def _layouts(self, bufs: dict) -> tuple:
        """(the decode kernel's :class:`~h1bkv_lite.kernels.decode_attention.StoreLayout`, the append kernel's output
        strides) of the store's whole buffers ``bufs``, worked out again only when the buffers change (growth, a
        batch op): a decode step asks its tensors for no strides."""
        kept = self._buffer_layouts
        fields = (bufs["key_codes"], bufs.get("key_norms"), bufs["values"], bufs["value_scales"], bufs["value_zeros"])
        if kept is None or not kept[0].serves(*fields):
            kernels = _kernels()
            kept = self._buffer_layouts = (kernels.decode_attention.StoreLayout(*fields),
                                           kernels.append_out_strides(*fields[:1], *fields[2:]))
        return kept

    def _map_batch(self, fn) -> None:
        self._buffer_layouts = None  # it holds the buffers being replaced: let them go now (beam search remaps every step)
        super()._map_batch(fn)

    def _n_compressed(self, n: torch.Tensor) -> torch.Tensor:
        return (n - self.sink - self.window).clamp(min=0)

    # ---- centering
    def _mean_on(self, device) -> torch.Tensor:
        """``mu`` float32 ``[1, Hkv, 1, D]`` on ``device`` (cached)."""
        if self._key_mean_dev is None or self._key_mean_dev.device != torch.device(device):
            self._key_mean_dev = to_device(self.key_mean, device)[None, :, None, :]
        return self._key_mean_dev

    def _centered(self, k: torch.Tensor) -> torch.Tensor:
        """What is sketched: ``k - mu`` in float32 when centering, else ``k`` as given."""
        return k if self.key_mean is None else k.float() - self._mean_on(k.device)

    def _mean_term(self, q: torch.Tensor, scaling: float) -> torch.Tensor:
        """The exact ``q . mu * scaling``, float32 ``[B, Hq, Tq, 1]`` (GQA: each query head its kv head's mu)."""
        mu = self._mean_on(q.device)
        mu = mu.repeat_interleave(q.shape[1] // mu.shape[1], dim=1)  # [1, Hq, 1, D]
        return (q.float() * mu).sum(-1, keepdim=True) * scaling

    # ---- compression
    def _compress(self, k: torch.Tensor, v: torch.Tensor) -> dict[str, torch.Tensor]:
        """Torch path: codes, (norms), quantized values of ``k, v [B, Hkv, m, D]``; no checks, no syncs."""
        k = self._centered(k)
        chunk = {"key_codes": pack_bits(k.float() @ self.sketcher.projection_on(k.device) >= 0)}
        if self.score != "hamming":
            chunk["key_norms"] = _key_norms(k)
        qv = quantize_values_unchecked(v, self.value_bits, self.group_size or self.head_dim)
        chunk.update(values=qv.data, value_scales=qv.scale, value_zeros=qv.zero)
        return chunk

    def _store_compressed(self, k: torch.Tensor, v: torch.Tensor) -> None:
        if not self._use_triton:
            return super()._store_compressed(k, v)
        if self.max_cache_len is not None:
            return self._store_at_device_position(k, v)
        m = k.shape[2]
        # the whole buffers and the fill level: no slot views to build on every decode step
        start = self.store.append_position(m, None if self.store.capacity else self._slot_shapes(k))
        bufs = self.store.buffers()
        k = self._centered(k)
        _kernels().sketch_pack_quantize_into(
            k, v, self.sketcher.projection_on(k.device), codes=bufs["key_codes"], data=bufs["values"],
            scale=bufs["value_scales"], zero=bufs["value_zeros"], value_bits=self.value_bits,
            group_size=self.group_size or self.head_dim, start=start, out_strides=self._layouts(bufs)[1])
        if self.score != "hamming":
            bufs["key_norms"][:, :, start:start + m].copy_(_key_norms(k))
        self.store.commit(m)

    def _check_room(self, q_len: int) -> None:
        if self.max_cache_len is not None and self.n_seen + q_len > self.max_cache_len:
            raise ValueError(
                f"layer {self.layer_idx} would hold {self.n_seen + q_len} tokens, more than "
                f"max_cache_len={self.max_cache_len}; build the cache with a larger max_cache_len")

    def _append(self, k: torch.Tensor, v: torch.Tensor) -> None:
        filling = self._ring_head is None and (k.shape[2] > 1 or self.recent_k.shape[2] < self.window
                                                or self.sink_k.shape[2] < self.sink)
        if self.max_cache_len is None or self.window == 0 or filling:
            return super()._append(k, v)  # a growing store, no window, or the prompt and its chunks: in order
        if k.shape[2] != 1 or self.exact_call:
            raise ValueError(
                f"a static-capacity cache with a window decodes one token per forward once decoding has begun, got "
                f"{k.shape[2]} (layer {self.layer_idx}); use max_cache_len=None for multi-token calls")
        self._ring_step(k, v)

    def _ring_step(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """Static capacity with a window: ``recent_k/v`` are a ring of the ``window`` newest tokens (attention
        ignores their order). The oldest, at the device slot ``_ring_head``, is compressed into the store, the
        new token takes its slot and the head moves on: fixed tensors and device indices only, the same
        launches every step."""
        if self._ring_head is None:  # the window and sinks are full (_append): the prompt left them in order
            self._ring_head = torch.zeros(1, dtype=torch.long, device=k.device)
        head = self._ring_head
        self._store_compressed(self.recent_k.index_select(2, head), self.recent_v.index_select(2, head))
        self.n_compressed += 1
        self.recent_k.index_copy_(2, head, k)
        self.recent_v.index_copy_(2, head, v)
        head.add_(1).remainder_(self.window)

    def _store_at_device_position(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """Static capacity: the ``m`` tokens go to slots ``filled .. filled + m - 1`` of the fixed buffers, the
        fill level read and advanced on the device, so a decode step launches the same work with the same
        arguments every time (capturable by a CUDA graph). The room was checked by :meth:`update` (on host counts:
        at most ``max_cache_len - window - sink`` compressed tokens, what the store reserved)."""
        m = k.shape[2]
        bufs = self.store.buffers()
        k = self._centered(k)
        _kernels().sketch_pack_quantize_into(
            k, v, self.sketcher.projection_on(k.device), codes=bufs["key_codes"], data=bufs["values"],
            scale=bufs["value_scales"], zero=bufs["value_zeros"], value_bits=self.value_bits,
            group_size=self.group_size or self.head_dim, pos=self._filled_dev, out_strides=self._layouts(bufs)[1])
        if self.score != "hamming":
            slots = self._filled_dev.long() + torch.arange(m, device=k.device)
            bufs["key_norms"].index_copy_(2, slots, _key_norms(k))
        self._filled_dev.add_(m)
        self.store.commit(m)

    def _crop(self, remove: int) -> None:
        if self._ring_head is not None:
            raise NotImplementedError(
                f"a static-capacity cache with a window cannot roll back tokens (layer {self.layer_idx}: its exact "
                "window is a ring); use max_cache_len=None for assisted decoding")
        super()._crop(remove)
        if self._filled_dev is not None:
            self._filled_dev.fill_(self.held_compressed)

    def replayed(self, steps: int) -> None:
        """Host bookkeeping for ``steps`` decode steps that ran on the device without Python (replays of a
        captured CUDA graph): the token counts advance as the steps' ``update`` calls would have advanced them.
        Only for a static-capacity layer past its prompt (with a window: once its ring is full, so each step
        compressed one token)."""
        self.n_seen += steps
        self.n_compressed += steps
        self.store.commit(steps)

    def _slot_shapes(self, k: torch.Tensor) -> dict[str, torch.Tensor]:
        """Zero-token tensors with the stored fields' shapes and dtypes (to size the store's buffers)."""
        B, H, _, D = k.shape
        groups = D // (self.group_size or D)
        meta = {"key_codes": ((self.sketcher.bits // 8,), torch.uint8),
                "values": ((D * self.value_bits // 8,), torch.uint8),
                "value_scales": ((groups,), torch.float16), "value_zeros": ((groups,), torch.float16)}
        if self.score != "hamming":
            meta["key_norms"] = ((), torch.float16)
        return {name: k.new_empty((B, H, 0, *tail), dtype=dtype) for name, (tail, dtype) in meta.items()}

    def _compressed_values(self, chunk: dict) -> torch.Tensor:
        data, scale = chunk["values"], chunk["value_scales"]
        shape = (*data.shape[:-1], self.head_dim)
        qv = QuantizedTensor(data, scale, chunk["value_zeros"], self.value_bits, self.head_dim // scale.shape[-1],
                             torch.Size(shape), self.dtype)
        return qv.dequantize()

    def _compressed_logits(self, q: torch.Tensor, chunk: dict, scaling: float) -> torch.Tensor:
        # unchecked: sketched_logits' argument checks are host syncs on CUDA (this runs every layer and step)
        if self.score == "hamming":
            a = sketched_logits_unchecked(q, chunk["key_codes"], self.sketcher, "hamming")
            logits = a / self._temperature(q.device).view(-1, q.shape[1], 1, 1)
        else:
            logits = sketched_logits_unchecked(q, chunk["key_codes"], self.sketcher, self.score, chunk["key_norms"])
            rescale = scaling * math.sqrt(q.shape[-1])  # sketched_logits assumes scaling = 1/sqrt(D)
            logits = logits if rescale == 1.0 else logits * rescale
        return logits if self.key_mean is None else logits + self._mean_term(q, scaling)

    def _temperature(self, device=None) -> torch.Tensor:
        """``[Hq]`` given, or ``[B, Hq]`` calibrated; float32 (on ``device`` when given)."""
        if self.temperature is None:
            return self.calibrated
        if device is None:
            return self.temperature
        if self._temperature_dev is None or self._temperature_dev.device != torch.device(device):
            self._temperature_dev = to_device(self.temperature, device)
        return self._temperature_dev

    # ---- attention
    def _after_prompt(self, q, k, attention_mask, scaling: float) -> None:
        self._learn_from_first_call(q, k, valid_tokens(attention_mask, q.shape[0], k.shape[2], q.device), scaling)

    def _attend(self, q: torch.Tensor, allowed: torch.Tensor, scaling: float) -> torch.Tensor:
        if self.n_seen == q.shape[2]:  # the first call of compressed_prefill
            first = allowed[:, 0, :, -q.shape[2]:].diagonal(dim1=-2, dim2=-1)  # (see valid_tokens)
            self._learn_from_first_call(q, self._call_kv[0], first, scaling)
        return super()._attend(q, allowed, scaling)

    def _learn_from_first_call(self, q, k, valid: torch.Tensor | None, scaling: float) -> None:
        """On the first call's exact q/k: note padding (``valid`` bool ``[B, T]``, None = none; one sync, only
        for masked batches: decode then takes the torch path) and, for "hamming" without a given temperature,
        calibrate a per-sequence ``T [B, Hq]`` at the model's logit ``scaling`` (bounded sample)."""
        counts = [k.shape[2]] * q.shape[0] if valid is None else valid.sum(-1).tolist()
        self._padded = self._padded or min(counts) < k.shape[2]
        if self.score != "hamming" or self.temperature is not None or self.calibrated is not None:
            return
        if min(counts) < 2:
            raise ValueError(
                "temperature=None calibrates the 'hamming' temperature on the prefill, which needs >= 2 "
                f"(non-padding) tokens per sequence; sequence {counts.index(min(counts))} has {min(counts)}. "
                "Pass temperature=..."
            )
        self.calibrated = sampled_temperature_unchecked(q, self._centered(k), self.sketcher, valid, scaling=scaling)

    def _attend_fast(self, q, attention_mask, scaling: float) -> torch.Tensor | None:
        """A multi-token call (:meth:`_attend_chunk`) or the Triton decode kernel, for what they serve. The kernel: one
        query, some compressed tokens, a batch without padding, scaling 1/sqrt(D), a temperature known (given or
        calibrated), and (sliding layers) nothing held outside the query's window (the kernel has no mask; past
        recording may hold more). Centered keys too (see :meth:`_kernel_decode`). Decided from host state only: no
        sync."""
        if self._padded and self.max_cache_len is not None:
            raise ValueError("a static-capacity cache does not serve padded batches (the decode kernel has no mask, "
                             "and its ring window no token order); use max_cache_len=None")
        if q.shape[2] > 1:
            return self._attend_chunk(q, scaling) if self._chunk_serves(q) else None
        if not (self._use_triton and q.shape[2] == 1 and self.held_compressed > 0 and not self._padded
                and scaling == q.shape[-1] ** -0.5
                and (self.sliding_window is None or self.n_seen - self.window_start <= self.sliding_window)
                and (self.score != "hamming" or self.temperature is not None or self.calibrated is not None)):
            return None
        return self._kernel_decode(q)

    def _chunk_serves(self, q: torch.Tensor) -> bool:
        """Host state only: an exact multi-token call after the first (chunked prefill), starting past the sinks, in
        an unpadded batch, on a full-attention layer, scored by "hamming" (temperature known) or "asym", in a dtype
        and head size the flash kernels take (:func:`chunk_attention.serves`)."""
        return (self.exact_call and self.n_seen - q.shape[2] >= max(self.sink, 1) and self.score != "cos"
                and not self._padded and self.sliding_window is None
                and (self.score != "hamming" or self._temperature() is not None)
                and chunk_attention.serves(q.device, q.dtype, self.head_dim, self.sketcher.bits))

    def _attend_chunk(self, q: torch.Tensor, scaling: float) -> torch.Tensor:
        """Attention of a multi-token call (a prefill chunk: transformers' ``prefill_chunk_size``) over everything
        held, as the general path computes it (the call's own tokens exact and causal, the held exact tokens, the
        compressed ones scored from their sketches), through flash attention merged by log-sum-exp
        (:mod:`h1bkv_lite.chunk_attention`): no ``Tq x N`` matrix, memory bounded by the call's length and a block of
        the store. ``q [B, Hq, Tq, D]``; returns float32 ``[B, Hq, Tq, D]``."""
        own = self.recent_k.shape[2] - q.shape[2]  # recent = [exact window held before the call | the call]
        parts = [chunk_attention.exact_part(q, self.recent_k[:, :, own:], self.recent_v[:, :, own:], causal=True,
                                            scaling=scaling)]
        if self.sink_k.shape[2] + own:
            held_k = torch.cat([self.sink_k, self.recent_k[:, :, :own]], dim=2)
            held_v = torch.cat([self.sink_v, self.recent_v[:, :, :own]], dim=2)
            parts.append(chunk_attention.exact_part(q, held_k, held_v, causal=False, scaling=scaling))
        if self.held_compressed:
            stored, projection = self.stored, self.sketcher.projection_on(q.device)
            if self.score == "hamming":
                q_sketch = chunk_attention.hamming_queries(q, projection, self._temperature(q.device))
            else:
                q_sketch = chunk_attention.asym_queries(q, projection, scaling)

            def values(start: int, end: int) -> torch.Tensor:
                return self._compressed_values({k: t[:, :, start:end] for k, t in stored.items()}).to(q.dtype)

            offset = None if self.key_mean is None else self._mean_term(q, scaling).squeeze(-1)
            parts.append(chunk_attention.compressed_part(q_sketch, stored["key_codes"], values, self.head_dim,
                                                         key_norms=stored.get("key_norms"), row_offset=offset))
        out = chunk_attention.merge(parts)[0]
        self._settle()
        return out

    def _kernel_decode(self, q: torch.Tensor) -> torch.Tensor:
        """One decode step through the Triton kernel. Centered keys: the kernel scores compressed keys by the
        estimate of ``q . (k - mu)`` alone (no mean term) and is given the exact keys centered too (``k - mu``,
        float32), so every logit of a query row is the module docstring's logit minus the same ``q . mu *
        scaling``, which the softmax ignores: the same attention as the torch path, in O(window) more work."""
        kernel = _kernels().decode_attention
        # the whole buffers: static capacity with the fill level on the device (the same arguments every step); a
        # growing store with it as a host int, unless a sliding window dropped tokens (then the live views)
        length = live_views = None
        if self._filled_dev is not None:
            stored = self.store.buffers()
        elif self.compressed_dropped == 0:  # nothing dropped: the live entries start at slot 0 of every buffer
            stored, length = self.store.buffers(), self.held_compressed
        else:
            stored = live_views = self.stored
        window_k = self.recent_k if self.sink_k.shape[2] == 0 else torch.cat([self.sink_k, self.recent_k], dim=2)
        window_k = self._centered(window_k) if window_k.shape[2] else window_k  # (empty: nothing to shift)
        window_v = self.recent_v if self.sink_v.shape[2] == 0 else torch.cat([self.sink_v, self.recent_v], dim=2)
        args = (q[:, :, 0], stored["key_codes"], stored["values"], stored["value_scales"], stored["value_zeros"])
        kwargs = dict(projection=self.sketcher.projection_on(q.device), score=self.score,
                      temperature=self._temperature(q.device) if self.score == "hamming" else None,
                      key_norms=stored.get("key_norms"), window_k=window_k, window_v=window_v,
                      value_bits=self.value_bits, n_valid=self._filled_dev)
        if self._kernel_checked:
            layout = None if stored is live_views else self._layouts(stored)[0]
            out = kernel.h1b_decode_attention_unchecked(*args, **kwargs, length=length, layout=layout)
        else:  # the first call: checked, on the live views
            if length is not None:
                args = (args[0], *(t[:, :, :length] for t in args[1:]))
                kwargs["key_norms"] = None if kwargs["key_norms"] is None else kwargs["key_norms"][:, :, :length]
            out = kernel.h1b_decode_attention(*args, **kwargs, backend="triton")
            self._kernel_checked = True
        self._settle()
        return out.unsqueeze(2)

    def nbytes_by_part(self) -> dict[str, int]:
        """Bytes of what is stored, under :func:`memory.kv_cache_bytes`'s part names."""
        s = self.stored if self.is_initialized else {}
        sink, recent = self._exact_bytes() if self.is_initialized else (0, 0)
        parts = {
            "key_codes": nbytes_of(s.get("key_codes")),
            "key_norms": nbytes_of(s.get("key_norms")),
            "values": nbytes_of(s.get("values")),
            "value_scales_zeros": nbytes_of(s.get("value_scales"), s.get("value_zeros")),
            "window": recent,
            "sink": sink,
            "projection": 0,  # R is regenerated from its seed
        }
        return parts


_FP16_MAX = torch.finfo(torch.float16).max


class _KernelEntryPoints(NamedTuple):
    decode_attention: types.ModuleType
    sketch_pack_quantize_into: Callable
    append_out_strides: Callable


@functools.cache
def _kernels() -> _KernelEntryPoints:
    """The Triton kernels' entry points the decode path calls, imported once (optional: Triton)."""
    from .kernels import decode_attention  # noqa: PLC0415
    from .kernels.sketch_pack import append_out_strides, sketch_pack_quantize_into  # noqa: PLC0415

    return _KernelEntryPoints(decode_attention, sketch_pack_quantize_into, append_out_strides)


def _key_norms(k: torch.Tensor) -> torch.Tensor:
    """fp16 ``[B, H, m]`` key norms, clamped to the fp16 maximum (the rule of every path)."""
    return k.float().norm(dim=-1).clamp_(max=_FP16_MAX).to(torch.float16)


def _triton_serves(backend: str, device: torch.device, bits: int, head_dim: int, value_bits: int,
                   group_size: int | None) -> bool:
    """Whether this layer's appends and decode steps run the Triton kernels: "auto" on CUDA, "triton"
    anywhere (CPU under ``TRITON_INTERPRET=1``), and only for formats both kernels serve
    (:func:`_triton_unserved`; :class:`H1BCache` refuses unserved formats for ``backend="triton"`` at
    construction)."""
    if backend == "torch" or (backend == "auto" and device.type != "cuda"):
        return False
    from .kernels import HAS_TRITON  # noqa: PLC0415

    if backend == "triton":  # the first update knows the device: CPU tensors need the interpreter (clear error)
        from .kernels._common import use_triton  # noqa: PLC0415
        from .kernels.decode_attention import _decode_split_kernel  # noqa: PLC0415

        use_triton(backend, device, _decode_split_kernel)
    return HAS_TRITON and _triton_unserved(bits, head_dim, value_bits, group_size) is None


def _triton_unserved(bits: int, head_dim: int, value_bits: int, group_size: int | None) -> str | None:
    """Why the Triton kernels cannot serve this format (the kernels' own predicates), or None."""
    from .kernels.decode_attention import decode_kernel_serves  # noqa: PLC0415
    from .kernels.sketch_pack import append_kernel_serves  # noqa: PLC0415

    if not decode_kernel_serves(bits):
        return f"bits a multiple of 32 (the decode kernel's words), got {bits}"
    if not append_kernel_serves(head_dim, value_bits, group_size):
        return f"value groups of whole bytes, got group_size={group_size} at value_bits={value_bits}"
    return None


# ------------------------------------------------------------------------------------------------ caches
class HookedCache(Cache):
    """A ``Cache`` of :class:`HookedLayer` s, one per decoder layer, with byte accounting.

    ``compressed_prefill`` is a flag every cache of this package accepts (see the module docstring).
    """

    def __init__(self, layers: list[HookedLayer]):
        super().__init__(layers=layers)
        for layer in layers:
            layer.owner = self

    def activate_past_recording(self) -> None:
        """Sliding layers keep the tokens older than their window until the next :meth:`crop` (so that it can
        roll back exactly); transformers' assisted decoding calls it (defined here too for transformers
        versions whose ``Cache`` lacks it)."""
        for layer in self.layers:
            layer.activate_past_recording()

    def nbytes_by_part(self) -> dict[str, int]:
        """True bytes of the stored tensors, summed over layers, by part."""
        total: dict[str, int] = {}
        for layer in self.layers:
            for name, n in layer.nbytes_by_part().items():
                total[name] = total.get(name, 0) + n
        return total

    def nbytes(self) -> int:
        """True bytes of every stored tensor (all layers and sequences); bookkeeping excluded."""
        return sum(self.nbytes_by_part().values())


def text_config(config):
    """The decoder config whose attention modules the cache serves (the same object the model holds)."""
    if hasattr(config, "get_text_config"):
        config = config.get_text_config(decoder=True)
    if not hasattr(config, "_attn_implementation"):
        raise TypeError(f"config must be a transformers model config (model.config), got {type(config).__name__}")
    return config


class H1BCache(HookedCache):
    """H1B-KV cache: SimHash key sketches, low-bit values, optional exact window and sink tokens.

    Parameters
    ----------
    config : the model's config object (``model.config``; must be the same object, see module docstring).
    bits : sketch bits per key and kv head, a multiple of 8 in [8, 4096].
    score : "hamming" (the paper's), "cos" or "asym" (store an fp16 key norm) -- see :mod:`h1bkv_lite.attention`.
    temperature : "hamming" only: None (calibrate on the prefill), float, tensor ``[Hq]``, ``[L, Hq]`` or ``[L, 1]``.
    value_bits : 2, 4 or 8.  group_size : channels per value scale/zero (None: one per token, the paper's).
    window : newest tokens kept exact.  sink : first tokens kept exact (StreamingLLM; with left padding they
        are the first columns, so a padded row's sinks are padding). On a sliding-window layer (window ``W``)
        both apply within the ``W - 1`` tokens it keeps: sinks leave with the window, and ``window >= W`` keeps
        that layer entirely exact (a decode query sees ``W`` tokens: the ``W - 1`` kept and its own).
    compressed_prefill : multi-token forwards attend as if decoded token by token (default: exactly -- their own
        tokens exact and causal, what the layer holds as stored; a later chunk of a chunked prefill,
        ``generate(..., prefill_chunk_size=...)``, attends through flash attention, :mod:`h1bkv_lite.chunk_attention`).
    seed : layer ``i`` sketches with ``SimHashSketcher(head_dim, bits, seed + i)``.
    key_mean : None (default, the paper's) or float ``[L, Hkv, D]``: sketch ``k - mu`` and add the exact
        ``q . mu * scaling`` (key centering, module docstring; e.g. from :func:`fit_key_mean`).
    projection : None (default: R drawn from ``seed + i``) or float ``[L, D, bits]``: layer ``i`` sketches
        with ``projection[i]`` (e.g. a projection learned by :mod:`h1bkv_lite.finetune`).
    backend : "auto" (the Triton append and decode kernels on CUDA for the formats they serve: bits a
        multiple of 32, value groups of whole bytes; torch otherwise), "torch", or "triton" (the kernels
        also on CPU under ``TRITON_INTERPRET=1``, for tests; a format they do not serve raises ValueError
        here, at construction).
    max_cache_len : None (default: the compressed store grows as tokens come) or a static capacity: the longest
        sequence (prompt + new tokens) the cache holds, as transformers' ``StaticCache`` counts it. Every
        layer's store is then allocated once at the first forward (``max_cache_len - window - sink`` compressed
        tokens), new tokens are written at a fill level kept on the device, and the decode kernel reads it there,
        so a decode step launches the same work with the same arguments every time -- what a CUDA graph captures
        (:func:`h1bkv_lite.graphs.generate_greedy`), as transformers' ``StaticCache`` does for fp16. The exact
        window is then a ring (the oldest token's slot takes the new one), so after the prompt (at least
        ``sink + window`` tokens) it decodes one token per forward and cannot ``crop``. Needs the Triton
        kernels (CUDA; ``backend="triton"`` under ``TRITON_INTERPRET=1`` on the CPU), an unpadded batch and a
        model without sliding-window layers; a sequence longer than ``max_cache_len`` raises ValueError.

    Raises NotImplementedError for a config with layers the caches do not implement (chunked attention,
    other layer types; :func:`memory.layer_windows`).
    """

    def __init__(self, config, *, bits: int = 256, score: str = "hamming", temperature=None, value_bits: int = 4,
                 group_size: int | None = None, window: int = 0, sink: int = 0, compressed_prefill: bool = False,
                 seed: int = 0, backend: str = "auto", key_mean: torch.Tensor | None = None,
                 projection: torch.Tensor | None = None, max_cache_len: int | None = None):
        config = text_config(config)
        shape = memory.model_shape(config)
        check_sketch_bits(bits)
        if score == "exact":
            raise ValueError("score='exact' keeps exact keys: it is an ablation of h1b_attention, not a cache format")
        check_choice("score", score, ("hamming", "cos", "asym"))
        check_choice("value_bits", value_bits, VALUE_BITS)
        if group_size is not None:
            check_int("group_size", group_size, low=1)
            if shape.head_dim % group_size:
                raise ValueError(f"group_size must divide head_dim={shape.head_dim}, got {group_size}")
        check_int("window", window, low=0)
        check_int("sink", sink, low=0)
        check_bool("compressed_prefill", compressed_prefill)
        check_int("seed", seed, low=0)
        check_choice("backend", backend, BACKENDS)
        if backend == "triton":
            _refuse_unserved_triton(bits, shape.head_dim, value_bits, group_size)
        if max_cache_len is not None:
            _check_static_capacity(config, max_cache_len, backend, bits, shape.head_dim, value_bits, group_size)
        self.static_capacity = max_cache_len  # (transformers' Cache has a read-only max_cache_len)
        temps = _layer_temperatures(temperature, score, shape.num_layers, shape.num_heads)
        means = _per_layer("key_mean", key_mean, (shape.num_layers, shape.num_kv_heads, shape.head_dim))
        projections = _per_layer("projection", projection, (shape.num_layers, shape.head_dim, bits))
        self.bits, self.score, self.value_bits, self.group_size = bits, score, value_bits, group_size
        self.window, self.sink, self.seed = window, sink, seed
        self.centered, self.learned_projection = key_mean is not None, projection is not None
        layers = [
            H1BLayer(config, i, sketcher=SimHashSketcher(shape.head_dim, bits, seed + i, projection=projections[i]),
                     score=score, temperature=temps[i], value_bits=value_bits, group_size=group_size, window=window,
                     sink=sink, compressed_prefill=compressed_prefill, backend=backend, key_mean=means[i],
                     max_cache_len=max_cache_len)
            for i in range(shape.num_layers)
        ]
        super().__init__(layers)

    def replayed(self, steps: int = 1) -> None:
        """Host bookkeeping after ``steps`` decode steps replayed from a captured CUDA graph (static capacity):
        every layer's token counts advance as the steps' forwards would have advanced them (the device state,
        the stored tokens and their fill level, was written by the replays)."""
        if self.static_capacity is None:
            raise ValueError("replayed() is for a static-capacity cache (H1BCache(..., max_cache_len=...))")
        check_int("steps", steps, low=0)
        for layer in self.layers:
            layer.replayed(steps)

    @property
    def scheme(self) -> memory.H1B:
        """The :mod:`memory` scheme these settings store."""
        return memory.H1B(self.bits, self.value_bits, self.group_size, self.score != "hamming", self.window, self.sink)

    def temperatures(self) -> torch.Tensor | None:
        """The "hamming" temperatures in use, float32 ``[L, B, Hq]`` (given ones broadcast), or None."""
        if self.score != "hamming" or not all(layer.is_initialized for layer in self.layers):
            return None
        return torch.stack([layer._temperature().expand(layer.batch, -1) for layer in self.layers])


def _check_static_capacity(config, max_cache_len, backend, bits, head_dim, value_bits, group_size) -> None:
    """What ``H1BCache(max_cache_len=...)`` needs, checked at construction (ValueError naming the argument)."""
    check_int("max_cache_len", max_cache_len, low=1)
    if backend == "torch":
        raise ValueError("max_cache_len (a static-capacity cache) needs the Triton kernels: backend 'auto' or "
                         "'triton', got 'torch'")
    reason = _triton_unserved(bits, head_dim, value_bits, group_size)
    if reason:
        raise ValueError(f"max_cache_len (a static-capacity cache) needs the Triton kernels, which need {reason}")
    if any(w is not None for w in memory.layer_windows(config)):
        raise ValueError("max_cache_len (a static-capacity cache) does not support sliding-window layers yet "
                         "(this config has some)")


def _refuse_unserved_triton(bits: int, head_dim: int, value_bits: int, group_size: int | None) -> None:
    """backend="triton" promises the kernels: refuse, at construction, what they cannot serve."""
    from .kernels import HAS_TRITON  # noqa: PLC0415

    if not HAS_TRITON:
        raise RuntimeError("backend='triton' needs the triton package (pip install 'h1bkv-lite[kernels]')")
    unserved = _triton_unserved(bits, head_dim, value_bits, group_size)
    if unserved is not None:
        raise ValueError(f"backend='triton' needs {unserved}; use backend='auto' (the torch path serves it)")


def _per_layer(name: str, value, shape: tuple[int, ...]) -> list:
    """``value`` (None or a finite float tensor of ``shape``, layers first) as one float32 CPU tensor per layer
    (None for every layer when ``value`` is None)."""
    if value is None:
        return [None] * shape[0]
    from ._validation import check_tensor  # noqa: PLC0415

    check_tensor(name, value, ndim=len(shape))
    if tuple(value.shape) != shape:
        raise ValueError(f"{name} must have shape {list(shape)}, got {list(value.shape)}")
    value = value.detach().to(device="cpu", dtype=torch.float32)
    return [row.clone() for row in value]


def _layer_temperatures(temperature, score: str, num_layers: int, num_heads: int) -> list:
    """Normalise ``temperature`` to one float32 ``[Hq]`` tensor (or None) per layer."""
    if temperature is None:
        return [None] * num_layers
    if score != "hamming":
        raise ValueError(f"temperature applies to score='hamming' only, got score={score!r}")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float, torch.Tensor)):
        raise TypeError(f"temperature must be None, a float or a tensor, got {type(temperature).__name__}")
    t = torch.as_tensor(temperature, dtype=torch.float32).detach().cpu()
    if t.dim() == 0 or (t.dim() == 1 and t.shape[0] == num_heads):
        t = t.expand(num_layers, num_heads)
    elif t.dim() == 2 and t.shape[0] == num_layers and t.shape[1] in (1, num_heads):
        t = t.expand(num_layers, num_heads)
    else:
        raise ValueError(
            f"temperature must be a float or have shape [{num_heads}] (per head), [{num_layers}, {num_heads}] or "
            f"[{num_layers}, 1] (per layer); got {tuple(t.shape)}"
        )
    bad = ~torch.isfinite(t) | (t <= 0)
    if bool(bad.any()):
        raise ValueError(f"temperature must be finite and > 0, got {t[bad].flatten()[0].item()} among its values")
    return [row.clone() for row in t]


@torch.no_grad()
def fit_temperature(model, input_ids: torch.Tensor, *, bits: int, seed: int = 0, key_mean: torch.Tensor | None = None,
                    projection: torch.Tensor | None = None) -> torch.Tensor:
    """Calibrate the "hamming" temperature on text: float32 ``[L, Hq]`` (mean over the batch's sequences).

    Runs one exact forward of ``input_ids [B, T]`` with an :class:`H1BCache` (``key_mean`` / ``projection`` as
    there: the temperature of the centered keys / of the given R); pass the result as
    ``H1BCache(..., temperature=T)`` to score other text without an oracle calibration. ``input_ids`` may be on
    the host: they are moved to the model's device, where the result is (no autograd graph is kept).
    """
    cache = H1BCache(model.config, bits=bits, seed=seed, key_mean=key_mean, projection=projection)
    with torch.no_grad():
        model(input_ids=input_ids.to(model_device(model)), past_key_values=cache, use_cache=True)
    return cache.temperatures().mean(dim=1).to(torch.float32)


@torch.no_grad()
def fit_key_mean(model, input_ids: torch.Tensor) -> torch.Tensor:
    """The per-layer, per-kv-head, per-channel mean of the keys the model caches: float32 ``[L, Hkv, D]`` on the
    CPU (post-RoPE keys, as attention sees them, averaged over every token of ``input_ids long [B, T]``).

    One exact forward (:func:`~h1bkv_lite.capture.capture_attention_inputs`). Pass it as
    ``H1BCache(..., key_mean=mu)`` (key centering, see the module docstring).
    Raises TypeError/ValueError for ids that are not a non-empty long ``[B, T]`` tensor.
    """
    from ._validation import check_tensor  # noqa: PLC0415
    from .capture import capture_attention_inputs  # noqa: PLC0415

    check_tensor("input_ids", input_ids, ndim=2, dtypes=(torch.long,))
    captured = capture_attention_inputs(model, input_ids)
    return torch.stack([k.double().mean(dim=(0, 2)).float() for _, k, _ in captured.values()])
