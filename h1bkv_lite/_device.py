"""Devices: a model's, and host-to-device transfers that do not synchronise the host (for the caches' prefill and
decode paths)."""
from __future__ import annotations

import torch


def to_device(t: torch.Tensor, device) -> torch.Tensor:
    """``t`` on ``device`` without a host synchronisation.

    A plain ``.to("cuda")`` of a pageable host tensor synchronises the host with the device (torch's
    ``memcpy_and_sync``: the copy waits for every launch queued before it, so the host stops running ahead of
    the GPU). A host tensor bound for CUDA is therefore staged in pinned memory and copied with
    ``non_blocking=True``; torch's caching host allocator reuses the pinned block only once the copy has run.
    Anything else is a plain ``.to``.
    """
    device = torch.device(device)
    if device.type == "cuda" and t.device.type == "cpu":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def model_device(model) -> torch.device:
    """The device of ``model``'s first parameter: where its inputs go (a model split over devices takes them on
    the first one). Raises ValueError for a model without parameters."""
    for param in model.parameters():
        return param.device
    raise ValueError(f"model ({type(model).__name__}) has no parameters, so no device to put its inputs on")
