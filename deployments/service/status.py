"""`textgen status`: what `textgen serve` is doing, from the records it keeps.

Pushes in the receiver's outboxes, flow runs queued or running on the Prefect API, the last
version of each repository in MLflow, with links, and the failures of the repair loops.
`--wait` blocks until every push taken so far has been handled (its commit has a run that
ended), for scripts and walkthroughs.
"""

from __future__ import annotations

import functools
import os
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from deployments.ops.prefect_server import known_api
from deployments.orchestration.queries import active_runs
from deployments.reports.tables import render_rows
from deployments.service import outbox
from deployments.service.record import running_service
from tasks import versions
from tasks.config import data_dir, tracking_server
from tasks.errors import TextgenError, WaitTimeout
from tasks.names import AUTOMATIC_TRIGGERS, PREVIEW_TRIGGER
from tasks.store import Experiment, experiment_name, ui_base_url


@dataclass
class Status:
    """One look at the service."""

    prefect_api: str | None
    mlflow_ui: str
    service: dict[str, Any] | None = None
    pushes: list[dict[str, Any]] = field(default_factory=list)
    runs: list[dict[str, Any]] = field(default_factory=list)
    versions: list[dict[str, Any]] = field(default_factory=list)
    failures: dict[str, dict[str, Any]] = field(default_factory=dict)
    received_since_start: int | None = None
    """Pushes serve has received since it started (None when serve is not running)."""

    def as_dict(self) -> dict[str, Any]:
        """For `--json`."""
        return {
            "prefect_api": self.prefect_api,
            "mlflow_ui": self.mlflow_ui,
            "serve": self.service,
            "pushes": self.pushes,
            "runs": self.runs,
            "versions": self.versions,
            "repair_failures": self.failures,
            "received_since_start": self.received_since_start,
        }

    @property
    def busy(self) -> bool:
        """Whether serve is still starting (nothing takes pushes yet), a push waits to be
        handled, or a run is queued or going."""
        starting = self.service is None and not os.environ.get("PREFECT_API_URL")
        return starting or bool(self.runs) or any(not p["handled"] for p in self.pushes)


def _handled(repo: str, sha: str, preview: bool) -> bool:
    """Whether a push (or poll) run of commit `sha` of `repo` (for a pull request's head, its
    preview run) has ended in MLflow, whatever its outcome; an earlier manual run of the
    commit does not count."""
    try:
        experiment = Experiment.for_repo(repo, create=False)
    except TextgenError:
        return False
    wanted = {PREVIEW_TRIGGER} if preview else AUTOMATIC_TRIGGERS
    return versions.ended_run_of(experiment, sha, wanted)


@functools.cache
def _name(repo: str) -> str:
    """A repository's one name, as its experiment and versions are called."""
    try:
        return experiment_name(repo)
    except Exception:  # a repository gone from this machine: where it was
        return repo


def outbox_pushes(folder: Path | None = None) -> list[dict[str, Any]]:
    """The newest push of each repository and branch in the receivers' outboxes, and whether a
    run of it has ended; pushes still to be sent to Prefect count as queued."""
    return [
        {
            "repository": _name(push["repo"]),
            "branch": push["ref"].removeprefix("refs/heads/"),
            "commit": push["after"][:12],
            "received": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(push["received"])),
            "received_at": push["received"],
            "unsent": push["unsent"],
            "handled": push["status"] == "sent"
            and _handled(push["repo"], push["after"], not push["ref"].startswith("refs/heads/")),
        }
        for push in outbox.pushes(folder or data_dir() / "receiver")
    ]


def look() -> Status:
    """Everything `textgen status` shows."""
    service = running_service()
    api = known_api() or (service or {}).get("prefect_api")
    status = Status(api, (service or {}).get("mlflow_ui") or ui_base_url(), service)
    status.pushes = outbox_pushes()
    if service and service.get("started"):
        started = float(service["started"])
        status.received_since_start = sum(p["received_at"] >= started for p in status.pushes)
    status.failures = outbox.failures(data_dir() / "receiver")
    if api:
        status.runs = active_runs(api)
    if not tracking_server() or api:
        status.versions = versions.latest_per_repository()
    return status


def wait_until_idle(timeout: float, interval: float = 1.0) -> Status:
    """Look until no push waits and no run is queued or running, twice in a row."""
    deadline = time.monotonic() + timeout
    quiet = 0
    while True:
        status = look()
        quiet = 0 if status.busy else quiet + 1
        if quiet >= 2:
            return status
        if time.monotonic() > deadline:
            waiting = [r["name"] for r in status.runs] + [
                f"push {p['commit']}" for p in status.pushes if not p["handled"]
            ]
            raise WaitTimeout(
                f"still busy after {timeout:g} s: {', '.join(waiting) or 'unknown'}; "
                f"see `textgen status`"
            )
        time.sleep(interval)


NO_PUSH_SINCE_START = (
    "no push has reached serve since it started: if you pushed, the push did not get here "
    "(did `git push` succeed? Is the hook installed with `textgen hook install`, pointing at "
    "this receiver? `--poll` checks a remote that sends nothing)"
)


def render(status: Status) -> str:
    """The status for people."""
    lines = []
    service = status.service
    if service:
        lines.append(f"textgen serve: running (pid {service['pid']})")
        lines += [f"  receiver: {url}" for url in service.get("receivers", [])]
        lines += [f"  deployment: {name}" for name in service.get("deployments", [])]
    else:
        lines.append("textgen serve: not running with this data folder")
    if status.prefect_api:
        ui = status.prefect_api.rstrip("/").removesuffix("/api")
        lines.append(f"Prefect API: {status.prefect_api} (UI {ui})")
    else:
        lines.append("Prefect API: none (`textgen serve` is not running here)")
    lines.append(f"MLflow UI: {status.mlflow_ui}")
    table = [
        {
            "repository": p["repository"],
            "branch": p["branch"],
            "commit": p["commit"],
            "received": p["received"],
            "state": "handled" if p["handled"] else "queued",
        }
        for p in status.pushes
    ]
    runs = [
        f"  {r['state']:<10} {r['name']}  {r['repository']}@{r['commit']}  {r['url']}"
        for r in status.runs
    ]
    last = [
        f"  v{v['version']} ({v['commit']})  {v['repository']}  {v['url']}" for v in status.versions
    ]
    lines += ["", "Pushes (newest per branch):", render_rows(table, indent=2) or "  none received"]
    if status.received_since_start == 0:
        lines.append(f"  {NO_PUSH_SINCE_START}")
    lines += ["", "Runs queued or running:", *(runs or ["  none"])]
    lines += ["", "Last version per repository:", *(last or ["  none yet"])]
    if status.failures:
        lines += ["", "Repair loops that failed (each is tried again on its next pass):"]
        for loop, failed in sorted(status.failures.items()):
            when = datetime.fromtimestamp(failed["at"]).strftime("%Y-%m-%d %H:%M:%S")
            lines.append(f"  {loop}: {failed['count']} failures, last at {when}: {failed['last']}")
    return "\n".join(lines) + "\n"
