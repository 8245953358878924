"""The team service on one machine, with real processes: the topology of `compose.yaml`.

    PostgreSQL (Debian's package, a cluster in a folder of its own, on 127.0.0.1)
      ├── Prefect server   (PREFECT_API_DATABASE_CONNECTION_URL=postgresql+asyncpg://...)
      └── MLflow server    (--backend-store-uri postgresql://..., --artifacts-destination)
    receiver             (`textgen receive --links`: every linked repository, one endpoint)
    N process workers    (`prefect worker start --pool textgen`), each with its own data folder

The Prefect set-up (work pool, a deployment per link, automations) is `textgen team apply`
(`deployments.orchestration.deployments.apply_links`), run here as a child process against the
servers. Workers share nothing but the servers: runs and events go through the Prefect API,
records and artifacts through the MLflow server (`mlflow-artifacts:` URIs).
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from deployments.ops.postgres import Postgres
from deployments.ops.process import Child, command_line, free_port, healthy, stop_pid, wait_until
from tasks import config
from tasks.errors import ServeError
from tasks.files import write_atomic

PROJECT = Path(__file__).resolve().parents[2]
POOL = "textgen"
PASSWORD_FILE = Path("secrets", "postgres-password")  # under the team's home


def initialise_mlflow_store(uri: str) -> None:
    """Create the MLflow tables once, before several server workers open the database."""
    from mlflow.store.model_registry.sqlalchemy_store import SqlAlchemyStore as Registry
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    SqlAlchemyStore(uri, "mlflow-artifacts:/")
    Registry(uri)


@dataclass
class Ports:
    """Where the servers listen, all on 127.0.0.1."""

    postgres: int = field(default_factory=free_port)
    prefect: int = field(default_factory=free_port)
    mlflow: int = field(default_factory=free_port)
    receiver: int = field(default_factory=free_port)


class Team:
    """PostgreSQL, the Prefect and MLflow servers on it, the receiver and N workers; with
    `access_log`, the Prefect server logs every request as the MLflow server does.

    `home` holds every process's log and the servers' data (artifacts, the Prefect home), one
    folder per worker (`worker-<i>`: its mirrors and model cache), and `team.json` while up."""

    def __init__(
        self,
        home: Path,
        links: Path,
        workers: int = 2,
        ports: Ports | None = None,
        postgres_folder: Path | None = None,
        notify_url: str | None = None,
        heartbeat_seconds: int = 30,
        zombie_seconds: float = 90,
        env: dict[str, str] | None = None,
        access_log: bool = False,
    ) -> None:
        self.home = home.resolve()
        self.access_log = access_log
        self.links = links
        self.worker_count = workers
        self.ports = ports or Ports()
        folder = postgres_folder or self.home / "postgres"
        self.postgres = Postgres(folder, self.ports.postgres, self.home / PASSWORD_FILE)
        self.notify_url = notify_url
        self.heartbeat_seconds = heartbeat_seconds
        self.zombie_seconds = zombie_seconds
        self.base_env = {**(env if env is not None else os.environ)}
        self.servers: dict[str, Child] = {}
        self.workers: list[Child] = []

    @property
    def prefect_api(self) -> str:
        """The Prefect server's API URL."""
        return f"http://127.0.0.1:{self.ports.prefect}/api"

    @property
    def mlflow_uri(self) -> str:
        """The MLflow tracking server's URL (also its UI)."""
        return f"http://127.0.0.1:{self.ports.mlflow}"

    def client_env(self) -> dict[str, str]:
        """What any client of the servers needs: their URLs."""
        return {
            "PREFECT_API_URL": self.prefect_api,
            "MLFLOW_TRACKING_URI": self.mlflow_uri,
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
        }

    def _env(self, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in self.base_env.items() if not k.startswith(("PREFECT_", "MLFLOW_"))}
        env.pop(config.ARTIFACT_ROOT.name, None)
        return {**env, **self.client_env(), **extra}

    def _server_env(self, **extra: str) -> dict[str, str]:
        """Servers get no git credentials or webhook secrets: they never need them."""
        return config.without_secrets(self._env(**extra, **self.postgres.environment()))

    def _child(self, name: str, env: dict[str, str], *args: str) -> Child:
        """`python -m ARGS` as a child, its log in `home/logs`."""
        command = [sys.executable, "-m", *args]
        return Child(name, command, env, self.home / "logs" / f"{name}.log", cwd=PROJECT)

    def start(self) -> None:
        """Start everything in order and set up the links; stop what started on failure."""
        try:
            self._start()
        except BaseException:
            self.stop()
            raise

    def _start(self) -> None:
        self.home.mkdir(parents=True, exist_ok=True)
        self.postgres.start()
        prefect_env = self._server_env(
            PREFECT_HOME=str(self.home / "prefect"),
            PREFECT_API_DATABASE_CONNECTION_URL=self.postgres.url("prefect", "postgresql+asyncpg"),
            PREFECT_API_URL=self.prefect_api,
            # Its access log (one line per request) is at INFO, off by default.
            PREFECT_SERVER_LOGGING_LEVEL="INFO" if self.access_log else "WARNING",
        )
        prefect = self._child(
            "prefect-server", prefect_env, "prefect", "server", "start", *_local(self.ports.prefect)
        )
        mlflow_db = self.postgres.url("mlflow", "postgresql+psycopg2")
        create = f"from {__name__} import initialise_mlflow_store as i; i({mlflow_db!r})"
        command = [sys.executable, "-c", create]
        env = {**os.environ, **self.postgres.environment()}
        created = subprocess.run(
            command, env=env, cwd=PROJECT, capture_output=True, text=True, timeout=300
        )
        if created.returncode != 0:
            raise ServeError(f"creating the MLflow tables failed:\n{created.stderr[-3000:]}")
        artifacts = (self.home / "artifacts").as_uri()
        store = ("--backend-store-uri", mlflow_db, "--artifacts-destination", artifacts)
        listen = (*_local(self.ports.mlflow), "--workers", "2")
        mlflow = self._child(
            "mlflow-server", self._server_env(), "mlflow", "server", *store, *listen
        )
        self.servers = {"prefect": prefect.start(), "mlflow": mlflow.start()}
        wait_until(lambda: healthy(self.prefect_api), 180, "prefect server", prefect)
        wait_until(lambda: healthy(self.mlflow_uri), 180, "mlflow server", mlflow)
        self.apply()
        self.start_receiver()
        for index in range(self.worker_count):
            self.start_worker(index)
        self._record()

    def apply(self) -> dict[str, Any]:
        """The set-up, run in a child process against the servers: `textgen team apply`."""
        command = [sys.executable, "-m", "deployments.cli", "team", "apply", "--links"]
        command += [str(self.links), "--zombie-seconds", str(int(self.zombie_seconds))]
        if self.notify_url:
            command += ["--notify-url", self.notify_url]
        result = subprocess.run(
            command, env=self._env(), cwd=PROJECT, capture_output=True, text=True, timeout=300
        )
        if result.returncode != 0:
            raise ServeError(f"textgen team apply failed:\n{result.stdout}{result.stderr}")
        return dict(json.loads(result.stdout.strip().splitlines()[-1]))

    def start_receiver(self) -> Child:
        """The receiver for every link, with the reaper of crashed runs."""
        env = self._env(**{config.HOME.name: str(self.home / "receiver")})
        links, port = str(self.links), str(self.ports.receiver)
        args = ("receive", "--links", links, "--port", port, "--reap")
        receiver = self._child("receiver", env, "deployments.cli", *args)
        self.servers["receiver"] = receiver.start()
        url = f"http://127.0.0.1:{self.ports.receiver}"
        wait_until(lambda: healthy(url), 180, "receiver", receiver)
        return receiver

    def worker_env(self, index: int) -> dict[str, str]:
        """A worker's environment: its own data folder, the servers' URLs, heartbeats."""
        home = str(self.home / f"worker-{index}")
        return self._env(
            PREFECT_FLOWS_HEARTBEAT_FREQUENCY=str(self.heartbeat_seconds),
            PREFECT_WORKER_QUERY_SECONDS=self.base_env.get("PREFECT_WORKER_QUERY_SECONDS", "2"),
            **{config.HOME.name: home, config.MLFLOW_UI_URL.name: self.mlflow_uri},
        )

    def start_worker(self, index: int) -> Child:
        """Start process worker `index` (one flow run at a time, like one machine)."""
        name = f"worker-{index}"
        args = ("start", "--pool", POOL, "--type", "process", "--name", name, "--limit", "1")
        worker = self._child(name, self.worker_env(index), "prefect", "worker", *args).start()
        if index < len(self.workers):
            self.workers[index] = worker
        else:
            self.workers.append(worker)
        return worker

    def _record(self) -> None:
        state = {
            "ports": self.ports.__dict__,
            "pids": {c.name: c.pid for c in [*self.servers.values(), *self.workers]},
            "postgres": str(self.postgres.folder),
            "prefect_api": self.prefect_api,
            "mlflow": self.mlflow_uri,
            "receiver": f"http://127.0.0.1:{self.ports.receiver}/webhooks/github",
        }
        write_atomic(self.home / "team.json", json.dumps(state, indent=2))

    def stop(self) -> None:
        """Workers first, then the receiver, the servers and PostgreSQL."""
        for child in [*self.workers, *reversed(list(self.servers.values()))]:
            child.stop()
        try:
            self.postgres.stop()
        finally:
            with contextlib.suppress(OSError):
                (self.home / "team.json").unlink()


def stop_recorded(home: Path) -> list[str]:
    """Stop a team `textgen team up` started in `home`, by the pids it recorded."""
    state_file = home / "team.json"
    try:
        state = json.loads(state_file.read_text())
    except (OSError, ValueError) as exc:
        raise ServeError(f"no running team recorded in {home}: {exc}") from None
    stopped = []
    order = sorted(state["pids"].items(), key=lambda kv: not kv[0].startswith("worker"))
    for name, pid in order:
        if stop_pid(int(pid), _is_ours):
            stopped.append(name)
    Postgres(Path(state["postgres"]), 0, home / PASSWORD_FILE).stop()
    stopped.append("postgres")
    state_file.unlink()
    return stopped


def _is_ours(pid: int) -> bool:
    """Whether `pid` is still a process this project started (not a reused pid)."""
    command = b"\0".join(command_line(pid))
    return bool(command) and (
        sys.executable.encode() in command or b"prefect" in command or b"mlflow" in command
    )


def _local(port: int) -> tuple[str, ...]:
    """A server's options to listen on 127.0.0.1:`port`."""
    return ("--host", "127.0.0.1", "--port", str(port))
