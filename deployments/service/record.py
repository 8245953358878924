"""What a running `textgen serve` says about itself (`serve.json` in the data folder): its pid,
its receiver URLs, deployments, the Prefect API and the MLflow UI it serves. Read by `textgen
status`, and by every command, whose links then open the UI serve serves."""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any

from tasks import config
from tasks.config import data_dir
from tasks.files import write_atomic


def service_file() -> Path:
    """Written by `textgen serve` once it takes pushes."""
    return data_dir() / "serve.json"


def record_service(info: dict[str, Any]) -> None:
    """Say that serve is up (called by serve once its receiver listens)."""
    write_atomic(service_file(), json.dumps({"pid": os.getpid(), **info}))


def forget_service() -> None:
    """Serve is stopping."""
    with contextlib.suppress(OSError):
        service_file().unlink()


def running_service() -> dict[str, Any] | None:
    """What serve recorded, if the process that recorded it still runs."""
    try:
        info = json.loads(service_file().read_text())
        os.kill(int(info["pid"]), 0)
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return dict(info)


def served_ui() -> dict[str, str]:
    """The MLflow UI that a running serve of this data folder serves, as the override a
    command's links follow; nothing when the UI is set, the store is a tracking server, or
    serve is not running."""
    store = os.environ.get("MLFLOW_TRACKING_URI", "")
    if config.MLFLOW_UI_URL.is_set() or store.startswith(("http://", "https://")):
        return {}
    url = str((running_service() or {}).get("mlflow_ui") or "").rstrip("/")
    return {config.MLFLOW_UI_URL.name: url} if url else {}
