"""Version numbers under concurrency and crashes: real processes, one store, SIGKILL at the bad
moment; numbers are counted, not just checked for "no crash"."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
from mlflow import MlflowClient

from deployments.reports.compare import resolve_reference
from deployments.reports.history import history_rows
from tasks import tags
from tasks.recovery import recover_dead_runs
from tasks.tracking import Tracker

REPO = "https://example.com/org/versions.git"

# A worker process: opens runs and takes version numbers in the store of MLFLOW_TRACKING_URI.
WORKER = textwrap.dedent(
    """
    import os, signal, sys
    from tasks import numbering, tags
    from tasks.store import as_tags
    from tasks.tracking import Tracker
    mode, count = sys.argv[1], int(sys.argv[2])
    tracker = Tracker.for_repo(sys.argv[3])
    for i in range(count):
        run_id = tracker.start("main", None, "manual")
        tracker.client.log_batch(run_id, tags=as_tags({tags.COMMIT: f"{os.getpid():08x}{i:032x}"}))
        tracker.client.log_text(run_id, "text", "output.txt")
        if mode == "kill-before":
            print(run_id, flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
        version = numbering.allocate(tracker, run_id)
        print(run_id, version, flush=True)
        if mode == "kill-after":
            os.kill(os.getpid(), signal.SIGKILL)
        numbering.publish(tracker, run_id, version, f"{i:040x}", {})
    """
)


def _worker(
    mode: str, count: int, cwd: Path, env: dict[str, str] | None = None, repo: str = REPO
) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", WORKER, mode, str(count), repo],
        cwd=Path(__file__).resolve().parents[1],
        env={**os.environ} if env is None else env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _versions(client: MlflowClient, experiment_id: str) -> list[int]:
    runs = client.search_runs([experiment_id], f"tags.`{tags.OUTCOME}` = 'new'", max_results=1000)
    return sorted(int(r.data.tags[tags.VERSION]) for r in runs)


@pytest.mark.slow  # processes of their own, each importing the stack
def test_concurrent_processes_get_unique_gap_free_numbers(tmp_path: Path) -> None:
    workers = [_worker("normal", 25, tmp_path) for _ in range(4)]
    outputs = [w.communicate(timeout=300) for w in workers]
    for worker, (_, err) in zip(workers, outputs, strict=True):
        assert worker.returncode == 0, err
    claimed = sorted(int(line.split()[1]) for out, _ in outputs for line in out.splitlines())
    assert claimed == list(range(1, 101)), "duplicate or missing numbers"
    tracker = Tracker.for_repo(REPO, create=False)
    assert _versions(tracker.client, tracker.experiment_id) == list(range(1, 101))


def test_a_run_killed_after_allocation_is_published_not_lost(tmp_path: Path) -> None:
    first = _worker("normal", 1, tmp_path)
    first.communicate(timeout=120)
    assert first.returncode == 0
    killed = _worker("kill-after", 1, tmp_path)
    out, _ = killed.communicate(timeout=120)
    assert killed.returncode == -signal.SIGKILL
    run_id, number = out.split()
    assert number == "2"
    tracker = Tracker.for_repo(REPO, create=False)
    assert tracker.client.get_run(run_id).info.status == "RUNNING"
    # The next process to open the experiment finds the dead run and rolls it forward.
    assert recover_dead_runs(tracker) == 1
    run = tracker.client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags[tags.VERSION] == "2" and "textgen.recovered" in run.data.tags
    rows = history_rows(REPO, 10)
    assert [r["version"] for r in rows] == ["2", "1"]
    assert resolve_reference(tracker, "2").info.run_id == run_id
    # The next number follows on: unique and gap-free.
    after = _worker("normal", 1, tmp_path)
    out, _ = after.communicate(timeout=120)
    assert out.split()[1] == "3"


def test_a_run_killed_before_allocation_fails_with_its_reason_and_takes_no_number(
    tmp_path: Path,
) -> None:
    killed = _worker("kill-before", 1, tmp_path)
    out, _ = killed.communicate(timeout=120)
    assert killed.returncode == -signal.SIGKILL
    run_id = out.strip()
    tracker = Tracker.for_repo(REPO, create=False)
    assert recover_dead_runs(tracker) == 1
    run = tracker.client.get_run(run_id)
    assert run.info.status == "FAILED"
    assert "ended without finishing the run" in run.data.tags["textgen.failure"]
    assert tags.VERSION not in run.data.tags
    assert recover_dead_runs(tracker) == 0  # nothing left to do
    after = _worker("normal", 1, tmp_path)
    out, _ = after.communicate(timeout=120)
    assert out.split()[1] == "1"


def test_a_live_run_of_another_process_is_left_alone(tmp_path: Path) -> None:
    tracker = Tracker.for_repo(REPO)
    run_id = tracker.start("main", None, "manual")  # this process: alive
    try:
        assert recover_dead_runs(tracker) == 0
        assert tracker.client.get_run(run_id).info.status == "RUNNING"
    finally:
        tracker.client.set_terminated(run_id, "FINISHED")


@pytest.mark.slow  # processes of their own, each importing the stack
@pytest.mark.parametrize("command", ["run", "history"])
def test_concurrent_first_use_of_a_fresh_store(
    tmp_path: Path, tiny_model: Path, command: str
) -> None:
    """Three processes open one fresh SQLite store at once: it is created once, without races."""
    store = tmp_path / "fresh" / "mlflow.db"
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{store}"}
    script = textwrap.dedent(
        """
        import sys
        from tasks.tracking import Tracker
        tracker = Tracker.for_repo(sys.argv[1])
        run_id = tracker.start("main", None, "manual")
        tracker.client.set_terminated(run_id, "FINISHED")
        print(tracker.experiment_id)
        """
    )
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", script, REPO],
            cwd=Path(__file__).resolve().parents[1],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(3)
    ]
    if command == "history":
        reader = subprocess.run(
            [sys.executable, "-m", "deployments.cli", "history", "--repo", REPO],
            cwd=Path(__file__).resolve().parents[1],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        # Before any run made the experiment it says so; after, it lists runs: never a race.
        assert reader.returncode in (0, 5), reader.stderr
        assert "Traceback" not in reader.stderr, reader.stderr
    results = [p.communicate(timeout=300) for p in procs]
    for proc, (_out, err) in zip(procs, results, strict=True):
        assert proc.returncode == 0, err
    assert len({out.strip() for out, _ in results}) == 1  # one experiment
    client = MlflowClient(tracking_uri=f"sqlite:///{store}")
    assert len(client.search_runs([results[0][0].strip()])) == 3


@pytest.mark.slow
def test_three_textgen_runs_at_once_on_a_fresh_data_folder(
    tmp_path: Path, make_repo: Any, tiny_model: Path
) -> None:
    """The commands as users type them: fresh MLflow store, fresh Prefect database, no server."""
    from tests.conftest import settings_yaml

    repo = make_repo({"textgen.yaml": settings_yaml(tiny_model)})
    env = {
        **os.environ,
        "TEXTGEN_HOME": str(tmp_path / "home"),
        "PREFECT_HOME": str(tmp_path / "prefect"),
    }
    for name in ("MLFLOW_TRACKING_URI", "TEXTGEN_ARTIFACT_ROOT", "PREFECT_API_URL"):
        env.pop(name, None)
    root = Path(__file__).resolve().parents[1]

    def textgen(*args: str) -> subprocess.Popen[str]:
        return subprocess.Popen(
            [sys.executable, "-m", "deployments.cli", *args],
            cwd=root,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    runs = [
        textgen("run", "--repo", str(repo.path), "--set", f"random_seed={seed}", "--json")
        for seed in (1, 2, 3)
    ]
    history = textgen("history", "--repo", str(repo.path))
    results = [p.communicate(timeout=600) for p in runs]
    for proc, (_, err) in zip(runs, results, strict=True):
        assert proc.returncode == 0, err[-3000:]
    _, err = history.communicate(timeout=600)
    assert "Traceback" not in err, err[-3000:]
    numbers = sorted(json.loads(out)["version"] for out, _ in results)
    assert numbers == [1, 2, 3]


@pytest.mark.slow  # processes of their own, each importing the stack
def test_a_store_locked_by_another_writer_is_waited_out(tmp_path: Path) -> None:
    import sqlite3
    import threading

    path = os.environ["MLFLOW_TRACKING_URI"].removeprefix("sqlite:///")
    holder = sqlite3.connect(path, timeout=30, check_same_thread=False)
    # Held longer than MLflow's own wait: its sessions set SQLite's busy_timeout to 20 s.
    holder.execute("BEGIN EXCLUSIVE")
    release = threading.Timer(25.0, holder.rollback)
    release.start()
    try:
        worker = _worker("normal", 1, tmp_path)
        out, err = worker.communicate(timeout=300)
    finally:
        release.join()
        holder.close()
    assert worker.returncode == 0, err[-3000:]
    assert out.split()[1] == "1"
    assert "is locked; waiting" in err


def test_a_run_of_another_machine_ends_when_its_flow_run_has_ended(
    prefect_harness: None,
) -> None:
    """A worker on another machine died: its pid means nothing here, but Prefect knows its flow
    run ended (Crashed). Its MLflow run is ended FAILED with that reason; one whose flow run is
    still running is left alone."""
    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.states import Crashed, Running

    from tasks.store import as_tags

    @flow(name="elsewhere")
    def elsewhere() -> None:
        pass

    tracker = Tracker.for_repo(REPO)
    with get_client(sync_client=True) as client:
        dead = client.create_flow_run(elsewhere, state=Running())
        client.set_flow_run_state(dead.id, Crashed(message="worker gone"), force=True)
        alive = client.create_flow_run(elsewhere, state=Running())
    run_ids = {}
    for name, flow_run in (("dead", dead), ("alive", alive)):
        run_ids[name] = tracker.start("main", None, "push")
        tracker.client.log_batch(
            run_ids[name],
            tags=as_tags({tags.WORKER_HOST: "another-machine", tags.FLOW_RUN_ID: str(flow_run.id)}),
        )
    assert recover_dead_runs(tracker) == 1
    ended = tracker.client.get_run(run_ids["dead"])
    assert ended.info.status == "FAILED"
    assert "ended Crashed: worker gone" in ended.data.tags["textgen.failure"]
    assert tracker.client.get_run(run_ids["alive"]).info.status == "RUNNING"
    with get_client(sync_client=True) as client:
        client.set_flow_run_state(alive.id, Crashed(message="done"), force=True)
    assert recover_dead_runs(tracker) == 1
