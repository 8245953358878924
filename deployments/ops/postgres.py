"""PostgreSQL for the team service: Debian's package, a cluster in a folder of its own, on
127.0.0.1, with password authentication."""

from __future__ import annotations

import glob
import os
import secrets
import shutil
import subprocess
import tempfile
from pathlib import Path

from tasks.errors import ServeError

DB_USER = "textgen"
DATABASES = ("prefect", "mlflow")


def postgres_tool(name: str) -> str:
    """A PostgreSQL program: on PATH, else from Debian's /usr/lib/postgresql/<version>/bin."""
    if found := shutil.which(name):
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

    def _run(self, tool: str, args: list[str], what: str) -> None:
        command = self._as_owner([postgres_tool(tool), *args])
        result = subprocess.run(command, capture_output=True, text=True, timeout=180, cwd="/")
        if result.returncode != 0:
            raise ServeError(f"{what} failed ({result.returncode}): {result.stderr[-2000:]}")

    def url(self, database: str, driver: str = "postgresql") -> str:
        """A connection URL without the password (clients take PGPASSWORD)."""
        return f"{driver}://{DB_USER}@127.0.0.1:{self.port}/{database}"

    @property
    def data(self) -> Path:
        """The cluster's data folder."""
        return self.folder / "data"

    def init(self) -> None:
        """Initialise the cluster once (initdb, password authentication)."""
        if (self.folder / "PG_VERSION").exists():
            return
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
        auth = [f"--pwfile={pw.name}", "--auth=scram-sha-256", "--encoding=UTF8", "--no-locale"]
        try:
            self._run("initdb", ["-D", str(self.data), "-U", DB_USER, *auth], "initdb")
        finally:
            os.unlink(pw.name)
        (self.folder / "PG_VERSION").write_text("see data/\n")

    def options(self) -> list[str]:
        """The server's options: 127.0.0.1 only, its socket in its data folder."""
        return [
            "-c", "listen_addresses=127.0.0.1", "-p", str(self.port),
            "-c", f"unix_socket_directories={self.data}", "-c", "max_connections=200",
        ]  # fmt: skip

    def server_command(self) -> list[str]:
        """The server in the foreground (for a supervisor; run it as `user`): SIGINT stops it
        fast, as `pg_ctl stop -m fast` does."""
        return [postgres_tool("postgres"), "-D", str(self.data), *self.options()]

    @property
    def user(self) -> str | None:
        """Who the server runs as: Debian's `postgres` user when we are root."""
        return "postgres" if os.geteuid() == 0 else None

    def ready(self) -> bool:
        """Whether the server takes connections."""
        import psycopg2

        try:
            connection = psycopg2.connect(
                host="127.0.0.1",
                port=self.port,
                user=DB_USER,
                password=self.password,
                dbname="postgres",
                connect_timeout=2,
            )
        except psycopg2.Error:
            return False
        connection.close()
        return True

    def start(self) -> None:
        """Initialise the cluster once, start it in the background, and create the databases
        it lacks."""
        self.init()
        options = " ".join(self.options())
        log = f"{self.data}/postgres.log"
        start = ["-D", str(self.data), "-l", log, "-o", options, "-w", "-t", "60", "start"]
        self._run("pg_ctl", start, "pg_ctl start")
        self.create_databases()

    def create_databases(self) -> None:
        """Create the databases the cluster lacks."""
        import psycopg2

        server = {"host": "127.0.0.1", "port": self.port, "user": DB_USER}
        connection = psycopg2.connect(**server, password=self.password, dbname="postgres")
        try:
            connection.autocommit = True
            with connection.cursor() as cursor:
                for name in DATABASES:
                    cursor.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,))
                    if cursor.fetchone() is None:
                        cursor.execute(f'CREATE DATABASE "{name}"')
        finally:
            connection.close()

    def postmaster(self) -> int | None:
        """The running server's pid, by its pid file; None when none runs (a pid file a killed
        server left says nothing)."""
        try:
            pid = int((self.data / "postmaster.pid").read_text().split()[0])
            os.kill(pid, 0)
        except (OSError, ValueError, IndexError):
            return None
        return pid

    def stop(self) -> None:
        """Stop the cluster (fast shutdown), if it runs."""
        if self.postmaster() is None:
            return
        stop = ["-D", str(self.data), "-m", "fast", "-w", "stop"]
        self._run("pg_ctl", stop, "pg_ctl stop")

    def environment(self) -> dict[str, str]:
        """What a client needs besides the URL."""
        return {"PGPASSWORD": self.password}
