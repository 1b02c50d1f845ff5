"""Reference H1B attention: past keys seen only through their SimHash sketch, values only 4-bit.

Score modes (``score=``), for a query ``q`` and a compressed key ``k`` with sketch Hamming distance
``h`` out of ``b`` bits (``d`` = head_dim):

``"hamming"`` (the paper's)
    The query is sketched too; ``a = 1 - 2 h / b`` (XNOR + popcount), ``logit = a / T``.
    Stores only the key code (b/8 bytes per token-head). ``T`` is a temperature: global (float),
    per head (tensor ``[Hq]``), or per layer (one value per call). ``E[a] = 1 - 2 theta / pi``.
``"cos"`` (angle-corrected, with norms)
    ``logit = |q| |k| cos(pi h / b) / sqrt(d)``. Stores the code plus an fp16 key norm per token-head.
``"asym"`` (QJL-style, unbiased)
    Query kept in full precision: ``logit = sqrt(pi/2) / b * |k| * <R^T q, sign(R^T k)> / sqrt(d)``,
    an unbiased estimate of ``<q, k> / sqrt(d)``. Stores code + fp16 key norm.
``"exact"``
    Keys exact (``<q, k> / sqrt(d)``); only values are quantized. An ablation, not a cache format.

Temperature default (``temperature=None``, "hamming" only): per query head,
``T = std(a) / std(<q,k>/sqrt(d))`` over the causal (query, key) pairs of the data given, so the
sketched logits have the spread of exact attention. :func:`calibrate_temperature` computes it on
calibration data; in ``h1b_attention`` with ``None`` it is computed on the call's own inputs (an
oracle calibration: pass a temperature calibrated on other text for a deployment-faithful number).

Window: for each query, the newest ``window`` keys it can see stay exact (fp16 key and value), as a
cache that keeps its last ``window`` tokens uncompressed would serve them at decode time.
"""
from __future__ import annotations

import bisect
import math

import torch

from ._device import to_device
from ._validation import FLOAT_DTYPES, check_choice, check_int, check_same_device, check_tensor
from .quant import VALUE_BITS, quantize_values
from .sketch import SimHashSketcher, pack_bits

SCORES = ("hamming", "cos", "asym", "exact")


def sketched_logits(
    q: torch.Tensor,
    key_codes: torch.Tensor,
    *,
    sketcher: SimHashSketcher,
    score: str = "hamming",
    temperature=None,
    key_norms: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention logits of queries against stored key sketches.

    q: ``[B, Hq, Tq, D]`` float; key_codes: ``uint8 [B, Hkv, N, bits // 8]``; key_norms: ``[B, Hkv, N]``
    (needed by "cos" and "asym"); ``Hq`` a multiple of ``Hkv`` (GQA). Returns float32 ``[B, Hq, Tq, N]``.
    """
    check_choice("score", score, SCORES[:3])
    check_tensor("q", q, ndim=4)
    check_tensor("key_codes", key_codes, ndim=4, dtypes=(torch.uint8,))
    check_same_device(q=q, key_codes=key_codes)
    B, Hq, Tq, D = q.shape
    Hkv = key_codes.shape[1]
    if D != sketcher.head_dim:
        raise ValueError(f"q head_dim must equal sketcher.head_dim={sketcher.head_dim}, got {D}")
    if key_codes.shape[0] != B or Hq % Hkv:
        raise ValueError(
            f"key_codes [B, Hkv, N, bytes] must match q's batch {B} and divide its {Hq} heads, "
            f"got shape {tuple(key_codes.shape)}"
        )
    if key_norms is not None:
        check_tensor("key_norms", key_norms, ndim=3)
        if key_norms.shape != key_codes.shape[:3]:
            raise ValueError(f"key_norms must have shape {tuple(key_codes.shape[:3])}, got {tuple(key_norms.shape)}")
    if score == "hamming":
        if temperature is None:
            raise ValueError("temperature is required for score='hamming' on stored codes")
        a = sketched_logits_unchecked(q, key_codes, sketcher, score)
        return a / _temperature_tensor(temperature, Hq, q.device)
    if key_norms is None:
        raise ValueError(f"key_norms is required for score={score!r}")
    return sketched_logits_unchecked(q, key_codes, sketcher, score, key_norms)


def sketched_logits_unchecked(q: torch.Tensor, key_codes: torch.Tensor, sketcher: SimHashSketcher, score: str,
                              key_norms: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`sketched_logits` without its argument checks, for the caches' decode path: the checks scan ``q``
    and the temperature for NaN, host synchronisations on CUDA on every layer and step. "hamming" returns the raw
    score ``1 - 2 h / b`` (the caller divides by its temperature); shapes are the caller's contract."""
    B, Hq, Tq, D = q.shape
    group = Hq // key_codes.shape[1]
    qg = q.float().reshape(B, key_codes.shape[1], group * Tq, D)  # query heads of one kv head side by side
    projected = qg @ sketcher.projection_on(q.device)  # [B, Hkv, group*Tq, bits]: sketcher.project, unchecked
    if score == "hamming":
        return sketcher.score(pack_bits(projected >= 0), key_codes).reshape(B, Hq, Tq, -1)
    norms = key_norms.float().unsqueeze(-2)  # [B, Hkv, 1, N]
    if score == "cos":
        cos = sketcher.cosine(pack_bits(projected >= 0), key_codes)
        logits = qg.norm(dim=-1, keepdim=True) * norms * cos / math.sqrt(D)
    else:  # asym
        dots = projected @ sketcher.signs(key_codes).transpose(-1, -2)
        logits = math.sqrt(math.pi / 2) / sketcher.bits * norms * dots / math.sqrt(D)
    return logits.reshape(B, Hq, Tq, -1)


def calibrate_temperature(
    q: torch.Tensor, k: torch.Tensor, *, sketcher: SimHashSketcher, causal: bool = True, per_head: bool = True
) -> torch.Tensor:
    """Temperature for the "hamming" score that matches the spread of exact logits.

    q ``[B, Hq, Tq, D]``, k ``[B, Hkv, Tk, D]``. Returns float32 ``[Hq]`` (``per_head``) or a 0-dim tensor:
    ``std(1 - 2h/b) / std(q.k / sqrt(D))`` over the (causally visible) pairs.
    """
    _check_qk(q, k, sketcher)
    a = sketched_logits(q, sketcher.sketch(k), sketcher=sketcher, score="hamming", temperature=1.0)
    exact = _exact_logits(q, k)
    visible = _visible(q.shape[2], k.shape[2], causal, q.device).expand_as(a)
    dims = (0, 2, 3) if per_head else (0, 1, 2, 3)
    t = _masked_std(a, visible, dims) / _masked_std(exact, visible, dims).clamp_min(1e-6)
    return t.clamp_min(1e-6)


CALIBRATION_QUERIES = 512
"""Query rows :func:`sampled_temperature` uses by default (evenly spaced over the prompt)."""
CALIBRATION_KEYS = 4096
"""Keys :func:`sampled_temperature` reads at most per query row by default (every ``ceil(Tk / 4096)``-th)."""
CALIBRATION_BLOCK = 1 << 24
"""float32 values one key block of :func:`sampled_temperature` holds at most by default (64 MiB; see there)."""


@torch.no_grad()
def sampled_temperature(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    sketcher: SimHashSketcher,
    valid: torch.Tensor | None = None,
    max_queries: int = CALIBRATION_QUERIES,
    max_keys: int = CALIBRATION_KEYS,
    scaling: float | None = None,
    block_elements: int = CALIBRATION_BLOCK,
) -> torch.Tensor:
    """:func:`calibrate_temperature` per sequence, on a bounded sample of query rows, in bounded memory.

    q ``[B, Hq, Tq, D]`` (the last ``Tq`` of the ``Tk`` positions), k ``[B, Hkv, Tk, D]``; ``valid``: bool
    ``[B, Tk]``, False for padding (excluded as queries and as keys). Returns float32 ``[B, Hq]``:
    ``std(1 - 2h/b) / std(q.k * scaling)`` over the causal pairs of each sequence and query head, ``scaling``
    the model's logit scale (default ``1/sqrt(D)``; models such as Granite or Gemma 3 use another, and the
    sketched logits ``(1 - 2h/b) / T`` replace ``q.k * scaling``).

    Which pairs: at most ``max_queries`` query rows, evenly spaced over the ``Tq`` rows and always including
    the last, against the visible keys among every ``s``-th key, ``s = ceil(Tk / max_keys)`` (each row keeps
    the same fraction of its pairs, so rows are weighted as in the full calibration). With ``Tq <=
    max_queries`` and ``Tk <= max_keys`` every pair is used and the result equals
    :func:`calibrate_temperature` run on each sequence alone. Work and memory are O(``max_queries *
    max_keys``) per sequence and head whatever the prompt length; never ``Tq x Tk``. Moments are summed in
    float64. The sample's effect on the result is measured on the bundled model in ``tests/test_cache.py``
    (within 3% of the full calibration at 512 of 2048 rows, 0.7% on average).

    Memory: keys are walked in blocks of at most ``block_elements`` float32 values each (the block's scores of
    one kind, ``B * Hq * rows * n`` for ``n`` keys and the ``rows`` that see them, plus the keys' float32 copy and
    projection, ``B * Hkv * n * (D + bits + 1)``; at least 64 keys a block). Beyond the block the sample's query
    features stay allocated, ``4 * B * Hq * Q * (D + bits + 1)`` bytes (``Q <= max_queries`` rows), and a bool
    mask of ``Q * K`` bytes (``B * Q * K`` with ``valid``; ``K <= max_keys`` keys read). The default block,
    :data:`CALIBRATION_BLOCK` = 2**24 values, is 64 MiB: Llama-2-7B's shape (32 heads, D = 128, B = 1) at
    ``bits=128`` holds about 64 + 16 + 3 MiB at its peak (block, query features, mask and per-row sums; the
    blocks of 2**21 scores before it held ~50 MiB) and walks 512 rows x 4096 keys in 5 blocks (4 with 8 kv
    heads; 1 block of 48 MiB with 4 heads). The number of blocks grows with ``B * Hq`` (and with ``bits``).
    """
    _check_qk(q, k, sketcher)
    check_int("max_queries", max_queries, low=1)
    check_int("max_keys", max_keys, low=1)
    if valid is not None:
        check_tensor("valid", valid, ndim=2, dtypes=(torch.bool,), finite=False)
        if tuple(valid.shape) != (q.shape[0], k.shape[2]):
            raise ValueError(f"valid must have shape [B, Tk] = [{q.shape[0]}, {k.shape[2]}], got {tuple(valid.shape)}")
    return sampled_temperature_unchecked(q, k, sketcher, valid, max_queries, max_keys, scaling, block_elements)


@torch.no_grad()
def sampled_temperature_unchecked(q, k, sketcher, valid=None, max_queries: int = CALIBRATION_QUERIES,
                                  max_keys: int = CALIBRATION_KEYS, scaling: float | None = None,
                                  block_elements: int = CALIBRATION_BLOCK) -> torch.Tensor:
    """:func:`sampled_temperature` without its argument checks (which scan q and k for NaN: a device sync),
    for the cache's prefill, whose inputs come from the model.

    How (the prefill pays it on every layer, so it is written for few launches and no host sync). The sample is
    planned on the host: the rows (``linspace`` on the host, as documented; on CUDA their index travels through
    pinned memory, :func:`~h1bkv_lite._device.to_device`), the keys read, and which rows see which keys. Each
    query row becomes two feature rows, ``[2 s_q, -sum(s_q)]`` (``s_q`` its +-1 signs) and ``q * scaling``, and
    each key ``[b_k, 1]`` (``b_k`` its 0/1 sign bits) and ``k``, so one ``bmm`` gives the integers ``bits * (1 -
    2h/bits) = s_q . s_k`` and one the exact logits. Keys are walked in blocks of at most ``block_elements`` float32
    values (the block's scores, one score kind at a time in one buffer, and its keys' projections);
    a block multiplies only the query rows that see some of its keys (rows are sorted by position), and masks
    only when some of them miss part of it. Per block: 3 launches for the keys, 4 per score kind (``bmm``, mask,
    sum, norm into a preallocated float32 table), so a layer issues a few dozen launches whatever the prompt
    length. The block sums are accumulated in float64 at the end; the pair count is a host int (a device one
    with ``valid``).
    """
    B, Hq, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    G, dev, bits = Hq // Hkv, q.device, sketcher.bits
    R = sketcher.projection_on(dev)
    # -- the sample, on the host: query rows, keys read (every `stride`-th), keys each row sees
    all_rows = Tq <= max_queries
    rows = torch.arange(Tq) if all_rows else torch.linspace(0, Tq - 1, max_queries).round().long()
    Q = rows.numel()
    stride = -(-Tk // max_keys)
    K = -(-Tk // stride)  # keys read: positions 0, stride, 2 stride, ... < Tk
    seen = ((rows + (Tk - Tq)) // stride + 1).clamp_(max=K).tolist()  # keys row r sees: 0 .. seen[r] - 1 (sorted)
    blocks, k0 = [], 0
    while k0 < K:  # (k0, n, r0, masked): keys k0 .. k0 + n - 1, rows r0 .. Q - 1 (those that see key k0)
        r0 = bisect.bisect_right(seen, k0)
        n = min(K - k0, max(64, block_elements // (B * (Hq * (Q - r0) + Hkv * (D + bits + 1)))))
        blocks.append((k0, n, r0, valid is not None or seen[r0] < k0 + n))
        k0 += n
    # -- the query side: rows in (position, head of the kv group) order, so that a block's rows are contiguous
    if all_rows:
        qsel, qpos = q, torch.arange(Tk - Tq, Tk, device=dev)
    else:
        rows_dev = to_device(rows, dev)
        qsel, qpos = q.index_select(2, rows_dev), rows_dev + (Tk - Tq)
    r_aug = torch.cat([R, R.new_zeros(D, 1)], dim=1)  # x @ r_aug >= 0: [x's sign bits, 1]
    qf = _contiguous_float(qsel.reshape(B, Hkv, G, Q, D).transpose(2, 3)).view(B * Hkv, Q * G, D)
    xa = (qf @ r_aug).ge_(0).mul_(4).sub_(2)  # [2 s_q, 2], built in place (bits + 1 floats a row)
    xa[..., bits].copy_(xa[..., :bits].sum(-1).mul_(-0.5))  # [2 s_q, -sum(s_q)] . [b_k, 1] = s_q . s_k (integers)
    xe = qf * (D**-0.5 if scaling is None else scaling)
    del qsel, qf
    # -- which pairs count: causal, and (valid) neither the query nor the key is padding
    kpos = torch.arange(0, Tk, stride, device=dev)
    hidden = kpos > qpos[:, None]  # [Q, K]
    if valid is None:
        count = float(sum(seen))
    else:
        q_ok = valid[:, Tk - Tq:] if all_rows else valid.index_select(1, qpos)
        hidden = hidden | ~(q_ok[:, :, None] & valid[:, ::stride, None].transpose(1, 2))  # [B, Q, K]
        count = (~hidden).sum((1, 2), dtype=torch.float64).view(B, 1, 1, 1)
    hidden = hidden.view(-1, 1, Q, 1, K)
    # -- the blocks: float32 sums and norms of each score kind, per (sequence, kv head, group member)
    # per block and query row: sum a, |a|, sum e, |e| (a in units of 1/bits); rows a block skips stay 0. Row by
    # row, so that each float32 reduction runs over one contiguous row of at most n scores (accurate on CPU too)
    partials = torch.zeros(len(blocks), B, Hkv, Q, 4, G, dtype=torch.float32, device=dev)
    for i, (k0, n, r0, masked) in enumerate(blocks):
        kf = _contiguous_float(k[:, :, k0 * stride:(k0 + n) * stride:stride]).view(B * Hkv, n, D)
        kb = (kf @ r_aug).ge_(0)  # [b_k, 1] as 0/1 floats
        scores = torch.empty(B * Hkv, (Q - r0) * G, n, dtype=torch.float32, device=dev)  # one kind at a time
        grid = scores.view(B, Hkv, Q - r0, G, n)
        hid = hidden[:, :, r0:, :, k0:k0 + n] if masked else None
        outs = partials[i, :, :, r0:].unbind(-2)
        for j, (x, y) in enumerate(((xa, kb), (xe, kf))):
            torch.bmm(x[:, r0 * G:], y.mT, out=scores)
            if masked:
                grid.masked_fill_(hid, 0.0)
            torch.sum(grid, -1, out=outs[2 * j])
            torch.linalg.vector_norm(grid, 2, -1, out=outs[2 * j + 1])
        del kf, kb, y, scores, grid  # before the next block's
    sums = partials.double()
    sums[..., 1::2, :].square_()
    count = count.clamp_min(1) if isinstance(count, torch.Tensor) else max(count, 1.0)
    moments = sums.sum((0, 3)).div_(count).view(B, Hkv, 2, 2, G)  # E[x], E[x^2] of x = a * bits and x = e
    std = (moments[:, :, :, 1] - moments[:, :, :, 0].square()).clamp_min_(0).sqrt_()  # [B, Hkv, 2 (a * bits, e), G]
    t = std[:, :, 0].div(bits) / std[:, :, 1].clamp_min(1e-6)
    return t.clamp_min(1e-6).reshape(B, Hq).float()


def _contiguous_float(x: torch.Tensor) -> torch.Tensor:
    """``x`` as contiguous float32: one copy at most (``x`` itself when it already is)."""
    if x.dtype != torch.float32:
        return x.to(torch.float32, memory_format=torch.contiguous_format)
    return x.contiguous()


def h1b_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    sketcher: SimHashSketcher,
    score: str = "hamming",
    temperature=None,
    value_bits: int | None = 4,
    group_size: int | None = None,
    window: int = 0,
    causal: bool = True,
    return_probs: bool = False,
):
    """Attention where keys outside each query's recent ``window`` are seen only through their sketch.

    q ``[B, Hq, Tq, D]``, k and v ``[B, Hkv, Tk, D]`` (fp16/bf16/fp32, ``Tq <= Tk``; the queries are the
    last ``Tq`` positions, as in prefill or decode). Values outside the window are quantized per token
    (``group_size=None``) or per group to ``value_bits`` in {2, 4, 8} (``None`` keeps them exact).
    Returns ``out [B, Hq, Tq, D]`` in q's dtype, and with ``return_probs`` also float32
    ``probs [B, Hq, Tq, Tk]``. Inputs are not modified.
    """
    _check_qk(q, k, sketcher)
    check_tensor("v", v, ndim=4)
    if v.shape != k.shape:
        raise ValueError(f"v must have k's shape {tuple(k.shape)}, got {tuple(v.shape)}")
    check_same_device(q=q, k=k, v=v)
    check_choice("score", score, SCORES)
    if value_bits is not None:
        check_int("value_bits", value_bits)
        check_choice("value_bits", value_bits, VALUE_BITS)
    check_int("window", window, low=0)
    if temperature is not None:
        _temperature_tensor(temperature, q.shape[1], q.device)
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
    Tq, Tk = q.shape[2], k.shape[2]
    if causal and Tq > Tk:
        raise ValueError(f"with causal=True q may not have more positions ({Tq}) than k ({Tk})")

    exact = _exact_logits(q, k)
    if score == "exact":
        compressed = exact
    else:
        if score == "hamming" and temperature is None:
            temperature = calibrate_temperature(q, k, sketcher=sketcher, causal=causal)
        norms = k.float().norm(dim=-1)
        if score in ("cos", "asym") and norms.max() > torch.finfo(torch.float16).max:
            raise ValueError(f"k has vector norms above {torch.finfo(torch.float16).max:g}: fp16 key norms overflow")
        norms = norms.to(torch.float16)  # what the cache stores
        compressed = sketched_logits(
            q, sketcher.sketch(k), sketcher=sketcher, score=score, temperature=temperature, key_norms=norms
        )

    visible = _visible(Tq, Tk, causal, q.device)  # [Tq, Tk]
    in_window = _in_window(Tq, Tk, window, causal, q.device) & visible
    logits = torch.where(in_window, exact, compressed).masked_fill(~visible, float("-inf"))
    probs = torch.softmax(logits, dim=-1)

    group = q.shape[1] // k.shape[1]
    v_exact = v.float().repeat_interleave(group, dim=1)
    if value_bits is None:
        v_comp = v_exact
    else:
        v_hat = quantize_values(v, value_bits, group_size).dequantize().float()
        v_comp = v_hat.repeat_interleave(group, dim=1)
    out = (probs * ~in_window) @ v_comp + (probs * in_window) @ v_exact
    out = out.to(q.dtype)
    return (out, probs) if return_probs else out


def _check_qk(q: torch.Tensor, k: torch.Tensor, sketcher: SimHashSketcher) -> None:
    if not isinstance(sketcher, SimHashSketcher):
        raise TypeError(f"sketcher must be a SimHashSketcher, got {type(sketcher).__name__}")
    check_tensor("q", q, ndim=4, dtypes=FLOAT_DTYPES)
    check_tensor("k", k, ndim=4, dtypes=FLOAT_DTYPES)
    check_same_device(q=q, k=k)
    if q.shape[-1] != sketcher.head_dim or k.shape[-1] != sketcher.head_dim:
        raise ValueError(
            f"q and k head_dim must equal sketcher.head_dim={sketcher.head_dim}, "
            f"got {q.shape[-1]} and {k.shape[-1]}"
        )
    if q.shape[0] != k.shape[0]:
        raise ValueError(f"q and k batch sizes differ: {q.shape[0]} vs {k.shape[0]}")
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"q heads ({q.shape[1]}) must be a multiple of k heads ({k.shape[1]})")


def _temperature_tensor(temperature, heads: int, device) -> torch.Tensor:
    t = torch.as_tensor(temperature, dtype=torch.float32, device=device)
    if t.dim() == 0:
        t = t.expand(heads)
    if t.shape != (heads,):
        raise ValueError(f"temperature must be a scalar or have shape [{heads}] (one per query head), got {tuple(t.shape)}")
    if not bool(torch.isfinite(t).all()) or bool((t <= 0).any()):
        raise ValueError("temperature must be finite and > 0")
    return t.view(1, heads, 1, 1)


def _exact_logits(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    group = q.shape[1] // k.shape[1]
    kf = k.float().repeat_interleave(group, dim=1)
    return q.float() @ kf.transpose(-1, -2) / math.sqrt(q.shape[-1])


def _positions(Tq: int, Tk: int, device):
    qpos = torch.arange(Tk - Tq, Tk, device=device).unsqueeze(-1)  # queries are the last Tq positions
    kpos = torch.arange(Tk, device=device).unsqueeze(0)
    return qpos, kpos


def _visible(Tq: int, Tk: int, causal: bool, device) -> torch.Tensor:
    qpos, kpos = _positions(Tq, Tk, device)
    return kpos <= qpos if causal else torch.ones(Tq, Tk, dtype=torch.bool, device=device)


def _in_window(Tq: int, Tk: int, window: int, causal: bool, device) -> torch.Tensor:
    """Key j is exact for query i iff it is among the newest ``window`` keys that query can see."""
    qpos, kpos = _positions(Tq, Tk, device)
    newest = qpos if causal else torch.full_like(qpos, Tk - 1)
    return (newest - kpos) < window


def _masked_std(x: torch.Tensor, mask: torch.Tensor, dims) -> torch.Tensor:
    m = mask.float()
    n = m.sum(dims)
    mean = (x * m).sum(dims) / n
    shape = [1 if i in dims else s for i, s in enumerate(x.shape)]
    var = (((x - mean.view(shape)) ** 2) * m).sum(dims) / n
    return var.sqrt()
