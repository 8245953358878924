"""`textgen status`: what `textgen serve` is doing, from the records it keeps.

Pushes waiting in the receiver's outboxes, flow runs queued or running on the Prefect API, and
the last version of each repository in MLflow, with links. `--wait` blocks until every push
taken so far has been handled (its commit has a run that ended), for scripts and walkthroughs.
"""

from __future__ import annotations

import os
import sqlite3
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tasks.config import data_dir, running_service, tracking_uri
from tasks.errors import TextgenError
from tasks.triggers import AUTOMATIC_TRIGGERS, PREVIEW_TRIGGER

ACTIVE_STATES = ("SCHEDULED", "PENDING", "RUNNING", "CANCELLING", "PAUSED")


class WaitTimeout(TextgenError):
    """`textgen status --wait` gave up."""

    exit_code = 7


@dataclass
class Status:
    """One look at the service."""

    prefect_api: str | None
    mlflow_ui: str
    service: dict[str, Any] | None = None
    pushes: list[dict[str, Any]] = field(default_factory=list)
    runs: list[dict[str, Any]] = field(default_factory=list)
    versions: list[dict[str, Any]] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        """For `--json`."""
        return {
            "prefect_api": self.prefect_api,
            "mlflow_ui": self.mlflow_ui,
            "serve": self.service,
            "pushes": self.pushes,
            "runs": self.runs,
            "versions": self.versions,
        }

    @property
    def busy(self) -> bool:
        """Whether serve is still starting (nothing takes pushes yet), a push waits to be
        handled, or a run is queued or going."""
        starting = self.service is None and not os.environ.get("PREFECT_API_URL")
        return starting or bool(self.runs) or any(not p["handled"] for p in self.pushes)


def prefect_api() -> str | None:
    """`PREFECT_API_URL`, else the local server `textgen serve` supervises, if it is up."""
    from deployments.serve import running_local_server

    return os.environ.get("PREFECT_API_URL") or running_local_server()


def _ui_base(api_url: str) -> str:
    return api_url.rstrip("/").removesuffix("/api")


def active_runs(api_url: str) -> list[dict[str, Any]]:
    """The flow runs of nlp-text-generation not yet ended, oldest first."""
    import httpx

    body = {
        "flows": {"name": {"any_": ["nlp-text-generation"]}},
        "flow_runs": {"state": {"type": {"any_": list(ACTIVE_STATES)}}},
        "sort": "EXPECTED_START_TIME_ASC",
        "limit": 200,
    }
    response = httpx.post(f"{api_url.rstrip('/')}/flow_runs/filter", json=body, timeout=10)
    response.raise_for_status()
    base = _ui_base(api_url)
    runs = []
    for run in response.json():
        params = run.get("parameters") or {}
        state = run.get("state") or {}
        runs.append(
            {
                "name": run.get("name"),
                "state": state.get("name") or state.get("type"),
                "repository": params.get("repo_url"),
                "commit": str(params.get("commit_sha") or params.get("branch") or "")[:12],
                "trigger": params.get("trigger", "manual"),
                "url": f"{base}/runs/flow-run/{run['id']}",
            }
        )
    return runs


def _ended_run_for(repo: str, sha: str, preview: bool = False) -> bool:
    """Whether a push (or poll) run of commit `sha` of `repo` (for a pull request's head, its
    preview run) has ended in MLflow, whatever its outcome; an earlier manual run of the
    commit does not count."""
    from tasks.tracking import TAG_COMMIT, TAG_TRIGGER, Tracker

    try:
        tracker = Tracker.for_repo(repo, create=False)
    except TextgenError:
        return False
    found = tracker.client.search_runs(
        [tracker.experiment_id],
        f"tags.`{TAG_COMMIT}` = '{sha}' and attributes.status != 'RUNNING'",
        max_results=50,
    )
    wanted = {PREVIEW_TRIGGER} if preview else AUTOMATIC_TRIGGERS
    return any(run.data.tags.get(TAG_TRIGGER) in wanted for run in found)


def outbox_pushes(folder: Path | None = None) -> list[dict[str, Any]]:
    """The newest push of each repository and branch in the receivers' outboxes, and whether a
    run of it has ended; pushes still to be sent to Prefect count as queued."""
    folder = folder or data_dir() / "receiver"
    pushes = []
    for path in sorted(folder.glob("*.sqlite")):
        try:
            with sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10) as db:
                rows = db.execute(
                    "SELECT repo, ref, after, status, received_at FROM deliveries "
                    "WHERE status IN ('pending', 'sent') ORDER BY received_at DESC LIMIT 500"
                ).fetchall()
        except sqlite3.Error:
            continue
        newest: dict[tuple[str, str], tuple[str, str, float, int]] = {}
        for repo, ref, after, status, received in rows:
            key = (repo, ref)
            waiting = 1 if status == "pending" else 0
            if key not in newest:
                newest[key] = (after, status, received, waiting)
            else:
                a, s, r, w = newest[key]
                newest[key] = (a, s, r, w + waiting)
        for (repo, ref), (after, status, received, waiting) in newest.items():
            pushes.append(
                {
                    "repository": repo,
                    "branch": ref.removeprefix("refs/heads/"),
                    "commit": after[:12],
                    "received": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(received)),
                    "unsent": waiting,
                    "handled": status == "sent"
                    and _ended_run_for(repo, after, not ref.startswith("refs/heads/")),
                }
            )
    return pushes


def last_versions() -> list[dict[str, Any]]:
    """The latest version of every repository in the MLflow store."""
    from tasks.tracking import TAG_COMMIT, TAG_OUTCOME, TAG_VERSION, mlflow_client, run_url

    client = mlflow_client()
    versions = []
    for experiment in client.search_experiments(max_results=1000):
        repo = experiment.tags.get("textgen.repo_url")
        if not repo:
            continue
        runs = client.search_runs(
            [experiment.experiment_id],
            f"tags.`{TAG_OUTCOME}` = 'new' and attributes.status = 'FINISHED'",
            order_by=["attributes.start_time DESC"],
            max_results=1,
        )
        if not runs:
            continue
        run = runs[0]
        versions.append(
            {
                "repository": repo,
                "version": int(run.data.tags.get(TAG_VERSION, "0") or 0),
                "commit": run.data.tags.get(TAG_COMMIT, "")[:7],
                "url": run_url(experiment.experiment_id, run.info.run_id),
            }
        )
    return versions


def look() -> Status:
    """Everything `textgen status` shows."""
    from tasks.tracking import ui_base_url

    service = running_service()
    api = prefect_api() or (service or {}).get("prefect_api")
    status = Status(api, (service or {}).get("mlflow_ui") or ui_base_url(), service)
    status.pushes = outbox_pushes()
    if api:
        status.runs = active_runs(api)
    if not tracking_uri().startswith(("http://", "https://")) or api:
        status.versions = last_versions()
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


def render(status: Status) -> str:
    """The status for people."""
    from deployments.cli import format_table

    lines = []
    service = status.service
    if service:
        lines.append(f"textgen serve: running (pid {service['pid']})")
        lines += [f"  receiver: {url}" for url in service.get("receivers", [])]
        lines += [f"  deployment: {name}" for name in service.get("deployments", [])]
    else:
        lines.append("textgen serve: not running with this data folder")
    if status.prefect_api:
        lines.append(f"Prefect API: {status.prefect_api} (UI {_ui_base(status.prefect_api)})")
    else:
        lines.append("Prefect API: none (`textgen serve` is not running here)")
    lines.append(f"MLflow UI: {status.mlflow_ui}")
    lines += ["", "Pushes (newest per branch):"]
    if status.pushes:
        table = format_table(
            [
                {
                    "repository": p["repository"],
                    "branch": p["branch"],
                    "commit": p["commit"],
                    "received": p["received"],
                    "state": "handled" if p["handled"] else "queued",
                }
                for p in status.pushes
            ]
        )
        lines += [f"  {line}" for line in table.splitlines()]
    else:
        lines.append("  none received")
    lines += ["", "Runs queued or running:"]
    if status.runs:
        lines += [
            f"  {r['state']:<10} {r['name']}  {r['repository']}@{r['commit']}  {r['url']}"
            for r in status.runs
        ]
    else:
        lines.append("  none")
    lines += ["", "Last version per repository:"]
    if status.versions:
        lines += [
            f"  v{v['version']} ({v['commit']})  {v['repository']}  {v['url']}"
            for v in status.versions
        ]
    else:
        lines.append("  none yet")
    return "\n".join(lines) + "\n"
