"""A push event Prefect took but whose trigger started no run is run anyway, once."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

import pytest

from deployments.service.outbox import Outbox
from deployments.service.providers import PushEvent
from deployments.service.repair import Watched, start_missing_runs
from tasks.repo import RepoLocation

pytestmark = pytest.mark.usefixtures("prefect_harness")


def _sent(outbox: Outbox, repo: RepoLocation, sha: str, seconds_ago: float) -> None:
    push = PushEvent("github", f"d-{sha[:6]}", "refs/heads/main", sha, "1" * 40, ["a.txt"])
    assert outbox.enqueue(push, repo, "main")[0] == "queued"
    outbox.mark("github", push.delivery, None)
    with sqlite3.connect(outbox.path) as db:
        db.execute(
            "UPDATE deliveries SET sent_at = ? WHERE delivery = ?",
            (time.time() - seconds_ago, push.delivery),
        )


def test_a_taken_event_without_a_run_gets_one_after_the_grace_period(tmp_path: Path) -> None:
    from prefect import flow
    from prefect.client.orchestration import get_client

    @flow(name="reconcile-target")
    def target(
        commit_sha: str = "",
        before: str | None = None,
        changed_paths: list[str] | None = None,
        trigger: str = "manual",
    ) -> None:
        pass

    with get_client(sync_client=True) as client:
        flow_id = client.create_flow(target)
        deployment_id = client.create_deployment(flow_id, "reconcile")
    repo = RepoLocation.parse("https://example.com/org/r.git")
    outbox = Outbox(tmp_path / "outbox.sqlite")
    item = Watched(deployment_id, repo, "main")
    lost, recent = "a" * 40, "b" * 40
    _sent(outbox, repo, lost, seconds_ago=60)
    _sent(outbox, repo, recent, seconds_ago=1)

    assert start_missing_runs(item, outbox, grace=30) == 1
    # Checked once: a second pass starts nothing more, and the recent event still has time.
    assert start_missing_runs(item, outbox, grace=30) == 0
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

    # Only this deployment's runs: the session's Prefect server holds many others, and a
    # first page of all runs need not include this one.
    with get_client(sync_client=True) as client:
        started = client.read_flow_runs(
            deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id]))
        )
    assert [r.parameters for r in started] == [
        {"commit_sha": lost, "before": "1" * 40, "changed_paths": ["a.txt"], "trigger": "push"}
    ]
    assert "textgen-recovered-event" in started[0].tags
    assert [d for _, d, _ in outbox.without_run(repo, "main", 0)] == [f"d-{recent[:6]}"]


def test_a_crashed_run_is_retried_once_when_newest_and_else_marked_superseded() -> None:
    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId
    from prefect.states import Crashed

    from deployments.service.repair import RETRIED_TAG, retry_crashed_runs
    from tasks.names import is_superseded

    @flow(name="reaper-target")
    def target(commit_sha: str = "", trigger: str = "manual", attempt: int = 1) -> None:
        pass

    old, new = "c" * 40, "d" * 40
    with get_client(sync_client=True) as client:
        deployment_id = client.create_deployment(client.create_flow(target), "reaper")
        for sha in (old, new):
            run = client.create_flow_run_from_deployment(
                deployment_id, parameters={"commit_sha": sha, "trigger": "push"}
            )
            client.set_flow_run_state(run.id, Crashed(message="its worker died"), force=True)
    item = Watched(deployment_id, RepoLocation.parse("https://example.com/org/r.git"), "main")

    assert retry_crashed_runs([item], lambda _: new) == (1, 0)  # started 1, none going
    assert retry_crashed_runs([item], lambda _: new).started == 0  # each crash looked at once
    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(
            deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id]))
        )
    by_commit: dict[tuple[str, int], object] = {
        (r.parameters["commit_sha"], r.parameters.get("attempt", 1)): r for r in runs
    }
    assert set(by_commit) == {(old, 1), (new, 1), (new, 2)}
    superseded = by_commit[(old, 1)].state  # type: ignore[attr-defined]
    assert superseded.type.value == "CANCELLED" and is_superseded(superseded.message)
    assert "its worker died" in superseded.message and new[:7] in superseded.message
    crashed = by_commit[(new, 1)]
    assert crashed.state.type.value == "CRASHED" and RETRIED_TAG in crashed.tags  # type: ignore[attr-defined]
    assert by_commit[(new, 2)].state.type.value == "SCHEDULED"  # type: ignore[attr-defined]


def test_a_crashed_version_runs_queued_and_running_cell_runs_are_cancelled() -> None:
    """A version's run killed outright leaves its matrix cells' subflow runs: the reaper that
    sees the crash cancels those not ended (a queued one at once, a running one through its
    worker), and leaves ended ones and other runs' cells alone."""
    from prefect import flow, task
    from prefect.client.orchestration import get_client
    from prefect.states import Completed, Crashed, Running

    from deployments.service.repair import CELLS_ENDED_TAG, ORPHANED, retry_crashed_runs

    @flow(name="orphan-version")
    def version(commit_sha: str = "", trigger: str = "manual", attempt: int = 1) -> None:
        pass

    @flow(name="orphan-cell")
    def cell(cell: str = "") -> None:
        pass

    @task(name="orphan-hand-out")
    def hand_out() -> None:
        pass

    sha = "e" * 40
    with get_client(sync_client=True) as client:
        deployment_id = client.create_deployment(client.create_flow(version), "orphans")
        cell_deployment = client.create_deployment(client.create_flow(cell), "orphans")

        def run_with_cells(
            states: list[object], trigger: str = "push"
        ) -> tuple[object, list[object]]:
            parent = client.create_flow_run_from_deployment(
                deployment_id, parameters={"commit_sha": sha, "trigger": trigger}
            )
            cells = []
            for index, state in enumerate(states):
                handed = client.create_task_run(hand_out, parent.id, dynamic_key=str(index))
                child = client.create_flow_run_from_deployment(
                    cell_deployment, parameters={"cell": str(index)}, parent_task_run_id=handed.id
                )
                if state is not None:
                    client.set_flow_run_state(child.id, state, force=True)  # type: ignore[arg-type]
                cells.append(child)
            return parent, cells

        crashed, orphans = run_with_cells([None, Running(), Completed()])
        client.set_flow_run_state(crashed.id, Crashed(message="killed"), force=True)  # type: ignore[attr-defined]
        going, theirs = run_with_cells([None])
        client.set_flow_run_state(going.id, Running(), force=True)  # type: ignore[attr-defined]
        manual, its_cells = run_with_cells([Running()], trigger="manual")
        client.set_flow_run_state(manual.id, Crashed(message="killed"), force=True)  # type: ignore[attr-defined]
    item = Watched(deployment_id, RepoLocation.parse("https://example.com/org/o.git"), "main")

    assert retry_crashed_runs([item], lambda _: sha).started == 1  # the push run, not the manual
    with get_client(sync_client=True) as client:
        queued, running, ended = (client.read_flow_run(c.id).state for c in orphans)  # type: ignore[attr-defined]
        other = client.read_flow_run(theirs[0].id).state  # type: ignore[attr-defined]
        manual_cell = client.read_flow_run(its_cells[0].id).state  # type: ignore[attr-defined]
        tags = client.read_flow_run(manual.id).tags  # type: ignore[attr-defined]
    assert queued.type.value == "CANCELLED"  # no worker had it: Prefect ends it at once
    assert running.type.value == "CANCELLING" and running.message == ORPHANED
    assert ended.type.value == "COMPLETED"
    assert other.type.value == "SCHEDULED"  # a run going: its cells are its own
    assert manual_cell.type.value == "CANCELLING"  # a manual run is not retried; its cells end
    assert CELLS_ENDED_TAG in tags
    # Each crashed run is handled once: the next pass starts nothing more.
    assert retry_crashed_runs([item], lambda _: sha).started == 0


def test_the_reaper_looks_for_dead_runs_often_while_busy_and_seldom_when_idle(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from deployments.service.repair import Reaped, Reaper

    repo = RepoLocation.parse("https://example.com/org/idle.git")
    outbox = Outbox(tmp_path / "outbox.sqlite")
    reaper = Reaper([Watched("d", repo, "main")], outbox, dead_seconds=15, dead_idle_seconds=300)
    looked: list[int] = []
    seen = [Reaped(0, 0)]
    now = [1000.0]

    def read(watched: object, newest: object) -> Reaped:
        if isinstance(seen[0], Exception):
            raise seen[0]
        return seen[0]

    monkeypatch.setattr("deployments.service.repair.retry_crashed_runs", read)
    monkeypatch.setattr("deployments.service.repair.time.monotonic", lambda: now[0])
    monkeypatch.setattr(reaper, "end_dead_runs", lambda item: looked.append(int(now[0] - 1000)))

    def passes(count: int) -> list[int]:
        """`count` passes 5 s apart: the seconds (from the start) at which it looked."""
        looked.clear()
        for _ in range(count):
            reaper.check()
            now[0] += 5.0
        return list(looked)

    assert passes(120) == [0, 300]  # idle from the start: every 5 min
    seen[0] = Reaped(0, 1)  # a run going: every 15 s
    assert passes(9) == [600, 615, 630]
    seen[0] = Reaped(0, 0)  # and for BUSY_SECONDS after the last was seen
    assert passes(15) == [645, 660, 675, 690]
    assert passes(60) == [990]  # idle: 5 min after the last look
    seen[0] = Reaped(1, 0)  # a crashed run started again
    assert passes(3) == [1020]
    seen[0] = Reaped(0, 0)
    reaper.pushed()  # a push sent to Prefect: busy for BUSY_SECONDS from now
    assert passes(15) == [1035, 1050, 1065, 1080]
    assert passes(60) == [1380]
    seen[0] = ConnectionError("Prefect away")  # what Prefect would say is unknown: busy
    assert passes(3) == [1410]


def test_the_idle_reaper_reads_prefect_once_a_minute_and_a_push_makes_it_busy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The reaper's own loop, on a short clock: idle, one retry read per `idle_seconds`; after
    a push sent, one per `seconds`, even while pushes keep coming faster than that."""

    from deployments.service.repair import Reaped, Reaper

    repo = RepoLocation.parse("https://example.com/org/idle.git")
    reads: list[float] = []

    def read(watched: object, newest: object) -> Reaped:
        reads.append(time.monotonic())
        return Reaped(0, 0)

    monkeypatch.setattr("deployments.service.repair.retry_crashed_runs", read)
    outbox = Outbox(tmp_path / "outbox.sqlite")
    reaper = Reaper([Watched("d", repo, "main")], outbox, seconds=0.05, idle_seconds=30.0)
    monkeypatch.setattr(reaper, "end_dead_runs", lambda item: None)
    reaper.start()
    try:
        time.sleep(0.6)
        assert len(reads) == 1  # the first pass, then idle: the next is 30 s away
        reaper.pushed()
        time.sleep(0.6)
        assert 4 <= len(reads) - 1 <= 13  # every 0.05 s (12 in 0.6 s), however loaded
        burst = len(reads)
        for _ in range(60):  # pushes every 0.01 s: each one must not put the pass off
            reaper.pushed()
            time.sleep(0.01)
        assert len(reads) - burst >= 4
    finally:
        reaper.stopping.set()
        reaper.pushed()
        reaper.join(timeout=5)
    assert not reaper.is_alive()
