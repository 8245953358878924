"""What a run records about how far its timings can be compared: the cores other work used while
it generated, and how much its decoding steps varied; and how compare reads them."""

from __future__ import annotations

import subprocess
import sys
from types import SimpleNamespace
from typing import Any

import pytest

from deployments.reports.compare import Comparison, Side
from tasks.generate import Generations
from tasks.machine import CoreShare, shared


def test_a_busy_neighbour_is_counted_as_cores_busy_elsewhere() -> None:
    burn = "import time\nend = time.time() + 3\nwhile time.time() < end: pass\n"
    neighbour = subprocess.Popen([sys.executable, "-c", burn])
    try:
        with CoreShare() as share:
            subprocess.run(["sleep", "1.5"], check=True)
    finally:
        neighbour.wait(10)
    assert share.elsewhere is not None and share.elsewhere >= 0.6, share
    assert shared(share.elsewhere)
    assert share.wall_seconds >= 1.5


def test_the_own_work_of_a_step_and_the_counters_rounding_are_not_elsewhere(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from tasks import machine

    clock = {"wall": 0.0, "busy": 0.0, "own": 0.0}
    monkeypatch.setattr(machine.time, "perf_counter", lambda: clock["wall"])
    monkeypatch.setattr(machine, "_machine_busy_seconds", lambda: clock["busy"])
    monkeypatch.setattr(machine, "_own_seconds", lambda: clock["own"])

    def step(wall: float, busy: float, own: float) -> float | None:
        with CoreShare() as share:
            for key, value in (("wall", wall), ("busy", busy), ("own", own)):
                clock[key] += value
        return share.elsewhere

    assert step(1.0, busy=2.0, own=2.0) == 0.0  # two threads of its own: none elsewhere
    assert step(0.08, busy=0.18, own=0.16) == 0.0  # two ticks of rounding in a short step
    assert step(2.0, busy=3.0, own=1.0) == 0.99  # a neighbour took a core
    monkeypatch.setattr(machine, "_machine_busy_seconds", lambda: None)
    assert step(1.0, busy=1.0, own=1.0) is None  # no counters: unknown, never zero


def _generations(steps: list[float]) -> Generations:
    return Generations("p", ["p x"], [[1]], [1], sum(steps), {}, step_seconds=steps)


def test_the_step_spread_leaves_out_the_first_step() -> None:
    steady = _generations([0.5] + [0.010] * 20)
    assert steady.step_spread == 0.0
    noisy = _generations([0.5] + [0.010, 0.012, 0.008, 0.011] * 5)
    assert noisy.step_spread is not None and 0.1 < noisy.step_spread < 0.5
    assert _generations([0.5, 0.01]).step_spread is None  # too few steps to tell


def _side(label: str, **metrics: float) -> Side:
    run: Any = SimpleNamespace(data=SimpleNamespace(metrics=metrics, tags={}, params={}))
    return Side(run, label, None, "", [])


def _comparison(a: Side, b: Side) -> Comparison:
    return Comparison("repo", a, b, [], [], [], "", [])


def test_compare_says_when_a_speed_change_is_not_the_change_s_effect() -> None:
    alone = _side("v1", tokens_per_second=52.2, shared_cores=0.0, step_time_spread=0.04)
    shared_run = _side("v2", tokens_per_second=13.3, shared_cores=1.4, step_time_spread=0.3)
    note = _comparison(alone, shared_run).speed_note("tokens_per_second", 52.2, 13.3)
    assert note == "not comparable: cores busy elsewhere (v2 1.4)"
    steady = _side("v3", tokens_per_second=50.9, shared_cores=0.0, step_time_spread=0.08)
    within = _comparison(alone, steady).speed_note("tokens_per_second", 52.2, 50.9)
    assert within == "within noise (steps vary 8%)"
    faster = _side("v4", tokens_per_second=80.0, shared_cores=0.1, step_time_spread=0.05)
    assert _comparison(alone, faster).speed_note("tokens_per_second", 52.2, 80.0) == ""
    # Quality metrics are never flagged; loading has no steps, only its own core share.
    assert _comparison(alone, shared_run).speed_note("distinct_2", 0.9, 0.5) == ""
    loaded = _side("v5", load_seconds=5.7, load_shared_cores=1.1)
    fast_load = _side("v6", load_seconds=1.9, load_shared_cores=0.0)
    assert "not comparable" in _comparison(fast_load, loaded).speed_note("load_seconds", 1.9, 5.7)
