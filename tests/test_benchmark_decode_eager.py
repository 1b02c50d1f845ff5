"""benchmarks/decode_eager.py's paired measurement (the benchmark itself needs CUDA: the device machine)."""
import importlib.util
import sys
from pathlib import Path

_DIR = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(_DIR))
_spec = importlib.util.spec_from_file_location("bench_decode_eager", _DIR / "decode_eager.py")
decode_eager = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(decode_eager)


class _Clock:
    """A clock that advances only when a timed function runs: ``cost`` per call of each function, plus ``drift``
    added to every cost after each block (a host slowing down)."""

    def __init__(self, drift=0.0):
        self.now, self.drift, self.slowdown = 0.0, drift, 0.0

    def __call__(self):
        return self.now

    def timed(self, cost, log, name):
        def fn():
            self.now += cost * (1.0 + self.slowdown)
            log.append(name)
        return fn

    def sync(self):
        self.slowdown += self.drift


def test_paired_speedup_alternates_blocks_and_takes_the_ratio_within_each_pair():
    clock, log = _Clock(drift=0.25), []
    result = decode_eager.paired_speedup(clock.timed(3.0, log, "sdpa"), clock.timed(1.5, log, "h1b"), rounds=4,
                                         calls=5, sync=clock.sync, clock=clock)
    # a warm-up call of each, then blocks of 5 in the order sdpa, h1b | h1b, sdpa | sdpa, h1b | h1b, sdpa
    blocks = [log[2 + 5 * i] for i in range(8)]
    assert log[:2] == ["sdpa", "h1b"] and blocks == ["sdpa", "h1b", "h1b", "sdpa"] * 2
    assert all(log[2 + 5 * i: 7 + 5 * i] == [blocks[i]] * 5 for i in range(8))
    assert result["rounds"] == 4 and result["calls_per_block"] == 5 and len(result["ratios"]) == 4
    # the host slows by 25% per block: within a pair the later block is slower, so each ratio is 2 x (1 +/- ...)
    slow = [1.0 + 0.25 * (1 + 2 * i) for i in range(4)]  # slowdown of each pair's first block, +0.25 for its second
    expected = [3.0 * s / (1.5 * (s + 0.25)) if i % 2 == 0 else 3.0 * (s + 0.25) / (1.5 * s)
                for i, s in enumerate(slow)]
    assert all(abs(r - e) < 1e-12 for r, e in zip(result["ratios"], expected))
    assert result["q1"] <= result["median"] <= result["q3"]
    assert min(expected) < 2.0 < max(expected) and abs(result["median"] - 2.0) < 0.2


def test_paired_speedup_without_drift_is_the_cost_ratio():
    clock, log = _Clock(), []
    result = decode_eager.paired_speedup(clock.timed(2.0, log, "a"), clock.timed(5.0, log, "b"), rounds=3, calls=2,
                                         sync=clock.sync, clock=clock)
    assert result["ratios"] == [0.4, 0.4, 0.4] and result["median"] == 0.4 == result["q1"] == result["q3"]


def test_paired_speedup_quartiles_stay_within_the_ratios_and_bad_counts_raise():
    import pytest

    clock, log = _Clock(drift=0.5), []
    result = decode_eager.paired_speedup(clock.timed(1.0, log, "a"), clock.timed(1.0, log, "b"), rounds=2, calls=1,
                                         sync=clock.sync, clock=clock)
    assert min(result["ratios"]) <= result["q1"] <= result["median"] <= result["q3"] <= max(result["ratios"])
    for bad in ({"rounds": 0}, {"calls": 0}, {"rounds": 2.0}, {"calls": True}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            decode_eager.paired_speedup(lambda: None, lambda: None, sync=lambda: None, **bad)


def test_paired_speedup_runs_after_block_untimed_after_every_block():
    clock, log = _Clock(), []

    def reset():
        log.append("reset")
        clock.now += 100.0  # untimed: must not reach a ratio

    result = decode_eager.paired_speedup(clock.timed(2.0, log, "a"), clock.timed(1.0, log, "b"), rounds=2, calls=3,
                                         sync=clock.sync, clock=clock, after_block=reset)
    assert log.count("reset") == 4 and log[2:6] == ["a", "a", "a", "reset"]
    assert result["ratios"] == [2.0, 2.0]
