"""Local processes, written once: a child in a session of its own, a wait until it is ready, a
free port, and an HTTP health check.

Every process is stopped by its own pid: SIGTERM to its process group, then SIGKILL when it
outlives its grace, so a server and the workers it started end together.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Protocol
from urllib.error import URLError
from urllib.request import urlopen

from tasks.errors import PortInUseError, ServeError

STOP_GRACE = 3.0
"""Seconds a server gets to exit on SIGTERM before SIGKILL, when a service stops."""

_started: set[Child] = set()
"""The children of this process still running (`terminate_children`)."""


def terminate_children() -> None:
    """SIGTERM every child this process started and has not stopped, all at once: a service
    that is stopping lets its servers wind down while it winds down itself."""
    for child in list(_started):
        child.terminate()


class Child:
    """A server or worker process in a session of its own, its output appended to its log."""

    def __init__(
        self, name: str, command: list[str], env: dict[str, str], log: Path, cwd: Path | None = None
    ) -> None:
        self.name = name
        self.command = command
        self.env = env
        self.log = log
        self.cwd = cwd
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        """The process id (0 before the start)."""
        return self.process.pid if self.process else 0

    def start(self) -> Child:
        """Start the process; a Ctrl-C of ours does not reach it (we stop it in order)."""
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log, "ab") as out:
            self.process = subprocess.Popen(
                self.command,
                env=self.env,
                cwd=self.cwd,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        _started.add(self)
        return self

    def terminate(self) -> None:
        """SIGTERM its process group (the server and the workers it started); no wait."""
        if self.alive():
            assert self.process is not None
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGTERM)

    def alive(self) -> bool:
        """Whether it still runs."""
        return self.process is not None and self.process.poll() is None

    @property
    def returncode(self) -> int | None:
        """Its exit status once it has ended (None while it runs, or before it starts)."""
        return None if self.process is None else self.process.poll()

    def tail(self, lines: int = 30) -> str:
        """The end of its log."""
        return tail(self.log, lines)

    def stop(self, grace: float = 30) -> None:
        """SIGTERM its process group, then SIGKILL what is left after `grace` seconds."""
        _started.discard(self)
        if not self.alive():
            return
        assert self.process is not None
        self.terminate()
        try:
            self.process.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            self.kill()
        # A worker of the server may outlive it in the group: nothing of it is left running.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)

    def kill(self) -> None:
        """SIGKILL its whole process group (a worker and the flow run it started), as a machine
        that dies would end them."""
        _started.discard(self)
        if self.process is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=10)


def stop_pid(pid: int, ours: Callable[[int], bool], grace: float = 30) -> bool:
    """Stop a process group we started earlier and know only by its pid (recorded in a file),
    while `ours(pid)` says the pid is still that process. Returns whether it was running."""
    if not ours(pid):
        return False
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and ours(pid):
        time.sleep(0.2)
    if ours(pid):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)
    return True


def command_line(pid: int) -> list[bytes]:
    """The command line of a running process (empty when it is gone)."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return []


def tail(log: Path, lines: int = 30) -> str:
    """The end of a log file (empty when there is none)."""
    try:
        return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


class Watched(Protocol):
    """A process a wait watches: a `Child`, or one supervisord runs."""

    @property
    def log(self) -> Path: ...

    def alive(self) -> bool: ...

    def tail(self, lines: int = 30) -> str: ...


def wait_until(
    check: Callable[[], bool],
    seconds: float,
    what: str,
    process: Watched | None = None,
    interval: float = 0.3,
) -> None:
    """Poll `check()` until true; a ServeError naming `what` after `seconds`, or at once when
    `process` exits first (with the end of its log)."""
    deadline = time.monotonic() + seconds
    while not check():
        if process is not None and not process.alive():
            raise ServeError(f"{what} exited; see {process.log}:\n{process.tail()}")
        if time.monotonic() > deadline:
            log = f"; see {process.log}" if process is not None else ""
            raise ServeError(f"{what} did not come up within {seconds:.0f} s{log}")
        time.sleep(interval)


def free_port(preferred: int = 0) -> int:
    """`preferred` when nothing listens on it on 127.0.0.1, else any free port."""
    for port in dict.fromkeys((preferred, 0)):
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return int(sock.getsockname()[1])
    raise ServeError("no free local port")


def check_port_free(host: str, port: int, what: str, option: str) -> None:
    """Raise a clear error when `host:port` cannot be bound (another server holds it)."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            raise PortInUseError(
                f"cannot serve {what} on {host}:{port}: {exc.strerror or exc}. Another server "
                f"holds the port: stop it, or pick another with {option}"
            ) from None


def healthy(api_url: str, timeout: float = 2.0) -> bool:
    """Whether `api_url/health` answers 200."""
    try:
        with urlopen(f"{api_url}/health", timeout=timeout) as response:
            return bool(response.status == 200)
    except (URLError, OSError, ValueError):
        return False
