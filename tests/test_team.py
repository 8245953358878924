"""The team service with real processes under supervisord: PostgreSQL, Prefect and MLflow
servers on it, two warm workers with their own data folders, and one receiver for two linked
repositories.

Uses the real offline model, whose generation takes seconds: runs overlap, and a kill lands
mid-generation.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar

import httpx
import pytest
import yaml
from mlflow import MlflowClient

from deployments.hook import install
from deployments.ops.team import Team
from tasks.links import Link, save_links
from tasks.names import is_superseded
from tasks.store import experiment_name
from tests.conftest import GitRepo
from tests.servers import wait_for

pytestmark = [pytest.mark.slow, pytest.mark.server]

SPEC = "on:\n  github:\n    branches:\n      only: main\n"


def _settings(model: Path, seed: int, tokens: int = 200) -> str:
    return yaml.safe_dump(
        {"model": str(model), "random_seed": seed, "max_new_tokens": tokens, "do_sample": True}
    )


class _Sink(BaseHTTPRequestHandler):
    received: ClassVar[list[dict[str, Any]]] = []

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length", "0"))
        self.received.append(json.loads(self.rfile.read(length) or b"{}"))
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        pass


@dataclass
class Linked:
    name: str
    work: GitRepo
    bare: Path

    def push(self, model: Path, seed: int, tokens: int = 200) -> str:
        sha = self.work.commit({"textgen.yaml": _settings(model, seed, tokens)}, f"seed {seed}")
        self.work.git("push", "--quiet", "origin", "main")
        return sha


@dataclass
class Topology:
    team: Team
    repos: dict[str, Linked]
    model: Path
    notes: list[dict[str, Any]]

    @property
    def mlflow(self) -> MlflowClient:
        return MlflowClient(tracking_uri=self.team.mlflow_uri)

    def runs(self, name: str) -> list[Any]:
        experiment = self.mlflow.get_experiment_by_name(experiment_name(str(self.repos[name].bare)))
        return [] if experiment is None else self.mlflow.search_runs([experiment.experiment_id])

    def version_of(self, name: str, sha: str) -> Any:
        for run in self.runs(name):
            tags = run.data.tags
            if tags.get("mlflow.source.git.commit") == sha and tags.get("textgen.outcome") == "new":
                return run
        return None

    def flow_runs(self, name: str, flow: str = "nlp-text-generation") -> list[dict[str, Any]]:
        api = self.team.prefect_api
        deployment = httpx.get(f"{api}/deployments/name/{flow}/{name}", timeout=10).json()
        response = httpx.post(
            f"{api}/flow_runs/filter",
            json={"limit": 200, "deployments": {"id": {"any_": [deployment["id"]]}}},
            timeout=10,
        )
        response.raise_for_status()
        return list(response.json())

    def flow_runs_of(self, name: str, sha: str) -> list[dict[str, Any]]:
        return [r for r in self.flow_runs(name) if r["parameters"].get("commit_sha") == sha]


@pytest.fixture(scope="module")
def topology(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Topology]:
    from tasks.offline import offline_model

    model = offline_model()
    root = tmp_path_factory.mktemp("team")
    # PostgreSQL runs as the postgres user when the tests run as root: its folder must be one
    # that user can reach, which pytest's private temporary folder is not.
    pg_folder = Path(tempfile.mkdtemp(prefix="textgen-pg-", dir="/tmp"))
    os.chmod(pg_folder, 0o755)
    sink = ThreadingHTTPServer(("127.0.0.1", 0), _Sink)
    _Sink.received = []
    threading.Thread(target=sink.serve_forever, daemon=True).start()

    repos: dict[str, Linked] = {}
    links = []
    env = dict(os.environ)
    for name in ("alpha", "beta"):
        work = GitRepo(root / f"{name}-work")
        work.commit({"textgen.yaml": _settings(model, 1), ".gradient/workflows/w.yaml": SPEC})
        bare = root / f"{name}.git"
        subprocess.run(["git", "clone", "--quiet", "--bare", str(work.path), str(bare)], check=True)
        work.git("remote", "add", "origin", str(bare))
        work.git("fetch", "--quiet", "origin")
        work.git("branch", "--quiet", "--set-upstream-to=origin/main", "main")
        secret_file = root / f"{name}.secret"
        secret_file.write_text(f"{name}-webhook-secret")
        links.append(Link(name=name, url=str(bare), provider="hook", secret=f"file:{secret_file}"))
        repos[name] = Linked(name, work, bare)
    links_file = root / "links.yaml"
    save_links(links, links_file)
    env["TEXTGEN_MODEL_DIRS"] = str(model.parent)
    team = Team(
        root / "home",
        links_file,
        workers=2,
        postgres_folder=pg_folder / "cluster",
        notify_url=f"http://127.0.0.1:{sink.server_address[1]}/notify",
        zombie_seconds=45,
        env=env,
    )
    try:
        team.start()
        for name, linked in repos.items():
            install(
                linked.bare,
                f"http://127.0.0.1:{team.ports.receiver}/webhooks/github",
                root / f"{name}.secret",
            )
        yield Topology(team, repos, model, _Sink.received)
    finally:
        team.stop()
        sink.shutdown()
        sink.server_close()
        shutil.rmtree(pg_folder, ignore_errors=True)


def _interval(run: dict[str, Any]) -> tuple[str, str]:
    return run["start_time"], run["end_time"]


def test_two_repositories_run_in_parallel_each_with_its_own_versions(
    topology: Topology,
) -> None:
    model = topology.model
    shas = {name: linked.push(model, 2) for name, linked in topology.repos.items()}
    # Two workers generating at once on a 2-core machine share its cores: each run takes
    # minutes (its tokens at about 1 per second), so the wait is longer than the others.
    runs = {
        name: wait_for(lambda n=name: topology.version_of(n, shas[n]), 600, f"{name}'s version")
        for name in shas
    }
    assert {r.data.tags["textgen.version"] for r in runs.values()} == {"1"}
    assert runs["alpha"].info.experiment_id != runs["beta"].info.experiment_id
    # A version is published just before Prefect records its flow run Completed.
    alpha, beta = (
        wait_for(
            lambda n=name: [
                r for r in topology.flow_runs_of(n, shas[n]) if r["state_type"] == "COMPLETED"
            ],
            60,
            f"{name}'s flow run to complete",
        )[0]
        for name in ("alpha", "beta")
    )
    (a_start, a_end), (b_start, b_end) = _interval(alpha), _interval(beta)
    # Each worker takes one run at a time: runs that overlap ran on different workers.
    assert a_start < b_end and b_start < a_end, (alpha, beta)
    # Each worker fetched into its own data folder; none shares another's mirrors.
    homes = [topology.team.home / f"worker-{i}" / "repos" for i in range(2)]
    mirrors = [sorted(p.name for p in h.iterdir()) if h.exists() else [] for h in homes]
    assert all(mirrors) and not set(mirrors[0]) & set(mirrors[1]), mirrors


def test_a_push_during_a_run_supersedes_the_one_waiting(topology: Topology) -> None:
    alpha = topology.repos["alpha"]
    first = alpha.push(topology.model, 3, tokens=300)
    wait_for(
        lambda: any(r["state_type"] == "RUNNING" for r in topology.flow_runs_of("alpha", first)),
        180,
        "the first push's run to start",
    )
    middle = alpha.push(topology.model, 4)
    last = alpha.push(topology.model, 5)
    wait_for(lambda: topology.version_of("alpha", last), 300, "the newest push's version")
    recorded = {
        sha: [
            r for r in topology.runs("alpha") if r.data.tags.get("mlflow.source.git.commit") == sha
        ]
        for sha in (first, middle)
    }
    # The waiting push never runs: superseded before it started (in Prefect only), or as it
    # started (a recorded skip).
    assert topology.version_of("alpha", middle) is None
    middle_states = [r["state"]["message"] for r in topology.flow_runs_of("alpha", middle)]
    assert [is_superseded(m) for m in middle_states] == [True] or [
        r.data.tags.get("textgen.skip_kind") for r in recorded[middle]
    ] == ["superseded"], middle_states
    # The running one finishes as a version, unless it had not yet checked that it was still
    # the tip: then it skips itself as superseded too. Never both, never neither.
    outcomes = [r.data.tags.get("textgen.outcome") for r in recorded[first]]
    assert outcomes in (["new"], ["skipped"]), outcomes
    versions = sorted(
        int(r.data.tags["textgen.version"])
        for r in topology.runs("alpha")
        if r.data.tags.get("textgen.outcome") == "new"
    )
    assert (
        versions == list(range(1, len(versions) + 1))
        and len(versions) == 1 + outcomes.count("new") + 1
    )


def test_text_with_nul_characters_is_recorded_on_postgresql(topology: Topology) -> None:
    """PostgreSQL refuses NUL in text, which SQLite stores: a prompt (or generated text) holding
    one must still become a version, with the character replaced, not a run retrying for ever."""
    alpha = topology.repos["alpha"]
    settings = yaml.safe_load(_settings(topology.model, 7, tokens=20))
    settings["initial_sentence"] = "Hello\x00world"
    sha = alpha.work.commit({"textgen.yaml": yaml.safe_dump(settings)}, "a NUL in the prompt")
    alpha.work.git("push", "--quiet", "origin", "main")
    run = wait_for(lambda: topology.version_of("alpha", sha), 300, "the version")
    assert run.data.params["initial_sentence"] == "Hello\ufffdworld"


def test_artifacts_are_read_from_a_process_sharing_no_folder(
    topology: Topology, tmp_path: Path
) -> None:
    run = max(
        (r for r in topology.runs("alpha") if r.data.tags.get("textgen.outcome") == "new"),
        key=lambda r: int(r.data.tags["textgen.version"]),
    )
    assert run.info.artifact_uri.startswith("mlflow-artifacts:"), run.info.artifact_uri
    reader = (
        "import sys; from mlflow import MlflowClient; "
        "path = MlflowClient().download_artifacts(sys.argv[1], 'output.txt', sys.argv[2]); "
        "print(open(path).read())"
    )
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("TEXTGEN_", "MLFLOW_", "PREFECT_"))
    }
    env["MLFLOW_TRACKING_URI"] = topology.team.mlflow_uri
    env["HOME"] = str(tmp_path)
    (tmp_path / "out").mkdir()
    result = subprocess.run(
        [sys.executable, "-c", reader, run.info.run_id, str(tmp_path / "out")],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("---\nOutput 1 of "), result.stdout[:200]


def _ancestors(pid: int) -> list[int]:
    found = []
    while pid > 1:
        stat = Path(f"/proc/{pid}/stat").read_text()
        pid = int(stat.rpartition(")")[2].split()[1])
        found.append(pid)
    return found


def test_processes_writing_at_once_get_unique_gap_free_numbers_on_postgresql(
    topology: Topology,
) -> None:
    """Four processes on their own, as workers are, take numbers in one experiment through the
    tracking server at the same time: the PostgreSQL-backed registry hands out 1..N once each."""
    from tests.test_versions import _worker

    repo = "https://example.com/org/concurrent.git"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "TEXTGEN_"))}
    env["MLFLOW_TRACKING_URI"] = topology.team.mlflow_uri
    workers = [_worker("normal", 10, Path.cwd(), env, repo) for _ in range(4)]
    outputs = [w.communicate(timeout=300) for w in workers]
    for worker, (_, err) in zip(workers, outputs, strict=True):
        assert worker.returncode == 0, err[-3000:]
    # MLflow's client also prints a "View run" line per ended run when tracking on a server.
    claimed = sorted(
        int(line.split()[1])
        for out, _ in outputs
        for line in out.splitlines()
        if re.fullmatch(r"[0-9a-f]{32} \d+", line)
    )
    assert claimed == list(range(1, 41)), "duplicate or missing numbers"
    experiment = topology.mlflow.get_experiment_by_name(experiment_name(repo))
    assert experiment is not None
    published = topology.mlflow.search_runs(
        [experiment.experiment_id], "tags.`textgen.outcome` = 'new'", max_results=100
    )
    assert sorted(int(r.data.tags["textgen.version"]) for r in published) == list(range(1, 41))


def _running_run(topology: Topology, name: str, sha: str, attempt: str = "1") -> Any:
    for run in topology.runs(name):
        tags = run.data.tags
        if (
            tags.get("mlflow.source.git.commit") == sha
            and tags.get("textgen.attempt", "1") == attempt
            and run.info.status == "RUNNING"
        ):
            return run
    return None


def _retry_started(topology: Topology, name: str, sha: str, seconds: float) -> dict[str, Any]:
    """The flow run of a push's second attempt, once it has started."""
    return wait_for(
        lambda: [
            r
            for r in topology.flow_runs_of(name, sha)
            if r["parameters"].get("attempt") == 2 and r["start_time"]
        ],
        seconds,
        "the retry to start",
    )[0]


def _seconds(stamp: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()


def test_a_runs_process_killed_is_crashed_and_rerun_on_the_other_worker_within_15_s(
    topology: Topology,
) -> None:
    alpha = topology.repos["alpha"]
    sha = alpha.push(topology.model, 31, tokens=400)
    run = wait_for(lambda: _running_run(topology, "alpha", sha), 300, "the run to be generating")
    flow_pid = int(run.data.tags["textgen.worker.pid"])
    (worker,) = [w for w in topology.team.workers if w.pid in _ancestors(flow_pid)]
    os.kill(flow_pid, signal.SIGKILL)  # the run's process alone: its worker lives on
    killed = time.time()
    crashed = wait_for(
        lambda: [r for r in topology.flow_runs_of("alpha", sha) if r["state_type"] == "CRASHED"],
        15,
        "the flow run to be marked Crashed",
    )[0]
    assert "status code" in crashed["state"]["message"], crashed["state"]
    assert _seconds(crashed["state"]["timestamp"]) - killed < 5  # seen at once, not by heartbeats
    # Its worker ends its MLflow run right after, with the reason.
    wait_for(
        lambda: topology.mlflow.get_run(run.info.run_id).info.status == "FAILED",
        10,
        "the MLflow run to end FAILED",
    )
    # With the reason: the worker's (killed by SIGKILL), or the reaper's when its pass came
    # first (the process gone).
    failed = topology.mlflow.get_run(run.info.run_id).data.tags["textgen.failure"]
    assert "SIGKILL" in failed or f"process {flow_pid} " in failed, failed
    # The push runs once more, on the other worker, within 15 s of the kill.
    retried = _retry_started(topology, "alpha", sha, 30)
    assert _seconds(retried["start_time"]) - killed <= 15, retried["start_time"]
    second = wait_for(
        lambda: _running_run(topology, "alpha", sha, attempt="2"), 60, "the retry's record"
    )
    (other,) = [
        w
        for w in topology.team.workers
        if w.pid in _ancestors(int(second.data.tags["textgen.worker.pid"]))
    ]
    assert other is not worker
    version = wait_for(lambda: topology.version_of("alpha", sha), 300, "the retried push's version")
    assert version.data.tags["textgen.attempt"] == "2"
    wait_for(
        lambda: (
            not [
                r for r in topology.flow_runs("alpha") if r["state_type"] in {"RUNNING", "PENDING"}
            ]
        ),
        60,
        "the retry's flow run to end",
    )
    assert [r.info.run_id for r in topology.runs("alpha") if r.info.status == "RUNNING"] == []
    assert worker.alive()


def test_a_worker_killed_mid_run_leaves_nothing_running(topology: Topology) -> None:
    beta = topology.repos["beta"]
    before = [
        int(r.data.tags["textgen.version"])
        for r in topology.runs("beta")
        if r.data.tags.get("textgen.outcome") == "new"
    ]
    sha = beta.push(topology.model, 6, tokens=400)
    run = wait_for(lambda: _running_run(topology, "beta", sha), 300, "the run to be generating")
    flow_pid = int(run.data.tags["textgen.worker.pid"])
    ancestors = _ancestors(flow_pid)
    (worker,) = [w for w in topology.team.workers if w.pid in ancestors]
    # The machine dies: the worker and the flow run process it started, at once (one process
    # group: the worker, its fork server and the runs forked from it).
    assert os.getpgid(flow_pid) == worker.pid
    old_pid = worker.kill()
    killed = time.time()
    # Prefect marks it Crashed when its heartbeats stop; the reaper ends its MLflow run.
    crashed = wait_for(
        lambda: [r for r in topology.flow_runs_of("beta", sha) if r["state_type"] == "CRASHED"],
        240,
        "the flow run to be marked Crashed",
    )
    assert "heartbeat" in crashed[0]["state"]["message"]
    # Running again within 75 s: heartbeats every 30 s, the zombie automation's 45 s, the
    # reaper's pass.
    retry = _retry_started(topology, "beta", sha, 120)
    assert _seconds(retry["start_time"]) - killed <= 75, retry["start_time"]
    failed = wait_for(
        lambda: topology.mlflow.get_run(run.info.run_id).info.status == "FAILED",
        120,
        "the MLflow run to end FAILED",
    )
    assert failed
    reason = topology.mlflow.get_run(run.info.run_id).data.tags["textgen.failure"]
    assert str(flow_pid) in reason or "Crashed" in reason, reason
    # The push runs once more, on the worker that is left.
    retried = wait_for(lambda: topology.version_of("beta", sha), 300, "the retried push's version")
    assert retried.data.tags["textgen.attempt"] == "2"
    assert retried.data.tags["textgen.version"] == str(max(before, default=0) + 1)
    # Its MLflow run is published just before Prefect records the flow run Completed.
    wait_for(
        lambda: (
            sorted(r["state_type"] for r in topology.flow_runs_of("beta", sha))
            == ["COMPLETED", "CRASHED"]
        ),
        60,
        "one crashed attempt and one completed",
    )
    for name in topology.repos:
        assert [r.info.run_id for r in topology.runs(name) if r.info.status == "RUNNING"] == []
        assert [
            r["name"]
            for r in topology.flow_runs(name)
            if r["state_type"] in {"RUNNING", "PENDING", "SCHEDULED", "CANCELLING"}
        ] == []
    # The automation told the team, through the notification block.
    note = wait_for(
        lambda: [n for n in topology.notes if sha in n.get("body", "")], 120, "a notification"
    )[0]
    assert str(beta.bare) in note["body"] and "no heartbeat" in note["body"]
    assert "/runs/flow-run/" in note["body"]
    assert f"{topology.team.mlflow_uri}/#/experiments/" in note["body"]
    # Nobody started the worker again: supervisord did.
    wait_for(lambda: worker.pid not in (0, old_pid), 60, "supervisord to restart the worker")
    assert topology.team.states()[worker.name] == "RUNNING"


def _matrix(model: Path, seeds: list[int], tokens: int = 150) -> str:
    return yaml.safe_dump(
        {
            "model": str(model),
            "max_new_tokens": tokens,
            "do_sample": True,
            "prompts": ["Once upon a time", "The harbour at dawn"],
            "matrix": {"random_seed": seeds},
        }
    )


def _cells(topology: Topology, version: Any) -> dict[str, dict[str, str]]:
    """The child runs of a version, by cell: their tags."""
    children = [
        r
        for r in topology.runs("alpha")
        if r.data.tags.get("mlflow.parentRunId") == version.info.run_id
    ]
    return {r.data.tags["textgen.cell"]: r.data.tags for r in children}


def _rows(topology: Topology, version: Any) -> list[dict[str, Any]]:
    """The rows of a version's `outputs.json`."""
    stored = topology.mlflow.download_artifacts(
        version.info.run_id, "outputs.json", tempfile.mkdtemp()
    )
    return list(json.loads(Path(stored).read_text())["rows"])


def _worker_of(topology: Topology, pid: int) -> str:
    ancestors = _ancestors(pid)
    (worker,) = [w.name for w in topology.team.workers if w.pid in ancestors]
    return worker


def test_a_matrixs_cells_run_on_both_workers_and_a_killed_workers_cell_runs_again(
    topology: Topology,
) -> None:
    alpha = topology.repos["alpha"]
    cell_runs = lambda: topology.flow_runs("alpha", "nlp-text-generation-cell")  # noqa: E731
    # A push of three cells: the version's run makes one, the other worker the others, at once.
    sha = alpha.work.commit({"textgen.yaml": _matrix(topology.model, [11, 12, 13])}, "matrix")
    alpha.work.git("push", "--quiet", "origin", "main")
    # While it runs: the version's run on one worker, a cell's run on the other.
    parent = wait_for(lambda: _running_run(topology, "alpha", sha), 300, "the version's run")
    own = _worker_of(topology, int(parent.data.tags["textgen.worker.pid"]))
    cell_run = wait_for(
        lambda: [
            r for r in cell_runs() if r["state_type"] == "RUNNING" and r["infrastructure_pid"]
        ],
        120,
        "a cell run to start",
    )[0]
    assert _worker_of(topology, int(cell_run["infrastructure_pid"])) != own
    version = wait_for(lambda: topology.version_of("alpha", sha), 600, "the matrix's version")
    cells = _cells(topology, version)
    assert sorted(cells) == ["random_seed=11", "random_seed=12", "random_seed=13"], cells
    handed = {
        c: t["textgen.cell.flow_run"] for c, t in cells.items() if "textgen.cell.flow_run" in t
    }
    runs = {r["id"]: r for r in cell_runs()}
    assert cell_run["id"] in handed.values(), handed
    assert all(runs[i]["state_type"] == "COMPLETED" for i in handed.values()), runs
    assert all(runs[i]["parent_task_run_id"] for i in handed.values())  # the version's subflows
    # The two workers generated at once: the spans of the cells made by the version's run and
    # of those made by cell runs overlap.
    spans: dict[bool, list[float]] = {}
    for row in _rows(topology, version):
        start, end = row["started_at"], row["started_at"] + row["metrics"]["generation_seconds"]
        span = spans.setdefault(row["cell"] in handed, [start, end])
        span[:] = [min(span[0], start), max(span[1], end)]
    assert sorted(spans) == [False, True], spans
    (a_start, a_end), (b_start, b_end) = spans.values()
    assert a_start < b_end and b_start < a_end, spans
    assert version.data.tags["textgen.cells"] == "3"

    # A second push; the worker making one of its cells for the version's run dies mid-cell.
    # Longer cells: the kill lands while one generates.
    sha = alpha.work.commit({"textgen.yaml": _matrix(topology.model, [21, 22, 23], 400)}, "again")
    alpha.work.git("push", "--quiet", "origin", "main")
    before = set(runs)
    running = wait_for(
        lambda: [
            r
            for r in cell_runs()
            if r["id"] not in before and r["state_type"] == "RUNNING" and r["infrastructure_pid"]
        ],
        300,
        "a cell to be generating on a worker",
    )[0]
    time.sleep(2)  # mid-cell
    worker = next(
        w
        for w in topology.team.workers
        if w.name == _worker_of(topology, int(running["infrastructure_pid"]))
    )
    worker.kill()
    version = wait_for(lambda: topology.version_of("alpha", sha), 600, "the version after the kill")
    cells = _cells(topology, version)
    assert sorted(cells) == ["random_seed=21", "random_seed=22", "random_seed=23"], cells
    killed = next(r for r in cell_runs() if r["id"] == running["id"])
    assert killed["state_type"] == "CRASHED", killed["state"]
    # It died mid-cell (it left no rows), and the cell was made again elsewhere: by the
    # version's run, or by a new cell run on a worker.
    left = topology.mlflow.list_artifacts(version.info.run_id, "cell-runs")
    assert f"cell-runs/{running['id']}.json" not in [a.path for a in left], left
    again = cells[killed["parameters"]["cell"]].get("textgen.cell.flow_run")
    if again is not None:
        assert next(r for r in cell_runs() if r["id"] == again)["state_type"] == "COMPLETED"
    rows = _rows(topology, version)
    assert sorted((r["cell"], r["prompt_id"]) for r in rows) == sorted(
        (c, p) for c in cells for p in {r["prompt_id"] for r in rows}
    )
    assert len(rows) == 6
    # The version's run goes on after its version is recorded (its GenAI evaluation run): every
    # flow run of the push ended, cells' and version's, nothing is left RUNNING in MLflow.
    going = {"RUNNING", "PENDING", "SCHEDULED"}
    wait_for(
        lambda: (
            not [
                r
                for r in [*cell_runs(), *topology.flow_runs_of("alpha", sha)]
                if r["state_type"] in going
            ]
        ),
        120,
        "every flow run of the push to end",
    )
    assert [r.info.run_id for r in topology.runs("alpha") if r.info.status == "RUNNING"] == []
    # Failures are told once per push, by the version's run: the crashed cell, made again,
    # was told to nobody.
    told = [n.get("subject", "") for n in topology.notes]
    assert not [s for s in told if killed["name"] in s], told
    wait_for(lambda: topology.team.states()[worker.name] == "RUNNING", 120, "the worker back")


def test_a_deployment_runs_only_its_own_repository(topology: Topology) -> None:
    api = topology.team.prefect_api
    deployment = httpx.get(f"{api}/deployments/name/nlp-text-generation/alpha", timeout=10).json()
    created = httpx.post(
        f"{api}/deployments/{deployment['id']}/create_flow_run",
        json={"parameters": {"repo_url": str(topology.repos["beta"].bare)}},
        timeout=10,
    )
    created.raise_for_status()
    flow_run_id = created.json()["id"]

    def failed() -> list[dict[str, Any]]:
        return [
            r
            for r in topology.flow_runs("alpha")
            if r["id"] == flow_run_id and r["state_type"] == "FAILED"
        ]

    ended = wait_for(failed, 300, "the refused run to fail")
    assert "this deployment runs only" in ended[0]["state"]["message"]
    # Nothing of beta ran under alpha's deployment.
    assert not [
        r
        for r in topology.runs("beta")
        if r.data.tags.get("textgen.prefect.flow_run_id") == flow_run_id
    ]
    wait_for(
        lambda: [n for n in topology.notes if "this deployment runs only" in n.get("body", "")],
        60,
        "the failure's notification",
    )


def test_team_down_stops_what_is_alive_after_the_supervisor_and_postgres_died(
    topology: Topology,
) -> None:
    """Last in the module: it ends the topology. supervisord and PostgreSQL are SIGKILLed;
    `textgen team down` then stops every process of the team that is still alive."""
    from deployments.ops.supervisor import marked

    team = topology.team
    alive = marked(team.home)
    assert len(alive) >= 4  # servers, receiver, workers (and the workers' fork servers)
    assert team.supervisor.child is not None
    os.kill(team.supervisor.child.pid, signal.SIGKILL)
    postmaster = team.postgres.postmaster()
    assert postmaster is not None
    os.kill(postmaster, signal.SIGKILL)  # and no supervisor left to start it again
    wait_for(lambda: team.postgres.postmaster() is None, 30, "PostgreSQL to be gone")
    down = subprocess.run(
        [sys.executable, "-m", "deployments.cli", "team", "down", "--home", str(team.home)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert down.returncode == 0, down.stdout + down.stderr
    assert "left by a dead supervisord" in down.stdout, down.stdout
    assert marked(team.home) == []
    assert not (team.home / "team.json").exists()
