"""The team service on one machine, with real processes: the topology of `compose.yaml`.

    PostgreSQL (Debian's package, a cluster in a folder of its own, on 127.0.0.1)
      ├── Prefect server   (PREFECT_API_DATABASE_CONNECTION_URL=postgresql+asyncpg://...)
      └── MLflow server    (--backend-store-uri postgresql://..., --artifacts-destination)
    receiver             (`textgen receive --links`: every linked repository, one endpoint)
    N process workers    (`prefect worker start --pool textgen`), each with its own data folder

`apply_links` is the set-up: the work pool, one deployment per link (one run at a time per
repository and branch, through the deployment's concurrency limit), and the automations of
`automations.yaml`. Workers share nothing but the servers: runs and events go through the
Prefect API, records and artifacts through the MLflow server (`mlflow-artifacts:` URIs).
"""

from __future__ import annotations

import contextlib
import glob
import json
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from string import Template
from typing import Any

import yaml

from deployments.serve import SECRET_ENV, ServeError, healthy, triggers
from tasks.links import Link

logger = logging.getLogger(__name__)

PROJECT = Path(__file__).resolve().parents[1]
ENTRYPOINT = "flows/text_generation.py:nlp_text_generation"
POOL = "textgen"
AUTOMATIONS = Path(__file__).with_name("automations.yaml")
NOTIFY_BLOCK = "textgen-failures"
DB_USER = "textgen"
DATABASES = ("prefect", "mlflow")


def postgres_tool(name: str) -> str:
    """A PostgreSQL program: on PATH, else from Debian's /usr/lib/postgresql/<version>/bin."""
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(
        glob.glob(f"/usr/lib/postgresql/*/bin/{name}"),
        key=lambda p: int(Path(p).parts[-3]) if Path(p).parts[-3].isdigit() else 0,
    )
    if not candidates:
        raise ServeError(
            f"PostgreSQL's {name} is not installed: apt-get install postgresql (Debian's package)"
        )
    return candidates[-1]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_until(check: Any, seconds: float, what: str, process: Child | None = None) -> None:
    """Poll `check()` until true; a ServeError naming `what` after `seconds` or if `process`
    exits first."""
    deadline = time.monotonic() + seconds
    while not check():
        if process is not None and not process.alive():
            raise ServeError(f"{what} exited; see {process.log}:\n{process.tail()}")
        if time.monotonic() > deadline:
            raise ServeError(f"{what} did not come up within {seconds:.0f} s; see its log")
        time.sleep(0.3)


class Child:
    """A server or worker process in a session of its own, stopped (or killed) by its pid."""

    def __init__(self, name: str, command: list[str], env: dict[str, str], log: Path) -> None:
        self.name = name
        self.command = command
        self.env = env
        self.log = log
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        """The process id (0 before the start)."""
        return self.process.pid if self.process else 0

    def start(self) -> Child:
        """Start the process, its output appended to its log."""
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log, "ab") as out:
            self.process = subprocess.Popen(
                self.command,
                env=self.env,
                cwd=PROJECT,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        return self

    def alive(self) -> bool:
        """Whether it still runs."""
        return self.process is not None and self.process.poll() is None

    def tail(self, lines: int = 30) -> str:
        """The end of its log."""
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self, timeout: float = 30) -> None:
        """SIGTERM its process group, then SIGKILL what is left after `timeout` seconds."""
        if not self.alive():
            return
        assert self.process is not None
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()

    def kill(self) -> None:
        """SIGKILL its whole process group (a worker and the flow run it started), as a machine
        that dies would end them."""
        if self.process is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=10)


class Postgres:
    """A PostgreSQL cluster in `folder`, listening on 127.0.0.1:`port` only.

    Password authentication (scram-sha-256); the password is kept in `password_file` (mode
    0600) and handed to clients as PGPASSWORD, never in a URL or on a command line. As root,
    the cluster runs as Debian's `postgres` user, which must be able to reach `folder`.
    """

    def __init__(self, folder: Path, port: int, password_file: Path) -> None:
        self.folder = folder
        self.port = port
        self.password_file = password_file

    @property
    def password(self) -> str:
        """The database password, created on first use."""
        if not self.password_file.exists():
            self.password_file.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.password_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as handle:
                handle.write(secrets.token_urlsafe(24))
        return self.password_file.read_text().strip()

    def _as_owner(self, command: list[str]) -> list[str]:
        return ["runuser", "-u", "postgres", "--", *command] if os.geteuid() == 0 else command

    def _run(self, command: list[str], what: str) -> None:
        result = subprocess.run(
            self._as_owner(command), capture_output=True, text=True, timeout=180, cwd="/"
        )
        if result.returncode != 0:
            raise ServeError(f"{what} failed ({result.returncode}): {result.stderr[-2000:]}")

    def url(self, database: str, driver: str = "postgresql") -> str:
        """A connection URL without the password (clients take PGPASSWORD)."""
        return f"{driver}://{DB_USER}@127.0.0.1:{self.port}/{database}"

    def start(self) -> None:
        """Initialise the cluster once, start it, and create the databases it lacks."""
        if not (self.folder / "PG_VERSION").exists():
            self.folder.mkdir(parents=True, exist_ok=True)
            password = self.password
            with tempfile.NamedTemporaryFile("w", delete=False, dir=self.folder) as pw:
                pw.write(password)
            if os.geteuid() == 0:
                shutil.chown(self.folder, "postgres", "postgres")
                shutil.chown(pw.name, "postgres", "postgres")
                probe = subprocess.run(self._as_owner(["test", "-w", str(self.folder)]))
                if probe.returncode != 0:
                    raise ServeError(
                        f"the postgres user cannot reach {self.folder}: choose a folder whose "
                        f"parents it may enter (for example under /var/lib or /tmp)"
                    )
            try:
                self._run(
                    [
                        postgres_tool("initdb"),
                        "-D",
                        str(self.folder / "data"),
                        "-U",
                        DB_USER,
                        f"--pwfile={pw.name}",
                        "--auth=scram-sha-256",
                        "--encoding=UTF8",
                        "--no-locale",
                    ],
                    "initdb",
                )
            finally:
                os.unlink(pw.name)
            (self.folder / "PG_VERSION").write_text("see data/\n")
        options = (
            f"-c listen_addresses=127.0.0.1 -p {self.port} "
            f"-c unix_socket_directories={self.folder / 'data'} -c max_connections=200"
        )
        self._run(
            [
                postgres_tool("pg_ctl"),
                "-D",
                str(self.folder / "data"),
                "-l",
                str(self.folder / "data" / "postgres.log"),
                "-o",
                options,
                "-w",
                "-t",
                "60",
                "start",
            ],
            "pg_ctl start",
        )
        self._create_databases()

    def _create_databases(self) -> None:
        import psycopg2

        connection = psycopg2.connect(
            host="127.0.0.1",
            port=self.port,
            user=DB_USER,
            password=self.password,
            dbname="postgres",
        )
        try:
            connection.autocommit = True
            with connection.cursor() as cursor:
                for name in DATABASES:
                    cursor.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,))
                    if cursor.fetchone() is None:
                        cursor.execute(f'CREATE DATABASE "{name}"')
        finally:
            connection.close()

    def stop(self) -> None:
        """Stop the cluster (fast shutdown), if it runs."""
        if not (self.folder / "data" / "postmaster.pid").exists():
            return
        self._run(
            [postgres_tool("pg_ctl"), "-D", str(self.folder / "data"), "-m", "fast", "-w", "stop"],
            "pg_ctl stop",
        )

    def environment(self) -> dict[str, str]:
        """What a client needs besides the URL."""
        return {"PGPASSWORD": self.password}


def initialise_mlflow_store(uri: str) -> None:
    """Create the MLflow tables once, before several server workers open the database."""
    from mlflow.store.model_registry.sqlalchemy_store import SqlAlchemyStore as Registry
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    SqlAlchemyStore(uri, "mlflow-artifacts:/")
    Registry(uri)


def automations(zombie_seconds: float, notify_block_id: str | None, mlflow_ui: str) -> list[Any]:
    """The automations declared in `automations.yaml`, filled in; the notification one only
    when there is a block to notify through."""
    from prefect.automations import AutomationCore

    text = Template(AUTOMATIONS.read_text()).safe_substitute(
        ZOMBIE_SECONDS=str(int(zombie_seconds)),
        NOTIFY_BLOCK_ID=notify_block_id or "",
        MLFLOW_UI=mlflow_ui,
    )
    declared = yaml.safe_load(text)["automations"]
    return [
        AutomationCore.model_validate(item)
        for item in declared
        if notify_block_id or not any(a["type"] == "send-notification" for a in item["actions"])
    ]


def save_notify_block(url: str) -> str:
    """The webhook notification block failures are sent through; returns its document id."""
    from prefect.blocks.notifications import CustomWebhookNotificationBlock

    block = CustomWebhookNotificationBlock(
        name="textgen",
        url=url,
        method="POST",
        json_data={"subject": "{{subject}}", "body": "{{body}}"},
        timeout=10,
        headers=None,
        cookies=None,
    )
    return str(block.save(NOTIFY_BLOCK, overwrite=True))


def apply_links(
    links: list[Link],
    pool: str = POOL,
    zombie_seconds: float = 90,
    notify_url: str | None = None,
    mlflow_ui: str = "",
) -> dict[str, Any]:
    """Create or update the work pool, one deployment per link (and remove those of links
    that were removed), and the automations. Returns each link's deployment id by name."""
    from prefect import Flow
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterTags
    from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy
    from prefect.exceptions import ObjectAlreadyExists

    with get_client(sync_client=True) as client, contextlib.suppress(ObjectAlreadyExists):
        client.create_work_pool(WorkPoolCreate(name=pool, type="process"))
    flow = Flow.from_source(source=str(PROJECT), entrypoint=ENTRYPOINT)
    ids: dict[str, Any] = {}
    for link in links:
        ids[link.name] = flow.deploy(  # type: ignore[union-attr]
            name=link.name,
            work_pool_name=pool,
            parameters={"repo_url": link.url, "branch": link.branch},
            triggers=triggers(link.url, link.branch),
            concurrency_limit=ConcurrencyLimitConfig(
                limit=1, collision_strategy=ConcurrencyLimitStrategy.ENQUEUE
            ),
            # The flow checks every run against its link: no parameter can make it clone another
            # repository. References only: the worker resolves them in its own environment.
            job_variables={"env": {"TEXTGEN_LINK": link.public_json()}},
            description=f"Text generation for every push to {link.branch} of {link.url}",
            tags=["textgen", "on-push", "textgen-link"],
            build=False,
            push=False,
            print_next_steps=False,
        )
    with get_client(sync_client=True) as client:
        for deployment in client.read_deployments(
            deployment_filter=DeploymentFilter(tags=DeploymentFilterTags(all_=["textgen-link"])),
            limit=200,
        ):
            if deployment.id not in ids.values():
                client.delete_deployment(deployment.id)
                logger.info("Removed the deployment of unlinked %s", deployment.name)
        block_id = save_notify_block(notify_url) if notify_url else None
        wanted = automations(zombie_seconds, block_id, mlflow_ui)
        names = {a.name for a in wanted} | {
            "textgen: notify on failed or crashed runs"
        }  # a notification set up before is dropped when no URL is given now
        for existing in client.read_automations():
            if existing.name in names:
                client.delete_automation(existing.id)
        for automation in wanted:
            client.create_automation(automation)
    return ids


@dataclass
class Ports:
    """Where the servers listen, all on 127.0.0.1."""

    postgres: int = field(default_factory=free_port)
    prefect: int = field(default_factory=free_port)
    mlflow: int = field(default_factory=free_port)
    receiver: int = field(default_factory=free_port)


class Team:
    """PostgreSQL, the Prefect and MLflow servers on it, the receiver and N workers.

    With `access_log`, the Prefect server logs every request as the MLflow server does.

    `home` holds every process's log and the servers' data (artifacts, the Prefect home), one
    folder per worker (`worker-<i>`: its mirrors and model cache), and `team.json` while up.
    """

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
        self.postgres = Postgres(
            postgres_folder or self.home / "postgres",
            self.ports.postgres,
            self.home / "secrets" / "postgres-password",
        )
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
        env.pop("TEXTGEN_ARTIFACT_ROOT", None)
        return {**env, **self.client_env(), **extra}

    def _server_env(self, **extra: str) -> dict[str, str]:
        """Servers get no git credentials or webhook secrets: they never need them."""
        env = self._env(**extra, **self.postgres.environment())
        return {k: v for k, v in env.items() if k not in SECRET_ENV}

    def start(self) -> None:
        """Start everything in order and set up the links; stop what started on failure."""
        try:
            self._start()
        except BaseException:
            self.stop()
            raise

    def _start(self) -> None:
        py = sys.executable
        self.home.mkdir(parents=True, exist_ok=True)
        self.postgres.start()
        prefect = Child(
            "prefect-server",
            [
                py,
                "-m",
                "prefect",
                "server",
                "start",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.ports.prefect),
            ],
            self._server_env(
                PREFECT_HOME=str(self.home / "prefect"),
                PREFECT_API_DATABASE_CONNECTION_URL=self.postgres.url(
                    "prefect", "postgresql+asyncpg"
                ),
                PREFECT_API_URL=self.prefect_api,
                # Its access log (one line per request) is at INFO, off by default.
                PREFECT_SERVER_LOGGING_LEVEL="INFO" if self.access_log else "WARNING",
            ),
            self.home / "logs" / "prefect-server.log",
        )
        mlflow_db = self.postgres.url("mlflow", "postgresql+psycopg2")
        created = subprocess.run(
            [
                py,
                "-c",
                f"from deployments.team import initialise_mlflow_store as i; i({mlflow_db!r})",
            ],
            env={**os.environ, **self.postgres.environment()},
            cwd=PROJECT,
            capture_output=True,
            text=True,
            timeout=300,
        )
        if created.returncode != 0:
            raise ServeError(f"creating the MLflow tables failed:\n{created.stderr[-3000:]}")
        mlflow = Child(
            "mlflow-server",
            [
                py,
                "-m",
                "mlflow",
                "server",
                "--backend-store-uri",
                mlflow_db,
                "--artifacts-destination",
                (self.home / "artifacts").as_uri(),
                "--host",
                "127.0.0.1",
                "--port",
                str(self.ports.mlflow),
                "--workers",
                "2",
            ],
            self._server_env(),
            self.home / "logs" / "mlflow-server.log",
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
        receiver = Child(
            "receiver",
            [
                sys.executable,
                "-m",
                "deployments.cli",
                "receive",
                "--links",
                str(self.links),
                "--port",
                str(self.ports.receiver),
                "--reap",
            ],
            self._env(TEXTGEN_HOME=str(self.home / "receiver")),
            self.home / "logs" / "receiver.log",
        )
        self.servers["receiver"] = receiver.start()
        wait_until(
            lambda: healthy(f"http://127.0.0.1:{self.ports.receiver}"),
            180,
            "receiver",
            receiver,
        )
        return receiver

    def worker_env(self, index: int) -> dict[str, str]:
        """A worker's environment: its own data folder, the servers' URLs, heartbeats."""
        return self._env(
            TEXTGEN_HOME=str(self.home / f"worker-{index}"),
            PREFECT_FLOWS_HEARTBEAT_FREQUENCY=str(self.heartbeat_seconds),
            PREFECT_WORKER_QUERY_SECONDS=self.base_env.get("PREFECT_WORKER_QUERY_SECONDS", "2"),
            TEXTGEN_MLFLOW_UI_URL=self.mlflow_uri,
        )

    def start_worker(self, index: int) -> Child:
        """Start process worker `index` (one flow run at a time, like one machine)."""
        worker = Child(
            f"worker-{index}",
            [
                sys.executable,
                "-m",
                "prefect",
                "worker",
                "start",
                "--pool",
                POOL,
                "--type",
                "process",
                "--name",
                f"worker-{index}",
                "--limit",
                "1",
            ],
            self.worker_env(index),
            self.home / "logs" / f"worker-{index}.log",
        )
        worker.start()
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
        (self.home / "team.json").write_text(json.dumps(state, indent=2))

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
        if _is_ours(int(pid)):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(int(pid), signal.SIGTERM)
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and _is_ours(int(pid)):
                time.sleep(0.2)
            if _is_ours(int(pid)):
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(int(pid), signal.SIGKILL)
            stopped.append(name)
    Postgres(Path(state["postgres"]), 0, home / "secrets" / "postgres-password").stop()
    stopped.append("postgres")
    state_file.unlink()
    return stopped


def _is_ours(pid: int) -> bool:
    """Whether `pid` is still a process this project started (not a reused pid)."""
    try:
        command = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return sys.executable.encode() in command or b"prefect" in command or b"mlflow" in command
