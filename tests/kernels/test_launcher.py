"""``kernels._launcher.launch``: which calls bind through Triton and which relaunch a kept compiled kernel.

Triton itself is replaced here by a stand-in ``JITFunction`` that records what it is asked to do (the CPU has no
compiled kernels); ``test_kernels.py`` runs the real decode kernels through ``launch`` on CUDA, cached and uncached.
"""
import pytest
import torch

from h1bkv_lite.kernels import _launcher


def _kernel_fn(x_ptr, y_ptr, N, stride, scale, BLOCK: "tl.constexpr", FLAG: "tl.constexpr" = False):
    """The stand-in kernel's signature: two pointers, a loose int, a specialized int, a float, two constexprs."""


class _Compiled:
    """A compiled kernel: ``compiled[grid](*all_args)`` records the launch."""

    def __init__(self, log):
        self.function, self.log = object(), log

    def __getitem__(self, grid):  # Triton's CompiledKernel reads grid[0], grid[1] and grid[2]
        assert len(grid) == 3, f"a compiled kernel's grid has 3 dimensions, got {grid}"
        return lambda *args: self.log.append(("compiled", grid, args))


class _FakeJIT:
    """A ``JITFunction``: ``kernel[grid](*args, **kwargs)`` records the binding launch and returns its compiled
    kernel (one per call, so the test can tell which was kept)."""

    def __init__(self, compiles=True, do_not_specialize=("N",), do_not_specialize_on_alignment=()):
        self.fn, self.log, self.compiles = _kernel_fn, [], compiles
        self.do_not_specialize = list(do_not_specialize)
        self.do_not_specialize_on_alignment = list(do_not_specialize_on_alignment)
        self.kept = []

    def __getitem__(self, grid):
        def run(*args, **kwargs):
            self.log.append(("bind", grid, args, kwargs))
            self.kept.append(_Compiled(self.log) if self.compiles else None)
            return self.kept[-1]
        return run


@pytest.fixture
def fake_triton(monkeypatch):
    monkeypatch.setattr(_launcher, "JITFunction", _FakeJIT)
    monkeypatch.setattr(_launcher, "_current_device", lambda: 0)
    _launcher.clear()
    yield
    _launcher.clear()


def _args(x, y, N=100, stride=64, scale=0.5):
    return (x, y, N, stride, scale)


def _kinds(kernel):
    return [entry[0] for entry in kernel.log]


def test_repeat_call_relaunches_the_kept_kernel_with_every_argument_in_order(fake_triton):
    kernel = _FakeJIT()
    x, y = torch.zeros(64), torch.zeros(64, dtype=torch.int32)
    _launcher.launch(kernel, (3, 2), _args(x, y), {"BLOCK": 16}, {"num_warps": 4})
    assert kernel.log == [("bind", (3, 2), _args(x, y), {"BLOCK": 16, "num_warps": 4})]
    _launcher.launch(kernel, (5, 1), _args(x, y, N=200), {"BLOCK": 16}, {"num_warps": 4})
    # the loose N changed (not part of the key): the kept kernel runs, the defaulted constexpr FLAG appended
    assert kernel.log[1] == ("compiled", (5, 1, 1), (*_args(x, y, N=200), 16, False))
    assert len(kernel.kept) == 1


@pytest.mark.parametrize("change", ["dtype", "alignment", "specialized int", "float", "constexpr", "option",
                                    "device", "wide loose int"])
def test_a_new_launch_key_binds_through_triton_again(fake_triton, monkeypatch, change):
    kernel = _FakeJIT()
    x, y = torch.zeros(64), torch.zeros(64, dtype=torch.int32)
    base = dict(args=_args(x, y), constexprs={"BLOCK": 16}, options={"num_warps": 4})
    _launcher.launch(kernel, (1,), base["args"], base["constexprs"], base["options"])
    changed = {
        "dtype": dict(base, args=_args(x.half(), y)),
        "alignment": dict(base, args=_args(x[1:], y)),
        "specialized int": dict(base, args=_args(x, y, stride=65)),
        "float": dict(base, args=_args(x, y, scale=0.25)),
        "constexpr": dict(base, constexprs={"BLOCK": 32}),
        "option": dict(base, options={"num_warps": 8}),
        "device": base,
        "wide loose int": dict(base, args=_args(x, y, N=1 << 40)),
    }[change]
    if change == "device":
        monkeypatch.setattr(_launcher, "_current_device", lambda: 1)
    _launcher.launch(kernel, (1,), changed["args"], changed["constexprs"], changed["options"])
    assert _kinds(kernel) == ["bind", "bind"]
    _launcher.launch(kernel, (1,), changed["args"], changed["constexprs"], changed["options"])
    assert _kinds(kernel) == ["bind", "bind", "compiled"]


def test_alignment_is_not_keyed_where_triton_does_not_specialize_on_it(fake_triton):
    kernel = _FakeJIT(do_not_specialize_on_alignment=("y_ptr",))
    x, y = torch.zeros(64), torch.zeros(64, dtype=torch.int32)
    _launcher.launch(kernel, (1,), _args(x, y), {"BLOCK": 16})
    _launcher.launch(kernel, (1,), _args(x, y[1:]), {"BLOCK": 16})
    _launcher.launch(kernel, (1,), _args(x[1:], y), {"BLOCK": 16})
    assert _kinds(kernel) == ["bind", "compiled", "bind"]


def test_uncached_wrapped_and_uncompiled_kernels_always_bind(fake_triton):
    x, y = torch.zeros(64), torch.zeros(64, dtype=torch.int32)
    kernel = _FakeJIT()
    for _ in range(2):
        _launcher.launch(kernel, (1,), _args(x, y), {"BLOCK": 16}, cached=False)
    assert _kinds(kernel) == ["bind", "bind"]

    class Wrapped:  # not a JITFunction: a test's launch counter, or Triton's interpreter
        def __init__(self):
            self.inner = _FakeJIT()

        def __getitem__(self, grid):
            return self.inner[grid]

    wrapped = Wrapped()
    for _ in range(2):
        _launcher.launch(wrapped, (1,), _args(x, y), {"BLOCK": 16})
    assert _kinds(wrapped.inner) == ["bind", "bind"]

    no_kernel = _FakeJIT(compiles=False)  # Triton returned no compiled kernel: nothing is kept
    for _ in range(2):
        _launcher.launch(no_kernel, (1,), _args(x, y), {"BLOCK": 16})
    assert _kinds(no_kernel) == ["bind", "bind"]


def test_clear_forgets_the_kept_kernels(fake_triton):
    kernel = _FakeJIT()
    x, y = torch.zeros(64), torch.zeros(64, dtype=torch.int32)
    _launcher.launch(kernel, (1,), _args(x, y), {"BLOCK": 16})
    _launcher.clear()
    _launcher.launch(kernel, (1,), _args(x, y), {"BLOCK": 16})
    assert _kinds(kernel) == ["bind", "bind"]


def test_uncached_launches_binds_every_call_and_is_restored_on_errors(fake_triton):
    kernel = _FakeJIT()
    x, y = torch.zeros(64), torch.zeros(64, dtype=torch.int32)
    _launcher.launch(kernel, (1,), _args(x, y), {"BLOCK": 16})
    with _launcher.uncached_launches():
        _launcher.launch(kernel, (1,), _args(x, y), {"BLOCK": 16})
    with pytest.raises(RuntimeError), _launcher.uncached_launches():
        raise RuntimeError("inside")
    _launcher.launch(kernel, (1,), _args(x, y), {"BLOCK": 16})
    assert _kinds(kernel) == ["bind", "bind", "compiled"]


@pytest.mark.parametrize("first,second", [(True, 1), (16, 16.0)])
def test_constexprs_equal_in_value_but_not_in_type_are_separate_keys(fake_triton, first, second):
    """Triton compiles ``FLAG=True`` and ``FLAG=1`` (``16`` and ``16.0``) apart, though they compare equal."""
    kernel = _FakeJIT()
    x, y = torch.zeros(64), torch.zeros(64, dtype=torch.int32)
    _launcher.launch(kernel, (1,), _args(x, y), {"BLOCK": 16, "FLAG": first})
    _launcher.launch(kernel, (1,), _args(x, y), {"BLOCK": 16, "FLAG": second})
    assert _kinds(kernel) == ["bind", "bind"]


def test_a_changed_triton_setting_binds_again(fake_triton, monkeypatch):
    """Triton's debug flag (and instrumentation mode) change what ``JITFunction.run`` compiles: part of the key."""
    kernel = _FakeJIT()
    x, y = torch.zeros(64), torch.zeros(64, dtype=torch.int32)
    _launcher.launch(kernel, (1,), _args(x, y), {"BLOCK": 16})
    monkeypatch.setattr(_launcher, "_KNOB_STATE", lambda knobs: (True, ""))
    _launcher.launch(kernel, (1,), _args(x, y), {"BLOCK": 16})
    _launcher.launch(kernel, (1,), _args(x, y), {"BLOCK": 16})
    assert _kinds(kernel) == ["bind", "bind", "compiled"]


def test_callable_grids_and_pre_run_hooks_take_tritons_own_launch(fake_triton):
    x, y = torch.zeros(64), torch.zeros(64, dtype=torch.int32)
    kernel = _FakeJIT()
    for _ in range(2):
        _launcher.launch(kernel, lambda meta: (1,), _args(x, y), {"BLOCK": 16})
    hooked = _FakeJIT()
    hooked.pre_run_hooks = [lambda *args, **kwargs: None]
    for _ in range(2):
        _launcher.launch(hooked, (1,), _args(x, y), {"BLOCK": 16})
    assert _kinds(kernel) == _kinds(hooked) == ["bind", "bind"]


def test_kept_kernels_are_bounded(fake_triton, monkeypatch):
    """Keys that never recur (a new specialized value per call) do not pile up past ``MAX_KEPT``."""
    monkeypatch.setattr(_launcher, "MAX_KEPT", 3)
    kernel = _FakeJIT()
    x, y = torch.zeros(64), torch.zeros(64, dtype=torch.int32)
    for stride in range(10):
        _launcher.launch(kernel, (1,), _args(x, y, stride=stride), {"BLOCK": 16})
    assert len(_launcher._LAUNCHES[id(kernel)].compiled) <= 3
    _launcher.launch(kernel, (1,), _args(x, y, stride=9), {"BLOCK": 16})  # the newest is still kept
    assert _kinds(kernel)[-1] == "compiled"


def test_uncached_launches_is_per_thread_and_nests(fake_triton):
    import threading

    kernel = _FakeJIT()
    x, y = torch.zeros(64), torch.zeros(64, dtype=torch.int32)
    _launcher.launch(kernel, (1,), _args(x, y), {"BLOCK": 16})
    seen = []
    with _launcher.uncached_launches():
        with _launcher.uncached_launches():
            pass
        assert not _launcher.enabled(), "leaving an inner block turned the outer one off"
        other = threading.Thread(target=lambda: seen.append(_launcher.enabled()))
        other.start()
        other.join()
    assert seen == [True] and _launcher.enabled()


class _LoadedCompiled(_Compiled):
    """A compiled kernel with its launcher loaded, as Triton's ``CompiledKernel`` after its first launch: ``run``
    (the launcher), ``function`` and ``packed_metadata``."""

    def __init__(self, log):
        super().__init__(log)
        self.packed_metadata = object()
        self._run = self.run = lambda *launch: self.log.append(("direct", launch))


def test_a_loaded_kernel_is_relaunched_through_its_launcher_unless_launch_hooks_are_set(fake_triton, monkeypatch):
    """A kept kernel whose launcher is loaded is called as ``compiled[grid]`` would call it: grid, the current
    stream, the function, the packed metadata, no launch metadata and hooks, then every argument; with Triton's
    launch enter hook set (a profiler's), ``compiled[grid]`` itself runs (it calls the hooks)."""
    pytest.importorskip("triton")
    kernel = _FakeJIT()
    log = kernel.log
    loaded = []

    def bind(grid):
        def run(*args, **kwargs):
            log.append(("bind", grid, args, kwargs))
            loaded.append(_LoadedCompiled(log))
            return loaded[-1]
        return run

    monkeypatch.setattr(_FakeJIT, "__getitem__", lambda self, grid: bind(grid))
    monkeypatch.setattr(_launcher, "_current_stream", lambda device: ("stream of", device))
    x, y = torch.zeros(64), torch.zeros(64, dtype=torch.int32)
    _launcher.launch(kernel, (3, 2), _args(x, y), {"BLOCK": 16})
    _launcher.launch(kernel, (5,), _args(x, y, N=7), {"BLOCK": 16})
    compiled = loaded[0]
    assert len(loaded) == 1 and log[1] == ("direct", (5, 1, 1, ("stream of", 0), compiled.function,
                                                      compiled.packed_metadata, None, None, None,
                                                      *_args(x, y, N=7), 16, False))
    hook = lambda metadata: None  # noqa: E731
    runtime = _launcher._knobs.runtime
    if hasattr(runtime.launch_enter_hook, "calls"):  # a chain of hooks (later Triton): empty is unset
        monkeypatch.setattr(runtime.launch_enter_hook, "calls", [hook])
    else:
        monkeypatch.setattr(runtime, "launch_enter_hook", hook)
    _launcher.launch(kernel, (5,), _args(x, y, N=8), {"BLOCK": 16})
    assert log[2] == ("compiled", (5, 1, 1), (*_args(x, y, N=8), 16, False))


def test_kernels_without_a_loaded_launcher_are_relaunched_through_compiled_grid(fake_triton):
    """A compiled kernel without ``_run`` loaded (another Triton's, a stand-in) keeps ``compiled[grid]``."""
    assert _launcher._direct_launcher(_Compiled([])) is None
    loaded = _LoadedCompiled([])
    assert _launcher._direct_launcher(loaded) == (loaded.run, loaded.function, loaded.packed_metadata)


def test_loose_ints_are_keyed_by_the_width_triton_compiles_them_at(fake_triton):
    """A ``do_not_specialize`` int relaunches the kept kernel while it keeps its width class (int32, int64, past
    int64: Triton compiles each apart) and binds anew when it crosses one."""
    kernel = _FakeJIT()
    x, y = torch.zeros(64), torch.zeros(64, dtype=torch.int32)
    for N in (-(1 << 31), (1 << 31) - 1, 1 << 31, (1 << 63) - 1, 1 << 63, (1 << 64) - 1):
        _launcher.launch(kernel, (1,), _args(x, y, N=N), {"BLOCK": 16})
    assert _kinds(kernel) == ["bind", "compiled", "bind", "compiled", "bind", "compiled"]


def test_loose_int_subclasses_are_keyed_by_width_too(fake_triton):
    """An int subclass (an ``IntEnum``) as a ``do_not_specialize`` int: Triton compiles it by width like an int, so
    crossing int32 binds anew (it is never searched element by element as a range member)."""
    import enum

    class Size(enum.IntEnum):
        SMALL = 3
        ALSO_SMALL = 5
        BIG = 1 << 40

    kernel = _FakeJIT()
    x, y = torch.zeros(64), torch.zeros(64, dtype=torch.int32)
    for N in (Size.SMALL, Size.ALSO_SMALL, Size.BIG):
        _launcher.launch(kernel, (1,), _args(x, y, N=N), {"BLOCK": 16})
    assert _kinds(kernel) == ["bind", "compiled", "bind"]


def test_a_hook_object_is_set_unless_it_is_an_empty_hook_chain(monkeypatch):
    """Launch hooks: None and an empty ``HookChain`` (later Triton) are unset; any other object is set, whatever
    attributes it has."""
    pytest.importorskip("triton")

    class CountingHook:
        calls = 0

        def __call__(self, metadata):
            self.calls += 1

    assert not _launcher._hook_set(None) and _launcher._hook_set(CountingHook())
    chain_type = getattr(_launcher._knobs, "HookChain", None)
    if chain_type is not None:
        chain = chain_type()
        assert not _launcher._hook_set(chain)
        chain.add(CountingHook())
        assert _launcher._hook_set(chain)


def test_fixed_args_are_read_only_and_key_as_the_plain_dict_does(fake_triton):
    """Constexprs kept as ``FixedArgs`` (their key part worked out once) give the key a plain dict of the same items
    gives: a launch with either relaunches the kernel the other bound; a different value binds again; a write
    raises."""
    kernel = _FakeJIT()
    x, y = torch.zeros(64), torch.zeros(64, dtype=torch.int32)
    fixed = _launcher.FixedArgs(BLOCK=16, FLAG=True)
    _launcher.launch(kernel, (1,), _args(x, y), fixed, _launcher.FixedArgs(num_warps=4))
    _launcher.launch(kernel, (1,), _args(x, y), {"BLOCK": 16, "FLAG": True}, {"num_warps": 4})
    _launcher.launch(kernel, (1,), _args(x, y), _launcher.FixedArgs(BLOCK=16, FLAG=1), {"num_warps": 4})
    assert _kinds(kernel) == ["bind", "compiled", "bind"]
    assert kernel.log[0][3] == {"BLOCK": 16, "FLAG": True, "num_warps": 4}  # what Triton's own launch was given
    for write in (lambda d: d.__setitem__("BLOCK", 32), lambda d: d.update(BLOCK=32), lambda d: d.pop("BLOCK"),
                  lambda d: d.setdefault("X", 1), lambda d: d.clear(), lambda d: d.__delitem__("FLAG")):
        with pytest.raises(TypeError, match="read-only"):
            write(fixed)
    assert fixed == {"BLOCK": 16, "FLAG": True}
