"""Kernel tests: run the Triton kernels in Triton's CPU interpreter when there is no GPU.

Triton fixes interpreter-or-compiled when a kernel is *defined*, so ``TRITON_INTERPRET=1`` must be set
before ``h1bkv_lite.kernels`` is imported. This conftest is imported before the test modules of this
folder; if something imported the kernels earlier (compiled, on a machine without CUDA), they are
reloaded here. With CUDA present nothing is set: the kernels compile, the ``cuda`` cases run, and the
``cpu`` Triton cases skip (run them with ``TRITON_INTERPRET=1 pytest tests/kernels -m "not gpu"``).

Like flash-linear-attention's tests, ``torch.empty`` is poisoned here (NaN for floats, a sentinel for
integers) so a kernel that leaves part of its output unwritten fails loudly.
"""
import importlib
import os
import sys

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

_KERNEL_MODULES = [
    "h1bkv_lite.kernels._common",
    "h1bkv_lite.kernels.sketch_pack",
    "h1bkv_lite.kernels.hamming",
    "h1bkv_lite.kernels.decode_attention",
    "h1bkv_lite.kernels",
]
if os.environ.get("TRITON_INTERPRET") == "1" and "h1bkv_lite.kernels.decode_attention" in sys.modules:
    from h1bkv_lite.kernels._common import is_interpreted

    if not is_interpreted(sys.modules["h1bkv_lite.kernels.decode_attention"]._decode_split_kernel):
        for name in _KERNEL_MODULES:
            importlib.reload(sys.modules[name])

_INT_SENTINEL = {torch.uint8: 0xA5, torch.int16: -12345, torch.int32: -123456789, torch.int64: -123456789}


@pytest.fixture(autouse=True)
def poisoned_empty(monkeypatch):
    """``torch.empty`` returns NaN-filled floats and sentinel-filled integers during each test."""
    real_empty = torch.empty

    def empty(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        if t.is_floating_point():
            t.fill_(float("nan"))
        elif t.dtype in _INT_SENTINEL:
            t.fill_(_INT_SENTINEL[t.dtype])
        return t

    monkeypatch.setattr(torch, "empty", empty)
