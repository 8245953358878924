"""A warm local stack for the end-to-end benchmarks: Prefect server, `textgen serve`, a bare
repository with the hook installed, and a work clone to push from. Everything on 127.0.0.1;
every process is stopped by its own pid on exit.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from _common import bench_dir

from tasks.store import experiment_name
from tests.conftest import GitRepo
from tests.servers import PrefectServer, Service, deliver, set_hook, start_serve, wait_for

SECRET = "bench-secret"
DEPLOYMENT = "nlp-text-generation/on-push"
SPEC = "on:\n  github:\n    branches:\n      only: main\n"


@dataclass
class Stack:
    root: Path
    prefect: PrefectServer
    service: Service
    work: GitRepo
    bare: Path
    model: Path
    receiver_url: str
    tracking_uri: str

    def settings(self, seed: int) -> str:
        return (
            f"model: {self.model}\nrandom_seed: {seed}\nmax_length: 30\nnum_return_sequences: 5\n"
        )

    def commit(self, seed: int) -> str:
        return self.work.commit({"textgen.yaml": self.settings(seed)}, f"seed {seed}")

    def push(self) -> None:
        self.work.git("push", "--quiet", "origin", "main")

    def hook(self, enabled: bool) -> None:
        set_hook(self.bare, enabled)

    def deliver(self, after: str, before: str) -> httpx.Response:
        payload = {
            "ref": "refs/heads/main",
            "before": before,
            "after": after,
            "repository": {"url": str(self.bare)},
        }
        return deliver(self.receiver_url, SECRET, payload)

    def mlflow_run(self, sha: str | None = None, flow_run_id: str | None = None) -> Any:
        """The FINISHED MLflow run of a commit (or of a flow run), if there is one yet."""
        from mlflow import MlflowClient

        client = MlflowClient(tracking_uri=self.tracking_uri)
        experiment = client.get_experiment_by_name(experiment_name(str(self.bare)))
        if experiment is None:
            return None
        if flow_run_id:
            query = f"tags.`textgen.prefect.flow_run_id` = '{flow_run_id}'"
        else:
            query = f"tags.`mlflow.source.git.commit` = '{sha}'"
        runs = client.search_runs(
            [experiment.experiment_id], query + " and attributes.status = 'FINISHED'"
        )
        return runs[0] if runs else None

    def flow_runs(self) -> list[dict[str, Any]]:
        return self.prefect.flow_runs(DEPLOYMENT)

    def force_run(self) -> str:
        """Create a run of the deployment by hand (`force`: it generates); its flow run id."""
        api = self.prefect.api_url
        deployment = httpx.get(f"{api}/deployments/name/{DEPLOYMENT}", timeout=10).json()
        for attempt in range(10):  # the server answers 503 while its database is busy
            response = httpx.post(
                f"{api}/deployments/{deployment['id']}/create_flow_run",
                json={"parameters": {"force": True}},
                timeout=30,
            )
            if response.status_code != 503:
                break
            time.sleep(1 + attempt)
        response.raise_for_status()
        return str(response.json()["id"])


def seconds(text: str | None) -> float | None:
    """An API timestamp as epoch seconds."""
    if not text:
        return None
    from datetime import datetime

    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


class running_stack:
    """Start the stack (and a first run, to warm it), and stop it afterwards."""

    def __init__(self, model: Path, name: str, env: dict[str, str] | None = None) -> None:
        self.model = model
        self.root = bench_dir() / "stack" / name
        self.env = env
        self.stack: Stack | None = None

    def __enter__(self) -> Stack:
        if self.root.exists():
            shutil.rmtree(self.root)
        self.root.mkdir(parents=True)
        work = GitRepo(self.root / "work")
        work.commit({"textgen.yaml": "", ".gradient/workflows/w.yaml": SPEC}, "initial")
        bare = self.root / "origin.git"
        subprocess.run(["git", "clone", "--quiet", "--bare", str(work.path), str(bare)], check=True)
        work.git("remote", "add", "origin", str(bare))
        prefect = PrefectServer(self.root / "prefect")
        prefect.start()
        from tasks.config import model_cache_dir

        model_cache = str(model_cache_dir())
        try:
            service, receiver_url, tracking_uri = start_serve(
                self.root, bare, prefect, SECRET, model_cache, self.env
            )
        except BaseException:
            prefect.stop()
            raise
        stack = Stack(
            self.root, prefect, service, work, bare, self.model, receiver_url, tracking_uri
        )
        self.stack = stack
        sha = stack.commit(0)
        stack.push()
        wait_for(lambda: stack.mlflow_run(sha), 240, "the warm-up run")
        time.sleep(1)
        return stack

    def __exit__(self, *exc: object) -> None:
        if self.stack is not None:
            self.stack.service.stop()
            self.stack.prefect.stop()
