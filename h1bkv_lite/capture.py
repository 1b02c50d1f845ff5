"""Capture the exact q/k/v tensors a Hugging Face model's attention sees (post-RoPE).

:func:`capture_attention_inputs` runs one forward pass with a recording attention function registered in
transformers' ``AttentionInterface``: it records ``(query, key, value)`` as passed to the attention
function by each attention layer (after the q/k/v projections and rotary embedding, before GQA
expansion) and then delegates to transformers' own SDPA implementation, so the forward pass computes what
``attn_implementation="sdpa"`` computes.  The model's attention implementation is restored afterwards,
whatever happens.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from ._device import model_device

__all__ = ["CAPTURE_IMPLEMENTATION", "capture_attention_inputs"]

CAPTURE_IMPLEMENTATION = "h1bkv_capture"
"""Name under which the recording attention function is registered in transformers' AttentionInterface."""

_RECORDERS: list = []  # stack of active recorders (innermost last); a capture pushes one for its forward pass
_REGISTERED = False


def _capture_attention_forward(module, query, key, value, attention_mask, *args, **kwargs):
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS  # noqa: PLC0415

    result = ALL_ATTENTION_FUNCTIONS["sdpa"](module, query, key, value, attention_mask, *args, **kwargs)
    if _RECORDERS:
        _RECORDERS[-1](module, query, key, value, result[0])
    return result


def _register() -> None:
    global _REGISTERED
    if _REGISTERED:
        return
    from transformers import AttentionInterface  # noqa: PLC0415
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface  # noqa: PLC0415

    AttentionInterface.register(CAPTURE_IMPLEMENTATION, _capture_attention_forward)
    # The same masks as SDPA (padding masks included); without this transformers would build no mask at all.
    AttentionMaskInterface.register(CAPTURE_IMPLEMENTATION, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])
    _REGISTERED = True


def _saved_implementations(model) -> list[tuple[object, object]]:
    """(config, its raw ``_attn_implementation_internal``) for the model and every sub-model config."""
    from transformers import PreTrainedModel  # noqa: PLC0415

    seen, saved = set(), []
    for module in model.modules():
        if isinstance(module, PreTrainedModel) and id(module.config) not in seen:
            seen.add(id(module.config))
            saved.append((module.config, module.config.__dict__.get("_attn_implementation_internal")))
    return saved


def _normalize_layers(layers, n_layers: int) -> list[int]:
    if layers is None:
        return list(range(n_layers))
    if isinstance(layers, int):
        layers = [layers]
    out = []
    for i in layers if isinstance(layers, Iterable) else [layers]:
        i = int(i)
        if not -n_layers <= i < n_layers:
            raise ValueError(f"layer index {i} out of range for a model with {n_layers} layers")
        out.append(i % n_layers)
    return sorted(set(out))


def capture_attention_inputs(
    model,
    input_ids: torch.Tensor,
    layers: int | Iterable[int] | None = None,
    *,
    attention_mask: torch.Tensor | None = None,
    outputs: bool = False,
    device: str | torch.device | None = "cpu",
) -> dict[int, tuple[torch.Tensor, ...]]:
    """Run ``model(input_ids)`` once and return the attention inputs of the chosen layers.

    Args:
        model: a transformers ``PreTrainedModel`` whose attention goes through ``AttentionInterface``
            (Llama, Mistral, Qwen2, SmolLM2, ...).
        input_ids: ``[B, T]`` (or ``[T]``) token ids; moved to the model's device.
        layers: layer indices to record (negative ones count from the end); ``None`` = all layers.
        attention_mask: optional ``[B, T]`` padding mask, passed to the model.
        outputs: also return the attention output (before ``o_proj``) as a 4th tensor ``[B, Hq, T, D]``.
        device: where the copies live: ``"cpu"`` (default), ``None`` (the model's device: on a GPU the
            analysis of the capture then runs there too), or any device.

    Returns:
        ``{layer_idx: (q, k, v)}`` with ``q`` ``[B, Hq, T, D]`` and ``k``, ``v`` ``[B, Hkv, T, D]``
        (GQA heads not repeated), float32 copies (on ``device``) of exactly the tensors the attention
        function received: after the projections and RoPE; the scale ``1/sqrt(D)`` is not applied.

    The pass runs under ``torch.no_grad()`` with ``use_cache=False``.  During it attention is computed by
    transformers' SDPA implementation; afterwards the model's attention implementation is restored
    (also on error).  For a model loaded with ``"sdpa"`` (the default) the logits are identical to an
    ordinary forward; for ``"eager"`` they agree up to float rounding.
    """
    _register()
    n_layers = model.config.num_hidden_layers
    wanted = set(_normalize_layers(layers, n_layers))
    if input_ids.dim() == 1:
        input_ids = input_ids.unsqueeze(0)
    device_of_model = model_device(model)
    out_device = device_of_model if device is None else device
    records: dict[int, tuple[torch.Tensor, ...]] = {}

    def copy(t: torch.Tensor) -> torch.Tensor:
        return t.detach().to(device=out_device, dtype=torch.float32, copy=True)

    def record(module, query, key, value, attn_output):
        idx = getattr(module, "layer_idx", None)
        if idx is None or idx not in wanted:
            return
        if idx in records:
            raise RuntimeError(f"attention layer {idx} was called twice in one forward pass")
        entry = (copy(query), copy(key), copy(value))
        if outputs:  # SDPA returns [B, T, H, D]
            entry = entry + (copy(attn_output.transpose(1, 2)),)
        records[idx] = entry

    saved = _saved_implementations(model)
    _RECORDERS.append(record)
    try:
        model.set_attn_implementation(CAPTURE_IMPLEMENTATION)
        kwargs = {"use_cache": False}
        if attention_mask is not None:
            kwargs["attention_mask"] = attention_mask.to(device_of_model)
        with torch.no_grad():
            model(input_ids=input_ids.to(device_of_model), **kwargs)
    finally:
        _RECORDERS.remove(record)
        for config, impl in saved:
            config._attn_implementation_internal = impl
    missing = wanted - records.keys()
    if missing:
        raise RuntimeError(
            f"no attention call recorded for layers {sorted(missing)}: does this model use transformers' "
            "AttentionInterface and set `layer_idx` on its attention modules?"
        )
    return {i: records[i] for i in sorted(records)}
