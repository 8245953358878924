"""deployments/prefect.yaml on a work pool of warm workers: `prefect deploy`, a worker of type
`textgen-warm` (found by Prefect through the project's entry point), `textgen receive`."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import pytest
from mlflow import MlflowClient

from deployments.hook import install
from tasks.store import experiment_name
from tests.conftest import GitRepo, build_tiny_gpt2, settings_yaml
from tests.servers import PrefectServer, Service, free_port, wait_for

# The worker's fork server imports the stack at its start: slow, run by CI after the default run.
pytestmark = [pytest.mark.server, pytest.mark.slow]

PROJECT = Path(__file__).resolve().parents[1]
SECRET = "workpool-secret-0815"
SPEC = "on:\n  github:\n    branches:\n      only: main\n"


def prefect_cli(args: list[str], env: dict[str, str]) -> str:
    result = subprocess.run(
        [sys.executable, "-m", "prefect", "--no-prompt", *args],
        env=env,
        cwd=PROJECT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


@pytest.fixture(scope="module")
def pool(
    tmp_path_factory: pytest.TempPathFactory, shared_model_cache: Path
) -> Iterator[dict[str, object]]:
    root = tmp_path_factory.mktemp("workpool")
    model = build_tiny_gpt2(root / "tiny")
    work = GitRepo(root / "work")
    work.commit(
        {"textgen.yaml": settings_yaml(model), ".gradient/workflows/w.yaml": SPEC}, "initial"
    )
    bare = root / "origin.git"
    subprocess.run(["git", "clone", "--quiet", "--bare", str(work.path), str(bare)], check=True)
    work.git("remote", "add", "origin", str(bare))

    prefect = PrefectServer(root / "prefect")
    # Its access log (a line per request), read by the test of what a run asks.
    os.environ["PREFECT_SERVER_LOGGING_LEVEL"] = "INFO"
    try:
        prefect.start()
    finally:
        os.environ.pop("PREFECT_SERVER_LOGGING_LEVEL")
    tracking_uri = f"sqlite:///{root / 'mlflow.db'}"
    env = {
        **os.environ,
        "PWD": str(PROJECT),
        "PREFECT_API_URL": prefect.api_url,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_WORKER_QUERY_SECONDS": "1",
        "TEXTGEN_REPO": str(bare),
        "TEXTGEN_HOME": str(root / "home"),
        "TEXTGEN_MODEL_CACHE": str(shared_model_cache),
        "TEXTGEN_MODEL_DIRS": f"{root}{os.pathsep}{shared_model_cache}",
        "MLFLOW_TRACKING_URI": tracking_uri,
        "TEXTGEN_ARTIFACT_ROOT": (root / "artifacts").as_uri(),
        "TEXTGEN_WEBHOOK_SECRET": SECRET,
    }
    services: list[Service] = []
    try:
        prefect_cli(["work-pool", "create", "textgen", "--type", "textgen-warm"], env)
        deployed = prefect_cli(
            ["deploy", "--prefect-file", "deployments/prefect.yaml", "--all"], env
        )
        assert "nlp-text-generation/on-push" in deployed
        assert "nlp-text-generation-cell/on-push" in deployed  # its matrix cells
        worker = [sys.executable, "-m", "prefect", "worker", "start", "--pool", "textgen"]
        worker += ["--type", "textgen-warm", "--limit", "1"]
        services.append(Service(worker, env, root / "worker.log", cwd=PROJECT))
        port = free_port()
        receiver = Service.textgen(
            ["receive", "--repo", str(bare), "--port", str(port)], env, root / "receive.log"
        )
        services.append(receiver)
        wait_for(
            lambda: "Push receiver for" in receiver.output() or not receiver.alive(),
            60,
            "textgen receive",
        )
        assert receiver.alive(), receiver.output()
        secret_file = root / "secret"
        secret_file.write_text(SECRET)
        install(bare, f"http://127.0.0.1:{port}/webhooks/github", secret_file)
        yield {
            "work": work,
            "model": model,
            "bare": bare,
            "env": env,
            "tracking_uri": tracking_uri,
            "worker": services[0],
            "server_log": prefect.home / "server.log",
        }
    finally:
        for service in services:
            service.stop()
        prefect.stop()


def run_of(tracking_uri: str, bare: Path, sha: str) -> object:
    client = MlflowClient(tracking_uri=tracking_uri)
    experiment = client.get_experiment_by_name(experiment_name(str(bare)))
    if experiment is None:
        return None
    runs = client.search_runs(
        [experiment.experiment_id],
        f"tags.`mlflow.source.git.commit` = '{sha}' and attributes.status = 'FINISHED'",
    )
    return runs[0] if runs else None


def test_a_push_runs_on_a_worker(pool: dict[str, object]) -> None:
    work, model = pool["work"], pool["model"]
    assert isinstance(work, GitRepo)
    sha = work.commit({"textgen.yaml": settings_yaml(model, random_seed=9)}, "seed 9")
    work.git("push", "--quiet", "origin", "main")
    run = wait_for(
        lambda: run_of(str(pool["tracking_uri"]), Path(str(pool["bare"])), sha),
        180,
        f"a run of {sha[:7]}",
    )
    assert run.data.tags["textgen.outcome"] == "new"  # type: ignore[attr-defined]
    assert run.data.tags["textgen.trigger"] == "push"  # type: ignore[attr-defined]


def test_the_worker_starts_runs_warm_with_the_last_model_loaded(pool: dict[str, object]) -> None:
    work, model, worker = pool["work"], pool["model"], pool["worker"]
    assert isinstance(work, GitRepo) and isinstance(worker, Service)
    shas = []
    for seed in (10, 11):
        shas.append(work.commit({"textgen.yaml": settings_yaml(model, random_seed=seed)}))
        work.git("push", "--quiet", "origin", "main")
        wait_for(
            lambda: run_of(str(pool["tracking_uri"]), Path(str(pool["bare"])), shas[-1]),
            180,
            f"a run of {shas[-1][:7]}",
        )
    second = run_of(str(pool["tracking_uri"]), Path(str(pool["bare"])), shas[-1])
    assert "Runs start warm" in worker.output()
    # Forked from the fork server that loaded the model the run before used: nothing to load.
    assert second.data.metrics["load_seconds"] == 0.0  # type: ignore[attr-defined]
    assert second.data.tags["textgen.outcome"] == "new"  # type: ignore[attr-defined]


def _asked(log: Path, start: int) -> Counter[str]:
    """The requests the server's access log holds past byte `start`, by method and endpoint."""
    with log.open("rb") as lines:
        lines.seek(start)
        text = lines.read().decode(errors="replace")
    return Counter(
        f"{m[1]} {re.sub('[0-9a-f-]{36}', '{id}', m[2])}"
        for m in re.finditer(r'"(GET|POST|PATCH|PUT|DELETE) (/api/[^ ?"]+)', text)
    )


def test_a_warm_run_asks_the_server_nothing_its_worker_already_read(
    pool: dict[str, object],
) -> None:
    """The worker hands a warm run the flow, deployment, work pool and work queue its events
    name, and its default result storage (asked of the server at most once a minute): a run
    after the first asks for none of them again."""
    work, model, log = pool["work"], pool["model"], pool["server_log"]
    assert isinstance(work, GitRepo) and isinstance(log, Path)
    counts = []
    for seed in (31, 32):
        start = log.stat().st_size
        sha = work.commit({"textgen.yaml": settings_yaml(model, random_seed=seed)})
        work.git("push", "--quiet", "origin", "main")
        run = wait_for(
            partial(run_of, str(pool["tracking_uri"]), Path(str(pool["bare"])), sha),
            180,
            f"a run of {sha[:7]}",
        )
        assert run.data.tags["textgen.outcome"] == "new"  # type: ignore[attr-defined]
        counts.append(_asked(log, start))
    second = counts[1]
    assert second["GET /api/admin/storage"] == 0, second
    assert second["GET /api/work_queues/{id}"] == 0, second
    # Prefect's own worker reads the deployment twice (it exists; its job variables) and the
    # flow once, for the job configuration; the run's process reads neither again.
    assert second["GET /api/deployments/{id}"] <= 2, second
    assert second["GET /api/flows/{id}"] <= 1, second
    assert second["POST /api/flow_runs/{id}/set_state"] >= 3, second  # the log is read right


def test_prefect_deployment_run_with_a_quoted_sha(pool: dict[str, object]) -> None:
    work = pool["work"]
    assert isinstance(work, GitRepo)
    first = work.git("rev-list", "--max-parents=0", "HEAD")
    env = pool["env"]
    assert isinstance(env, dict)
    prefect_cli(
        [
            "deployment",
            "run",
            "nlp-text-generation/on-push",
            "--param",
            f'commit_sha="{first[:7]}"',
        ],
        env,
    )
    run = wait_for(
        lambda: run_of(str(pool["tracking_uri"]), Path(str(pool["bare"])), first),
        180,
        "the manual run",
    )
    assert run.data.tags["textgen.trigger"] == "manual"  # type: ignore[attr-defined]
