"""Crashes of the service: every process killed with SIGKILL mid-generation, then restarted.

Uses the real offline model, whose generation takes seconds: the kill lands mid-generation.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from mlflow import MlflowClient

from tasks.store import experiment_name
from tests.conftest import GitRepo
from tests.servers import PrefectServer, Service, free_port, start_serve, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.server]

SECRET = "crash-test-secret"
DEPLOYMENT = "nlp-text-generation/on-push"


def _settings(model: Path, seed: int) -> str:
    return yaml.safe_dump(
        {"model": str(model), "random_seed": seed, "max_new_tokens": 300, "do_sample": True}
    )


@pytest.fixture
def origin(tmp_path: Path) -> Iterator[tuple[GitRepo, Path, Path]]:
    from tasks.offline import offline_model

    model = offline_model()
    work = GitRepo(tmp_path / "work")
    work.commit({"textgen.yaml": _settings(model, 1)}, "initial")
    work.commit(
        {".gradient/workflows/w.yaml": "on:\n  github:\n    branches:\n      only: main\n"}, "spec"
    )
    bare = tmp_path / "origin.git"
    subprocess.run(["git", "clone", "--quiet", "--bare", str(work.path), str(bare)], check=True)
    work.git("remote", "add", "origin", str(bare))
    work.git("fetch", "--quiet", "origin")
    work.git("branch", "--quiet", "--set-upstream-to=origin/main", "main")
    yield work, bare, model


def _push(work: GitRepo, model: Path, seed: int) -> str:
    sha = work.commit({"textgen.yaml": _settings(model, seed)}, f"seed {seed}")
    work.git("push", "--quiet", "origin", "main")
    return sha


def _mlflow_runs(tracking_uri: str, bare: Path) -> list[Any]:
    client = MlflowClient(tracking_uri=tracking_uri)
    experiment = client.get_experiment_by_name(experiment_name(str(bare)))
    return [] if experiment is None else client.search_runs([experiment.experiment_id])


def _running_mid_generation(tracking_uri: str, bare: Path, sha: str) -> Any:
    for run in _mlflow_runs(tracking_uri, bare):
        tags = run.data.tags
        if tags.get("mlflow.source.git.commit") == sha and run.info.status == "RUNNING":
            return run
    return None


def _flow_runs(prefect: PrefectServer, sha: str) -> list[dict[str, Any]]:
    return [r for r in prefect.flow_runs(DEPLOYMENT) if r["parameters"].get("commit_sha") == sha]


def _kill_group(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)


def test_kill_everything_mid_generation_then_restart(
    origin: tuple[GitRepo, Path, Path], tmp_path: Path, shared_model_cache: Path
) -> None:
    work, bare, model = origin
    prefect = PrefectServer(tmp_path / "prefect")
    prefect.start()
    service: Service | None = None
    try:
        service, _, tracking_uri = start_serve(
            tmp_path, bare, prefect, SECRET, str(shared_model_cache)
        )
        doomed = _push(work, model, 2)
        run = wait_for(
            lambda: _running_mid_generation(tracking_uri, bare, doomed),
            120,
            f"the run of {doomed[:7]} to start\n{service.output()[-2000:]}",
        )
        time.sleep(4)  # past loading: generating
        run_pid = int(run.data.tags["textgen.worker.pid"])
        os.kill(run_pid, 0)  # the run's process is alive, mid-generation
        assert service.process is not None
        # kill -9 of the run, the fork server, serve and the Prefect server, all at once.
        _kill_group(service.process.pid)
        assert prefect.child is not None and prefect.child.process is not None
        prefect.stopping.set()  # this test restarts it, not the supervisor
        _kill_group(prefect.child.pid)
        with pytest.raises(ProcessLookupError):
            for _ in range(50):
                os.kill(run_pid, 0)
                time.sleep(0.1)
        service.process.wait(timeout=10)
        prefect.child.process.wait(timeout=10)
        service.process = None
        prefect.child = None

        # Restart both; the next push must run promptly.
        restarted = time.monotonic()
        prefect.start()
        service, _, _ = start_serve(tmp_path, bare, prefect, SECRET, str(shared_model_cache))
        (crashed,) = wait_for(
            lambda: [r for r in _flow_runs(prefect, doomed) if r["state_type"] == "CRASHED"],
            60,
            f"the dead run to be marked Crashed\n{service.output()[-2000:]}",
        )
        assert "textgen serve restarted" in crashed["state"]["message"]
        (dead,) = [
            r
            for r in _mlflow_runs(tracking_uri, bare)
            if r.data.tags.get("mlflow.source.git.commit") == doomed
        ]
        assert dead.info.status == "FAILED"
        assert "textgen serve restarted" in dead.data.tags["textgen.failure"]

        after = _push(work, model, 3)
        wait_for(
            lambda: (
                any(r["state_type"] == "RUNNING" for r in _flow_runs(prefect, after))
                or any(r["state_type"] == "COMPLETED" for r in _flow_runs(prefect, after))
            ),
            120,
            f"the next push to run\n{service.output()[-3000:]}",
        )
        assert time.monotonic() - restarted < 300
        wait_for(
            lambda: any(r["state_type"] == "COMPLETED" for r in _flow_runs(prefect, after)),
            300,
            "the next push to finish",
        )
        runs = _mlflow_runs(tracking_uri, bare)
        assert not [r for r in runs if r.info.status == "RUNNING"], "runs left RUNNING"
        versions = sorted(
            int(r.data.tags["textgen.version"])
            for r in runs
            if r.data.tags.get("textgen.outcome") == "new"
        )
        assert versions == list(range(1, len(versions) + 1)) and versions, versions
    finally:
        if service is not None:
            service.stop()
        prefect.stop()


def test_kill_9_of_serve_leaves_a_server_the_restart_adopts(
    origin: tuple[GitRepo, Path, Path], tmp_path: Path, shared_model_cache: Path
) -> None:
    _, bare, _ = origin
    home = tmp_path / "home"
    env = {
        **os.environ,
        "TEXTGEN_HOME": str(home),
        "TEXTGEN_MODEL_CACHE": str(shared_model_cache),
        "TEXTGEN_WEBHOOK_SECRET": SECRET,
        "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
    }
    env.pop("PREFECT_API_URL", None)
    prefect_port = free_port()
    args = ["serve", "--repo", str(bare), "--port", str(free_port()), "--ui-port", "0"]
    args += ["--prefect-port", str(prefect_port)]
    first = Service.textgen(args, env, tmp_path / "serve1.log")
    second: Service | None = None
    server_pid = 0
    try:
        wait_for(
            lambda: "Serving nlp-text-generation/on-push" in first.output() or not first.alive(),
            180,
            "serve to start",
        )
        info = yaml.safe_load((home / "prefect" / "server.json").read_text())
        server_pid = int(info["pid"])
        assert first.process is not None
        os.kill(first.process.pid, signal.SIGKILL)  # serve alone: its server lives on
        first.process.wait(timeout=10)
        first.process = None
        os.kill(server_pid, 0)
        second = Service.textgen(args, env, tmp_path / "serve2.log")
        wait_for(
            lambda: "Serving nlp-text-generation/on-push" in second.output() or not second.alive(),
            180,
            "serve to start again",
        )
        assert "Prefect server of an earlier service still runs" in second.output()
        again = yaml.safe_load((home / "prefect" / "server.json").read_text())
        assert int(again["pid"]) == server_pid, "the restart started a second server"
        assert httpx.get(f"{again['url']}/health", timeout=10).status_code == 200
    finally:
        if second is not None:
            second.stop()
        first.stop()
        if server_pid:
            _kill_group(server_pid)
