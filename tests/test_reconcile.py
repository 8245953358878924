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
