"""Process settings for headless runs: CPU thread pools that match the CPUs a process may really use,
and no model-hub access.

PyTorch (and OpenMP, MKL, the tokenizers' thread pool) size their thread pools from the host's core
count. In a container limited by a CFS quota (``docker --cpus=2`` on a 64-core host) that is far too
many: the threads of one parallel region are throttled in turn and small torch ops become orders of
magnitude slower. :func:`available_cpus` reads the limit (affinity mask and cgroup v1/v2 quota) and
:func:`configure_threads` sizes every pool to it. The test suite and ``scripts/make_figures.py`` call
it; call it yourself at the top of a script when running in such a container.
"""
from __future__ import annotations

import math
import os
import sys
from pathlib import Path

__all__ = ["DEVICE_CHOICES", "DTYPE_CHOICES", "available_cpus", "configure_offline", "configure_threads",
           "device_info", "resolve_device", "resolve_device_dtype", "resolve_dtype"]

# Environment variables read by the thread pools of torch/OpenMP, MKL, OpenBLAS and HF tokenizers (Rayon).
THREAD_ENV_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "RAYON_NUM_THREADS")


def _read_ints(*paths: Path) -> list[int] | None:
    """The integers in these files (whitespace-separated, in order), or None if one is unreadable."""
    try:
        return [int(word) for path in paths for word in path.read_text().split()]
    except (OSError, ValueError):
        return None


def _cgroup_quota(cgroup_root: Path, proc_cgroup: Path) -> float | None:
    """CPUs allowed by a CFS quota (cgroup v2 ``cpu.max`` or v1 ``cpu.cfs_quota_us``), None if unlimited."""
    rel_paths = {""}
    try:
        for line in proc_cgroup.read_text().splitlines():
            parts = line.split(":", 2)
            if len(parts) == 3 and (parts[0] == "0" or "cpu" in parts[1].split(",")):
                rel_paths.add(parts[2].lstrip("/"))
    except OSError:
        pass
    limits = []
    for rel in rel_paths:
        # v2: "max 100000" (no limit; int() fails and it is skipped) or "<quota> <period>"
        candidates = [_read_ints(cgroup_root / rel / "cpu.max")]
        for v1_dir in (cgroup_root / "cpu" / rel, cgroup_root / "cpu,cpuacct" / rel):  # v1: quota -1 = none
            candidates.append(_read_ints(v1_dir / "cpu.cfs_quota_us", v1_dir / "cpu.cfs_period_us"))
        limits += [q / p for q, p in (c[:2] for c in candidates if c and len(c) >= 2) if q > 0 and p > 0]
    return min(limits) if limits else None


def available_cpus(cgroup_root: str | os.PathLike = "/sys/fs/cgroup",
                   proc_cgroup: str | os.PathLike = "/proc/self/cgroup") -> int:
    """How many CPUs this process can keep busy: min(affinity mask, cgroup CPU quota rounded up), >= 1."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 1
    quota = _cgroup_quota(Path(cgroup_root), Path(proc_cgroup))
    if quota is not None:
        cpus = min(cpus, max(1, math.ceil(quota)))
    return max(1, cpus)


def configure_threads(n: int | None = None) -> int:
    """Size the CPU thread pools to ``n`` threads; returns the count used.

    ``n=None`` keeps a positive ``OMP_NUM_THREADS`` the user set, else uses :func:`available_cpus`.
    Sets the pools' environment variables (so subprocesses such as notebook kernels inherit them; with
    ``n=None`` only those not already set), asks idle OpenMP threads to sleep rather than spin
    (``OMP_WAIT_POLICY=PASSIVE`` unless set), and sets torch's intra-op thread count if torch is imported.
    """
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
        raise ValueError(f"n must be a positive int or None, got {n!r}")
    if n is None:
        user = os.environ.get("OMP_NUM_THREADS", "").strip()
        n = int(user) if user.isdigit() and int(user) > 0 else available_cpus()
        for var in THREAD_ENV_VARS:
            os.environ.setdefault(var, str(n))
    else:
        os.environ.update({var: str(n) for var in THREAD_ENV_VARS})
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.set_num_threads(n)
    return n


# Environment variables that keep huggingface_hub / transformers / datasets off the network.
OFFLINE_ENV_VARS = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HUB_DISABLE_TELEMETRY")


def configure_offline() -> None:
    """Keep the Hugging Face libraries off the network (subprocesses inherit it); values the user set win.

    Everything h1bkv's tests and figures need ships with the package (bundled model, committed corpus):
    a hub lookup could only stall a run on a machine whose network drops packets instead of refusing.
    """
    for var in OFFLINE_ENV_VARS:
        os.environ.setdefault(var, "1")


# ------------------------------------------------------------------------------------------------ device and dtype
DEVICE_CHOICES = ("auto", "cpu", "cuda", "cuda:N")
"""What a notebook's ``DEVICE`` parameter accepts: "auto" is CUDA (the current device) when present, else CPU."""
DTYPE_CHOICES = ("auto", "float32", "float16", "bfloat16")
"""What a notebook's ``DTYPE`` parameter accepts: "auto" is float32 on CPU, bfloat16 on a CUDA device that
supports it, else float16."""


def resolve_device(device="auto", *, name: str = "DEVICE"):
    """``torch.device`` for ``device`` in :data:`DEVICE_CHOICES` (a ``torch.device`` of those kinds is accepted too).

    Raises ValueError naming ``name`` (the notebook parameter) for anything else -- other device types
    ("mps", "meta", "gpu"), a malformed index -- and for CUDA asked on a machine without it or an index
    beyond the visible GPUs.
    """
    import torch  # noqa: PLC0415

    allowed = ", ".join(repr(c) for c in DEVICE_CHOICES)
    if isinstance(device, torch.device):
        device = str(device)
    if not isinstance(device, str):
        raise ValueError(f"{name} must be one of {allowed}, got {device!r}")
    text = device.strip().lower()
    if text == "auto":
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    if text == "cpu":
        return torch.device("cpu")
    kind, _, index = text.partition(":")
    if kind != "cuda" or (_ and not index.isdigit()):
        raise ValueError(f"{name} must be one of {allowed}, got {device!r}")
    if not torch.cuda.is_available():
        raise ValueError(f"{name}={device!r} but CUDA is not available here; use {name}='auto' or 'cpu'")
    n = torch.cuda.device_count()
    if index and int(index) >= n:
        raise ValueError(f"{name}={device!r} but only {n} CUDA device(s) are visible (cuda:0..cuda:{n - 1})")
    return torch.device("cuda", int(index)) if index else torch.device("cuda", torch.cuda.current_device())


def resolve_dtype(dtype="auto", device=None, *, name: str = "DTYPE", allow_auto: bool = True):
    """``torch.dtype`` for ``dtype`` in :data:`DTYPE_CHOICES` (or a float32/float16/bfloat16 ``torch.dtype``; a
    name may carry a ``"torch."`` prefix and any case: ``"torch.BFloat16"``).

    "auto" depends on ``device`` (a resolved ``torch.device``; None = CPU): float32 on CPU, bfloat16 on a
    CUDA device that supports it, else float16; ``allow_auto=False`` refuses it (a caller with a fixed default).
    Raises ValueError naming ``name`` and the accepted names otherwise.
    """
    import torch  # noqa: PLC0415

    by_name = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
    if isinstance(dtype, torch.dtype) and dtype in by_name.values():
        return dtype
    choices = DTYPE_CHOICES if allow_auto else tuple(by_name)
    text = dtype.strip().lower().removeprefix("torch.") if isinstance(dtype, str) else None
    if text not in choices:
        raise ValueError(f"{name} must be one of {', '.join(repr(c) for c in choices)}, got {dtype!r}")
    if text != "auto":
        return by_name[text]
    device = torch.device("cpu") if device is None else torch.device(device)
    if device.type != "cuda":
        return torch.float32
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16  # GPUs of one host: one kind


def resolve_device_dtype(device="auto", dtype="auto"):
    """``(torch.device, torch.dtype)`` from a notebook's ``DEVICE`` and ``DTYPE`` parameters (see
    :func:`resolve_device`, :func:`resolve_dtype`). Both are validated before anything is loaded."""
    dev = resolve_device(device)
    return dev, resolve_dtype(dtype, dev)


def device_info(device, dtype) -> dict:
    """What a notebook's ``metrics.json`` records about where it ran: ``device`` ("cpu", "cuda:0"),
    ``device_name`` (the GPU's name, or the CPU's), ``dtype`` ("float32", ...)."""
    import platform  # noqa: PLC0415

    import torch  # noqa: PLC0415

    device = torch.device(device)
    if device.type == "cuda":
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        name = torch.cuda.get_device_name(device)
    else:
        name = platform.processor() or platform.machine() or device.type
    return {"device": str(device), "device_name": name, "dtype": str(dtype).removeprefix("torch.")}
