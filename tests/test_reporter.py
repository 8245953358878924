"""The reporter: results kept in the outbox until the provider takes them, whatever fails."""

from __future__ import annotations

import logging
import sqlite3
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from deployments.service.outbox import Outbox
from deployments.service.providers import PushEvent
from deployments.service.reporter import Reporter
from tasks.links import Link
from tasks.repo import RepoLocation
from tests.forge_double import ForgeDouble

TOKEN = "tok-reporter-0123456789abcdef"
SHA = "c" * 40


@pytest.fixture
def double() -> Iterator[ForgeDouble]:
    forge_double = ForgeDouble("gitea")
    try:
        yield forge_double
    finally:
        forge_double.close()


def link(double: ForgeDouble) -> Link:
    return Link(
        name="hello",
        url="https://gitea.example.com/gordon/hello.git",
        provider="gitea",
        token="env:UNUSED_TOKEN",
        api_url=double.api_url,
    )


def queued(tmp_path: Path, sha: str = SHA) -> Outbox:
    outbox = Outbox(tmp_path / "outbox.sqlite")
    push = PushEvent("gitea", f"d-{sha[:6]}", "refs/heads/main", sha, "b" * 40, None)
    status, _ = outbox.enqueue(
        push, RepoLocation.parse("https://gitea.example.com/gordon/hello.git"), "main", "hello"
    )
    assert status == "queued"
    return outbox


def reporter(outbox: Outbox, double: ForgeDouble, runs: list[Any], record: Any) -> Reporter:
    made = Reporter(outbox.path, [(link(double), TOKEN)], {"hello": uuid.uuid4()})
    made._flow_runs = lambda name: runs  # type: ignore[method-assign]
    made._record = lambda row, run: record  # type: ignore[method-assign]
    made._tracker = lambda name: SimpleNamespace(url=lambda run_id: f"http://ui/#/runs/{run_id}")  # type: ignore[method-assign]
    return made


def flow_run(state: str, sha: str = SHA, message: str = "") -> Any:
    return SimpleNamespace(
        id=uuid.uuid4(),
        parameters={"commit_sha": sha, "trigger": "push"},
        tags=[],
        state=SimpleNamespace(
            type=SimpleNamespace(value=state), message=message, timestamp=datetime.now(UTC)
        ),
    )


def mlflow_run(status: str = "FINISHED", run_id: str = "run-1", **tags: str) -> Any:
    return SimpleNamespace(
        data=SimpleNamespace(tags=tags), info=SimpleNamespace(run_id=run_id, status=status)
    )


def version(number: int, **tags: str) -> Any:
    return mlflow_run(**{"textgen.outcome": "new", "textgen.version": str(number), **tags})


def phases(outbox: Outbox) -> list[tuple[str, int]]:
    with sqlite3.connect(outbox.path) as db:
        return list(db.execute("SELECT phase, attempts FROM reports"))


def due_now(outbox: Outbox) -> None:
    with sqlite3.connect(outbox.path) as db:
        db.execute("UPDATE reports SET next_at = 0")


def test_a_provider_that_is_down_gets_the_result_later(tmp_path: Path, double: ForgeDouble) -> None:
    outbox = queued(tmp_path)
    runs: list[Any] = []
    made = reporter(outbox, double, runs, version(3))
    double.fail_next += [503, 502]
    assert made.check() == 0 and phases(outbox) == [("queued", 1)]
    due_now(outbox)
    assert made.check() == 0 and phases(outbox) == [("queued", 2)]
    due_now(outbox)
    made.check()  # pending posted; no run yet
    assert phases(outbox) == [("pending", 0)]
    runs.append(flow_run("RUNNING"))
    due_now(outbox)
    made.check()
    assert phases(outbox) == [("pending", 0)] and double.last_status(SHA)["state"] == "pending"  # type: ignore[index]
    runs[0] = flow_run("COMPLETED")
    double.fail_next.append(503)
    due_now(outbox)
    made.check()  # the decision is stored before it is posted
    assert phases(outbox) == [("final", 1)]
    due_now(outbox)
    made.check()
    assert phases(outbox) == [("done", 1)]
    assert [s["state"] for s in double.statuses[SHA]] == ["pending", "success"]
    final = double.statuses[SHA][-1]
    assert final["description"] == "Version 3 recorded" and final["context"] == "textgen/hello"
    assert final["target_url"] == "http://ui/#/runs/run-1"
    assert double.violations == []


def test_a_restarted_receiver_posts_what_the_last_one_had_not(
    tmp_path: Path, double: ForgeDouble
) -> None:
    outbox = queued(tmp_path)
    runs: list[Any] = []
    first = reporter(
        outbox,
        double,
        runs,
        version(
            4,
            **{
                "textgen.gates": "failed",
                "textgen.gates.failed": "distinct_2 = 0.41, needs >= 0.6",
            },
        ),
    )
    first.check()
    assert phases(outbox) == [("pending", 0)]
    del first  # the process is gone; its outbox is not
    runs.append(flow_run("COMPLETED"))
    due_now(outbox)
    second = reporter(
        Outbox(outbox.path),
        double,
        runs,
        version(
            4,
            **{
                "textgen.gates": "failed",
                "textgen.gates.failed": "distinct_2 = 0.41, needs >= 0.6",
            },
        ),
    )
    second.check()
    assert phases(outbox) == [("done", 0)]
    assert [s["state"] for s in double.statuses[SHA]] == ["pending", "failure"]
    assert double.statuses[SHA][-1]["description"] == (
        "Version 4 recorded, gated: distinct_2 = 0.41, needs >= 0.6"
    )


@pytest.mark.parametrize(
    ("state", "message", "record", "expected"),
    [
        (
            "CANCELLED",
            "Superseded: by the newer push of 1234567, which runs instead",
            None,
            ("success", "Superseded: by the newer push"),
        ),
        (
            "FAILED",
            "boom",
            mlflow_run(
                "FAILED",
                **{
                    "textgen.outcome": "failed",
                    "textgen.failure": "SettingsError: textgen.yaml: bad",
                },
            ),
            ("failure", "Failed: SettingsError: textgen.yaml: bad"),
        ),
        (
            "COMPLETED",
            "Skipped: only README.md",
            mlflow_run(
                **{
                    "textgen.outcome": "skipped",
                    "textgen.skip_reason": "every changed file matches paths-ignore",
                },
            ),
            ("success", "Skipped: every changed file"),
        ),
        ("CRASHED", "the worker died", None, ("failure", "Failed: the worker died")),
    ],
)
def test_every_ending_gets_its_status(
    tmp_path: Path,
    double: ForgeDouble,
    state: str,
    message: str,
    record: Any,
    expected: tuple[str, str],
) -> None:
    outbox = queued(tmp_path)
    made = reporter(outbox, double, [flow_run(state, message=message)], record)
    made.check()
    made.check()
    final = double.last_status(SHA)
    assert final is not None and final["state"] == expected[0]
    assert final["description"].startswith(expected[1]), final


def test_a_refused_token_is_logged_once_and_given_up(
    tmp_path: Path, double: ForgeDouble, caplog: pytest.LogCaptureFixture
) -> None:
    outbox = queued(tmp_path)
    made = reporter(outbox, double, [flow_run("COMPLETED")], version(1))
    double.fail_next += [401, 403]
    with caplog.at_level(logging.ERROR, logger="deployments.service.reporter"):
        made.check()  # pending refused: the result is still to come
        assert phases(outbox) == [("pending", 0)]
        made.check()  # the result refused too: given up, with the reason
    assert phases(outbox) == [("gave_up", 1)]
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 2 and "Link hello: gitea did not take the result" in errors[-1]
    assert "Check the token's scope" in errors[-1]
    assert all(TOKEN not in e for e in errors)


def test_posted_results_are_forgotten_with_their_deliveries(
    tmp_path: Path, double: ForgeDouble
) -> None:
    outbox = queued(tmp_path)
    made = reporter(outbox, double, [flow_run("COMPLETED")], version(2))
    made.check()
    made.check()
    assert phases(outbox) == [("done", 0)]
    with sqlite3.connect(outbox.path) as db:
        db.execute("UPDATE deliveries SET status = 'sent'")
    outbox.prune(older_than=-1)
    assert phases(outbox) == [] and outbox.counts() == {}
