"""The team service on one machine, with real processes under supervisord: the topology of
`compose.yaml`, with its restart and health policies.

    PostgreSQL (Debian's package, a cluster in a folder of its own, on 127.0.0.1)
      ├── Prefect server   (PREFECT_API_DATABASE_CONNECTION_URL=postgresql+asyncpg://...)
      └── MLflow server    (--backend-store-uri postgresql://..., --artifacts-destination)
    receiver             (`textgen receive --links`: every linked repository, one endpoint)
    N warm workers       (`prefect worker start --pool textgen --type textgen-warm`), each with
                         its own data folder (`deployments.service.worker`)

The Prefect set-up (work pool, a deployment per link, automations) is `textgen team apply`
(`deployments.orchestration.deployments.apply_links`), run here as a child process against the
servers. Workers share nothing but the servers: runs and events go through the Prefect API,
records and artifacts through the MLflow server (`mlflow-artifacts:` URIs).

supervisord (`deployments.ops.supervisor`) runs every process: they start in the order above,
each once the one before is healthy (compose's `depends_on: service_healthy`), and any that dies
later is started again with supervisord's back-off (compose's `restart: unless-stopped`): a
killed PostgreSQL, server or worker comes back without anyone restarting it by hand, and the
others ride out its absence (they retry). `stop` stops them all, workers first, whatever died.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from deployments.ops.postgres import Postgres
from deployments.ops.prefect_server import SERVER_SETTINGS
from deployments.ops.process import command_line, free_port, healthy, stop_pid, tail, wait_until
from deployments.ops.supervisor import Program, Supervisor, stop_marked
from tasks import config
from tasks.errors import ServeError
from tasks.files import write_atomic

PROJECT = Path(__file__).resolve().parents[2]
POOL = "textgen"
WORKER_TYPE = "textgen-warm"
"""The workers' type: `deployments.service.worker`, which starts runs warm."""
PASSWORD_FILE = Path("secrets", "postgres-password")  # under the team's home
LOG_BATCH_SECONDS = "10"
"""How long a run's log lines gather before they are sent to Prefect (at the end, the rest)."""


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


class Supervised:
    """A process of the team, as supervisord runs it: its pid is whatever it is now."""

    def __init__(self, name: str, supervisor: Supervisor) -> None:
        self.name = name
        self.supervisor = supervisor

    @property
    def pid(self) -> int:
        """Its pid now (0 while it is not running)."""
        return self.supervisor.pid(self.name)

    @property
    def log(self) -> Path:
        """Its output."""
        return self.supervisor.log(self.name)

    def alive(self) -> bool:
        """Whether supervisord has it running."""
        return self.supervisor.info(self.name)["statename"] == "RUNNING"

    def kill(self, sig: int = signal.SIGKILL) -> int:
        """Send `sig` to its whole process group (a worker and the runs it started), as a
        machine that dies would end them; supervisord then starts it again. Returns the pid."""
        pid = self.pid
        if pid:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, sig)
        return pid

    def tail(self, lines: int = 30) -> str:
        """The end of its log."""
        return tail(self.log, lines)


class Team:
    """PostgreSQL, the Prefect and MLflow servers on it, the receiver and N workers, under
    supervisord; with `access_log`, the Prefect server logs every request as the MLflow server
    does.

    `home` holds every process's log and the servers' data (artifacts, the Prefect home), one
    folder per worker (`worker-<i>`: its mirrors and model cache), supervisord's configuration
    and socket, and `team.json` while up."""

    def __init__(
        self,
        home: Path,
        links: Path,
        workers: int = 2,
        ports: Ports | None = None,
        postgres_folder: Path | None = None,
        notify_url: str | None = None,
        heartbeat_seconds: int = 30,
        zombie_seconds: float = 60,
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
        self.supervisor = Supervisor(self.home)
        self.servers = {
            name: Supervised(program, self.supervisor) for name, program in SERVERS.items()
        }
        self.workers = [Supervised(f"worker-{i}", self.supervisor) for i in range(workers)]

    @property
    def prefect_api(self) -> str:
        """The Prefect server's API URL."""
        return f"http://127.0.0.1:{self.ports.prefect}/api"

    @property
    def mlflow_uri(self) -> str:
        """The MLflow tracking server's URL (also its UI)."""
        return f"http://127.0.0.1:{self.ports.mlflow}"

    @property
    def receiver_url(self) -> str:
        """The receiver's base URL."""
        return f"http://127.0.0.1:{self.ports.receiver}"

    def client_env(self) -> dict[str, str]:
        """What any client of the servers needs: their URLs; and no CSRF token: the team's
        Prefect server runs without CSRF protection (an API for processes, not browsers'
        forms), and a client asks it for a token with each connection it opens (a third of
        the requests per push, measured). No version handshake either: every process of the
        team runs the Prefect its server runs (one install here, one image in compose.yaml),
        and each run's process would ask again."""
        return {
            "PREFECT_API_URL": self.prefect_api,
            "MLFLOW_TRACKING_URI": self.mlflow_uri,
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_SERVER_CSRF_PROTECTION_ENABLED": "false",
            "PREFECT_CLIENT_CSRF_SUPPORT_ENABLED": "false",
            "PREFECT_CLIENT_SERVER_VERSION_CHECK_ENABLED": "false",
            "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
        }

    def _env(self, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in self.base_env.items() if not k.startswith(("PREFECT_", "MLFLOW_"))}
        env.pop(config.ARTIFACT_ROOT.name, None)
        return {**env, **self.client_env(), **extra}

    def _server_env(self, **extra: str) -> dict[str, str]:
        """Servers get no git credentials or webhook secrets: they never need them."""
        return config.without_secrets(self._env(**extra, **self.postgres.environment()))

    def programs(self) -> list[Program]:
        """Every process of the team, for supervisord, in start order."""
        prefect_env = self._server_env(
            PREFECT_HOME=str(self.home / "prefect"),
            PREFECT_API_DATABASE_CONNECTION_URL=self.postgres.url("prefect", "postgresql+asyncpg"),
            PREFECT_API_URL=self.prefect_api,
            # Its access log (one line per request) is at INFO, off by default.
            PREFECT_SERVER_LOGGING_LEVEL="INFO" if self.access_log else "WARNING",
            **SERVER_SETTINGS,
        )
        mlflow_db = self.postgres.url("mlflow", "postgresql+psycopg2")
        artifacts = (self.home / "artifacts").as_uri()
        mlflow = ["mlflow", "server", "--backend-store-uri", mlflow_db]
        mlflow += ["--artifacts-destination", artifacts, *_local(self.ports.mlflow)]
        mlflow += ["--workers", "2"]
        # MLflow's job runner (for its UI's jobs) is not used here, and costs a process.
        mlflow_env = self._server_env(MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
        receiver_env = self._env(**{config.HOME.name: str(self.home / "receiver")})
        receive = ["deployments.cli", "receive", "--links", str(self.links)]
        receive += ["--port", str(self.ports.receiver), "--reap"]
        python = [sys.executable, "-m"]
        found = [
            Program(
                "postgres",
                self.postgres.server_command(),
                priority=10,
                user=self.postgres.user,
                stopsignal="INT",
                directory=Path("/"),
            ),
            Program(
                SERVERS["prefect"],
                [*python, "prefect", "server", "start", *_local(self.ports.prefect)],
                prefect_env,
                priority=20,
                directory=PROJECT,
            ),
            Program(
                SERVERS["mlflow"], [*python, *mlflow], mlflow_env, priority=20, directory=PROJECT
            ),
            Program(
                SERVERS["receiver"], [*python, *receive], receiver_env, priority=30,
                directory=PROJECT,
            ),
        ]  # fmt: skip
        for index in range(self.worker_count):
            name = f"worker-{index}"
            args = ["start", "--pool", POOL, "--type", WORKER_TYPE, "--name", name, "--limit", "1"]
            command = [*python, "prefect", "worker", *args]
            found.append(Program(name, command, self.worker_env(index), 40, directory=PROJECT))
        return found

    def start(self) -> None:
        """Start everything in order and set up the links; stop what started on failure."""
        try:
            self._start()
        except BaseException:
            self.stop()
            raise

    def _start(self) -> None:
        self.home.mkdir(parents=True, exist_ok=True)
        self.postgres.init()
        self.supervisor.write(self.programs())
        self.supervisor.start(config.without_secrets(self._env()))
        self._record()
        self._start_healthy("postgres", self.postgres.ready)
        self.postgres.create_databases()
        self._start_healthy("prefect", lambda: healthy(self.prefect_api))
        self._create_mlflow_tables()
        self._start_healthy("mlflow", lambda: healthy(self.mlflow_uri))
        self.apply()
        self._start_healthy("receiver", lambda: healthy(self.receiver_url))
        for worker in self.workers:
            self.supervisor.start_program(worker.name)

    def _start_healthy(self, server: str, check: Callable[[], bool], seconds: float = 180) -> None:
        """Start one of the servers and wait until it answers."""
        handle = self.servers[server]
        self.supervisor.start_program(handle.name)
        wait_until(check, seconds, handle.name, handle)

    def _create_mlflow_tables(self) -> None:
        """Create the MLflow tables once, before the server's workers open the database."""
        mlflow_db = self.postgres.url("mlflow", "postgresql+psycopg2")
        create = f"from {__name__} import initialise_mlflow_store as i; i({mlflow_db!r})"
        env = {**os.environ, **self.postgres.environment()}
        created = subprocess.run(
            [sys.executable, "-c", create],
            env=env,
            cwd=PROJECT,
            capture_output=True,
            text=True,
            timeout=300,
        )
        if created.returncode != 0:
            raise ServeError(f"creating the MLflow tables failed:\n{created.stderr[-3000:]}")

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

    def worker_env(self, index: int) -> dict[str, str]:
        """A worker's environment: its own data folder, the servers' URLs, heartbeats, its runs'
        log lines sent to Prefect in batches of `LOG_BATCH_SECONDS` (Prefect's 2 s send a run's
        few lines one request at a time), and its
        share of the machine's cores for torch's threads: workers on one machine that each
        start a thread per core oversubscribe it, and OpenMP's spinning threads then slow
        every run many times over (measured: 6.7x with two workers on two cores)."""
        home = str(self.home / f"worker-{index}")
        threads = str(max(1, (os.cpu_count() or 1) // max(1, self.worker_count)))
        return self._env(
            OMP_NUM_THREADS=self.base_env.get("OMP_NUM_THREADS", threads),
            PREFECT_FLOWS_HEARTBEAT_FREQUENCY=str(self.heartbeat_seconds),
            PREFECT_WORKER_QUERY_SECONDS=self.base_env.get("PREFECT_WORKER_QUERY_SECONDS", "2"),
            PREFECT_LOGGING_TO_API_BATCH_INTERVAL=self.base_env.get(
                "PREFECT_LOGGING_TO_API_BATCH_INTERVAL", LOG_BATCH_SECONDS
            ),
            **{config.HOME.name: home, config.MLFLOW_UI_URL.name: self.mlflow_uri},
        )

    def states(self) -> dict[str, str]:
        """Every process's state, as supervisord has it (RUNNING, BACKOFF, ...)."""
        return self.supervisor.states()

    def _record(self) -> None:
        state = {
            "ports": self.ports.__dict__,
            "supervisord": self.supervisor.child.pid if self.supervisor.child else 0,
            "postgres": str(self.postgres.folder),
            "prefect_api": self.prefect_api,
            "mlflow": self.mlflow_uri,
            "receiver": f"{self.receiver_url}/webhooks/github",
        }
        write_atomic(self.home / "team.json", json.dumps(state, indent=2))

    def stop(self) -> list[str]:
        """Stop every process, workers first; what supervisord no longer runs (it died) is
        found by its environment and stopped too; PostgreSQL last. Returns what was running."""
        return _stop(self.home, self.supervisor, self.postgres)


SERVERS = {
    "postgres": "postgres",
    "prefect": "prefect-server",
    "mlflow": "mlflow-server",
    "receiver": "receiver",
}
"""The servers' supervisord program names, by the names code uses."""


def _stop(home: Path, supervisor: Supervisor, postgres: Postgres) -> list[str]:
    running: list[str] = []
    with contextlib.suppress(OSError):
        running = [n for n, state in supervisor.states().items() if state == "RUNNING"]
    supervisor.shutdown()
    if left := stop_marked(home):
        running.append(f"{left} process group(s) left by a dead supervisord")
    if postgres.postmaster() is not None:
        try:
            postgres.stop()
        except ServeError:
            with contextlib.suppress(OSError, TypeError):
                os.kill(postgres.postmaster() or 0, signal.SIGKILL)
        if "postgres" not in running:
            running.append("postgres")
    with contextlib.suppress(OSError):
        (home / "team.json").unlink()
    return running


def stop_recorded(home: Path) -> list[str]:
    """Stop a team `textgen team up` started in `home`, whatever of it died: by supervisord,
    else by the processes' environment; PostgreSQL by its pid file."""
    state_file = home / "team.json"
    try:
        state = json.loads(state_file.read_text())
    except (OSError, ValueError) as exc:
        raise ServeError(f"no running team recorded in {home}: {exc}") from None
    postgres = Postgres(Path(state["postgres"]), 0, home / PASSWORD_FILE)
    supervisor = Supervisor(home)
    stopped = _stop(home, supervisor, postgres)
    pid = int(state.get("supervisord") or 0)
    if pid and stop_pid(pid, _is_ours, grace=10):
        stopped.append("supervisord")
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
