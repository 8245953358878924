"""The MLflow UI on the embedded store: `textgen ui`, and a child of `textgen serve`.

The links `textgen` prints and records go to this UI (`tasks.tracking.ui_base_url`), so
`serve` starts it next to the Prefect server: every printed link works while serve runs.
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import threading
import time

from tasks.config import artifact_root, data_dir, tracking_uri
from tasks.errors import TextgenError

logger = logging.getLogger(__name__)

UI_URL_ENV = "TEXTGEN_MLFLOW_UI_URL"


class PortInUseError(TextgenError):
    """A port the command must listen on is taken."""

    exit_code = 6


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


def server_command(host: str, port: int) -> list[str]:
    """`mlflow server` on the store the runs are recorded in."""
    command = [
        sys.executable,
        "-m",
        "mlflow",
        "server",
        "--backend-store-uri",
        tracking_uri(),
        "--host",
        host,
        "--port",
        str(port),
        "--workers",
        "1",  # one person's browser; each worker is a process holding MLflow
    ]
    root = artifact_root()
    if root:
        command += ["--default-artifact-root", root]
    return command


class MlflowUI:
    """`mlflow server` as a child process of the service, stopped with it."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.url = f"http://{host}:{port}"
        self.process: subprocess.Popen[bytes] | None = None
        self.log = data_dir() / "mlflow-ui.log"

    def start(self) -> None:
        """Check the port, create the store once, start the server; a thread logs when it
        answers (runs do not wait for it)."""
        from tasks.tracking import mlflow_client

        check_port_free(self.host, self.port, "the MLflow UI", "--ui-port (0: none)")
        mlflow_client()  # creates a fresh store once, under its lock, before the server opens it
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(
                server_command(self.host, self.port),
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                env={**os.environ, "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"},
            )
        threading.Thread(target=self._announce, name="mlflow-ui-watch", daemon=True).start()

    def _announce(self, timeout: float = 120.0) -> None:
        from deployments.serve import healthy

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            process = self.process
            if process is None:
                return
            if process.poll() is not None:
                logger.error(
                    "The MLflow UI exited with code %s; see %s", process.returncode, self.log
                )
                return
            if healthy(self.url):
                logger.info("MLflow UI on %s (the links runs print open here)", self.url)
                return
            time.sleep(0.5)
        logger.warning("The MLflow UI did not answer on %s; see %s", self.url, self.log)

    def stop(self) -> None:
        """Stop the server and its workers (its own process group)."""
        from deployments.serve import stop_group

        process, self.process = self.process, None
        if process is not None:
            stop_group(process)
