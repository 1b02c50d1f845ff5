"""Adapt a causal LM to H1B attention: straight-through training of temperatures, ``v_proj`` or LoRA adapters.

    ft = H1BFinetuner(model, FinetuneConfig(recipe="paper", bits=64), calibration_ids=train_ids[:4])
    ft.train(train_ids, steps=40, eval_ids=val_ids, eval_every=10, checkpoint="ft.pt")
    ft.perplexity(val_ids)                        # through H1BCache(compressed_prefill=True, temperature=learned)
    ft.perplexity(val_ids, exact=True)            # the adapted model with an ordinary (exact) cache
    ft.save("ft.pt"); H1BFinetuner.from_checkpoint(fresh_model, "ft.pt")   # only the adapted parameters

Recipes (``FinetuneConfig.recipe``):

``"paper"``
    The paper's: learned temperature(s) and every layer's ``v_proj``; the sketch matrices R stay fixed.
``"lora"``
    LoRA adapters (peft) on the q/k/v projections (``lora_targets``) plus the learned temperature(s).
``"temperature"``
    Only the temperature(s): the cheapest adaptation, a control for what ``v_proj`` / LoRA add.

Temperatures ("hamming" score only) are parameterised as ``log T`` -- one (``"global"``, the paper's), one per
layer (``"layer"``) or one per layer and query head (``"head"``) -- and initialised from
:func:`~h1bkv_lite.cache.fit_temperature` (per head, :func:`~h1bkv_lite.attention.calibrate_temperature` on
``calibration_ids``) averaged in log space over the heads (and layers) that share a value.

Training-time attention. Inside ``with ft.attention():`` every attention module of the model calls
:func:`h1b_train_attention` (registered as ``"h1b_train"`` in transformers' ``AttentionInterface``; the model's
own implementation is put back on exit). Its forward is :func:`~h1bkv_lite.attention.h1b_attention`'s and
``H1BCache(compressed_prefill=True)``'s: each query sees the newest ``window`` keys it can see (and the first
``sink`` tokens) exactly and every other key only through its sketch, with values quantized to ``value_bits``
(tested equal to ``eval.perplexity`` through ``H1BCache``). Only the backward differs, through surrogates:

``ste="clipped"`` (default): the hardtanh straight-through estimator of binarised networks (Hubara et al. 2016)
    applied to the projection of the *unit* vector, ``u = (x / |x|) R``: forward ``sign(u)`` (= the stored bit),
    backward ``d sign(u_i) / d u_i := 1[|u_i| <= 1]``. Each ``u_i`` is N(0, 1) whatever the vector's norm, so
    one clip suits every layer and head; the surrogate is scale-invariant like the sketch (no gradient along
    ``x``, which could never flip a bit), and bits far from their hyperplane (|u| > 1, about 32%) pass none.
    "hamming" and "cos" take it on query and key bits; "asym" keeps the query exact (its gradient is exact)
    and takes it on the key bits only; the fp16 key norm of "cos"/"asym" passes gradient straight through.
``ste="expected"``: the forward value of the sketch, the gradient of its expectation over R --
    ``1 - 2 theta / pi`` for "hamming" (cosine clamped to +-(1 - 1e-4), where arccos' slope is finite),
    the exact logit ``q.k * scaling`` for "asym" (unbiased for it) and "cos" (whose ``cos(pi h / b)`` estimates
    ``cos theta``). Deterministic and low-variance, but blind to which bits of this R are about to flip.

Values outside the window are quantized in the forward, exactly as the cache stores them, and passed straight
through (identity) in the backward, the usual estimator for rounding.

Memory and speed. With "hamming" or "asym" and the clipped surrogate, every chunk runs through torch SDPA, so on
CUDA no ``[B, Hq, T, T]`` float matrix is built: all keys exact (the FP16 control), all sketched (the paper's
recipe, LoRA, key centering, a learned R: :func:`_sketched_sdpa` says how the logits become dot products), or an
exact window and sinks mixed with sketched keys (:func:`_windowed_sdpa`: each key twice, a bool mask picks one
copy per pair). "cos" and the "expected" surrogate build the logits. The forms agree to float32 rounding,
gradients included (tested). On one H200, ``center_b128`` and ``asym_b128`` of ``results/finetune/`` trained
through the all-sketched form at 7.6-7.9k tokens/s each with four processes sharing the GPU (not timed alone);
``goal_b128`` (window and sinks) predates the windowed form and built the matrix: 4.5k. The windowed form is
1.4x faster than the matrix on 2 CPU cores (1024 tokens, 9 / 3 heads, b = 128, forward and backward); its GPU
speed is not measured yet.

Loss: ``(1 - distill) * CE + distill * KL(p_exact || p_h1b)`` per predicted token, where ``p_exact`` is the
*un-adapted* model with exact attention (original ``v_proj`` / LoRA disabled), computed without gradient.

Checkpoints hold only the adapted parameters (``log_temperature``, a learned ``projection`` and the trainable
model parameters by name), the key mean, the optimizer and LR-schedule state, the step and the logs; the batch
of step ``i`` depends only on ``(seed, i)``, so a run resumed from a checkpoint equals an uninterrupted one.
:meth:`H1BFinetuner.save_adapters` writes only what serving needs (a safetensors file of a few MB) and
:meth:`H1BFinetuner.from_adapters` applies it to a fresh model.

Beyond the paper (switches of :class:`FinetuneConfig`, default off, honoured identically here and in
:class:`~h1bkv_lite.cache.H1BCache` -- tested through the equality of the training forward and the cache's
perplexity): ``center_keys`` sketches ``k - mu`` and adds the exact ``q . mu * scaling`` (the math is in
:mod:`h1bkv_lite.cache`, "Key centering"); ``learn_projection`` makes each layer's R a parameter trained
through the clipped straight-through estimator.

On a GPU. ``H1BFinetuner(..., device="auto", autocast="auto")`` trains on CUDA when present with the model's
matmuls under bf16 autocast, while the training attention (sketch signs, Hamming scores, exact logits,
softmax, value sums) runs in float32 with autocast off. A training step reads nothing back to the host:
which keys are exact is decided from the shapes, values are quantized without checks, losses stay on the
device and are read back every ``log_every`` steps. ``gradient_checkpointing=True`` trades compute for
activation memory. Under ``torch.distributed`` (``accelerate launch``) :meth:`H1BFinetuner.train` is
data-parallel. ``scripts/finetune.py`` is the command line around all this (README, "Finetuning on a GPU").
"""
from __future__ import annotations

import functools
import json
import math
import os
import time
import warnings
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import pandas as pd
import torch
import torch.nn.functional as F
from tqdm.auto import trange
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

from . import memory
from ._device import model_device
from ._validation import check_choice, check_int, check_sketch_bits, check_tensor
from .cache import (
    H1BCache,
    allowed_mask,
    exact_logits,
    fit_key_mean,
    fit_temperature,
    masked_softmax,
    prompt_attention,
    text_config,
    weighted_values,
)
from .quant import VALUE_BITS, quantize_values_unchecked
from .sketch import SimHashSketcher

__all__ = [
    "AUTOCASTS",
    "DELTA_PREFIX",
    "RECIPES",
    "STES",
    "TEMPERATURES",
    "TRAIN_ATTENTION",
    "FinetuneConfig",
    "H1BFinetuner",
    "curve_flattened",
    "data_parallel",
    "h1b_train_attention",
    "resolve_device",
]

TRAIN_ATTENTION = "h1b_train"
"""Name of the training-time attention in transformers' ``AttentionInterface`` (and of its mask function)."""

RECIPES = ("paper", "lora", "temperature")
TEMPERATURES = ("global", "layer", "head")
STES = ("clipped", "expected")
TRAIN_SCORES = ("hamming", "cos", "asym")
CHECKPOINT_FORMAT = "h1bkv_lite.finetune/1"
ADAPTER_FORMAT = "h1bkv_lite.finetune.adapters/1"
DELTA_PREFIX = "h1bkv.delta."
"""Adapter-file name prefix of a trained model weight stored as its bf16 change (:meth:`H1BFinetuner.save_adapters`)."""
AUTOCASTS = ("off", "bf16", "auto")


# ------------------------------------------------------------------------------------------------ run helpers
def resolve_device(device=None, model=None) -> torch.device:
    """The training device: None -> ``model``'s (CPU without one), ``"auto"`` -> CUDA when present (the current
    CUDA device, e.g. a process's own under ``accelerate launch``) else CPU, otherwise ``torch.device(device)``.
    Raises ValueError for a CUDA device on a machine without CUDA."""
    if device is None:
        return model_device(model) if model is not None else torch.device("cpu")
    if device == "auto":
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"device must be None, 'auto', 'cpu', 'cuda' or 'cuda:N', got {device!r}") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={str(device)!r} but CUDA is not available here; use device='auto' or 'cpu'")
    return device


def _autocast_dtype(autocast, device: torch.device) -> torch.dtype | None:
    """bfloat16 or None for ``autocast`` in (None, "off", "bf16", "auto"); "auto": bf16 on a CUDA device that
    supports it."""
    if autocast is None or autocast == "off":
        return None
    check_choice("autocast", autocast, AUTOCASTS)
    if autocast == "auto":
        return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else None
    return torch.bfloat16


def data_parallel() -> tuple[int, int]:
    """``(rank, world_size)`` of the initialised ``torch.distributed`` process group, else ``(0, 1)``."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _average_gradients(params: list[torch.Tensor], world: int) -> None:
    """Average the gradients of ``params`` over the process group (a missing gradient counts as zeros), in
    place, in one flat all-reduce: no host sync."""
    grads = []
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        grads.append(p.grad)
    flat = torch.cat([g.reshape(-1).float() for g in grads])
    torch.distributed.all_reduce(flat)
    flat /= world
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()


def _agree(flag: bool, world: int, device) -> bool:
    """True if ``flag`` is True on any process of the group (one all-reduce, a host sync); ``flag`` alone
    without a group."""
    if world == 1:
        return bool(flag)
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return bool(t.item() > 0)


def curve_flattened(ppl, window: int = 3, tol: float = 0.01) -> bool:
    """Whether a held-out perplexity curve has flattened: the last evaluation improved on the best of the
    ``window`` evaluations before it by less than ``tol`` (relative), i.e.
    ``ppl[-1] > (1 - tol) * min(ppl[-1 - window:-1])``. False with fewer than ``window + 1`` evaluations.

    ppl: the held-out perplexities in evaluation order (a sequence of floats; NaN entries are skipped).
    Raises ValueError unless ``window >= 1`` and ``0 <= tol < 1``.
    """
    check_int("window", window, low=1)
    if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not 0 <= tol < 1:
        raise ValueError(f"tol must be a number in [0, 1), got {tol!r}")
    values = [float(x) for x in ppl if not math.isnan(float(x))]
    if len(values) < window + 1:
        return False
    return values[-1] > (1 - tol) * min(values[-1 - window:-1])


# ------------------------------------------------------------------------------------------------ surrogates
class _Substitute(torch.autograd.Function):
    """Forward ``value`` exactly, backward into ``surrogate`` (a straight-through estimator without rounding)."""

    @staticmethod
    def forward(ctx, value, surrogate):
        return value.detach().clone()

    @staticmethod
    def backward(ctx, grad):
        return None, grad


def _substitute(value: torch.Tensor, surrogate: torch.Tensor) -> torch.Tensor:
    return _Substitute.apply(value, surrogate) if surrogate.requires_grad else value


def _signs(x: torch.Tensor, projection: torch.Tensor, ste: str) -> torch.Tensor:
    """``sign(x @ R)`` as +-1 float32 ``[..., bits]`` (sign(0) = +1, the stored bit); clipped STE if asked.

    With the clipped STE the gradient reaches ``x`` and, when it is a learned parameter, ``R`` (through
    ``u = (x / |x|) R``)."""
    p = x @ projection  # the sketcher's own projection: same bits as SimHashSketcher.sketch
    s = torch.where(p >= 0, 1.0, -1.0)
    if ste == "clipped" and (x.requires_grad or projection.requires_grad):
        u = p / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)  # projection of the unit vector, ~N(0, 1)
        s = _substitute(s, u.clamp(-1.0, 1.0))
    return s


def _key_norms(k: torch.Tensor) -> torch.Tensor:
    """``|k|`` rounded to fp16 as the cache stores it, gradient straight through. ``[B, Hkv, N]``."""
    norms = k.norm(dim=-1)
    return _substitute(norms.to(torch.float16).float(), norms)


def compressed_logits(q: torch.Tensor, k: torch.Tensor, *, sketcher: SimHashSketcher, score: str, scaling: float,
                      temperature: torch.Tensor | None, ste: str, projection: torch.Tensor | None = None,
                      key_mean: torch.Tensor | None = None) -> torch.Tensor:
    """Logits of every query against every key seen through its sketch, with surrogate gradients.

    q ``[B, Hq, Tq, D]``, k ``[B, Hkv, N, D]`` (GQA); temperature ``[Hq]`` ("hamming"). projection: a learned
    R float32 ``[D, bits]`` (may require grad) instead of the sketcher's fixed one. key_mean: float32
    ``[Hkv, D]`` for key centering -- the sketch (and norm) of ``k - mu`` plus the exact ``q . mu * scaling``
    (see :mod:`h1bkv_lite.cache`). Returns float32 ``[B, Hq, Tq, N]``, equal (up to float rounding) to what
    :class:`~h1bkv_lite.cache.H1BCache` computes with the same settings.
    """
    group = q.shape[1] // k.shape[1]
    qf, kf = q.float(), k.float()
    if key_mean is not None:
        kf = kf - key_mean[None, :, None, :]  # what is sketched: k - mu, float32 as the cache does
    R = sketcher.projection_on(q.device) if projection is None else projection  # [D, b]
    bits = sketcher.bits
    sign_ste = "clipped" if ste == "clipped" else "none"
    if score == "hamming":
        sq = _signs(qf, R, sign_ste)
        sk = _signs(kf, R, sign_ste).repeat_interleave(group, dim=1)
        a = sq @ sk.transpose(-1, -2) / bits  # = 1 - 2 h / b
        if ste == "expected" and (q.requires_grad or k.requires_grad):
            qn = F.normalize(qf, dim=-1)
            kn = F.normalize(kf, dim=-1).repeat_interleave(group, dim=1)
            cos = (qn @ kn.transpose(-1, -2)).clamp(-1 + 1e-4, 1 - 1e-4)
            a = _Substitute.apply(a, 1 - 2 / math.pi * torch.acos(cos))
        return _plus_mean_term(a / temperature.view(1, -1, 1, 1), qf, key_mean, scaling)
    norms = _key_norms(kf).repeat_interleave(group, dim=1).unsqueeze(-2)  # [B, Hq, 1, N]
    if score == "cos":
        sq = _signs(qf, R, sign_ste)
        sk = _signs(kf, R, sign_ste).repeat_interleave(group, dim=1)
        h = (bits - sq @ sk.transpose(-1, -2)) / 2
        logits = qf.norm(dim=-1, keepdim=True) * norms * torch.cos(math.pi * h / bits) * scaling
    else:  # asym: the query stays exact
        sk = _signs(kf, R, sign_ste).repeat_interleave(group, dim=1)
        logits = math.sqrt(math.pi / 2) / bits * norms * ((qf @ R) @ sk.transpose(-1, -2)) * scaling
    if ste == "expected" and (q.requires_grad or k.requires_grad):
        exact = qf @ kf.repeat_interleave(group, dim=1).transpose(-1, -2) * scaling
        logits = _Substitute.apply(logits, exact)
    return _plus_mean_term(logits, qf, key_mean, scaling)


def _plus_mean_term(logits: torch.Tensor, qf: torch.Tensor, key_mean: torch.Tensor | None,
                    scaling: float) -> torch.Tensor:
    """``logits + q . mu * scaling`` (key centering; ``mu [Hkv, D]``, each query head its kv head's), or logits."""
    if key_mean is None:
        return logits
    mu = key_mean.repeat_interleave(qf.shape[1] // key_mean.shape[0], dim=0)[None, :, None, :]  # [1, Hq, 1, D]
    return logits + (qf * mu).sum(-1, keepdim=True) * scaling


def _exactness(window: int, sink: int, n_keys: int) -> str:
    """Which causal (query, key) pairs of a chunk of ``n_keys`` keys are exact, decided on the host (no sync):
    "all" (every pair), "none" (no pair) or "some". Key ``j`` is exact for the query at ``p >= j`` iff
    ``p - j < window`` or ``j < sink``; the farthest non-sink pair is ``(n_keys - 1, sink)``."""
    if sink >= n_keys or n_keys - 1 - sink < window:
        return "all"
    return "none" if window == 0 and sink == 0 else "some"


def h1b_train_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, sketcher: SimHashSketcher,
                        score: str = "hamming", temperature=None, scaling: float | None = None,
                        value_bits: int | None = 4, group_size: int | None = None, window: int = 0, sink: int = 0,
                        ste: str = "clipped", attention_mask=None, projection: torch.Tensor | None = None,
                        key_mean: torch.Tensor | None = None) -> torch.Tensor:
    """Differentiable causal H1B attention over one sequence chunk (no cache).

    q ``[B, Hq, T, D]``, k and v ``[B, Hkv, T, D]``; the queries are the last ``Tq`` positions. Key ``j`` is
    exact for the query at position ``p`` iff ``p - j < window`` or ``j < sink``; every other key is scored
    through its sketch (:func:`compressed_logits`; ``projection`` / ``key_mean`` as there) and its value read
    quantized (``value_bits``, straight through in the backward). temperature ("hamming"): a float or ``[Hq]``
    tensor (may require grad). attention_mask: transformers' mask (None, 2D padding or 4D). Returns
    ``[B, Hq, Tq, D]`` in q's dtype.

    Precision and syncs: everything here runs in float32 with autocast switched off (the sketch's signs,
    the Hamming scores, the exact logits, the softmax and the value sums), whatever autocast the model's
    projections run under (e.g. bf16 on CUDA); nothing reads a value back to the host.
    """
    check_choice("score", score, TRAIN_SCORES)
    check_choice("ste", ste, STES)
    if score == "hamming" and temperature is None:
        raise ValueError("temperature is required for score='hamming'")
    with torch.autocast(device_type=q.device.type, enabled=False):
        return _train_attention(q, k, v, sketcher, score, temperature, scaling, value_bits, group_size, window,
                                sink, ste, attention_mask, projection, key_mean)


def _train_attention(q, k, v, sketcher, score, temperature, scaling, value_bits, group_size, window, sink, ste,
                     attention_mask, projection, key_mean) -> torch.Tensor:
    if score == "hamming":
        temperature = torch.as_tensor(temperature, dtype=torch.float32, device=q.device).expand(q.shape[1])
    D, Tq, N = q.shape[-1], q.shape[2], k.shape[2]
    scaling = D**-0.5 if scaling is None else scaling
    exactness = _exactness(window, sink, N)
    if Tq == N and exactness == "all":  # exact attention of a chunk over itself: torch SDPA
        return prompt_attention(q.float(), k.float(), v.float(), attention_mask, scaling).to(q.dtype)
    if Tq == N and exactness == "none" and ste == "clipped" and score in ("hamming", "asym"):
        v_in = v if value_bits is None else _stored_values(v, value_bits, group_size)
        return _sketched_sdpa(q, k, v_in, sketcher, score, temperature, scaling, projection, key_mean,
                              attention_mask).to(q.dtype)
    if Tq == N and exactness == "some" and ste == "clipped" and score in ("hamming", "asym"):
        return _windowed_sdpa(q, k, v, sketcher, score, temperature, scaling, value_bits, group_size, window, sink,
                              projection, key_mean, attention_mask).to(q.dtype)
    return _materialized_attention(q, k, v, sketcher, score, temperature, scaling, value_bits, group_size, window,
                                   sink, ste, attention_mask, projection, key_mean, exactness)


def _stored_values(v: torch.Tensor, value_bits: int, group_size: int | None) -> torch.Tensor:
    """``v`` as the cache stores it (quantized to ``value_bits`` per ``group_size``, default the head), with the
    identity as its gradient (the straight-through estimator for rounding)."""
    quantized = quantize_values_unchecked(v.detach(), value_bits, group_size or v.shape[-1]).dequantize()
    return _substitute(quantized, v)


def _exact_pairs(q_len: int, n_keys: int, window: int, sink: int, device) -> torch.Tensor:
    """bool ``[Tq, N]``: key ``j`` is exact (key and value) for the query at position ``p`` (the last ``Tq`` of
    ``N``) iff ``p - j < window`` or ``j < sink`` (causality is the attention mask's)."""
    qpos = torch.arange(n_keys - q_len, n_keys, device=device).unsqueeze(-1)
    kpos = torch.arange(n_keys, device=device).unsqueeze(0)
    return ((qpos - kpos) < window) | (kpos < sink)


def _sketch_features(qf, kc, sketcher, score, temperature, scaling, projection):
    """Query and key features whose dot products are the sketched logits (see :func:`_sketched_sdpa`), from float32
    queries and (centred) keys: ``q' [B, Hq, T, b]``, ``k' [B, Hkv, N, b]``."""
    R = sketcher.projection_on(qf.device) if projection is None else projection
    bits = sketcher.bits
    sk = _signs(kc, R, "clipped")  # [B, Hkv, N, b]
    if score == "hamming":
        return _signs(qf, R, "clipped") / (bits * temperature.view(1, -1, 1, 1)), sk
    return (qf @ R) * (math.sqrt(math.pi / 2) / bits * scaling), sk * _key_norms(kc).unsqueeze(-1)  # asym


def _windowed_sdpa(q, k, v, sketcher, score, temperature, scaling, value_bits, group_size, window, sink, projection,
                   key_mean, attention_mask):
    """Exact window and sink keys mixed with sketched ones, as one torch SDPA over ``2N`` keys: each key appears
    twice, once sketched (features ``[mu, k']``, value quantized) and once exact (``[k, 0]``, exact value), the
    query as ``[q * scaling, q']``, and the mask lets each (query, key) pair see exactly one of the two copies
    (the exact one within the window or among the sinks). Dot products give the materialized form's logits --
    sketched ``q' . k' + q . mu * scaling`` (key centering's term, :func:`compressed_logits`), exact
    ``q . k * scaling`` -- and one softmax over both copies is its softmax, so outputs and gradients agree up to
    float32 rounding (tested). Memory: a bool ``[B, 1, T, 2N]`` mask and features of ``D + b`` per head; no
    ``[B, Hq, T, N]`` float tensor of ours (CUDA's memory-efficient kernel takes the mask)."""
    B, Hq, T, D = q.shape
    Hkv = k.shape[1]
    qf, kf, vf = q.float(), k.float(), v.float()
    mu = torch.zeros(Hkv, D, device=q.device) if key_mean is None else key_mean.to(q.device, torch.float32)
    kc = kf - mu[None, :, None, :]
    q_feat, k_feat = _sketch_features(qf, kc, sketcher, score, temperature, scaling, projection)
    query = torch.cat([qf * scaling, q_feat], dim=-1)
    sketched = torch.cat([mu[None, :, None, :].expand(B, Hkv, T, D), k_feat], dim=-1)
    exact = torch.cat([kf, k_feat.new_zeros(k_feat.shape)], dim=-1)
    keys = torch.cat([sketched, exact], dim=2)  # [B, Hkv, 2N, D + b]
    v_sketched = vf if value_bits is None else _stored_values(vf, value_bits, group_size)
    values = torch.cat([v_sketched, vf], dim=2)
    allowed = allowed_mask(attention_mask, B, T, T, q.device)  # [B, 1, T, N]
    keep = _exact_pairs(T, T, window, sink, q.device)  # the exact copy
    mask = torch.cat([allowed & ~keep, allowed & keep], dim=-1)
    group = Hq // Hkv
    if group > 1:
        keys, values = keys.repeat_interleave(group, dim=1), values.repeat_interleave(group, dim=1)
    out = F.scaled_dot_product_attention(query, keys, values, attn_mask=mask, scale=1.0)
    return out.masked_fill(~allowed.any(-1, keepdim=True), 0.0)


def _sketched_sdpa(q, k, v, sketcher, score, temperature, scaling, projection, key_mean, attention_mask):
    """Every key through its sketch, as torch SDPA (no ``T x T`` matrix on CUDA's memory-efficient kernel):
    "hamming"'s logits ``(1 - 2 h / b) / T`` are the dot products of ``q' = sign(qR) / (b T)`` with
    ``k' = sign(kR)``, and "asym"'s ``sqrt(pi / 2) / b * |k| * (R^T q) . sign(kR) * scaling`` those of
    ``q' = (qR) * sqrt(pi / 2) / b * scaling`` with ``k' = |k| sign(kR)``; SDPA's scale is 1. Key centering's
    exact term ``q . mu * scaling`` is the same for every key of a query row, so the softmax drops it. The
    clipped straight-through surrogates are those of :func:`compressed_logits` (the signs carry them), so the
    gradients equal the materialized form's up to float rounding (tested)."""
    qf, kf = q.float(), k.float()
    if key_mean is not None:
        kf = kf - key_mean[None, :, None, :]
    q_feat, k_feat = _sketch_features(qf, kf, sketcher, score, temperature, scaling, projection)
    return prompt_attention(q_feat, k_feat, v.float(), attention_mask, 1.0)


def _materialized_attention(q, k, v, sketcher, score, temperature, scaling, value_bits, group_size, window, sink,
                            ste, attention_mask, projection, key_mean, exactness) -> torch.Tensor:
    """The general form: the ``[B, Hq, Tq, N]`` logits built, exact and sketched keys mixed per pair."""
    B, Hq, Tq, D = q.shape
    N = k.shape[2]
    allowed = allowed_mask(attention_mask, B, Tq, N, q.device)  # [B, 1, Tq, N]
    if exactness == "all":
        return weighted_values(masked_softmax(exact_logits(q, k, scaling), allowed), v).to(q.dtype)
    comp = compressed_logits(q, k, sketcher=sketcher, score=score, scaling=scaling, temperature=temperature,
                             ste=ste, projection=projection, key_mean=key_mean)
    if exactness == "none":  # no exact key at all: no exact logits to build
        probs = masked_softmax(comp, allowed)
    else:
        keep = _exact_pairs(Tq, N, window, sink, q.device)
        probs = masked_softmax(torch.where(keep, exact_logits(q, k, scaling), comp), allowed)
    if value_bits is None:
        return weighted_values(probs, v).to(q.dtype)
    v_hat = _stored_values(v, value_bits, group_size)
    if exactness == "none":
        return weighted_values(probs, v_hat).to(q.dtype)
    out = weighted_values(probs * ~keep, v_hat) + weighted_values(probs * keep, v)
    return out.to(q.dtype)


# ------------------------------------------------------------------------------------------------ the hook
_ACTIVE: dict[int, "H1BFinetuner"] = {}  # id(config) -> the finetuner whose attention() is entered


def _interface_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """The ``"h1b_train"`` attention function: ``(out [B, T, Hq, D], None)`` like transformers' own."""
    ft = _ACTIVE.get(id(module.config))
    if ft is None:
        raise RuntimeError(
            f"attention implementation {TRAIN_ATTENTION!r} is only valid inside `with H1BFinetuner.attention():`"
        )
    if kwargs.get("softcap") is not None:
        raise NotImplementedError("h1b_train attention does not support attention softcapping")
    if dropout:
        raise NotImplementedError(f"h1b_train attention does not implement attention dropout (dropout={dropout}); "
                                  "set the model's attention_dropout to 0")
    window = kwargs.get("sliding_window")
    if window is not None and key.shape[2] > window:
        raise NotImplementedError("h1b_train attention implements full attention only (sliding-window layer)")
    out = ft._attend(module.layer_idx, query, key, value, attention_mask, scaling)
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(TRAIN_ATTENTION, _interface_attention)
AttentionMaskInterface.register(TRAIN_ATTENTION, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])


# ------------------------------------------------------------------------------------------------ config
@dataclass(frozen=True)
class FinetuneConfig:
    """What is adapted and how (see the module docstring).

    Attributes
    ----------
    recipe : "paper" (T + v_proj), "lora" (LoRA on ``lora_targets`` + T) or "temperature" (T only).
    bits, score, value_bits, group_size, window, sink, sketch_seed : the H1B attention trained for, as in
        :class:`~h1bkv_lite.cache.H1BCache` (layer ``i`` sketches with seed ``sketch_seed + i``).
    temperature : granularity of the learned T ("hamming"): "global", "layer" or "head".
    train_temperature : learn T (else it stays at its calibrated value).
    ste : "clipped" or "expected" (module docstring).
    lora_rank, lora_alpha, lora_targets : LoRA settings (dropout 0, so training is deterministic).
    distill : weight of the KL-to-exact-model term, in [0, 1] (0: plain LM loss).
    lr, temperature_lr : AdamW learning rates of the weights (v_proj / LoRA) and of log T.
    batch_size : training sequences per step (the global batch: data-parallel processes split it).
    max_grad_norm : clip (None: no clipping).
    seed : LoRA initialisation and the order of training batches.
    center_keys : beyond the paper (default False: the paper's form). Sketch ``k - mu`` with ``mu`` the
        per-layer, per-kv-head, per-channel key mean calibrated on ``calibration_ids`` and add the exact
        ``q . mu * scaling`` to compressed-key logits (the math: :mod:`h1bkv_lite.cache`, "Key centering");
        ``mu`` is saved with the adapted parameters and handed to the cache (``H1BCache(key_mean=mu)``).
    learn_projection : beyond the paper (default False: R fixed, regenerated from its seed). Train each layer's
        R ``[D, bits]`` through the clipped straight-through estimator (so it needs ``ste="clipped"``); the
        learned R is an adapted parameter (``"projection"``, ``[L, D, bits]``) served by
        ``H1BCache(projection=R)``.
    projection_lr : AdamW learning rate of a learned R (its entries start N(0, 1)).
    """

    recipe: str = "paper"
    bits: int = 256
    score: str = "hamming"
    value_bits: int = 4
    group_size: int | None = None
    window: int = 0
    sink: int = 0
    sketch_seed: int = 0
    temperature: str = "global"
    train_temperature: bool = True
    ste: str = "clipped"
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj")
    distill: float = 0.0
    lr: float = 1e-4
    temperature_lr: float = 1e-2
    batch_size: int = 2
    max_grad_norm: float | None = 1.0
    seed: int = 0
    center_keys: bool = False
    learn_projection: bool = False
    projection_lr: float = 1e-3

    def __post_init__(self):
        check_choice("recipe", self.recipe, RECIPES)
        check_sketch_bits(self.bits)
        check_choice("score", self.score, TRAIN_SCORES)
        check_choice("value_bits", self.value_bits, VALUE_BITS)
        if self.group_size is not None:
            check_int("group_size", self.group_size, low=1)
        check_int("window", self.window, low=0)
        check_int("sink", self.sink, low=0)
        check_int("sketch_seed", self.sketch_seed, low=0)
        check_choice("temperature", self.temperature, TEMPERATURES)
        _check_bool("train_temperature", self.train_temperature)
        check_choice("ste", self.ste, STES)
        check_int("lora_rank", self.lora_rank, low=1)
        _check_positive("lora_alpha", self.lora_alpha)
        if isinstance(self.lora_targets, str) or not self.lora_targets or not all(
                isinstance(t, str) for t in self.lora_targets):
            raise TypeError(f"lora_targets must be a non-empty tuple of module names, got {self.lora_targets!r}")
        object.__setattr__(self, "lora_targets", tuple(self.lora_targets))
        if isinstance(self.distill, bool) or not isinstance(self.distill, (int, float)) or not 0 <= self.distill <= 1:
            raise ValueError(f"distill must be a number in [0, 1], got {self.distill!r}")
        _check_positive("lr", self.lr)
        _check_positive("temperature_lr", self.temperature_lr)
        check_int("batch_size", self.batch_size, low=1)
        if self.max_grad_norm is not None:
            _check_positive("max_grad_norm", self.max_grad_norm)
        check_int("seed", self.seed, low=0)
        _check_bool("center_keys", self.center_keys)
        _check_bool("learn_projection", self.learn_projection)
        _check_positive("projection_lr", self.projection_lr)
        if self.recipe == "temperature" and (self.score != "hamming" or not self.train_temperature):
            raise ValueError("recipe='temperature' trains only T: it needs score='hamming' and train_temperature=True")
        if self.learn_projection and self.ste != "clipped":
            raise ValueError("learn_projection=True needs ste='clipped' (the 'expected' surrogate does not depend "
                             f"on R, so R would get no gradient), got ste={self.ste!r}")

    @property
    def learns_temperature(self) -> bool:
        return self.score == "hamming" and self.train_temperature

    def cache_kwargs(self) -> dict:
        """The :class:`~h1bkv_lite.cache.H1BCache` settings of the attention trained for (temperature aside)."""
        return dict(bits=self.bits, score=self.score, value_bits=self.value_bits,
                    group_size=self.group_size, window=self.window, sink=self.sink, seed=self.sketch_seed)


def _check_bool(name: str, value) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")


def _check_positive(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")


# ------------------------------------------------------------------------------------------------ finetuner
class H1BFinetuner:
    """Adapts ``model`` (in place) to H1B attention; see the module docstring.

    Parameters
    ----------
    model : a transformers causal LM whose attention modules dispatch through ``AttentionInterface``
        (Llama, Mistral, Qwen2, ...). It is modified in place (``v_proj`` weights or injected LoRA layers) until
        :meth:`restore`; its parameters' ``requires_grad`` flags are set for the recipe.
    config : :class:`FinetuneConfig`.
    calibration_ids : ``long [n, T]`` training text to calibrate the initial "hamming" temperature (and, with
        ``center_keys``, the key mean) on, or
    temperature : the initial T instead (float, ``[Hq]``, ``[L, 1]`` or ``[L, Hq]``).
    key_mean : ``center_keys`` only: the key mean float ``[L, Hkv, D]`` instead of calibrating it.
    device : where to train: None (the model's device), ``"auto"`` (CUDA when present, else CPU), or a
        device; the model is moved there.
    autocast : None / ``"off"`` (default: the model's dtype), ``"bf16"`` (bf16 autocast of the model's
        matmuls; the sketch, Hamming scores and softmax stay float32, see :func:`h1b_train_attention`) or
        ``"auto"`` (bf16 on a CUDA device that supports it, else off). Evaluation never autocasts.
    gradient_checkpointing : recompute each decoder layer in the backward (transformers'
        ``gradient_checkpointing_enable``, non-reentrant): less activation memory for longer sequences or
        bigger batches, same loss and gradients. The model is in train mode during training steps then
        (attention dropout must be 0: refused otherwise).

    Raises ValueError / TypeError naming the argument (see :class:`FinetuneConfig` for the config's own).
    """

    def __init__(self, model, config: FinetuneConfig | None = None, *, calibration_ids: torch.Tensor | None = None,
                 temperature=None, key_mean: torch.Tensor | None = None, device=None, autocast: str | None = None,
                 gradient_checkpointing: bool = False):
        config = FinetuneConfig() if config is None else config
        if not isinstance(config, FinetuneConfig):
            raise TypeError(f"config must be a FinetuneConfig, got {type(config).__name__}")
        if not isinstance(model, torch.nn.Module) or not hasattr(model, "config"):
            raise TypeError(f"model must be a transformers model, got {type(model).__name__}")
        if id(text_config(model.config)) in _ACTIVE:
            raise RuntimeError("this model is inside another finetuner's attention() block")
        _check_bool("gradient_checkpointing", gradient_checkpointing)
        self.model, self.config = model, config
        self.shape = memory.model_shape(text_config(model.config))
        L, Hq, D = self.shape.num_layers, self.shape.num_heads, self.shape.head_dim
        if config.group_size is not None and D % config.group_size:
            raise ValueError(f"group_size must divide head_dim={D}, got {config.group_size}")
        self.device = resolve_device(device, model)
        if model_device(model) != self.device:
            model.to(self.device)
        self.autocast_dtype = _autocast_dtype(autocast, self.device)
        self.gradient_checkpointing = gradient_checkpointing
        self.n_base_params = sum(p.numel() for p in model.parameters())
        self.sketchers = [SimHashSketcher(D, config.bits, config.sketch_seed + i) for i in range(L)]
        self.key_mean = self._init_key_mean(calibration_ids, key_mean)
        self.log_temperature = self._init_temperature(calibration_ids, temperature)
        self.initial_log_temperature = (None if self.log_temperature is None
                                        else self.log_temperature.detach().cpu().clone())
        self.projection = None  # [L, D, bits] learned R (learn_projection)
        if config.learn_projection:
            R = torch.stack([sk.projection for sk in self.sketchers]).to(self.device)
            self.projection = torch.nn.Parameter(R, requires_grad=True)
        self._requires_grad = {name: p.requires_grad for name, p in model.named_parameters()}
        self._original: dict[str, torch.Tensor] = {}
        self._peft = None
        self._apply_recipe()
        if gradient_checkpointing:
            kwargs = {"use_reentrant": False}
            if hasattr(self.model, "activation_checkpointing_enable"):  # transformers >= 5.23
                self.model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
            else:
                self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        self.optimizer = torch.optim.AdamW(self._param_groups(), weight_decay=0.0)
        self.scheduler = None  # an LR scheduler stepped after every optimizer step (use_cosine_schedule)
        self.schedule: dict | None = None
        self.step = 0
        self.log: list[dict] = []  # one row per training step
        self.evals: list[dict] = []  # one row per evaluation
        self._restored = False

    def __repr__(self) -> str:
        return (f"H1BFinetuner(recipe={self.config.recipe!r}, bits={self.config.bits}, score={self.config.score!r}, "
                f"step={self.step}, trainable={self.n_trainable():,})")

    # ---- setup
    def _init_key_mean(self, calibration_ids, key_mean) -> torch.Tensor | None:
        """``mu`` float32 ``[L, Hkv, D]`` on the device (``center_keys``), never trained."""
        cfg = self.config
        if not cfg.center_keys:
            if key_mean is not None:
                raise ValueError("key_mean applies to center_keys=True only")
            return None
        shape = (self.shape.num_layers, self.shape.num_kv_heads, self.shape.head_dim)
        if key_mean is None:
            if calibration_ids is None:
                raise ValueError("center_keys=True needs calibration_ids (text to calibrate the key mean on) or "
                                 "key_mean")
            check_tensor("calibration_ids", calibration_ids, ndim=2, dtypes=(torch.long,))
            key_mean = fit_key_mean(self.model, calibration_ids.to(self.device))
        check_tensor("key_mean", key_mean, ndim=3)
        if tuple(key_mean.shape) != shape:
            raise ValueError(f"key_mean must have shape {list(shape)}, got {list(key_mean.shape)}")
        return key_mean.detach().float().to(self.device)

    def _init_temperature(self, calibration_ids, temperature) -> torch.nn.Parameter | None:
        cfg, L, Hq = self.config, self.shape.num_layers, self.shape.num_heads
        if cfg.score != "hamming":
            if temperature is not None:
                raise ValueError(f"temperature applies to score='hamming' only, got score={cfg.score!r}")
            return None
        ids_for_mean = cfg.center_keys  # calibration_ids may come for the key mean alone
        if (calibration_ids is None and temperature is None) or (
                calibration_ids is not None and temperature is not None and not ids_for_mean):
            raise ValueError("score='hamming' needs exactly one of calibration_ids (training text to calibrate T on) "
                             "or temperature")
        if temperature is None:
            check_tensor("calibration_ids", calibration_ids, ndim=2, dtypes=(torch.long,))
            t = fit_temperature(self.model, calibration_ids.to(self.device), bits=cfg.bits, seed=cfg.sketch_seed,
                                key_mean=self.key_mean)
        else:
            if isinstance(temperature, bool) or not isinstance(temperature, (int, float, torch.Tensor)):
                raise TypeError(f"temperature must be a float or a tensor, got {type(temperature).__name__}")
            t = torch.as_tensor(temperature, dtype=torch.float32).detach().cpu()
            if not (t.dim() == 0 or t.shape in ((Hq,), (L, 1), (L, Hq))):
                raise ValueError(f"temperature must be a float or have shape [{Hq}], [{L}, 1] or [{L}, {Hq}]; "
                                 f"got {tuple(t.shape)}")
        t = t.float().cpu().expand(L, Hq)
        if not bool(torch.isfinite(t).all()) or bool((t <= 0).any()):
            raise ValueError("temperature must be finite and > 0")
        log_t = t.log()
        if cfg.temperature == "layer":
            log_t = log_t.mean(dim=1, keepdim=True)
        elif cfg.temperature == "global":
            log_t = log_t.mean().view(1, 1)
        return torch.nn.Parameter(log_t.clone().to(self.device), requires_grad=cfg.learns_temperature)

    def _apply_recipe(self) -> None:
        cfg = self.config
        for p in self.model.parameters():
            p.requires_grad_(False)
        if cfg.recipe == "paper":
            names = [name for name, _ in self.model.named_parameters() if _is_v_proj(name)]
            if not names:
                raise ValueError("recipe='paper' needs attention modules with a `v_proj` projection")
            params = dict(self.model.named_parameters())
            for name in names:
                self._original[name] = params[name].detach().clone()
                params[name].requires_grad_(True)
        elif cfg.recipe == "lora":
            try:
                from peft import LoraConfig, get_peft_model  # noqa: PLC0415 -- optional dependency
            except ImportError as err:
                raise ImportError("recipe='lora' needs the optional `peft` package: pip install peft") from err
            lora = LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, target_modules=list(cfg.lora_targets),
                              lora_dropout=0.0, bias="none")
            with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
                torch.manual_seed(cfg.seed)
                self._peft = get_peft_model(self.model, lora)  # injects LoRA layers into self.model in place

    def _param_groups(self) -> list[dict]:
        groups = []
        weights = [p for p in self.model.parameters() if p.requires_grad]
        if weights:
            groups.append({"params": weights, "lr": self.config.lr})
        if self.log_temperature is not None and self.log_temperature.requires_grad:
            groups.append({"params": [self.log_temperature], "lr": self.config.temperature_lr})
        if self.projection is not None:
            groups.append({"params": [self.projection], "lr": self.config.projection_lr})
        if not groups:
            raise ValueError("nothing to train: this recipe with train_temperature=False leaves no parameter")
        return groups

    # ---- what is trained
    def trainable_parameters(self) -> dict[str, torch.nn.Parameter]:
        """The adapted parameters by name (``log_temperature`` first when learned, then ``projection`` when
        learned, then the model's)."""
        out = {}
        if self.log_temperature is not None and self.log_temperature.requires_grad:
            out["log_temperature"] = self.log_temperature
        if self.projection is not None:
            out["projection"] = self.projection
        out.update((name, p) for name, p in self.model.named_parameters() if p.requires_grad)
        return out

    def n_trainable(self) -> int:
        """Number of trained scalars (temperatures included)."""
        return sum(p.numel() for p in self.trainable_parameters().values())

    def trainable_fraction(self) -> float:
        """``n_trainable() / parameters of the un-adapted model``."""
        return self.n_trainable() / self.n_base_params

    def temperatures(self) -> torch.Tensor | None:
        """Current T, float32 ``[L, Hq]`` on the CPU (None unless "hamming")."""
        if self.log_temperature is None:
            return None
        L, Hq = self.shape.num_layers, self.shape.num_heads
        return self.log_temperature.detach().exp().cpu().expand(L, Hq).clone()

    def method(self):
        """The cache factory that serves the adapted model: ``functools.partial(H1BCache, ..., temperature=T)``
        (plus ``key_mean=mu`` with ``center_keys`` and ``projection=R`` with ``learn_projection``)."""
        kwargs = self.config.cache_kwargs()
        if self.config.score == "hamming":
            kwargs["temperature"] = self.temperatures()
        if self.key_mean is not None:
            kwargs["key_mean"] = self.key_mean.detach().cpu().clone()
        if self.projection is not None:
            kwargs["projection"] = self.projection.detach().cpu().clone()
        return functools.partial(H1BCache, **kwargs)

    # ---- attention
    @contextmanager
    def attention(self):
        """Within this block the model attends with :func:`h1b_train_attention` (differentiable H1B)."""
        self._check_usable()
        config = text_config(self.model.config)
        if id(config) in _ACTIVE:
            raise RuntimeError("attention() blocks of a model cannot be nested")
        previous = config._attn_implementation
        _ACTIVE[id(config)] = self
        config._attn_implementation = TRAIN_ATTENTION
        try:
            yield self
        finally:
            config._attn_implementation = previous
            del _ACTIVE[id(config)]

    def _attend(self, layer_idx, q, k, v, attention_mask, scaling):
        cfg = self.config
        temperature = None
        if self.log_temperature is not None:
            log_t = self.log_temperature[min(layer_idx, self.log_temperature.shape[0] - 1)]
            temperature = log_t.exp().expand(self.shape.num_heads)
        return h1b_train_attention(
            q, k, v, sketcher=self.sketchers[layer_idx], score=cfg.score, temperature=temperature, scaling=scaling,
            value_bits=cfg.value_bits, group_size=cfg.group_size, window=cfg.window, sink=cfg.sink, ste=cfg.ste,
            attention_mask=attention_mask, projection=None if self.projection is None else self.projection[layer_idx],
            key_mean=None if self.key_mean is None else self.key_mean[layer_idx])

    # ---- training
    def _autocast(self):
        """bf16 autocast of the model's matmuls when asked (``autocast=``), else a no-op context."""
        return torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype or torch.bfloat16,
                              enabled=self.autocast_dtype is not None)

    @torch.no_grad()
    def _teacher_logits(self, batch: torch.Tensor) -> torch.Tensor:
        """Next-token logits of the un-adapted model with exact attention."""
        with self._autocast():
            if self._peft is not None:
                with self._peft.disable_adapter():
                    return self.model(input_ids=batch, use_cache=False).logits
            if self._original:
                return torch.func.functional_call(self.model, self._original, (),
                                                  {"input_ids": batch, "use_cache": False}).logits
            return self.model(input_ids=batch, use_cache=False).logits

    def _loss_tensors(self, batch: torch.Tensor, backward: bool = False
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(loss, ce, kl)`` as 0-dim device tensors (kl NaN without distillation): no host sync.

        ``backward=True`` also back-propagates, still inside :meth:`attention` (gradient checkpointing
        recomputes layers in the backward, and they must attend as in the forward) but outside autocast."""
        d = self.config.distill
        teacher = self._teacher_logits(batch)[:, :-1].float() if d > 0 else None
        with self.attention():
            with self._autocast():
                logits = self.model(input_ids=batch, use_cache=False).logits[:, :-1].float()
            ce = F.cross_entropy(logits.transpose(1, 2), batch[:, 1:])
            if teacher is None:
                loss, kl = ce, torch.full((), float("nan"), device=ce.device)
            else:
                kl = F.kl_div(F.log_softmax(logits, -1), F.log_softmax(teacher, -1), log_target=True,
                              reduction="none").sum(-1).mean()
                loss = (1 - d) * ce + d * kl
            if backward:
                loss.backward()
        return loss, ce.detach(), kl.detach()

    def loss(self, batch: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        """Training loss on ``batch long [B, T]`` through H1B attention: ``(loss, {"ce", "kl"})`` (kl NaN without
        distillation). Reads the parts back to the host; :meth:`train` does not call it."""
        loss, ce, kl = self._loss_tensors(batch)
        return loss, {"ce": ce.item(), "kl": kl.item()}

    def _batch_indices(self, step: int, n: int) -> torch.Tensor:
        """Rows of the training windows used at ``step``: a fresh permutation of all ``n`` rows per epoch."""
        B = self.config.batch_size
        rows = []
        for g in range(step * B, (step + 1) * B):
            epoch, i = divmod(g, n)
            perm = torch.randperm(n, generator=torch.Generator().manual_seed(self.config.seed * 100_003 + epoch))
            rows.append(int(perm[i]))
        return torch.tensor(rows)

    def use_cosine_schedule(self, warmup_steps: int, total_steps: int) -> None:
        """Linear warm-up over ``warmup_steps`` then cosine decay to 0 at ``total_steps``, applied to every learning
        rate (transformers' ``get_cosine_schedule_with_warmup``); stepped by :meth:`train` after each optimizer
        step and saved in checkpoints. Call before :meth:`load` to resume a scheduled run.
        Raises ValueError unless ``0 <= warmup_steps <= total_steps`` and ``total_steps >= 1``."""
        from transformers import get_cosine_schedule_with_warmup  # noqa: PLC0415

        check_int("total_steps", total_steps, low=1)
        check_int("warmup_steps", warmup_steps, low=0, high=total_steps)
        self.scheduler = get_cosine_schedule_with_warmup(self.optimizer, warmup_steps, total_steps)
        self.schedule = {"name": "cosine", "warmup_steps": warmup_steps, "total_steps": total_steps}

    def lr(self) -> float:
        """The current learning rate of the first parameter group (the weights', or T's when only T trains)."""
        return float(self.optimizer.param_groups[0]["lr"])

    def train(self, train_ids: torch.Tensor, steps: int, *, eval_ids: torch.Tensor | None = None,
              eval_every: int | None = None, eval_batch_size: int = 1, checkpoint=None,
              checkpoint_every: int | None = None, progress: bool = True, log_every: int = 1,
              deadline: float | None = None, on_eval=None) -> pd.DataFrame:
        """Train until ``self.step == steps`` (resuming where a loaded checkpoint left off).

        train_ids ``long [n, T]``: training windows; step ``i`` uses ``batch_size`` of them, chosen from
        ``(seed, i)`` only. eval_ids: held-out windows, scored with :meth:`perplexity` before the first step
        (when nothing was evaluated yet), every ``eval_every`` steps and at the end. checkpoint: a path written every ``checkpoint_every``
        steps (default: only at the end). Returns :meth:`history`.

        Host syncs: a step reads nothing back to the host; the losses, gradient norms and temperatures of
        the steps are read back together every ``log_every`` steps (and before an evaluation, a checkpoint
        or the end), which is also when the progress bar's loss updates. A step's ``seconds`` is the wall
        time between read-backs divided by their steps.

        Data parallel: inside an initialised ``torch.distributed`` process group (e.g. ``accelerate launch``)
        each of the ``W`` processes takes rows ``rank::W`` of the step's ``batch_size`` rows (which ``W``
        must divide), and the gradients are averaged over processes before clipping: the same update as one
        process with the whole batch. The logged loss is the mean over processes. Only rank 0 writes the
        checkpoint; every rank evaluates (identical numbers).

        deadline: a ``time.monotonic()`` time after which training stops early (after the current step;
        checkpointed when a path is given) -- ``self.step < steps`` then tells the caller. on_eval: called as
        ``on_eval(self)`` after every evaluation and checkpoint write (e.g. to write a log file); if it returns
        True, training stops there (e.g. once the held-out curve has flattened, :func:`curve_flattened`).
        """
        self._check_usable()
        check_tensor("train_ids", train_ids, ndim=2, dtypes=(torch.long,))
        check_int("steps", steps, low=0)
        check_int("log_every", log_every, low=1)
        if eval_every is not None:
            check_int("eval_every", eval_every, low=1)
        if checkpoint_every is not None:
            check_int("checkpoint_every", checkpoint_every, low=1)
            if checkpoint is None:
                raise ValueError("checkpoint_every needs a checkpoint path")
        if eval_ids is not None:
            check_tensor("eval_ids", eval_ids, ndim=2, dtypes=(torch.long,))
        rank, world = data_parallel()
        if self.config.batch_size % world:
            raise ValueError(f"batch_size={self.config.batch_size} must be a multiple of the {world} data-parallel "
                             "processes")
        n = train_ids.shape[0]
        params = list(self.trainable_parameters().values())
        if world > 1:  # every process starts from rank 0's adapted state (calibrations may differ in rounding)
            with torch.no_grad():
                for tensor in params + ([self.key_mean] if self.key_mean is not None else []):
                    torch.distributed.broadcast(tensor.data, src=0)
        if eval_ids is not None and not self.evals:  # the starting point (not again when resuming)
            self._evaluate(eval_ids, eval_batch_size)
            if on_eval is not None:
                on_eval(self)
        bar = trange(self.step, steps, desc=f"finetune {self.config.recipe} b={self.config.bits}",
                     disable=not progress, initial=self.step, total=steps)
        pending: list[dict] = []
        since = time.perf_counter()
        was_training = self.model.training
        self.model.train(self.gradient_checkpointing)  # transformers checkpoints layers in train mode only
        try:
            for step in bar:
                batch = train_ids[self._batch_indices(step, n)[rank::world]].to(self.device, non_blocking=True)
                lr = self.lr()
                values = self._train_step(batch, params, world)
                self.step = step + 1
                row = {"step": self.step, "values": values, "lr": lr}
                if self.log_temperature is not None:
                    row["log_temperature"] = self.log_temperature.detach().flatten().clone()
                pending.append(row)
                evaluate = eval_ids is not None and ((eval_every and self.step % eval_every == 0)
                                                     or self.step == steps)
                save = checkpoint is not None and ((checkpoint_every and self.step % checkpoint_every == 0)
                                                   or self.step == steps)
                # checked at read-back points only, and agreed by every process (one stopping alone would hang
                # the others in their next all-reduce)
                late = (deadline is not None and (len(pending) >= log_every or evaluate or save)
                        and _agree(time.monotonic() >= deadline, world, self.device))
                if evaluate or save or late or len(pending) >= log_every or self.step == steps:
                    since = self._flush(pending, since)
                    bar.set_postfix(loss=f"{self.log[-1]['loss']:.3f}")
                if evaluate:
                    self._evaluate(eval_ids, eval_batch_size)
                if (save or (late and checkpoint is not None)) and rank == 0:
                    self.save(checkpoint)
                stop = (evaluate or save) and on_eval is not None and _agree(on_eval(self) is True, world, self.device)
                if stop and checkpoint is not None and not save and rank == 0:
                    self.save(checkpoint)
                if stop:
                    break
                if evaluate or save:
                    since = time.perf_counter()  # a step's seconds exclude evaluations and checkpoints
                if late:
                    break
        finally:
            self.model.train(was_training)
            bar.close()
        return self.history()

    def _train_step(self, batch: torch.Tensor, params: list[torch.Tensor], world: int = 1) -> torch.Tensor:
        """One optimizer (and LR-schedule) step on this process's rows ``batch long [b, T]`` (on the device).
        Returns float32 ``[4]`` on the device: loss, ce, kl (means over processes) and the gradient norm before
        clipping (NaN without clipping). Reads nothing back to the host (tested on CUDA with
        ``torch.cuda.set_sync_debug_mode("error")``)."""
        self.optimizer.zero_grad(set_to_none=True)
        loss, ce, kl = self._loss_tensors(batch, backward=True)
        parts = torch.stack([loss.detach(), ce, kl]).float()
        if world > 1:
            _average_gradients(params, world)
            torch.distributed.all_reduce(parts)
            parts = parts / world
        grad_norm = parts.new_full((), float("nan"))
        if self.config.max_grad_norm is not None:
            grad_norm = torch.nn.utils.clip_grad_norm_(params, self.config.max_grad_norm).detach().float()
        self.optimizer.step()
        if self.scheduler is not None:
            self.scheduler.step()
        return torch.cat([parts, grad_norm.view(1)])

    def _flush(self, pending: list[dict], since: float) -> float:
        """Read the pending steps' numbers back to the host (one sync) into :attr:`log`; returns the time."""
        if not pending:
            return since
        values = torch.stack([r["values"] for r in pending]).cpu().tolist()
        temps = (torch.stack([r["log_temperature"] for r in pending]).cpu().tolist()
                 if "log_temperature" in pending[0] else None)
        now = time.perf_counter()
        seconds = (now - since) / len(pending)
        for i, r in enumerate(pending):
            loss, ce, kl, grad_norm = values[i]
            row = {"step": r["step"], "loss": loss, "ce": ce, "kl": kl, "grad_norm": grad_norm, "lr": r["lr"],
                   "seconds": seconds}
            if temps is not None:
                row["log_temperature"] = temps[i]
            self.log.append(row)
        pending.clear()
        return now

    def _evaluate(self, eval_ids: torch.Tensor, batch_size: int) -> None:
        start = time.perf_counter()
        training = self.model.training
        self.model.eval()
        try:
            ppl = self.perplexity(eval_ids, batch_size=batch_size)
        finally:
            self.model.train(training)
        self.evals.append({"step": self.step, "ppl": ppl, "seconds": time.perf_counter() - start})

    # ---- evaluation
    def perplexity(self, ids: torch.Tensor, *, exact: bool = False, batch_size: int = 1,
                   progress: bool = False) -> float:
        """Held-out perplexity of the adapted model over ``ids long [n, T]``.

        ``exact=False``: every token's attention through ``self.method()`` (H1BCache with the learned
        temperatures, ``compressed_prefill=True``: what decoding with the compressed cache sees).
        ``exact=True``: an ordinary exact cache -- the adapted model for users who switch H1B off.
        """
        from .eval import perplexity  # noqa: PLC0415 -- eval imports pandas/tqdm machinery

        self._check_usable()
        check_tensor("ids", ids, ndim=2, dtypes=(torch.long,))
        df = perplexity(self.model, ids.to(self.device), "fp16" if exact else self.method(), batch_size=batch_size,
                        progress=progress)
        return math.exp(df.nll.sum() / df.tokens.sum())

    def history(self) -> pd.DataFrame:
        """One row per step: ``step, loss, ce, kl, grad_norm, lr, seconds`` (``lr``: the learning rate the step
        used), and ``ppl`` and ``eval_seconds`` where evaluated (step 0: before training)."""
        cols = ["step", "loss", "ce", "kl", "grad_norm", "lr", "seconds"]
        log = pd.DataFrame([{k: r.get(k, float("nan")) for k in cols} for r in self.log], columns=cols)
        evals = pd.DataFrame(self.evals, columns=["step", "ppl", "seconds"]).rename(columns={"seconds": "eval_seconds"})
        out = pd.merge(log, evals, on="step", how="outer").sort_values("step").reset_index(drop=True)
        out.insert(0, "recipe", self.config.recipe)
        out.insert(1, "bits", self.config.bits)
        return out

    def temperature_history(self) -> pd.DataFrame:
        """T at step 0 (the calibrated start) and after every step, long format: ``step, layer, head, temperature``.

        Shared values are repeated over the layers and heads that share them ("global": one T for all)."""
        if self.log_temperature is None:
            return pd.DataFrame(columns=["step", "layer", "head", "temperature"])
        L, Hq = self.shape.num_layers, self.shape.num_heads
        snapshots = [(0, self.initial_log_temperature)]
        snapshots += [(r["step"], torch.tensor(r["log_temperature"]).view(self.initial_log_temperature.shape))
                      for r in self.log]
        rows = []
        for step, log_t in snapshots:
            t = log_t.exp().expand(L, Hq)
            rows += [{"step": step, "layer": layer, "head": head, "temperature": float(t[layer, head])}
                     for layer in range(L) for head in range(Hq)]
        return pd.DataFrame(rows)

    # ---- checkpoints
    def adapted_state_dict(self) -> dict[str, torch.Tensor]:
        """Copies of exactly the adapted parameters, by name (on the CPU)."""
        return {name: p.detach().cpu().clone() for name, p in self.trainable_parameters().items()}

    def save(self, path) -> Path:
        """Write the adapted parameters, optimizer state, step, config and logs to ``path`` (atomically)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        state = {"format": CHECKPOINT_FORMAT, "config": asdict(self.config), "step": self.step,
                 "adapted": self.adapted_state_dict(), "optimizer": self.optimizer.state_dict(),
                 "initial_log_temperature": self.initial_log_temperature, "log": self.log, "evals": self.evals,
                 "n_base_params": self.n_base_params,
                 "key_mean": None if self.key_mean is None else self.key_mean.detach().cpu().clone(),
                 "schedule": self.schedule,
                 "scheduler": None if self.scheduler is None else self.scheduler.state_dict()}
        tmp = path.with_name(path.name + ".tmp")
        torch.save(state, tmp)
        os.replace(tmp, path)
        return path

    def load(self, path) -> "H1BFinetuner":
        """Restore a checkpoint of the same config: adapted parameters, key mean, optimizer and LR-schedule
        state, step and logs. A scheduled checkpoint needs the same :meth:`use_cosine_schedule` first."""
        self._check_usable()
        state = _read_checkpoint(path)
        saved = FinetuneConfig(**_config_fields(state["config"]))
        if saved != self.config:
            diff = {f.name: (getattr(saved, f.name), getattr(self.config, f.name)) for f in fields(FinetuneConfig)
                    if getattr(saved, f.name) != getattr(self.config, f.name)}
            raise ValueError(f"checkpoint config differs from this finetuner's (checkpoint, here): {diff}")
        params = self.trainable_parameters()
        adapted = state["adapted"]
        if set(adapted) != set(params):
            missing, extra = sorted(set(params) - set(adapted)), sorted(set(adapted) - set(params))
            raise ValueError(f"checkpoint parameters do not match: missing {missing[:3]}, unexpected {extra[:3]}")
        for name, p in params.items():
            if adapted[name].shape != p.shape:
                raise ValueError(f"checkpoint parameter {name} has shape {tuple(adapted[name].shape)}, "
                                 f"expected {tuple(p.shape)}")
        schedule = state.get("schedule")
        if schedule != self.schedule:
            raise ValueError(f"checkpoint LR schedule {schedule} differs from this finetuner's {self.schedule} "
                             "(call use_cosine_schedule with the same arguments before load)")
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(adapted[name])
        if state.get("key_mean") is not None:
            self.key_mean = state["key_mean"].float().to(self.device)
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        self.step, self.log, self.evals = state["step"], list(state["log"]), list(state["evals"])
        self.initial_log_temperature = state["initial_log_temperature"]
        return self

    @classmethod
    def from_checkpoint(cls, model, path, **kwargs) -> "H1BFinetuner":
        """Apply a checkpoint to an un-adapted ``model``: a finetuner with the saved config, parameters, LR schedule
        and state. ``kwargs``: ``device``, ``autocast``, ``gradient_checkpointing`` (as the constructor's)."""
        state = _read_checkpoint(path)
        config = FinetuneConfig(**_config_fields(state["config"]))
        ft = cls(model, config, temperature=_initial_temperature(config, state["initial_log_temperature"]),
                 key_mean=state.get("key_mean"), **kwargs)
        if state.get("schedule") is not None:
            ft.use_cosine_schedule(state["schedule"]["warmup_steps"], state["schedule"]["total_steps"])
        return ft.load(path)

    # ---- adapters (deployment: parameters only)
    def save_adapters(self, path) -> Path:
        """Write what serving the adapted model needs, nothing more: the adapted parameters (:meth:`adapted_state_dict`:
        temperatures, ``v_proj`` or LoRA adapters, a learned projection), the key mean (``center_keys``) and the
        starting temperature, with the config and step as metadata. A safetensors file when the ``safetensors``
        package is present (tensor names as in :meth:`adapted_state_dict`, plus ``h1bkv.key_mean`` and
        ``h1bkv.initial_log_temperature``; metadata ``format``, ``config`` (JSON), ``step``), else the same
        dictionary through ``torch.save``. Written atomically. Read back with :meth:`from_adapters`.

        Trained weights of the model itself (the paper recipe's ``v_proj``) are stored as their change from the
        un-adapted weights in bfloat16, under ``h1bkv.delta.<name>``: half the bytes of float32 weights (6.6 MB
        instead of 13 MB for SmolLM2-135M's 30 v_proj), and the change keeps 8 significant bits where bf16 weights would
        round most of a small update away. :meth:`from_adapters` adds it back to the base model's weights."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = self.adapted_state_dict()
        for name, original in self._original.items():  # full model weights ("paper": v_proj): the bf16 change
            tensors[DELTA_PREFIX + name] = (tensors.pop(name) - original.cpu()).to(torch.bfloat16)
        if self.key_mean is not None:
            tensors["h1bkv.key_mean"] = self.key_mean.detach().cpu().clone()
        if self.initial_log_temperature is not None:
            tensors["h1bkv.initial_log_temperature"] = self.initial_log_temperature.clone()
        meta = {"format": ADAPTER_FORMAT, "config": json.dumps(asdict(self.config)), "step": str(self.step)}
        tmp = path.with_name(path.name + ".tmp")
        try:
            from safetensors.torch import save_file  # noqa: PLC0415 -- optional (a transformers dependency)
        except ImportError:
            torch.save({"tensors": tensors, "metadata": meta}, tmp)
        else:
            save_file({k: t.contiguous() for k, t in tensors.items()}, str(tmp), metadata=meta)
        os.replace(tmp, path)
        return path

    @classmethod
    def from_adapters(cls, model, path, **kwargs) -> "H1BFinetuner":
        """Apply a :meth:`save_adapters` file to an un-adapted ``model`` (no optimizer state: for evaluation and
        serving, e.g. ``ft.method()``, ``ft.perplexity``). ``kwargs`` as :meth:`from_checkpoint`'s.
        Raises ValueError for a file that is not one, or whose parameters do not fit the model."""
        tensors, meta = _read_adapters(path)
        config = FinetuneConfig(**_config_fields(json.loads(meta["config"])))
        initial = tensors.pop("h1bkv.initial_log_temperature", None)
        ft = cls(model, config, temperature=_initial_temperature(config, initial),
                 key_mean=tensors.pop("h1bkv.key_mean", None), **kwargs)
        params = ft.trainable_parameters()
        deltas = {k[len(DELTA_PREFIX):]: tensors.pop(k) for k in list(tensors) if k.startswith(DELTA_PREFIX)}
        if set(tensors) | set(deltas) != set(params) or set(tensors) & set(deltas):
            stored = set(tensors) | set(deltas)
            missing, extra = sorted(set(params) - stored), sorted(stored - set(params))
            raise ValueError(f"adapter parameters do not match: missing {missing[:3]}, unexpected {extra[:3]}")
        with torch.no_grad():
            for name, p in params.items():
                value = tensors.get(name, deltas.get(name))
                if value.shape != p.shape:
                    raise ValueError(f"adapter parameter {name} has shape {tuple(value.shape)}, "
                                     f"expected {tuple(p.shape)}")
                if name in deltas:  # the base model's weight plus the stored change
                    p.add_(value.to(device=p.device, dtype=p.dtype))
                else:
                    p.copy_(value)
        ft.step = int(meta.get("step", 0))
        return ft

    # ---- undo
    def restore(self):
        """Put the model back as it was (original ``v_proj`` / LoRA removed, ``requires_grad`` flags); returns it.

        The finetuner cannot be used afterwards (its adapted values are gone from the model; save first)."""
        self._check_usable()
        if self._peft is not None:
            self._peft.base_model.unload()
            self._peft = None
        params = dict(self.model.named_parameters())
        with torch.no_grad():
            for name, original in self._original.items():
                params[name].copy_(original)
        for name, p in self.model.named_parameters():
            p.requires_grad_(self._requires_grad.get(name, p.requires_grad))
        self._restored = True
        return self.model

    def _check_usable(self) -> None:
        if self._restored:
            raise RuntimeError("this finetuner restored its model; build a new one (or load a checkpoint)")


def _is_v_proj(name: str) -> bool:
    return ".v_proj." in name or name.startswith("v_proj.")


def _config_fields(saved: dict) -> dict:
    names = {f.name for f in fields(FinetuneConfig)}
    unknown = set(saved) - names
    if unknown:
        raise ValueError(f"checkpoint config has unknown fields {sorted(unknown)}")
    out = dict(saved)
    if "lora_targets" in out:
        out["lora_targets"] = tuple(out["lora_targets"])
    return out


def _initial_temperature(config: FinetuneConfig, initial_log_temperature: torch.Tensor | None):
    """The starting T of a saved run (the learned one, if any, comes with the parameters); None unless "hamming"."""
    if config.score != "hamming" or initial_log_temperature is None:
        return None
    initial = initial_log_temperature.exp()
    return initial.reshape(()) if initial.numel() == 1 else initial


def _read_adapters(path) -> tuple[dict, dict]:
    path = Path(path)
    try:
        from safetensors import safe_open  # noqa: PLC0415
    except ImportError:
        safe_open = None
    if safe_open is not None:
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except Exception:  # noqa: BLE001 -- not a safetensors file: maybe the torch.save fallback
            meta, tensors = None, None
        if meta is not None and meta.get("format") == ADAPTER_FORMAT:
            return tensors, meta
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001
        raise ValueError(f"{path} is not an h1bkv_lite adapter file ({ADAPTER_FORMAT}): {err}") from err
    if not isinstance(state, dict) or state.get("metadata", {}).get("format") != ADAPTER_FORMAT:
        raise ValueError(f"{path} is not an h1bkv_lite adapter file ({ADAPTER_FORMAT})")
    return dict(state["tensors"]), dict(state["metadata"])


def _read_checkpoint(path) -> dict:
    state = torch.load(Path(path), map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not an h1bkv_lite finetune checkpoint ({CHECKPOINT_FORMAT})")
    return state
