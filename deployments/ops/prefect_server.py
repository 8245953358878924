"""Which Prefect API a process talks to, and the local Prefect server when it is ours to run.

- `PREFECT_API_URL`, when set, always wins.
- A long-running service (`textgen serve`, `textgen receive`) otherwise supervises a local
  `prefect server start` with its data in the data folder: `service_api`.
- A one-shot command uses the server serve supervises when one is up, else a temporary one of
  its own, as a bare flow call would: `use_command_api`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

from deployments.ops.process import (
    STOP_GRACE,
    Child,
    command_line,
    free_port,
    healthy,
    stop_pid,
    wait_until,
)
from tasks import config
from tasks.config import data_dir
from tasks.files import file_lock, write_atomic

logger = logging.getLogger(__name__)

SERVER_SETTINGS = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    # The deployments' concurrency leases on disk (under the server's PREFECT_HOME), not in its
    # memory: a server killed and started again still knows which run holds a slot, where one
    # that forgot cancels a run starting then ("Deployment concurrency slot lost during
    # provisioning": a push lost, seen in benchmarks/team_faults.py).
    "PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE": (
        "prefect.server.concurrency.lease_storage.filesystem"
    ),
}
"""What every Prefect server the project runs is set to: serve's, the team's, compose's."""


def prefect_home() -> Path:
    """Where the embedded Prefect server keeps its database and logs."""
    return data_dir() / "prefect"


def _is_prefect_server(pid: int) -> bool:
    """Whether `pid` is (still) a `prefect server start` process, not a reused pid."""
    command = command_line(pid)
    return b"prefect" in command and b"server" in command and b"start" in command


def _recorded_server(home: Path) -> tuple[int, str] | None:
    """The pid and API URL of the local server recorded in `home`, if it is up and healthy."""
    try:
        info = json.loads((home / "server.json").read_text())
        pid, url = int(info["pid"]), str(info["url"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return (pid, url) if _is_prefect_server(pid) and healthy(url) else None


def running_local_server() -> str | None:
    """The API URL of a local server that `textgen serve` supervises, if one is up."""
    found = _recorded_server(prefect_home())
    return None if found is None else found[1]


def known_api() -> str | None:
    """`PREFECT_API_URL`, else the local server `textgen serve` supervises, if it is up."""
    return os.environ.get("PREFECT_API_URL") or running_local_server()


class LocalPrefectServer:
    """A `prefect server start` child process on 127.0.0.1, restarted if it dies; its data
    (SQLite database, log, and `server.json` while it runs) live in `home`."""

    def __init__(self, port: int = 4200, home: Path | None = None) -> None:
        self.home = home or prefect_home()
        self.port = free_port(port)
        self.url = f"http://127.0.0.1:{self.port}/api"
        self.child: Child | None = None
        self.pid = 0
        """The server's pid: our child's, or that of an adopted server."""
        self.stopping = threading.Event()  # a new one for each start

    def environment(self) -> dict[str, str]:
        """The server's environment: ours less the secrets it never needs, with its home and URL."""
        return {
            **config.without_secrets(os.environ),
            **SERVER_SETTINGS,
            "PREFECT_HOME": str(self.home),
            "PREFECT_API_URL": self.url,
        }

    def _spawn(self) -> None:
        self.home.mkdir(parents=True, exist_ok=True)
        command = [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1"]
        command += ["--port", str(self.port)]
        log = self.home / "server.log"
        self.child = Child("prefect-server", command, self.environment(), log).start()
        self.pid = self.child.pid

    def healthy(self) -> bool:
        """Whether the API answers its health check."""
        return healthy(self.url)

    def _adopt(self) -> bool:
        """Take over a server an earlier service of this data folder started and left running
        (it was killed): the same process, port and data, rather than a second server."""
        found = _recorded_server(self.home)
        if found is None:
            return False
        self.pid, self.url = found
        self.port = int(self.url.rsplit(":", 1)[1].split("/", 1)[0])
        logger.info("Prefect server of an earlier service still runs (pid %d); using it", self.pid)
        return True

    def _record(self) -> None:
        write_atomic(self.home / "server.json", json.dumps({"url": self.url, "pid": self.pid}))

    def start(self, timeout: float = 120.0, adopt: bool = False) -> None:
        """Start the server (again, on the same port and data) and wait until it answers; with
        `adopt`, use a server an earlier service of this data folder left running instead."""
        self.stopping = threading.Event()
        if not (adopt and self._adopt()):
            self._spawn()
            try:
                wait_until(self.healthy, timeout, f"prefect server on {self.url}", self.child)
            except BaseException:
                self.stop()
                raise
        self._record()
        threading.Thread(
            target=self._supervise, args=(self.stopping,), name="prefect-server-watch", daemon=True
        ).start()
        logger.info("Prefect server on %s (UI: http://127.0.0.1:%d)", self.url, self.port)

    def _alive(self) -> bool:
        return self.child.alive() if self.child is not None else _is_prefect_server(self.pid)

    def _supervise(self, stopping: threading.Event) -> None:
        while not stopping.wait(2.0):
            if self.pid and not self._alive():
                logger.warning("Prefect server (pid %d) exited; restarting it", self.pid)
                self._spawn()
                with contextlib.suppress(OSError):
                    self._record()

    def stop(self) -> None:
        """Stop the server we started or adopted (by its pid), then forget it."""
        self.stopping.set()
        with contextlib.suppress(OSError):
            (self.home / "server.json").unlink()
        child, pid = self.child, self.pid
        self.child, self.pid = None, 0
        if child is not None:
            child.stop(grace=STOP_GRACE)
        elif pid:
            stop_pid(pid, _is_prefect_server, grace=STOP_GRACE)


def use_api_url(url: str | None) -> None:
    """Point this process (and the processes it starts) at a Prefect API, or at none."""
    if url is None:
        os.environ.pop("PREFECT_API_URL", None)
    else:
        os.environ["PREFECT_API_URL"] = url
    # Prefect reads its settings when imported; take the change into its global context.
    from prefect.context import refresh_global_settings_context

    refresh_global_settings_context()


@contextlib.contextmanager
def service_api(port: int = 4200) -> Iterator[str]:
    """For a service: `PREFECT_API_URL` when set; else a supervised local server, started (or
    adopted) here and stopped with the block."""
    if explicit := os.environ.get("PREFECT_API_URL"):
        yield explicit
        return
    server = LocalPrefectServer(port)
    server.start(adopt=True)
    use_api_url(server.url)
    try:
        yield server.url
    finally:
        use_api_url(None)
        server.stop()


def use_command_api() -> None:
    """For a one-shot command: record runs on the Prefect server `textgen serve` supervises,
    when one is up; else on a temporary server of this command, started under a lock."""
    if os.environ.get("PREFECT_API_URL"):
        return
    if url := running_local_server():
        use_api_url(url)
        return
    from prefect.server.api.server import SubprocessASGIServer
    from prefect.settings import PREFECT_HOME

    # Temporary servers of concurrent commands share Prefect's database: one at a time creates
    # or migrates it, with time to do so on a busy machine; this command's flow then uses it.
    with file_lock(Path(PREFECT_HOME.value()) / "textgen-temporary-server.lock"):
        SubprocessASGIServer().start(timeout=180)
