"""benchmarks/ab.py: the interleaved run order and the per-pair ratio statistics (pure, no timing)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

_AB = Path(__file__).resolve().parents[1] / "benchmarks" / "ab.py"
_spec = importlib.util.spec_from_file_location("benchmarks_ab", _AB)
ab = sys.modules["benchmarks_ab"] = importlib.util.module_from_spec(_spec)  # dataclasses look their module up
_spec.loader.exec_module(ab)


def test_schedule_alternates_sides_round_by_round():
    assert ab.schedule(["A", "B"], 3) == ["A", "B", "A", "B", "A", "B"]
    assert ab.schedule(["z0", "z1", "z2"], 2) == ["z0", "z1", "z2", "z0", "z1", "z2"]


def test_schedule_refuses_no_pairs():
    with pytest.raises(ValueError, match="pairs"):
        ab.schedule(["A", "B"], 0)


def test_interleave_calls_sides_in_schedule_order_and_keeps_round_order():
    calls = []

    def side(name):
        def run():
            calls.append(name)
            return f"{name}{sum(c == name for c in calls)}"

        return run

    results = ab.interleave({"A": side("A"), "B": side("B")}, 3)
    assert calls == ["A", "B", "A", "B", "A", "B"]
    assert results == {"A": ["A1", "A2", "A3"], "B": ["B1", "B2", "B3"]}


def test_pair_ratios_divide_within_each_round():
    assert ab.pair_ratios([10.0, 20.0, 30.0], [5.0, 40.0, 30.0]) == [2.0, 0.5, 1.0]
    with pytest.raises(ValueError):
        ab.pair_ratios([1.0, 2.0], [1.0])


def test_spread_is_median_and_range():
    assert ab.spread([2.0, 0.5, 1.0]) == ab.Spread(median=1.0, low=0.5, high=2.0)
    assert ab.spread([1.0, 3.0, 2.0, 10.0]) == ab.Spread(median=2.5, low=1.0, high=10.0)
    assert ab.spread([4.0]) == ab.Spread(4.0, 4.0, 4.0)
    with pytest.raises(ValueError):
        ab.spread([])


def _procs():
    spec = importlib.util.spec_from_file_location("benchmarks_procs", _AB.with_name("procs.py"))
    procs = sys.modules["benchmarks_procs"] = importlib.util.module_from_spec(spec)  # dataclasses need it there
    spec.loader.exec_module(procs)
    return procs


def test_bench_results_reads_every_object_of_a_line_two_ranks_shared() -> None:
    procs = _procs()
    shared = 'BENCH {"rank": 0, "peak": 1}BENCH {"rank": 1, "peak": 2}\n'
    assert procs.bench_results(shared) == [{"rank": 0, "peak": 1}, {"rank": 1, "peak": 2}]
    assert procs.bench_results("[rank 0] step 3/12 | loss 1.0\n") == []


def test_steady_window_starts_at_the_same_point_of_the_run_whichever_steps_a_side_logs() -> None:
    procs = _procs()
    cliplab = [(float(k), k) for k in range(6, 37, 6)]  # after steps 6, 12, ..., 36
    open_clip = [(float(k), k) for k in (1, 7, 13, 19, 25, 31, 36)]  # after step 1, then every 6th, then the last
    assert procs.steady_start(cliplab) == (12.0, 12)
    assert procs.steady_start(open_clip) == (13.0, 13)
    assert procs.steady_start([(2.0, 2), (4.0, 4), (6.0, 6)]) == (4.0, 4)  # never the first line
    startup, rate = procs.summarise([(10.0, 1), (11.0, 2), (12.0, 3), (13.0, 4)], 1)
    assert (startup, rate) == (10.0, 1.0)
