"""The team's processes under supervisord (PyPI's `supervisor`): each program restarted when it
dies (with supervisord's back-off), stopped with its whole process group, and asked for by name.

`Supervisor.write` turns `Program`s into `supervisord.conf` in the team's home; every program
starts only when asked (`start`), so that the team can start them in order and wait for each to
be healthy, as compose.yaml's `depends_on: service_healthy` does; from then on supervisord keeps
it running (`autorestart`, as compose's `restart: unless-stopped`). supervisord itself runs with
no secrets in its environment: a program's environment is written to a file of its own (mode
0600) that `python -m deployments.ops.supervisor exec FILE -- COMMAND` reads before it becomes
the program (exec: the pid supervisord watches is the program's). Every such environment holds
`TEXTGEN_TEAM_HOME`, by which `stop_marked` finds what is left of a team whose supervisord died.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from deployments.ops.process import Child, wait_until
from tasks import config
from tasks.errors import ServeError
from tasks.files import write_atomic

RPC_FACTORY = "supervisor.rpcinterface:make_main_rpcinterface"
MARKER = config.TEAM_HOME.name
"""In every program's environment: the team's home, to find its processes by."""


@dataclass
class Program:
    """One supervised process."""

    name: str
    command: list[str]
    env: dict[str, str] | None = None
    """Its whole environment (None: supervisord's, for a program that needs nothing else)."""
    priority: int = 50
    """Start order for supervisord, and stop order reversed: low first."""
    user: str | None = None
    stopsignal: str = "TERM"
    directory: Path | None = None


class Supervisor:
    """supervisord for one team home: its configuration, its process, and its XML-RPC API on a
    unix socket in the home."""

    def __init__(self, home: Path) -> None:
        self.home = home
        self.conf = home / "supervisord.conf"
        self.socket = home / "supervisor.sock"
        self.logs = home / "logs"
        self.child: Child | None = None

    def log(self, name: str) -> Path:
        """Where a program's output goes."""
        return self.logs / f"{name}.log"

    def write(self, programs: list[Program]) -> None:
        """Write `supervisord.conf` (and each program's environment file)."""
        self.logs.mkdir(parents=True, exist_ok=True)
        envs = self.home / "env"
        envs.mkdir(mode=0o700, exist_ok=True)
        sections = [
            ("unix_http_server", {"file": str(self.socket), "chmod": "0700"}),
            (
                "supervisord",
                {
                    "logfile": str(self.logs / "supervisord.log"),
                    "pidfile": str(self.home / "supervisord.pid"),
                    "childlogdir": str(self.logs),
                    "nodaemon": "true",
                    "silent": "true",
                },
            ),
            (
                "rpcinterface:supervisor",
                {"supervisor.rpcinterface_factory": RPC_FACTORY},
            ),
            ("supervisorctl", {"serverurl": f"unix://{self.socket}"}),
        ]
        for program in programs:
            command = program.command
            if program.env is not None:
                env_file = envs / f"{program.name}.json"
                environment = {**program.env, MARKER: str(self.home)}
                _write_private(env_file, json.dumps(environment))
                command = [sys.executable, "-m", __name__, "exec", str(env_file), "--", *command]
            options = {
                "command": shlex.join(command),
                "autostart": "false",
                "autorestart": "true",
                "startsecs": "3",
                "startretries": "1000",
                "stopasgroup": "true",
                "killasgroup": "true",
                "stopwaitsecs": "30",
                "stopsignal": program.stopsignal,
                "priority": str(program.priority),
                "redirect_stderr": "true",
                "stdout_logfile": str(self.log(program.name)),
                "stdout_logfile_maxbytes": "50MB",
                "stdout_logfile_backups": "2",
                **({"user": program.user} if program.user else {}),
                **({"directory": str(program.directory)} if program.directory else {}),
            }
            sections.append((f"program:{program.name}", options))
        text = "\n".join(
            f"[{title}]\n" + "".join(f"{k}={_escape(v)}\n" for k, v in options.items())
            for title, options in sections
        )
        write_atomic(self.conf, text)

    def start(self, env: dict[str, str]) -> None:
        """Start supervisord (no program yet) and wait for its API."""
        self.socket.unlink(missing_ok=True)
        command = [sys.executable, "-m", "supervisor.supervisord", "-c", str(self.conf)]
        self.child = Child("supervisord", command, env, self.logs / "supervisord.out")
        self.child.start()
        wait_until(self._answers, 60, "supervisord", self.child)

    def _answers(self) -> bool:
        try:
            return bool(self.call("getState")["statename"] == "RUNNING")
        except (OSError, ServeError):
            return False

    def call(self, method: str, *args: Any) -> Any:
        """One call of supervisord's XML-RPC API (`supervisor.<method>`), on a connection of
        its own; OSError when supervisord does not answer."""
        from xmlrpc.client import ServerProxy

        from supervisor.xmlrpc import SupervisorTransport

        transport = SupervisorTransport(None, None, f"unix://{self.socket}")
        with ServerProxy("http://127.0.0.1", transport=transport) as proxy:
            return getattr(proxy.supervisor, method)(*args)

    def start_program(self, name: str) -> None:
        """Start a program (waits until supervisord counts it started)."""
        from xmlrpc.client import Fault

        try:
            self.call("startProcess", name, True)
        except Fault as fault:
            if "ALREADY_STARTED" not in fault.faultString:
                raise ServeError(
                    f"supervisord could not start {name}: {fault.faultString}; see {self.log(name)}"
                ) from None

    def info(self, name: str) -> dict[str, Any]:
        """supervisord's record of a program: `statename`, `pid`, `exitstatus`, ..."""
        return dict(self.call("getProcessInfo", name))

    def pid(self, name: str) -> int:
        """A program's pid now (0 while it is not running)."""
        try:
            return int(self.info(name)["pid"])
        except (OSError, ServeError):
            return 0

    def states(self) -> dict[str, str]:
        """Every program's state, by name."""
        return {p["name"]: p["statename"] for p in self.call("getAllProcessInfo")}

    def shutdown(self, timeout: float = 120) -> bool:
        """Stop every program (in reverse priority order) and supervisord; False when it was
        not answering."""
        try:
            self.call("shutdown")
        except OSError:
            if self.child is not None:  # ours, and dead or deaf: reaped, its group stopped
                self.child.stop(grace=5)
            return False
        if self.child is not None and self.child.process is not None:
            with contextlib.suppress(Exception):
                self.child.process.wait(timeout=timeout)
            self.child.stop(grace=5)
        else:
            deadline = time.monotonic() + timeout
            while self.socket.exists() and self._answers() and time.monotonic() < deadline:
                time.sleep(0.3)
        return True


def _write_private(path: Path, text: str) -> None:
    """Write a file only its owner may read (it holds secrets), replacing it whole."""
    temporary = path.with_name(f"{path.name}.tmp")
    temporary.unlink(missing_ok=True)
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(text)
    os.replace(temporary, path)


def _escape(value: str) -> str:
    """A value for supervisord's configuration, which expands `%(name)s`."""
    return value.replace("%", "%%").replace("\n", " ")


def marked(home: Path) -> list[int]:
    """The processes whose environment names `home` as their team's (this user's)."""
    wanted = f"{MARKER}={home}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            environ = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if wanted in environ:
            found.append(int(entry.name))
    return found


def stop_marked(home: Path, grace: float = 30) -> int:
    """SIGTERM, then SIGKILL after `grace`, the process groups of `home`'s team processes that
    outlived their supervisord. Returns how many groups were signalled."""
    groups = set()
    for pid in marked(home):
        with contextlib.suppress(OSError):
            groups.add(os.getpgid(pid))
    for group in groups:
        with contextlib.suppress(OSError):
            os.killpg(group, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while marked(home) and time.monotonic() < deadline:
        time.sleep(0.2)
    for group in groups:
        with contextlib.suppress(OSError):
            os.killpg(group, signal.SIGKILL)
    return len(groups)


def main(argv: list[str]) -> None:
    """`exec ENV_FILE -- COMMAND...`: become COMMAND with the environment the file holds."""
    if len(argv) < 4 or argv[0] != "exec" or argv[2] != "--":
        raise SystemExit("usage: python -m deployments.ops.supervisor exec ENV_FILE -- COMMAND")
    env = json.loads(Path(argv[1]).read_text())
    os.execvpe(argv[3], argv[3:], env)


if __name__ == "__main__":
    main(sys.argv[1:])
