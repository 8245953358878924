"""Results back where the developer works: commit statuses and pull-request comments.

Every push (and pull request head) the receiver queues for a link with an API `token` is also a
row of the outbox's `reports` table, written in the same transaction. This thread, in the
receiver's process, walks each row through its phases:

- `queued`: set a `pending` status on the commit.
- `pending`: wait for the push's flow run to end, then read its MLflow record and decide the
  final status: success (version N, or the preview), skipped (with the reason), or failure
  (with the reason, or the quality gate that failed). The decision is stored before it is posted.
- `final`: post it; for a preview, also the comparison with the base branch's latest version, as
  the pull request's one comment, edited in place on later pushes.
- `done` (or `gave_up`, when the provider refused it: the error is logged).

The token lives only in the serving process's memory: it is read once at start (`Served.of`),
its environment variable removed so no flow run started from there inherits it, and it is sent
only in a header. The flow never sees it, so a pull request from a fork cannot read it.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
import time
from dataclasses import dataclass, replace
from typing import Any

from deployments.forge import Forge, ForgeError, Status, forge_for
from tasks.errors import TextgenError
from tasks.gates import failed_gates
from tasks.links import Link
from tasks.triggers import SKIPPED, SUPERSEDED

logger = logging.getLogger(__name__)

MAX_ATTEMPTS = 8
PENDING_STATES = {"SCHEDULED", "PENDING", "RUNNING", "CANCELLING", "PAUSED"}
CRASH_GRACE_SECONDS = 120.0
"""How long a crashed push run may wait for the reaper's retry before it counts as failed."""
GIVE_UP_SECONDS = 86400.0


@dataclass(frozen=True)
class Row:
    """One push (or pull request head) whose result goes back to the provider."""

    provider: str
    delivery: str
    link: str
    kind: str
    sha: str
    pr: int | None
    phase: str
    result: dict[str, Any] | None
    attempts: int
    created_at: float


def context(link: str, kind: str) -> str:
    """The status context: named after the deployment (`textgen/<link>`, `.../preview`)."""
    return f"textgen/{link}" + ("/preview" if kind == "preview" else "")


def marker(link: str) -> str:
    """What marks the one preview comment of a deployment in a pull request."""
    return f"<!-- textgen-preview {link} -->"


class Reporter(threading.Thread):
    """Posts statuses and preview comments for the queued pushes of links with a token."""

    def __init__(
        self,
        db_path: Any,
        links: list[tuple[Link, str]],
        deployments: dict[str, Any],
        reap: bool = False,
        seconds: float = 1.0,
        client: Any = None,
    ) -> None:
        """`links`: each link with its resolved token (see `Served.of`)."""
        super().__init__(name="textgen-reporter", daemon=True)
        self.db_path = db_path
        self.links = {link.name: link for link, _ in links}
        self.deployments = deployments
        self.reap = reap
        self.seconds = seconds
        self.stopping = threading.Event()
        self.forges: dict[str, Forge] = {}
        for link, token in links:
            api, repository = link.api_target()
            self.forges[link.name] = forge_for(link.provider, api, repository, token, client)
        self._trackers: dict[str, Any] = {}

    # Storage

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.db_path, timeout=30, isolation_level=None)
        db.execute("PRAGMA synchronous=FULL")
        return db

    def rows(self, limit: int = 200) -> list[Row]:
        """Rows due now, oldest first."""
        with self._connect() as db:
            found = db.execute(
                "SELECT provider, delivery, link, kind, sha, pr, phase, result, attempts, "
                "created_at FROM reports WHERE phase IN ('queued', 'pending', 'final') "
                "AND next_at <= ? ORDER BY created_at LIMIT ?",
                (time.time(), limit),
            ).fetchall()
        return [
            Row(p, d, link, k, sha, pr, phase, json.loads(r) if r else None, a, c)
            for p, d, link, k, sha, pr, phase, r, a, c in found
        ]

    def _update(self, row: Row, **values: Any) -> None:
        if "result" in values:
            values["result"] = json.dumps(values["result"])
        columns = ", ".join(f"{k} = ?" for k in values)
        with self._connect() as db:
            db.execute(
                f"UPDATE reports SET {columns} WHERE provider = ? AND delivery = ?",
                (*values.values(), row.provider, row.delivery),
            )

    def _state(self, key: str) -> str | None:
        with self._connect() as db:
            found = db.execute("SELECT value FROM state WHERE key = ?", (key,)).fetchone()
        return None if found is None else str(found[0])

    def _set_state(self, key: str, value: str) -> None:
        with self._connect() as db:
            db.execute("INSERT OR REPLACE INTO state (key, value) VALUES (?, ?)", (key, value))

    # The loop

    def run(self) -> None:
        """Check every `seconds` until stopped."""
        while not self.stopping.wait(self.seconds):
            try:
                self.check()
            except Exception:  # never let the thread die
                logger.exception("reporting results failed")

    def check(self) -> int:
        """One pass over the rows due; returns how many moved on."""
        moved = 0
        runs: dict[str, list[Any]] = {}
        for row in self.rows():
            if row.link not in self.forges:
                self._update(row, phase="gave_up", last_error="the link has no API token now")
                continue
            try:
                moved += self.advance(row, runs)
            except ForgeError as exc:
                self._failed(row, exc)
            except Exception as exc:
                logger.warning("Reporting %s of %s: %s", row.sha[:7], row.link, exc)
                self._update(row, next_at=time.time() + 5)
        return moved

    def _failed(self, row: Row, exc: ForgeError) -> None:
        attempts = row.attempts + 1
        if exc.permanent or attempts >= MAX_ATTEMPTS:
            logger.error(
                "Link %s: %s did not take the result for %s (%s); giving up. Check the token's "
                "scope (README: results on the commit)",
                row.link,
                self.forges[row.link].provider,
                row.sha[:7],
                exc,
            )
            if row.phase == "queued":  # the pending status is a courtesy; the result is not
                self._update(row, phase="pending", attempts=0, last_error=str(exc)[:2000])
            else:
                self._update(row, phase="gave_up", attempts=attempts, last_error=str(exc)[:2000])
            return
        delay = min(60.0, 2.0**attempts)
        logger.warning(
            "Link %s: posting the result for %s failed (%s); retrying in %.0f s",
            row.link,
            row.sha[:7],
            exc,
            delay,
        )
        self._update(
            row, attempts=attempts, next_at=time.time() + delay, last_error=str(exc)[:2000]
        )

    def advance(self, row: Row, runs: dict[str, list[Any]]) -> int:
        """Move one row on by one phase (or more); returns 1 if it moved."""
        forge = self.forges[row.link]
        if row.phase == "queued":
            what = f"preview of PR #{row.pr}" if row.kind == "preview" else "output version"
            forge.set_status(
                row.sha,
                Status("pending", f"Queued: generating the {what}", context(row.link, row.kind)),
            )
            self._update(row, phase="pending", attempts=0)
            return 1
        if row.phase == "pending":
            if row.link not in runs:
                runs[row.link] = self._flow_runs(row.link)
            result = self.outcome(row, runs[row.link])
            if result is None:
                if time.time() - row.created_at > GIVE_UP_SECONDS:
                    result = {
                        "state": "error",
                        "description": "No run started for this push within a day",
                    }
                else:
                    self._update(row, next_at=time.time() + self.seconds)
                    return 0
            self._update(row, phase="final", result=result, attempts=0)
            row = replace(row, phase="final", result=result, attempts=0)
        result = row.result or {}
        forge.set_status(
            row.sha,
            Status(
                result["state"],
                result["description"],
                context(row.link, row.kind),
                result.get("target_url"),
            ),
        )
        if row.kind == "preview" and row.pr is not None and result.get("comment"):
            key = f"comment:{row.link}:{row.pr}"
            known = self._state(key)
            comment_id = forge.upsert_comment(
                row.pr, marker(row.link), result["comment"], int(known) if known else None
            )
            self._set_state(key, str(comment_id))
        self._update(row, phase="done")
        logger.info(
            "Link %s: %s status of %s: %s",
            row.link,
            result["state"],
            row.sha[:7],
            result["description"],
        )
        return 1

    # Outcomes

    def _flow_runs(self, link: str) -> list[Any]:
        deployment_id = self.deployments.get(link)
        if deployment_id is None:
            return []
        from prefect.client.orchestration import get_client
        from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId
        from prefect.client.schemas.sorting import FlowRunSort

        with get_client(sync_client=True) as client:
            return list(
                client.read_flow_runs(
                    deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id])),
                    sort=FlowRunSort.EXPECTED_START_TIME_DESC,
                    limit=200,
                )
            )

    def _tracker(self, link: str) -> Any:
        from tasks.tracking import Tracker

        if link not in self._trackers:
            self._trackers[link] = Tracker.for_repo(self.links[link].url, create=False)
        return self._trackers[link]

    def outcome(self, row: Row, runs: list[Any]) -> dict[str, Any] | None:
        """The final status of a row's push once its flow run ended; None while it has not."""
        mine = [r for r in runs if _is_for(r, row)]
        if not mine:
            return None
        run = mine[0]  # the newest: a retry of a crashed run comes after it
        state = run.state
        kind = state.type.value if state is not None else "PENDING"
        message = (state.message or "") if state is not None else ""
        if kind in PENDING_STATES:
            return None
        if kind == "CRASHED" and self.reap and "textgen-retried" not in run.tags:
            since = time.time() - state.timestamp.timestamp() if state is not None else 0.0
            if since < CRASH_GRACE_SECONDS:
                return None  # the reaper retries it (or marks it) first
        record = self._record(row, run)
        if record is None:
            if message.startswith((SKIPPED, SUPERSEDED)):
                return {"state": "success", "description": message}
            return {
                "state": "failure",
                "description": f"Failed: {message or kind.lower()}",
            }
        return self._from_record(row, record)

    def _record(self, row: Row, run: Any) -> Any | None:
        """The MLflow run of a flow run; None when it made none (a run cancelled while it
        waited, or a repository whose experiment does not exist yet)."""
        try:
            tracker = self._tracker(row.link)
        except TextgenError:
            return None
        found = tracker.client.search_runs(
            [tracker.experiment_id],
            f"tags.`textgen.prefect.flow_run_id` = '{run.id}'",
            max_results=5,
        )
        return found[0] if found else None

    def _from_record(self, row: Row, record: Any) -> dict[str, Any]:
        tracker = self._tracker(row.link)
        tags = record.data.tags
        outcome = tags.get("textgen.outcome")
        url = tracker.url(record.info.run_id)
        gated = failed_gates(tags)
        if outcome == "new":
            version = tags.get("textgen.version")
            if gated:
                return _result("failure", f"Version {version} recorded, gated: {gated}", url)
            return _result("success", f"Version {version} recorded", url)
        if outcome == "reused":
            version = tags.get("textgen.reused_version")
            if gated:
                return _result("failure", f"Already version {version}, gated: {gated}", url)
            return _result("success", f"Already version {version} (same commit and settings)", url)
        if outcome == "skipped":
            return _result("success", f"Skipped: {tags.get('textgen.skip_reason', '')}", url)
        if outcome == "preview":
            comment, summary = self._preview_comment(row, record, gated)
            if gated:
                return _result("failure", f"Preview gated: {gated}", url, comment)
            return _result("success", f"Preview: {summary}", url, comment)
        reason = tags.get("textgen.failure") or record.info.status
        note: str | None = None
        if row.kind == "preview":
            note = (
                f"### textgen preview of `{row.sha[:7]}` failed\n\n{_quote(reason)}\n\n"
                f"[MLflow run]({url})\n"
            )
        return _result("failure", f"Failed: {reason}", url, note)

    def _preview_comment(self, row: Row, record: Any, gated: str | None) -> tuple[str, str]:
        """The comparison of the preview with the base branch's latest version, as the
        `textgen compare` report in Markdown; and a one-line summary for the status."""
        from deployments.compare import compare, render_markdown

        tracker = self._tracker(row.link)
        link = self.links[row.link]
        url = tracker.url(record.info.run_id)
        gates = _gates_section(record.data.tags)
        base = tracker.latest_version(link.branch)
        head = f"### textgen preview of PR #{row.pr} at `{row.sha[:7]}`"
        if base is None:
            body = (
                f"{head}\n\n{link.branch} has no version yet to compare with.\n\n{gates}"
                f"[Preview run]({url})\n"
            )
            return body, f"no version of {link.branch} to compare with yet"
        comparison = compare(link.url, base.info.run_id, record.info.run_id)
        changed = sum(
            1 for left, right in comparison.pairs if any(k != "same" for k, _ in left + right)
        )
        summary = (
            f"{changed} of {len(comparison.pairs)} texts differ from "
            f"v{base.data.tags.get('textgen.version')}"
        )
        verdict = f"**Gated:** {gated}\n\n" if gated else ""
        report = render_markdown(
            comparison,
            f"PR #{row.pr} (`{row.sha[:7]}`) against {link.branch}'s latest version, "
            f"{comparison.a.label}",
        )
        body = f"{head}\n\n{verdict}{gates}{report}\n[Preview run]({url})\n"
        return body, summary


def _is_for(run: Any, row: Row) -> bool:
    params = run.parameters or {}
    if str(params.get("commit_sha") or "").lower() != row.sha:
        return False
    if row.kind == "preview":
        pull = params.get("pull_request") or {}
        return params.get("trigger") == "preview" and pull.get("number") == row.pr
    return params.get("trigger") != "preview"


def _result(
    state: str, description: str, url: str | None = None, comment: str | None = None
) -> dict[str, Any]:
    return {"state": state, "description": description, "target_url": url, "comment": comment}


def _quote(text: str) -> str:
    return "\n".join(f"> {line}" for line in text.splitlines()[:40])


def _gates_section(tags: dict[str, str]) -> str:
    raw = tags.get("textgen.gates.report")
    if not raw:
        return ""
    try:
        results = json.loads(raw)
    except ValueError:
        return ""
    lines = ["| gate | result |", "|---|---|"]
    for item in results:
        mark = "passed" if item.get("passed") else "**failed**"
        if not item.get("checked", True):
            mark = "not checked"
        lines.append(f"| `{item.get('gate', '')}` | {mark}: {item.get('note', '')} |")
    return "\n".join(lines) + "\n\n"
