"""Find device bugs on a machine without a GPU: run CPU code as if some tensors lived on another device.

:class:`PretendDevice` is a ``TorchFunctionMode`` that tags the tensors given to :meth:`PretendDevice.put` as
being "on the device" and follows the tag through every torch call:

- the result of a call that reads a tagged tensor is tagged (views, arithmetic, ``*_like``, ``new_*``);
- a factory (``torch.arange``, ``zeros``, ``tensor``, ``linspace``, ...) makes a tagged tensor only when given a
  ``torch.device`` (``device=x.device``); without one, with ``device=None`` or ``device="cpu"`` it makes a host
  tensor, as it would on a CUDA machine;
- ``t.to(<torch.device>)`` tags, ``t.cpu()`` / ``t.to("cpu")`` untag;
- a call that mixes a tagged tensor with a host tensor of more than one element raises :class:`DeviceMix`,
  as CUDA does (``cuda_tensor[cpu_index]`` is allowed, as on CUDA; 0-dim host tensors are allowed too);
- ``.numpy()`` of a tagged tensor raises (CUDA tensors have to be moved to the host first).

So a function that builds a mask with ``torch.arange(T)`` and applies it to its (tagged) input fails here
exactly where it would fail on a GPU. Values are computed on the CPU as usual, so results can be compared.
"""
from __future__ import annotations

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten, tree_map
from torch.utils.weak import WeakTensorKeyDictionary

__all__ = ["DeviceMix", "HostSyncs", "PretendDevice"]


class DeviceMix(AssertionError):
    """A call that would fail on a GPU: a device tensor mixed with a host tensor, or ``.numpy()`` of one."""


_FACTORIES = {
    torch.arange, torch.zeros, torch.ones, torch.full, torch.empty, torch.tensor, torch.as_tensor,
    torch.linspace, torch.logspace, torch.randn, torch.rand, torch.randint, torch.randperm, torch.eye,
    torch.zeros_like, torch.ones_like, torch.full_like, torch.empty_like, torch.randn_like, torch.rand_like,
}
_TO_HOST = {torch.Tensor.cpu, torch.Tensor.tolist, torch.Tensor.item, torch.Tensor.numpy}
_INDEXING = {torch.Tensor.__getitem__}  # a host index into a device tensor is fine on CUDA
_SETITEM = {torch.Tensor.__setitem__}
_UNCHECKED = {"_has_compatible_shallow_copy_type", "__set__"}  # nn.Module.to() comparing a parameter with its move


def _tensors(tree) -> list[torch.Tensor]:
    return [x for x in tree_flatten(tree)[0] if isinstance(x, torch.Tensor)]


def _device_arg(args, kwargs):
    """The device a call names: a ``torch.device``/str in kwargs["device"] or, for ``Tensor.to``, positionally."""
    if "device" in kwargs:
        return kwargs["device"]
    for a in args[1:]:
        if isinstance(a, (torch.device, str)):
            return a
    return None


class PretendDevice(TorchFunctionMode):
    """``with PretendDevice() as dev: out = f(dev.put(x))``: ``f`` must not mix host and device tensors."""

    def __init__(self):
        super().__init__()
        self.tagged = WeakTensorKeyDictionary()
        self.calls = 0

    def put(self, t):
        """Tag every tensor in ``t`` (a tensor, or a nest of tuples / lists / dicts) as on the device."""
        for x in _tensors(t):
            self.tagged[x] = True
        return t

    def on_device(self, t: torch.Tensor) -> bool:
        return t in self.tagged

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self.calls += 1
        name = getattr(func, "__qualname__", getattr(func, "__name__", repr(func)))
        if func is torch.Tensor.numpy and self.on_device(args[0]):
            raise DeviceMix("Tensor.numpy() of a device tensor (move it with .cpu() first)")
        inputs = _tensors((args, kwargs))
        if func in _INDEXING:
            checked = _tensors(args[:1])
        elif func in _SETITEM:
            checked = _tensors((args[0], args[2:]))
        elif getattr(func, "__name__", "") in _UNCHECKED:
            checked = []
        else:
            checked = inputs
        dev = [t for t in checked if self.on_device(t)]
        host = [t for t in checked if not self.on_device(t) and t.dim() > 0 and t.numel() > 1]
        if dev and host:
            shapes = ", ".join(str(tuple(t.shape)) for t in host[:3])
            raise DeviceMix(f"{name}: device tensor(s) mixed with host tensor(s) of shape {shapes}")
        out = func(*args, **kwargs)
        if getattr(func, "__name__", "") == "__set__" and len(args) == 2 and isinstance(args[1], torch.Tensor):
            self._tag(args[0], self.on_device(args[1]))  # param.data = moved (nn.Module.to keeps the Parameter)
            return out
        if func in _TO_HOST:
            if func is torch.Tensor.cpu and out is args[0]:  # on CPU .cpu() returns its input: a new alias
                out = out.view_as(out)
            return out
        if func is torch.Tensor.to:
            target = _device_arg(args, kwargs)
            if isinstance(target, torch.Tensor):
                to_dev = self.on_device(target)
            elif target is None:
                to_dev = self.on_device(args[0])
            else:
                to_dev = isinstance(target, torch.device)
            if out is args[0] and to_dev != self.on_device(out):  # a move that is a no-op on CPU: a new alias
                out = out.view_as(out)
            self._tag(out, to_dev)
            return out
        if func in _FACTORIES and not any(self.on_device(t) for t in inputs):
            self._tag(out, isinstance(kwargs.get("device"), torch.device))
            return out
        if any(self.on_device(t) for t in inputs):
            self._tag(out, True)
        return out

    def _tag(self, out, on: bool) -> None:
        def mark(x):
            if isinstance(x, torch.Tensor):
                if on:
                    self.tagged[x] = True
                else:
                    self.tagged.pop(x, None)
            return x

        tree_map(mark, out)


_READS_BACK = {
    torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.__bool__, torch.Tensor.__int__, torch.Tensor.__float__,
    torch.Tensor.__index__, torch.Tensor.cpu, torch.Tensor.numpy, torch.Tensor.nonzero, torch.nonzero,
    torch.Tensor.masked_select, torch.masked_select, torch.Tensor.unique, torch.unique,
}
_COPYING_FACTORIES = {torch.tensor, torch.as_tensor}


class HostSyncs(PretendDevice):
    """:class:`PretendDevice` that also records (in :attr:`syncs`, by call name) what would make the host wait for
    a CUDA device: reading a device tensor back (``item``, ``bool(t)``, ``tolist``, ``cpu``, ``nonzero``, ...),
    and blocking host-to-device copies (``host_tensor.to(device)``, ``torch.tensor(data, device=device)``: torch
    synchronises the stream after copying pageable host memory). Factories that fill on the device
    (``torch.arange(n, device=...)``, ``zeros``, ``full``) are not copies. Clear :attr:`syncs` to start counting."""

    def __init__(self):
        super().__init__()
        self.syncs: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__qualname__", getattr(func, "__name__", repr(func)))
        inputs = _tensors((args, kwargs))
        if func in _READS_BACK and any(self.on_device(t) for t in inputs):
            self.syncs.append(f"{name} of a device tensor")
        elif func is torch.Tensor.to and isinstance(_device_arg(args, kwargs), torch.device) \
                and not self.on_device(args[0]) and args[0].numel() > 0:
            self.syncs.append(f"{name}: host-to-device copy of shape {tuple(args[0].shape)}")
        elif func in _COPYING_FACTORIES and isinstance(kwargs.get("device"), torch.device) \
                and not any(self.on_device(t) for t in inputs):
            self.syncs.append(f"{name}: host-to-device copy")
        return super().__torch_function__(func, types, args, kwargs)
