"""Relaunching a compiled Triton kernel without binding its arguments again on every call (the eager decode path).

``kernel[grid](*args, **constexprs)`` (``JITFunction.run``) binds and specializes every argument on every call --
Python code Triton generates per kernel, one C call per argument, a cache-key hash -- before it calls the compiled
kernel's launcher. For the decode kernel's 58 arguments that was about half of an eager call's host time on the
H200's host (cProfile in ``benchmarks/results/decode_eager_h200_query_in_split_forms.json``: ``jit.py:run`` and the
binder 23 of 37 ms over 200 calls, the launcher itself 3-4 ms), and an eager decode step makes two such launches per
layer (the append and the attention).

:func:`launch` keeps each compiled kernel under a *launch key* at least as fine as Triton's own specialization:
the current device; Triton's debug and instrumentation settings; the constexprs (with their types) and launch
options by name; the arguments' types; every tensor's dtype and
address mod 16 (Triton specializes on 16-byte alignment; not kept for those ``do_not_specialize_on_alignment``
lists); every other scalar by exact value, except those ``do_not_specialize`` lists, by integer width only (what
Triton compiles apart). The first call of a key goes through Triton's own launch (which compiles the kernel or finds
it in its cache) and keeps the compiled kernel it returns, with the values of the parameters after ``args``
(constexprs, defaults); later calls launch it as ``compiled[grid](*args, *rest)`` does, Triton's launch of a
compiled kernel on the current stream: its loaded launcher called directly while no launch hooks are set
(``compiled[grid]`` itself, which runs them, otherwise). What runs is therefore the kernel Triton itself would pick for those
arguments. The key's parts come from C-level getters chosen once per tuple of argument types. Kernels run by
Triton's CPU interpreter, and anything that is not a ``JITFunction`` (tests wrap kernels to count launches), take
the plain ``kernel[grid](...)`` path on every call, as do a callable grid, a kernel with pre-run hooks (or
Triton's pipeline-stages inspection hook set), every call inside :func:`uncached_launches` and ``cached=False``.
At most ``MAX_KEPT`` compiled kernels are kept per kernel.

Not covered, as in any launch cache: a kernel's source or a global it reads changing after its first launch in the
process (Triton would recompile; the kept kernel stays) -- :func:`clear` forgets the kept kernels.
"""
from __future__ import annotations

import contextlib
import inspect
import operator
import threading

import torch

from ._common import HAS_TRITON

if HAS_TRITON:
    from triton.runtime.jit import JITFunction

    try:
        from triton import knobs as _knobs
    except ImportError:  # pragma: no cover - Triton before 3.4: no knobs module
        _knobs = None
else:  # pragma: no cover - nothing is launched without Triton
    JITFunction, _knobs = (), None

_IN_INT32 = range(-(1 << 31), 1 << 31).__contains__  # C-level and O(1) for exact ints only (an int subclass
_IN_UINT64_TOP = range(1 << 63, 1 << 64).__contains__  # would be searched element by element: converted first)


class _KernelLaunches:
    """One kernel's compiled forms by launch key, and its parameters' names and defaults in signature order."""

    def __init__(self, kernel):
        self.kernel = kernel
        params = list(inspect.signature(kernel.fn).parameters.values())
        self.names = [p.name for p in params]
        self.defaults = {p.name: p.default for p in params if p.default is not inspect.Parameter.empty}
        self.loose = _positions(kernel, "do_not_specialize", self.names)
        self.unaligned = _positions(kernel, "do_not_specialize_on_alignment", self.names)
        self.layouts: dict = {}  # argument types -> _Layout
        self.compiled: dict = {}

    def key(self, args: tuple, constexprs: dict, options: dict) -> tuple:
        """The launch key (module docstring). Its parts are gathered by C-level getters chosen once per tuple of
        argument types: a Python function per argument cost about as much as Triton's own binding."""
        types = tuple(map(type, args))
        layout = self.layouts.get(types)
        if layout is None:
            layout = self.layouts[types] = _Layout(types, self.loose, self.unaligned)
        tensors, loose_ints = layout.tensors(args), layout.loose_ints(args)
        return (_current_device(), _KNOB_STATE(_knobs), *_key_part(constexprs), _key_part(options)[0], types,
                tuple(map(_DTYPE, tensors)), tuple(map(_MISALIGNMENT, map(_DATA_PTR, layout.aligned(args)))),
                layout.exact(args), tuple(map(_IN_INT32, loose_ints)), tuple(map(_IN_UINT64_TOP, loose_ints)),
                tuple([_width_class(int(a)) for a in layout.loose_int_subclasses(args)]))

    def all_args(self, args: tuple, constexprs: dict) -> list:
        """Every parameter's value in signature order (what Triton's launcher of a compiled kernel takes)."""
        tail = self.names[len(args):]
        return [*args, *(constexprs[name] if name in constexprs else self.defaults[name] for name in tail)]


class FixedArgs(dict):
    """Constexprs or launch options for :func:`launch` that never change: a read-only dict (TypeError on any write)
    whose part of the launch key -- its items and the types of its values -- is worked out once, at construction.
    A plain dict with the same items gives the same key. The decode path's per-configuration constexprs are kept as
    these (``decode_attention._split_meta``, ``sketch_pack._append_meta``)."""

    __slots__ = ("key_part",)

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.key_part = (tuple(self.items()), tuple(map(type, self.values())))

    def _read_only(self, *args, **kwargs):
        raise TypeError("FixedArgs is read-only: build a new one (its launch key part is fixed at construction)")

    __setitem__ = __delitem__ = clear = pop = popitem = setdefault = update = __ior__ = _read_only


def _key_part(fixed: dict) -> tuple:
    """``(items, types of the values)`` of constexprs or launch options: kept by a :class:`FixedArgs`."""
    if type(fixed) is FixedArgs:
        return fixed.key_part
    return tuple(fixed.items()), tuple(map(type, fixed.values()))


class _Layout:
    """Getters of one tuple of argument types: the tensors (their dtypes), the tensors whose alignment Triton
    specializes on, the specialized scalars (by value) and the ``do_not_specialize`` ints (by integer width: Triton
    still compiles a separate kernel for ints past int32 and past int64; other ``do_not_specialize`` scalars are keyed
    by type alone)."""

    def __init__(self, types: tuple, loose: frozenset, unaligned: frozenset):
        is_tensor = [issubclass(t, torch.Tensor) for t in types]
        self.tensors = _getter([i for i, t in enumerate(is_tensor) if t])
        self.aligned = _getter([i for i, t in enumerate(is_tensor) if t and i not in unaligned])
        self.exact = _getter([i for i, t in enumerate(is_tensor) if not t and i not in loose])
        self.loose_ints = _getter([i for i, t in enumerate(types) if t is int and i in loose])
        self.loose_int_subclasses = _getter([i for i, t in enumerate(types) if i in loose and t is not int
                                             and issubclass(t, int) and not issubclass(t, bool)])


def _width_class(a: int) -> tuple:
    """A ``do_not_specialize`` int's width class (int32, int64, past int64), as Triton compiles them apart."""
    return _IN_INT32(a), _IN_UINT64_TOP(a)


def _getter(positions: list):
    """A function of an argument tuple returning the tuple of its items at ``positions`` (C-level for two or more)."""
    if len(positions) >= 2:
        return operator.itemgetter(*positions)
    if len(positions) == 1:
        only = positions[0]
        return lambda args: (args[only],)
    return lambda args: ()


def _positions(kernel, attribute: str, names: list) -> frozenset:
    """The parameter positions a ``JITFunction`` attribute lists by name or position (absent: none)."""
    listed = set(getattr(kernel, attribute, None) or ())
    return frozenset(i for i, name in enumerate(names) if name in listed or i in listed)


def _knob_getter():
    """One C-level getter of Triton's process-wide settings that change what ``JITFunction.run`` compiles (its debug
    flag, Proton's instrumentation mode, the float sanitizer's cast mode), those this Triton has: part of the key, so
    changing one binds anew."""
    names = [name for name in ("runtime.debug", "compilation.instrumentation_mode",
                               "compilation.fpsan_homomorphic_casts")
             if _knobs is not None and _has_path(_knobs, name)]
    return operator.attrgetter(*names) if names else (lambda knobs: ())


def _has_path(obj, dotted: str) -> bool:
    for part in dotted.split("."):
        if not hasattr(obj, part):
            return False
        obj = getattr(obj, part)
    return True


_KNOB_STATE = _knob_getter()


def _needs_tritons_own_launch(kernel, grid) -> bool:
    """A callable grid, or hooks ``JITFunction.run`` runs on every call (pre-run hooks, the pipeline-stages
    inspection hook): then the launch takes Triton's own path."""
    return (callable(grid) or bool(getattr(kernel, "pre_run_hooks", None))
            or (_knobs is not None and getattr(_knobs.runtime, "add_stages_inspection_hook", None) is not None))


def _current_device() -> int:
    """``torch.cuda.current_device()`` without its lazy-init check (a launch has CUDA tensors: CUDA is up)."""
    return torch._C._cuda_getDevice()


_DTYPE = operator.attrgetter("dtype")
_DATA_PTR = torch.Tensor.data_ptr
_MISALIGNMENT = (15).__and__  # address mod 16: Triton specializes on 16-byte alignment


_RAW_STREAM = getattr(torch._C, "_cuda_getCurrentRawStream", None)


def _current_stream(device: int) -> int:
    """The handle of CUDA device ``device``'s current stream (what Triton's launch of a compiled kernel asks the
    driver for), without building a ``torch.cuda.Stream`` (a few microseconds of an eager call)."""
    if _RAW_STREAM is None:  # pragma: no cover - a torch without the raw getter
        return torch.cuda.current_stream(device).cuda_stream
    return _RAW_STREAM(device)


def _direct_launcher(compiled):
    """``(run, function, packed_metadata)`` of a compiled kernel whose handles are loaded: what
    ``compiled[grid](*args)`` passes to its launcher after building a closure and asking for launch metadata on
    every call. Calling ``run`` with them, the current stream and no launch hooks is that launch less about a tenth of
    an eager decode call's host time. None where this Triton's ``CompiledKernel`` has not these attributes (the
    launch then goes through ``compiled[grid]``)."""
    if _knobs is None or getattr(compiled, "_run", None) is None:  # an older Triton, handles not loaded, a stand-in
        return None
    try:
        return compiled.run, compiled.function, compiled.packed_metadata
    except AttributeError:
        return None


def _launch_hooks_set() -> bool:
    """Whether a launch enter/exit hook is set in Triton's settings (a profiler's): then ``compiled[grid]`` runs it.
    A hook is None, a function, or (Triton 3.6 and later) a ``HookChain`` of functions, set when not empty."""
    runtime = getattr(_knobs, "runtime", None)  # (no generator: this runs on every relaunch)
    return runtime is not None and (_hook_set(getattr(runtime, "launch_enter_hook", None))
                                    or _hook_set(getattr(runtime, "launch_exit_hook", None)))


_HOOK_CHAIN = getattr(_knobs, "HookChain", None)  # Triton 3.6 and later


def _hook_set(hook) -> bool:
    """Whether one launch hook setting is set: not None, and not an empty ``HookChain``."""
    if _HOOK_CHAIN is not None and isinstance(hook, _HOOK_CHAIN):
        return bool(hook.calls)
    return hook is not None


_LAUNCHES: dict[int, _KernelLaunches] = {}
MAX_KEPT = 256  # compiled kernels kept per kernel: past it the kernel's entries are dropped (keys that never recur --
# prompt lengths, store capacities -- would otherwise pile up in a long-running process)
_LOCAL = threading.local()  # .uncached: how deep this thread is inside uncached_launches()


def launch(kernel, grid: tuple, args: tuple, constexprs: dict, options: dict | None = None, *,
           cached: bool = True) -> None:
    """``kernel[grid](*args, **constexprs, **options)``, the compiled kernel relaunched from a per-key cache.

    ``args``: the runtime arguments in signature order, positionally; ``constexprs``: the ``tl.constexpr``
    parameters by name (any left out take their defaults); ``options``: Triton's launch options (``num_warps``,
    ``num_stages``, ``maxnreg``...). Call it with the same dict key order from one call site: the key compares the
    items in order (another order is a separate entry, never a wrong one). ``cached=False`` always takes Triton's own
    launch (what the decode kernels' ``config={"cached_launch": False}`` selects, to compare). Raises what Triton
    raises."""
    options = options or {}
    if (not cached or getattr(_LOCAL, "uncached", 0) or not isinstance(kernel, JITFunction)  # interpreted, wrapped
            or _needs_tritons_own_launch(kernel, grid)):
        kernel[grid](*args, **constexprs, **options)
        return
    state = _LAUNCHES.get(id(kernel))
    if state is None or state.kernel is not kernel:
        state = _LAUNCHES[id(kernel)] = _KernelLaunches(kernel)
    key = state.key(args, constexprs, options)
    kept = state.compiled.get(key)
    if kept is None:
        compiled = kernel[grid](*args, **constexprs, **options)
        if hasattr(compiled, "__getitem__") and hasattr(compiled, "function"):
            if len(state.compiled) >= MAX_KEPT:
                state.compiled.clear()
            # with the parameters after ``args`` (constexprs, defaults): fixed by the key
            state.compiled[key] = (compiled, tuple(state.all_args(args, constexprs)[len(args):]),
                                   _direct_launcher(compiled))
        return
    compiled, tail, direct = kept
    grid = (*grid, 1, 1)  # a compiled kernel's launch takes all parameters, 3 grid dims
    if direct is not None and not _launch_hooks_set():
        run, function, packed_metadata = direct
        device = key[0]  # the key starts with the current device
        run(grid[0], grid[1], grid[2], _current_stream(device), function, packed_metadata, None, None, None,
            *args, *tail)
    else:
        compiled[grid[:3]](*args, *tail)


@contextlib.contextmanager
def uncached_launches():
    """Within the block every :func:`launch` takes Triton's own ``kernel[grid](...)`` (what the cached launch saves,
    measured end to end: ``benchmarks/launch_ab.py``), in this thread; restored on exit, errors included."""
    _LOCAL.uncached = getattr(_LOCAL, "uncached", 0) + 1
    try:
        yield
    finally:
        _LOCAL.uncached -= 1


def enabled() -> bool:
    """Whether :func:`launch` relaunches kept kernels in this thread (False inside :func:`uncached_launches`)."""
    return not getattr(_LOCAL, "uncached", 0)


def clear() -> None:
    """Forget every kept compiled kernel (Triton's own cache is untouched)."""
    _LAUNCHES.clear()
