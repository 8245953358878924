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
from tests.servers import PrefectServer, Service, bare_origin, start_serve, wait_for

pytestmark = [pytest.mark.server, pytest.mark.slow]  # servers started and stopped


def tree(root: int) -> set[int]:
    """`root` and its descendants (in any session), by parent pid."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    found, frontier = {root}, [root]
    while frontier:
        frontier = [c for p in frontier for c in children.get(p, [])]
        found.update(frontier)
    return found


def alive(pids: set[int]) -> set[int]:
    """Those still running (a zombie has ended)."""
    running = set()
    for pid in pids:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z":
            running.add(pid)
    return running


def stop_and_check(service: Service) -> None:
    assert service.process is not None
    started = tree(service.process.pid)
    assert len(started) > 2, started
    os.kill(service.process.pid, signal.SIGTERM)
    service.process.wait(60)
    deadline = time.monotonic() + 15
    while alive(started) and time.monotonic() < deadline:
        time.sleep(0.2)
    left = {pid: Path(f"/proc/{pid}/cmdline").read_bytes()[:120] for pid in alive(started)}
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
