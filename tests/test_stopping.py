"""Stopping: `textgen serve` and `textgen ui` end with every process they started (the runs' fork
servers, the Prefect server, the MLflow server and its workers), none left orphaned. How long
it takes is measured by `benchmarks/serve_footprint.py`."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import httpx
import pytest

from deployments.ops.process import free_port
from tests.conftest import settings_yaml
from tests.servers import (
    PrefectServer,
    Service,
    bare_origin,
    process_tree,
    start_serve,
    still_running,
    wait_for,
)

pytestmark = [pytest.mark.server, pytest.mark.slow]  # servers started and stopped


def stop_and_check(service: Service) -> None:
    assert service.process is not None
    started = process_tree(service.process.pid)
    assert len(started) > 2, started
    os.kill(service.process.pid, signal.SIGTERM)
    service.process.wait(60)
    deadline = time.monotonic() + 15
    while still_running(started) and time.monotonic() < deadline:
        time.sleep(0.2)
    left = {pid: Path(f"/proc/{pid}/cmdline").read_bytes()[:120] for pid in still_running(started)}
    assert not left, left


def test_serve_ends_with_every_process_it_started(
    tmp_path: Path, tiny_model: Path, shared_model_cache: Path
) -> None:
    spec = "on:\n  github:\n    branches:\n      only: main\n"
    _, bare = bare_origin(
        tmp_path, {"textgen.yaml": settings_yaml(tiny_model), ".gradient/workflows/w.yaml": spec}
    )
    prefect = PrefectServer(tmp_path / "prefect")
    prefect.start()
    try:
        service, _, _ = start_serve(
            tmp_path, bare, prefect, "s3cret", str(shared_model_cache), ui_port=free_port()
        )
        try:
            wait_for(lambda: "MLflow UI on" in service.output(), 120, "serve's MLflow UI")
            stop_and_check(service)
        finally:
            service.stop()
    finally:
        prefect.stop()


def test_textgen_ui_ends_with_the_mlflow_server_and_its_workers(tmp_path: Path) -> None:
    port = free_port()
    ui = Service.textgen(["ui", "--port", str(port)], dict(os.environ), tmp_path / "ui.log")
    try:
        wait_for(
            lambda: _healthy(f"http://127.0.0.1:{port}/health") or not ui.alive(),
            120,
            "the MLflow UI",
        )
        assert ui.alive(), ui.output()
        stop_and_check(ui)
        assert ui.process is not None and ui.process.returncode == 0, ui.output()
    finally:
        ui.stop()


def _healthy(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False
