"""Processes the integration tests start: a Prefect server and `textgen` services, on 127.0.0.1.

Each is stopped by its own pid; every wait is bounded.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from deployments.ops.prefect_server import LocalPrefectServer
from deployments.ops.process import free_port
from tests.conftest import GitRepo


def wait_for(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.5) -> Any:
    """Poll until `predicate()` is truthy; fail naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


def _stop(process: subprocess.Popen[bytes] | None, timeout: float = 30) -> None:
    if process is None or process.poll() is not None:
        return
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=10)


def process_tree(root: int) -> set[int]:
    """`root` and every process descended from it, in any session (by parent pid)."""
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


def still_running(pids: set[int]) -> set[int]:
    """Those of `pids` still running (a zombie has ended)."""
    running = set()
    for pid in pids:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z":
            running.add(pid)
    return running


def textgen_process(
    *args: str, cwd: Path | None = None, harness_api: bool = True, timeout: float = 600
) -> subprocess.CompletedProcess[str]:
    """`textgen ARGS` in a process of its own, on the Prefect API of the test harness (the
    module's `prefect_harness`), or without `harness_api` on a temporary server of its own, as
    a first `textgen run` is."""
    from prefect.settings import PREFECT_API_URL

    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    if harness_api:
        env["PREFECT_API_URL"] = str(PREFECT_API_URL.value())
    return subprocess.run(
        [sys.executable, "-m", "deployments.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=cwd,
        env=env,
    )


def set_hook(bare: Path, enabled: bool) -> None:
    """Let a bare repository's installed hooks run, or point git at none of them."""
    if enabled:
        subprocess.run(["git", "config", "--unset", "core.hooksPath"], cwd=bare, check=False)
    else:
        subprocess.run(["git", "config", "core.hooksPath", "/nonexistent"], cwd=bare, check=True)


def bare_origin(root: Path, files: dict[str, str | None]) -> tuple[GitRepo, Path]:
    """A work repository under `root` with one commit of `files`, and its bare clone
    (`origin.git`) as its `origin`, main tracking origin/main."""
    work = GitRepo(root / "work")
    work.commit(files, "initial")
    bare = root / "origin.git"
    subprocess.run(["git", "clone", "--quiet", "--bare", str(work.path), str(bare)], check=True)
    work.git("remote", "add", "origin", str(bare))
    work.git("fetch", "--quiet", "origin")
    work.git("branch", "--quiet", "--set-upstream-to=origin/main", "main")
    return work, bare


def deliver(
    url: str,
    secret: str,
    payload: dict[str, Any],
    event: str = "push",
    delivery: str | None = None,
    signature: str | None = None,
) -> httpx.Response:
    """POST a GitHub-style delivery, signed with `secret` unless `signature` is given
    (an empty `signature` sends none)."""
    from deployments.service.providers import sign

    body = json.dumps(payload).encode()
    headers = {
        "X-GitHub-Event": event,
        "X-GitHub-Delivery": delivery or str(uuid.uuid4()),
        "Content-Type": "application/json",
    }
    if signature is None:
        headers["X-Hub-Signature-256"] = sign(secret.encode(), body)
    elif signature:
        headers["X-Hub-Signature-256"] = signature
    return httpx.post(url, content=body, headers=headers, timeout=10)


class PrefectServer(LocalPrefectServer):
    """`prefect server start` on a free port with its data in `home`, so it can be restarted."""

    def __init__(self, home: Path) -> None:
        super().__init__(port=free_port(), home=home)

    def _spawn(self) -> None:
        # A new server starts on a copy of the test run's migrated database (conftest).
        template = os.environ.get("TEXTGEN_TEST_PREFECT_DB")
        if template and not (self.home / "prefect.db").exists():
            self.home.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(template, self.home / "prefect.db")
        super()._spawn()

    @property
    def api_url(self) -> str:
        return self.url

    def flow_runs(self, deployment_name: str | None = None) -> list[dict[str, Any]]:
        """Flow runs (all, or of one deployment), as the API returns them."""
        body: dict[str, Any] = {"limit": 200}
        if deployment_name:
            deployment = httpx.get(
                f"{self.api_url}/deployments/name/{deployment_name}", timeout=10
            ).json()
            body["deployments"] = {"id": {"any_": [deployment["id"]]}}
        response = httpx.post(f"{self.api_url}/flow_runs/filter", json=body, timeout=10)
        response.raise_for_status()
        return list(response.json())


class Service:
    """A command running in the background, with its output in a log file."""

    @classmethod
    def textgen(cls, args: list[str], env: dict[str, str], log: Path) -> Service:
        """`textgen ARGS` in the background."""
        return cls([sys.executable, "-m", "deployments.cli", *args], env, log)

    def __init__(
        self, command: list[str], env: dict[str, str], log: Path, cwd: Path | None = None
    ) -> None:
        self.log = log
        self.env = env
        handle = open(log, "ab")  # noqa: SIM115 - handed to the child
        self.process: subprocess.Popen[bytes] | None = subprocess.Popen(
            command,
            env=env,
            cwd=cwd,
            stdout=handle,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        handle.close()

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self) -> None:
        _stop(self.process, timeout=60)
        self.process = None


def start_serve(
    root: Path,
    bare: Path,
    prefect: PrefectServer,
    secret: str,
    model_cache: str,
    extra_env: dict[str, str] | None = None,
    ui_port: int = 0,
    links: Path | None = None,
    deployment: str = "on-push",
) -> tuple[Service, str, str]:
    """`textgen serve` for a bare repository (data under `root`), with the hook installed,
    and the MLflow UI on `ui_port` (0: none); or, with `links`, for that links file (whose
    link for the bare repository is named `deployment`).

    Returns the service, the receiver's GitHub endpoint and the MLflow tracking URI.
    """
    from deployments.hook import install

    port = free_port()
    tracking_uri = f"sqlite:///{root / 'mlflow.db'}"
    env = {
        **os.environ,
        "PREFECT_API_URL": prefect.api_url,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "TEXTGEN_HOME": str(root / "home"),
        "TEXTGEN_MODEL_CACHE": model_cache,
        # The models the tests build sit beside `root`; the offline one in the model cache.
        "TEXTGEN_MODEL_DIRS": f"{root.parent}{os.pathsep}{model_cache}",
        "MLFLOW_TRACKING_URI": tracking_uri,
        "TEXTGEN_ARTIFACT_ROOT": (root / "artifacts").as_uri(),
        "TEXTGEN_WEBHOOK_SECRET": secret,
        **(extra_env or {}),
    }
    # A log of its own per start: a restart must not be taken as up from the last one's lines.
    log = next(
        root / f"serve-{n}.log" for n in range(1, 1000) if not (root / f"serve-{n}.log").exists()
    )
    served = ["--links", str(links)] if links else ["--repo", str(bare)]
    args = ["serve", *served, "--port", str(port), "--ui-port", str(ui_port)]
    service = Service.textgen(args, env, log)
    try:
        wait_for(
            lambda: (
                f"Serving nlp-text-generation/{deployment}" in service.output()
                or not service.alive()
            ),
            120,
            "textgen serve to start",
        )
        assert service.alive(), service.output()
        receiver_url = f"http://127.0.0.1:{port}/webhooks/github"
        secret_file = root / "secret"
        secret_file.write_text(secret)
        install(bare, receiver_url, secret_file)
    except BaseException:
        service.stop()
        raise
    return service, receiver_url, tracking_uri
