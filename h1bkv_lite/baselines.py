"""Baseline KV caches with :class:`~h1bkv_lite.cache.H1BCache`'s interface: FP16, KIVI, eviction, Loki.

Each is a transformers ``Cache`` built from ``model.config`` that works verbatim in ``model.generate``,
reports ``nbytes()`` equal to :func:`memory.kv_cache_bytes` for its ``scheme`` (tokens kept exact are
stored in the model dtype: pass ``exact_bytes=4`` for an fp32 model), and accepts ``compressed_prefill`` (default False: a prompt
attends exactly and is compressed afterwards; True: every query of a multi-token forward sees what
token-by-token decoding would have left it).

- :class:`FP16Cache` -- ``DynamicCache`` plus ``nbytes``.
- :class:`KIVICache` -- KIVI (Liu et al. 2024): keys quantized per channel over groups of ``group_size``
  tokens, values per token over groups of ``group_size`` channels, ``residual`` newest tokens exact.
- :class:`EvictionCache` -- H2O (Zhang et al. 2023: heavy hitters by accumulated attention + recent) or
  StreamingLLM (Xiao et al. 2023: ``sink`` first tokens + recent), ``budget`` tokens at rest.
- :class:`LokiCache` -- Loki (Singhania et al. 2024): full cache; per query, low-rank PCA scores pick the
  ``top_k`` keys that get exact attention. Basis from :func:`calibrate_loki`.

Sliding-window layers (see :mod:`h1bkv_lite.cache`) keep only their window's ``W - 1`` newest tokens in every
cache: ``FP16Cache`` through transformers' own ``DynamicSlidingWindowLayer``; KIVI drops whole key groups
(up to ``group_size - 1`` older tokens stay, masked out); eviction keeps ``min(budget, W - 1)`` tokens per
head, the window's first; Loki drops the rest from its full cache. ``memory.kv_cache_bytes`` counts the same.
"""
from __future__ import annotations

import torch
from transformers import DynamicCache

from . import memory
from ._device import model_device
from ._validation import check_bool, check_choice, check_int
from .cache import (
    CompressingLayer,
    HookedCache,
    HookedLayer,
    exact_logits,
    masked_softmax,
    nbytes_of,
    text_config,
    weighted_values,
)
from .quant import VALUE_BITS, QuantizedTensor, quantize_values

__all__ = ["EvictionCache", "FP16Cache", "KIVICache", "LokiCache", "calibrate_loki"]


class FP16Cache(DynamicCache):
    """transformers' ``DynamicCache`` (exact keys and values) with :meth:`nbytes`."""

    def __init__(self, config, *, compressed_prefill: bool = False):
        check_bool("compressed_prefill", compressed_prefill)  # nothing is compressed: accepted for uniformity
        super().__init__(config=text_config(config))

    scheme = memory.FP16()

    def nbytes_by_part(self) -> dict[str, int]:
        layers = [layer for layer in self.layers if layer.is_initialized]
        return {"keys": nbytes_of(*(layer.keys for layer in layers)), "values": nbytes_of(*(layer.values for layer in layers))}

    def nbytes(self) -> int:
        return sum(self.nbytes_by_part().values())


# ------------------------------------------------------------------------------------------------ KIVI
class KIVILayer(CompressingLayer):
    """One layer of :class:`KIVICache`. Stored keys: codes ``[B, Hkv, G, D, group_size * bits / 8]`` and
    fp16 scale/zero ``[B, Hkv, G, D, 1]`` per token group; values ``[B, Hkv, N, D * bits / 8]`` + ``[B, Hkv, N,
    D / group_size]``."""

    def __init__(self, config, layer_idx: int, *, bits: int, group_size: int, residual: int,
                 compressed_prefill: bool):
        super().__init__(config, layer_idx, compressed_prefill=compressed_prefill)
        self.bits, self.group_size, self.residual = bits, group_size, residual

    def _n_compressed(self, n: torch.Tensor) -> torch.Tensor:
        g = self.group_size
        return torch.where(n > self.residual, (n - self.residual) // g * g, torch.zeros_like(n))

    def _compress(self, k: torch.Tensor, v: torch.Tensor) -> dict[str, torch.Tensor]:
        B, H, n, D = k.shape
        g = self.group_size
        per_channel = k.reshape(B, H, n // g, g, D).transpose(-1, -2)  # [B, H, G, D, g]
        qk = quantize_values(per_channel, self.bits)
        qv = quantize_values(v, self.bits, g)
        return {"key_codes": qk.data, "key_scales": qk.scale, "key_zeros": qk.zero,
                "values": qv.data, "value_scales": qv.scale, "value_zeros": qv.zero}

    def _drop_compressed(self, keep: int) -> None:
        """Keys are quantized per group of ``group_size`` tokens: only whole groups can be dropped."""
        if keep % self.group_size:
            raise NotImplementedError(
                f"KIVICache cannot roll back into a quantized key group (group_size={self.group_size}): "
                f"{self.held_compressed - keep} compressed tokens would be removed; use a residual at least as large "
                "as the tokens a speculative step may reject"
            )
        g = keep // self.group_size
        self.store.truncate({name: (g if name.startswith("key") else keep) for name in self.stored})

    def _drop_boundary(self, keep_from: int) -> int:
        """Sliding layers drop whole key groups only (groups start at position 0): up to ``group_size - 1``
        tokens older than the window stay stored, masked out of attention."""
        return keep_from // self.group_size * self.group_size

    def _drop_compressed_front(self, n: int) -> None:
        self.store.drop_front({name: (n // self.group_size if name.startswith("key") else n) for name in self.stored})

    def _compressed_keys(self, chunk: dict) -> torch.Tensor:
        codes = chunk["key_codes"]
        B, H, G, D, _ = codes.shape
        g = self.group_size
        qk = QuantizedTensor(codes, chunk["key_scales"], chunk["key_zeros"], self.bits, g,
                             torch.Size((B, H, G, D, g)), self.dtype)
        return qk.dequantize().transpose(-1, -2).reshape(B, H, G * g, D)

    def _compressed_logits(self, q: torch.Tensor, chunk: dict, scaling: float) -> torch.Tensor:
        return exact_logits(q, self._compressed_keys(chunk), scaling)

    def _compressed_values(self, chunk: dict) -> torch.Tensor:
        data = chunk["values"]
        qv = QuantizedTensor(data, chunk["value_scales"], chunk["value_zeros"], self.bits, self.group_size,
                             torch.Size((*data.shape[:-1], self.head_dim)), self.dtype)
        return qv.dequantize()

    def nbytes_by_part(self) -> dict[str, int]:
        s = self.stored if self.is_initialized else {}
        return {
            "key_codes": nbytes_of(s.get("key_codes")),
            "key_scales_zeros": nbytes_of(s.get("key_scales"), s.get("key_zeros")),
            "values": nbytes_of(s.get("values")),
            "value_scales_zeros": nbytes_of(s.get("value_scales"), s.get("value_zeros")),
            "residual": self._exact_bytes()[1] if self.is_initialized else 0,
        }


class KIVICache(HookedCache):
    """KIVI: ``bits``-bit keys per channel and values per token, the newest tokens exact.

    ``q = floor((n - residual) / group_size) * group_size`` of ``n`` tokens are quantized (whole token groups,
    oldest first); the rest (``residual`` to ``residual + group_size - 1`` tokens) stay in the model dtype.
    ``group_size`` must divide head_dim. With left padding, padded positions share key groups with real
    tokens (as in KIVI), so a padded row is not bit-identical to the sequence run alone.
    """

    def __init__(self, config, *, bits: int = 2, group_size: int = 32, residual: int = 128,
                 compressed_prefill: bool = False):
        config = text_config(config)
        shape = memory.model_shape(config)
        check_choice("bits", bits, VALUE_BITS)
        check_int("group_size", group_size, low=1)
        if shape.head_dim % group_size or (group_size * bits) % 8:
            raise ValueError(
                f"group_size must divide head_dim={shape.head_dim} and fill whole bytes at {bits} bits, got {group_size}"
            )
        check_int("residual", residual, low=0)
        check_bool("compressed_prefill", compressed_prefill)
        self.scheme = memory.KIVI(bits, group_size, residual)
        super().__init__([
            KIVILayer(config, i, bits=bits, group_size=group_size, residual=residual,
                      compressed_prefill=compressed_prefill)
            for i in range(shape.num_layers)
        ])


# ------------------------------------------------------------------------------------------------ eviction
class EvictionLayer(HookedLayer):
    """One layer of :class:`EvictionCache`: kept ``k, v [B, Hkv, K, D]``, their positions and H2O scores."""

    _batch_fields = ("k", "v", "pos", "score", "valid")

    def __init__(self, config, layer_idx: int, *, budget: int, policy: str, sink: int, recent: int,
                 compressed_prefill: bool):
        super().__init__(config, layer_idx, compressed_prefill=compressed_prefill)
        self.budget, self.policy, self.sink, self.recent = budget, policy, sink, recent

    def _init_storage(self, key_states: torch.Tensor) -> None:
        B, H = key_states.shape[:2]
        self.k = self.v = key_states[:, :, :0].clone()
        self.pos = torch.zeros(B, H, 0, dtype=torch.long, device=key_states.device)  # bookkeeping, not counted
        self.score = torch.zeros(B, H, 0, device=key_states.device)  # H2O: attention received so far
        self.valid = torch.zeros(B, H, 0, dtype=torch.bool, device=key_states.device)  # False: padding

    def _append(self, k: torch.Tensor, v: torch.Tensor) -> None:
        B, H, q_len, _ = k.shape
        positions = torch.arange(self.n_seen - q_len, self.n_seen, device=k.device).expand(B, H, q_len)
        self._push(k, v, positions, torch.ones_like(positions, dtype=torch.bool))

    def _push(self, k, v, pos, valid) -> None:
        """Append tokens ``k, v [B, Hkv, n, D]`` with positions and validity ``[B, Hkv, n]``, score 0."""
        self.k, self.v = torch.cat([self.k, k], dim=2), torch.cat([self.v, v], dim=2)
        self.pos = torch.cat([self.pos, pos], dim=2)
        self.score = torch.cat([self.score, self.score.new_zeros(pos.shape)], dim=2)
        self.valid = torch.cat([self.valid, valid], dim=2)

    def _attend(self, q: torch.Tensor, allowed: torch.Tensor, scaling: float) -> torch.Tensor:
        B, Hq, q_len, _ = q.shape
        # allowed [B, 1, Tq, Nseen] -> per kept token [B, Hkv, Tq, K]
        kept_allowed = allowed.expand(B, self.kv_heads, -1, -1).gather(
            -1, self.pos.unsqueeze(2).expand(-1, -1, q_len, -1))
        self.valid = self.valid & kept_allowed[:, :, -1]  # the last query sees every non-padding token
        if self.exact_call or q_len == 1:
            out = self._step(q, kept_allowed, scaling)
            self._evict()
            return out
        # compressed prefill: replay the queries one at a time, as decoding would (eviction after each)
        new = [t[:, :, -q_len:] for t in (self.k, self.v, self.pos, self.valid)]
        self.k, self.v, self.pos = self.k[:, :, :-q_len], self.v[:, :, :-q_len], self.pos[:, :, :-q_len]
        self.score, self.valid = self.score[:, :, :-q_len], self.valid[:, :, :-q_len]
        outs = []
        for t in range(q_len):
            self._push(*(x[:, :, t:t + 1] for x in new))
            kept_allowed = allowed[:, :, t:t + 1].expand(B, self.kv_heads, -1, -1).gather(-1, self.pos.unsqueeze(2))
            outs.append(self._step(q[:, :, t:t + 1], kept_allowed, scaling))
            self._evict(next_pos=self.n_seen - q_len + t + 1)
        return torch.cat(outs, dim=2)

    def _step(self, q: torch.Tensor, kept_allowed: torch.Tensor, scaling: float) -> torch.Tensor:
        group = q.shape[1] // self.kv_heads
        probs = masked_softmax(exact_logits(q, self.k, scaling), kept_allowed.repeat_interleave(group, dim=1))
        if self.policy == "h2o":
            B, Hq, q_len, K = probs.shape
            self.score = self.score + probs.reshape(B, self.kv_heads, group * q_len, K).sum(2)
        return weighted_values(probs, self.v)

    def _evict(self, window: bool = False, next_pos: int | None = None) -> None:
        """Keep ``budget`` tokens per (sequence, kv head): sinks and recent first, then by policy; padding last.

        On a sliding layer, tokens the next query (at ``next_pos``, default: the next token) cannot see go
        first and are never protected as sinks or recent, so a budget of ``W - 1`` or more keeps every token
        of the window. ``window`` (a sliding layer at rest): keep at most ``min(budget, W - 1)`` -- a head that
        evicted some of the window's tokens before keeps a few older ones (masked out of attention), so every
        head keeps the same count (no host sync, no ragged tensors)."""
        limit, stale = self.budget, None
        if self.sliding_window is not None:
            first_visible = (self.n_seen if next_pos is None else next_pos) - self.sliding_window + 1
            if window:
                limit = min(limit, self.sliding_window - 1)
                self.window_start = max(self.window_start, first_visible)
            if first_visible > 0:
                stale = self.pos < first_visible
        if self.k.shape[2] <= limit:
            return
        rank = self.valid.long().cumsum(-1)  # 1-based rank among real tokens
        n_real = rank[..., -1:]
        protected = self.valid & ((rank <= self.sink) | (n_real - rank < self.recent))
        if stale is not None:
            protected = protected & ~stale
        rest = self.score if self.policy == "h2o" else self.pos.float()
        priority = torch.where(protected, torch.full_like(rest, float("inf")), rest)
        priority = torch.where(self.valid, priority, torch.full_like(rest, float("-inf")))
        if stale is not None:  # below everything in the window (padding included)
            floor = priority.clamp(min=torch.finfo(rest.dtype).min)
            priority = torch.where(stale, torch.full_like(rest, float("-inf")), floor)
        keep = priority.topk(limit, dim=-1).indices.sort(dim=-1).values  # [B, Hkv, limit], in order
        gather = lambda t: t.gather(2, keep if t.dim() == 3 else keep.unsqueeze(-1).expand(-1, -1, -1, t.shape[-1]))  # noqa: E731
        self.k, self.v = gather(self.k), gather(self.v)
        self.pos, self.score, self.valid = gather(self.pos), gather(self.score), gather(self.valid)

    @property
    def _offset(self) -> int:
        return 0  # kept tokens are gathered by position from a mask over every position seen

    def _slide(self, force: bool = False) -> None:
        if self.sliding_window is not None and (force or not self.record_past) and self.is_initialized:
            self._evict(window=True)

    def _crop(self, remove: int) -> None:
        """The newest tokens are kept in every head (the recent window is protected from eviction), so they
        can be dropped; older ones may already be evicted in some heads and not in others."""
        if remove > min(self.recent, self.pos.shape[2]):
            raise NotImplementedError(
                f"EvictionCache can roll back at most its protected recent window ({self.recent} tokens), got {remove}"
            )
        self.k, self.v, self.pos = self.k[:, :, :-remove], self.v[:, :, :-remove], self.pos[:, :, :-remove]
        self.score, self.valid = self.score[:, :, :-remove], self.valid[:, :, :-remove]

    def nbytes_by_part(self) -> dict[str, int]:
        if not self.is_initialized:
            return {"keys": 0, "values": 0}
        return {"keys": nbytes_of(self.k), "values": nbytes_of(self.v)}


class EvictionCache(HookedCache):
    """Token eviction: at most ``budget`` tokens per sequence and kv head kept exact after every forward.

    ``policy="streaming"`` (StreamingLLM) keeps the first ``sink`` tokens and the newest ``budget - sink``.
    ``policy="h2o"`` keeps ``sink`` first tokens, the ``recent`` newest (default ``(budget - sink) // 2``) and
    fills the budget with the heavy hitters: the tokens with the largest attention received so far (summed
    over the query heads of a kv head and over steps). Padding is evicted first; sinks are the first real
    tokens. A decode step attends over the ``budget`` kept tokens plus itself, then evicts. With the default
    exact prefill the prompt attends in full and is evicted after it (H2O's own prefill); with
    ``compressed_prefill=True`` the queries of a forward are replayed one by one (exactly the decode
    semantics, a Python loop per layer).
    """

    def __init__(self, config, *, budget: int, policy: str = "h2o", sink: int = 4, recent: int | None = None,
                 compressed_prefill: bool = False):
        config = text_config(config)
        shape = memory.model_shape(config)
        check_int("budget", budget, low=1)
        check_choice("policy", policy, ("h2o", "streaming"))
        check_int("sink", sink, low=0, high=budget)
        if recent is None:
            recent = budget - sink if policy == "streaming" else (budget - sink) // 2
        check_int("recent", recent, low=0, high=budget - sink)
        if policy == "streaming" and recent != budget - sink:
            raise ValueError(f"recent must be budget - sink = {budget - sink} for policy='streaming', got {recent}")
        check_bool("compressed_prefill", compressed_prefill)
        self.scheme = memory.Eviction(budget)
        super().__init__([
            EvictionLayer(config, i, budget=budget, policy=policy, sink=sink, recent=recent,
                          compressed_prefill=compressed_prefill)
            for i in range(shape.num_layers)
        ])


# ------------------------------------------------------------------------------------------------ Loki
class LokiLayer(HookedLayer):
    """One layer of :class:`LokiCache`: full ``k, v [B, Hkv, N, D]`` and an fp16 basis ``[Hkv, D, rank]``."""

    _batch_fields = ("k", "v")

    def __init__(self, config, layer_idx: int, *, basis: torch.Tensor, top_k: int, compressed_prefill: bool):
        super().__init__(config, layer_idx, compressed_prefill=compressed_prefill)
        self.basis, self.top_k = basis, top_k

    def _init_storage(self, key_states: torch.Tensor) -> None:
        self.k = self.v = key_states[:, :, :0].clone()
        self.basis = self.basis.to(key_states.device)

    def _append(self, k: torch.Tensor, v: torch.Tensor) -> None:
        self.k, self.v = torch.cat([self.k, k], dim=2), torch.cat([self.v, v], dim=2)

    def _crop(self, remove: int) -> None:
        self.k, self.v = self.k[:, :, :-remove], self.v[:, :, :-remove]

    def _drop_front(self, keep_from: int) -> None:
        d = keep_from - self.window_start  # copies: no view keeps the dropped part alive
        self.k, self.v = self.k[:, :, d:].clone(), self.v[:, :, d:].clone()
        self.window_start = keep_from

    def _attend(self, q: torch.Tensor, allowed: torch.Tensor, scaling: float) -> torch.Tensor:
        logits = exact_logits(q, self.k, scaling)
        if not self.exact_call and self.k.shape[2] > self.top_k:
            group = q.shape[1] // self.kv_heads
            basis = self.basis.float().repeat_interleave(group, dim=0)  # [Hq, D, rank]
            q_low = q.float() @ basis  # [B, Hq, Tq, rank]
            k_low = self.k.float() @ self.basis.float()  # [B, Hkv, N, rank]
            approx = exact_logits(q_low, k_low, scaling).masked_fill(~allowed, float("-inf"))
            chosen = approx.topk(self.top_k, dim=-1).indices
            allowed = allowed & torch.zeros_like(approx, dtype=torch.bool).scatter_(-1, chosen, True)
        return weighted_values(masked_softmax(logits, allowed), self.v)

    def nbytes_by_part(self) -> dict[str, int]:
        if not self.is_initialized:
            return {"keys": 0, "values": 0, "projection": nbytes_of(self.basis)}
        return {"keys": nbytes_of(self.k), "values": nbytes_of(self.v), "projection": nbytes_of(self.basis)}


class LokiCache(HookedCache):
    """Loki: the full cache, but each decode query attends exactly to its ``top_k`` keys by low-rank score.

    ``basis``: float ``[L, Hkv, D, >= rank]`` principal directions of the keys, strongest first (from
    :func:`calibrate_loki`); the first ``rank`` columns are kept, in fp16 (counted in ``nbytes``). The
    low-rank score is ``(q P) . (k P)`` per kv head (post-RoPE keys, uncentred). Default exact prefill.
    """

    def __init__(self, config, *, rank: int, top_k: int, basis: torch.Tensor, compressed_prefill: bool = False):
        config = text_config(config)
        shape = memory.model_shape(config)
        check_int("rank", rank, low=1, high=shape.head_dim)
        check_int("top_k", top_k, low=1)
        if not isinstance(basis, torch.Tensor):
            raise TypeError(f"basis must be a tensor from calibrate_loki, got {type(basis).__name__}")
        expected = (shape.num_layers, shape.num_kv_heads, shape.head_dim)
        if basis.dim() != 4 or tuple(basis.shape[:3]) != expected or basis.shape[3] < rank:
            raise ValueError(f"basis must have shape [{', '.join(map(str, expected))}, >= rank={rank}], "
                             f"got {tuple(basis.shape)}")
        check_bool("compressed_prefill", compressed_prefill)
        self.scheme = memory.LowRankKeys(rank)
        basis = basis[..., :rank].to(torch.float16).contiguous()
        super().__init__([
            LokiLayer(config, i, basis=basis[i].clone(), top_k=top_k, compressed_prefill=compressed_prefill)
            for i in range(shape.num_layers)
        ])


@torch.no_grad()
def calibrate_loki(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Principal directions of each layer's post-RoPE keys on ``input_ids [B, T]``: float32 ``[L, Hkv, D, D]``.

    Column ``j`` of ``[l, h]`` is the ``j``-th right singular vector of that head's (uncentred) key matrix,
    strongest first, so ``basis[..., :rank]`` best preserves dot products with the keys. Padding (mask 0)
    is left out.
    """
    device = model_device(model)  # host inputs go to the model's device (as fit_temperature's)
    input_ids = input_ids.to(device)
    attention_mask = None if attention_mask is None else attention_mask.to(device)
    cache = DynamicCache()  # full layers only: a sliding-window layer would keep just its window's keys
    model(input_ids=input_ids, attention_mask=attention_mask, past_key_values=cache, use_cache=True)
    keep = None if attention_mask is None else attention_mask.bool().reshape(-1)
    bases = []
    for layer in cache.layers:
        k = layer.keys.float()  # [B, Hkv, T, D]
        rows = k.transpose(0, 1).reshape(k.shape[1], -1, k.shape[-1])  # [Hkv, B*T, D]
        if keep is not None:
            rows = rows[:, keep.to(rows.device)]
        bases.append(torch.linalg.svd(rows, full_matrices=False).Vh.transpose(-1, -2))  # [Hkv, D, D]
    return torch.stack(bases)
