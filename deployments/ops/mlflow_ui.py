"""The MLflow UI on the embedded store: `textgen ui`, and a child of `textgen serve`.

The links `textgen` prints and records go to this UI (`tasks.store.ui_base_url`), so `serve`
starts it next to the Prefect server: every printed link works while serve runs.
"""

from __future__ import annotations

import logging
import os
import sys
import threading

from deployments.ops.process import STOP_GRACE, Child, check_port_free, healthy, wait_until
from tasks import config
from tasks.config import artifact_root, data_dir, tracking_uri
from tasks.errors import ServeError

logger = logging.getLogger(__name__)


def server_command(host: str, port: int) -> list[str]:
    """`mlflow server` on the store the runs are recorded in."""
    command = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", tracking_uri()]
    # One worker: one person's browser; each worker is a process holding MLflow.
    command += ["--host", host, "--port", str(port), "--workers", "1"]
    if root := artifact_root():
        command += ["--default-artifact-root", root]
    return command


def prepare(host: str, port: int, option: str) -> None:
    """Before the UI starts: its port is free, and the store exists (created once, under its
    lock, before the server opens it)."""
    from tasks.store import mlflow_client

    check_port_free(host, port, "the MLflow UI", option)
    mlflow_client()


class MlflowUI:
    """`mlflow server` as a child process of the service, stopped with it."""

    def __init__(self, host: str, port: int, option: str = "--ui-port (0: none)") -> None:
        self.host, self.port, self.option = host, port, option
        self.url = f"http://{host}:{port}"
        env = {
            # MLflow's job runner and its seven queue consumers (1.4 GB at idle) run jobs the
            # UI offers for GenAI judges and prompt optimisation, which no run here uses.
            "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
            **config.without_secrets(os.environ),
            "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
        }
        self.child = Child(
            "mlflow-ui", server_command(host, port), env, data_dir() / "mlflow-ui.log"
        )
        self.stopped = threading.Event()

    def start(self) -> None:
        """Start the server; a thread logs when it answers (runs do not wait for it)."""
        prepare(self.host, self.port, self.option)
        self.child.start()
        threading.Thread(target=self._announce, name="mlflow-ui-watch", daemon=True).start()

    def _announce(self, timeout: float = 120.0) -> None:
        try:
            wait_until(lambda: healthy(self.url), timeout, "the MLflow UI", self.child, 0.5)
        except ServeError as exc:
            if not self.stopped.is_set():  # stopped before it answered: nothing to say
                logger.error("%s", exc)
            return
        logger.info("MLflow UI on %s (the links runs print open here)", self.url)

    def stop(self) -> None:
        """Stop the server and its workers (its own process group)."""
        self.stopped.set()
        self.child.stop(grace=STOP_GRACE)
