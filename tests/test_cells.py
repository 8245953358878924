"""How a version's run shares its matrix cells with the pool (tasks.cells.run_all): a pool whose
workers take cells, one whose workers are all busy, crashed and failed cell runs. The pool here
is scripted; tests/test_team.py runs the same on real workers."""

from __future__ import annotations

import itertools
from types import SimpleNamespace
from typing import Any, cast

import pytest

from tasks.cells import ATTEMPTS, Done, Work, run_all
from tasks.errors import SettingsError, TextgenError


def work(*keys: str) -> list[Work]:
    return [Work(cast(Any, SimpleNamespace(key=k)), [], "rev") for k in keys]


class Scripted:
    """A pool whose runs go through the states `script(cell, attempt)` gives, one per read."""

    def __init__(self, script: Any) -> None:
        self.script = script
        self.runs: dict[int, dict[str, Any]] = {}
        self.ids = itertools.count(1)
        self.cancelled: list[int] = []
        self.taken: list[int] = []

    def submit(self, item: Work, attempt: int) -> int:
        run_id = next(self.ids)
        states = list(self.script(item.cell.key, attempt))
        self.runs[run_id] = {"cell": item.cell.key, "attempt": attempt, "states": states}
        return run_id

    def _state(self, run_id: int) -> str:
        states = self.runs[run_id]["states"]
        return str(states[0] if len(states) == 1 else states.pop(0))

    def states(self, ids: list[int]) -> dict[int, tuple[str, str]]:
        return {i: (self._state(i), f"run {i}") for i in ids}

    def take_back(self, run_id: int) -> bool:
        if self.runs[run_id]["states"][0] != "SCHEDULED":
            return False
        self.runs[run_id]["states"] = ["CANCELLED"]
        self.taken.append(run_id)
        return True

    def result(self, run_id: int) -> Done | TextgenError | None:
        run = self.runs[run_id]
        if run["states"][-1] == "FAILED":
            return SettingsError(f"cell {run['cell']}: prompt q1 is past the model's context")
        if run["states"][-1] != "COMPLETED":
            return None
        return Done([], {"by": "pool"}, flow_run_id=str(run_id), pid=1)

    def cancel(self, ids: list[int]) -> None:
        self.cancelled += ids


def made_here(made: list[str]) -> Any:
    def here(item: Work) -> Done:
        made.append(item.cell.key)
        return Done([], {"by": "here"})

    return here


def test_without_a_pool_every_cell_is_made_here_in_order() -> None:
    made: list[str] = []
    done = run_all(work("a", "b", "c"), made_here(made), None)
    assert made == ["a", "b", "c"] and list(done) == ["a", "b", "c"]


def test_free_workers_make_the_cells_the_run_hands_out() -> None:
    pool = Scripted(lambda cell, attempt: ["PENDING", "RUNNING", "COMPLETED"])
    made: list[str] = []
    slept: list[float] = []
    done = run_all(work("a", "b", "c"), made_here(made), pool, sleep=slept.append)
    assert made == ["a"]  # the run's own: the first
    assert {k: d.loaded["by"] for k, d in done.items()} == {"a": "here", "b": "pool", "c": "pool"}
    assert done["b"].flow_run_id == "1" and done["c"].flow_run_id == "2"
    assert pool.taken == [] and pool.cancelled == []
    assert slept  # it waited for them, reading their states between waits


def test_with_every_worker_busy_the_run_takes_its_cells_back_and_makes_them() -> None:
    pool = Scripted(lambda cell, attempt: ["SCHEDULED"])
    made: list[str] = []
    done = run_all(work("a", "b", "c"), made_here(made), pool, sleep=lambda s: None)
    assert made == ["a", "b", "c"]
    assert all(d.loaded["by"] == "here" for d in done.values())
    assert sorted(pool.taken) == [1, 2] and pool.cancelled == []


def test_a_cell_taken_by_a_worker_is_waited_for_and_others_taken_back() -> None:
    def script(cell: str, attempt: int) -> list[str]:
        return ["RUNNING", "RUNNING", "RUNNING", "COMPLETED"] if cell == "b" else ["SCHEDULED"]

    pool = Scripted(script)
    made: list[str] = []
    done = run_all(work("a", "b", "c"), made_here(made), pool, sleep=lambda s: None)
    assert made == ["a", "c"] and done["b"].loaded["by"] == "pool"
    assert pool.taken == [2]


def test_a_crashed_cell_run_is_handed_out_again() -> None:
    def script(cell: str, attempt: int) -> list[str]:
        return ["RUNNING", "CRASHED"] if attempt == 1 else ["PENDING", "COMPLETED"]

    pool = Scripted(script)
    done = run_all(work("a", "b"), made_here([]), pool, sleep=lambda s: None)
    assert done["b"].flow_run_id == "2"
    assert [r["attempt"] for r in pool.runs.values()] == [1, 2]


def test_a_cell_crashing_every_time_fails_the_version_naming_it() -> None:
    pool = Scripted(lambda cell, attempt: ["RUNNING", "CRASHED"])
    with pytest.raises(TextgenError, match=f"cell b: its run crashed {ATTEMPTS} times, last: run"):
        run_all(work("a", "b"), made_here([]), pool, sleep=lambda s: None)
    assert len(pool.runs) == ATTEMPTS


def test_a_failed_cell_fails_the_version_with_its_error_and_stops_the_others() -> None:
    def script(cell: str, attempt: int) -> list[str]:
        return ["RUNNING", "FAILED"] if cell == "b" else ["RUNNING"]

    pool = Scripted(script)
    with pytest.raises(SettingsError, match="cell b: prompt q1 is past the model's context"):
        run_all(work("a", "b", "c"), made_here([]), pool, sleep=lambda s: None)
    assert pool.cancelled == [2]  # cell c's run, still going


def test_a_failure_here_stops_the_cells_handed_out() -> None:
    pool = Scripted(lambda cell, attempt: ["RUNNING"])

    def here(item: Work) -> Done:
        raise SettingsError("cell a: no such model")

    with pytest.raises(SettingsError, match="cell a"):
        run_all(work("a", "b", "c"), here, pool, sleep=lambda s: None)
    assert sorted(pool.cancelled) == [1, 2]


def test_a_cell_run_the_pool_no_longer_knows_is_handed_out_again() -> None:
    pool = Scripted(lambda cell, attempt: ["RUNNING", "COMPLETED"])
    real = pool.states
    pool.states = lambda ids: {i: s for i, s in real(ids).items() if i != 1}  # type: ignore[method-assign]
    done = run_all(work("a", "b"), made_here([]), pool, sleep=lambda s: None)
    assert done["b"].flow_run_id == "2"


def test_a_cell_run_pending_too_long_is_handed_out_again() -> None:
    from tasks.cells import PENDING_SECONDS

    def script(cell: str, attempt: int) -> list[str]:
        return ["PENDING"] if attempt == 1 else ["RUNNING", "COMPLETED"]

    pool = Scripted(script)
    now = [0.0]

    def sleep(seconds: float) -> None:
        now[0] += 30.0

    done = run_all(work("a", "b"), made_here([]), pool, sleep=sleep, clock=lambda: now[0])
    assert done["b"].flow_run_id == "2" and pool.cancelled == [1]
    assert now[0] > PENDING_SECONDS
